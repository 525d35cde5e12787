#!/usr/bin/env bash
# Rotating and compressing application logs, renaming files into place.
. "$(dirname "$0")/../lib.sh"
d="$VS_DIR/log"; mkdir -p "$d"
for i in 1 2 3; do seq 1 200 >"$d/app.log.$i"; done
for i in 3 2 1; do mv "$d/app.log.$i" "$d/app.log.$((i+1))"; done
gzip -q "$d"/app.log.*; ls -l "$d" >/dev/null
