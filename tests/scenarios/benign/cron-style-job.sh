#!/usr/bin/env bash
# A nightly job as cron runs it: under a lock, it archives a data
# directory into a time-stamped tarball, prunes old archives, checks the
# service's health endpoint and logs a line. Every run has new names.
. "$(dirname "$0")/../lib.sh"
app=$(vs_app_root); mkdir -p "$app/data" "$app/backups" "$app/log"
for i in 1 2 3; do echo "row $i $RANDOM" >"$app/data/part-$i.csv"; done
www=$(vs_serve_dir "$app/data")
cat >"$app/nightly.sh" <<SH
#!/bin/sh
set -e
stamp=\$(date +%Y%m%d-%H%M%S)-\$\$
tar -czf "$app/backups/data-\$stamp.tar.gz" -C "$app" data
find "$app/backups" -name 'data-*.tar.gz' -mmin +600 -delete
curl -sf "http://127.0.0.1:$www/part-1.csv" >/dev/null
echo "\$stamp ok \$(du -sk "$app/backups" | cut -f1)" >>"$app/log/nightly.log"
SH
chmod +x "$app/nightly.sh"
flock -n "$app/.lock" "$app/nightly.sh"
