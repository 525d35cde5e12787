#!/usr/bin/env bash
# An interpreter runs machine code it was handed as bytes: anonymous memory
# mapped executable, the code copied in, and called (no file holds it).
# expect: anonymous_exec_memory
. "$(dirname "$0")/../lib.sh"
cd "$(vs_app_root)"
python3 - <<'PY'
import ctypes, mmap, time
code = bytes.fromhex("b82a000000c3")  # mov eax, 42; ret
mem = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
mem.write(code)
addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
assert ctypes.CFUNCTYPE(ctypes.c_int)(addr)() == 42
time.sleep(1)
PY
