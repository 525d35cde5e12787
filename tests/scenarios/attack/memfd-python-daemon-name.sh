#!/usr/bin/env bash
# Fileless: a program loaded into a memfd named like a system daemon.
# expect: T1620|T1027
# expect: T1036
. "$(dirname "$0")/../lib.sh"
python3 <<'PY'
import os
fd = os.memfd_create("systemd-journald", os.MFD_CLOEXEC)
os.write(fd, open("/bin/sleep", "rb").read())
pid = os.fork()
if pid == 0:
    os.execve(fd, ["systemd-journald", "0.3"], {})
os.waitpid(pid, 0)
PY
