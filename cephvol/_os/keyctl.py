"""add_key(2) through libc's syscall(), for handing cephx secrets to the kernel.

krbd reads the secret from the kernel keyring of the process that writes
the map string, so the secret never has to appear in the string (which the
kernel keeps in the root-readable config_info) nor in any argv.
"""

from __future__ import annotations

import ctypes
import os
import platform

from cephvol.errors import Unsupported

_SYS_ADD_KEY = {"x86_64": 248, "aarch64": 217, "armv7l": 309, "ppc64le": 269, "s390x": 278}
KEY_SPEC_PROCESS_KEYRING = -2


def add_key(key_type: str, description: str, payload: bytes,
            keyring: int = KEY_SPEC_PROCESS_KEYRING) -> int:
    nr = _SYS_ADD_KEY.get(platform.machine())
    if nr is None:
        raise Unsupported(f"add_key: unknown syscall number on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    buf = ctypes.create_string_buffer(payload, len(payload))
    serial = libc.syscall(
        ctypes.c_long(nr), ctypes.c_char_p(key_type.encode()),
        ctypes.c_char_p(description.encode()), buf, ctypes.c_size_t(len(payload)),
        ctypes.c_int(keyring))
    if serial < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"add_key({key_type}, {description}): {os.strerror(err)}")
    return int(serial)
