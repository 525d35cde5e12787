//! The bytes that cross the boundary between vigil's eBPF programs and the
//! agent: the ring-buffer record layouts, the kernel struct offsets the agent
//! hands to the programs, and the statistics slots.
//!
//! Everything here is `#[repr(C)]`, `no_std` and free of pointers, so both
//! sides agree on every byte. This crate is the single source of truth for
//! that layout; nothing else may define it.
//!
//! # Record layout
//!
//! Every ring-buffer record starts with an [`EventHeader`]. Its `kind` says
//! which fixed struct follows (the header is that struct's first field), and
//! `size` is the total record length: the fixed struct plus a variable tail
//! of bytes (paths, argv) whose lengths the fixed struct gives.
//!
//! Paths walked in the kernel are encoded leaf first: each component is a
//! NUL-terminated name, the file's own name first and the top directory last
//! (`"x\0dashboard\0home\0"` is `/home/dashboard/x`).
#![no_std]
#![deny(missing_docs)]

/// Length of `task_struct.comm`.
pub const TASK_COMM_LEN: usize = 16;
/// Longest name of one path component the kernel walk copies (NAME_MAX + NUL).
pub const NAME_MAX_BUF: usize = 256;
/// Bytes of walked path a record may carry. A power of two: the programs mask
/// offsets with `PATH_MAX_BYTES - 1` to keep the verifier happy.
pub const PATH_MAX_BYTES: usize = 4096;
/// Most path components walked up from a dentry.
pub const PATH_MAX_DEPTH: u32 = 48;
/// Bytes of argv captured per exec (power of two). A longer command line
/// is flagged ([`EXEC_FLAG_ARGV_TRUNCATED`]) and the agent reads the rest
/// from `/proc` while the process lives.
pub const ARGV_MAX_BYTES: usize = 2048;
/// Most argv entries reported per exec (the agent cuts the rest).
pub const ARGV_MAX_ARGS: usize = 256;
/// Longest environment string the exec scan reads (power of two).
pub const ENV_STR_MAX: usize = 4096;
/// Most environment strings the exec scan looks at.
pub const ENV_MAX_VARS: u32 = 96;
/// Bytes of a user-supplied path string (chmod, rename) captured (power of two).
pub const USER_PATH_MAX_BYTES: usize = 512;
/// Room for a record's variable tail (a power of two, so the programs can
/// mask lengths with `TAIL_MAX_BYTES - 1`); it holds the largest tail any
/// record builds.
pub const TAIL_MAX_BYTES: usize = 8192;
/// Room for a record's fixed struct in the scratch area; every fixed struct is
/// smaller.
pub const FIXED_MAX_BYTES: usize = 192;
const _: () = assert!(PATH_MAX_BYTES + NAME_MAX_BUF + 2 * USER_PATH_MAX_BYTES <= TAIL_MAX_BYTES);
const _: () =
    assert!(PATH_MAX_BYTES + NAME_MAX_BUF + ARGV_MAX_BYTES + USER_PATH_MAX_BYTES <= TAIL_MAX_BYTES);
const _: () = assert!(core::mem::size_of::<ExecEvent>() <= FIXED_MAX_BYTES);
const _: () = assert!(core::mem::size_of::<ConnectEvent>() <= FIXED_MAX_BYTES);
const _: () = assert!(core::mem::size_of::<ProcessAccessEvent>() <= FIXED_MAX_BYTES);
const _: () = assert!(core::mem::size_of::<BpfLoadEvent>() <= FIXED_MAX_BYTES);
const _: () = assert!(core::mem::size_of::<ExecMemEvent>() <= FIXED_MAX_BYTES);

/// What a record is. The discriminant is `EventHeader::kind`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A process replaced its image (execve/execveat succeeded): [`ExecEvent`].
    Exec = 1,
    /// A new process (not a thread) was created: [`ForkEvent`].
    Fork = 2,
    /// The last thread of a process exited: [`ExitEvent`].
    Exit = 3,
    /// A connect() on an IPv4/IPv6 socket returned: [`ConnectEvent`].
    Connect = 4,
    /// A regular file was opened for writing (first time per process and inode): [`FileOpenEvent`].
    FileOpen = 5,
    /// A chmod family call set execute, setuid or setgid bits: [`ChmodEvent`].
    Chmod = 6,
    /// A rename family call succeeded: [`RenameEvent`].
    Rename = 7,
    /// A successful listen() on an IPv4/IPv6 socket: [`ListenEvent`].
    Listen = 8,
    /// The BPF LSM exec hook refused an exec under the deny policy:
    /// [`ExecDeniedEvent`]. The process keeps its old image.
    ExecDenied = 9,
    /// A utimensat/utimes family call set a file's times to given values
    /// (not "now"): [`ChmodEvent`] layout, `mode` 0.
    Utimes = 10,
    /// A process's main thread changed its name (comm) after exec
    /// (`prctl(PR_SET_NAME)`, a write to `/proc/self/comm`): [`CommEvent`].
    /// The header's `comm` is the old name.
    Comm = 11,
    /// A process acted on another process's memory or execution: ptrace
    /// attach/seize, memory pokes, register writes, `process_vm_writev`:
    /// [`ProcessAccessEvent`].
    ProcessAccess = 12,
    /// A kernel module load was tried (`init_module` from memory,
    /// `finit_module` from a file): [`ChmodEvent`] layout, `mode` holds
    /// [`MODULE_FROM_MEMORY`] or the `finit_module` flags, the path is the
    /// module file's (empty from memory).
    ModuleLoad = 13,
    /// A BPF program load was tried (`bpf(BPF_PROG_LOAD)`): [`BpfLoadEvent`].
    BpfLoad = 14,
    /// A process made anonymous memory executable (`mmap` of anonymous
    /// memory with PROT_EXEC, `mprotect`/`pkey_mprotect` adding PROT_EXEC),
    /// first time per process and call: [`ExecMemEvent`].
    ExecMem = 15,
    /// A file that matters for indicator removal was unlinked (a path
    /// under /var/log, relative to /var/log, or a name of a shell
    /// history's kind; filtered in the kernel): [`ChmodEvent`] layout,
    /// `mode` 0.
    Unlink = 16,
    /// A file open for writing submitted through io_uring
    /// (`IORING_OP_OPENAT`/`OPENAT2`), seen at submission on kernels where
    /// no BPF LSM `file_open` hook serves file writes: [`ChmodEvent`]
    /// layout, `mode` holds the open flags (low 32 bits), the path is the
    /// one given with the directory it starts from. The open has not run
    /// yet (nor has it succeeded).
    UringOpen = 17,
}

/// Number of slots indexed by [`EventKind`] (0 is unused; room to grow).
pub const EVENT_KIND_SLOTS: usize = 24;

impl EventKind {
    /// The kind for a raw header value, if it is one.
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Exec,
            2 => Self::Fork,
            3 => Self::Exit,
            4 => Self::Connect,
            5 => Self::FileOpen,
            6 => Self::Chmod,
            7 => Self::Rename,
            8 => Self::Listen,
            9 => Self::ExecDenied,
            10 => Self::Utimes,
            11 => Self::Comm,
            12 => Self::ProcessAccess,
            13 => Self::ModuleLoad,
            14 => Self::BpfLoad,
            15 => Self::ExecMem,
            16 => Self::Unlink,
            17 => Self::UringOpen,
            _ => return None,
        })
    }
    /// Stable lower-case name, used in metrics labels and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Exec => "exec",
            Self::Fork => "fork",
            Self::Exit => "exit",
            Self::Connect => "connect",
            Self::FileOpen => "file_open",
            Self::Chmod => "chmod",
            Self::Rename => "rename",
            Self::Listen => "listen",
            Self::ExecDenied => "exec_denied",
            Self::Utimes => "utimes",
            Self::Comm => "comm",
            Self::ProcessAccess => "process_access",
            Self::ModuleLoad => "module_load",
            Self::BpfLoad => "bpf_load",
            Self::ExecMem => "exec_mem",
            Self::Unlink => "unlink",
            Self::UringOpen => "uring_open",
        }
    }
    /// All kinds, in discriminant order.
    pub const ALL: [EventKind; 17] = [
        Self::Exec,
        Self::Fork,
        Self::Exit,
        Self::Connect,
        Self::FileOpen,
        Self::Chmod,
        Self::Rename,
        Self::Listen,
        Self::ExecDenied,
        Self::Utimes,
        Self::Comm,
        Self::ProcessAccess,
        Self::ModuleLoad,
        Self::BpfLoad,
        Self::ExecMem,
        Self::Unlink,
        Self::UringOpen,
    ];
}

/// Common first field of every record: who did it and when.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventHeader {
    /// [`EventKind`] as u32.
    pub kind: u32,
    /// Total record size in bytes (fixed struct + tail).
    pub size: u32,
    /// `bpf_ktime_get_boot_ns()` when the event was recorded.
    pub boot_ns: u64,
    /// Thread id of the acting task.
    pub pid: u32,
    /// Process id (thread group id) of the subject process.
    pub tgid: u32,
    /// Real uid of the acting task.
    pub uid: u32,
    /// Real gid of the acting task.
    pub gid: u32,
    /// `task_struct.start_boottime` of the subject process's group leader, in
    /// ns since boot: with `tgid` it names one process across pid reuse, and
    /// divided by the clock tick it equals field 22 of `/proc/PID/stat`.
    pub start_boot_ns: u64,
    /// cgroup v2 id of the acting task.
    pub cgroup_id: u64,
    /// `comm` of the acting task (NUL padded).
    pub comm: [u8; TASK_COMM_LEN],
}

/// Exec flag: the executable is a memfd (`memfd_create`), i.e. fileless.
pub const EXEC_FLAG_MEMFD: u32 = 1;
/// Exec flag: the executable's inode has no links left (deleted or anonymous).
pub const EXEC_FLAG_DELETED: u32 = 1 << 1;
/// Flag: a walked path was cut at [`PATH_MAX_BYTES`] or [`PATH_MAX_DEPTH`].
pub const FLAG_PATH_TRUNCATED: u32 = 1 << 2;
/// Exec flag: argv was cut at [`ARGV_MAX_BYTES`].
pub const EXEC_FLAG_ARGV_TRUNCATED: u32 = 1 << 3;
/// Exec flag: the program is a script run through an interpreter
/// (`#!`): the walked exe is the interpreter, the tail's `filename` is the
/// script as given to execve.
pub const EXEC_FLAG_SCRIPT: u32 = 1 << 5;
/// Exec flag: the environment scan for `LD_PRELOAD` stopped early (a
/// variable longer than [`ENV_STR_MAX`] or more than [`ENV_MAX_VARS`]).
pub const EXEC_FLAG_ENV_TRUNCATED: u32 = 1 << 6;
/// Exec flag: the new image's environment switches shell history off
/// (`HISTFILE=/dev/null`, `HISTFILE=`, `HISTSIZE=0`, `HISTFILESIZE=0`).
pub const EXEC_FLAG_HISTORY_OFF: u32 = 1 << 8;
/// Exec flag: the kernel stopped the process (SIGSTOP) at exec under the
/// freeze policy; the agent must resume or kill it.
pub const EXEC_FLAG_FROZEN: u32 = 1 << 7;
/// Flag: the walked dentry is not connected to a mounted tree (pseudo file
/// systems such as memfd, pipes, anonymous inodes).
pub const FLAG_PATH_DISCONNECTED: u32 = 1 << 4;

/// A successful exec. Tail: `path_len` bytes of walked exe path, then
/// `argv_len` bytes of NUL-separated argv, then `filename_len` bytes of the
/// script path for scripts, then `preload_len` bytes of `LD_PRELOAD`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecEvent {
    /// Common header; `tgid` is the process that exec'd.
    pub hdr: EventHeader,
    /// Parent process id (`real_parent->tgid`).
    pub ppid: u32,
    /// Effective uid.
    pub euid: u32,
    /// Effective gid.
    pub egid: u32,
    /// `EXEC_FLAG_*` / `FLAG_*` bits.
    pub flags: u32,
    /// Inode number of the executable file.
    pub exe_ino: u64,
    /// Device of the executable's super block (kernel `dev_t` encoding).
    pub exe_dev: u32,
    /// Link count of the executable's inode.
    pub exe_nlink: u32,
    /// Bytes of walked path in the tail.
    pub path_len: u32,
    /// Bytes of argv in the tail (after the path).
    pub argv_len: u32,
    /// Bytes of the execve filename argument (NUL terminated) after argv;
    /// only for scripts ([`EXEC_FLAG_SCRIPT`]), else 0.
    pub filename_len: u32,
    /// Bytes of the `LD_PRELOAD` value (NUL terminated) after the filename;
    /// 0 when the new image's environment has none.
    pub preload_len: u32,
    /// `i_mode & S_IFMT` of the files on fds 0, 1, 2 (0 if closed).
    pub stdio_mode: [u16; 3],
    /// Socket family of fds 0, 1, 2 when they are sockets (AF_INET = 2,
    /// AF_INET6 = 10, AF_UNIX = 1), else 0.
    pub stdio_family: [u16; 3],
    /// Inode numbers of the files on fds 0, 1, 2 (0 if closed): two
    /// processes joined by one pipe name the same pipe inode, and a
    /// redirected output names its file.
    pub stdio_ino: [u64; 3],
    /// Devices (kernel `dev_t` encoding) of the files on fds 0, 1, 2.
    pub stdio_dev: [u32; 3],
    /// Zero.
    pub _reserved: u32,
    /// Size of the executable file (`i_size`): the agent hashes only files
    /// with the size of a system shell, downloader or interpreter.
    pub exe_size: u64,
    /// Where the new image's arguments start (`mm->arg_start`, also field
    /// 48 of `/proc/PID/stat`): what the agent reads from /proc to complete
    /// a cut record is this image's only while it is still this address (a
    /// process that exec'd again has a new stack).
    pub arg_start: u64,
}

/// An exec the BPF LSM hook (`bprm_check_security`) refused under the deny
/// policy ([`SensorConfig::deny_policy`]). The header names the process
/// that tried (it keeps its old image). Tail: `path_len` bytes of walked
/// path of the program it tried to run, then `filename_len` bytes (NUL
/// terminated) of the path as given to execve.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecDeniedEvent {
    /// Common header.
    pub hdr: EventHeader,
    /// Parent process id (`real_parent->tgid`).
    pub ppid: u32,
    /// The `FREEZE_*` policy bit that matched.
    pub policy: u32,
    /// Inode number of the refused program's file.
    pub exe_ino: u64,
    /// Device of its super block (kernel `dev_t` encoding).
    pub exe_dev: u32,
    /// Bytes of walked path in the tail.
    pub path_len: u32,
    /// Bytes of the execve filename after the path.
    pub filename_len: u32,
    /// `FLAG_PATH_*` bits of the walk.
    pub flags: u32,
}

/// A new process: the fork/clone of a thread group (threads are not reported).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ForkEvent {
    /// Header of the *child*: `tgid` and `start_boot_ns` are the child's.
    pub hdr: EventHeader,
    /// The child's parent process (`real_parent->tgid`).
    pub ppid: u32,
    /// Clone flags are not visible in the tracepoint; reserved.
    pub _reserved: u32,
}

/// A process's main thread took a new name. The header is the process's
/// (its `comm` the old name).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CommEvent {
    /// Common header.
    pub hdr: EventHeader,
    /// The new name (NUL padded).
    pub new_comm: [u8; TASK_COMM_LEN],
}

/// The last thread of a process exited.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExitEvent {
    /// Header of the exiting process.
    pub hdr: EventHeader,
    /// `task_struct.exit_code`: wait(2) status encoding (code << 8 | signal).
    pub exit_code: u32,
    /// Reserved for alignment.
    pub _reserved: u32,
}

/// A connect() on an IPv4 or IPv6 socket returned.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnectEvent {
    /// Common header.
    pub hdr: EventHeader,
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u16,
    /// IPPROTO_TCP (6), IPPROTO_UDP (17), ...
    pub protocol: u16,
    /// SOCK_STREAM (1), SOCK_DGRAM (2), ...
    pub sock_type: u16,
    /// Destination port, host order.
    pub dport: u16,
    /// Source port, host order (0 if not bound yet).
    pub sport: u16,
    /// `CONNECT_FLAG_*` bits.
    pub flags: u16,
    /// Return value of connect(): 0, or -errno (-115 EINPROGRESS is normal for
    /// non-blocking sockets).
    pub ret: i32,
    /// Destination address: 4 bytes for IPv4, 16 for IPv6 (network order).
    pub daddr: [u8; 16],
    /// Source address, same encoding.
    pub saddr: [u8; 16],
}

/// Connect flag: reported by the BPF LSM hook (`socket_connect`) when the
/// connect was attempted, before it ran: `ret` is unknown (0), the source
/// address and port are usually not bound yet.
pub const CONNECT_FLAG_ATTEMPT: u16 = 1;
/// Connect flag: not a connect but a datagram sent to an address given
/// with the call (`sendto`/`sendmsg`/`sendmmsg` on an unconnected socket:
/// beacons, DNS tunnels); `ret` is 0 or -errno.
pub const CONNECT_FLAG_SEND: u16 = 2;

/// A successful listen() on an IPv4 or IPv6 socket: the process serves.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ListenEvent {
    /// Common header.
    pub hdr: EventHeader,
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u16,
    /// IPPROTO_TCP (6), ...
    pub protocol: u16,
    /// Local port, host order.
    pub port: u16,
    /// Reserved.
    pub _reserved: u16,
    /// Local address: 4 bytes for IPv4, 16 for IPv6 (network order).
    pub addr: [u8; 16],
}

/// A regular file opened for writing, creating or truncating; reported once
/// per (process, inode). Tail: `path_len` bytes of walked path.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FileOpenEvent {
    /// Common header.
    pub hdr: EventHeader,
    /// open(2) flags.
    pub open_flags: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Inode number.
    pub ino: u64,
    /// Device (kernel `dev_t` encoding).
    pub dev: u32,
    /// `inode.i_mode` after the open.
    pub mode: u32,
    /// Bytes of walked path in the tail.
    pub path_len: u32,
    /// Reserved.
    pub _reserved: u32,
}

/// A call on one file: a successful chmod/fchmod/fchmodat that sets an
/// execute, setuid or setgid bit (also the layout of utimes and module
/// loads). Tail: `base_len` bytes of walked base path (the file itself for
/// fchmod, the directory a relative path starts from otherwise, empty for an
/// absolute path), then `user_len` bytes of the path string as given.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ChmodEvent {
    /// Common header.
    pub hdr: EventHeader,
    /// The new mode (module loads: [`MODULE_FROM_MEMORY`] or the
    /// `finit_module` flags).
    pub mode: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Bytes of walked base path.
    pub base_len: u32,
    /// Bytes of the user path string (NUL terminated, 0 for fchmod).
    pub user_len: u32,
    /// The call's result: 0 or -errno (only module loads report failures).
    pub ret: i32,
    /// Zero.
    pub _reserved: u32,
}

/// Module load `mode`: the image came from memory (`init_module`), not a
/// file descriptor.
pub const MODULE_FROM_MEMORY: u32 = 1 << 31;

/// ptrace requests the sensor reports: attach and seize (every call), and
/// writes to the tracee's memory or registers (first per tracer, target
/// and kind).
pub mod ptrace {
    /// PTRACE_POKETEXT.
    pub const POKETEXT: u64 = 4;
    /// PTRACE_POKEDATA.
    pub const POKEDATA: u64 = 5;
    /// PTRACE_POKEUSER.
    pub const POKEUSER: u64 = 6;
    /// PTRACE_SETREGS.
    pub const SETREGS: u64 = 13;
    /// PTRACE_SETFPREGS.
    pub const SETFPREGS: u64 = 15;
    /// PTRACE_ATTACH.
    pub const ATTACH: u64 = 16;
    /// PTRACE_SETREGSET.
    pub const SETREGSET: u64 = 0x4205;
    /// PTRACE_SEIZE.
    pub const SEIZE: u64 = 0x4206;
}

/// [`ProcessAccessEvent::request`] of a `process_vm_writev` (not a ptrace
/// request number).
pub const ACCESS_VM_WRITEV: u32 = 0x1_0000;

/// A process acted on another: ptrace attach/seize (each call), memory
/// pokes and register writes (first per tracer, target and kind), or
/// `process_vm_writev` (first per writer and target). Failures are reported
/// too (an attempt is a signal).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcessAccessEvent {
    /// Common header: the process acting.
    pub hdr: EventHeader,
    /// Target pid as the caller gave it (in the caller's pid namespace).
    pub target: u32,
    /// The ptrace request, or [`ACCESS_VM_WRITEV`].
    pub request: u32,
    /// Result: 0 (or bytes written) or -errno.
    pub ret: i64,
    /// ptrace's `addr`; for `process_vm_writev` the first remote iovec's
    /// base.
    pub addr: u64,
}

/// A BPF program load (`bpf(BPF_PROG_LOAD)`), reported with its result.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BpfLoadEvent {
    /// Common header.
    pub hdr: EventHeader,
    /// `bpf_attr.prog_type` (BPF_PROG_TYPE_*).
    pub prog_type: u32,
    /// `bpf_attr.expected_attach_type`.
    pub attach_type: u32,
    /// Instruction count.
    pub insn_cnt: u32,
    /// The new program's fd, or -errno.
    pub ret: i32,
    /// `bpf_attr.prog_name` (NUL padded).
    pub name: [u8; 16],
}

/// [`ExecMemEvent::op`]: `mmap` of anonymous memory with PROT_EXEC.
pub const EXECMEM_MMAP: u32 = 1;
/// [`ExecMemEvent::op`]: `mprotect`/`pkey_mprotect` adding PROT_EXEC.
pub const EXECMEM_MPROTECT: u32 = 2;

/// Memory made executable outside any file: JIT compilers do it, and so do
/// shellcode runners and reflective loaders. Reported once per process and
/// `op` (the first is what tells; a JIT repeats it all day).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecMemEvent {
    /// Common header.
    pub hdr: EventHeader,
    /// [`EXECMEM_MMAP`] or [`EXECMEM_MPROTECT`].
    pub op: u32,
    /// The protection asked for (PROT_* bits).
    pub prot: u32,
    /// `mmap` flags (0 for mprotect).
    pub map_flags: u32,
    /// 0 or -errno.
    pub ret: i32,
    /// The mapping's address (mmap's result, mprotect's start).
    pub addr: u64,
    /// Its length.
    pub len: u64,
}

/// Key of the once-per-process maps (exec memory, ptrace writes,
/// `process_vm_writev`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct OnceKey {
    /// Process start time (with tgid: the process).
    pub start_boot_ns: u64,
    /// Process id.
    pub tgid: u32,
    /// The other process (0 when none).
    pub target: u32,
    /// What was done (op or request class), with bit 31 set for a failure
    /// (a failure does not hide a later success).
    pub op: u32,
    /// Zero.
    pub pad: u32,
}

/// A successful rename. Tail: `base_len` walked bytes (directory the new
/// path is relative to, empty if absolute), `new_len` bytes of the new path
/// as given, `old_len` bytes of the old path as given.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RenameEvent {
    /// Common header.
    pub hdr: EventHeader,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Non-zero when the old path was given relative to a different
    /// directory fd than the new one.
    pub old_dirfd_differs: u32,
    /// Bytes of walked base path.
    pub base_len: u32,
    /// Bytes of new path string.
    pub new_len: u32,
    /// Bytes of old path string.
    pub old_len: u32,
    /// Reserved.
    pub _reserved: u32,
}

/// Kernel struct member offsets, read from BTF by the agent and written into
/// the programs' read-only data before load. Every field is a byte offset.
/// This plays the role CO-RE relocations play in C: it follows the running
/// kernel's layout. Field names are `struct_member`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct KernelOffsets {
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_real_parent: u32,
    pub task_group_leader: u32,
    pub task_start_boottime: u32,
    pub task_mm: u32,
    pub task_files: u32,
    pub task_fs: u32,
    pub task_cred: u32,
    pub task_signal: u32,
    pub task_exit_code: u32,
    pub signal_live: u32,
    pub cred_euid: u32,
    pub cred_egid: u32,
    pub mm_arg_start: u32,
    pub mm_arg_end: u32,
    pub mm_env_start: u32,
    pub mm_env_end: u32,
    pub binprm_file: u32,
    pub binprm_filename: u32,
    pub binprm_interp: u32,
    pub file_f_path: u32,
    pub file_f_inode: u32,
    pub file_private_data: u32,
    pub path_mnt: u32,
    pub path_dentry: u32,
    pub dentry_d_parent: u32,
    pub dentry_d_name: u32,
    pub qstr_len: u32,
    pub qstr_name: u32,
    pub inode_i_ino: u32,
    pub inode_i_sb: u32,
    pub inode_i_mode: u32,
    pub inode_i_nlink: u32,
    pub inode_i_generation: u32,
    pub inode_i_size: u32,
    pub sb_s_dev: u32,
    pub vfsmount_mnt_root: u32,
    pub mount_mnt: u32,
    pub mount_mnt_parent: u32,
    pub mount_mnt_mountpoint: u32,
    pub fs_pwd: u32,
    pub fs_root: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub socket_sk: u32,
    pub sk_rcv_saddr: u32,
    pub sk_num: u32,
    pub sk_v6_rcv_saddr: u32,
    pub sk_type: u32,
    pub sk_protocol: u32,
    pub sk_family: u32,
    pub file_f_flags: u32,
    /// Non-zero once the agent filled the struct; programs emit nothing before.
    pub valid: u32,
}

impl KernelOffsets {
    /// All zero (not yet filled: `valid == 0`).
    pub const fn zeroed() -> Self {
        // SAFETY: a struct of u32s; all-zero is a valid value.
        unsafe { core::mem::zeroed() }
    }
}

/// Where io_uring keeps an open request's arguments, from BTF: read by the
/// io_uring submission program. Separate from [`KernelOffsets`] because
/// they are optional: a kernel without them (no io_uring, another layout)
/// leaves `valid` 0 and the program detached.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UringOffsets {
    /// `io_kiocb.opcode` (one byte).
    pub req_opcode: u32,
    /// `io_kiocb.cmd`: where the opcode's own arguments (`io_open`) live.
    pub req_cmd: u32,
    /// `io_open.dfd` (int).
    pub open_dfd: u32,
    /// `io_open.filename` (`struct filename *`).
    pub open_filename: u32,
    /// `io_open.how.flags` (u64).
    pub open_how_flags: u32,
    /// `filename.name`: the kernel's copy of the path.
    pub filename_name: u32,
    /// Non-zero once the agent filled the struct.
    pub valid: u32,
}

impl UringOffsets {
    /// All zero (not filled: `valid == 0`).
    pub const fn zeroed() -> Self {
        // SAFETY: a struct of u32s; all-zero is a valid value.
        unsafe { core::mem::zeroed() }
    }
}

/// io_uring's `IORING_OP_OPENAT` (stable ABI).
pub const IORING_OP_OPENAT: u8 = 18;
/// io_uring's `IORING_OP_OPENAT2` (stable ABI).
pub const IORING_OP_OPENAT2: u8 = 28;

/// Runtime settings the agent writes into the programs' read-only data.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SensorConfig {
    /// Process id of the agent itself: its own activity is not reported.
    pub agent_tgid: u32,
    /// Ring-buffer bytes pending before the kernel wakes the agent; below it
    /// records are submitted without a wakeup and the agent polls on a timer.
    /// 0 wakes on every record.
    pub wakeup_bytes: u32,
    /// `FREEZE_*` bits: which new programs the kernel stops (SIGSTOP) at
    /// exec, before their first instruction, for the agent to inspect.
    pub freeze_policy: u32,
    /// `FREEZE_*` bits: which execs the BPF LSM hook refuses (EPERM) before
    /// they happen. Where that hook cannot attach the agent adds these bits
    /// to `freeze_policy`, so the same execs are stopped instead.
    pub deny_policy: u32,
    /// Connects of one process to one destination (address, port, family,
    /// success or failure) are reported once per this many ns; the repeats
    /// in between are counted in [`STAT_CONNECT_DEDUP`]. 0 reports every
    /// connect.
    pub connect_dedup_ns: u64,
    /// 1 when containment may refuse connects: fork and exit then keep the
    /// `DENY_CONNECT` map (inherited by children, cleared at exit). 0 skips
    /// its look-ups on every fork and exit.
    pub deny_connect: u32,
    /// Zero.
    pub _reserved: u32,
}

/// Freeze policy: a shell or downloader (names in the `FREEZE_NAMES` map)
/// started by a process that listens on an IP socket.
pub const FREEZE_SERVER_CHILD: u32 = 1;
/// Freeze policy: a program executed from a memfd.
pub const FREEZE_MEMFD: u32 = 1 << 1;
/// Key length of the `FREEZE_NAMES` map (program base names, NUL padded).
pub const FREEZE_NAME_LEN: usize = 16;
/// The kernel freezes only while the agent's heartbeat (`ALIVE[0]`, boot
/// ns) is younger than this: a dead agent freezes nothing.
pub const HEARTBEAT_MAX_AGE_NS: u64 = 5_000_000_000;

impl SensorConfig {
    /// All zero.
    pub const fn zeroed() -> Self {
        Self {
            agent_tgid: 0,
            wakeup_bytes: 0,
            freeze_policy: 0,
            deny_policy: 0,
            connect_dedup_ns: 0,
            deny_connect: 0,
            _reserved: 0,
        }
    }
}

/// Slot layout of the per-CPU statistics array: `[kind * 2]` counts records
/// emitted, `[kind * 2 + 1]` records dropped because the ring buffer was
/// full; the slots from [`STAT_BASE_OTHER`] count the rest.
pub const STATS_SLOTS: u32 = 64;
/// First slot of the non-per-kind counters.
pub const STAT_BASE_OTHER: u32 = (EVENT_KIND_SLOTS as u32) * 2;
/// Syscall entries not tracked because the in-flight table was full.
pub const STAT_STASH_FULL: u32 = STAT_BASE_OTHER;
/// Records whose scratch buffer could not be had (should stay 0).
pub const STAT_NO_SCRATCH: u32 = STAT_BASE_OTHER + 1;
/// Highest ring-buffer fill seen by a program, in bytes (max, not a sum).
pub const STAT_RINGBUF_MAX_FILL: u32 = STAT_BASE_OTHER + 2;
/// File opens suppressed by the per-(process, inode) de-duplication.
pub const STAT_FILE_DEDUP: u32 = STAT_BASE_OTHER + 3;
/// Kernel reads that failed (a pointer could not be followed).
pub const STAT_READ_ERRORS: u32 = STAT_BASE_OTHER + 4;
/// Processes stopped at exec by the freeze policy.
pub const STAT_FROZEN: u32 = STAT_BASE_OTHER + 5;
/// Freezes skipped because the agent's heartbeat was stale.
pub const STAT_FREEZE_NO_AGENT: u32 = STAT_BASE_OTHER + 6;
/// Freezes refused because the ring buffer had no room for the record that
/// tells the agent (the process runs on, unfrozen).
pub const STAT_FREEZE_NO_ROOM: u32 = STAT_BASE_OTHER + 7;
/// Freezes refused because the frozen-process ledger (`FROZEN`) was full.
pub const STAT_FREEZE_NO_LEDGER: u32 = STAT_BASE_OTHER + 8;
/// Execs refused by the BPF LSM hook under the deny policy.
pub const STAT_EXEC_DENIED: u32 = STAT_BASE_OTHER + 9;
/// Connects not reported because the same process reported one to the
/// same destination within `SensorConfig::connect_dedup_ns`.
pub const STAT_CONNECT_DEDUP: u32 = STAT_BASE_OTHER + 10;
/// Exec-memory, ptrace-write and `process_vm_writev` records not reported
/// because the same process already reported that kind (and target).
pub const STAT_ONCE_DEDUP: u32 = STAT_BASE_OTHER + 11;
const _: () = assert!(STAT_ONCE_DEDUP < STATS_SLOTS);

/// Entries of the `FROZEN` map: at most this many processes stopped by the
/// kernel and not yet released by the agent.
pub const FROZEN_MAX_ENTRIES: u32 = 4096;

/// Value of the `FROZEN` map (key: tgid): one process the kernel stopped at
/// exec. Written by the program before its SIGSTOP, removed by the agent
/// when it lets the process go. The agent pins the map in bpffs, so the
/// record outlives an agent that dies: the next start (or `vigil-agent
/// resume-frozen`) releases what is left.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrozenEntry {
    /// The process's start time (ns since boot, `task->start_boottime`).
    pub start_boot_ns: u64,
    /// When it was stopped (ns since boot).
    pub frozen_boot_ns: u64,
}

/// Emitted-records stat slot for a kind.
pub const fn stat_emitted(kind: EventKind) -> u32 {
    kind as u32 * 2
}
/// Dropped-records stat slot for a kind.
pub const fn stat_dropped(kind: EventKind) -> u32 {
    kind as u32 * 2 + 1
}

/// Value of the per-(process, inode) de-duplication map's key.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FileKey {
    /// Process start time (with tgid: the process).
    pub start_boot_ns: u64,
    /// Inode number.
    pub ino: u64,
    /// Process id.
    pub tgid: u32,
    /// Device.
    pub dev: u32,
    /// The inode's generation (`i_generation`): an inode number freed and
    /// given to a new file comes back with another generation on the file
    /// systems that set it (ext4, xfs, btrfs, tmpfs).
    pub generation: u32,
    /// Low 32 bits of the inode's address: with the generation, tells a new
    /// file from an old one on file systems that leave the generation 0.
    pub inode_lo: u32,
}

/// Key of the connect de-duplication map: one process and one destination.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnectKey {
    /// Process start time (with tgid: the process).
    pub start_boot_ns: u64,
    /// Destination address (IPv4 in the first 4 bytes).
    pub daddr: [u8; 16],
    /// Process id.
    pub tgid: u32,
    /// Destination port (host order).
    pub dport: u16,
    /// Address family.
    pub family: u8,
    /// 1 when the connect failed (a failure does not hide a later success).
    pub failed: u8,
    /// IP protocol (TCP and UDP to one port are different destinations).
    pub protocol: u8,
    /// Zero (hash keys must not hold uninitialized padding).
    pub pad: [u8; 7],
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data structs of integers, no padding holes that matter.
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::UringOffsets {}
    unsafe impl aya::Pod for super::SensorConfig {}
    unsafe impl aya::Pod for super::FrozenEntry {}
}
