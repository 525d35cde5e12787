#!/usr/bin/env bash
# What developers and runtimes do every day with the same system calls as
# injectors: strace traces the program it starts, gdb (the system's)
# attaches to a running process, Node's and Java's JIT compilers make
# anonymous memory executable.
. "$(dirname "$0")/../lib.sh"
cd "$(vs_app_root)"
strace -f -o /dev/null ls / >/dev/null
sleep 20 &
victim=$!; vs_track "$victim"
gdb -q -batch -p "$victim" -ex 'info registers rip' >/dev/null 2>&1
node -e 'let s = 0; for (let i = 0; i < 5e6; i++) s += i % 7; console.log(s)' >/dev/null
java -Xshare:off -version >/dev/null 2>&1 || true
