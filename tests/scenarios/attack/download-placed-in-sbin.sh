#!/usr/bin/env bash
# A downloaded program moved into a system directory under a daemon-like
# name and started from there.
# expect: masquerading
. "$(dirname "$0")/../lib.sh"
mkdir -p "$VS_DIR/www"; cp /bin/sleep "$VS_DIR/www/pkg"
www=$(vs_serve_dir "$VS_DIR/www")
app=$(vs_app_root)
curl -s -o "$app/pkg" "http://127.0.0.1:$www/pkg"
chmod +x "$app/pkg"
name="vs-netd-$$"
vs_protect "/usr/local/sbin/$name"
mkdir -p /usr/local/sbin
mv "$app/pkg" "/usr/local/sbin/$name"
"/usr/local/sbin/$name" 0.2
