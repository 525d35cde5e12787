#!/usr/bin/env bash
# Scripts fetched over the network and handed to their interpreters as
# files (never executed themselves): Python by absolute path, a shell by a
# path relative to the application's directory.
# expect: ingress_tool_transfer
# expect: ingress_tool_transfer
. "$(dirname "$0")/../lib.sh"
mkdir -p "$VS_DIR/www"
printf 'import time\ntime.sleep(0.2)\n' >"$VS_DIR/www/sync.py"
printf 'sleep 0.2\n' >"$VS_DIR/www/setup"
www=$(vs_serve_dir "$VS_DIR/www")
app=$(vs_app_root)
wget -q -O "$app/sync.py" "http://127.0.0.1:$www/sync.py"
python3 "$app/sync.py"
cd "$app" && curl -s "http://127.0.0.1:$www/setup" >setup && bash ./setup
