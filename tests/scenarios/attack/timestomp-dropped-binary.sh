#!/usr/bin/env bash
# A downloaded program given the times of a system binary, so a listing by
# date does not show it as new.
# expect: timestomp
. "$(dirname "$0")/../lib.sh"
mkdir -p "$VS_DIR/www"; cp /bin/sleep "$VS_DIR/www/helper"
www=$(vs_serve_dir "$VS_DIR/www")
app=$(vs_app_root); mkdir -p "$app/bin"
curl -s -o "$app/bin/helper" "http://127.0.0.1:$www/helper"
chmod 755 "$app/bin/helper"
touch -r /bin/ls "$app/bin/helper"
"$app/bin/helper" 0.1
