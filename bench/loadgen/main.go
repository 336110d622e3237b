// tether-loadgen: the load generator of tether's benchmark suite, built to cost
// less per round trip than the fastest server it measures.
//
// It speaks RFC 6455 itself (client handshake with the Sec-WebSocket-Accept
// check, masked frames, ping -> pong, fragments), Engine.IO v4 / Socket.IO v5
// over WebSocket (event with ack), and raw TCP with newline framing. One OS
// thread, one epoll set, raw non-blocking sockets (engine.go); requests come
// from pools of pre-masked frames and replies are checked in place against a
// template learned from a fully checked first reply (frames.go).
//
// Modes:
//
//	echo      C connections, K requests in flight each: round trips/s, p50/p99
//	idle      N connections (one echo round trip each), EVENT holding, then
//	          hold them until stdin closes (or -hold)
//	bcast     N receivers + 1 sender, -inflight broadcasts in flight for
//	          -warmup + -duration, then -lat broadcasts one at a time (the
//	          fan-out time: send -> last receiver)
//	serve     a trivial WebSocket echo server (the floor: no JSON, one read
//	          and one write per wake-up), for selftest and as a peer
//	selftest  starts serve on -server-cpu and runs echo on -gen-cpu for every
//	          -configs setting: prints the generator's and the server's CPU
//	          per round trip
//	soak      N connections held for minutes from many source addresses, pings
//	          answered, a request every ~30 s each, broadcasts to -members;
//	          phases driven on stdin by bench/soak.py (soak.go)
//
// Output: "EVENT measure_start" / "EVENT measure_end" / "EVENT holding" lines
// as things happen, then one "RESULT {json}" line. With -server-pid, the
// generator samples that process's CPU time (/proc/PID/stat utime+stime) at
// the same instants as its own (getrusage) and the machine's (/proc/stat), so
// every per-CPU figure covers exactly the measured window.
//
// Every loop is bounded by time (-warmup + -duration + 10 s, -timeout, -hold)
// and by count (-max, -r, -lat); -addr must be 127.0.0.1.
//
// Build (no module proxy, no cgo): GO111MODULE=off go build -o bench/.build/loadgen ./bench/loadgen
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"math/bits"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

var (
	flagMode       = flag.String("mode", "echo", "echo | idle | bcast | serve | selftest | soak")
	flagProto      = flag.String("proto", "ws", "ws | sio | tcp")
	flagAddr       = flag.String("addr", "127.0.0.1:9100", "server host:port (127.0.0.1 only; serve: where to listen, port 0 = any)")
	flagPath       = flag.String("path", "/", "WebSocket path")
	flagC          = flag.Int("c", 50, "connections (echo)")
	flagK          = flag.Int("k", 1, "requests in flight per connection (echo)")
	flagN          = flag.Int("n", 1000, "connections (idle) / receivers (bcast)")
	flagInflight   = flag.Int("inflight", 8, "broadcasts in flight (bcast, throughput phase)")
	flagLowat      = flag.Int("lowat", 4, "bcast: in the throughput phase a receiver reads once this many broadcasts wait (SO_RCVLOWAT; at most -inflight/2; 1 = every one)")
	flagR          = flag.Int("r", 1_000_000, "at most this many broadcasts in the throughput phase (bcast)")
	flagLat        = flag.Int("lat", 30, "broadcasts sent one at a time after the throughput phase (bcast; at most 10 s)")
	flagWarmup     = flag.Duration("warmup", time.Second, "warm-up before the measured window (echo, bcast)")
	flagDuration   = flag.Duration("duration", 3*time.Second, "measured window (echo, bcast)")
	flagMax        = flag.Int64("max", 5_000_000, "at most this many requests per connection (echo)")
	flagHold       = flag.Duration("hold", 30*time.Second, "longest hold of idle connections (idle); lifetime (serve)")
	flagTimeout    = flag.Duration("timeout", 20*time.Second, "connect+handshake timeout; per-broadcast timeout")
	flagServerPid  = flag.Int("server-pid", 0, "sample this process's CPU time at the window's edges")
	flagWait       = flag.String("wait", "tick", "tick: sleep -tick when a poll finds nothing | block: block in epoll_wait")
	flagTick       = flag.Duration("tick", 100*time.Microsecond, "polling tick (-wait=tick)")
	flagBcastLen   = flag.Int("bcast-size", 100, "broadcast message size in bytes (approximate)")
	flagDialWindow = flag.Int("dial-window", 64, "connections being set up at once")
	flagConfigs    = flag.String("configs", "50x1,500x1,50x16", "selftest: CxK settings")
	flagServerCPU  = flag.String("server-cpu", "0", "selftest: core for the server")
	flagGenCPU     = flag.String("gen-cpu", "1", "selftest: core for the generator")
	flagGen        = flag.String("gen", "", "selftest: also run this (older) generator binary, same flags, for comparison")
	flagRuns       = flag.Int("runs", 1, "selftest: runs per setting (generators alternate)")
)

// ---------------------------------------------------------------- histogram

// log-linear histogram of nanoseconds, ~1.5% resolution
const histSize = 128 + 64*58

type hist [histSize]uint64

func hIdx(v int64) int {
	if v < 0 {
		v = 0
	}
	if v < 128 {
		return int(v)
	}
	e := bits.Len64(uint64(v)) - 7
	m := uint64(v) >> uint(e)
	return 128 + (e-1)*64 + int(m-64)
}

func hVal(i int) float64 {
	if i < 128 {
		return float64(i)
	}
	e := (i-128)/64 + 1
	m := (i-128)%64 + 64
	return (float64(m) + 0.5) * float64(uint64(1)<<uint(e))
}

func (h *hist) count() uint64 {
	var total uint64
	for _, c := range h {
		total += c
	}
	return total
}

func (h *hist) quantile(q float64) float64 {
	total := h.count()
	if total == 0 {
		return 0
	}
	target := uint64(q*float64(total-1)) + 1
	var acc uint64
	for i, c := range h {
		acc += c
		if acc >= target {
			return hVal(i)
		}
	}
	return 0
}

// ---------------------------------------------------------------- CPU samples

const clkTck = 100 // USER_HZ: /proc reports CPU time in 1/100 s on Linux

type sample struct {
	wall     int64
	gen      time.Duration // this process, getrusage (us resolution)
	server   float64       // -server-pid: utime+stime, s (10 ms resolution)
	serverOK bool
	busy     float64 // /proc/stat: all cores, busy (user+nice+system+irq+softirq), s
	steal    float64
	mallocs  uint64
}

func cpuSelf() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func procCPU(pid int) (float64, bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, false
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0, false
	}
	u, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (u + st) / clkTck, true
}

func machineBusy() (busy, steal float64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line := strings.SplitN(string(b), "\n", 2)[0]
	f := strings.Fields(line)
	var v [10]float64
	for i := 1; i < len(f) && i <= 10; i++ {
		v[i-1], _ = strconv.ParseFloat(f[i], 64)
	}
	// user nice system idle iowait irq softirq steal guest guest_nice
	return (v[0] + v[1] + v[2] + v[5] + v[6]) / clkTck, v[7] / clkTck
}

func takeSample() sample {
	var s sample
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	s.mallocs = ms.Mallocs
	s.wall = nanotime()
	s.gen = cpuSelf()
	if *flagServerPid > 0 {
		s.server, s.serverOK = procCPU(*flagServerPid)
	}
	s.busy, s.steal = machineBusy()
	return s
}

// windowResult: the CPU figures of the window between two samples.
func windowResult(s0, s1 sample, e *engine) map[string]any {
	secs := float64(s1.wall-s0.wall) / 1e9
	if secs <= 0 {
		secs = 1e-9
	}
	gen := (s1.gen - s0.gen).Seconds()
	res := map[string]any{
		"secs": secs, "gen_cpu_s": gen, "gen_cpu_frac": gen / secs,
		"sys_busy_s": s1.busy - s0.busy, "steal_s": s1.steal - s0.steal,
		"allocs": s1.mallocs - s0.mallocs,
		"engine": "epoll", "wait": *flagWait, "tick_us": flagTick.Seconds() * 1e6,
	}
	if s0.serverOK && s1.serverOK {
		srv := s1.server - s0.server
		res["server_cpu_s"] = srv
		res["server_cpu_frac"] = srv / secs
		foreign := (s1.busy - s0.busy) - srv - gen
		if foreign < 0 {
			foreign = 0
		}
		res["foreign_cpu_frac"] = foreign / secs
	}
	return res
}

// perMsg adds the per-message costs (unit: rt or delivery).
func perMsg(res map[string]any, msgs int64, unit string) {
	if msgs <= 0 {
		return
	}
	res["gen_us_per_"+unit] = res["gen_cpu_s"].(float64) / float64(msgs) * 1e6
	if srv, ok := res["server_cpu_s"].(float64); ok {
		res["server_us_per_"+unit] = srv / float64(msgs) * 1e6
		if srv > 0 {
			res[unit+"_per_server_cpu_s"] = float64(msgs) / srv
		}
	}
}

// finish adds the engine's counters and turns failures into "error".
func finish(res map[string]any, e *engine, bad, mismatch int64, why string) {
	res["errors"] = e.nerr
	if len(e.errs) > 0 {
		res["error_kinds"] = e.errs
	}
	res["wakes"], res["sleeps"] = e.wakes, e.sleeps
	if e.wakes > 0 {
		res["events_per_wake"] = float64(e.events) / float64(e.wakes)
	}
	res["reads"], res["writes"] = e.reads, e.writes
	switch {
	case bad > 0:
		res["error"] = fmt.Sprintf("%d invalid messages from the server, e.g. %s", bad, why)
	case mismatch > 0:
		res["error"] = fmt.Sprintf("%d replies with a number that was not in flight", mismatch)
	case e.nerr > 0:
		res["error"] = fmt.Sprintf("%d connection errors: %v", e.nerr, e.errs)
	}
}

var outMu sync.Mutex

func event(name string) {
	outMu.Lock()
	fmt.Fprintf(os.Stdout, "EVENT %s\n", name)
	outMu.Unlock()
}

func main() {
	flag.Parse()
	runtime.GOMAXPROCS(1)
	runtime.LockOSThread()
	// nanosleep of one tick, not tick + the default 50 us slack (per thread: this one)
	syscall.RawSyscall(syscall.SYS_PRCTL, syscall.PR_SET_TIMERSLACK, 1, 0)
	host := strings.Split(*flagAddr, ":")[0]
	if host != "127.0.0.1" && host != "localhost" {
		fmt.Fprintln(os.Stderr, "loadgen: -addr must be 127.0.0.1:<port>")
		os.Exit(2)
	}
	var res map[string]any
	switch *flagMode {
	case "echo":
		res = runEcho()
	case "idle":
		res = runIdle()
	case "bcast":
		res = runBcast()
	case "serve":
		os.Exit(runServe())
	case "selftest":
		os.Exit(runSelftest())
	case "soak":
		res = runSoak()
	default:
		fmt.Fprintln(os.Stderr, "loadgen: unknown -mode")
		os.Exit(2)
	}
	res["mode"], res["proto"] = *flagMode, *flagProto
	res["c"], res["k"], res["n"] = *flagC, *flagK, *flagN
	b, _ := json.Marshal(res)
	outMu.Lock()
	fmt.Printf("RESULT %s\n", b)
	outMu.Unlock()
	if _, bad := res["error"]; bad {
		os.Exit(1)
	}
}
