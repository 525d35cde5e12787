#!/usr/bin/env bash
# A program attaches with ptrace to a service it did not start, writes into
# its memory and rewrites its registers (the classic injector: attach,
# POKETEXT the code, SETREGS to jump to it), then detaches.
# expect: ptrace_attach
# expect: process_injection
. "$(dirname "$0")/../lib.sh"
cd "$(vs_app_root)"
sleep 20 &
victim=$!; vs_track "$victim"
sleep 0.2
python3 - "$victim" <<'PY'
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
pid = int(sys.argv[1])
PTRACE_ATTACH, PTRACE_DETACH, PTRACE_POKEDATA, PTRACE_GETREGS, PTRACE_SETREGS = 16, 17, 5, 12, 13
assert libc.ptrace(PTRACE_ATTACH, pid, None, None) == 0, os.strerror(ctypes.get_errno())
os.waitpid(pid, os.WUNTRACED | 0x40000000)
stack = next(int(l.split("-")[0], 16) for l in open(f"/proc/{pid}/maps") if l.rstrip().endswith("[stack]"))
assert libc.ptrace(PTRACE_POKEDATA, pid, ctypes.c_void_p(stack), ctypes.c_void_p(0x9090909090909090)) == 0
regs = ctypes.create_string_buffer(27 * 8)
assert libc.ptrace(PTRACE_GETREGS, pid, None, regs) == 0
assert libc.ptrace(PTRACE_SETREGS, pid, None, regs) == 0
libc.ptrace(PTRACE_DETACH, pid, None, None)
PY
