//! The context of a process, as JSON: what it runs, with what, where, and
//! what it holds open (files, pipes, sockets joined to the kernel's socket
//! tables), plus its ancestors' context and the recent events the agent saw.
//!
//! Never fails as a whole: a field that cannot be read is left empty and its
//! error recorded in `errors` (a process may be a zombie, a kernel may lack a
//! file). Every list and string is bounded ([`ContextOptions`]).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use procfs::process::Process;
use serde::{Deserialize, Serialize};

use super::procutil::{self, StatLine};

/// Bounds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContextOptions {
    /// Bytes of /proc/PID/cmdline kept.
    pub max_cmdline_bytes: usize,
    /// Bytes of /proc/PID/environ kept.
    pub max_environ_bytes: usize,
    /// File descriptors listed.
    pub max_fds: usize,
    /// Lines of /proc/PID/maps kept.
    pub max_maps: usize,
    /// Timeline events kept (the most recent).
    pub max_timeline: usize,
    /// Hash the executable of each ancestor (the subject's is hashed when
    /// copied).
    pub hash_ancestor_exes: bool,
    /// Bytes of an executable hashed (bigger ones: not hashed, said so).
    pub max_hash_bytes: u64,
}

impl Default for ContextOptions {
    fn default() -> Self {
        ContextOptions {
            max_cmdline_bytes: 64 << 10,
            max_environ_bytes: 64 << 10,
            max_fds: 4096,
            max_maps: 16384,
            max_timeline: 1000,
            hash_ancestor_exes: true,
            max_hash_bytes: 512 << 20,
        }
    }
}

/// One process's context.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProcessContext {
    /// Process id.
    pub pid: i32,
    /// Parent pid.
    pub ppid: i32,
    /// Start time, clock ticks since boot (with the pid, the identity).
    pub start_time: u64,
    /// `comm`.
    pub comm: String,
    /// Target of /proc/PID/exe (may end in " (deleted)", or be `/memfd:...`).
    pub exe: Option<String>,
    /// The executable was deleted or is a memfd (fileless).
    pub exe_deleted: bool,
    /// sha256 of the executable's bytes, read through /proc/PID/exe.
    pub exe_sha256: Option<String>,
    /// Size of the executable.
    pub exe_size: Option<u64>,
    /// Arguments (lossy UTF-8).
    pub cmdline: Vec<String>,
    /// `cmdline` was cut at `max_cmdline_bytes`.
    pub cmdline_truncated: bool,
    /// `KEY=value` strings (lossy UTF-8), in order.
    pub environ: Vec<String>,
    /// `environ` was cut at `max_environ_bytes`.
    pub environ_truncated: bool,
    /// Working directory.
    pub cwd: Option<String>,
    /// Root directory (differs from "/" in a chroot or container).
    pub root: Option<String>,
    /// /proc/PID/status, key -> value.
    pub status: BTreeMap<String, String>,
    /// /proc/PID/limits.
    pub limits: Vec<Limit>,
    /// /proc/PID/cgroup lines.
    pub cgroup: Vec<String>,
    /// Namespace name -> `type:[inode]`.
    pub namespaces: BTreeMap<String, String>,
    /// /proc/PID/maps lines.
    pub maps: Vec<String>,
    /// `maps` was cut at `max_maps`.
    pub maps_truncated: bool,
    /// Open file descriptors.
    pub fds: Vec<FdEntry>,
    /// Open file descriptors in all (may be more than listed).
    pub fds_total: usize,
    /// Field -> why it could not be read.
    pub errors: BTreeMap<String, String>,
}

/// One resource limit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Limit {
    /// e.g. "Max open files".
    pub name: String,
    /// Soft limit ("unlimited" or a number).
    pub soft: String,
    /// Hard limit.
    pub hard: String,
    /// Units (may be empty).
    pub units: String,
}

/// One file descriptor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FdEntry {
    /// Descriptor number.
    pub fd: i32,
    /// readlink of /proc/PID/fd/N.
    pub target: String,
    /// Flags from fdinfo (octal, as the kernel prints them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flags: Option<String>,
    /// File position from fdinfo.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pos: Option<u64>,
    /// For sockets: the socket, joined from the net tables.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<SocketInfo>,
}

/// A socket found in the process's network namespace tables.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "proto", rename_all = "snake_case")]
pub enum SocketInfo {
    /// TCP (v4 or v6).
    Tcp {
        /// 4 or 6.
        family: u8,
        /// ip:port.
        local: String,
        /// ip:port.
        remote: String,
        /// Established, Listen, ...
        state: String,
        /// Owner uid.
        uid: u32,
    },
    /// UDP (v4 or v6).
    Udp {
        /// 4 or 6.
        family: u8,
        /// ip:port.
        local: String,
        /// ip:port.
        remote: String,
        /// Established (connected) or Close.
        state: String,
        /// Owner uid.
        uid: u32,
    },
    /// Unix domain.
    Unix {
        /// Bound path (`@name` for abstract), if any.
        path: Option<String>,
        /// stream, dgram, seqpacket.
        kind: String,
        /// Connected, Unconnected, ...
        state: String,
    },
    /// Not in the tcp/udp/unix tables (netlink, raw, packet, ...).
    Other {
        /// Socket inode.
        inode: u64,
    },
}

/// Subject, ancestors and timeline: what goes into `context.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaptureContext {
    /// The process captured.
    pub subject: ProcessContext,
    /// Its ancestors, parent first, as the caller listed them.
    pub ancestry: Vec<ProcessContext>,
    /// Recent events (caller-supplied), oldest first.
    pub timeline: Vec<serde_json::Value>,
    /// Events dropped from the timeline (oldest) by `max_timeline`.
    pub timeline_dropped: usize,
}

/// Collects subject, ancestry and timeline. The subject's executable is not
/// hashed here (its copy is); ancestors' are when `hash_ancestor_exes`.
pub fn collect(
    pid: i32,
    ancestors: &[i32],
    mut timeline: Vec<serde_json::Value>,
    opts: &ContextOptions,
) -> CaptureContext {
    let subject = process_context(pid, opts, false);
    let ancestry = ancestors
        .iter()
        .map(|&a| process_context(a, opts, opts.hash_ancestor_exes))
        .collect();
    let dropped = timeline.len().saturating_sub(opts.max_timeline);
    timeline.drain(..dropped);
    CaptureContext {
        subject,
        ancestry,
        timeline,
        timeline_dropped: dropped,
    }
}

/// The context of one process.
pub fn process_context(pid: i32, opts: &ContextOptions, hash_exe: bool) -> ProcessContext {
    let mut c = ProcessContext {
        pid,
        ..Default::default()
    };
    let base = format!("/proc/{pid}");
    let mut err = |field: &str, e: &dyn std::fmt::Display| {
        c.errors.insert(field.to_string(), e.to_string());
    };
    let stat = StatLine::read(Path::new(&format!("{base}/stat")));
    let exe = fs::read_link(format!("{base}/exe"));
    let (cmdline, environ, cwd, root) = (
        procutil::read_capped(
            Path::new(&format!("{base}/cmdline")),
            opts.max_cmdline_bytes,
        ),
        procutil::read_capped(
            Path::new(&format!("{base}/environ")),
            opts.max_environ_bytes,
        ),
        fs::read_link(format!("{base}/cwd")),
        fs::read_link(format!("{base}/root")),
    );
    let status = fs::read_to_string(format!("{base}/status"));
    let limits = fs::read_to_string(format!("{base}/limits"));
    let cgroup = fs::read_to_string(format!("{base}/cgroup"));
    let ns = namespaces(pid);
    let maps = fs::read_to_string(format!("{base}/maps"));
    let fds = fds(pid, opts.max_fds);

    match stat {
        Ok(st) => {
            c.ppid = st.num(4) as i32;
            c.start_time = st.start_time();
            c.comm = st.comm;
        }
        Err(e) => err("stat", &e),
    }
    let mut hash = None;
    match exe {
        Ok(p) => {
            let s = p.to_string_lossy().into_owned();
            c.exe_deleted = s.ends_with(" (deleted)") || s.starts_with("/memfd:");
            c.exe = Some(s);
            if hash_exe {
                hash = Some(sha256_exe(pid, opts.max_hash_bytes));
            }
        }
        Err(e) => err("exe", &e),
    }
    match hash {
        Some(Ok((h, n))) => {
            c.exe_sha256 = h;
            c.exe_size = Some(n);
        }
        Some(Err(e)) => err("exe_sha256", &e),
        None => {}
    }
    match cmdline {
        Ok((b, t)) => {
            c.cmdline = split_nul(&b);
            c.cmdline_truncated = t;
        }
        Err(e) => err("cmdline", &e),
    }
    match environ {
        Ok((b, t)) => {
            c.environ = split_nul(&b);
            c.environ_truncated = t;
        }
        Err(e) => err("environ", &e),
    }
    match cwd {
        Ok(p) => c.cwd = Some(p.to_string_lossy().into_owned()),
        Err(e) => err("cwd", &e),
    }
    match root {
        Ok(p) => c.root = Some(p.to_string_lossy().into_owned()),
        Err(e) => err("root", &e),
    }
    match status {
        Ok(s) => {
            c.status = s
                .lines()
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.to_string(), v.trim().to_string()))
                .collect()
        }
        Err(e) => err("status", &e),
    }
    match limits {
        Ok(s) => c.limits = parse_limits(&s),
        Err(e) => err("limits", &e),
    }
    match cgroup {
        Ok(s) => c.cgroup = s.lines().map(str::to_string).collect(),
        Err(e) => err("cgroup", &e),
    }
    match ns {
        Ok(n) => c.namespaces = n,
        Err(e) => err("namespaces", &e),
    }
    match maps {
        Ok(s) => {
            c.maps = s.lines().take(opts.max_maps).map(str::to_string).collect();
            c.maps_truncated = s.lines().count() > opts.max_maps;
        }
        Err(e) => err("maps", &e),
    }
    match fds {
        Ok((list, total)) => {
            c.fds = list;
            c.fds_total = total;
        }
        Err(e) => err("fds", &e),
    }
    if c.fds.iter().any(|f| f.target.starts_with("socket:[")) {
        let (table, errors) = socket_table(pid);
        for (k, v) in errors {
            c.errors.insert(k, v);
        }
        for f in &mut c.fds {
            if let Some(ino) = socket_inode(&f.target) {
                f.socket = Some(
                    table
                        .get(&ino)
                        .cloned()
                        .unwrap_or(SocketInfo::Other { inode: ino }),
                );
            }
        }
    }
    c
}

/// Executable copy: where, how big, its hash.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExeCopy {
    /// Size of the executable.
    pub size: u64,
    /// Bytes copied (less than `size` when over the cap).
    pub copied: u64,
    /// sha256 of the whole executable.
    pub sha256: String,
    /// sha256 of the bytes copied (the artifact; equals `sha256` unless cut).
    pub copied_sha256: String,
}

/// Copies the executable of `pid` (through /proc/PID/exe, so a deleted file
/// or a memfd too) to `dest`, at most `max_bytes`, hashing all of it.
pub fn copy_exe(pid: i32, dest: &Path, max_bytes: u64) -> io::Result<ExeCopy> {
    copy_exe_from(File::open(format!("/proc/{pid}/exe"))?, dest, max_bytes)
}

/// Like [`copy_exe`], from /proc/PID/exe opened earlier (the open file keeps
/// a deleted executable or a memfd readable after the process is gone).
pub fn copy_exe_from(mut src: File, dest: &Path, max_bytes: u64) -> io::Result<ExeCopy> {
    use sha2::{Digest, Sha256};
    let mut out = io::BufWriter::new(vigil_bundle::private::create_new(dest)?);
    let mut full = Sha256::new();
    let mut copied_h = Sha256::new();
    let (mut size, mut copied) = (0u64, 0u64);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        full.update(&buf[..n]);
        let take = (max_bytes.saturating_sub(copied) as usize).min(n);
        if take > 0 {
            out.write_all(&buf[..take])?;
            copied_h.update(&buf[..take]);
            copied += take as u64;
        }
        size += n as u64;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(ExeCopy {
        size,
        copied,
        sha256: hex::encode(full.finalize()),
        copied_sha256: hex::encode(copied_h.finalize()),
    })
}

/// A file's identity and version: device, inode, size, mtime, ctime.
type FileVersion = (u64, u64, u64, i64, i64, i64, i64);

/// (sha256 or None when over the cap, size). Hashes are remembered per
/// file version (device, inode, size, mtime, ctime): the same ancestors
/// (a server, its shells, a supervisor) come back capture after capture, and
/// re-reading a large binary each time would hold up the capture queue.
fn sha256_exe(pid: i32, max: u64) -> io::Result<(Option<String>, u64)> {
    use std::os::unix::fs::MetadataExt;
    static CACHE: std::sync::OnceLock<std::sync::Mutex<lru::LruCache<FileVersion, String>>> =
        std::sync::OnceLock::new();
    let mut f = File::open(format!("/proc/{pid}/exe"))?;
    let m = f.metadata()?;
    let size = m.len();
    if size > max {
        return Ok((None, size));
    }
    let key = (
        m.dev(),
        m.ino(),
        size,
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    );
    let cache = CACHE.get_or_init(|| {
        std::sync::Mutex::new(lru::LruCache::new(
            std::num::NonZeroUsize::new(1024).expect("non-zero"),
        ))
    });
    if let Some(h) = cache.lock().ok().and_then(|mut c| c.get(&key).cloned()) {
        return Ok((Some(h), size));
    }
    let mut h = super::bundle::HashingWriter::new(io::sink());
    io::copy(&mut f, &mut h)?;
    let sha = h.finish().0;
    if let Ok(mut c) = cache.lock() {
        c.put(key, sha.clone());
    }
    Ok((Some(sha), size))
}

fn split_nul(b: &[u8]) -> Vec<String> {
    let b = b.strip_suffix(&[0]).unwrap_or(b);
    if b.is_empty() {
        return Vec::new();
    }
    b.split(|&c| c == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn namespaces(pid: i32) -> io::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for e in fs::read_dir(format!("/proc/{pid}/ns"))? {
        let e = e?;
        if let Ok(t) = fs::read_link(e.path()) {
            out.insert(
                e.file_name().to_string_lossy().into_owned(),
                t.to_string_lossy().into_owned(),
            );
        }
    }
    Ok(out)
}

/// (listed, total).
fn fds(pid: i32, max: usize) -> io::Result<(Vec<FdEntry>, usize)> {
    let mut nums: Vec<i32> = fs::read_dir(format!("/proc/{pid}/fd"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    nums.sort_unstable();
    let total = nums.len();
    let list = nums
        .into_iter()
        .take(max)
        .filter_map(|fd| {
            let target = fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
            let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
            let field = |k: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map(|v| v.trim().to_string())
            };
            Some(FdEntry {
                fd,
                target: String::from_utf8_lossy(target.as_os_str().as_bytes()).into_owned(),
                flags: field("flags:"),
                pos: field("pos:").and_then(|v| v.parse().ok()),
                socket: None,
            })
        })
        .collect();
    Ok((list, total))
}

fn socket_inode(target: &str) -> Option<u64> {
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// inode -> socket, from the tables of the process's network namespace.
fn socket_table(pid: i32) -> (HashMap<u64, SocketInfo>, Vec<(String, String)>) {
    let mut t = HashMap::new();
    let mut errors = Vec::new();
    let p = match Process::new(pid) {
        Ok(p) => p,
        Err(e) => return (t, vec![("sockets".into(), e.to_string())]),
    };
    for (name, family, r) in [("tcp", 4, p.tcp()), ("tcp6", 6, p.tcp6())] {
        match r {
            Ok(v) => {
                for e in v {
                    t.insert(
                        e.inode,
                        SocketInfo::Tcp {
                            family,
                            local: e.local_address.to_string(),
                            remote: e.remote_address.to_string(),
                            state: format!("{:?}", e.state),
                            uid: e.uid,
                        },
                    );
                }
            }
            Err(e) => errors.push((format!("net/{name}"), e.to_string())),
        }
    }
    for (name, family, r) in [("udp", 4, p.udp()), ("udp6", 6, p.udp6())] {
        match r {
            Ok(v) => {
                for e in v {
                    t.insert(
                        e.inode,
                        SocketInfo::Udp {
                            family,
                            local: e.local_address.to_string(),
                            remote: e.remote_address.to_string(),
                            state: format!("{:?}", e.state),
                            uid: e.uid,
                        },
                    );
                }
            }
            Err(e) => errors.push((format!("net/{name}"), e.to_string())),
        }
    }
    match p.unix() {
        Ok(v) => {
            for e in v {
                let kind = match e.socket_type as i32 {
                    libc::SOCK_STREAM => "stream".to_string(),
                    libc::SOCK_DGRAM => "dgram".to_string(),
                    libc::SOCK_SEQPACKET => "seqpacket".to_string(),
                    n => n.to_string(),
                };
                t.insert(
                    e.inode,
                    SocketInfo::Unix {
                        path: e.path.map(|p| p.to_string_lossy().into_owned()),
                        kind,
                        state: format!("{:?}", e.state),
                    },
                );
            }
        }
        Err(e) => errors.push(("net/unix".into(), e.to_string())),
    }
    (t, errors)
}

/// /proc/PID/limits: columns found from the header line.
fn parse_limits(s: &str) -> Vec<Limit> {
    let mut lines = s.lines();
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let (Some(soft), Some(hard), Some(units)) = (
        header.find("Soft Limit"),
        header.find("Hard Limit"),
        header.find("Units"),
    ) else {
        return Vec::new();
    };
    let col =
        |l: &str, a: usize, b: usize| l.get(a..b.min(l.len())).unwrap_or("").trim().to_string();
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| Limit {
            name: col(l, 0, soft),
            soft: col(l, soft, hard),
            hard: col(l, hard, units),
            units: col(l, units, usize::MAX),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::testutil::spawn_sleeper;
    use std::net::{TcpListener, TcpStream, UdpSocket};
    use std::os::unix::net::UnixListener;

    #[test]
    fn capture_context_of_a_live_process() {
        let child = spawn_sleeper(1, "CONTEXT");
        let pid = child.id() as i32;
        let me = std::process::id() as i32;
        let timeline: Vec<serde_json::Value> =
            (0..5).map(|i| serde_json::json!({"n": i})).collect();
        let opts = ContextOptions {
            max_timeline: 3,
            ..Default::default()
        };
        // An "ancestor" with a small executable (hashing the debug test
        // binary would dominate the test's time).
        let mut anc = std::process::Command::new("/bin/sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let anc_pid = anc.id() as i32;
        let sleep_sha = crate::capture::bundle::hash_file(&fs::canonicalize("/bin/sleep").unwrap())
            .unwrap()
            .0;
        while fs::read_link(format!("/proc/{anc_pid}/exe"))
            .map(|p| !p.ends_with("sleep"))
            .unwrap_or(true)
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let ctx = collect(pid, &[anc_pid, 1], timeline, &opts);
        let s = &ctx.subject;
        assert_eq!(s.pid, pid);
        assert_eq!(s.ppid, me);
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        assert_eq!(
            s.exe.as_deref(),
            Some(std::env::current_exe().unwrap().to_str().unwrap())
        );
        assert!(s.exe_sha256.is_none(), "subject hashed by the copy");
        assert!(s.cmdline.contains(&"--exact".to_string()));
        assert!(s.environ.contains(&"VIGIL_TEST_MARKER=CONTEXT".to_string()));
        assert_eq!(s.cwd.as_deref(), std::env::current_dir().unwrap().to_str());
        assert_eq!(s.root.as_deref(), Some("/"));
        assert_eq!(
            s.status.get("Pid").map(String::as_str),
            Some(pid.to_string().as_str())
        );
        assert!(s
            .limits
            .iter()
            .any(|l| l.name == "Max open files" && l.units == "files"));
        assert!(!s.cgroup.is_empty());
        assert!(s.namespaces.get("net").unwrap().starts_with("net:["));
        assert!(s.maps.iter().any(|m| m.contains("[stack]")));
        assert!(s
            .fds
            .iter()
            .any(|f| f.fd == 1 && f.target.starts_with("pipe:[")));
        // Ancestors, with their executables hashed.
        assert_eq!(ctx.ancestry.len(), 2);
        assert_eq!(ctx.ancestry[0].pid, anc_pid);
        assert_eq!(ctx.ancestry[0].exe_sha256.as_ref(), Some(&sleep_sha));
        assert_eq!(ctx.ancestry[1].pid, 1);
        anc.kill().unwrap();
        anc.wait().unwrap();
        // Timeline bounded, newest kept.
        assert_eq!(
            ctx.timeline,
            vec![
                serde_json::json!({"n": 2}),
                serde_json::json!({"n": 3}),
                serde_json::json!({"n": 4})
            ]
        );
        assert_eq!(ctx.timeline_dropped, 2);
        // Serializes.
        let j = serde_json::to_value(&ctx).unwrap();
        assert!(j["subject"]["fds"].is_array());
    }

    #[test]
    fn capture_context_sockets_joined_to_fds() {
        // Our own process holds one of each; its context must name them.
        let l4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let c4 = TcpStream::connect(l4.local_addr().unwrap()).unwrap();
        let l6 = TcpListener::bind("[::1]:0").unwrap();
        let u4 = UdpSocket::bind("127.0.0.1:0").unwrap();
        u4.connect("127.0.0.1:9").unwrap();
        let u6 = UdpSocket::bind("[::1]:0").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let upath = dir.path().join("ctx.sock");
        let ul = UnixListener::bind(&upath).unwrap();
        let me = std::process::id() as i32;
        let c = process_context(me, &ContextOptions::default(), false);
        let socks: Vec<&SocketInfo> = c.fds.iter().filter_map(|f| f.socket.as_ref()).collect();
        let has = |pred: &dyn Fn(&SocketInfo) -> bool| socks.iter().any(|s| pred(s));
        let a4 = l4.local_addr().unwrap().to_string();
        assert!(
            has(
                &|s| matches!(s, SocketInfo::Tcp { family: 4, local, state, .. } if *local == a4 && state == "Listen")
            ),
            "{socks:?}"
        );
        let ca = c4.local_addr().unwrap().to_string();
        assert!(has(
            &|s| matches!(s, SocketInfo::Tcp { local, remote, state, .. } if *local == ca && *remote == a4 && state == "Established")
        ));
        let a6 = l6.local_addr().unwrap().to_string();
        assert!(has(
            &|s| matches!(s, SocketInfo::Tcp { family: 6, local, .. } if *local == a6)
        ));
        let ua = u4.local_addr().unwrap().to_string();
        assert!(has(
            &|s| matches!(s, SocketInfo::Udp { family: 4, local, remote, .. } if *local == ua && remote == "127.0.0.1:9")
        ));
        let ua6 = u6.local_addr().unwrap().to_string();
        assert!(has(
            &|s| matches!(s, SocketInfo::Udp { family: 6, local, .. } if *local == ua6)
        ));
        let up = upath.to_string_lossy().into_owned();
        assert!(has(
            &|s| matches!(s, SocketInfo::Unix { path: Some(p), kind, .. } if *p == up && kind == "stream")
        ));
        drop((l4, c4, l6, u4, u6, ul));
    }

    #[test]
    fn capture_context_exe_copy_of_deleted_binary() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("vanishing-sleep");
        fs::copy("/bin/sleep", &bin).unwrap();
        let mut child = std::process::Command::new(&bin).arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        // Wait for the exec to take.
        for _ in 0..500 {
            if fs::read_link(format!("/proc/{pid}/exe"))
                .map(|p| p == bin)
                .unwrap_or(false)
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        fs::remove_file(&bin).unwrap();
        let c = process_context(pid, &ContextOptions::default(), true);
        assert!(c.exe_deleted, "{:?}", c.exe);
        let dest = dir.path().join("exe");
        let copy = copy_exe(pid, &dest, u64::MAX).unwrap();
        let orig = fs::read("/bin/sleep").unwrap();
        assert_eq!(fs::read(&dest).unwrap(), orig);
        assert_eq!(copy.size, orig.len() as u64);
        assert_eq!(Some(copy.sha256.clone()), c.exe_sha256);
        assert_eq!(copy.sha256, copy.copied_sha256);
        // Capped copy: prefix copied, full hash still right.
        let cut = copy_exe(pid, &dir.path().join("exe-cut"), 1000).unwrap();
        assert_eq!(cut.copied, 1000);
        assert_eq!(cut.sha256, copy.sha256);
        assert_ne!(cut.copied_sha256, copy.sha256);
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn capture_context_limits_parse_and_gone_process() {
        let s = "Limit                     Soft Limit           Hard Limit           Units     \n\
                 Max cpu time              unlimited            unlimited            seconds   \n\
                 Max open files            1024                 524288               files     \n\
                 Max nice priority         0                    0                    \n";
        let l = parse_limits(s);
        assert_eq!(l.len(), 3);
        assert_eq!(
            l[1],
            Limit {
                name: "Max open files".into(),
                soft: "1024".into(),
                hard: "524288".into(),
                units: "files".into()
            }
        );
        assert_eq!(l[2].units, "");
        let c = process_context(i32::MAX - 2, &ContextOptions::default(), true);
        assert!(c.errors.contains_key("stat") && c.errors.contains_key("exe"));
    }
}
