#!/usr/bin/env bash
# An intruder removes the lines that show it from one log with `sed -i`
# (which writes a copy and renames it over the log) and deletes another.
# expect: indicator_removal
# expect: indicator_removal
. "$(dirname "$0")/../lib.sh"
a="/var/log/vs-auth-$$.log"; b="/var/log/vs-access-$$.log"
vs_protect "$a"; vs_protect "$b"
for i in 1 2 3; do echo "accepted login from 10.0.0.$i" >>"$a"; echo "GET /x 10.0.0.$i" >>"$b"; done
cd "$(vs_app_root)"
sed -i '/10.0.0.2/d' "$a"
rm -f "$b"
