"""Debian's nginx in front of tether, with the configuration docs/deploy.md shows.

:func:`nginx_config` takes the block between the ``nginx.conf: begin`` / ``end`` markers of
docs/deploy.md and replaces exactly three lines of it (the listen address, the upstream
server, the read timeout), each of which must be there once: the guide and the test cannot
drift apart. ``Nginx(...).start()`` runs ``nginx`` in the foreground (``daemon off``, one
process) on 127.0.0.1 and a free port, everything it writes under a temporary directory.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from tests.conftest import TIMEOUT_SCALE, timeout
from tests.tether_run import ROOT, free_port

DEPLOY = ROOT / "docs" / "deploy.md"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
_BLOCK = re.compile(r"<!-- nginx\.conf: begin.*?-->\s*```nginx\n(.*?)```\s*<!-- nginx\.conf: end -->", re.S)


def deploy_block() -> str:
    """The nginx configuration of docs/deploy.md, as the guide shows it."""
    match = _BLOCK.search(DEPLOY.read_text())
    assert match is not None, "docs/deploy.md has no nginx.conf block between its markers"
    return match.group(1)


def nginx_config(listen: int, upstream: int, read_timeout: float, prefix: Path) -> str:
    """A whole nginx.conf: the guide's block with the test's ports and read timeout."""
    block = deploy_block()
    for old, new in (
        ("listen 80;", f"listen 127.0.0.1:{listen};"),
        ("server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream};"),
        ("proxy_read_timeout 60s;", f"proxy_read_timeout {round(read_timeout * 1000)}ms;"),
    ):
        assert block.count(old) == 1, f"docs/deploy.md's nginx block must contain {old!r} once"
        block = block.replace(old, new)
    paths = "\n".join(f"    {name}_temp_path {prefix}/{name};" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/access.log;
{paths}
{block}
}}
"""


class Nginx:
    """``await Nginx(upstream_port, read_timeout, tmp).start()``; ``stop()`` at the end."""

    def __init__(self, upstream: int, read_timeout: float, prefix: Path) -> None:
        self.port = free_port()
        self.prefix = prefix
        self.read_timeout = read_timeout
        prefix.mkdir(parents=True, exist_ok=True)
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(nginx_config(self.port, upstream, read_timeout, prefix))
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> Nginx:
        assert Path(NGINX).exists(), "nginx is not installed: make deps (apt-get install nginx)"
        cmd = [NGINX, "-p", str(self.prefix), "-c", str(self.conf), "-e", str(self.prefix / "error.log")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        async with timeout(10):
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"nginx exited: {self.errors()}")
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                    return self
                except OSError:
                    await asyncio.sleep(0.02)  # polling the condition: nginx listens

    def errors(self) -> str:
        log = self.prefix / "error.log"
        stderr = self.proc.stderr.read().decode() if self.proc is not None and self.proc.stderr and self.proc.poll() is not None else ""
        return stderr + (log.read_text() if log.exists() else "")

    def url(self, path: str = "/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def http(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # fast shutdown
            try:
                self.proc.wait(10 * TIMEOUT_SCALE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


__all__ = ["Nginx", "deploy_block", "nginx_config"]
