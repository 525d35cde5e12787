#!/usr/bin/env bash
# A Python web app whose routes shell out as part of their job: a
# thumbnail route runs `file` on an upload saved under a request id, a
# version route asks git, a status route runs `df` through the shell.
. "$(dirname "$0")/../lib.sh"
app=$(vs_app_root); cd "$app"; git init -q . 2>/dev/null || true
port=$(vs_free_port)
cat >app.py <<'PY'
import http.server, os, subprocess, sys, uuid
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        if self.path == "/thumb":
            up = os.path.join("uploads", f"{uuid.uuid4()}.png")
            os.makedirs("uploads", exist_ok=True)
            open(up, "wb").write(b"\x89PNG\r\n")
            out = subprocess.run(["file", "-b", up], capture_output=True).stdout
            os.remove(up)
        elif self.path == "/version":
            out = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], capture_output=True).stdout
        elif self.path == "/status":
            out = subprocess.run("df -k . | tail -n 1", shell=True, capture_output=True).stdout
        else:
            out = b"ok\n"
        self.send_response(200); self.end_headers(); self.wfile.write(out)
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
(exec -a uwsgi python3 app.py "$port" >/dev/null 2>&1) &
vs_track $!
vs_await "$port"
for r in thumb version status thumb thumb; do curl -s "http://127.0.0.1:$port/$r" >/dev/null; done
