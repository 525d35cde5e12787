#!/usr/bin/env bash
# LD_PRELOAD placed after hundreds of environment variables, past what the
# kernel's scan looks at.
# expect: ld_preload_injection
. "$(dirname "$0")/../lib.sh"
app=$(vs_app_root)
printf 'static void __attribute__((constructor)) x(void) {}\n' >"$app/x.c"
cc -shared -fPIC -o "$app/libcache.so" "$app/x.c"
vars=()
for i in $(seq 1 300); do vars+=("CFG_$i=$(head -c 64 /dev/zero | tr '\0' v)"); done
env "${vars[@]}" LD_PRELOAD="$app/libcache.so" sleep 1
