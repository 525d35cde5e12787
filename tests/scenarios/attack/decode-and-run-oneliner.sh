#!/usr/bin/env bash
# Code decoded and run by an interpreter in one step: no file is written.
# The second run pads the command line past what the kernel's record
# holds, so the decoding is only in its tail.
# expect: decode_and_execute
# expect: decode_and_execute
. "$(dirname "$0")/../lib.sh"
cd "$(vs_app_root)"
code=$(printf 'import time\ntime.sleep(1)\n' | base64 -w0)
python3 -c "import base64;exec(base64.b64decode('$code'))"
pad=$(head -c 3000 /dev/zero | tr '\0' '#')
python3 -c "$pad
import base64;exec(base64.b64decode('$code'))"
