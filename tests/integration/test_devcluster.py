"""Two `dev-cluster up` at once on one fresh directory (issue 21, item 15),
in a directory whose name needs quoting (item 13): both succeed, one makes
the cluster, the other waits for it and finds it running. Costs one cluster
start (about 15 s); it is stopped and removed at the end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from cephvol.devcluster import DevCluster
from cephvol.hostfs import pid_alive

CEPHVOL = str(Path(sys.executable).parent / "cephvol")


def test_two_concurrent_ups_on_one_fresh_directory(tmp_path: Path) -> None:
    d = tmp_path / "dev cluster & (x)"
    procs = [subprocess.Popen([CEPHVOL, "dev-cluster", "up", "--dir", str(d), "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    pids: list[int] = []
    try:
        outs = [p.communicate(timeout=300) for p in procs]
        for p, (_out, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err
        res = [json.loads(out) for out, _ in outs]
        assert sorted(r["created"] for r in res) == [False, True]
        assert {r["conf"] for r in res} == {str(d / "ceph.conf")}
        pids = [p for p in DevCluster(d).daemon_state().values() if p]
        assert len(pids) == 3, "one mon, one mgr, one osd: not two of anything"
        # the cluster works, through the quoted line the README evals
        line = subprocess.run([CEPHVOL, "dev-cluster", "env", "--dir", str(d)],
                              capture_output=True, text=True, timeout=60, check=True).stdout
        ls = subprocess.run(["bash", "-c", 'eval "$1" && exec "$0" ls', CEPHVOL, line],
                            capture_output=True, text=True, timeout=120)
        assert ls.returncode == 0, ls.stderr
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        down = subprocess.run([CEPHVOL, "dev-cluster", "down", "--dir", str(d)],
                              capture_output=True, text=True, timeout=180)
        shutil.rmtree(d, ignore_errors=True)
    assert down.returncode == 0, down.stderr
    assert not [p for p in pids if pid_alive(p)], "daemons left running"
    assert not d.exists()
