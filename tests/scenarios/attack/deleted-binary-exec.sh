#!/usr/bin/env bash
# A binary unlinked from disk, then executed through its open descriptor.
# expect: T1620|T1070|T1027
# expect: exec_from_temp_dir
. "$(dirname "$0")/../lib.sh"
python3 - "$VS_DIR" <<'PY'
import os, shutil, sys
p = os.path.join(sys.argv[1], "payload")
shutil.copy("/bin/sleep", p); os.chmod(p, 0o700)
fd = os.open(p, os.O_RDONLY); os.unlink(p)
pid = os.fork()
if pid == 0:
    os.execv(f"/proc/self/fd/{fd}", ["payload", "0.3"])
os.waitpid(pid, 0)
PY
