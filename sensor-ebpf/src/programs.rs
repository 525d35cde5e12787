//! The programs themselves (bpf target only); see the crate docs.
use core::ffi::c_void;

use aya_ebpf::EbpfContext;
use aya_ebpf::{
    bindings::{BPF_EXIST, BPF_NOEXIST, BPF_RB_FORCE_WAKEUP},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_get_current_uid_gid, bpf_ktime_get_boot_ns, bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{bpf_probe_read_kernel_str, bpf_probe_read_user_str, bpf_ringbuf_output},
    },
    macros::{cgroup_sock_addr, lsm, map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{LsmContext, RawTracePointContext, SockAddrContext, TracePointContext},
};
use vigil_sensor_common::*;

#[unsafe(no_mangle)]
#[unsafe(link_section = "license")]
pub static LICENSE: [u8; 13] = *b"Dual BSD/GPL\0";

/// Filled by the agent from BTF before load.
#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets::zeroed();
/// Filled by the agent before load.
#[unsafe(no_mangle)]
static CONFIG: SensorConfig = SensorConfig::zeroed();
/// Filled by the agent from BTF before load where the kernel has them
/// (otherwise the io_uring program is not attached).
#[unsafe(no_mangle)]
static URING: UringOffsets = UringOffsets::zeroed();

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_SLOTS, 0);

#[repr(C)]
struct Scratch {
    fixed: [u8; FIXED_MAX_BYTES],
    tail: [u8; TAIL_MAX_BYTES],
    /// The path walk's write offset. Kept in map memory, not a register, so
    /// the verifier sees an unknown bounded value at every iteration and can
    /// prune equal states: with a register it would track every possible
    /// offset and explode.
    cursor: u64,
    /// The executable's base name for the freeze policy (NUL padded).
    name: [u8; FREEZE_NAME_LEN],
    /// One environment string at a time, for the LD_PRELOAD scan.
    env: [u8; ENV_STR_MAX],
    /// The environment scan's outcome, kept in map memory (no verifier
    /// state per value): `EXEC_FLAG_*` bits (history off, truncated) and
    /// [`ENV_PRELOAD_FOUND`] when `env` holds the `LD_PRELOAD=` variable.
    envscan: u64,
}

/// `Scratch::envscan`: `env` holds the `LD_PRELOAD=...` variable. Above
/// every `EXEC_FLAG_*` bit.
const ENV_PRELOAD_FOUND: u64 = 1 << 32;

#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Arguments of a syscall in flight, keyed by pid_tgid.
#[repr(C)]
#[derive(Clone, Copy)]
struct Stash {
    kind: u64,
    args: [u64; 4],
}

const STASH_OPEN: u64 = 1;
const STASH_CHMOD: u64 = 2;
const STASH_FCHMOD: u64 = 3;
const STASH_RENAME: u64 = 4;
const STASH_CONNECT: u64 = 5;
const STASH_LISTEN: u64 = 6;
const STASH_UTIMES: u64 = 7;
const STASH_SEND: u64 = 8;
const STASH_PTRACE: u64 = 9;
const STASH_VM_WRITE: u64 = 10;
const STASH_MODULE: u64 = 11;
const STASH_BPF: u64 = 12;
const STASH_EXEC_MEM: u64 = 13;
const STASH_UNLINK: u64 = 14;

#[map]
static INFLIGHT: LruHashMap<u64, Stash> = LruHashMap::with_max_entries(16384, 0);

/// How many `INFLIGHT` entries their syscall's exit has not taken back
/// yet. Most syscall exits (every mmap, every read-only open) find nothing
/// to take: while this is 0 they return without the hash look-up, which
/// is most of their cost. An entry lost without its exit (evicted by the
/// LRU) leaves it above 0 for good, which only brings the look-ups back;
/// one replaced by a later stash of its thread is not counted again.
#[map]
static PENDING: Array<u64> = Array::with_max_entries(1, 0);

/// Adds `v` (wrapping: `u64::MAX` takes one away) to `PENDING`.
#[inline(always)]
fn pending_add(v: u64) {
    if let Some(p) = PENDING.get_ptr_mut(0) {
        // An atomic add without fetch (BPF_XADD, every kernel): the bpf
        // target has no Rust atomics.
        // SAFETY: a map value, 8-byte aligned, alive while the program runs.
        unsafe {
            core::arch::asm!(
                "lock *(u64 *)({p} + 0) += {v}",
                p = in(reg) p,
                v = in(reg) v,
                options(nostack),
            )
        };
    }
}

/// True when no syscall is stashed (see `PENDING`).
#[inline(always)]
fn none_pending() -> bool {
    match PENDING.get_ptr(0) {
        // SAFETY: a map value.
        Some(p) => (unsafe { core::ptr::read_volatile(p) }) == 0,
        None => false,
    }
}

/// Processes that listen on an IP socket (set by listen, inherited by fork,
/// cleared by exec and exit): parents whose children the freeze policy
/// watches. Kept only while a policy watches them (`servers_kept`).
/// Looked up on every exec (twice), fork and exit, mostly for a pid it
/// does not hold, so each look-up touches a random bucket: 16384 entries
/// (the agent raises it to 256 per possible CPU, as the LRU's per-CPU
/// free lists need) keep the bucket array at 256 KiB (1 MiB at 65536),
/// closer to the cache. It holds listeners and their forked children that
/// have not run another program yet; past that the LRU evicts, and a
/// child of an evicted server is then judged after it runs (userspace
/// detection) instead of frozen at its exec.
#[map]
static SERVERS: LruHashMap<u32, u8> = LruHashMap::with_max_entries(16384, 0);

/// Program base names the freeze policy stops when a server starts them.
#[map]
static FREEZE_NAMES: HashMap<[u8; FREEZE_NAME_LEN], u8> = HashMap::with_max_entries(256, 0);

/// File sizes of the system's copies of those programs: a copy under
/// another name is stopped too (the agent then compares content).
#[map]
static FREEZE_SIZES: HashMap<u64, u8> = HashMap::with_max_entries(256, 0);

/// Processes stopped at exec and not yet released, keyed by tgid: written
/// before the SIGSTOP, removed by the agent when it lets the process go.
/// The agent pins this map in bpffs, so it outlives an agent that dies.
#[map]
static FROZEN: HashMap<u32, FrozenEntry> = HashMap::with_max_entries(FROZEN_MAX_ENTRIES, 0);

/// Processes contained by "deny_connect", keyed by tgid: their connects
/// and unconnected sends are refused (EPERM). Written by the agent,
/// inherited by fork, cleared at exit. Not an LRU: a fork storm must not
/// evict the contained process itself (children past the bound are not
/// covered).
#[map]
static DENY_CONNECT: HashMap<u32, u8> = HashMap::with_max_entries(16384, 0);

/// The agent's heartbeat (boot ns), refreshed every second.
#[map]
static ALIVE: Array<u64> = Array::with_max_entries(1, 0);

/// Last report (boot ns) per (process, destination, failed): connects
/// repeated within `CONFIG.connect_dedup_ns` are counted, not reported.
#[map]
static CONNECT_SEEN: LruHashMap<ConnectKey, u64> = LruHashMap::with_max_entries(16384, 0);

/// First write-open per (process, inode): the de-duplication set.
#[map]
static FILE_SEEN: LruHashMap<FileKey, u8> = LruHashMap::with_max_entries(65536, 0);

/// What a process already reported once (exec memory, ptrace writes,
/// `process_vm_writev`): the de-duplication set of those records.
#[map]
static ONCE_SEEN: LruHashMap<OnceKey, u8> = LruHashMap::with_max_entries(16384, 0);

// ---- small helpers -------------------------------------------------------

macro_rules! off {
    ($f:ident) => {{
        // SAFETY: reading a field of a static; volatile so the loader's value is used.
        #[allow(unused_unsafe)]
        let v = unsafe { core::ptr::read_volatile(core::ptr::addr_of!(OFFSETS.$f)) as u64 };
        v
    }};
}

macro_rules! uring_off {
    ($f:ident) => {{
        #[allow(unused_unsafe)]
        let v = unsafe { core::ptr::read_volatile(core::ptr::addr_of!(URING.$f)) as u64 };
        v
    }};
}

macro_rules! cfg {
    ($f:ident) => {{
        #[allow(unused_unsafe)]
        let v = unsafe { core::ptr::read_volatile(core::ptr::addr_of!(CONFIG.$f)) };
        v
    }};
}

const AT_FDCWD: i64 = -100;
const O_WRONLY: u64 = 0o1;
const O_RDWR: u64 = 0o2;
const O_CREAT: u64 = 0o100;
const O_TRUNC: u64 = 0o1000;
const WRITE_FLAGS: u64 = O_WRONLY | O_RDWR | O_CREAT | O_TRUNC;
const S_IFMT: u16 = 0o170000;
const S_IFREG: u16 = 0o100000;
const S_IFSOCK: u16 = 0o140000;
const EXEC_MODE_BITS: u64 = 0o6111;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const PROT_EXEC: u64 = 4;
const MAP_ANONYMOUS: u64 = 0x20;
const BPF_PROG_LOAD: u64 = 5;
const PATH_MASK: u64 = (PATH_MAX_BYTES - 1) as u64;
/// Masks a user string length (<= USER_PATH_MAX_BYTES) without losing the maximum.
const USER_LEN_MASK: u64 = (2 * USER_PATH_MAX_BYTES - 1) as u64;
const TAIL_MASK: u64 = (TAIL_MAX_BYTES - 1) as u64;

#[inline(always)]
unsafe fn rd<T>(base: u64, off: u64) -> Result<T, i32> {
    unsafe { bpf_probe_read_kernel((base + off) as *const T) }
}

/// An optimization barrier: the compiler forgets what it knew of `v`, so a
/// mask applied to the result stays in the program and the verifier bounds
/// the value by that mask. Without it LLVM drops masks it can prove
/// redundant and reuses registers whose bounds came from a branch; kernels
/// before ~6.8 then see contradictory bounds on a dead path and turn the
/// pointer that offset was added to into a plain number (the exec program
/// was refused on 6.1 that way).
#[inline(always)]
fn opaque(v: u64) -> u64 {
    // SAFETY: reads a local.
    unsafe { core::ptr::read_volatile(&v) }
}

#[inline(always)]
fn stat_add(slot: u32, v: u64) {
    if let Some(p) = STATS.get_ptr_mut(slot) {
        unsafe { *p += v };
    }
}

/// Whether `SERVERS` is kept: only a policy that watches servers'
/// children reads it, so without one its look-ups on every exec, fork and
/// exit are skipped.
#[inline(always)]
fn servers_kept() -> bool {
    (cfg!(freeze_policy) | cfg!(deny_policy)) & FREEZE_SERVER_CHILD != 0
}

#[inline(always)]
fn ready() -> bool {
    off!(valid) != 0
}

#[inline(always)]
fn is_agent(tgid: u32) -> bool {
    let a: u32 = cfg!(agent_tgid);
    a != 0 && a == tgid
}

#[inline(always)]
fn scratch() -> Option<*mut Scratch> {
    match SCRATCH.get_ptr_mut(0) {
        Some(p) => Some(p),
        None => {
            stat_add(STAT_NO_SCRATCH, 1);
            None
        }
    }
}

/// Fills the header for the current task acting on `subject` (a task_struct
/// pointer whose tgid and start time name the process the record is about).
#[inline(always)]
unsafe fn fill_header(h: *mut EventHeader, kind: EventKind, subject: u64) {
    unsafe { fill_header_for(h, kind, subject_of(subject)) }
}

/// The process a record is about: its tgid and its leader's start time.
#[derive(Clone, Copy)]
struct Subject {
    tgid: u32,
    start_boot_ns: u64,
}

/// [`Subject`] of a task_struct pointer. The current task's tgid comes
/// from the helper, not from a kernel read.
#[inline(always)]
unsafe fn subject_of(task: u64) -> Subject {
    unsafe {
        let leader: u64 = rd(task, off!(task_group_leader)).unwrap_or(task);
        let current = (bpf_get_current_pid_tgid() >> 32) as u32;
        let tgid = if task == bpf_get_current_task() {
            current
        } else {
            rd(task, off!(task_tgid)).unwrap_or(current)
        };
        Subject {
            tgid,
            start_boot_ns: rd(leader, off!(task_start_boottime)).unwrap_or(0),
        }
    }
}

/// [`fill_header`] for a subject already read.
#[inline(always)]
unsafe fn fill_header_for(h: *mut EventHeader, kind: EventKind, who: Subject) {
    unsafe { fill_header_at(h, kind, who, bpf_ktime_get_boot_ns()) }
}

/// [`fill_header_for`] with the event's time already read.
#[inline(always)]
unsafe fn fill_header_at(h: *mut EventHeader, kind: EventKind, who: Subject, boot_ns: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    unsafe {
        (*h).kind = kind as u32;
        (*h).size = 0;
        (*h).boot_ns = boot_ns;
        (*h).pid = pid_tgid as u32;
        (*h).tgid = who.tgid;
        (*h).uid = uid_gid as u32;
        (*h).gid = (uid_gid >> 32) as u32;
        (*h).start_boot_ns = who.start_boot_ns;
        (*h).cgroup_id = bpf_get_current_cgroup_id();
        // Straight into the record: the helper pads with NULs, and zeroes
        // the buffer when it fails (no stack copy to clear first).
        aya_ebpf::helpers::generated::bpf_get_current_comm(
            core::ptr::addr_of_mut!((*h).comm) as *mut c_void,
            TASK_COMM_LEN as u32,
        );
    }
}

/// Copies the record (fixed part + `tail_len` tail bytes) to the ring buffer.
#[inline(always)]
unsafe fn emit(s: *mut Scratch, kind: EventKind, fixed_len: usize, tail_len: u64) {
    // Move the tail right behind the fixed struct: records are sent as one
    // contiguous copy of `fixed_len + tail_len` bytes starting at the fixed
    // struct, so the fixed part is right-aligned against the tail.
    let tail_len = tail_len & TAIL_MASK;
    let start = FIXED_MAX_BYTES - fixed_len;
    let total = fixed_len as u64 + tail_len;
    unsafe {
        let base = (s as *mut u8).add(start);
        (*(base as *mut EventHeader)).size = total as u32;
        let avail = EVENTS.query(0);
        let stat_slot = STAT_RINGBUF_MAX_FILL;
        if let Some(p) = STATS.get_ptr_mut(stat_slot) {
            if avail > *p {
                *p = avail;
            }
        }
        // Past `wakeup_bytes` pending: wake the agent now. Below it: the
        // ring buffer's own rule (0), which wakes the agent only for a
        // record written while it had caught up, i.e. the first record
        // after a drain; the agent bounds how often that happens
        // (`min_wakeup_interval_ms`), so a record never waits for a timer.
        let wake: u32 = cfg!(wakeup_bytes);
        let flags = if avail >= wake as u64 {
            BPF_RB_FORCE_WAKEUP as u64
        } else {
            0
        };
        let r = bpf_ringbuf_output(
            core::ptr::addr_of!(EVENTS) as *mut c_void,
            base as *mut c_void,
            total,
            flags,
        );
        if r == 0 {
            stat_add(stat_emitted(kind), 1);
        } else {
            stat_add(stat_dropped(kind), 1);
        }
    }
}

/// Pointer to where the fixed struct `T` must be written so that it ends
/// right where the tail starts.
#[inline(always)]
unsafe fn fixed<T>(s: *mut Scratch) -> *mut T {
    unsafe { (s as *mut u8).add(FIXED_MAX_BYTES - core::mem::size_of::<T>()) as *mut T }
}

#[inline(always)]
unsafe fn tail(s: *mut Scratch) -> *mut u8 {
    unsafe { (s as *mut u8).add(FIXED_MAX_BYTES) }
}

/// Walks a (dentry, vfsmount) up to the root of its mount namespace, writing
/// the names leaf first, NUL-terminated, at `dst`. Returns (bytes, flags).
#[inline(always)]
unsafe fn walk_path(s: *mut Scratch, dst: *mut u8, dentry: u64, vfsmnt: u64) -> (u64, u32) {
    let cursor = unsafe { core::ptr::addr_of_mut!((*s).cursor) };
    unsafe { core::ptr::write_volatile(cursor, 0) };
    let mut flags = 0u32;
    let mut d = dentry;
    let mut vfs = vfsmnt;
    let mnt_off = off!(mount_mnt);
    let mut mnt = vfsmnt.wrapping_sub(mnt_off);
    // Read once per mount (again after each crossing), not per name.
    let Ok(mut mnt_root) = (unsafe { rd::<u64>(vfs, off!(vfsmount_mnt_root)) }) else {
        return (0, flags);
    };
    let mut i = 0u32;
    while i < PATH_MAX_DEPTH {
        i += 1;
        if d == mnt_root {
            // Root of this mount: cross to the mount point in the parent mount.
            let Ok(mparent) = (unsafe { rd::<u64>(mnt, off!(mount_mnt_parent)) }) else {
                break;
            };
            if mparent == mnt || mparent == 0 {
                break;
            }
            let Ok(mp) = (unsafe { rd::<u64>(mnt, off!(mount_mnt_mountpoint)) }) else {
                break;
            };
            d = mp;
            mnt = mparent;
            vfs = mparent + mnt_off;
            let Ok(r) = (unsafe { rd::<u64>(vfs, off!(vfsmount_mnt_root)) }) else {
                break;
            };
            mnt_root = r;
            continue;
        }
        let Ok(parent) = (unsafe { rd::<u64>(d, off!(dentry_d_parent)) }) else {
            break;
        };
        let off = unsafe { core::ptr::read_volatile(cursor) };
        if off > (PATH_MAX_BYTES - NAME_MAX_BUF) as u64 {
            flags |= FLAG_PATH_TRUNCATED;
            break;
        }
        let Ok(name) = (unsafe { rd::<u64>(d, off!(dentry_d_name) + off!(qstr_name)) }) else {
            break;
        };
        let n = unsafe {
            bpf_probe_read_kernel_str(
                dst.add((off & PATH_MASK) as usize) as *mut c_void,
                NAME_MAX_BUF as u32,
                name as *const c_void,
            )
        };
        if n <= 0 {
            stat_add(STAT_READ_ERRORS, 1);
            break;
        }
        unsafe { core::ptr::write_volatile(cursor, off + n as u64) };
        if parent == d {
            // A dentry that is its own parent but not a mount root: a pseudo
            // file (memfd, pipe, anon inode) or a disconnected one.
            flags |= FLAG_PATH_DISCONNECTED;
            break;
        }
        d = parent;
        if i == PATH_MAX_DEPTH {
            flags |= FLAG_PATH_TRUNCATED;
        }
    }
    (unsafe { core::ptr::read_volatile(cursor) }, flags)
}

/// `task`'s fd table: (the `struct file *` array, its length).
#[inline(always)]
unsafe fn fd_table(task: u64) -> Option<(u64, u64)> {
    unsafe {
        let files: u64 = rd(task, off!(task_files)).ok()?;
        let fdt: u64 = rd(files, off!(files_fdt)).ok()?;
        let max: u32 = rd(fdt, off!(fdtable_max_fds)).ok()?;
        let arr: u64 = rd(fdt, off!(fdtable_fd)).ok()?;
        Some((arr, max as u64))
    }
}

/// The struct file at `fd` of an fd table from [`fd_table`].
#[inline(always)]
unsafe fn table_file((arr, max): (u64, u64), fd: u64) -> Option<u64> {
    if fd >= max {
        return None;
    }
    match unsafe { rd::<u64>(arr, fd * 8) } {
        Ok(file) if file != 0 => Some(file),
        _ => None,
    }
}

/// The struct file for `fd` in `task`'s fd table.
#[inline(always)]
unsafe fn fd_file(task: u64, fd: u64) -> Option<u64> {
    unsafe { table_file(fd_table(task)?, fd) }
}

#[inline(always)]
unsafe fn walk_file(s: *mut Scratch, dst: *mut u8, file: u64) -> (u64, u32) {
    unsafe {
        let p = off!(file_f_path);
        let dentry: u64 = rd(file, p + off!(path_dentry)).unwrap_or(0);
        let mnt: u64 = rd(file, p + off!(path_mnt)).unwrap_or(0);
        if dentry == 0 || mnt == 0 {
            return (0, 0);
        }
        walk_path(s, dst, dentry, mnt)
    }
}

/// Walks the directory a path argument is relative to: for an absolute
/// path the process's root directory, which walks to nothing unless the
/// process is chrooted (its "/etc" is then the host's "/srv/root/etc");
/// the cwd for AT_FDCWD, else the directory fd. One call site of the walk
/// (it is inlined). A root that is not chrooted is a mount's root whose
/// mount point is its namespace's root: two steps, no names. `KERNEL`:
/// the path string is in kernel memory (else the caller's).
#[inline(always)]
unsafe fn walk_base<const KERNEL: bool>(
    s: *mut Scratch,
    dst: *mut u8,
    task: u64,
    dirfd: i64,
    user_path: u64,
) -> (u64, u32) {
    unsafe {
        let first: u8 = if KERNEL {
            bpf_probe_read_kernel(user_path as *const u8).unwrap_or(b'/')
        } else {
            bpf_probe_read_user(user_path as *const u8).unwrap_or(b'/')
        };
        // The syscall's `int dfd` arrives as a 64-bit register: compare its
        // low 32 bits, sign-extended.
        let dirfd = dirfd as u32 as i32 as i64;
        // The `struct path` to walk: in fs_struct (root or pwd) or a file.
        let path: u64 = if first == b'/' || dirfd == AT_FDCWD {
            let Ok(fs) = rd::<u64>(task, off!(task_fs)) else {
                return (0, 0);
            };
            fs + if first == b'/' {
                off!(fs_root)
            } else {
                off!(fs_pwd)
            }
        } else {
            match fd_file(task, dirfd as u64) {
                Some(f) => f + off!(file_f_path),
                None => return (0, 0),
            }
        };
        let dentry: u64 = rd(path, off!(path_dentry)).unwrap_or(0);
        let vfs: u64 = rd(path, off!(path_mnt)).unwrap_or(0);
        if dentry == 0 || vfs == 0 {
            return (0, 0);
        }
        walk_path(s, dst, dentry, vfs)
    }
}

/// Copies a user string of at most USER_PATH_MAX_BYTES; returns bytes incl. NUL.
#[inline(always)]
unsafe fn read_user_str(dst: *mut u8, src: u64) -> u64 {
    unsafe { read_path_str::<false>(dst, src) }
}

/// [`read_user_str`] from user (`KERNEL` false) or kernel memory.
#[inline(always)]
unsafe fn read_path_str<const KERNEL: bool>(dst: *mut u8, src: u64) -> u64 {
    let n = unsafe {
        if KERNEL {
            bpf_probe_read_kernel_str(
                dst as *mut c_void,
                USER_PATH_MAX_BYTES as u32,
                src as *const c_void,
            )
        } else {
            bpf_probe_read_user_str(
                dst as *mut c_void,
                USER_PATH_MAX_BYTES as u32,
                src as *const c_void,
            )
        }
    };
    if n > 0 {
        n as u64
    } else {
        0
    }
}

/// The environment scan: `LD_PRELOAD` and shell history switched off, its
/// outcome left in `Scratch::envscan` (and the variable in `Scratch::env`)
/// for [`env_outcome`]. Run first in the exec program, from a state with
/// nothing else live: the verifier walks its loop once, not once per
/// outcome of the path walk and argv read (that multiplied the program's
/// verification to half a million instructions).
#[inline(always)]
unsafe fn scan_env(s: *mut Scratch, mm: u64) {
    unsafe {
        let out = core::ptr::addr_of_mut!((*s).envscan);
        core::ptr::write_volatile(out, 0);
        let flags = scan_env_preload(s, mm);
        core::ptr::write_volatile(out, core::ptr::read_volatile(out) | flags as u64);
    }
}

/// What [`scan_env`] found: copies the `LD_PRELOAD` value (if any) to
/// `dst`; returns (bytes incl. NUL, `EXEC_FLAG_*` flags).
#[inline(always)]
unsafe fn env_outcome(s: *mut Scratch, dst: *mut u8) -> (u64, u32) {
    unsafe {
        let found = core::ptr::read_volatile(core::ptr::addr_of!((*s).envscan));
        let flags = (found & 0xffff_ffff) as u32;
        if found & ENV_PRELOAD_FOUND == 0 {
            return (0, flags);
        }
        // "LD_PRELOAD=" is 11 bytes.
        let buf = core::ptr::addr_of_mut!((*s).env) as *mut u8;
        let m = bpf_probe_read_kernel_str(
            dst as *mut c_void,
            USER_PATH_MAX_BYTES as u32,
            buf.add(11) as *const c_void,
        );
        (if m > 0 { m as u64 & USER_LEN_MASK } else { 0 }, flags)
    }
}

/// `HISTFILE=/dev/null`, `HISTFILE=`, `HISTFILESIZE=0`, `HISTSIZE=0`: the
/// first 8 bytes of the variable and the next 8.
#[inline(always)]
fn history_off(head: u64, rest: u64) -> bool {
    let le = u64::from_le_bytes;
    if head == le(*b"HISTFILE") {
        rest == le(*b"=/dev/nu")
            || rest & 0xffff == le(*b"=\0\0\0\0\0\0\0")
            || rest & 0x00ff_ffff_ffff_ffff == le(*b"SIZE=0\0\0")
    } else {
        head == le(*b"HISTSIZE") && rest & 0xff_ffff == le(*b"=0\0\0\0\0\0\0")
    }
}

/// Looks for `LD_PRELOAD=` in the new image's environment, leaving it in
/// `Scratch::env` (noted in `Scratch::envscan`). Returns the truncation
/// flag; notes history switched off in `Scratch::envscan` on the way.
#[inline(always)]
unsafe fn scan_env_preload(s: *mut Scratch, mm: u64) -> u32 {
    unsafe {
        let start: u64 = rd(mm, off!(mm_env_start)).unwrap_or(0);
        let end: u64 = rd(mm, off!(mm_env_end)).unwrap_or(0);
        let buf = core::ptr::addr_of_mut!((*s).env) as *mut u8;
        let mut p = start;
        let mut i = 0u32;
        while i < ENV_MAX_VARS {
            i += 1;
            if p == 0 || p >= end {
                return 0;
            }
            let n =
                bpf_probe_read_user_str(buf as *mut c_void, ENV_STR_MAX as u32, p as *const c_void);
            if n <= 0 {
                return 0;
            }
            // "LD_PRELOAD=" is 11 bytes.
            let head = core::ptr::read_unaligned(buf as *const u64);
            if head == u64::from_le_bytes(*b"LD_PRELO")
                && *buf.add(8) == b'A'
                && *buf.add(9) == b'D'
                && *buf.add(10) == b'='
            {
                let out = core::ptr::addr_of_mut!((*s).envscan);
                core::ptr::write_volatile(out, core::ptr::read_volatile(out) | ENV_PRELOAD_FOUND);
                return 0;
            }
            if history_off(head, core::ptr::read_unaligned(buf.add(8) as *const u64)) {
                let out = core::ptr::addr_of_mut!((*s).envscan);
                core::ptr::write_volatile(
                    out,
                    core::ptr::read_volatile(out) | EXEC_FLAG_HISTORY_OFF as u64,
                );
            }
            if n as usize >= ENV_STR_MAX {
                return EXEC_FLAG_ENV_TRUNCATED;
            }
            p += n as u64;
        }
        EXEC_FLAG_ENV_TRUNCATED
    }
}

/// File type, socket family, inode and device of fds 0, 1, 2.
#[inline(always)]
unsafe fn stdio_kinds(task: u64, e: *mut ExecEvent) {
    unsafe {
        let mode = &mut (*e).stdio_mode;
        let family = &mut (*e).stdio_family;
        let ino = &mut (*e).stdio_ino;
        let dev = &mut (*e).stdio_dev;
        (*e)._reserved = 0;
        // The table once for the three.
        let table = fd_table(task).unwrap_or((0, 0));
        for fd in 0..3usize {
            mode[fd] = 0;
            family[fd] = 0;
            ino[fd] = 0;
            dev[fd] = 0;
            let Some(file) = table_file(table, fd as u64) else {
                continue;
            };
            let inode: u64 = rd(file, off!(file_f_inode)).unwrap_or(0);
            let m: u16 = rd::<u16>(inode, off!(inode_i_mode)).unwrap_or(0) & S_IFMT;
            mode[fd] = m;
            ino[fd] = rd(inode, off!(inode_i_ino)).unwrap_or(0);
            let sb: u64 = rd(inode, off!(inode_i_sb)).unwrap_or(0);
            dev[fd] = rd(sb, off!(sb_s_dev)).unwrap_or(0);
            if m == S_IFSOCK {
                let sock: u64 = rd(file, off!(file_private_data)).unwrap_or(0);
                let sk: u64 = rd(sock, off!(socket_sk)).unwrap_or(0);
                family[fd] = rd(sk, off!(sk_family)).unwrap_or(0);
            }
        }
    }
}

const SIGSTOP: u32 = 19;

/// True while the agent's heartbeat is fresh.
#[inline(always)]
fn agent_alive() -> bool {
    let Some(t) = ALIVE.get(0) else { return false };
    let now = unsafe { bpf_ktime_get_boot_ns() };
    *t != 0 && now.saturating_sub(*t) < HEARTBEAT_MAX_AGE_NS
}

/// Which `FREEZE_*` bit of `policy` this exec of `file` matches (0: none),
/// judged before any path walk (from the executable dentry's own name) so
/// the verifier sees one small branch instead of one per walk outcome. The
/// freeze (exec tracepoint) and the deny (LSM exec hook) use the same test.
#[inline(always)]
unsafe fn policy_match(s: *mut Scratch, file: u64, parent_serves: bool, policy: u32) -> u32 {
    if policy == 0 || (!parent_serves && policy & FREEZE_MEMFD == 0) {
        return 0;
    }
    unsafe {
        let dentry: u64 = rd(file, off!(file_f_path) + off!(path_dentry)).unwrap_or(0);
        let name: u64 = rd(dentry, off!(dentry_d_name) + off!(qstr_name)).unwrap_or(0);
        let buf = core::ptr::addr_of_mut!((*s).name) as *mut u8;
        core::ptr::write_bytes(buf, 0, FREEZE_NAME_LEN);
        let n = bpf_probe_read_kernel_str(
            buf as *mut c_void,
            FREEZE_NAME_LEN as u32,
            name as *const c_void,
        );
        if n <= 0 {
            return 0;
        }
        let key: [u8; FREEZE_NAME_LEN] = core::ptr::read_unaligned(buf as *const _);
        if policy & FREEZE_MEMFD != 0 && &key[..6] == b"memfd:" {
            return FREEZE_MEMFD;
        }
        if policy & FREEZE_SERVER_CHILD == 0 || !parent_serves {
            return 0;
        }
        // A name that filled the buffer was cut: it cannot be a listed one.
        if (n as usize) < FREEZE_NAME_LEN && FREEZE_NAMES.get(&key).is_some() {
            return FREEZE_SERVER_CHILD;
        }
        // A listed program copied under another name keeps its size.
        let inode: u64 = rd(file, off!(file_f_inode)).unwrap_or(0);
        let size: u64 = rd(inode, off!(inode_i_size)).unwrap_or(0);
        if size != 0 && FREEZE_SIZES.get(&size).is_some() {
            return FREEZE_SERVER_CHILD;
        }
        0
    }
}

/// Whether the freeze policy stops this exec.
#[inline(always)]
unsafe fn should_freeze(s: *mut Scratch, file: u64, parent_serves: bool) -> bool {
    unsafe { policy_match(s, file, parent_serves, cfg!(freeze_policy)) != 0 }
}

// ---- process lifecycle -----------------------------------------------------

#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn vigil_exec(ctx: RawTracePointContext) -> i32 {
    if !ready() {
        return 0;
    }
    let task: u64 = ctx.arg(0);
    let bprm: u64 = ctx.arg(2);
    unsafe { on_exec(task, bprm) };
    0
}

#[inline(always)]
unsafe fn on_exec(task: u64, bprm: u64) {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if is_agent(tgid) {
        return;
    }
    let Some(s) = scratch() else { return };
    unsafe {
        // First, while nothing else is live (see `scan_env`).
        let mm: u64 = rd(task, off!(task_mm)).unwrap_or(0);
        scan_env(s, mm);
        let e: *mut ExecEvent = fixed(s);
        fill_header(&mut (*e).hdr, EventKind::Exec, task);
        let parent: u64 = rd(task, off!(task_real_parent)).unwrap_or(0);
        (*e).ppid = rd(parent, off!(task_tgid)).unwrap_or(0);
        let servers = servers_kept();
        let parent_serves = servers && SERVERS.get_ptr(&(*e).ppid).is_some();
        // A new program is not the server its parent image was. (Looked up
        // first: an LRU delete takes the map's lock, and most execs are not
        // of servers.)
        if servers && SERVERS.get_ptr(&tgid).is_some() {
            let _ = SERVERS.remove(&tgid);
        }
        let cred: u64 = rd(task, off!(task_cred)).unwrap_or(0);
        (*e).euid = rd(cred, off!(cred_euid)).unwrap_or(u32::MAX);
        (*e).egid = rd(cred, off!(cred_egid)).unwrap_or(u32::MAX);
        let mut flags = 0u32;
        let file: u64 = rd(bprm, off!(binprm_file)).unwrap_or(0);
        let inode: u64 = rd(file, off!(file_f_inode)).unwrap_or(0);
        (*e).exe_ino = rd(inode, off!(inode_i_ino)).unwrap_or(0);
        let sb: u64 = rd(inode, off!(inode_i_sb)).unwrap_or(0);
        (*e).exe_dev = rd(sb, off!(sb_s_dev)).unwrap_or(0);
        let nlink: u32 = rd(inode, off!(inode_i_nlink)).unwrap_or(1);
        (*e).exe_nlink = nlink;
        (*e).exe_size = rd(inode, off!(inode_i_size)).unwrap_or(0);
        if nlink == 0 {
            flags |= EXEC_FLAG_DELETED;
        }
        // Decided before the walk (verifier), done after the record is built:
        // the process is stopped only once its record has room in the ring.
        let mut want_freeze = false;
        if should_freeze(s, file, parent_serves) {
            if agent_alive() {
                want_freeze = true;
            } else {
                stat_add(STAT_FREEZE_NO_AGENT, 1);
            }
        }
        let t = tail(s);
        let (plen, pflags) = walk_file(s, t, file);
        flags |= pflags;
        if plen >= 7 {
            let head = core::slice::from_raw_parts(t, 6);
            if head == b"memfd:" {
                flags |= EXEC_FLAG_MEMFD;
            }
        }
        let plen = plen & PATH_MASK;
        (*e).path_len = plen as u32;
        // argv from the new image's stack.
        let start: u64 = rd(mm, off!(mm_arg_start)).unwrap_or(0);
        let end: u64 = rd(mm, off!(mm_arg_end)).unwrap_or(0);
        (*e).arg_start = start;
        let mut alen = end.wrapping_sub(start);
        if alen >= ARGV_MAX_BYTES as u64 {
            alen = ARGV_MAX_BYTES as u64 - 1;
            flags |= EXEC_FLAG_ARGV_TRUNCATED;
        }
        let alen = alen & (ARGV_MAX_BYTES as u64 - 1);
        let mut got = 0u64;
        if start != 0 && alen > 0 {
            let r = aya_ebpf::helpers::generated::bpf_probe_read_user(
                t.add(plen as usize) as *mut c_void,
                alen as u32,
                start as *const c_void,
            );
            if r == 0 {
                got = alen;
            }
        }
        // From here on `got` offsets pointers: bounded by a mask the
        // compiler cannot drop (see `opaque`).
        let got = opaque(got) & (ARGV_MAX_BYTES as u64 - 1);
        (*e).argv_len = got as u32;
        // Scripts: bprm->file is the interpreter by now; keep the script path
        // as given (bprm->interp stops pointing at bprm->filename once a
        // binfmt handler substituted an interpreter).
        let filename: u64 = rd(bprm, off!(binprm_filename)).unwrap_or(0);
        let interp: u64 = rd(bprm, off!(binprm_interp)).unwrap_or(0);
        let mut flen = 0u64;
        if filename != 0 && interp != filename {
            flags |= EXEC_FLAG_SCRIPT;
            let dst = t.add((plen + (got & (ARGV_MAX_BYTES as u64 - 1))) as usize);
            let n = bpf_probe_read_kernel_str(
                dst as *mut c_void,
                USER_PATH_MAX_BYTES as u32,
                filename as *const c_void,
            );
            if n > 0 {
                flen = n as u64 & USER_LEN_MASK;
            }
        }
        (*e).filename_len = flen as u32;
        // LD_PRELOAD: the value goes after the filename.
        let pre_off = (plen + (got & (ARGV_MAX_BYTES as u64 - 1)) + flen) as usize;
        let (plen2, eflags) = env_outcome(s, t.add(pre_off));
        flags |= eflags;
        (*e).preload_len = plen2 as u32;
        stdio_kinds(task, e);
        (*e).flags = flags;
        let fixed_len = core::mem::size_of::<ExecEvent>();
        let tail_len = plen + got + flen + plen2;
        if want_freeze && emit_frozen(s, e, tgid, fixed_len, tail_len) {
            return;
        }
        emit(s, EventKind::Exec, fixed_len, tail_len);
    }
}

/// Room reserved for a frozen exec's record: the largest record there is.
const FROZEN_RECORD_BYTES: u64 = (FIXED_MAX_BYTES + TAIL_MAX_BYTES) as u64;

/// Stops the current (freshly exec'd) process and hands its record to the
/// agent, in an order that cannot leave it stopped unseen: ring-buffer room
/// first (no room: no freeze), then the `FROZEN` ledger entry (full: no
/// freeze), then the SIGSTOP, then the record is committed (a reserved
/// record cannot fail to reach the ring). Returns false when it did not
/// freeze; the caller then emits the record as usual.
#[inline(always)]
unsafe fn emit_frozen(
    s: *mut Scratch,
    e: *mut ExecEvent,
    tgid: u32,
    fixed_len: usize,
    tail_len: u64,
) -> bool {
    use aya_ebpf::helpers::generated::{
        bpf_ringbuf_discard, bpf_ringbuf_reserve, bpf_ringbuf_submit, bpf_send_signal,
    };
    unsafe {
        let rec = bpf_ringbuf_reserve(
            core::ptr::addr_of!(EVENTS) as *mut c_void,
            FROZEN_RECORD_BYTES,
            0,
        );
        if rec.is_null() {
            stat_add(STAT_FREEZE_NO_ROOM, 1);
            return false;
        }
        let entry = FrozenEntry {
            start_boot_ns: (*e).hdr.start_boot_ns,
            frozen_boot_ns: bpf_ktime_get_boot_ns(),
        };
        if FROZEN.insert(&tgid, &entry, 0).is_err() {
            stat_add(STAT_FREEZE_NO_LEDGER, 1);
            bpf_ringbuf_discard(rec, 0);
            return false;
        }
        // Stops the whole (single-threaded, freshly exec'd) process before
        // it runs its first instruction.
        if bpf_send_signal(SIGSTOP) != 0 {
            let _ = FROZEN.remove(&tgid);
            bpf_ringbuf_discard(rec, 0);
            return false;
        }
        stat_add(STAT_FROZEN, 1);
        (*e).flags |= EXEC_FLAG_FROZEN;
        let tail_len = tail_len & TAIL_MASK;
        let total = fixed_len as u64 + tail_len;
        let base = (s as *mut u8).add(FIXED_MAX_BYTES - fixed_len);
        (*(base as *mut EventHeader)).size = total as u32;
        if total <= FROZEN_RECORD_BYTES {
            let _ = aya_ebpf::helpers::generated::bpf_probe_read_kernel(
                rec,
                total as u32,
                base as *const c_void,
            );
        }
        bpf_ringbuf_submit(rec, BPF_RB_FORCE_WAKEUP as u64);
        stat_add(stat_emitted(EventKind::Exec), 1);
        true
    }
}

/// The deny policy on kernels with BPF LSM: an exec matching
/// `CONFIG.deny_policy` is refused (EPERM) before the new program exists,
/// and reported. Loaded only when a deny policy is configured; where it
/// cannot attach the agent freezes the same execs instead.
#[lsm(hook = "bprm_check_security")]
pub fn vigil_exec_guard(ctx: LsmContext) -> i32 {
    // (struct linux_binprm *bprm, int ret): a refusal by an earlier LSM stands.
    let prev: i32 = ctx.arg(1);
    if prev != 0 {
        return prev;
    }
    let policy: u32 = cfg!(deny_policy);
    if policy == 0 || !ready() {
        return 0;
    }
    let bprm: u64 = ctx.arg(0);
    unsafe { exec_guard(bprm, policy) }
}

const EPERM: i32 = 1;

#[inline(always)]
unsafe fn exec_guard(bprm: u64, policy: u32) -> i32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if is_agent(tgid) {
        return 0;
    }
    let Some(s) = scratch() else { return 0 };
    unsafe {
        let task = bpf_get_current_task();
        let parent: u64 = rd(task, off!(task_real_parent)).unwrap_or(0);
        let ppid: u32 = rd(parent, off!(task_tgid)).unwrap_or(0);
        let parent_serves = SERVERS.get_ptr(&ppid).is_some();
        let file: u64 = rd(bprm, off!(binprm_file)).unwrap_or(0);
        let matched = policy_match(s, file, parent_serves, policy);
        if matched == 0 {
            return 0;
        }
        stat_add(STAT_EXEC_DENIED, 1);
        let e: *mut ExecDeniedEvent = fixed(s);
        fill_header(&mut (*e).hdr, EventKind::ExecDenied, task);
        (*e).ppid = ppid;
        (*e).policy = matched;
        let inode: u64 = rd(file, off!(file_f_inode)).unwrap_or(0);
        (*e).exe_ino = rd(inode, off!(inode_i_ino)).unwrap_or(0);
        let sb: u64 = rd(inode, off!(inode_i_sb)).unwrap_or(0);
        (*e).exe_dev = rd(sb, off!(sb_s_dev)).unwrap_or(0);
        let t = tail(s);
        let (plen, pflags) = walk_file(s, t, file);
        let plen = plen & PATH_MASK;
        (*e).path_len = plen as u32;
        (*e).flags = pflags;
        let filename: u64 = rd(bprm, off!(binprm_filename)).unwrap_or(0);
        let mut flen = 0u64;
        if filename != 0 {
            let n = bpf_probe_read_kernel_str(
                t.add(plen as usize) as *mut c_void,
                USER_PATH_MAX_BYTES as u32,
                filename as *const c_void,
            );
            if n > 0 {
                flen = n as u64 & USER_LEN_MASK;
            }
        }
        (*e).filename_len = flen as u32;
        emit(
            s,
            EventKind::ExecDenied,
            core::mem::size_of::<ExecDeniedEvent>(),
            plen + flen,
        );
    }
    -EPERM
}

#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn vigil_fork(ctx: RawTracePointContext) -> i32 {
    if !ready() {
        return 0;
    }
    let child: u64 = ctx.arg(1);
    unsafe { on_fork(child) };
    0
}

#[inline(always)]
unsafe fn on_fork(child: u64) {
    unsafe {
        let cpid: u32 = rd(child, off!(task_pid)).unwrap_or(0);
        let ctgid: u32 = rd(child, off!(task_tgid)).unwrap_or(1);
        if cpid != ctgid {
            return; // a thread, not a process
        }
        if is_agent((bpf_get_current_pid_tgid() >> 32) as u32) {
            return;
        }
        let Some(s) = scratch() else { return };
        let e: *mut ForkEvent = fixed(s);
        // A new process (not a thread) leads its own group.
        let who = Subject {
            tgid: ctgid,
            start_boot_ns: rd(child, off!(task_start_boottime)).unwrap_or(0),
        };
        fill_header_for(&mut (*e).hdr, EventKind::Fork, who);
        let parent: u64 = rd(child, off!(task_real_parent)).unwrap_or(0);
        (*e).ppid = rd(parent, off!(task_tgid)).unwrap_or(0);
        (*e)._reserved = 0;
        let me = (bpf_get_current_pid_tgid() >> 32) as u32;
        if servers_kept() && SERVERS.get_ptr(&me).is_some() {
            let _ = SERVERS.insert(&ctgid, &1u8, 0);
        }
        if cfg!(deny_connect) != 0 && DENY_CONNECT.get_ptr(&me).is_some() {
            let _ = DENY_CONNECT.insert(&ctgid, &1u8, 0);
        }
        emit(s, EventKind::Fork, core::mem::size_of::<ForkEvent>(), 0);
    }
}

/// `task_rename(task, comm)`: fires for threads too (thread pools name
/// their threads), kernel threads and every exec; only a process's main
/// thread renaming itself after its exec is reported (that is how a
/// program changes the name `ps` shows).
#[raw_tracepoint(tracepoint = "task_rename")]
pub fn vigil_task_rename(ctx: RawTracePointContext) -> i32 {
    if !ready() {
        return 0;
    }
    let task: u64 = ctx.arg(0);
    let comm: u64 = ctx.arg(1);
    unsafe { on_rename_task(task, comm) };
    0
}

#[inline(always)]
unsafe fn on_rename_task(task: u64, comm: u64) {
    unsafe {
        // A task renaming itself (no kernel read: the helpers name the
        // current task), and the process's main thread.
        if task != bpf_get_current_task() {
            return;
        }
        let me = bpf_get_current_pid_tgid();
        let tgid = (me >> 32) as u32;
        if me as u32 != tgid || is_agent(tgid) {
            return;
        }
        // Not kernel threads (no mm), and not the rename every exec does
        // (to the program's file name): exec sets the name before the new
        // image's arguments are laid out, while its mm's arg_start is
        // still 0.
        let mm: u64 = rd(task, off!(task_mm)).unwrap_or(0);
        if mm == 0 || rd::<u64>(mm, off!(mm_arg_start)).unwrap_or(0) == 0 {
            return;
        }
        let Some(s) = scratch() else { return };
        let e: *mut CommEvent = fixed(s);
        // Called before the new name is stored: the header's comm is the
        // old one.
        fill_header(&mut (*e).hdr, EventKind::Comm, task);
        (*e).new_comm = [0u8; TASK_COMM_LEN];
        let _ = bpf_probe_read_kernel_str(
            (*e).new_comm.as_mut_ptr() as *mut c_void,
            TASK_COMM_LEN as u32,
            comm as *const c_void,
        );
        emit(s, EventKind::Comm, core::mem::size_of::<CommEvent>(), 0);
    }
}

#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn vigil_exit(ctx: RawTracePointContext) -> i32 {
    if !ready() {
        return 0;
    }
    let task: u64 = ctx.arg(0);
    unsafe { on_exit(task) };
    0
}

#[inline(always)]
unsafe fn on_exit(task: u64) {
    unsafe {
        let signal: u64 = rd(task, off!(task_signal)).unwrap_or(0);
        let live: i32 = rd(signal, off!(signal_live)).unwrap_or(0);
        if live != 0 {
            return; // other threads of the process still run
        }
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        // Looked up before the delete, which takes a bucket lock: few
        // processes are servers or denied connects.
        if servers_kept() && SERVERS.get_ptr(&tgid).is_some() {
            let _ = SERVERS.remove(&tgid);
        }
        if cfg!(deny_connect) != 0 && DENY_CONNECT.get_ptr(&tgid).is_some() {
            let _ = DENY_CONNECT.remove(&tgid);
        }
        if is_agent(tgid) {
            return;
        }
        let Some(s) = scratch() else { return };
        let e: *mut ExitEvent = fixed(s);
        fill_header(&mut (*e).hdr, EventKind::Exit, task);
        (*e).exit_code = rd(task, off!(task_exit_code)).unwrap_or(0);
        (*e)._reserved = 0;
        emit(s, EventKind::Exit, core::mem::size_of::<ExitEvent>(), 0);
    }
}

// ---- syscall entry: filter and stash ------------------------------------------

/// Syscall argument `n` of a `sys_enter_*` record. A tracepoint's record
/// is the program's context: one direct load, not a helper call. An
/// offset past a syscall's record makes the attach fail (EACCES), it
/// cannot read beyond it.
#[inline(always)]
fn arg(ctx: &TracePointContext, n: usize) -> u64 {
    ctx_u64(ctx, 16 + 8 * n)
}

#[inline(always)]
fn ctx_u64(ctx: &TracePointContext, off: usize) -> u64 {
    // SAFETY: `off` is a constant within the record (args start at 16).
    unsafe { core::ptr::read((ctx.as_ptr() as *const u8).add(off) as *const u64) }
}

#[inline(always)]
fn stash(kind: u64, args: [u64; 4]) {
    if !ready() {
        return;
    }
    let id = bpf_get_current_pid_tgid();
    if is_agent((id >> 32) as u32) {
        return;
    }
    let st = Stash { kind, args };
    // Counted only when new: an entry left over from a lost exit is
    // replaced without counting it twice.
    if INFLIGHT.insert(&id, &st, BPF_NOEXIST as u64).is_ok() {
        pending_add(1);
    } else if INFLIGHT.insert(&id, &st, BPF_EXIST as u64).is_err() {
        stat_add(STAT_STASH_FULL, 1);
    }
}

#[inline(always)]
fn stash_open(flags: u64) {
    if flags & WRITE_FLAGS != 0 {
        stash(STASH_OPEN, [flags, 0, 0, 0]);
    }
}

#[tracepoint(category = "syscalls", name = "sys_enter_openat")]
pub fn vigil_enter_openat(ctx: TracePointContext) -> u32 {
    stash_open(arg(&ctx, 2));
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_openat2")]
pub fn vigil_enter_openat2(ctx: TracePointContext) -> u32 {
    let how = arg(&ctx, 2);
    let flags: u64 = unsafe { bpf_probe_read_user(how as *const u64) }.unwrap_or(0);
    stash_open(flags);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_open")]
pub fn vigil_enter_open(ctx: TracePointContext) -> u32 {
    stash_open(arg(&ctx, 1));
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_creat")]
pub fn vigil_enter_creat(_ctx: TracePointContext) -> u32 {
    stash_open(O_CREAT | O_WRONLY | O_TRUNC);
    0
}

#[inline(always)]
fn stash_chmod(dirfd: u64, path: u64, mode: u64) {
    if mode & EXEC_MODE_BITS != 0 {
        stash(STASH_CHMOD, [dirfd, path, mode, 0]);
    }
}

#[tracepoint(category = "syscalls", name = "sys_enter_chmod")]
pub fn vigil_enter_chmod(ctx: TracePointContext) -> u32 {
    stash_chmod(AT_FDCWD as u64, arg(&ctx, 0), arg(&ctx, 1));
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_fchmodat")]
pub fn vigil_enter_fchmodat(ctx: TracePointContext) -> u32 {
    stash_chmod(arg(&ctx, 0), arg(&ctx, 1), arg(&ctx, 2));
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_fchmodat2")]
pub fn vigil_enter_fchmodat2(ctx: TracePointContext) -> u32 {
    stash_chmod(arg(&ctx, 0), arg(&ctx, 1), arg(&ctx, 2));
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_fchmod")]
pub fn vigil_enter_fchmod(ctx: TracePointContext) -> u32 {
    let mode = arg(&ctx, 1);
    if mode & EXEC_MODE_BITS != 0 {
        stash(STASH_FCHMOD, [arg(&ctx, 0), 0, mode, 0]);
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_rename")]
pub fn vigil_enter_rename(ctx: TracePointContext) -> u32 {
    let fdcwd = AT_FDCWD as u64;
    stash(STASH_RENAME, [fdcwd, arg(&ctx, 0), fdcwd, arg(&ctx, 1)]);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_renameat")]
pub fn vigil_enter_renameat(ctx: TracePointContext) -> u32 {
    stash(
        STASH_RENAME,
        [arg(&ctx, 0), arg(&ctx, 1), arg(&ctx, 2), arg(&ctx, 3)],
    );
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_renameat2")]
pub fn vigil_enter_renameat2(ctx: TracePointContext) -> u32 {
    stash(
        STASH_RENAME,
        [arg(&ctx, 0), arg(&ctx, 1), arg(&ctx, 2), arg(&ctx, 3)],
    );
    0
}

/// Times set to given values (a `times` pointer): `touch -r`, `touch -t`,
/// timestomping. A NULL `times` (set to now, as a plain `touch` or `make`
/// does) is not reported.
#[inline(always)]
fn stash_utimes(dirfd: u64, path: u64, times: u64) {
    if times != 0 {
        stash(STASH_UTIMES, [dirfd, path, 0, 0]);
    }
}

#[tracepoint(category = "syscalls", name = "sys_enter_utimensat")]
pub fn vigil_enter_utimensat(ctx: TracePointContext) -> u32 {
    stash_utimes(arg(&ctx, 0), arg(&ctx, 1), arg(&ctx, 2));
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_futimesat")]
pub fn vigil_enter_futimesat(ctx: TracePointContext) -> u32 {
    stash_utimes(arg(&ctx, 0), arg(&ctx, 1), arg(&ctx, 2));
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_utimes")]
pub fn vigil_enter_utimes(ctx: TracePointContext) -> u32 {
    stash_utimes(AT_FDCWD as u64, arg(&ctx, 0), arg(&ctx, 1));
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_utime")]
pub fn vigil_enter_utime(ctx: TracePointContext) -> u32 {
    stash_utimes(AT_FDCWD as u64, arg(&ctx, 0), arg(&ctx, 1));
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_connect")]
pub fn vigil_enter_connect(ctx: TracePointContext) -> u32 {
    stash_dest(STASH_CONNECT, arg(&ctx, 0), arg(&ctx, 1), false);
    0
}

/// An IPv4/IPv6 destination from the caller's `struct sockaddr` at `addr`:
/// (family, port in network order, address; IPv4 in the first 4 bytes).
/// The family, port and IPv4 address in one 8-byte read.
#[inline(always)]
unsafe fn user_sockaddr(addr: u64) -> Option<(u16, u16, [u8; 16])> {
    let head: u64 = unsafe { bpf_probe_read_user(addr as *const u64) }.ok()?;
    let family = head as u16;
    let port = (head >> 16) as u16;
    let daddr = if family == AF_INET {
        let v = ((head >> 32) as u32).to_ne_bytes();
        [v[0], v[1], v[2], v[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    } else if family == AF_INET6 {
        unsafe { bpf_probe_read_user((addr + 8) as *const [u8; 16]) }.ok()?
    } else {
        return None;
    };
    Some((family, port, daddr))
}

/// Stashes a connect or send to an IPv4/IPv6 address given with the call:
/// the destination is read here, at the syscall's entry, once, closer to
/// the kernel's own copy than a read at the exit (which another thread's
/// write could have changed for the whole call). A destination that
/// cannot be read here (a page not present: this program cannot fault it
/// in) is not stashed: the cgroup observer then reports the call from the
/// kernel's copy, as an attempt. `[fd | batch << 32, family | port << 16,
/// address]`.
#[inline(always)]
fn stash_dest(kind: u64, fd: u64, addr: u64, batch: bool) {
    if addr == 0 {
        return;
    }
    if let Some((family, port, daddr)) = unsafe { user_sockaddr(addr) } {
        let lo = u64::from_ne_bytes([
            daddr[0], daddr[1], daddr[2], daddr[3], daddr[4], daddr[5], daddr[6], daddr[7],
        ]);
        let hi = u64::from_ne_bytes([
            daddr[8], daddr[9], daddr[10], daddr[11], daddr[12], daddr[13], daddr[14], daddr[15],
        ]);
        stash(
            kind,
            [
                (fd & 0xffff_ffff) | (batch as u64) << 32,
                family as u64 | (port as u64) << 16,
                lo,
                hi,
            ],
        );
    }
}

#[tracepoint(category = "syscalls", name = "sys_enter_listen")]
pub fn vigil_enter_listen(ctx: TracePointContext) -> u32 {
    stash(STASH_LISTEN, [arg(&ctx, 0), 0, 0, 0]);
    0
}

/// A datagram sent to an address given with the call (an unconnected
/// socket): reported like a connect. Sends on connected sockets (no
/// address: every TCP write) cost one compare.
/// `batch`: a `sendmmsg` (its exit reports the first message only; the
/// cgroup observers report every message, see [`observe_sock_addr`]).
#[inline(always)]
fn stash_send(fd: u64, addr: u64, batch: bool) {
    stash_dest(STASH_SEND, fd, addr, batch);
}

#[tracepoint(category = "syscalls", name = "sys_enter_sendto")]
pub fn vigil_enter_sendto(ctx: TracePointContext) -> u32 {
    stash_send(arg(&ctx, 0), arg(&ctx, 4), false);
    0
}

/// `sendmsg(fd, msg, flags)` and `sendmmsg(fd, msgvec, vlen, flags)`: the
/// address is the (first) message header's `msg_name`.
#[tracepoint(category = "syscalls", name = "sys_enter_sendmsg")]
pub fn vigil_enter_sendmsg(ctx: TracePointContext) -> u32 {
    let msg = arg(&ctx, 1);
    let name: u64 = unsafe { bpf_probe_read_user(msg as *const u64) }.unwrap_or(0);
    stash_send(arg(&ctx, 0), name, false);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_sendmmsg")]
pub fn vigil_enter_sendmmsg(ctx: TracePointContext) -> u32 {
    let msg = arg(&ctx, 1);
    let name: u64 = unsafe { bpf_probe_read_user(msg as *const u64) }.unwrap_or(0);
    stash_send(arg(&ctx, 0), name, true);
    0
}

/// `ptrace(request, pid, addr, data)`: attach and seize, and writes to the
/// tracee's memory or registers. Reads (PEEK, GETREGS) and the tracee's
/// own TRACEME are not reported.
#[tracepoint(category = "syscalls", name = "sys_enter_ptrace")]
pub fn vigil_enter_ptrace(ctx: TracePointContext) -> u32 {
    let request = arg(&ctx, 0);
    match request {
        ptrace::ATTACH
        | ptrace::SEIZE
        | ptrace::POKETEXT
        | ptrace::POKEDATA
        | ptrace::POKEUSER
        | ptrace::SETREGS
        | ptrace::SETFPREGS
        | ptrace::SETREGSET => stash(STASH_PTRACE, [request, arg(&ctx, 1), arg(&ctx, 2), 0]),
        _ => {}
    }
    0
}

/// `process_vm_writev(pid, local_iov, liovcnt, remote_iov, riovcnt, flags)`.
#[tracepoint(category = "syscalls", name = "sys_enter_process_vm_writev")]
pub fn vigil_enter_process_vm_writev(ctx: TracePointContext) -> u32 {
    let remote = arg(&ctx, 3);
    let base: u64 = unsafe { bpf_probe_read_user(remote as *const u64) }.unwrap_or(0);
    stash(STASH_VM_WRITE, [arg(&ctx, 0), base, 0, 0]);
    0
}

/// `init_module(image, len, args)`: a module from memory.
#[tracepoint(category = "syscalls", name = "sys_enter_init_module")]
pub fn vigil_enter_init_module(_ctx: TracePointContext) -> u32 {
    stash(STASH_MODULE, [u64::MAX, MODULE_FROM_MEMORY as u64, 0, 0]);
    0
}

/// `finit_module(fd, args, flags)`: a module from a file.
#[tracepoint(category = "syscalls", name = "sys_enter_finit_module")]
pub fn vigil_enter_finit_module(ctx: TracePointContext) -> u32 {
    stash(STASH_MODULE, [arg(&ctx, 0), arg(&ctx, 2) & 0xffff, 0, 0]);
    0
}

/// `bpf(cmd, attr, size)`: program loads only.
#[tracepoint(category = "syscalls", name = "sys_enter_bpf")]
pub fn vigil_enter_bpf(ctx: TracePointContext) -> u32 {
    if arg(&ctx, 0) as u32 as u64 == BPF_PROG_LOAD {
        stash(STASH_BPF, [arg(&ctx, 1), 0, 0, 0]);
    }
    0
}

/// Whether an unlink's target may be a log or a shell history: a path
/// under `/var/log/`, a name with `hist`/`hst` in it (`.bash_history`,
/// `.lesshst`), or a name relative to a directory `/var/log`. The agent
/// judges the full path; this only keeps `rm -rf node_modules` out.
#[inline(always)]
unsafe fn unlink_matters(dirfd: u64, path: u64) -> bool {
    unsafe {
        let Some(s) = scratch() else { return false };
        let buf = core::ptr::addr_of_mut!((*s).env) as *mut u8;
        let n = bpf_probe_read_user_str(buf as *mut c_void, 256, path as *const c_void);
        if n <= 0 {
            return false;
        }
        let head = core::ptr::read_unaligned(buf as *const u64);
        if head == u64::from_le_bytes(*b"/var/log") && *buf.add(8) == b'/' {
            return true;
        }
        let n = n as usize;
        let mut i = 0usize;
        while i < 252 {
            if i + 3 >= n {
                break;
            }
            if *buf.add(i) == b'h' {
                let (a, b, c) = (*buf.add(i + 1), *buf.add(i + 2), *buf.add(i + 3));
                if (a == b'i' && b == b's' && c == b't') || (a == b's' && b == b't') {
                    return true;
                }
            }
            i += 1;
        }
        if *buf == b'/' {
            return false;
        }
        // Relative: to the cwd or a directory fd named /var/log.
        let task = bpf_get_current_task();
        let dirfd = dirfd as u32 as i32 as i64;
        let dentry: u64 = if dirfd == AT_FDCWD {
            let fs: u64 = rd(task, off!(task_fs)).unwrap_or(0);
            rd(fs, off!(fs_pwd) + off!(path_dentry)).unwrap_or(0)
        } else {
            match fd_file(task, dirfd as u64) {
                Some(f) => rd(f, off!(file_f_path) + off!(path_dentry)).unwrap_or(0),
                None => 0,
            }
        };
        let name4 = |d: u64| -> u32 {
            let p: u64 = rd(d, off!(dentry_d_name) + off!(qstr_name)).unwrap_or(0);
            bpf_probe_read_kernel(p as *const u32).unwrap_or(0)
        };
        let parent: u64 = rd(dentry, off!(dentry_d_parent)).unwrap_or(0);
        dentry != 0
            && name4(dentry) == u32::from_le_bytes(*b"log\0")
            && name4(parent) == u32::from_le_bytes(*b"var\0")
    }
}

#[tracepoint(category = "syscalls", name = "sys_enter_unlink")]
pub fn vigil_enter_unlink(ctx: TracePointContext) -> u32 {
    let path = arg(&ctx, 0);
    if ready() && unsafe { unlink_matters(AT_FDCWD as u64, path) } {
        stash(STASH_UNLINK, [AT_FDCWD as u64, path, 0, 0]);
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_unlinkat")]
pub fn vigil_enter_unlinkat(ctx: TracePointContext) -> u32 {
    let (dirfd, path) = (arg(&ctx, 0), arg(&ctx, 1));
    if ready() && unsafe { unlink_matters(dirfd, path) } {
        stash(STASH_UNLINK, [dirfd, path, 0, 0]);
    }
    0
}

/// `mmap(addr, len, prot, flags, fd, off)`: anonymous and executable only
/// (libraries and programs are file mappings).
#[tracepoint(category = "syscalls", name = "sys_enter_mmap")]
pub fn vigil_enter_mmap(ctx: TracePointContext) -> u32 {
    let prot = arg(&ctx, 2);
    let flags = arg(&ctx, 3);
    if prot & PROT_EXEC != 0 && flags & MAP_ANONYMOUS != 0 {
        stash(
            STASH_EXEC_MEM,
            [EXECMEM_MMAP as u64, arg(&ctx, 1), prot, flags],
        );
    }
    0
}

/// `mprotect(start, len, prot)` and `pkey_mprotect(start, len, prot, key)`
/// adding PROT_EXEC.
#[inline(always)]
fn stash_mprotect(ctx: &TracePointContext) {
    let prot = arg(ctx, 2);
    if prot & PROT_EXEC != 0 {
        // The op and the start share a slot: starts are page aligned.
        stash(
            STASH_EXEC_MEM,
            [EXECMEM_MPROTECT as u64 | arg(ctx, 0), arg(ctx, 1), prot, 0],
        );
    }
}

#[tracepoint(category = "syscalls", name = "sys_enter_mprotect")]
pub fn vigil_enter_mprotect(ctx: TracePointContext) -> u32 {
    stash_mprotect(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_pkey_mprotect")]
pub fn vigil_enter_pkey_mprotect(ctx: TracePointContext) -> u32 {
    stash_mprotect(&ctx);
    0
}

// ---- syscall exit: one program for every stashed call -----------------------------

#[tracepoint(category = "syscalls", name = "sys_exit_openat")]
pub fn vigil_sys_exit(ctx: TracePointContext) -> u32 {
    if none_pending() {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    let Some(st) = (unsafe { INFLIGHT.get(&id) }).copied() else {
        return 0;
    };
    if INFLIGHT.remove(&id).is_ok() {
        pending_add(u64::MAX);
    }
    let ret = ctx_u64(&ctx, 16) as i64;
    let task = unsafe { bpf_get_current_task() };
    unsafe {
        match st.kind {
            STASH_OPEN => on_open(task, ret, st.args[0]),
            // One call site for the four (the path walk is inlined once).
            STASH_CHMOD | STASH_FCHMOD | STASH_UTIMES | STASH_MODULE | STASH_UNLINK => {
                let (kind, dirfd, path, mode, fd) = match st.kind {
                    STASH_CHMOD => (
                        EventKind::Chmod,
                        st.args[0] as i64,
                        st.args[1],
                        st.args[2],
                        0,
                    ),
                    STASH_FCHMOD => (EventKind::Chmod, 0, 0, st.args[2], st.args[0]),
                    // The module file's descriptor (none from memory).
                    STASH_MODULE => (EventKind::ModuleLoad, 0, 0, st.args[1], st.args[0]),
                    STASH_UNLINK => (EventKind::Unlink, st.args[0] as i64, st.args[1], 0, 0),
                    // A NULL path names the descriptor's file (futimens).
                    _ => (
                        EventKind::Utimes,
                        st.args[0] as i64,
                        st.args[1],
                        0,
                        st.args[0],
                    ),
                };
                on_path_event::<false>(kind, task, ret, dirfd, path, mode, fd)
            }
            STASH_RENAME => on_rename(task, ret, &st.args),
            // A send's result is a byte count: only an error is kept.
            STASH_CONNECT => on_connect(task, ret, &st.args, 0),
            STASH_SEND => on_connect(task, ret.min(0), &st.args, CONNECT_FLAG_SEND),
            STASH_LISTEN => on_listen(task, ret, st.args[0]),
            STASH_PTRACE | STASH_VM_WRITE => on_access(task, ret, &st),
            STASH_BPF => on_bpf_load(task, ret, st.args[0]),
            STASH_EXEC_MEM => on_exec_mem(task, ret, &st.args),
            _ => {}
        }
    }
    0
}

#[inline(always)]
unsafe fn on_open(task: u64, ret: i64, open_flags: u64) {
    if ret < 0 {
        return;
    }
    unsafe {
        if let Some(file) = fd_file(task, ret as u64) {
            emit_open(task, file, open_flags);
        }
    }
}

/// Reports a regular file opened for writing, once per (process, file):
/// from the syscall exit (the new fd's file) or the LSM `file_open` hook.
#[inline(always)]
unsafe fn emit_open(task: u64, file: u64, open_flags: u64) {
    unsafe {
        let inode: u64 = match rd(file, off!(file_f_inode)) {
            Ok(v) => v,
            Err(_) => return,
        };
        let mode: u16 = rd(inode, off!(inode_i_mode)).unwrap_or(0);
        if mode & S_IFMT != S_IFREG {
            return; // /dev/null, pipes, ttys: not files that can become programs
        }
        let ino: u64 = rd(inode, off!(inode_i_ino)).unwrap_or(0);
        let sb: u64 = rd(inode, off!(inode_i_sb)).unwrap_or(0);
        let dev: u32 = rd(sb, off!(sb_s_dev)).unwrap_or(0);
        let who = subject_of(task);
        let key = FileKey {
            start_boot_ns: who.start_boot_ns,
            ino,
            tgid: who.tgid,
            dev,
            generation: rd(inode, off!(inode_i_generation)).unwrap_or(0),
            inode_lo: inode as u32,
        };
        // A truncating open is always reported: opening a log for append
        // first must not hide emptying it later.
        if open_flags & O_TRUNC == 0 {
            if FILE_SEEN.get_ptr(&key).is_some() {
                stat_add(STAT_FILE_DEDUP, 1);
                return;
            }
            let _ = FILE_SEEN.insert(&key, &1u8, 0);
        }
        let Some(s) = scratch() else { return };
        let e: *mut FileOpenEvent = fixed(s);
        fill_header_for(&mut (*e).hdr, EventKind::FileOpen, who);
        (*e).open_flags = open_flags as u32;
        (*e).ino = ino;
        (*e).dev = dev;
        (*e).mode = mode as u32;
        let (plen, pflags) = walk_file(s, tail(s), file);
        let plen = plen & PATH_MASK;
        (*e).flags = pflags;
        (*e).path_len = plen as u32;
        (*e)._reserved = 0;
        emit(
            s,
            EventKind::FileOpen,
            core::mem::size_of::<FileOpenEvent>(),
            plen,
        );
    }
}

/// A call on one file named by (dirfd, path) or by `fd` (path 0): the
/// chmod record layout. `KERNEL`: `path` is a kernel string (a `struct
/// filename`'s copy), else the caller's memory.
#[inline(always)]
unsafe fn on_path_event<const KERNEL: bool>(
    kind: EventKind,
    task: u64,
    ret: i64,
    dirfd: i64,
    path: u64,
    mode: u64,
    fd: u64,
) {
    // A module load is reported failed too: an attempt is the signal.
    if ret != 0 && kind as u32 != EventKind::ModuleLoad as u32 {
        return;
    }
    unsafe {
        let Some(s) = scratch() else { return };
        let e: *mut ChmodEvent = fixed(s);
        fill_header(&mut (*e).hdr, kind, task);
        (*e).mode = mode as u32;
        (*e).ret = ret as i32;
        (*e)._reserved = 0;
        let t = tail(s);
        let (blen, flags) = if path == 0 {
            match fd_file(task, fd) {
                Some(f) => walk_file(s, t, f),
                None => (0, 0),
            }
        } else {
            walk_base::<KERNEL>(s, t, task, dirfd, path)
        };
        let blen = blen & PATH_MASK;
        let ulen = if path == 0 {
            0
        } else {
            read_path_str::<KERNEL>(t.add(blen as usize), path) & USER_LEN_MASK
        };
        (*e).flags = flags;
        (*e).base_len = blen as u32;
        (*e).user_len = ulen as u32;
        emit(s, kind, core::mem::size_of::<ChmodEvent>(), blen + ulen);
    }
}

#[inline(always)]
unsafe fn on_rename(task: u64, ret: i64, a: &[u64; 4]) {
    if ret != 0 {
        return;
    }
    unsafe {
        let Some(s) = scratch() else { return };
        let e: *mut RenameEvent = fixed(s);
        fill_header(&mut (*e).hdr, EventKind::Rename, task);
        let t = tail(s);
        let (blen, flags) = walk_base::<false>(s, t, task, a[2] as i64, a[3]);
        let blen = blen & PATH_MASK;
        let nlen = read_user_str(t.add(blen as usize), a[3]) & USER_LEN_MASK;
        let olen = read_user_str(t.add((blen + nlen) as usize), a[1]) & USER_LEN_MASK;
        (*e).flags = flags;
        (*e).old_dirfd_differs = (a[0] as u32 != a[2] as u32) as u32;
        (*e).base_len = blen as u32;
        (*e).new_len = nlen as u32;
        (*e).old_len = olen as u32;
        (*e)._reserved = 0;
        emit(
            s,
            EventKind::Rename,
            core::mem::size_of::<RenameEvent>(),
            blen + nlen + olen,
        );
    }
}

/// Whether this is the first time this process reports `op` on `target`;
/// records it when it is.
#[inline(always)]
unsafe fn first_time(task: u64, target: u32, op: u32) -> bool {
    unsafe {
        let leader: u64 = rd(task, off!(task_group_leader)).unwrap_or(task);
        let key = OnceKey {
            start_boot_ns: rd(leader, off!(task_start_boottime)).unwrap_or(0),
            tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
            target,
            op,
            pad: 0,
        };
        if ONCE_SEEN.get_ptr(&key).is_some() {
            stat_add(STAT_ONCE_DEDUP, 1);
            return false;
        }
        let _ = ONCE_SEEN.insert(&key, &1u8, 0);
        true
    }
}

#[inline(always)]
fn failure_bit(ret: i64) -> u32 {
    if ret < 0 {
        1 << 31
    } else {
        0
    }
}

/// ptrace requests and `process_vm_writev`: attach and seize every time,
/// writes once per (tracer, target, kind, outcome).
#[inline(always)]
unsafe fn on_access(task: u64, ret: i64, st: &Stash) {
    let (request, target, addr) = if st.kind == STASH_PTRACE {
        (st.args[0] as u32, st.args[1] as u32, st.args[2])
    } else {
        (ACCESS_VM_WRITEV, st.args[0] as u32, st.args[1])
    };
    let class = match request as u64 {
        ptrace::ATTACH | ptrace::SEIZE => 0,
        ptrace::POKETEXT | ptrace::POKEDATA | ptrace::POKEUSER => ptrace::POKEDATA as u32,
        ptrace::SETREGS | ptrace::SETFPREGS | ptrace::SETREGSET => ptrace::SETREGS as u32,
        _ => request,
    };
    unsafe {
        if class != 0 && !first_time(task, target, class | failure_bit(ret)) {
            return;
        }
        let Some(s) = scratch() else { return };
        let e: *mut ProcessAccessEvent = fixed(s);
        fill_header(&mut (*e).hdr, EventKind::ProcessAccess, task);
        (*e).target = target;
        (*e).request = request;
        (*e).ret = ret;
        (*e).addr = addr;
        emit(
            s,
            EventKind::ProcessAccess,
            core::mem::size_of::<ProcessAccessEvent>(),
            0,
        );
    }
}

/// `bpf(BPF_PROG_LOAD, attr)`: what kind of program, read back from the
/// caller's `bpf_attr` after the call.
#[inline(always)]
unsafe fn on_bpf_load(task: u64, ret: i64, attr: u64) {
    unsafe {
        let Some(s) = scratch() else { return };
        let e: *mut BpfLoadEvent = fixed(s);
        fill_header(&mut (*e).hdr, EventKind::BpfLoad, task);
        (*e).prog_type = bpf_probe_read_user(attr as *const u32).unwrap_or(0);
        (*e).insn_cnt = bpf_probe_read_user((attr + 4) as *const u32).unwrap_or(0);
        (*e).name = bpf_probe_read_user((attr + 48) as *const [u8; 16]).unwrap_or([0; 16]);
        (*e).attach_type = bpf_probe_read_user((attr + 68) as *const u32).unwrap_or(0);
        (*e).ret = ret as i32;
        emit(
            s,
            EventKind::BpfLoad,
            core::mem::size_of::<BpfLoadEvent>(),
            0,
        );
    }
}

/// Anonymous memory made executable: once per (process, call, outcome).
#[inline(always)]
unsafe fn on_exec_mem(task: u64, ret: i64, a: &[u64; 4]) {
    let op = (a[0] & 0xfff) as u32;
    unsafe {
        if !first_time(task, 0, op | failure_bit(ret)) {
            return;
        }
        let Some(s) = scratch() else { return };
        let e: *mut ExecMemEvent = fixed(s);
        fill_header(&mut (*e).hdr, EventKind::ExecMem, task);
        (*e).op = op;
        (*e).prot = a[2] as u32;
        (*e).map_flags = a[3] as u32;
        (*e).ret = ret.min(0) as i32;
        (*e).addr = if op == EXECMEM_MMAP {
            if ret > 0 {
                ret as u64
            } else {
                0
            }
        } else {
            a[0] & !0xfff
        };
        (*e).len = a[1];
        emit(
            s,
            EventKind::ExecMem,
            core::mem::size_of::<ExecMemEvent>(),
            0,
        );
    }
}

#[inline(always)]
unsafe fn on_connect(task: u64, ret: i64, a: &[u64; 4], flags: u16) {
    unsafe {
        // As stashed by `stash_dest`.
        let family = a[1] as u16;
        let port = (a[1] >> 16) as u16;
        let lo = a[2].to_ne_bytes();
        let hi = a[3].to_ne_bytes();
        let daddr = [
            lo[0], lo[1], lo[2], lo[3], lo[4], lo[5], lo[6], lo[7], hi[0], hi[1], hi[2], hi[3],
            hi[4], hi[5], hi[6], hi[7],
        ];
        let sock: u64 = match fd_file(task, a[0] & 0xffff_ffff) {
            Some(file) => rd(file, off!(file_private_data)).unwrap_or(0),
            None => 0,
        };
        emit_connect(
            task,
            sock_sk(sock),
            family,
            port,
            daddr,
            ret as i32,
            flags,
            (0, 0),
        );
    }
}

/// The `struct sock` of a `struct socket` (0 for none).
#[inline(always)]
unsafe fn sock_sk(sock: u64) -> u64 {
    if sock == 0 {
        return 0;
    }
    unsafe { rd(sock, off!(socket_sk)).unwrap_or(0) }
}

/// Reports a connect on an IPv4/IPv6 socket `sk` (a `struct sock`, 0 when
/// unknown): from the syscall exit (with its result), the LSM
/// `socket_connect` hook or the cgroup observers (an attempt,
/// [`CONNECT_FLAG_ATTEMPT`]). `port` is in network order. Without `sk`,
/// `sock_type` and `protocol` are taken as given.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn emit_connect(
    task: u64,
    sk: u64,
    family: u16,
    port: u16,
    daddr: [u8; 16],
    ret: i32,
    flags: u16,
    (sock_type, protocol): (u16, u16),
) {
    unsafe {
        // The de-duplication first: most connects of a busy process repeat
        // one, and need neither the record nor the socket's other fields.
        let who = subject_of(task);
        let protocol = if sk != 0 {
            rd(sk, off!(sk_protocol)).unwrap_or(0)
        } else {
            protocol
        };
        let dport = u16::from_be(port);
        // EINPROGRESS (non-blocking) is not a failure.
        let failed = ret < 0 && ret != -115;
        let now = bpf_ktime_get_boot_ns();
        if connect_repeated(who, family, dport, &daddr, protocol as u8, failed, now) {
            stat_add(STAT_CONNECT_DEDUP, 1);
            return;
        }
        let Some(s) = scratch() else { return };
        let e: *mut ConnectEvent = fixed(s);
        fill_header_at(&mut (*e).hdr, EventKind::Connect, who, now);
        (*e).family = family;
        (*e).dport = dport;
        (*e).ret = ret;
        (*e).daddr = daddr;
        (*e).saddr = [0u8; 16];
        (*e).protocol = protocol;
        (*e).sock_type = sock_type;
        (*e).sport = 0;
        (*e).flags = flags;
        if sk != 0 {
            (*e).sock_type = rd(sk, off!(sk_type)).unwrap_or(0);
            (*e).sport = rd(sk, off!(sk_num)).unwrap_or(0);
            if family == AF_INET {
                let v: [u8; 4] = rd(sk, off!(sk_rcv_saddr)).unwrap_or([0; 4]);
                (*e).saddr = [v[0], v[1], v[2], v[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            } else {
                (*e).saddr = rd(sk, off!(sk_v6_rcv_saddr)).unwrap_or([0; 16]);
            }
        }
        emit(
            s,
            EventKind::Connect,
            core::mem::size_of::<ConnectEvent>(),
            0,
        );
    }
}

/// Whether this process reported a connect to this destination (with the
/// same outcome) within the de-duplication window; records this one (at
/// `now`) when not.
#[inline(always)]
unsafe fn connect_repeated(
    who: Subject,
    family: u16,
    dport: u16,
    daddr: &[u8; 16],
    protocol: u8,
    failed: bool,
    now: u64,
) -> bool {
    let window = unsafe { core::ptr::read_volatile(core::ptr::addr_of!(CONFIG.connect_dedup_ns)) };
    if window == 0 {
        return false;
    }
    let key = ConnectKey {
        start_boot_ns: who.start_boot_ns,
        daddr: *daddr,
        tgid: who.tgid,
        dport,
        family: family as u8,
        failed: failed as u8,
        protocol,
        pad: [0; 7],
    };
    if let Some(last) = CONNECT_SEEN.get_ptr_mut(&key) {
        // SAFETY: a map value, alive while the program runs.
        unsafe {
            if now.wrapping_sub(*last) < window {
                return true;
            }
            *last = now;
        }
        return false;
    }
    let _ = CONNECT_SEEN.insert(&key, &now, 0);
    false
}

// ---- BPF LSM alternatives (kernels with BPF LSM; chosen at load) ------------

/// File writes where BPF LSM is available: one program instead of the
/// open/openat/openat2/creat enter+exit pairs, and it also sees opens that
/// do not go through those syscalls (io_uring, open_by_handle_at). Never
/// refuses anything.
#[lsm(hook = "file_open")]
pub fn vigil_lsm_file_open(ctx: LsmContext) -> i32 {
    // (struct file *file, int ret)
    let prev: i32 = ctx.arg(1);
    if prev != 0 || !ready() {
        return prev;
    }
    let file: u64 = ctx.arg(0);
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if is_agent(tgid) {
        return 0;
    }
    unsafe {
        // f_flags still has O_CREAT/O_TRUNC here (cleared after this hook).
        let flags: u32 = rd(file, off!(file_f_flags)).unwrap_or(0);
        if flags as u64 & WRITE_FLAGS != 0 {
            emit_open(bpf_get_current_task(), file, flags as u64);
        }
    }
    0
}

/// Connects where BPF LSM is available: every IPv4/IPv6 connect attempt,
/// io_uring's included, reported before it runs (result unknown). Never
/// refuses anything (containment's refusal is the cgroup programs').
#[lsm(hook = "socket_connect")]
pub fn vigil_lsm_connect(ctx: LsmContext) -> i32 {
    // (struct socket *sock, struct sockaddr *address, int addrlen, int ret)
    let prev: i32 = ctx.arg(3);
    if prev != 0 || !ready() {
        return prev;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if is_agent(tgid) {
        return 0;
    }
    let sock: u64 = ctx.arg(0);
    let addr: u64 = ctx.arg(1);
    unsafe {
        let family: u16 = rd(addr, 0).unwrap_or(0);
        if family != AF_INET && family != AF_INET6 {
            return 0;
        }
        let port: u16 = rd(addr, 2).unwrap_or(0);
        let daddr = if family == AF_INET {
            let v: [u8; 4] = rd(addr, 4).unwrap_or([0; 4]);
            [v[0], v[1], v[2], v[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        } else {
            rd(addr, 8).unwrap_or([0; 16])
        };
        emit_connect(
            bpf_get_current_task(),
            sock_sk(sock),
            family,
            port,
            daddr,
            0,
            CONNECT_FLAG_ATTEMPT,
            (0, 0),
        );
    }
    0
}

#[inline(always)]
unsafe fn on_listen(task: u64, ret: i64, fd: u64) {
    if ret != 0 {
        return;
    }
    unsafe {
        let Some(file) = fd_file(task, fd) else {
            return;
        };
        let sock: u64 = rd(file, off!(file_private_data)).unwrap_or(0);
        let sk: u64 = rd(sock, off!(socket_sk)).unwrap_or(0);
        if sk == 0 {
            return;
        }
        let family: u16 = rd(sk, off!(sk_family)).unwrap_or(0);
        if family != AF_INET && family != AF_INET6 {
            return;
        }
        if servers_kept() {
            let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
            let _ = SERVERS.insert(&tgid, &1u8, 0);
        }
        let Some(s) = scratch() else { return };
        let e: *mut ListenEvent = fixed(s);
        fill_header(&mut (*e).hdr, EventKind::Listen, task);
        (*e).family = family;
        (*e).protocol = rd(sk, off!(sk_protocol)).unwrap_or(0);
        (*e).port = rd(sk, off!(sk_num)).unwrap_or(0);
        (*e)._reserved = 0;
        if family == AF_INET {
            let v: [u8; 4] = rd(sk, off!(sk_rcv_saddr)).unwrap_or([0; 4]);
            (*e).addr = [v[0], v[1], v[2], v[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        } else {
            (*e).addr = rd(sk, off!(sk_v6_rcv_saddr)).unwrap_or([0; 16]);
        }
        emit(s, EventKind::Listen, core::mem::size_of::<ListenEvent>(), 0);
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// ---- connects that bypass the connect/send syscalls ---------------------------
// Where BPF LSM is not available, connects and unconnected sends made
// without the syscalls (io_uring's IORING_OP_CONNECT/SENDMSG, run by the
// submitting task or one of its io-wq worker threads) still pass the
// cgroup sock_addr hooks: attached to the cgroup v2 root, these report
// them as attempts. A connect/send syscall in flight on this thread is left
// to its exit program (which has the result). Never refuse anything.

/// `V6`: the program is attached to an IPv6 hook (only the fields of its
/// family may be read: the verifier refuses the others).
#[inline(always)]
fn observe_sock_addr<const V6: bool>(ctx: &SockAddrContext, flags: u16) -> i32 {
    if !ready() {
        return 1;
    }
    let id = bpf_get_current_pid_tgid();
    if is_agent((id >> 32) as u32) {
        return 1;
    }
    // The syscall's exit reports it (for a sendmmsg, only its first
    // message: the others are reported here, the first one twice within
    // the de-duplication window, so once).
    if let Some(st) = (!none_pending())
        .then(|| unsafe { INFLIGHT.get(&id) })
        .flatten()
    {
        if st.kind == STASH_CONNECT || (st.kind == STASH_SEND && st.args[0] >> 32 == 0) {
            return 1;
        }
    }
    // Kernel sockets (NFS, CIFS, iSCSI connect from kernel threads): not
    // a process's doing. io_uring's workers have their process's memory.
    if unsafe { rd::<u64>(bpf_get_current_task(), off!(task_mm)) }.unwrap_or(0) == 0 {
        return 1;
    }
    unsafe {
        // Every context field read once, at its constant offset from the
        // unmodified context pointer (the verifier refuses loads through a
        // pointer derived from it).
        let sa = ctx.sock_addr;
        let field = |p: *const u32| core::ptr::read_volatile(p);
        let family = field(core::ptr::addr_of!((*sa).user_family)) as u16;
        let port = field(core::ptr::addr_of!((*sa).user_port)) as u16;
        let sock_type = field(core::ptr::addr_of!((*sa).type_)) as u16;
        let protocol = field(core::ptr::addr_of!((*sa).protocol)) as u16;
        let mut daddr = [0u8; 16];
        if V6 {
            if family != AF_INET6 {
                return 1;
            }
            let ip6 = [
                field(core::ptr::addr_of!((*sa).user_ip6[0])),
                field(core::ptr::addr_of!((*sa).user_ip6[1])),
                field(core::ptr::addr_of!((*sa).user_ip6[2])),
                field(core::ptr::addr_of!((*sa).user_ip6[3])),
            ];
            let mut i = 0;
            while i < 4 {
                let b = ip6[i].to_ne_bytes();
                daddr[i * 4] = b[0];
                daddr[i * 4 + 1] = b[1];
                daddr[i * 4 + 2] = b[2];
                daddr[i * 4 + 3] = b[3];
                i += 1;
            }
        } else {
            if family != AF_INET {
                return 1;
            }
            let v = field(core::ptr::addr_of!((*sa).user_ip4)).to_ne_bytes();
            daddr[..4].copy_from_slice(&v);
        }
        // The socket's own fields come from the context: the verifier
        // forbids arithmetic on its `sk` pointer.
        emit_connect(
            bpf_get_current_task(),
            0,
            family,
            port,
            daddr,
            0,
            CONNECT_FLAG_ATTEMPT | flags,
            (sock_type, protocol),
        );
    }
    1
}

#[cgroup_sock_addr(connect4)]
pub fn vigil_cg_connect4(ctx: SockAddrContext) -> i32 {
    observe_sock_addr::<false>(&ctx, 0)
}

#[cgroup_sock_addr(connect6)]
pub fn vigil_cg_connect6(ctx: SockAddrContext) -> i32 {
    observe_sock_addr::<true>(&ctx, 0)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn vigil_cg_sendmsg4(ctx: SockAddrContext) -> i32 {
    observe_sock_addr::<false>(&ctx, CONNECT_FLAG_SEND)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn vigil_cg_sendmsg6(ctx: SockAddrContext) -> i32 {
    observe_sock_addr::<true>(&ctx, CONNECT_FLAG_SEND)
}

// ---- file opens submitted through io_uring ------------------------------------

/// File opens for writing submitted through io_uring, on kernels where BPF
/// LSM does not serve file writes (its `file_open` hook sees these too):
/// the raw tracepoint `io_uring_submit_req` (`io_uring_submit_sqe` on 6.0
/// to 6.3), which fires in the submitting task after the request's
/// arguments were read and before the open runs. Reported as given (the
/// path and the directory it starts from); the agent finds the file.
#[raw_tracepoint(tracepoint = "io_uring_submit_req")]
pub fn vigil_uring_submit(ctx: RawTracePointContext) -> i32 {
    if !ready() || uring_off!(valid) == 0 {
        return 0;
    }
    if is_agent((bpf_get_current_pid_tgid() >> 32) as u32) {
        return 0;
    }
    let req: u64 = ctx.arg(0);
    unsafe {
        let op: u8 = rd(req, uring_off!(req_opcode)).unwrap_or(0);
        if op != IORING_OP_OPENAT && op != IORING_OP_OPENAT2 {
            return 0;
        }
        let open = req + uring_off!(req_cmd);
        let flags: u64 = rd(open, uring_off!(open_how_flags)).unwrap_or(0);
        if flags & WRITE_FLAGS == 0 {
            return 0;
        }
        let dfd: i32 = rd(open, uring_off!(open_dfd)).unwrap_or(AT_FDCWD as i32);
        // The kernel's copy of the path (`filename.name`), not the
        // caller's memory, which another thread may have changed since.
        let name: u64 = rd(open, uring_off!(open_filename)).unwrap_or(0);
        let path: u64 = if name == 0 {
            0
        } else {
            rd(name, uring_off!(filename_name)).unwrap_or(0)
        };
        if path == 0 {
            return 0;
        }
        on_path_event::<true>(
            EventKind::UringOpen,
            bpf_get_current_task(),
            0,
            dfd as i64,
            path,
            flags & 0xffff_ffff,
            0,
        );
    }
    0
}

// ---- containment: outbound connects of contained processes ---------------
// Attached to the cgroup v2 root only when containment uses "deny_connect".
// 1 lets the call through, 0 refuses it with EPERM.

#[inline(always)]
fn connect_verdict() -> i32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if DENY_CONNECT.get_ptr(&tgid).is_some() {
        0
    } else {
        1
    }
}

#[cgroup_sock_addr(connect4)]
pub fn vigil_deny_connect4(_ctx: SockAddrContext) -> i32 {
    connect_verdict()
}

#[cgroup_sock_addr(connect6)]
pub fn vigil_deny_connect6(_ctx: SockAddrContext) -> i32 {
    connect_verdict()
}

#[cgroup_sock_addr(sendmsg4)]
pub fn vigil_deny_sendmsg4(_ctx: SockAddrContext) -> i32 {
    connect_verdict()
}

#[cgroup_sock_addr(sendmsg6)]
pub fn vigil_deny_sendmsg6(_ctx: SockAddrContext) -> i32 {
    connect_verdict()
}
