"""Property: every value that reaches a unit file either comes out exactly as
meant, or is refused (exit 2) and nothing is written.

`cephvol units render` runs in-process (the real CLI entry point); each unit
it writes goes through the real `systemd-analyze verify` and is then read
back by a parser written here from systemd's rules (independent of the one in
cephvol/units.py): a line ends at "\\n", "\\r", "\\r\\n" or NUL, a trailing
backslash joins the next line, `#`/`;` lines are comments. The directives
read back must be the template's, in order, and the values that carry input
(Description=, Environment=, the attach ExecStartPre=, ExecStart=, the detach
ExecStopPost=, EnvironmentFile=) must be exactly the ones meant.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from cephvol.cli import main
from cephvol.spec import parse_spec

pytestmark = pytest.mark.skipif(not shutil.which("systemd-analyze"),
                                reason="systemd-analyze not installed")

CEPHVOL = "/usr/bin/env"  # an executable that exists, so verify checks the rest
RUNTIME = "/usr/bin/true"
# what an attacker types: systemd's line ends (\r \n NUL), what Python's
# splitlines() also splits at (\v \f \x85 \u2028 \u2029), escapes and line
# continuation (\), specifiers (%), variables ($), quoting, comment starts,
# Exec prefixes (-@+!:), a command separator (;), section and key syntax
HOSTILE = ["\r", "\n", "\r\n", "\x00", "\v", "\f", "\x85", "\u2028", "\u2029", "\t", "\\",
           "\\n", "%", "%%", "%n", "$", "$X", "${X}", "$$", '"', "'", ";", " ; ", "#", "=",
           " ", "-", "@", "+", "!", ":", "[Service]", "\rUser=nobody", "\rExecStartPre=/pwn",
           "\nExecStart=/pwn", "é", "/", "..", ".", "x", "a1", "_"]
# tricky but legal somewhere: half of the draws use only these, so that many
# units are rendered and must come out exactly as typed
TRICKY = ["%%", "$X", "${X}", "$$", "'a b'", '"c d"', "';'", "'#'", "é", "-", "@", "+", "!",
          ":", "=", "#", "[x]", ";x", "x", "a1", "_", ".", "/y", " "]
_frag = st.one_of(st.lists(st.sampled_from(HOSTILE), min_size=1, max_size=5).map("".join),
                  st.lists(st.sampled_from(TRICKY), min_size=1, max_size=5).map("".join))
_prefix = st.lists(st.sampled_from(["-", "@", "+", "!", ":", "!!", "|"]), max_size=3).map(
    "".join)

FIELDS = ("spec", "name", "image", "command", "mountpoint", "container_path", "env_key",
          "env_value", "cephvol", "runtime")


@st.composite
def _case(draw: Any) -> dict[str, Any]:
    kind = draw(st.sampled_from(["plain", "docker", "podman"]))
    field = draw(st.sampled_from(FIELDS))
    frag = draw(_frag)
    at_end = draw(st.booleans())
    c: dict[str, Any] = {
        "kind": kind, "style": draw(st.sampled_from(["bind", "device"])),
        "fleet": draw(st.booleans()), "spec": "rbd/ns1/db-1", "name": "app1",
        "image": "reg.example:5000/db@sha:1" if kind != "plain" else None,
        "command": "/bin/echo hello" if kind == "plain" else draw(
            st.sampled_from([None, "--flag x", "'a b'"])),
        "mountpoint": None, "container_path": None, "env": [("A_1", "one two")],
        "cephvol": CEPHVOL, "runtime": RUNTIME if kind != "plain" else None,
    }

    def mix(base: str) -> str:
        return base + frag if at_end else frag + base

    if field == "spec":
        c["spec"] = draw(st.sampled_from(["rbd/ns1/", "rbd/", "rbd/x/"])) + mix("db")
    elif field == "name":
        c["name"] = draw(st.sampled_from(["", "cephvol", "systemd-", "Cephvol"])) + mix("app")
    elif field == "image":
        c["kind"], c["command"], c["runtime"] = "docker", None, RUNTIME
        c["image"] = mix("img:1")
    elif field == "command" and kind == "plain":
        c["command"] = draw(_prefix) + "/bin/echo" + draw(st.sampled_from(["", " "])) + frag
    elif field == "command":
        c["command"] = frag
    elif field in ("mountpoint", "container_path"):
        c[field] = mix("/srv/data")
    elif field == "env_key":
        c["env"] = [(mix("KEY"), "v")]
    elif field == "env_value":
        c["env"] = [("KEY", mix("v")), ("B", "x")]
    elif field == "cephvol":
        c["cephvol"] = mix("/usr/bin/env")
    else:
        c["kind"], c["command"], c["image"] = "docker", None, "img:1"
        c["runtime"] = mix("/usr/bin/true")
    c["field"] = field
    return c


def _argv(c: dict[str, Any], out: Path) -> list[str]:
    argv = ["units", "render", c["spec"], "--for", c["kind"], "--style", c["style"],
            "--name", c["name"], "--cephvol-path", c["cephvol"], "-o", str(out)]
    for opt, key in (("--image", "image"), ("--command", "command"),
                     ("--mountpoint", "mountpoint"), ("--container-path", "container_path"),
                     ("--runtime-path", "runtime")):
        if c[key] is not None:
            argv += [opt, c[key]]
    for k, v in c["env"]:
        argv += ["--setenv", f"{k}={v}"]
    return argv + (["--fleet"] if c["fleet"] else [])


def _run(argv: list[str]) -> tuple[int, str, str]:
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        code = main(argv)
    return code, o.getvalue(), e.getvalue()


def read_like_systemd(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) as systemd's config_parse() reads a unit file."""
    out, section, cont = [], "", None
    for line in re.split(r"\r\n|\r|\n|\x00", text):
        if line.lstrip(" \t").startswith(("#", ";")):
            continue  # comments are skipped, also inside a continuation
        line = line if cont is None else cont + line
        if re.search(r"(?<!\\)(?:\\\\)*\\$", line):  # an odd number of trailing backslashes
            cont = line[:-1] + " "
            continue
        cont, line = None, line.strip(" \t")
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line:
            key, _, value = line.partition("=")
            out.append((section, key.strip(" \t"), value.strip(" \t")))
    return out


@functools.cache
def _baseline_keys(kind: str, style: str, fleet: bool, n_env: int) -> list[tuple[str, str]]:
    """The directive keys of the same unit rendered from plain values."""
    c = {"kind": kind, "style": style, "fleet": fleet, "spec": "rbd/base", "name": "base",
         "image": "img" if kind != "plain" else None,
         "command": "/bin/true" if kind == "plain" else None, "mountpoint": None,
         "container_path": None, "env": [(f"K{i}", "v") for i in range(n_env)],
         "cephvol": CEPHVOL, "runtime": RUNTIME if kind != "plain" else None}
    with tempfile.TemporaryDirectory() as tmp:
        code, _, err = _run(_argv(c, Path(tmp)))
        assert code == 0, err
        return [(s, k) for s, k, _ in read_like_systemd((Path(tmp) / "base.service").read_text())]


def _expected(c: dict[str, Any]) -> dict[str, Any]:
    spec = str(parse_spec(c["spec"]))
    name, bind = c["name"], c["style"] == "bind"
    mp = c["mountpoint"] or f"/srv/cephvol/{name}"
    attach = (f"{c['cephvol']} attach {spec}" + (f" --mountpoint {mp}" if bind else "")
              + f" --env-file /run/cephvol/{name}.env")
    if c["kind"] == "plain":
        start = c["command"]
    else:
        vol = (f"-v {mp}:{c['container_path'] or '/data'}" if bind else
               f"--device ${{CEPHVOL_DEVICE}}:{c['container_path'] or '/dev/cephvol'} "
               "--cap-add SYS_ADMIN")
        run = ("run --rm" if c["kind"] == "docker" else
               "run --rm --replace -d --sdnotify=conmon --cgroups=no-conmon")
        env = ("-e CEPHVOL_IMAGE -e CEPHVOL_FSTYPE -e CEPHVOL_READ_ONLY "
               + (f"-e CEPHVOL_MOUNTPOINT={c['container_path'] or '/data'}" if bind else
                  f"-e CEPHVOL_DEVICE={c['container_path'] or '/dev/cephvol'}"))
        start = (f"{c['runtime']} {run} --name {name} {vol} {env} {c['image']}"
                 + (f" {c['command']}" if c["command"] else ""))
    return {"Description": [f"{name} on Ceph RBD volume {spec}"],
            "Environment": [f'"{k}={v}"' for k, v in c["env"]],
            "ExecStart": [start.strip(" \t")],
            "EnvironmentFile": [f"-/run/cephvol/{name}.env"],
            "attach": attach, "detach": f"{c['cephvol']} detach {spec}"}


def _verify_problems(path: Path, c: dict[str, Any]) -> list[str]:
    res = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                         text=True, timeout=60)
    allowed = [f"{c['kind']}.service not found"]
    if c["field"] in ("cephvol", "runtime"):  # a made-up path does not exist here
        allowed.append(f"Command {c[c['field']]} is not executable")
    if (c["field"] == "command" and c["kind"] == "plain"
            and c["command"].split(" ")[0].lstrip("-:+!") != "/bin/echo"):
        allowed.append("is not executable: No such file")  # e.g. /bin/echo- (made up)
    problems = [ln for ln in res.stderr.splitlines()
                if ln.strip() and not any(a in ln for a in allowed)]
    return problems


def _fixed(**over: Any) -> dict[str, Any]:
    """A case of issue 21, spelled out (always run, before the drawn ones)."""
    kind = over.get("kind", "plain")
    c = {"kind": kind, "style": "bind", "fleet": False, "spec": "rbd/pg", "name": "pg",
         "image": None if kind == "plain" else "postgres",
         "command": "/bin/sleep infinity" if kind == "plain" else None, "mountpoint": None,
         "container_path": None, "env": [], "cephvol": CEPHVOL,
         "runtime": None if kind == "plain" else RUNTIME, "field": "command"}
    return {**c, **over}


@settings(max_examples=140, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(c=_case())
@example(c=_fixed(field="env_value",
                  env=[("A", "x\rExecStartPre=/bin/touch /tmp/pwned\rUser=nobody\r")]))
@example(c=_fixed(command="/bin/sleep infinity \\"))
@example(c=_fixed(kind="docker", command="postgres \\"))
@example(c=_fixed(field="spec", spec="rbd/ns\n/pg"))
@example(c=_fixed(field="name", name="pg6\n"))
@example(c=_fixed(field="mountpoint", mountpoint="/srv/pg\n"))
@example(c=_fixed(command="/bin/echo a ; /bin/echo b"))
@example(c=_fixed(command="   "))
@example(c=_fixed(field="name", name="cephvol-cleanup"))
@example(c=_fixed(kind="docker", command="'%%' \"$$HOME\" ${CEPHVOL_DEVICE} ;x",
                  env=[("K", "a 'b' $c")]))  # accepted, and must come out as written
def test_unit_values_come_out_exactly_or_are_refused(c: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        code, stdout, err = _run(_argv(c, out))
        written = sorted(p.name for p in out.iterdir())
        event(f"{c['field']}: {'refused' if code else 'rendered'}")
        if code != 0:
            assert code == 2, (c, err)
            assert err.startswith("cephvol: error: ") and len(err.strip().splitlines()) == 1
            assert written == [], c  # refused: nothing written, no temp file left
            return
        assert written == [f"{c['name']}.service"], (c, written)
        path = out / written[0]
        assert stdout.strip() == str(path)
        problems = _verify_problems(path, c)
        assert problems == [], (c, problems)
        got = read_like_systemd(path.read_text())
        keys = [(s, k) for s, k, _ in got]
        assert keys == _baseline_keys(c["kind"], c["style"], c["fleet"], len(c["env"])), c
        want = _expected(c)
        for key in ("Description", "Environment", "ExecStart", "EnvironmentFile"):
            assert [v for _, k, v in got if k == key] == want[key], (c, key)
        assert [v for _, k, v in got if k == "ExecStartPre"][-1] == want["attach"], c
        assert [v for _, k, v in got if k == "ExecStopPost"][-1] == want["detach"], c


def test_the_hostile_alphabet_is_read_as_systemd_reads_it() -> None:
    """The parser above is what makes the property mean something: check it
    on the very injections of issue 21."""
    text = ("[Service]\nEnvironment=\"A=x\rExecStartPre=/bin/touch /p\rUser=nobody\r\"\n"
            "ExecStart=/bin/sleep infinity \\\nExecStopPost=/x detach\n"
            "# c\n;c\nKey = v \x00Other=w\r\nLast=\\\\\n")
    assert read_like_systemd(text) == [
        ("Service", "Environment", '"A=x'), ("Service", "ExecStartPre", "/bin/touch /p"),
        ("Service", "User", "nobody"), ("Service", '"', ""),
        ("Service", "ExecStart", "/bin/sleep infinity  ExecStopPost=/x detach"),
        ("Service", "Key", "v"), ("Service", "Other", "w"), ("Service", "Last", "\\\\")]
