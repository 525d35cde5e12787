#!/usr/bin/env bash
# A program started normally that then renames itself like a kernel thread
# (prctl PR_SET_NAME), so ps and top show a kworker.
# expect: masquerading
. "$(dirname "$0")/../lib.sh"
cd "$(vs_app_root)"
python3 -c 'import ctypes, time
ctypes.CDLL(None).prctl(15, b"kworker/1:3", 0, 0, 0)
time.sleep(1)'
