#!/usr/bin/env bash
# A program that writes over its own command line after it started (not
# its name: no prctl, no comm change) to pass for a kernel thread, then
# beacons out.
# requires: /usr/bin/cc
# expect: masquerading
. "$(dirname "$0")/../lib.sh"
port=$(vs_sink)
cd "$(vs_app_root)"
cat >"$VS_DIR/b.c" <<'C'
#include <arpa/inet.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int argc, char **argv) {
    size_t room = (size_t)(argv[argc - 1] + strlen(argv[argc - 1]) - argv[0]);
    memset(argv[0], 0, room);
    strncpy(argv[0], "[kworker/1:2]", room);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(getenv("PORT")))};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    connect(s, (struct sockaddr *)&a, sizeof a);
    usleep(300000);
    return 0;
}
C
cc -O1 -o "$VS_DIR/updater" "$VS_DIR/b.c"
PORT=$port "$VS_DIR/updater" --interval 30 --quiet
