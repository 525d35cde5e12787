//! Ring-buffer record -> [`Event`]. Every length is checked: a malformed or
//! truncated record is an error the caller counts, never a panic.

use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use vigil_sensor_common as raw;
use vigil_sensor_common::{EventHeader, EventKind};

use crate::model::event::{
    BpfLoad, Chmod, CommChange, Connect, Event, Exec, ExecDenied, ExecMem, FileOpen, Listen,
    ModuleLoad, Payload, ProcessAccess, Rename, Stdio, StdioIds, Unlink, Utimes,
};

/// Why a record could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than its fixed struct or than the lengths it announces.
    #[error("record truncated: {what} needs {need} bytes, record has {have}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// The kind field is not a known [`EventKind`].
    #[error("unknown record kind {0}")]
    UnknownKind(u32),
    /// The header's size field says more than the record holds.
    #[error("record size field says {said} bytes, record has {have}")]
    SizeMismatch {
        /// The header's size.
        said: u32,
        /// The real length.
        have: usize,
    },
}

/// Reads a `T` from the front of `buf`, or says it is too short.
fn read<T: Copy>(buf: &[u8], what: &'static str) -> Result<T, DecodeError> {
    if buf.len() < size_of::<T>() {
        return Err(DecodeError::Truncated {
            what,
            need: size_of::<T>(),
            have: buf.len(),
        });
    }
    // SAFETY: length checked; T is a plain #[repr(C)] integer struct from
    // vigil-sensor-common for which every bit pattern is valid.
    Ok(unsafe { std::ptr::read_unaligned(buf.as_ptr() as *const T) })
}

/// The tail slice `[off, off + len)` of a record, or an error.
fn tail<'a>(
    buf: &'a [u8],
    off: usize,
    len: u32,
    what: &'static str,
) -> Result<&'a [u8], DecodeError> {
    let end = off.saturating_add(len as usize);
    buf.get(off..end).ok_or(DecodeError::Truncated {
        what,
        need: end,
        have: buf.len(),
    })
}

/// Decodes one ring-buffer record.
pub fn decode(buf: &[u8]) -> Result<Event, DecodeError> {
    let hdr: EventHeader = read(buf, "header")?;
    let kind = EventKind::from_u32(hdr.kind).ok_or(DecodeError::UnknownKind(hdr.kind))?;
    // A record reserved at its largest size (a frozen exec) is longer than
    // its content: the size field says where the content ends.
    let Some(buf) = buf.get(..hdr.size as usize) else {
        return Err(DecodeError::SizeMismatch {
            said: hdr.size,
            have: buf.len(),
        });
    };
    if buf.len() < size_of::<EventHeader>() {
        return Err(DecodeError::SizeMismatch {
            said: hdr.size,
            have: buf.len(),
        });
    }
    let payload = match kind {
        EventKind::Exec => {
            let e: raw::ExecEvent = read(buf, "exec")?;
            let base = size_of::<raw::ExecEvent>();
            let path = tail(buf, base, e.path_len, "exec path")?;
            let argv = tail(buf, base + e.path_len as usize, e.argv_len, "exec argv")?;
            let fname_off = base + e.path_len as usize + e.argv_len as usize;
            let script = tail(buf, fname_off, e.filename_len, "exec filename")?;
            let preload = tail(
                buf,
                fname_off + e.filename_len as usize,
                e.preload_len,
                "exec LD_PRELOAD",
            )?;
            let (argv, cut) = split_argv(argv);
            Payload::Exec(Exec {
                ppid: e.ppid,
                euid: e.euid,
                egid: e.egid,
                exe: walked_path(path),
                argv,
                argv_truncated: cut || e.flags & raw::EXEC_FLAG_ARGV_TRUNCATED != 0,
                exe_ino: e.exe_ino,
                exe_dev: e.exe_dev,
                exe_size: e.exe_size,
                arg_start: e.arg_start,
                exe_memfd: e.flags & raw::EXEC_FLAG_MEMFD != 0,
                exe_deleted: e.flags & raw::EXEC_FLAG_DELETED != 0,
                script: (e.flags & raw::EXEC_FLAG_SCRIPT != 0).then(|| cstr(script)),
                ld_preload: (e.preload_len > 0).then(|| cstr(preload)),
                copy_of: None,
                history_off: e.flags & raw::EXEC_FLAG_HISTORY_OFF != 0,
                stdio: [0, 1, 2].map(|i| Stdio::from_raw(e.stdio_mode[i], e.stdio_family[i])),
                stdio_ids: StdioIds {
                    ino: e.stdio_ino,
                    dev: e.stdio_dev,
                },
                env_truncated: e.flags & raw::EXEC_FLAG_ENV_TRUNCATED != 0,
                frozen: e.flags & raw::EXEC_FLAG_FROZEN != 0,
            })
        }
        EventKind::ExecDenied => {
            let e: raw::ExecDeniedEvent = read(buf, "exec_denied")?;
            let base = size_of::<raw::ExecDeniedEvent>();
            let path = tail(buf, base, e.path_len, "exec_denied path")?;
            let filename = tail(
                buf,
                base + e.path_len as usize,
                e.filename_len,
                "exec_denied filename",
            )?;
            Payload::ExecDenied(ExecDenied {
                ppid: e.ppid,
                exe: walked_path(path),
                filename: cstr(filename),
                policy: match e.policy {
                    raw::FREEZE_MEMFD => "memfd",
                    _ => "server_child",
                },
                exe_ino: e.exe_ino,
                exe_dev: e.exe_dev,
            })
        }
        EventKind::Fork => {
            let e: raw::ForkEvent = read(buf, "fork")?;
            Payload::Fork { ppid: e.ppid }
        }
        EventKind::Exit => {
            let e: raw::ExitEvent = read(buf, "exit")?;
            let sig = (e.exit_code & 0x7f) as u8;
            if sig == 0 {
                Payload::Exit {
                    exit_code: Some((e.exit_code >> 8) as u8),
                    signal: None,
                }
            } else {
                Payload::Exit {
                    exit_code: None,
                    signal: Some(sig),
                }
            }
        }
        EventKind::Connect => {
            let e: raw::ConnectEvent = read(buf, "connect")?;
            Payload::Connect(Connect {
                protocol: protocol_name(e.protocol),
                daddr: ip(e.family, e.daddr),
                dport: e.dport,
                saddr: ip(e.family, e.saddr),
                sport: e.sport,
                ret: (e.flags & raw::CONNECT_FLAG_ATTEMPT == 0).then_some(e.ret),
                send_to: e.flags & raw::CONNECT_FLAG_SEND != 0,
                rewritten_argv: None,
            })
        }
        EventKind::Listen => {
            let e: raw::ListenEvent = read(buf, "listen")?;
            Payload::Listen(Listen {
                protocol: protocol_name(e.protocol),
                addr: ip(e.family, e.addr),
                port: e.port,
                rewritten_argv: None,
            })
        }
        EventKind::FileOpen => {
            let e: raw::FileOpenEvent = read(buf, "file_open")?;
            let path = tail(
                buf,
                size_of::<raw::FileOpenEvent>(),
                e.path_len,
                "file path",
            )?;
            Payload::FileOpen(FileOpen {
                path: walked_path(path),
                flags: e.open_flags,
                mode: e.mode,
                ino: e.ino,
                dev: e.dev,
                io_uring: false,
            })
        }
        EventKind::UringOpen => {
            let (path, flags) = path_record(buf, "uring_open")?;
            Payload::FileOpen(FileOpen {
                path,
                flags,
                mode: 0,
                ino: 0,
                dev: 0,
                io_uring: true,
            })
        }
        EventKind::Chmod => {
            let (path, mode) = path_record(buf, "chmod")?;
            Payload::Chmod(Chmod { path, mode })
        }
        EventKind::Comm => {
            let e: raw::CommEvent = read(buf, "comm")?;
            Payload::Comm(CommChange {
                new_comm: cstr(&e.new_comm),
                argv: Vec::new(),
            })
        }
        EventKind::Utimes => Payload::Utimes(Utimes {
            path: path_record(buf, "utimes")?.0,
        }),
        EventKind::Unlink => Payload::Unlink(Unlink {
            path: path_record(buf, "unlink")?.0,
        }),
        EventKind::ModuleLoad => {
            let e: raw::ChmodEvent = read(buf, "module_load")?;
            Payload::ModuleLoad(ModuleLoad {
                path: path_record(buf, "module_load")?.0,
                from_memory: e.mode & raw::MODULE_FROM_MEMORY != 0,
                flags: e.mode & !raw::MODULE_FROM_MEMORY,
                ret: e.ret,
            })
        }
        EventKind::ProcessAccess => {
            let e: raw::ProcessAccessEvent = read(buf, "process_access")?;
            Payload::ProcessAccess(ProcessAccess {
                op: access_op(e.request),
                target: e.target,
                target_pid: None,
                ret: e.ret,
                addr: e.addr,
            })
        }
        EventKind::BpfLoad => {
            let e: raw::BpfLoadEvent = read(buf, "bpf_load")?;
            Payload::BpfLoad(BpfLoad {
                prog_type: bpf_prog_type(e.prog_type),
                attach_type: e.attach_type,
                name: cstr(&e.name),
                insn_cnt: e.insn_cnt,
                ret: e.ret,
            })
        }
        EventKind::ExecMem => {
            let e: raw::ExecMemEvent = read(buf, "exec_mem")?;
            Payload::ExecMem(ExecMem {
                op: if e.op == raw::EXECMEM_MMAP {
                    "mmap"
                } else {
                    "mprotect"
                },
                prot: e.prot,
                map_flags: e.map_flags,
                addr: e.addr,
                len: e.len,
                ret: e.ret,
            })
        }
        EventKind::Rename => {
            let e: raw::RenameEvent = read(buf, "rename")?;
            let mut off = size_of::<raw::RenameEvent>();
            let walked = tail(buf, off, e.base_len, "rename base")?;
            off += e.base_len as usize;
            let new = tail(buf, off, e.new_len, "rename new path")?;
            off += e.new_len as usize;
            let old = tail(buf, off, e.old_len, "rename old path")?;
            let base = walked_path(walked);
            let (new, old) = (cstr(new), cstr(old));
            // The base was walked for the new path: the directory of a
            // relative one, a chroot's root for an absolute one. The old
            // path shares it only when it is of the same kind (and, when
            // relative, relative to the same directory); otherwise it is
            // reported as given (in a chroot, an absolute old path with a
            // relative new one is then the chroot's, not the host's).
            let shares_base = if old.starts_with('/') {
                new.starts_with('/')
            } else {
                !new.starts_with('/') && e.old_dirfd_differs == 0
            };
            Payload::Rename(Rename {
                old_path: if shares_base { join(&base, &old) } else { old },
                new_path: join(&base, &new),
            })
        }
    };
    Ok(Event {
        boot_ns: hdr.boot_ns,
        tid: hdr.pid,
        pid: hdr.tgid,
        uid: hdr.uid,
        gid: hdr.gid,
        start_boot_ns: hdr.start_boot_ns,
        cgroup_id: hdr.cgroup_id,
        comm: cstr(&hdr.comm),
        payload,
    })
}

fn ip(family: u16, b: [u8; 16]) -> IpAddr {
    if family == 10 {
        IpAddr::V6(Ipv6Addr::from(b))
    } else {
        IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    }
}

/// The name of a reported ptrace request (or process_vm_writev).
fn access_op(request: u32) -> &'static str {
    use raw::ptrace as p;
    match request as u64 {
        p::ATTACH => "attach",
        p::SEIZE => "seize",
        p::POKETEXT => "poke_text",
        p::POKEDATA => "poke_data",
        p::POKEUSER => "poke_user",
        p::SETREGS => "set_regs",
        p::SETFPREGS => "set_fpregs",
        p::SETREGSET => "set_regset",
        _ if request == raw::ACCESS_VM_WRITEV => "vm_writev",
        _ => "other",
    }
}

/// `BPF_PROG_TYPE_*` by number (uapi order), or the number.
fn bpf_prog_type(t: u32) -> String {
    const NAMES: [&str; 33] = [
        "unspec",
        "socket_filter",
        "kprobe",
        "sched_cls",
        "sched_act",
        "tracepoint",
        "xdp",
        "perf_event",
        "cgroup_skb",
        "cgroup_sock",
        "lwt_in",
        "lwt_out",
        "lwt_xmit",
        "sock_ops",
        "sk_skb",
        "cgroup_device",
        "sk_msg",
        "raw_tracepoint",
        "cgroup_sock_addr",
        "lwt_seg6local",
        "lirc_mode2",
        "sk_reuseport",
        "flow_dissector",
        "cgroup_sysctl",
        "raw_tracepoint_writable",
        "cgroup_sockopt",
        "tracing",
        "struct_ops",
        "ext",
        "lsm",
        "sk_lookup",
        "syscall",
        "netfilter",
    ];
    NAMES
        .get(t as usize)
        .map(|n| n.to_string())
        .unwrap_or_else(|| t.to_string())
}

fn protocol_name(p: u16) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        p => p.to_string(),
    }
}

/// Text up to the first NUL, lossy UTF-8.
fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// A kernel-walked path (leaf first, NUL-terminated components) as "/a/b/c".
/// Empty input gives an empty string (unknown path).
pub fn walked_path(b: &[u8]) -> String {
    if b.is_empty() {
        return String::new();
    }
    let parts: Vec<&[u8]> = b
        .split(|&c| c == 0)
        .filter(|p| !p.is_empty() && *p != b"/")
        .collect();
    let mut out = String::with_capacity(b.len() + 1);
    for p in parts.iter().rev() {
        out.push('/');
        out.push_str(&String::from_utf8_lossy(p));
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// A record of the chmod layout (chmod, utimes): its absolute path (the
/// walked base joined with the path as given) and its mode field.
fn path_record(buf: &[u8], what: &'static str) -> Result<(String, u32), DecodeError> {
    let e: raw::ChmodEvent = read(buf, what)?;
    let base = size_of::<raw::ChmodEvent>();
    let walked = tail(buf, base, e.base_len, what)?;
    let user = tail(buf, base + e.base_len as usize, e.user_len, what)?;
    Ok((join(&walked_path(walked), &cstr(user)), e.mode))
}

/// `user` resolved against `base` (lexically: "." and ".." handled). An
/// absolute `user` with a `base` comes from a chrooted process: `base` is
/// its root, which ".." cannot leave.
fn join(base: &str, user: &str) -> String {
    if base.is_empty() {
        return crate::model::normalize_path(user);
    }
    if user.starts_with('/') {
        let base = crate::model::normalize_path(base);
        let inner = crate::model::normalize_path(user);
        if base == "/" {
            return inner;
        }
        if inner == "/" {
            return base;
        }
        return format!("{base}{inner}");
    }
    crate::model::normalize_path(&format!("{base}/{user}"))
}

/// NUL-separated argv; at most [`raw::ARGV_MAX_ARGS`] entries. Returns
/// (args, cut).
fn split_argv(b: &[u8]) -> (Vec<String>, bool) {
    let b = b.strip_suffix(&[0]).unwrap_or(b);
    if b.is_empty() {
        return (Vec::new(), false);
    }
    let mut out = Vec::new();
    for (i, a) in b.split(|&c| c == 0).enumerate() {
        if i == raw::ARGV_MAX_ARGS {
            return (out, true);
        }
        out.push(String::from_utf8_lossy(a).into_owned());
    }
    (out, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: EventKind, size: usize) -> EventHeader {
        EventHeader {
            kind: kind as u32,
            size: size as u32,
            boot_ns: 1,
            pid: 10,
            tgid: 10,
            uid: 0,
            gid: 0,
            start_boot_ns: 5,
            cgroup_id: 1,
            comm: *b"sh\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
        }
    }

    fn bytes<T>(v: &T) -> Vec<u8> {
        // SAFETY: T is a repr(C) POD test value.
        unsafe { std::slice::from_raw_parts(v as *const T as *const u8, size_of::<T>()) }.to_vec()
    }

    fn exec_record(path: &[u8], argv: &[u8]) -> Vec<u8> {
        let size = size_of::<raw::ExecEvent>() + path.len() + argv.len();
        let e = raw::ExecEvent {
            hdr: header(EventKind::Exec, size),
            ppid: 1,
            euid: 0,
            egid: 0,
            flags: 0,
            exe_ino: 42,
            exe_dev: 3,
            exe_nlink: 1,
            path_len: path.len() as u32,
            argv_len: argv.len() as u32,
            filename_len: 0,
            preload_len: 0,
            stdio_mode: [0; 3],
            stdio_family: [0; 3],
            stdio_ino: [0; 3],
            stdio_dev: [0; 3],
            _reserved: 0,
            exe_size: 125_640,
            arg_start: 0x7ffd_0000_1000,
        };
        let mut v = bytes(&e);
        v.extend_from_slice(path);
        v.extend_from_slice(argv);
        v
    }

    #[test]
    fn exec_roundtrip() {
        let r = exec_record(b"curl\0bin\0usr\0", b"curl\0-s\0http://x/\0");
        let ev = decode(&r).unwrap();
        let Payload::Exec(e) = ev.payload else {
            panic!("not exec")
        };
        assert_eq!(e.exe, "/usr/bin/curl");
        assert_eq!(e.argv, ["curl", "-s", "http://x/"]);
        assert_eq!(e.exe_size, 125_640);
        assert_eq!(e.arg_start, 0x7ffd_0000_1000);
        assert_eq!(ev.comm, "sh");
    }

    #[test]
    fn exec_denied_roundtrip() {
        let path = b"dash\0bin\0usr\0";
        let filename = b"/bin/sh\0";
        let size = size_of::<raw::ExecDeniedEvent>() + path.len() + filename.len();
        let e = raw::ExecDeniedEvent {
            hdr: header(EventKind::ExecDenied, size),
            ppid: 7,
            policy: raw::FREEZE_SERVER_CHILD,
            exe_ino: 42,
            exe_dev: 3,
            path_len: path.len() as u32,
            filename_len: filename.len() as u32,
            flags: 0,
        };
        let mut r = bytes(&e);
        r.extend_from_slice(path);
        r.extend_from_slice(filename);
        let ev = decode(&r).unwrap();
        assert_eq!(ev.kind(), EventKind::ExecDenied);
        let Payload::ExecDenied(d) = ev.payload else {
            panic!("not exec_denied")
        };
        assert_eq!(d.exe, "/usr/bin/dash");
        assert_eq!(d.filename, "/bin/sh");
        assert_eq!(d.policy, "server_child");
        assert_eq!(d.ppid, 7);
        let ev = decode(&r).unwrap();
        let json = serde_json::to_value(&ev).unwrap();
        assert_eq!(json["type"], "exec_denied", "{json}");
        assert_eq!(json["ppid"], 7, "{json}");
        assert_eq!(json["filename"], "/bin/sh", "{json}");
        // Every truncation is an error, not a panic.
        for n in 0..r.len() {
            assert!(decode(&r[..n]).is_err(), "prefix of {n} bytes decoded");
        }
    }

    #[test]
    fn argv_is_capped_at_the_argument_bound() {
        let many: Vec<u8> = (0..raw::ARGV_MAX_ARGS + 4)
            .flat_map(|i| format!("a{i}\0").into_bytes())
            .collect();
        let ev = decode(&exec_record(b"x\0", &many)).unwrap();
        let Payload::Exec(e) = ev.payload else {
            panic!()
        };
        assert_eq!(e.argv.len(), raw::ARGV_MAX_ARGS);
        assert!(e.argv_truncated);
    }

    #[test]
    fn malformed_records_are_errors_not_panics() {
        let good = exec_record(b"curl\0bin\0usr\0", b"curl\0");
        // Every truncation of a good record is an error.
        for n in 0..good.len() {
            assert!(decode(&good[..n]).is_err(), "prefix of {n} bytes decoded");
        }
        // A record reserved larger than its content (a frozen exec) decodes
        // as its content; a size field below the header is an error.
        let mut padded = good.clone();
        padded.resize(good.len() + 4096, 0xAA);
        assert_eq!(decode(&padded), decode(&good));
        let mut bad = good.clone();
        bad[4..8].copy_from_slice(&4u32.to_le_bytes());
        assert!(matches!(
            decode(&bad),
            Err(DecodeError::SizeMismatch { .. })
        ));
        // Lengths that point past the end.
        let mut bad = good.clone();
        let off = std::mem::offset_of!(raw::ExecEvent, argv_len);
        bad[off..off + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&bad), Err(DecodeError::Truncated { .. })));
        // Unknown kind.
        let mut bad = good.clone();
        bad[0..4].copy_from_slice(&99u32.to_le_bytes());
        assert_eq!(decode(&bad), Err(DecodeError::UnknownKind(99)));
        // Random garbage of many sizes never panics.
        let mut x: u64 = 0x9E3779B97F4A7C15;
        for len in 0..600 {
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = decode(&buf);
        }
    }

    #[test]
    fn paths() {
        assert_eq!(walked_path(b""), "");
        assert_eq!(walked_path(b"memfd:kworker\0"), "/memfd:kworker");
        assert_eq!(join("/home/u", "./dashboard/x"), "/home/u/dashboard/x");
        assert_eq!(join("/home/u", "../v/x"), "/home/v/x");
        assert_eq!(join("", "rel/x"), "rel/x");
        // An absolute path with a base: a chrooted process's, under its
        // root, which ".." cannot leave.
        assert_eq!(join("/srv/root", "/etc/cron.d/x"), "/srv/root/etc/cron.d/x");
        assert_eq!(join("/srv/root", "/../../etc/x"), "/srv/root/etc/x");
        assert_eq!(join("/srv/root", "/"), "/srv/root");
        assert_eq!(join("/", "/etc/x"), "/etc/x");
        assert_eq!(join("", "/etc/x"), "/etc/x");
    }

    /// A rename record: base walked leaf first, then new and old paths.
    fn rename_record(base: &[u8], new: &str, old: &str, old_dirfd_differs: bool) -> Vec<u8> {
        let (new, old) = (format!("{new}\0"), format!("{old}\0"));
        let fixed = size_of::<raw::RenameEvent>();
        let e = raw::RenameEvent {
            hdr: header(
                EventKind::Rename,
                fixed + base.len() + new.len() + old.len(),
            ),
            flags: 0,
            old_dirfd_differs: old_dirfd_differs as u32,
            base_len: base.len() as u32,
            new_len: new.len() as u32,
            old_len: old.len() as u32,
            _reserved: 0,
        };
        let mut out = bytes(&e);
        out.extend_from_slice(base);
        out.extend_from_slice(new.as_bytes());
        out.extend_from_slice(old.as_bytes());
        out
    }

    #[test]
    fn rename_paths_share_the_base_only_when_it_is_theirs() {
        let paths = |r: Vec<u8>| match decode(&r).unwrap().payload {
            Payload::Rename(x) => (x.old_path, x.new_path),
            p => panic!("{p:?}"),
        };
        let cwd = b"src\0home\0";
        // Both relative to the cwd.
        assert_eq!(
            paths(rename_record(cwd, "b", "a", false)),
            ("/home/src/a".into(), "/home/src/b".into())
        );
        // Old relative to another directory fd: left as given.
        assert_eq!(
            paths(rename_record(cwd, "b", "a", true)),
            ("a".into(), "/home/src/b".into())
        );
        // An absolute old path with a relative new one: the base is the
        // new one's directory, not the old one's.
        assert_eq!(
            paths(rename_record(cwd, "b", "/tmp/a", false)),
            ("/tmp/a".into(), "/home/src/b".into())
        );
        // Both absolute, not chrooted (no base).
        assert_eq!(
            paths(rename_record(b"", "/etc/b", "/etc/a", false)),
            ("/etc/a".into(), "/etc/b".into())
        );
        // Both absolute in a chroot: the base is its root, for both.
        let root = b"root\0srv\0";
        assert_eq!(
            paths(rename_record(root, "/etc/cron.d/b", "/tmp/a", false)),
            ("/srv/root/tmp/a".into(), "/srv/root/etc/cron.d/b".into())
        );
        // A relative old path with an absolute new one: the root is not
        // its directory.
        assert_eq!(
            paths(rename_record(root, "/etc/b", "a", false)),
            ("a".into(), "/srv/root/etc/b".into())
        );
    }

    #[test]
    fn exit_status() {
        let e = raw::ExitEvent {
            hdr: header(EventKind::Exit, size_of::<raw::ExitEvent>()),
            exit_code: 9,
            _reserved: 0,
        };
        let ev = decode(&bytes(&e)).unwrap();
        assert_eq!(
            ev.payload,
            Payload::Exit {
                exit_code: None,
                signal: Some(9)
            }
        );
    }
}
