#!/usr/bin/env bash
# An interpreter started with an injected library.
# expect: T1574
. "$(dirname "$0")/../lib.sh"
printf 'static void __attribute__((constructor)) x(void) {}\n' >"$VS_DIR/x.c"
cc -shared -fPIC -o "$VS_DIR/libx.so" "$VS_DIR/x.c"
LD_PRELOAD="$VS_DIR/libx.so" python3 -c 'pass'
