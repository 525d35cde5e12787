#!/usr/bin/env bash
# A program dropped into an application's directory loads a BPF program of
# a kind that hooks the kernel's functions (what BPF rootkits are made of).
# The load may be refused (a kernel without kprobes): the attempt counts.
# expect: bpf_program_load
. "$(dirname "$0")/../lib.sh"
app=$(vs_app_root); mkdir -p "$app/bin"
real=$(python3 -c 'import os, sys; print(os.path.realpath(sys.executable))')
home=$(python3 -c 'import sys; print(sys.base_prefix)')
cp "$real" "$app/bin/probe-loader"
PYTHONHOME="$home" "$app/bin/probe-loader" - <<'PY'
import ctypes, struct
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
insns = struct.pack("<QQ", 0xb7, 0x95)  # r0 = 0; exit
ibuf = ctypes.create_string_buffer(insns)
lic = ctypes.create_string_buffer(b"GPL")
attr = ctypes.create_string_buffer(128)
struct.pack_into("<IIQQ", attr, 0, 2, 2, ctypes.addressof(ibuf), ctypes.addressof(lic))  # BPF_PROG_TYPE_KPROBE
struct.pack_into("16s", attr, 48, b"hide_pids")
fd = libc.syscall(321, 5, attr, 128)  # bpf(BPF_PROG_LOAD)
print("bpf:", fd, ctypes.get_errno())
PY
