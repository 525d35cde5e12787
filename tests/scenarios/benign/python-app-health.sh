#!/usr/bin/env bash
# A Python web app serving requests; its health route runs `uname -r`
# directly, as it always does.
. "$(dirname "$0")/../lib.sh"
app=$(vs_python_app)
for _ in 1 2 3 4 5; do curl -s "http://127.0.0.1:$app/" >/dev/null; done
for _ in 1 2; do curl -s "http://127.0.0.1:$app/health" >/dev/null; done
