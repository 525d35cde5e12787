#!/usr/bin/env bash
# A program opens a running service's memory for writing through
# /proc/PID/mem (the first step of injecting code into it).
# expect: process_injection
. "$(dirname "$0")/../lib.sh"
cd "$(vs_app_root)"
sleep 5 &
victim=$!; vs_track "$victim"
python3 - "$victim" <<'PY'
import sys
with open(f"/proc/{sys.argv[1]}/mem", "r+b", buffering=0) as m:
    pass
PY
