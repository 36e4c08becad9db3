"""One writer per volume across hosts: owning a volume, giving it back, and
taking it over from a dead host.

Every writable attach takes ownership in the cluster before it maps, and
detach gives it back only after the unmap succeeded. The record is a small
RADOS object beside the image, ``cephvol_owner.<image id>`` (the image's
pool and namespace), holding ``<cookie>\\n<json>``: host id (machine-id),
host name, since when, the cookie of this attach, the client addresses of
the mapping (what a takeover fences) and, after a takeover, whom it was
taken from.

Taking it is an exclusive create and every later change a compare-and-write
on the cookie line, both atomic on the OSD: of two hosts attaching at the
same instant exactly one wins, and a host can never release or overwrite an
ownership that was taken over from it.

Why not an RBD advisory lock (``rbd lock add``): it is the header's
``rbd_lock``, the same cls lock the exclusive-lock feature takes (krbd's
``exclusive`` map, librbd's managed lock), so holding it would stall the very
mapping it protects. Why not "are there watchers?": a host that is frozen
(or partitioned) has no watch after 30 s but may wake up and write. So a
takeover first waits for the owner's watch to go, then fences the owner's
client addresses (``osd blocklist add``) before it breaks the ownership: from
then on the OSDs refuse the old owner's writes.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cephvol.cluster import Cluster
from cephvol.errors import Busy, Conflict, Owned, UsageError
from cephvol.spec import ImageSpec

OBJECT_PREFIX = "cephvol_owner."
DEFAULT_TAKEOVER_WAIT = 45.0  # > osd_client_watch_timeout (30 s): a dead owner's watch is gone
_HOST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


@dataclass(frozen=True)
class HostIdentity:
    """Who this host is to other hosts: /etc/machine-id, which survives
    reboots and is unique per installation. CEPHVOL_HOST_ID overrides it
    (hosts without one; tests that play several hosts on one machine)."""

    id: str
    name: str

    @classmethod
    def local(cls, env: Mapping[str, str] | None = None,
              machine_id: Path = Path("/etc/machine-id")) -> HostIdentity:
        env = os.environ if env is None else env
        hid = env.get("CEPHVOL_HOST_ID", "").strip()
        if not hid:
            try:
                hid = machine_id.read_text().strip()
            except OSError:
                hid = ""
        if not hid:
            raise UsageError(f"no host identity: {machine_id} is missing or empty "
                             "(run systemd-machine-id-setup) and CEPHVOL_HOST_ID is not set")
        if not _HOST_ID.fullmatch(hid):
            raise UsageError(f"host identity {hid!r}: use letters, digits and _.:- (≤ 64)")
        return cls(hid, env.get("CEPHVOL_HOST_NAME") or socket.gethostname())


class CorruptRecord(Conflict):
    """The ownership object exists but cannot be read as a record (written
    out of band). Attach and takeover fail closed on it; `cephvol owner
    --repair` removes it once no client uses the image."""


def repair(cluster: Cluster, spec: ImageSpec) -> str:
    """Remove a corrupt ownership record, only while no client watches the
    image (nobody has it mapped or open for writing, anywhere): then there
    is no owner to protect. "ok" (the record is readable or absent: nothing
    to repair) or "removed"; Busy while the image is in use."""
    spec = spec.without_snap()
    oid = object_name(cluster, spec)
    data = cluster.read_object(spec, oid)
    if data is None:
        return "ok"
    try:
        OwnerRecord.decode(data, oid)
        return "ok"
    except CorruptRecord:
        pass
    users = [w.get("addr", "?") for w in cluster.watchers(spec)]
    if users:
        raise Busy(f"{spec}: its ownership record is corrupt, but the image is in use by "
                   f"{', '.join(users)}; detach it there first, then repair")
    head = data.split(b"\n", 1)[0] + (b"\n" if b"\n" in data else b"")
    if not cluster.swap_object(spec, oid, head or data[:1], None):
        raise Conflict(f"{spec}: the ownership record changed while it was being repaired; "
                       "look again with `cephvol owner`")
    return "removed"


@dataclass(frozen=True)
class OwnerRecord:
    cookie: str
    host_id: str
    host: str
    since: str
    addrs: tuple[str, ...] = ()
    taken_over_from: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def head(self) -> bytes:
        """What every compare-and-write checks: this attach's cookie line."""
        return f"{self.cookie}\n".encode()

    def encode(self) -> bytes:
        body = {**asdict(self), "addrs": list(self.addrs)}
        return self.head + json.dumps(body, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes, where: str) -> OwnerRecord:
        try:
            _, body = data.decode().split("\n", 1)
            d = json.loads(body)
            return cls(cookie=d["cookie"], host_id=d["host_id"], host=d["host"],
                       since=d["since"], addrs=tuple(d.get("addrs") or ()),
                       taken_over_from=d.get("taken_over_from"))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptRecord(f"ownership record {where} is corrupt (written by something "
                                "other than cephvol?); `cephvol owner POOL/IMAGE --repair` "
                                "removes it once no client uses the image") from exc

    def describe(self) -> str:
        return f"host {self.host} (id {self.host_id}) since {self.since}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "addrs": list(self.addrs)}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def object_name(cluster: Cluster, spec: ImageSpec) -> str:
    return OBJECT_PREFIX + cluster.image_id(spec)


def current(cluster: Cluster, spec: ImageSpec, oid: str | None = None) -> OwnerRecord | None:
    oid = oid or object_name(cluster, spec)
    data = cluster.read_object(spec.without_snap(), oid)
    return None if data is None else OwnerRecord.decode(data, f"{spec.pool}/{oid}")


@dataclass
class Takeover:
    """What a takeover did, for the caller's report."""

    previous: OwnerRecord
    fenced: list[str]
    waited_s: float
    forced: bool


def acquire(cluster: Cluster, spec: ImageSpec, me: HostIdentity, *, takeover: bool = False,
            force: bool = False, wait_s: float = DEFAULT_TAKEOVER_WAIT,
            sleep: Callable[[float], None] = time.sleep
            ) -> tuple[OwnerRecord, Takeover | None]:
    """Own `spec` for this host, or raise Owned naming the owner.

    Already owned by this host (same host id): that ownership is returned
    as it is; a re-attach after a crash or a reboot that lost /run needs no
    takeover. Owned by another host: refused, unless `takeover`, which
    waits up to `wait_s` for the owner's client to stop watching the image
    (refused if it does not: it is alive, unless `force`), fences the owner's
    addresses, then swaps the record, atomically against a concurrent change.
    """
    spec = spec.without_snap()
    oid = object_name(cluster, spec)
    mine = OwnerRecord(cookie=uuid.uuid4().hex, host_id=me.id, host=me.name, since=_now())
    for _ in range(5):
        if cluster.create_object(spec, oid, mine.encode()):
            return mine, None
        cur = current(cluster, spec, oid)
        if cur is None:
            continue  # released between our create and our read
        if cur.host_id == me.id:
            return cur, None
        if not takeover:
            raise Owned(f"{spec} is owned by {cur.describe()}; detach it there first, or, "
                        "if that host is dead, attach with --takeover")
        report = _fence(cluster, spec, cur, force=force, wait_s=wait_s, sleep=sleep)
        new = replace(mine, since=_now(),
                      taken_over_from={"host": cur.host, "host_id": cur.host_id,
                                        "since": cur.since, "at": _now(),
                                        "fenced": report.fenced, "forced": force})
        if cluster.swap_object(spec, oid, cur.head, new.encode()):
            return new, report
    raise Conflict(f"ownership of {spec} kept changing while we tried to take it; "
                   "another host is attaching it: try again")


def _fence(cluster: Cluster, spec: ImageSpec, cur: OwnerRecord, *, force: bool,
           wait_s: float, sleep: Callable[[float], None]) -> Takeover:
    """Make sure the old owner cannot write any more. Its recorded addresses
    are fenced even when it no longer watches: a frozen host loses its watch
    but not its will to write when it wakes."""
    start = time.monotonic()
    while True:
        watchers = cluster.watchers(spec)
        # recorded addresses known: only those are the owner; unknown (it
        # died between taking ownership and mapping): any watcher may be it
        alive = [w["addr"] for w in watchers if not cur.addrs or w.get("addr") in cur.addrs]
        if not alive or force:
            break
        if time.monotonic() - start >= wait_s:
            raise Owned(f"{spec}: the owner, {cur.describe()}, still watches the image from "
                        f"{', '.join(alive)} after {wait_s:.0f} s: it looks alive. Detach it "
                        "there; if you are sure it is dead, --takeover --force fences it")
        sleep(1.0)
    fenced = sorted(set(cur.addrs) | set(alive))
    for addr in fenced:
        cluster.blocklist(addr)
    return Takeover(cur, fenced, round(time.monotonic() - start, 1), force and bool(alive))


def record_addrs(cluster: Cluster, spec: ImageSpec, rec: OwnerRecord,
                 addrs: list[str]) -> OwnerRecord:
    """Note the mapping's client addresses in our record (what a takeover
    would fence); Owned if the record is no longer ours."""
    spec = spec.without_snap()
    new = replace(rec, addrs=tuple(sorted(set(rec.addrs) | set(addrs))))
    if new == rec:
        return rec
    if not cluster.swap_object(spec, object_name(cluster, spec), rec.head, new.encode()):
        raise Owned(f"{spec} was taken over by another host while it was being attached here")
    return new


def release(cluster: Cluster, spec: ImageSpec, me: HostIdentity) -> str:
    """Give ownership back; "released", "not-owned" or "owned-by-other" (a
    takeover happened: that record is not ours to remove)."""
    spec = spec.without_snap()
    oid = object_name(cluster, spec)
    cur = current(cluster, spec, oid)
    if cur is None:
        return "not-owned"
    if cur.host_id != me.id:
        return "owned-by-other"
    return "released" if cluster.swap_object(spec, oid, cur.head, None) else "owned-by-other"
