#!/usr/bin/env bash
# Everyday use of programs that run commands: find -exec, awk's system(),
# xargs, a here-document fed to a shell by a shell.
. "$(dirname "$0")/../lib.sh"
d="$VS_DIR/logs"; mkdir -p "$d"; printf 'a\nb\n' >"$d/one.log"; printf 'c\n' >"$d/two.log"
find "$d" -name '*.log' -exec sh -c 'wc -l "$1" >/dev/null' _ {} \;
printf 'one\ntwo\n' | awk '{ system("echo " $1 " >/dev/null") }'
find "$d" -name '*.log' -print0 | xargs -0 -n1 sh -c 'cat "$1" >/dev/null' _
sh <<'SCRIPT'
ls >/dev/null
SCRIPT
