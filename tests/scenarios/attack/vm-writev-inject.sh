#!/usr/bin/env bash
# A program writes into another process's memory with process_vm_writev
# (no ptrace attach, no /proc/PID/mem: one system call).
# expect: process_injection
. "$(dirname "$0")/../lib.sh"
cd "$(vs_app_root)"
sleep 20 &
victim=$!; vs_track "$victim"
sleep 0.2
python3 - "$victim" <<'PY'
import ctypes, os, sys
class IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
libc = ctypes.CDLL(None, use_errno=True)
libc.process_vm_writev.restype = ctypes.c_ssize_t
pid = int(sys.argv[1])
stack = next(int(l.split("-")[0], 16) for l in open(f"/proc/{pid}/maps") if l.rstrip().endswith("[stack]"))
buf = ctypes.create_string_buffer(b"\x90" * 16)
local = IOVec(ctypes.cast(buf, ctypes.c_void_p), 16)
remote = IOVec(ctypes.c_void_p(stack), 16)
n = libc.process_vm_writev(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
assert n == 16, os.strerror(ctypes.get_errno())
PY
