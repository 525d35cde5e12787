#!/usr/bin/env bash
# A script downloaded and piped straight into a shell.
# expect: T1059|T1105
. "$(dirname "$0")/../lib.sh"
mkdir -p "$VS_DIR/www"; printf 'id >/dev/null\nuname -a >/dev/null\n' >"$VS_DIR/www/install.sh"
www=$(vs_serve_dir "$VS_DIR/www")
curl -s "http://127.0.0.1:$www/install.sh" | bash
