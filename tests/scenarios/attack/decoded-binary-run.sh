#!/usr/bin/env bash
# A program carried as base64 text, decoded into an application's own
# directory and run from there.
# expect: decoded_file_executed
. "$(dirname "$0")/../lib.sh"
app=$(vs_app_root); mkdir -p "$app/bin"
blob=$(base64 -w0 /bin/sleep)
printf '%s' "$blob" | base64 --decode >"$app/bin/refresh-cache"
chmod 755 "$app/bin/refresh-cache"
"$app/bin/refresh-cache" 0.2
