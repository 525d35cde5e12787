#!/usr/bin/env bash
# Building and unit-testing a small C library with make and a shell recipe.
. "$(dirname "$0")/../lib.sh"
cd "$VS_DIR"
printf 'int twice(int x){return 2*x;}\n' >lib.c
printf 'int twice(int);\nint main(void){return twice(21)!=42;}\n' >t.c
printf 'all: t\nt: lib.c t.c\n\tcc -o t lib.c t.c\ncheck: t\n\t./t && echo ok >/dev/null\n' >Makefile
make -s check
