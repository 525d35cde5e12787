#!/usr/bin/env bash
# A session switches shell history off before it works: a command string
# that unsets HISTFILE, and a shell started with history sent to /dev/null
# (what `export HISTFILE=/dev/null` leaves in every later child).
# expect: history_disabled
. "$(dirname "$0")/../lib.sh"
cd "$(vs_app_root)"
bash -c 'unset HISTFILE HISTSAVE; id >/dev/null'
HISTFILE=/dev/null HISTSIZE=0 bash -c 'uname -a >/dev/null'
