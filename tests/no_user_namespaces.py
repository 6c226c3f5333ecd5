"""Run a program as on a cluster node that refuses user namespaces: in a user namespace of
its own whose ``user.max_user_namespaces`` is 0, as an ordinary user (uid 1000 there).

    python no_user_namespaces.py PROGRAM [ARGUMENT...]

Bubblewrap started there meets the kernel's own refusal (``unshare`` fails with ENOSPC), as
on a node whose admins set ``user.max_user_namespaces=0``; the machine's setting is left
alone (the limit is the namespace's own and counts for everything below it). The program
runs with the starter's rights on files (root here), without its capabilities.
"""

import ctypes
import os
import sys

CLONE_NEWUSER = 0x10000000
USER = 1000


def _write(path: str, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    uid, gid = os.geteuid(), os.getegid()
    if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWUSER) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"unshare(CLONE_NEWUSER): {os.strerror(error)}")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{USER} {uid} 1")
    _write("/proc/self/gid_map", f"{USER} {gid} 1")
    # Still allowed: the namespace's creator holds every capability in it until exec.
    _write("/proc/sys/user/max_user_namespaces", "0")
    os.execv(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
