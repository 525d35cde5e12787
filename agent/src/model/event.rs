//! Typed, owned events: what the decoder makes of a ring-buffer record.
//!
//! These are the agent's internal currency between decode, the process tree
//! and the sinks. They carry only what the kernel reported; enrichment
//! (ancestry, workload) is added by the pipeline ([`super::EnrichedEvent`]).

use std::net::IpAddr;

use serde::Serialize;
pub use vigil_sensor_common::EventKind;

/// One kernel event, decoded.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    /// Nanoseconds since boot (CLOCK_BOOTTIME) when the kernel recorded it.
    pub boot_ns: u64,
    /// Thread that acted.
    pub tid: u32,
    /// Process the event is about (for fork: the new child).
    pub pid: u32,
    /// Real uid of the acting task.
    pub uid: u32,
    /// Real gid of the acting task.
    pub gid: u32,
    /// Start time of `pid` in ns since boot: `(pid, start_boot_ns)` names one process.
    pub start_boot_ns: u64,
    /// cgroup v2 id.
    pub cgroup_id: u64,
    /// Task comm.
    pub comm: String,
    /// What happened.
    #[serde(flatten)]
    pub payload: Payload,
}

impl Event {
    /// The kind of the payload.
    pub fn kind(&self) -> EventKind {
        match self.payload {
            Payload::Exec(_) => EventKind::Exec,
            Payload::Fork { .. } => EventKind::Fork,
            Payload::Exit { .. } => EventKind::Exit,
            Payload::Connect(_) => EventKind::Connect,
            Payload::FileOpen(_) => EventKind::FileOpen,
            Payload::Chmod(_) => EventKind::Chmod,
            Payload::Utimes(_) => EventKind::Utimes,
            Payload::Comm(_) => EventKind::Comm,
            Payload::Rename(_) => EventKind::Rename,
            Payload::Listen(_) => EventKind::Listen,
            Payload::ExecDenied(_) => EventKind::ExecDenied,
            Payload::ProcessAccess(_) => EventKind::ProcessAccess,
            Payload::ModuleLoad(_) => EventKind::ModuleLoad,
            Payload::BpfLoad(_) => EventKind::BpfLoad,
            Payload::ExecMem(_) => EventKind::ExecMem,
            Payload::Unlink(_) => EventKind::Unlink,
        }
    }
}

/// Per-kind data.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Payload {
    /// A process replaced its image.
    Exec(Exec),
    /// A new process was created.
    Fork {
        /// Its parent.
        ppid: u32,
    },
    /// The last thread of a process exited.
    Exit {
        /// Exit status (0-255) if it exited normally.
        #[serde(skip_serializing_if = "Option::is_none")]
        exit_code: Option<u8>,
        /// Signal number if a signal ended it.
        #[serde(skip_serializing_if = "Option::is_none")]
        signal: Option<u8>,
    },
    /// connect() on an IP socket.
    Connect(Connect),
    /// A regular file opened for writing (first time per process and file).
    FileOpen(FileOpen),
    /// Execute/setuid/setgid bits set on a file.
    Chmod(Chmod),
    /// A file's access/modification times set to given values.
    Utimes(Utimes),
    /// The process renamed itself (the event's `comm` is the old name).
    Comm(CommChange),
    /// A file renamed.
    Rename(Rename),
    /// A socket put in listening state: the process serves.
    Listen(Listen),
    /// The kernel refused an exec under the deny policy (BPF LSM); the
    /// process keeps its old image.
    ExecDenied(ExecDenied),
    /// The process acted on another's memory or execution (ptrace,
    /// process_vm_writev).
    ProcessAccess(ProcessAccess),
    /// A kernel module load was tried.
    ModuleLoad(ModuleLoad),
    /// A BPF program load was tried.
    BpfLoad(BpfLoad),
    /// Anonymous memory made executable (first time per process and call).
    ExecMem(ExecMem),
    /// A log or shell history unlinked (filtered in the kernel).
    Unlink(Unlink),
}

/// An unlinked file.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Unlink {
    /// The file (absolute when it could be resolved).
    pub path: String,
}

/// One process acting on another (ptrace, process_vm_writev).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProcessAccess {
    /// What was done: `attach`, `seize` (ptrace), `poke_text`,
    /// `poke_data`, `poke_user` (memory or user-area writes), `set_regs`,
    /// `set_fpregs`, `set_regset` (register writes), `vm_writev`
    /// (process_vm_writev).
    pub op: &'static str,
    /// The target as the caller named it (a pid in its pid namespace).
    pub target: u32,
    /// The target in the agent's pid namespace, when the caller shares it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_pid: Option<u32>,
    /// Result: 0 (or bytes written) or -errno.
    pub ret: i64,
    /// The address written (ptrace `addr`, the first remote iovec).
    pub addr: u64,
}

impl ProcessAccess {
    /// Whether the call writes the target's memory or registers (as
    /// opposed to attaching).
    pub fn writes(&self) -> bool {
        !matches!(self.op, "attach" | "seize")
    }
}

/// A kernel module load.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModuleLoad {
    /// The module file (`finit_module`); empty when loaded from memory.
    pub path: String,
    /// `init_module`: the image came from the caller's memory.
    pub from_memory: bool,
    /// `finit_module` flags.
    pub flags: u32,
    /// 0 or -errno.
    pub ret: i32,
}

/// A BPF program load.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BpfLoad {
    /// Program type (`kprobe`, `tracing`, `lsm`, `xdp`, ... or the number).
    pub prog_type: String,
    /// Expected attach type (number).
    pub attach_type: u32,
    /// The program's name as loaded (may be empty).
    pub name: String,
    /// Instruction count.
    pub insn_cnt: u32,
    /// The program's fd, or -errno.
    pub ret: i32,
}

impl BpfLoad {
    /// Program types that observe or change the kernel's own behaviour
    /// (tracing, LSM, syscall hooks), as opposed to networking or cgroup
    /// filters: what a BPF rootkit needs.
    pub fn instruments_kernel(&self) -> bool {
        matches!(
            self.prog_type.as_str(),
            "kprobe"
                | "tracepoint"
                | "perf_event"
                | "raw_tracepoint"
                | "raw_tracepoint_writable"
                | "tracing"
                | "lsm"
                | "ext"
                | "struct_ops"
        )
    }
}

/// Anonymous memory made executable.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExecMem {
    /// `mmap` (anonymous, PROT_EXEC) or `mprotect` (adding PROT_EXEC).
    pub op: &'static str,
    /// PROT_* bits asked for.
    pub prot: u32,
    /// `mmap` flags (0 for mprotect).
    pub map_flags: u32,
    /// The mapping's address.
    pub addr: u64,
    /// Its length.
    pub len: u64,
    /// 0 or -errno.
    pub ret: i32,
}

impl ExecMem {
    /// Writable and executable at once.
    pub fn writable(&self) -> bool {
        self.prot & 2 != 0
    }
}

/// An exec refused in the kernel.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExecDenied {
    /// Parent process.
    pub ppid: u32,
    /// Path of the program it tried to run (the interpreter for a script).
    pub exe: String,
    /// The path as given to execve.
    pub filename: String,
    /// The policy that refused it: "server_child" or "memfd".
    pub policy: &'static str,
    /// The program's inode number.
    pub exe_ino: u64,
    /// The program's device (kernel encoding).
    pub exe_dev: u32,
}

/// Listen details.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Listen {
    /// "tcp", "udp" or the protocol number.
    pub protocol: String,
    /// Local address.
    pub addr: IpAddr,
    /// Local port.
    pub port: u16,
    /// The process's command line when it differs from the one it was
    /// started with (checked at its first connect or listen): a program
    /// that rewrote its argv to pass for another.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewritten_argv: Option<Vec<String>>,
}

/// Exec details.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Exec {
    /// Parent process.
    pub ppid: u32,
    /// Effective uid after exec.
    pub euid: u32,
    /// Effective gid after exec.
    pub egid: u32,
    /// Path of the executable file, as seen from the process's mount namespace.
    pub exe: String,
    /// Arguments. The kernel's record holds 2 KiB; a longer command line is
    /// completed from /proc by the state stage while the process lives
    /// (at most 1,024 arguments and 32 KiB).
    pub argv: Vec<String>,
    /// argv was cut (the kernel's record and /proc could not give all of it).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub argv_truncated: bool,
    /// Executable inode number.
    pub exe_ino: u64,
    /// Executable device (kernel encoding).
    pub exe_dev: u32,
    /// Executable file size, from the kernel (0 when unknown); not in the
    /// JSON line.
    #[serde(skip)]
    pub exe_size: u64,
    /// Where the image's arguments start (`mm->arg_start`; 0 when unknown):
    /// what identifies this image in /proc; not in the JSON line.
    #[serde(skip)]
    pub arg_start: u64,
    /// The executable is a memfd.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub exe_memfd: bool,
    /// The executable has no links left (deleted or anonymous).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub exe_deleted: bool,
    /// For a `#!` script: the script path as given to execve (`exe` is then
    /// the interpreter). Relative paths are resolved against the process's
    /// cwd by the pipeline when it can.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    /// `LD_PRELOAD` of the new image, if set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ld_preload: Option<String>,
    /// The environment switches shell history off (`HISTFILE=/dev/null`,
    /// `HISTFILE=`, `HISTSIZE=0`, `HISTFILESIZE=0`), seen by the kernel's
    /// environment scan.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub history_off: bool,
    /// The system program this executable is a byte-for-byte copy of, when
    /// it runs under another name or from another place (a copied shell,
    /// a memfd holding curl): set by the state stage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_of: Option<String>,
    /// What fds 0, 1, 2 were at exec.
    pub stdio: [Stdio; 3],
    /// Which files fds 0, 1, 2 were at exec (not in the output: for the
    /// rules that join a pipeline's processes by their pipe, and tie a
    /// redirected output to the program that writes it).
    #[serde(skip)]
    pub stdio_ids: StdioIds,
    /// The kernel's environment scan stopped before the end (too many or
    /// too long variables): `ld_preload` is read from /proc instead.
    #[serde(skip)]
    pub env_truncated: bool,
    /// The kernel stopped the process at exec (freeze policy); the agent
    /// resumes it after inspection.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub frozen: bool,
}

impl Exec {
    /// What the program is, for classification: the system program it is
    /// a copy of, else its own path.
    pub fn identity(&self) -> &str {
        self.copy_of.as_deref().unwrap_or(&self.exe)
    }
}

/// The inodes and devices of fds 0, 1, 2 at exec (0: closed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StdioIds {
    /// Inode numbers (a pipe's inode names the pipe).
    pub ino: [u64; 3],
    /// Devices (kernel encoding).
    pub dev: [u32; 3],
}

impl StdioIds {
    /// (dev, ino) of fd `fd`, if open.
    pub fn file(&self, fd: usize) -> Option<(u32, u64)> {
        (self.ino[fd] != 0).then_some((self.dev[fd], self.ino[fd]))
    }
}

/// What a standard fd of a new process is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stdio {
    /// Not open.
    #[default]
    Closed,
    /// A regular file.
    File,
    /// A pipe or FIFO.
    Pipe,
    /// A character device (tty, /dev/null).
    CharDevice,
    /// A TCP/UDP socket over IPv4 or IPv6.
    InetSocket,
    /// A Unix domain socket.
    UnixSocket,
    /// Another socket family.
    OtherSocket,
    /// Anything else (directory, block device).
    Other,
}

impl Stdio {
    /// From `i_mode & S_IFMT` and the socket family.
    pub fn from_raw(mode: u16, family: u16) -> Self {
        match mode {
            0 => Self::Closed,
            0o100000 => Self::File,
            0o010000 => Self::Pipe,
            0o020000 => Self::CharDevice,
            0o140000 => match family {
                2 | 10 => Self::InetSocket,
                1 => Self::UnixSocket,
                _ => Self::OtherSocket,
            },
            _ => Self::Other,
        }
    }
}

/// Connect details.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Connect {
    /// "tcp", "udp" or the protocol number.
    pub protocol: String,
    /// Destination address.
    pub daddr: IpAddr,
    /// Destination port.
    pub dport: u16,
    /// Source address (unspecified if not bound yet).
    pub saddr: IpAddr,
    /// Source port (0 if not bound yet).
    pub sport: u16,
    /// connect() result: 0 or -errno (-115, EINPROGRESS, is a normal
    /// start). Absent when the connect was reported as it was attempted
    /// (the BPF LSM hook), before it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ret: Option<i32>,
    /// Not a connect: a datagram sent to this address on an unconnected
    /// socket (`sendto`, `sendmsg`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub send_to: bool,
    /// See [`Listen::rewritten_argv`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewritten_argv: Option<Vec<String>>,
}

/// File-open details.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FileOpen {
    /// Absolute path in the process's mount namespace.
    pub path: String,
    /// open(2) flags.
    pub flags: u32,
    /// File mode bits after the open.
    pub mode: u32,
    /// Inode number.
    pub ino: u64,
    /// Device (kernel encoding).
    pub dev: u32,
    /// Submitted through io_uring and seen before it ran (kernels without
    /// BPF LSM): `mode`, `ino` and `dev` are what the agent found at the
    /// path just after (0 when nothing was there).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub io_uring: bool,
}

/// A process's new name.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CommChange {
    /// The new name.
    pub new_comm: String,
    /// Its command line just after (read from /proc; empty when it was
    /// gone): a program that renames itself often rewrites argv too.
    pub argv: Vec<String>,
}

/// Utimes details.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Utimes {
    /// The file (absolute).
    pub path: String,
}

/// Chmod details.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Chmod {
    /// Path of the file (absolute when it could be resolved).
    pub path: String,
    /// New mode.
    pub mode: u32,
}

/// Rename details.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Rename {
    /// Old path (absolute when it could be resolved).
    pub old_path: String,
    /// New path (absolute when it could be resolved).
    pub new_path: String,
}
