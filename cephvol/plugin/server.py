"""The plugin's edge: HTTP/1.1 on a unix socket, as dockerd and podman speak
it to a volume plugin (POST /<Endpoint>, a JSON body, a JSON answer).

Threads, one per connection (ThreadingHTTPServer): a Mount that maps and
formats for seconds must not hold up another volume's Mount (protocol.py
locks per volume). Under systemd the socket comes from socket activation
(LISTEN_FDS/LISTEN_PID, sd_listen_fds(3)), so dockerd can connect before
the plugin runs; READY=1 goes out once requests are answered.

Stopping the server never detaches anything: containers keep their volumes,
and the next plugin process finds their Mount IDs on disk.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import socketserver
import stat
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

from cephvol import supervisor
from cephvol.errors import Busy, SystemCommandError, UsageError
from cephvol.plugin.protocol import CONTENT_TYPE, Plugin

log = logging.getLogger("cephvol")
SD_LISTEN_FDS_START = 3
MAX_BODY = 1 << 20
STOP_WAIT = 600.0  # seconds a stop waits for running requests (as TimeoutStopSec)
# connections served at once; one more is answered 503 and closed at once, so
# a client that opens many and sends nothing cannot grow threads without end
MAX_CONNECTIONS = 64
_BUSY_BODY = json.dumps({"Err": "cephvol exit 4: the plugin is serving "
                                f"{MAX_CONNECTIONS} connections; try again"}).encode()


def activated_socket(env: Mapping[str, str] | None = None,
                     pid: int | None = None) -> socket.socket | None:
    """The listening socket systemd passed (sd_listen_fds), or None. Only
    for this very process (LISTEN_PID), and only one: a second one would be
    a unit we did not write."""
    env = os.environ if env is None else env
    if env.get("LISTEN_PID") != str(os.getpid() if pid is None else pid):
        return None
    try:
        n = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    if n < 1:
        return None
    if n > 1:
        raise UsageError(f"systemd passed {n} sockets; the plugin's socket unit has one")
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise UsageError("systemd passed a socket that is not a unix stream socket")
    return sock


def bind_socket(path: Path) -> socket.socket:
    """Listen at PATH. A socket file nobody answers on (a killed plugin's)
    is replaced; a live one, or anything that is not a socket, is refused."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise SystemCommandError(f"cannot use socket path {path}: {exc.strerror}") from exc
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise UsageError(f"{path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(2)
            probe.connect(str(path))
            raise Busy(f"another plugin answers on {path}")
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise SystemCommandError(f"cannot check socket {path}: {exc}") from exc
            path.unlink(missing_ok=True)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)  # 0600: the plugin mounts things; root only
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise SystemCommandError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
    return sock


class _Server(socketserver.ThreadingMixIn, HTTPServer):
    daemon_threads = True
    address_family = socket.AF_UNIX

    def __init__(self, sock: socket.socket, plugin: Plugin) -> None:
        self.plugin = plugin
        self.busy = threading.Condition()
        self.in_flight = 0
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__("", _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_name, self.server_port = "cephvol", 0

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                                + CONTENT_TYPE.encode() + b"\r\nContent-Length: "
                                + str(len(_BUSY_BODY)).encode()
                                + b"\r\nConnection: close\r\n\r\n" + _BUSY_BODY)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 60  # an idle keep-alive connection ends (and frees its slot)

    def do_POST(self) -> None:
        endpoint = self.path.lstrip("/").split("?", 1)[0]
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            self._send(400, {"Err": "cephvol exit 2: bad Content-Length"})
            return
        raw = self.rfile.read(length) if length else b""
        try:
            request: Any = json.loads(raw) if raw.strip() else None
        except (ValueError, RecursionError):  # nested deeper than Python recurses
            self._send(500, {"Err": "cephvol exit 2: the request body is not JSON"})
            return
        with self.server.busy:
            self.server.in_flight += 1
        try:
            res = self.server.plugin.handle(endpoint, request)
        finally:
            with self.server.busy:
                self.server.in_flight -= 1
                self.server.busy.notify_all()
        # an error is also an HTTP error: dockerd reads "Err" either way, but
        # podman (4.3) takes any 200 for success and would ignore the refusal
        code = 404 if endpoint not in self.server.plugin.endpoints else (
            500 if res.get("Err") else 200)
        self._send(code, res)

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("plugin http: " + format, *args)

    def address_string(self) -> str:
        return "unix"


def serve(plugin: Plugin, socket_path: Path, *, ready: threading.Event | None = None,
          stop: threading.Event | None = None) -> None:
    """Answer requests until SIGTERM/SIGINT (or `stop`, for tests in a
    thread). The socket file a non-activated server made is removed again."""
    sock = activated_socket()
    made = sock is None
    if sock is None:
        sock = bind_socket(socket_path)
    server = _Server(sock, plugin)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    worker = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name="cephvol-plugin", daemon=True)
    worker.start()
    where = socket_path if made else "the socket systemd passed"
    supervisor.notify(f"serving the volume plugin on {where}", ready=True)
    log.info("plugin: serving on %s", where)
    if ready is not None:
        ready.set()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.shutdown()  # no new requests; the ones running finish (a Mount
        with server.busy:  # half done would be left to `cephvol cleanup`)
            server.busy.wait_for(lambda: server.in_flight == 0, timeout=STOP_WAIT)
        server.server_close()
        if made:
            with contextlib.suppress(OSError):
                socket_path.unlink()
