#!/usr/bin/env bash
# A C project built the autotools way in an application directory: a
# configure script probes the compiler with throwaway programs, writes
# config.h and a Makefile, then make builds and tests. TMPDIR points into
# the workspace (as CI runners do), so the compiler's temporary files
# (ccXXXXXX.s) land there with new random names on every run.
. "$(dirname "$0")/../lib.sh"
app=$(vs_app_root); cd "$app"
mkdir -p src tmp; export TMPDIR="$app/tmp"
cat >configure <<'SH'
#!/bin/sh
set -e
tmp=$(mktemp -d ./conf.XXXXXXXXXX)
: >"$tmp/confdefs.h"
for h in stdio stdlib string unistd; do
  printf '#include <%s.h>\nint main(void){return 0;}\n' "$h" >conftest.c
  if cc -c conftest.c -o conftest.o 2>/dev/null; then
    echo "#define HAVE_$(echo "$h" | tr a-z A-Z)_H 1" >>"$tmp/confdefs.h"
  fi
  rm -f conftest.c conftest.o
done
printf 'int main(void){return 0;}\n' >conftest.c
cc conftest.c -o conftest && ./conftest
rm -f conftest conftest.c
host=$(uname -m)
sed -e 's/^/ /' "$tmp/confdefs.h" >config.h
n=$(grep -c HAVE config.h); expr "$n" + 0 >/dev/null
printf 'CFLAGS = -O2 -Isrc -DHOST=\\"%s\\"\nall: app\napp: src/a.o src/b.o main.o\n\t$(CC) -o app src/a.o src/b.o main.o\ncheck: app\n\t./app | grep -q 42\nclean:\n\trm -f app src/*.o *.o\n' "$host" >Makefile
rm -rf "$tmp"
SH
chmod +x configure
printf 'int a(void){return 40;}\n' >src/a.c
printf 'int b(void){return 2;}\n' >src/b.c
printf '#include <stdio.h>\nint a(void);int b(void);\nint main(void){printf("%%d\\n",a()+b());return 0;}\n' >main.c
./configure
make -s -j2 check
make -s clean
