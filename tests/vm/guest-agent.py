#!/usr/bin/python3
"""Command agent inside the qemu test guest (stdlib only).

Reads one JSON request per line from the virtio-serial port and answers one
JSON line: {"op": "run", "argv": [...], "timeout": s, "input": str|null}
-> {"rc", "stdout", "stderr"}; {"op": "put", "path", "data" (base64), "mode"}
-> {"rc": 0}. It announces {"ready": true} once started, so the host knows
the guest has booted (systemd, network, cephvol installed).
"""

import base64
import json
import os
import subprocess
import time

PORT = "/dev/virtio-ports/cephvol.agent"


def handle(req):
    if req.get("op") == "put":
        path = req["path"]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, req.get("mode", 0o600))
        with os.fdopen(fd, "wb") as f:
            f.write(base64.b64decode(req["data"]))
        os.chmod(path, req.get("mode", 0o600))
        return {"rc": 0, "stdout": "", "stderr": ""}
    try:
        cp = subprocess.run(req["argv"], input=req.get("input"), capture_output=True,
                            text=True, errors="replace", timeout=req.get("timeout", 60),
                            stdin=None if req.get("input") is not None else subprocess.DEVNULL)
        return {"rc": cp.returncode, "stdout": cp.stdout, "stderr": cp.stderr}
    except subprocess.TimeoutExpired as exc:
        return {"rc": 124, "stdout": str(exc.stdout or ""), "stderr": f"timeout: {exc}"}
    except OSError as exc:
        return {"rc": 127, "stdout": "", "stderr": str(exc)}


def main():
    with open(PORT, "r+b", buffering=0) as port:
        port.write(b'{"ready": true}\n')
        buf = b""
        while True:
            chunk = port.read(65536)
            if not chunk:
                time.sleep(0.2)  # host not connected yet, or reconnecting
                continue
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                req = json.loads(line)
                resp = handle(req)
                resp["id"] = req.get("id")
                port.write(json.dumps(resp).encode() + b"\n")


if __name__ == "__main__":
    main()
