// One RTCPeerConnection to one other participant, negotiated with the perfect-negotiation
// pattern (W3C webrtc-pc section 10.7, MDN "Perfect negotiation"): the same code on both
// sides; the polite one rolls back its own offer when offers cross (glare), the impolite one
// ignores the other's. The server assigns the roles (roster.js isPolite) and relays what
// `send` sends to the other side only.

const STUCK_MS = 5000;

export class Peer {
  #send;
  #queue = Promise.resolve(); // incoming signals, handled one at a time, in order
  #makingOffer = false;
  #ignoreOffer = false;
  #unsent = undefined; // the polite side's stream, until its first answer carries it
  #watchdog = null;

  /**
   * @param {object} options
   * @param {string} options.id the other side's member id
   * @param {boolean} options.polite our role towards it
   * @param {MediaStream | null} options.stream what we send (its tracks as they are now)
   * @param {RTCIceServer[]} options.iceServers
   * @param {(signal: {description?: object, candidate?: object}) => void} options.send
   * @param {(peer: Peer) => void} [options.onChange] media or connection state changed
   */
  constructor({ id, polite, stream, iceServers, send, onChange = () => {} }) {
    this.id = id;
    this.polite = polite;
    this.remote = new MediaStream();
    /** Counters the tests read: how often each branch of the pattern ran. */
    this.stats = { offers: 0, answers: 0, collisions: 0, ignoredOffers: 0, rollbacks: 0, iceRestarts: 0 };
    this.#send = send;
    const pc = (this.pc = new RTCPeerConnection({ iceServers }));
    // Who offers first: the impolite side. The polite one puts its tracks into its first
    // answer instead of an offer of its own, so a new pair does not start with glare (which
    // the pattern survives, but Chromium may then never gather candidates for the answer if
    // the offer it rolled back was still gathering). Glare on later negotiations is handled.
    if (polite) this.#unsent = stream;
    else this.#attach(stream);
    pc.ontrack = ({ track, streams }) => {
      if (streams[0]) this.remote = streams[0]; // the other side's stream, as it added it
      else this.remote.addTrack(track);
      track.onunmute = () => onChange(this);
      onChange(this);
    };
    pc.onicecandidate = ({ candidate }) => {
      if (candidate) send({ candidate: candidate.toJSON() });
    };
    pc.onnegotiationneeded = () => this.#offer();
    pc.oniceconnectionstatechange = () => {
      if (pc.iceConnectionState === "failed") this.restartIce();
    };
    pc.onconnectionstatechange = () => onChange(this);
    pc.onsignalingstatechange = () => this.#watch();
  }

  /** "new" | "connecting" | "connected" | "disconnected" | "failed" | "closed". */
  get state() { return this.pc.connectionState; }

  /** Handle a signal relayed from the other side ({description} or {candidate}). */
  receive(signal) {
    this.#queue = this.#queue.then(() => this.#receive(signal)).catch((error) => {
      if (this.pc.signalingState !== "closed") console.error(`signal from ${this.id}:`, error);
    });
    return this.#queue;
  }

  /** New ICE credentials (after a failure, or a network change): triggers an offer. */
  restartIce() {
    this.stats.iceRestarts += 1;
    this.pc.restartIce();
  }

  /** Bytes of video received so far (inbound-rtp), from getStats(). */
  async videoBytesReceived() {
    let bytes = 0;
    for (const report of (await this.pc.getStats()).values()) {
      if (report.type === "inbound-rtp" && report.kind === "video") bytes += report.bytesReceived ?? 0;
    }
    return bytes;
  }

  close() {
    clearTimeout(this.#watchdog);
    this.pc.close();
    for (const track of this.remote.getTracks()) track.stop();
  }

  /** A negotiation that ended with ICE still "new" has no candidate pairs at all (candidates
   * lost with a dropped socket, or never gathered): the impolite side starts ICE over. */
  #watch() {
    clearTimeout(this.#watchdog);
    if (this.polite || this.pc.signalingState !== "stable" || !this.pc.remoteDescription) return;
    this.#watchdog = setTimeout(() => {
      if (this.pc.signalingState === "stable" && this.pc.iceConnectionState === "new") this.restartIce();
    }, STUCK_MS);
  }

  async #offer() {
    try {
      this.#makingOffer = true;
      await this.pc.setLocalDescription(); // an offer, or an answer if one is due
      this.#sendDescription();
    } catch (error) {
      if (this.pc.signalingState !== "closed") console.error(`offer to ${this.id}:`, error);
    } finally {
      this.#makingOffer = false;
    }
  }

  async #receive({ description, candidate }) {
    if (description) {
      const collision = description.type === "offer" && (this.#makingOffer || this.pc.signalingState !== "stable");
      this.#ignoreOffer = !this.polite && collision;
      if (collision) this.stats.collisions += 1;
      if (this.#ignoreOffer) {
        this.stats.ignoredOffers += 1; // ours wins: the polite side rolls back and answers it
        return;
      }
      if (collision) this.stats.rollbacks += 1; // setRemoteDescription rolls ours back
      await this.pc.setRemoteDescription(description);
      if (description.type === "offer") {
        if (this.#unsent !== undefined) this.#attach(this.#unsent); // reuses the offer's transceivers
        this.#unsent = undefined;
        await this.pc.setLocalDescription();
        this.#sendDescription();
      }
    } else if (candidate) {
      try {
        await this.pc.addIceCandidate(candidate);
      } catch (error) {
        if (!this.#ignoreOffer) throw error; // candidates of an offer we ignored are expected to fail
      }
    }
  }

  /** Send our tracks; receive audio and video either way (so that someone without a camera
   * or microphone still makes an offer, and still sees and hears the others). */
  #attach(stream) {
    for (const kind of ["audio", "video"]) {
      const track = stream?.getTracks().find((t) => t.kind === kind);
      if (track) this.pc.addTrack(track, stream);
      else if (!this.pc.getTransceivers().some((t) => t.receiver.track.kind === kind)) {
        this.pc.addTransceiver(kind, { direction: "recvonly" });
      }
    }
  }

  #sendDescription() {
    const { type, sdp } = this.pc.localDescription;
    this.stats[type === "offer" ? "offers" : "answers"] += 1;
    this.#send({ description: { type, sdp } });
  }
}
