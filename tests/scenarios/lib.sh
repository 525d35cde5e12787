# Helpers for vigil's scenarios. Sourced by each script; root; loopback only.
set -u
VS_DIR=$(mktemp -d /tmp/vs.XXXXXXXX)
VS_CLEANUP=()
VS_PIDS="$VS_DIR/.pids"
export HOME="$VS_DIR/home/app"
mkdir -p "$HOME"

vs_finish() {
  if [ -f "$VS_PIDS" ]; then
    while read -r p; do kill -9 "$p" 2>/dev/null; done <"$VS_PIDS"
  fi
  local c
  for c in "${VS_CLEANUP[@]:-}"; do [ -n "$c" ] && eval "$c"; done
  rm -rf "$VS_DIR"
}
trap vs_finish EXIT

# Remember a background pid for cleanup.
vs_track() { echo "$1" >>"$VS_PIDS"; }

# A free loopback TCP port.
vs_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Wait (<= 5 s) for a listener on 127.0.0.1:$1, polling from Python.
vs_await() {
  python3 - "$1" <<'PY'
import socket, sys, time
port = int(sys.argv[1])
for _ in range(100):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.05)
sys.exit(1)
PY
}

# Serve directory $1 over HTTP on loopback; prints the port.
vs_serve_dir() {
  local port; port=$(vs_free_port)
  (cd "$1" && exec python3 -m http.server "$port" --bind 127.0.0.1 >/dev/null 2>&1) &
  vs_track $!
  vs_await "$port" && echo "$port"
}

# A listener that accepts and holds connections (an attacker's server).
vs_sink() {
  local port; port=$(vs_free_port)
  python3 -c '
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(16); keep = []
while True:
    c, _ = s.accept(); keep.append(c)
' "$port" >/dev/null 2>&1 &
  vs_track $!
  vs_await "$port" && echo "$port"
}

# A Python web application with a command-injection bug: GET /exec?c=CMD
# runs CMD through the shell; GET /health runs `uname -r` directly (its
# normal behaviour). Prints the port.
vs_python_app() {
  local port; port=$(vs_free_port)
  cat >"$VS_DIR/webapp.py" <<'PY'
import http.server, os, subprocess, sys, urllib.parse
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        u = urllib.parse.urlparse(self.path)
        q = urllib.parse.parse_qs(u.query)
        if u.path == "/exec":
            out = subprocess.run(q.get("c", ["true"])[0], shell=True, cwd=os.environ["HOME"], capture_output=True).stdout
        elif u.path == "/health":
            out = subprocess.run(["uname", "-r"], capture_output=True).stdout
        else:
            out = b"ok\n"
        self.send_response(200); self.end_headers(); self.wfile.write(out)
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
  (exec -a gunicorn python3 "$VS_DIR/webapp.py" "$port" >/dev/null 2>&1) &
  vs_track $!
  vs_await "$port" && echo "$port"
}

# A Node.js app: /api/run?c=CMD hands CMD to /bin/sh (the bug); / answers.
vs_node_app() {
  local port; port=$(vs_free_port)
  cat >"$VS_DIR/server.js" <<'JS'
const http = require('http'); const cp = require('child_process');
http.createServer((req, res) => {
  const u = new URL(req.url, 'http://localhost');
  if (u.pathname === '/api/run') cp.exec(u.searchParams.get('c') || 'true', { cwd: process.env.HOME }, (e, o) => res.end(String(o)));
  else if (u.pathname === '/api/version') cp.execFile('/usr/bin/git', ['--version'], (e, o) => res.end(String(o)));
  else res.end('ok\n');
}).listen(Number(process.argv[2]), '127.0.0.1');
JS
  (exec -a node-server node "$VS_DIR/server.js" "$port" >/dev/null 2>&1) &
  vs_track $!
  vs_await "$port" && echo "$port"
}

# URL-encode $1.
vs_q() { python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$1"; }

# Restore (or remove) a system file at exit.
vs_protect() {
  local f=$1 b
  b="$VS_DIR/.saved$(echo "$f" | tr / _)"
  if [ -e "$f" ]; then cp -a "$f" "$b"; VS_CLEANUP+=("cp -a '$b' '$f'"); else VS_CLEANUP+=("rm -f '$f'"); fi
}

# An application directory outside the temp roots (real apps live in /srv,
# /opt, /home, /var/www), removed at exit. Prints its path.
vs_app_root() {
  mkdir -p /srv
  local d; d=$(mktemp -d /srv/vs-app.XXXXXXXX)
  VS_CLEANUP+=("rm -rf '$d'")
  echo "$d"
}
