#!/usr/bin/env bash
# Downloaded commands fed to a shell through a wrapper (`| env -i sh`),
# from an application's directory.
# expect: pipe_to_shell
. "$(dirname "$0")/../lib.sh"
mkdir -p "$VS_DIR/www"; printf 'id >/dev/null\nsleep 0.2\n' >"$VS_DIR/www/u"
www=$(vs_serve_dir "$VS_DIR/www")
cd "$(vs_app_root)"
wget -q -O- "http://127.0.0.1:$www/u" | env -i PATH=/usr/bin:/bin /bin/sh
