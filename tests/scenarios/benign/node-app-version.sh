#!/usr/bin/env bash
# A Node.js app that runs git on one of its routes: normal for this app.
. "$(dirname "$0")/../lib.sh"
app=$(vs_node_app)
for _ in 1 2 3; do curl -s "http://127.0.0.1:$app/" >/dev/null; done
curl -s "http://127.0.0.1:$app/api/version" >/dev/null
