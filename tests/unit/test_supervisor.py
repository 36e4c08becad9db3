"""Where cephvol logs and what it tells systemd, decided from the real
environment a unit gets (JOURNAL_STREAM, INVOCATION_ID, NOTIFY_SOCKET).
The journal entries themselves are checked under a real journald in the
guest (tests/vm/test_systemd_units.py)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from cephvol import supervisor


def _stream_id(fd: int) -> str:
    st = os.fstat(fd)
    return f"{st.st_dev}:{st.st_ino}"


def test_stderr_is_journal_only_when_stderr_is_that_stream(tmp_path: Path) -> None:
    r, w = os.pipe()
    other_r, other_w = os.pipe()
    try:
        assert supervisor.stderr_is_journal({"JOURNAL_STREAM": _stream_id(w)}, fd=w)
        # a child whose stderr was redirected keeps the variable: not the journal
        assert not supervisor.stderr_is_journal({"JOURNAL_STREAM": _stream_id(w)},
                                                fd=other_w)
        assert not supervisor.stderr_is_journal({"JOURNAL_STREAM": "garbage"}, fd=w)
        assert not supervisor.stderr_is_journal({}, fd=w)
    finally:
        for fd in (r, w, other_r, other_w):
            os.close(fd)


@pytest.mark.parametrize(("env", "socket_exists", "expected"), [
    ({}, True, False),                                   # by hand
    ({"INVOCATION_ID": "abc"}, True, True),              # in a unit
    ({"INVOCATION_ID": "abc"}, False, False),            # no journald
    ({"INVOCATION_ID": "abc", "CEPHVOL_LOG": "stderr"}, True, False),
    ({"CEPHVOL_LOG": "journal"}, True, True),
    ({"CEPHVOL_LOG": "journal"}, False, False),
])
def test_use_journal(tmp_path: Path, env: dict[str, str], socket_exists: bool,
                     expected: bool) -> None:
    sock = tmp_path / "journal.socket"
    if socket_exists:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(str(sock))
        s.close()
    assert supervisor.use_journal(env, socket=sock) is expected


def test_notify_speaks_sd_notify_on_a_real_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(5)
    old = os.environ.get("NOTIFY_SOCKET")
    os.environ["NOTIFY_SOCKET"] = str(path)  # systemd.daemon.notify reads the real env
    try:
        assert supervisor.notify("attached rbd/pg:\n /dev/rbd0", ready=True)
        msg = listener.recv(4096).decode()
    finally:
        listener.close()
        if old is None:
            os.environ.pop("NOTIFY_SOCKET", None)
        else:
            os.environ["NOTIFY_SOCKET"] = old
    assert msg.splitlines() == ["READY=1", "STATUS=attached rbd/pg: /dev/rbd0"]


def test_notify_is_silent_outside_notify_units() -> None:
    assert supervisor.notify("x", ready=True, env={}) is False


def test_stderr_mode_is_quiet_unless_debug(capsys: pytest.CaptureFixture[str]) -> None:
    assert supervisor.configure(False, env={}) == "stderr"
    supervisor.event("map", "rbd/pg", "mapped rbd/pg at /dev/loop3", device="/dev/loop3")
    assert capsys.readouterr().err == ""
    supervisor.configure(True, env={})
    supervisor.event("map", "rbd/pg", "mapped rbd/pg at /dev/loop3", device="/dev/loop3")
    assert capsys.readouterr().err == "cephvol: mapped rbd/pg at /dev/loop3\n"
    supervisor.configure(False, env={})


def test_a_steps_journal_fields_name_its_encryption() -> None:
    """The fields JournalHandler sends (VOLUME, DEVICE, BACKEND, MOUNTPOINT,
    STEP, ENCRYPTION) are the log record's extras: read them off a record."""
    import logging

    from cephvol.lifecycle.host import event
    from cephvol.spec import parse_spec
    from cephvol.state import VolumeState

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    supervisor.log.addHandler(keep)
    old = supervisor.log.level
    supervisor.log.setLevel(logging.INFO)
    try:
        st = VolumeState(spec="rbd/e", conf="/c", client_id="admin", backend="qsd",
                         device="/dev/loop3", extra={"encryption": "luks2"})
        event("map", parse_spec("rbd/e"), st, "mapped")
        st.extra = {}
        event("map", parse_spec("rbd/e"), st, "mapped")
    finally:
        supervisor.log.removeHandler(keep)
        supervisor.log.setLevel(old)
    enc, plain = records
    assert (enc.STEP, enc.VOLUME, enc.BACKEND, enc.ENCRYPTION) == (  # type: ignore[attr-defined]
        "map", "rbd/e", "qsd", "luks2")
    assert not hasattr(plain, "ENCRYPTION") and plain.DEVICE == "/dev/loop3"  # type: ignore[attr-defined]
