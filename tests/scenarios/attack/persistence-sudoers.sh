#!/usr/bin/env bash
# A sudoers drop-in written (a comment only, so sudo keeps working).
# expect: T1548
. "$(dirname "$0")/../lib.sh"
f=/etc/sudoers.d/vs-$$; mkdir -p /etc/sudoers.d; vs_protect "$f"
echo "# vigil scenario: www-data ALL=(ALL) NOPASSWD: ALL" >"$f"; chmod 440 "$f"
