#!/usr/bin/env bash
# Fetching files from a local web server and checking them.
. "$(dirname "$0")/../lib.sh"
mkdir -p "$VS_DIR/site"; for i in 1 2 3; do echo "page $i" >"$VS_DIR/site/p$i.html"; done
www=$(vs_serve_dir "$VS_DIR/site")
mkdir -p "$VS_DIR/dl"
for i in 1 2 3; do curl -s -o "$VS_DIR/dl/p$i.html" "http://127.0.0.1:$www/p$i.html"; done
sha256sum "$VS_DIR"/dl/*.html >/dev/null
