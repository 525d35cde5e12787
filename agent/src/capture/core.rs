//! An ELF core file (ET_CORE, x86_64) of a stopped process, in the layout
//! the kernel's own core dumps use, so `gdb -c` and `readelf` read it:
//!
//! - `PT_NOTE`: `NT_PRPSINFO`; per thread (the thread-group leader first)
//!   `NT_PRSTATUS` (general registers) then `NT_FPREGSET`; `NT_AUXV`
//!   (/proc/PID/auxv); `NT_FILE` (file-backed mappings).
//! - one `PT_LOAD` per mapping (`p_vaddr`, `p_memsz` = the mapping), with the
//!   bytes read through process_vm_readv. A mapping not dumped (not readable,
//!   `[vvar]`, device I/O, over a cap) keeps its `PT_LOAD` with `p_filesz`
//!   0, a truncated one has `p_filesz < p_memsz`, as gdb expects; every such
//!   region and every unreadable page range (written as zeros) is in the
//!   [`CoreReport`].
//!
//! Registers come from ptrace: `PTRACE_SEIZE` + `PTRACE_INTERRUPT` on each
//! thread, `PTRACE_GETREGS`/`GETFPREGS`, `PTRACE_DETACH`. A thread that is
//! in group-stop (the process was SIGSTOPped) stays stopped after the detach.
//! When ptrace is refused (the process is already traced, e.g. by itself as
//! an anti-debugging trick) the stack and instruction pointers come from
//! /proc/PID/task/TID/syscall and the report says so.
//!
//! Budget: the process's own data first (anonymous, heap, stacks), then
//! writable or deleted/memfd file mappings, then read-only mappings of files
//! still on disk (which can be read again from the file); the file is
//! written in address order.

use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};
use std::time::Instant;

use object::elf;
use object::write::elf::{FileHeader, ProgramHeader, Writer};
use object::write::StreamingBuffer;
use object::Endianness;
use procfs::process::{MMPermissions, MMapPath, MemoryMap, Process, VmFlags};
use serde::{Deserialize, Serialize};

use super::bundle::HashingWriter;
use super::procutil::{self, StatLine};

/// Size caps and what to leave out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CoreOptions {
    /// Cap on the bytes of memory in the file (sum of `p_filesz`).
    pub max_total_bytes: u64,
    /// Cap on the bytes of one mapping; the rest is recorded as truncated.
    pub max_segment_bytes: u64,
    /// Leave out read-only mappings of files still on disk (program text,
    /// libraries): they can be read from the files. Deleted files and memfds
    /// are always dumped.
    pub skip_file_backed_readonly: bool,
}

impl Default for CoreOptions {
    fn default() -> Self {
        CoreOptions {
            max_total_bytes: 1 << 30,
            max_segment_bytes: 512 << 20,
            skip_file_backed_readonly: false,
        }
    }
}

/// Core file failures (a partial capture is not one: it is reported).
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// Reading /proc for the process.
    #[error("reading /proc/{pid}: {source}")]
    Proc {
        /// The pid.
        pid: i32,
        /// The procfs error.
        source: procfs::ProcError,
    },
    /// The process is gone (nothing to dump).
    #[error("process {pid} is gone")]
    Gone {
        /// The pid.
        pid: i32,
    },
    /// Writing the core file.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Building the ELF.
    #[error("building the ELF core: {0}")]
    Elf(String),
}

/// What happened to one mapping.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RegionAction {
    /// All bytes in the file.
    Dumped,
    /// The first `file_bytes` in the file (`p_filesz < p_memsz`).
    Truncated,
    /// No bytes (`p_filesz` 0, or no `PT_LOAD` for `too_many_mappings`).
    Skipped,
}

/// Why a mapping was truncated or skipped.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// No read permission (guard pages, reservations).
    NotReadable,
    /// `[vvar]`/`[vvar_vclock]`: kernel data, may fault on read.
    Vvar,
    /// `[vsyscall]`.
    Vsyscall,
    /// `VM_IO` (device memory): reading can have side effects.
    IoMapping,
    /// `skip_file_backed_readonly`.
    FileBackedReadonly,
    /// `max_segment_bytes`.
    SegmentCap,
    /// `max_total_bytes`.
    TotalCap,
    /// More mappings than ELF program headers can hold.
    TooManyMappings,
}

/// One mapping in the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegionReport {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// `rwxp` as in maps.
    pub perms: String,
    /// Backing file or pseudo-path (`[heap]`, ...), empty when anonymous.
    pub path: String,
    /// Dumped, truncated or skipped.
    pub action: RegionAction,
    /// Bytes in the file.
    pub file_bytes: u64,
    /// Why not all of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<SkipReason>,
}

/// A range that was planned but could not be read (zeros in the file).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnreadableRange {
    /// Start address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// The error of the first failing read.
    pub error: String,
}

/// Per thread: whether its registers are in the core.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ThreadReport {
    /// Thread id.
    pub tid: i32,
    /// `full` (ptrace), `sp_pc_only` (from /proc/.../syscall), `none`.
    pub registers: String,
    /// The ptrace error when not `full`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// State letter (after the dump: should still be `T`).
    pub state_after: char,
}

/// What went into the core file and what did not.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CoreReport {
    /// Process id.
    pub pid: i32,
    /// File size in bytes.
    pub size: u64,
    /// sha256 of the file.
    pub sha256: String,
    /// Threads and their registers.
    pub threads: Vec<ThreadReport>,
    /// Every mapping, in address order.
    pub regions: Vec<RegionReport>,
    /// Bytes of memory in the file.
    pub dumped_bytes: u64,
    /// Bytes of mappings not in the file (skipped or truncated).
    pub left_out_bytes: u64,
    /// Planned ranges that could not be read (zeros in the file), coalesced.
    pub unreadable: Vec<UnreadableRange>,
    /// Unreadable ranges not listed because the list was full.
    pub unreadable_not_listed: u64,
    /// Notes written.
    pub notes: Vec<String>,
    /// Time to get the registers (µs).
    pub registers_us: u64,
    /// Time to write the whole file (µs).
    pub elapsed_us: u64,
}

const MAX_UNREADABLE_LISTED: usize = 4096;
const MAX_LOADS: usize = 65_000;
const READ_CHUNK: usize = 4 << 20;
const NT_FILE: u32 = 0x4649_4c45;
const PRSTATUS_SIZE: usize = 336;
const PRPSINFO_SIZE: usize = 136;

/// Writes the core of `pid` (stopped, see [`super::freeze`]) to `out`.
pub fn write_core(pid: i32, out: &Path, opts: &CoreOptions) -> Result<CoreReport, CoreError> {
    let t0 = Instant::now();
    let proc_ = Process::new(pid).map_err(|source| CoreError::Proc { pid, source })?;
    let stat = StatLine::read(Path::new(&format!("/proc/{pid}/stat")))
        .map_err(|_| CoreError::Gone { pid })?;
    if stat.state() == 'Z' || stat.state() == 'X' {
        return Err(CoreError::Gone { pid });
    }

    // Registers first: the thread list is fixed while the process is stopped.
    let mut tids = procutil::thread_ids(pid).map_err(|_| CoreError::Gone { pid })?;
    tids.sort_by_key(|&t| (t != pid, t));
    let threads: Vec<ThreadRegs> = tids.iter().map(|&tid| thread_regs(pid, tid)).collect();
    let registers_us = t0.elapsed().as_micros() as u64;

    let maps = proc_
        .smaps()
        .map_err(|source| CoreError::Proc { pid, source })?;
    let page = procutil::page_size();
    let (plan, regions) = plan_regions(&maps.0, opts, page);

    let auxv = std::fs::read(format!("/proc/{pid}/auxv")).unwrap_or_default();
    let (notes, note_names) = build_notes(pid, &stat, &threads, &auxv, &maps.0, page);

    // Lay out, then stream.
    let file = vigil_bundle::private::create_new(out).map_err(|source| CoreError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    let raw_fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    let mut buf = StreamingBuffer::new(HashingWriter::new(BufWriter::with_capacity(1 << 20, file)));
    let mut unreadable = Unreadable::default();
    let mut dumped_bytes = 0;
    {
        let mut w = Writer::new(Endianness::Little, true, &mut buf);
        w.reserve_file_header();
        w.reserve_program_headers(1 + plan.len() as u32);
        let note_off = w.reserve(notes.len(), 4);
        let offsets: Vec<usize> = plan
            .iter()
            .map(|p| {
                if p.filesz > 0 {
                    w.reserve(p.filesz as usize, page as usize)
                } else {
                    w.reserve(0, 1)
                }
            })
            .collect();
        // The size is known: allocate it at once (fewer, larger extents; a
        // full disk fails here, before any memory is read). Not supported
        // (e.g. /dev/null, tmpfs before 3.5): go on without.
        // SAFETY: fallocate on the fd `buf` owns, which is open.
        if unsafe { libc::fallocate(raw_fd, 0, 0, w.reserved_len() as libc::off_t) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOSPC) {
                return Err(CoreError::Write {
                    path: out.to_path_buf(),
                    source: e,
                });
            }
        }
        w.write_file_header(&FileHeader {
            os_abi: elf::ELFOSABI_NONE,
            abi_version: 0,
            e_type: elf::ET_CORE,
            e_machine: elf::EM_X86_64,
            e_entry: 0,
            e_flags: 0,
        })
        .map_err(|e| CoreError::Elf(e.to_string()))?;
        w.write_align_program_headers();
        w.write_program_header(&ProgramHeader {
            p_type: elf::PT_NOTE,
            p_flags: 0,
            p_offset: note_off as u64,
            p_vaddr: 0,
            p_paddr: 0,
            p_filesz: notes.len() as u64,
            p_memsz: 0,
            p_align: 4,
        });
        for (p, &off) in plan.iter().zip(&offsets) {
            w.write_program_header(&ProgramHeader {
                p_type: elf::PT_LOAD,
                p_flags: p.flags,
                p_offset: off as u64,
                p_vaddr: p.start,
                p_paddr: 0,
                p_filesz: p.filesz,
                p_memsz: p.end - p.start,
                p_align: page,
            });
        }
        w.write_align(4);
        w.write(&notes);
        let mut chunk = vec![0u8; READ_CHUNK];
        for (p, &off) in plan.iter().zip(&offsets) {
            if p.filesz == 0 {
                continue;
            }
            w.pad_until(off);
            copy_memory(
                pid,
                p.start,
                p.filesz,
                page,
                &mut chunk,
                &mut unreadable,
                |b| w.write(b),
            );
            dumped_bytes += p.filesz;
        }
    }
    let werr = |source| CoreError::Write {
        path: out.to_path_buf(),
        source,
    };
    buf.flush().map_err(werr)?;
    let hw = buf.into_inner();
    let (sha256, size, inner) = hw.finish();
    inner.into_inner().map_err(|e| werr(e.into_error()))?;

    // Regions whose reads failed stay "dumped" (as zeros): the unreadable
    // list says which bytes are zeros for that reason.
    let left_out_bytes = regions
        .iter()
        .map(|r| (r.end - r.start) - r.file_bytes)
        .sum();
    let threads = threads
        .into_iter()
        .map(|t| ThreadReport {
            tid: t.tid,
            registers: t.kind.to_string(),
            error: t.error,
            state_after: StatLine::read(Path::new(&format!("/proc/{pid}/task/{}/stat", t.tid)))
                .map(|s| s.state())
                .unwrap_or('?'),
        })
        .collect();
    Ok(CoreReport {
        pid,
        size,
        sha256,
        threads,
        regions,
        dumped_bytes,
        left_out_bytes,
        unreadable: unreadable.ranges,
        unreadable_not_listed: unreadable.not_listed,
        notes: note_names,
        registers_us,
        elapsed_us: t0.elapsed().as_micros() as u64,
    })
}

/// One `PT_LOAD`.
struct PlannedLoad {
    start: u64,
    end: u64,
    flags: u32,
    filesz: u64,
}

fn perms_string(p: &MMPermissions) -> String {
    let mut s = String::with_capacity(4);
    s.push(if p.contains(MMPermissions::READ) {
        'r'
    } else {
        '-'
    });
    s.push(if p.contains(MMPermissions::WRITE) {
        'w'
    } else {
        '-'
    });
    s.push(if p.contains(MMPermissions::EXECUTE) {
        'x'
    } else {
        '-'
    });
    s.push(if p.contains(MMPermissions::SHARED) {
        's'
    } else {
        'p'
    });
    s
}

pub(crate) fn path_string(p: &MMapPath) -> String {
    match p {
        MMapPath::Path(p) => p.to_string_lossy().into_owned(),
        MMapPath::Heap => "[heap]".into(),
        MMapPath::Stack => "[stack]".into(),
        MMapPath::TStack(t) => format!("[stack:{t}]"),
        MMapPath::Vdso => "[vdso]".into(),
        MMapPath::Vvar => "[vvar]".into(),
        MMapPath::Vsyscall => "[vsyscall]".into(),
        MMapPath::Rollup => "[rollup]".into(),
        MMapPath::Anonymous => String::new(),
        MMapPath::Vsys(k) => format!("/SYSV{k:08x}"),
        MMapPath::Other(s) => format!("[{s}]"),
    }
}

/// A file on disk, not deleted, not a memfd: its pages can be read again.
fn is_recoverable_file(p: &MMapPath) -> bool {
    match p {
        MMapPath::Path(p) => {
            let s = p.to_string_lossy();
            !s.ends_with(" (deleted)") && !s.starts_with("/memfd:") && !s.starts_with("/dev/")
        }
        _ => false,
    }
}

/// Decides each mapping's `p_filesz` under the caps.
fn plan_regions(
    maps: &[MemoryMap],
    opts: &CoreOptions,
    page: u64,
) -> (Vec<PlannedLoad>, Vec<RegionReport>) {
    let round = |n: u64| n / page * page;
    let max_seg = round(opts.max_segment_bytes);
    let mut reports: Vec<RegionReport> = maps
        .iter()
        .map(|m| RegionReport {
            start: m.address.0,
            end: m.address.1,
            perms: perms_string(&m.perms),
            path: path_string(&m.pathname),
            action: RegionAction::Skipped,
            file_bytes: 0,
            reason: None,
        })
        .collect();
    // Static exclusions.
    let mut want: Vec<u64> = vec![0; maps.len()];
    for (i, m) in maps.iter().enumerate() {
        let size = m.address.1 - m.address.0;
        let name = path_string(&m.pathname);
        let reason = if matches!(m.pathname, MMapPath::Vsyscall) {
            Some(SkipReason::Vsyscall)
        } else if matches!(m.pathname, MMapPath::Vvar) || name.starts_with("[vvar") {
            Some(SkipReason::Vvar)
        } else if !m.perms.contains(MMPermissions::READ) {
            Some(SkipReason::NotReadable)
        } else if m.extension.vm_flags.contains(VmFlags::IO) {
            Some(SkipReason::IoMapping)
        } else if opts.skip_file_backed_readonly
            && !m.perms.contains(MMPermissions::WRITE)
            && is_recoverable_file(&m.pathname)
        {
            Some(SkipReason::FileBackedReadonly)
        } else {
            None
        };
        match reason {
            Some(r) => reports[i].reason = Some(r),
            None => {
                want[i] = size.min(max_seg);
                if want[i] < size {
                    reports[i].reason = Some(SkipReason::SegmentCap);
                }
            }
        }
    }
    // Budget by priority class, address order within a class.
    let class = |m: &MemoryMap| match &m.pathname {
        MMapPath::Path(_) if !is_recoverable_file(&m.pathname) => 1,
        MMapPath::Path(_) if m.perms.contains(MMPermissions::WRITE) => 1,
        MMapPath::Path(_) => 2,
        _ => 0,
    };
    let mut order: Vec<usize> = (0..maps.len()).collect();
    order.sort_by_key(|&i| (class(&maps[i]), i));
    let mut budget = round(opts.max_total_bytes);
    for i in order {
        if want[i] == 0 {
            continue;
        }
        if want[i] > budget {
            want[i] = budget;
            reports[i].reason = Some(SkipReason::TotalCap);
        }
        budget -= want[i];
    }
    let mut plan = Vec::with_capacity(maps.len().min(MAX_LOADS));
    for (i, m) in maps.iter().enumerate() {
        let r = &mut reports[i];
        if plan.len() >= MAX_LOADS {
            r.reason = Some(SkipReason::TooManyMappings);
            continue;
        }
        let size = r.end - r.start;
        r.file_bytes = want[i];
        r.action = if want[i] == size {
            RegionAction::Dumped
        } else if want[i] > 0 {
            RegionAction::Truncated
        } else {
            RegionAction::Skipped
        };
        // vsyscall is not a mapping of the process (gdb knows it): no PT_LOAD.
        if r.reason == Some(SkipReason::Vsyscall) {
            continue;
        }
        let mut flags = 0;
        if m.perms.contains(MMPermissions::READ) {
            flags |= elf::PF_R;
        }
        if m.perms.contains(MMPermissions::WRITE) {
            flags |= elf::PF_W;
        }
        if m.perms.contains(MMPermissions::EXECUTE) {
            flags |= elf::PF_X;
        }
        plan.push(PlannedLoad {
            start: r.start,
            end: r.end,
            flags,
            filesz: want[i],
        });
    }
    (plan, reports)
}

#[derive(Default)]
struct Unreadable {
    ranges: Vec<UnreadableRange>,
    not_listed: u64,
}

impl Unreadable {
    fn add(&mut self, start: u64, len: u64, error: &io::Error) {
        if let Some(last) = self.ranges.last_mut() {
            if last.start + last.len == start {
                last.len += len;
                return;
            }
        }
        if self.ranges.len() >= MAX_UNREADABLE_LISTED {
            self.not_listed += 1;
            return;
        }
        self.ranges.push(UnreadableRange {
            start,
            len,
            error: error.to_string(),
        });
    }
}

/// Reads `len` bytes at `addr` of `pid` and hands them to `sink` in order;
/// pages that cannot be read are handed over as zeros and recorded.
fn copy_memory(
    pid: i32,
    addr: u64,
    len: u64,
    page: u64,
    chunk: &mut [u8],
    unreadable: &mut Unreadable,
    mut sink: impl FnMut(&[u8]),
) {
    let end = addr + len;
    let mut pos = addr;
    while pos < end {
        let n = ((end - pos) as usize).min(chunk.len());
        match vm_read(pid, pos, &mut chunk[..n]) {
            Ok(k) if k > 0 => {
                sink(&chunk[..k]);
                pos += k as u64;
            }
            r => {
                let e = match r {
                    Err(e) => e,
                    Ok(_) => io::Error::from_raw_os_error(libc::EFAULT),
                };
                // The page at `pos` failed: zeros, then go on.
                let skip = (page - pos % page).min(end - pos);
                chunk[..skip as usize].fill(0);
                sink(&chunk[..skip as usize]);
                unreadable.add(pos, skip, &e);
                pos += skip;
            }
        }
    }
}

fn vm_read(pid: i32, addr: u64, buf: &mut [u8]) -> io::Result<usize> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes `buf`, which we own mutably; `remote` is in
    // the other process and only read by the kernel.
    let r = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RegsKind {
    Full,
    SpPcOnly,
    None,
}

impl std::fmt::Display for RegsKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RegsKind::Full => "full",
            RegsKind::SpPcOnly => "sp_pc_only",
            RegsKind::None => "none",
        })
    }
}

struct ThreadRegs {
    tid: i32,
    kind: RegsKind,
    regs: libc::user_regs_struct,
    fpregs: Option<libc::user_fpregs_struct>,
    stat: Option<StatLine>,
    error: Option<String>,
}

fn zero_regs() -> libc::user_regs_struct {
    // SAFETY: a plain struct of integers; all-zero is valid.
    unsafe { std::mem::zeroed() }
}

fn thread_regs(pid: i32, tid: i32) -> ThreadRegs {
    let stat = StatLine::read(Path::new(&format!("/proc/{pid}/task/{tid}/stat"))).ok();
    match ptrace_regs(tid) {
        Ok((regs, fpregs)) => ThreadRegs {
            tid,
            kind: RegsKind::Full,
            regs,
            fpregs,
            stat,
            error: None,
        },
        Err(e) => {
            let mut regs = zero_regs();
            let mut kind = RegsKind::None;
            // "nr a1..a6 sp pc" in a syscall, "-1 sp pc" blocked elsewhere.
            if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")) {
                let f: Vec<&str> = s.split_whitespace().collect();
                let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
                if f.len() >= 3 {
                    if let (Some(sp), Some(pc)) = (hex(f[f.len() - 2]), hex(f[f.len() - 1])) {
                        regs.rsp = sp;
                        regs.rip = pc;
                        regs.orig_rax = f[0].parse::<i64>().unwrap_or(-1) as u64;
                        kind = RegsKind::SpPcOnly;
                    }
                }
            }
            ThreadRegs {
                tid,
                kind,
                regs,
                fpregs: None,
                stat,
                error: Some(e),
            }
        }
    }
}

/// Seize, interrupt, read the registers, detach. The thread, when in
/// group-stop, goes back to it on detach.
fn ptrace_regs(
    tid: i32,
) -> Result<(libc::user_regs_struct, Option<libc::user_fpregs_struct>), String> {
    use nix::sys::ptrace;
    use nix::sys::wait::{waitpid, WaitPidFlag};
    use nix::unistd::Pid;
    let p = Pid::from_raw(tid);
    ptrace::seize(p, ptrace::Options::empty()).map_err(|e| format!("PTRACE_SEIZE: {e}"))?;
    let result = (|| {
        ptrace::interrupt(p).map_err(|e| format!("PTRACE_INTERRUPT: {e}"))?;
        // Attaching to a stopped task traps it at once; otherwise wait for
        // the interrupt to take (bounded).
        let t0 = Instant::now();
        let regs = loop {
            match ptrace::getregs(p) {
                Ok(r) => break r,
                Err(nix::errno::Errno::ESRCH)
                    if t0.elapsed() < std::time::Duration::from_millis(500) =>
                {
                    let _ = waitpid(p, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG));
                    std::thread::sleep(std::time::Duration::from_micros(100));
                }
                Err(e) => return Err(format!("PTRACE_GETREGS: {e}")),
            }
        };
        // SAFETY: a plain struct of integers; all-zero is valid.
        let mut fp: libc::user_fpregs_struct = unsafe { std::mem::zeroed() };
        // SAFETY: PTRACE_GETFPREGS writes one user_fpregs_struct to `fp`.
        let r = unsafe {
            libc::ptrace(
                libc::PTRACE_GETFPREGS,
                tid,
                std::ptr::null_mut::<libc::c_void>(),
                &mut fp as *mut libc::user_fpregs_struct,
            )
        };
        Ok((regs, (r == 0).then_some(fp)))
    })();
    let _ = ptrace::detach(p, None);
    result
}

fn note(out: &mut Vec<u8>, name: &[u8], ty: u32, desc: &[u8]) {
    let pad4 = |v: &mut Vec<u8>| {
        while !v.len().is_multiple_of(4) {
            v.push(0);
        }
    };
    out.extend_from_slice(&((name.len() + 1) as u32).to_le_bytes());
    out.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    out.extend_from_slice(&ty.to_le_bytes());
    out.extend_from_slice(name);
    out.push(0);
    pad4(out);
    out.extend_from_slice(desc);
    pad4(out);
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// `struct elf_prstatus` (x86_64, 336 bytes).
fn prstatus(t: &ThreadRegs, ticks: u64) -> Vec<u8> {
    let mut b = vec![0u8; PRSTATUS_SIZE];
    put32(&mut b, 0, libc::SIGSTOP as u32); // pr_info.si_signo
    b[12..14].copy_from_slice(&(libc::SIGSTOP as u16).to_le_bytes()); // pr_cursig
    if let Some(st) = &t.stat {
        // pr_pid, pr_ppid, pr_pgrp, pr_sid
        put32(&mut b, 32, t.tid as u32);
        put32(&mut b, 36, st.num(4) as u32);
        put32(&mut b, 40, st.num(5) as u32);
        put32(&mut b, 44, st.num(6) as u32);
        // pr_utime, pr_stime, pr_cutime, pr_cstime as timevals.
        for (i, field) in [14, 15, 16, 17].into_iter().enumerate() {
            let t = st.num(field).max(0) as u64;
            put64(&mut b, 48 + i * 16, t / ticks);
            put64(&mut b, 56 + i * 16, (t % ticks) * 1_000_000 / ticks);
        }
    } else {
        put32(&mut b, 32, t.tid as u32);
    }
    let r = &t.regs;
    let regs = [
        r.r15, r.r14, r.r13, r.r12, r.rbp, r.rbx, r.r11, r.r10, r.r9, r.r8, r.rax, r.rcx, r.rdx,
        r.rsi, r.rdi, r.orig_rax, r.rip, r.cs, r.eflags, r.rsp, r.ss, r.fs_base, r.gs_base, r.ds,
        r.es, r.fs, r.gs,
    ];
    for (i, v) in regs.into_iter().enumerate() {
        put64(&mut b, 112 + i * 8, v);
    }
    put32(&mut b, 328, t.fpregs.is_some() as u32); // pr_fpvalid
    b
}

/// `struct elf_prpsinfo` (x86_64, 136 bytes).
fn prpsinfo(pid: i32, st: &StatLine) -> Vec<u8> {
    let mut b = vec![0u8; PRPSINFO_SIZE];
    let sname = st.state();
    b[0] = "RSDTZW".find(sname).unwrap_or(0) as u8; // pr_state
    b[1] = sname as u8; // pr_sname
    b[2] = (sname == 'Z') as u8; // pr_zomb
    b[3] = st.num(19) as i8 as u8; // pr_nice
    put64(&mut b, 8, st.num(9) as u64); // pr_flag
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let id = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    };
    put32(&mut b, 16, id("Uid:"));
    put32(&mut b, 20, id("Gid:"));
    put32(&mut b, 24, pid as u32);
    put32(&mut b, 28, st.num(4) as u32);
    put32(&mut b, 32, st.num(5) as u32);
    put32(&mut b, 36, st.num(6) as u32);
    let comm = st.comm.as_bytes();
    let n = comm.len().min(15);
    b[40..40 + n].copy_from_slice(&comm[..n]);
    let (args, _) =
        procutil::read_capped(Path::new(&format!("/proc/{pid}/cmdline")), 79).unwrap_or_default();
    let mut args: Vec<u8> = args
        .into_iter()
        .map(|c| if c == 0 { b' ' } else { c })
        .collect();
    while args.last() == Some(&b' ') {
        args.pop();
    }
    b[56..56 + args.len()].copy_from_slice(&args);
    b
}

/// `NT_FILE`: count, page size, (start, end, file offset in pages)*, names.
fn nt_file(maps: &[MemoryMap], page: u64) -> Vec<u8> {
    let files: Vec<&MemoryMap> = maps
        .iter()
        .filter(|m| matches!(m.pathname, MMapPath::Path(_)))
        .collect();
    let mut b = Vec::new();
    b.extend_from_slice(&(files.len() as u64).to_le_bytes());
    b.extend_from_slice(&page.to_le_bytes());
    for m in &files {
        b.extend_from_slice(&m.address.0.to_le_bytes());
        b.extend_from_slice(&m.address.1.to_le_bytes());
        b.extend_from_slice(&(m.offset / page).to_le_bytes());
    }
    for m in &files {
        if let MMapPath::Path(p) = &m.pathname {
            use std::os::unix::ffi::OsStrExt;
            b.extend_from_slice(p.as_os_str().as_bytes());
            b.push(0);
        }
    }
    b
}

fn build_notes(
    pid: i32,
    stat: &StatLine,
    threads: &[ThreadRegs],
    auxv: &[u8],
    maps: &[MemoryMap],
    page: u64,
) -> (Vec<u8>, Vec<String>) {
    let ticks = procutil::ticks_per_sec();
    let mut notes = Vec::new();
    let mut names = vec!["NT_PRPSINFO".to_string()];
    note(&mut notes, b"CORE", elf::NT_PRPSINFO, &prpsinfo(pid, stat));
    for t in threads {
        note(&mut notes, b"CORE", elf::NT_PRSTATUS, &prstatus(t, ticks));
        if let Some(fp) = &t.fpregs {
            // SAFETY: user_fpregs_struct is plain integers, no padding (512 bytes).
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    (fp as *const libc::user_fpregs_struct).cast::<u8>(),
                    std::mem::size_of::<libc::user_fpregs_struct>(),
                )
            };
            note(&mut notes, b"CORE", elf::NT_PRFPREG, bytes);
        }
    }
    names.push(format!("NT_PRSTATUS x{}", threads.len()));
    let nfp = threads.iter().filter(|t| t.fpregs.is_some()).count();
    if nfp > 0 {
        names.push(format!("NT_FPREGSET x{nfp}"));
    }
    if !auxv.is_empty() {
        note(&mut notes, b"CORE", elf::NT_AUXV, auxv);
        names.push("NT_AUXV".into());
    }
    note(&mut notes, b"CORE", NT_FILE, &nt_file(maps, page));
    names.push("NT_FILE".into());
    (notes, names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::freeze::{FreezeOptions, Freezer};
    use crate::capture::testutil::{spawn_sleeper, thread_states, CHILD_HEAP_MARKER};
    use object::read::elf::{ElfFile64, ProgramHeader as _};
    use object::Object;
    use std::process::Command;

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn capture_core_gdb_readelf_registers_mappings_string() {
        let dir = tempfile::tempdir().unwrap();
        let freezer = Freezer::new(dir.path(), FreezeOptions::default()).unwrap();
        let child = spawn_sleeper(3, "COREGDB");
        let pid = child.id() as i32;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        let frozen = freezer.freeze(pid).unwrap();
        let core = dir.path().join("core");
        let report = write_core(pid, &core, &CoreOptions::default()).unwrap();
        // Still stopped after ptrace detach.
        assert!(thread_states(pid).iter().all(|s| *s == 'T'));
        assert!(report.threads.iter().all(|t| t.state_after == 'T'));
        let nthreads = thread_states(pid).len();
        assert!(nthreads >= 4);
        assert_eq!(report.threads.len(), nthreads, "{:?}", report.threads);
        assert!(report.threads.iter().all(|t| t.registers == "full"));
        assert_eq!(report.threads[0].tid, pid);
        assert!(report.dumped_bytes > 0);
        assert!(report
            .regions
            .iter()
            .any(|r| r.reason == Some(SkipReason::Vvar)));
        assert_eq!(std::fs::metadata(&core).unwrap().len(), report.size);

        let bytes = std::fs::read(&core).unwrap();
        assert!(contains(&bytes, CHILD_HEAP_MARKER.as_bytes()));
        assert!(contains(&bytes, b"VIGIL_TEST_MARKER=COREGDB"));
        // Our own parse: header and loads.
        let elf = ElfFile64::<object::LittleEndian>::parse(&bytes[..]).unwrap();
        assert_eq!(elf.kind(), object::ObjectKind::Core);
        let loads = elf
            .elf_program_headers()
            .iter()
            .filter(|p| p.p_type(object::LittleEndian) == elf::PT_LOAD)
            .count();
        assert!(loads > 10);

        let out = Command::new("readelf")
            .arg("-n")
            .arg(&core)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        for n in [
            "NT_PRPSINFO",
            "NT_PRSTATUS",
            "NT_AUXV",
            "NT_FILE",
            "NT_FPREGSET",
        ] {
            assert!(text.contains(n), "readelf -n lacks {n}:\n{text}");
        }
        assert_eq!(text.matches("NT_PRSTATUS").count(), nthreads);

        // Where the marker is in memory, from the core's own layout.
        let e = object::LittleEndian;
        let file_off = bytes
            .windows(CHILD_HEAP_MARKER.len())
            .position(|w| w == CHILD_HEAP_MARKER.as_bytes())
            .unwrap() as u64;
        let addr = elf
            .elf_program_headers()
            .iter()
            .find(|p| {
                p.p_type(e) == elf::PT_LOAD
                    && (p.p_offset(e)..p.p_offset(e) + p.p_filesz(e)).contains(&file_off)
            })
            .map(|p| p.p_vaddr(e) + file_off - p.p_offset(e))
            .expect("marker inside a PT_LOAD");
        let out = Command::new("gdb")
            .args(["-batch", "-nx", "-c"])
            .arg(&core)
            .arg(&exe)
            .args([
                "-ex",
                "info registers rip",
                "-ex",
                "info threads",
                "-ex",
                "info proc mappings",
                "-ex",
            ])
            .arg(format!("x/s {addr:#x}"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(text.contains("rip            0x"), "{text}");
        assert!(!text.contains("rip            0x0 "), "{text}");
        assert!(text.contains("Start Addr"), "{text}");
        assert!(
            text.contains("[heap]") || text.contains(&exe.to_string_lossy().to_string()),
            "{text}"
        );
        assert!(text.matches("LWP").count() >= nthreads, "{text}");
        assert!(
            text.contains(&format!("{addr:#x}:\t\"{CHILD_HEAP_MARKER}")),
            "{text}"
        );
        frozen.resume().unwrap();
        drop(child);
    }

    #[test]
    fn capture_core_caps_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let freezer = Freezer::new(dir.path(), FreezeOptions::default()).unwrap();
        let child = spawn_sleeper(0, "CAPS");
        let pid = child.id() as i32;
        let frozen = freezer.freeze(pid).unwrap();
        let full = write_core(pid, &dir.path().join("full"), &CoreOptions::default()).unwrap();
        let opts = CoreOptions {
            max_total_bytes: 2 << 20,
            max_segment_bytes: 64 << 10,
            skip_file_backed_readonly: true,
        };
        let core = dir.path().join("small");
        let r = write_core(pid, &core, &opts).unwrap();
        assert!(r.dumped_bytes <= 2 << 20);
        assert!(r.dumped_bytes < full.dumped_bytes);
        let seg = r
            .regions
            .iter()
            .find(|x| x.reason == Some(SkipReason::SegmentCap))
            .expect("a truncated region");
        assert_eq!(seg.action, RegionAction::Truncated);
        assert_eq!(seg.file_bytes, 64 << 10);
        assert!(r
            .regions
            .iter()
            .any(|x| x.reason == Some(SkipReason::FileBackedReadonly)
                && x.action == RegionAction::Skipped));
        // Every byte left out is accounted for.
        let total: u64 = r.regions.iter().map(|x| x.end - x.start).sum();
        assert_eq!(total, r.dumped_bytes + r.left_out_bytes);
        // The truncated region is a PT_LOAD with p_filesz < p_memsz.
        let bytes = std::fs::read(&core).unwrap();
        let elf = ElfFile64::<object::LittleEndian>::parse(&bytes[..]).unwrap();
        let e = object::LittleEndian;
        let ph = elf
            .elf_program_headers()
            .iter()
            .find(|p| p.p_vaddr(e) == seg.start)
            .unwrap();
        assert_eq!(ph.p_filesz(e), 64 << 10);
        assert_eq!(ph.p_memsz(e), seg.end - seg.start);
        // readelf still reads it.
        let out = Command::new("readelf")
            .arg("-lW")
            .arg(&core)
            .output()
            .unwrap();
        assert!(out.status.success());
        frozen.resume().unwrap();
        drop(child);
    }

    #[test]
    fn capture_core_unreadable_pages_recorded() {
        let mut u = Unreadable::default();
        let e = io::Error::from_raw_os_error(libc::EFAULT);
        u.add(0x1000, 0x1000, &e);
        u.add(0x2000, 0x1000, &e);
        u.add(0x8000, 0x1000, &e);
        assert_eq!(u.ranges.len(), 2);
        assert_eq!(u.ranges[0].len, 0x2000);
        // A read of an unmapped range: zeros, recorded.
        let me = std::process::id() as i32;
        let mut chunk = vec![1u8; 8192];
        let mut out = Vec::new();
        let mut u = Unreadable::default();
        copy_memory(me, 0x1000, 0x2000, 4096, &mut chunk, &mut u, |b| {
            out.extend_from_slice(b)
        });
        assert_eq!(out, vec![0u8; 0x2000]);
        assert_eq!(u.ranges.len(), 1);
        assert_eq!((u.ranges[0].start, u.ranges[0].len), (0x1000, 0x2000));
    }
}
