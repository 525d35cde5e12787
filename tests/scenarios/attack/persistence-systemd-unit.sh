#!/usr/bin/env bash
# A systemd service unit dropped for persistence (never enabled or started).
# expect: T1543
. "$(dirname "$0")/../lib.sh"
f=/etc/systemd/system/vs-update-$$.service; mkdir -p /etc/systemd/system; vs_protect "$f"
printf '[Service]\nExecStart=/tmp/.x/agent\n' >"$f"
