#!/usr/bin/env bash
# A kernel module built or dropped outside the system's module trees is
# loaded with insmod. Not a real module: the kernel refuses it, and the
# attempt is what counts.
# requires: /proc/modules
# expect: kernel_module_load
. "$(dirname "$0")/../lib.sh"
app=$(vs_app_root); mkdir -p "$app/drv"
head -c 4096 /dev/urandom >"$app/drv/netfilter_helper.ko"
insmod "$app/drv/netfilter_helper.ko" 2>/dev/null || true
python3 - "$app/drv/netfilter_helper.ko" <<'PY'
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open(sys.argv[1], os.O_RDONLY)
libc.syscall(313, fd, b"", 0)  # finit_module
PY
