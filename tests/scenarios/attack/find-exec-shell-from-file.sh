#!/usr/bin/env bash
# find's -exec starts a shell, behind a wrapper, that reads its commands
# from a file: a command escape outside any terminal.
# expect: shell_escape
. "$(dirname "$0")/../lib.sh"
cd "$(vs_app_root)"
printf 'id >/dev/null\nsleep 0.2\n' >"$VS_DIR/.c"
timeout 10 find . -maxdepth 0 -exec /bin/bash -p \; <"$VS_DIR/.c"
