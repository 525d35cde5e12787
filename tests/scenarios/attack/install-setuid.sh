#!/usr/bin/env bash
# A helper installed with the setuid bit outside the system directories.
# expect: T1548
. "$(dirname "$0")/../lib.sh"
install -m 4755 /bin/sleep "$VS_DIR/svc"
"$VS_DIR/svc" 0.2
