#!/usr/bin/env bash
# A copy of a binary hidden in a dot-directory of a user's home, named like
# the D-Bus daemon.
# expect: T1564|T1036
# expect: T1036
. "$(dirname "$0")/../lib.sh"
d="$HOME/.local/share/.dbus"; mkdir -p "$d"
cp /bin/sleep "$d/dbus-daemon"
"$d/dbus-daemon" 0.3
