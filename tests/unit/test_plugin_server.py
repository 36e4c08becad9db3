"""The plugin's HTTP edge on a real unix socket, without a cluster: bodies it
cannot parse and more connections than it serves at once are answered, never
a traceback or a thread without end (the endpoints that reach the cluster:
tests/integration/test_plugin.py)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cephvol.cluster import ClusterConfig
from cephvol.lifecycle import Host
from cephvol.mapper import HostPaths
from cephvol.plugin import server
from cephvol.plugin.protocol import Plugin, PluginPaths


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[Path]:
    host = Host(ClusterConfig(conf=tmp_path / "no-such-ceph.conf"), HostPaths(tmp_path / "state"))
    plugin = Plugin(host, PluginPaths(tmp_path / "data", tmp_path / "mnt", tmp_path / "run"))
    path = tmp_path / "cephvol.sock"
    ready, stop = threading.Event(), threading.Event()
    t = threading.Thread(target=server.serve, args=(plugin, path),
                         kwargs={"ready": ready, "stop": stop}, daemon=True)
    t.start()
    assert ready.wait(10)
    yield path
    stop.set()
    t.join(30)
    assert not t.is_alive() and not path.exists()


def _post(path: Path, endpoint: str, body: bytes) -> tuple[int, dict[str, object]]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(f"POST /{endpoint} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                  "Connection: close\r\n\r\n".encode() + body)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, payload = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


def test_a_body_nested_deeper_than_python_recurses_is_not_json(sock_path: Path) -> None:
    code, res = _post(sock_path, "VolumeDriver.Get", b"[" * 500_000)
    assert code == 500 and res == {"Err": "cephvol exit 2: the request body is not JSON"}
    code, res = _post(sock_path, "Plugin.Activate", b"{}")  # still serving
    assert code == 200 and res == {"Implements": ["VolumeDriver"]}


def test_connections_beyond_the_cap_are_refused_at_once(sock_path: Path) -> None:
    idle = []
    try:
        for _ in range(server.MAX_CONNECTIONS):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(sock_path))
            idle.append(s)
        # the idle ones hold every slot: one more is answered 503 and closed
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(sock_path))
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
        head, _, payload = raw.partition(b"\r\n\r\n")
        assert head.split()[1] == b"503", raw
        assert json.loads(payload)["Err"].startswith("cephvol exit 4: the plugin is serving")
    finally:
        for s in idle:
            s.close()
    # the slots come back when those connections end
    for _ in range(20):
        try:
            code, res = _post(sock_path, "Plugin.Activate", b"{}")
            break
        except (json.JSONDecodeError, IndexError, ValueError):
            threading.Event().wait(0.2)
    assert code == 200, res
