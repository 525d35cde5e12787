#!/usr/bin/env bash
# A user program that calls itself "[kworker/0:2]" to pass as a kernel thread.
# expect: T1036
. "$(dirname "$0")/../lib.sh"
cp /bin/sleep "$VS_DIR/w"
(exec -a '[kworker/0:2]' "$VS_DIR/w" 0.3)
