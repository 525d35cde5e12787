#!/usr/bin/env bash
# A program's command escape starts a shell that reads its commands from a
# pipe, outside any terminal: awk's system("/bin/sh"), in an application's
# directory.
# expect: shell_escape
. "$(dirname "$0")/../lib.sh"
cd "$(vs_app_root)"
printf 'id >/dev/null\nuname -a >/dev/null\nsleep 0.2\n' | awk 'BEGIN { system("/bin/sh") }'
