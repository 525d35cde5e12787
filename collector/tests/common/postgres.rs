//! A real PostgreSQL server for tests: Debian's `postgresql` package,
//! started once per test process (initdb into a temp directory, listening
//! on a Unix socket only), one fresh database per test.
//!
//! The server dies with the test process: it is started from a thread that
//! lives until the process exits, with `PR_SET_PDEATHSIG`. Leftover
//! directories of dead test processes are removed at the next start.
//!
//! Used by the store's unit tests (`#[path]`) and by the end-to-end tests.

#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

struct Server {
    sock: PathBuf,
    bin: PathBuf,
}

static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
static NEXT_DB: AtomicUsize = AtomicUsize::new(0);

/// The newest `/usr/lib/postgresql/N/bin`.
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

fn postgres_ids() -> Result<(u32, u32), String> {
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| e.to_string())?;
    passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .and_then(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
        })
        .ok_or_else(|| "no postgres user in /etc/passwd".to_string())
}

fn remove_stale_dirs(tmp: &Path) {
    for e in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("vigil-pgtest-")) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn start() -> Result<Server, String> {
    let bin = bin_dir().ok_or(
        "PostgreSQL is not installed: apt-get install postgresql (the tests start their own server)",
    )?;
    let (uid, gid) = postgres_ids()?;
    let tmp = std::env::temp_dir();
    remove_stale_dirs(&tmp);
    let dir = tmp.join(format!(
        "vigil-pgtest-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let (data, sock) = (dir.join("data"), dir.join("sock"));
    for d in [&dir, &sock] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        std::os::unix::fs::chown(d, Some(uid), Some(gid))
            .map_err(|e| format!("chown {}: {e}", d.display()))?;
    }
    let out = Command::new(bin.join("initdb"))
        .args([
            "--no-sync",
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "-D",
        ])
        .arg(&data)
        .uid(uid)
        .gid(gid)
        .output()
        .map_err(|e| format!("initdb: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let (postgres, log) = (bin.join("postgres"), dir.join("postgres.log"));
    let sock2 = sock.clone();
    std::thread::Builder::new()
        .name("postgres".into())
        .spawn(move || {
            let log = match std::fs::File::create(&log) {
                Ok(f) => f,
                Err(e) => return tx.send(Err(e.to_string())).unwrap_or(()),
            };
            let mut cmd = Command::new(postgres);
            cmd.arg("-D")
                .arg(&data)
                .arg("-k")
                .arg(&sock2)
                .args([
                    "-c",
                    "listen_addresses=",
                    "-F",
                    "-c",
                    "full_page_writes=off",
                ])
                .args(["-c", "synchronous_commit=off", "-c", "max_connections=200"])
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log handle"))
                .stderr(log)
                .uid(uid)
                .gid(gid);
            // SAFETY: prctl is async-signal-safe; runs in the child after
            // the uid change (which would clear it) and before exec.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            match cmd.spawn() {
                Ok(mut child) => {
                    let _ = tx.send(Ok(()));
                    // This thread is the server's parent until the process
                    // exits.
                    let _ = child.wait();
                }
                Err(e) => {
                    let _ = tx.send(Err(format!("starting postgres: {e}")));
                }
            }
        })
        .map_err(|e| e.to_string())?;
    rx.recv().map_err(|e| e.to_string())??;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.join(".s.PGSQL.5432").exists() {
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
            return Err(format!("postgres did not start: {log}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Ready for queries (the socket appears slightly before).
    let server = Server { sock, bin };
    for _ in 0..100 {
        if psql(&server, "postgres", "SELECT 1").is_ok() {
            return Ok(server);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err("postgres does not answer".into())
}

fn psql(s: &Server, db: &str, sql: &str) -> Result<(), String> {
    let out = Command::new(s.bin.join("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-h"])
        .arg(&s.sock)
        .args(["-d", db, "-c", sql])
        .output()
        .map_err(|e| format!("psql: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A connection string (libpq key=value form) to a new, empty database.
/// Panics with the reason when PostgreSQL is unavailable.
pub fn database() -> String {
    let server = match SERVER.get_or_init(start) {
        Ok(s) => s,
        Err(e) => panic!("test PostgreSQL server: {e}"),
    };
    let name = format!(
        "t{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::SeqCst)
    );
    psql(server, "postgres", &format!("CREATE DATABASE {name}")).expect("CREATE DATABASE");
    format!("host={} user=postgres dbname={name}", server.sock.display())
}
