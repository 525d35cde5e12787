#!/usr/bin/env bash
# A helper drops a cron job, opening the file through io_uring
# (IORING_OP_OPENAT relative to a directory descriptor: no open() syscall
# for the tracepoints to see), then writes it (a comment only, so cron
# runs nothing).
# expect: T1053
. "$(dirname "$0")/../lib.sh"
mkdir -p /etc/cron.d; name=vs-sync-$$; vs_protect "/etc/cron.d/$name"
timeout -s KILL 20 python3 - /etc/cron.d "$name" <<'PY' >/dev/null 2>&1
import ctypes, mmap, os, struct, sys

directory, name = sys.argv[1], sys.argv[2]
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

dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
path = ctypes.create_string_buffer(name.encode())
flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
tail = struct.unpack_from("I", sq, sq_tail)[0]
idx = tail & struct.unpack_from("I", sq, sq_mask)[0]
# opcode 18 (IORING_OP_OPENAT), fd = dirfd, addr = path, len = mode, open flags.
struct.pack_into("BBHiQQIIQ24x", sqes, 64 * idx, 18, 0, 0, dirfd, 0, ctypes.addressof(path), 0o644, flags, 1)
struct.pack_into("I", sq, sq_array + 4 * idx, idx)
struct.pack_into("I", sq, sq_tail, tail + 1)
if libc.syscall(L(426), L(ring), L(1), L(1), L(1), None, L(0)) != 1:  # io_uring_enter
    raise OSError(ctypes.get_errno(), "io_uring_enter")
head = struct.unpack_from("I", cq, cq_head)[0]
fd = struct.unpack_from("i", cq, cqes + 16 * (head & struct.unpack_from("I", cq, cq_mask)[0]) + 8)[0]
if fd < 0:
    raise OSError(-fd, "io_uring openat")
os.write(fd, b"# vigil scenario: * * * * * root /tmp/.x/sync\n")
os.close(fd)
PY
true
