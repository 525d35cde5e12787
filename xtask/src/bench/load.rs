//! The benchmark's workloads: threads that repeat one operation as fast as
//! they can, counting the operations that completed. The same load runs in
//! every arm of a round (no sensor, vigil, each `--compare` command), so the
//! arms differ only in the sensor.
//!
//! - `exec`: spawn and wait for a program (default `/bin/true`);
//! - `connect`: open a loopback TCP connection to a local server and reset
//!   it (no TIME_WAIT, so the rate is not bounded by ephemeral ports);
//! - `write`: create a new file (on tmpfs), write 64 bytes, close it; the files are
//!   removed after the window, so every operation is a new file (an inode
//!   recycled by an unlink inside the window would let a per-file
//!   de-duplication hide the cost);
//! - `mixed`: one iteration compiles a small C file with `cc` and makes
//!   [`HTTP_PER_ITERATION`] HTTP requests to a local server in another
//!   process (a build beside a web server under load);
//! - `churn`: [`LoadOptions::churn_live`] processes stay alive (`sleep`),
//!   and one operation replaces the oldest with a new one (an exit, a fork
//!   and an exec): the agent's memory with a large, changing process table.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::util;

/// HTTP requests per `mixed` iteration.
pub const HTTP_PER_ITERATION: u32 = 20;

/// A workload kind (`--workload`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Spawn and wait for a program.
    Exec,
    /// Loopback TCP connects.
    Connect,
    /// New files created and written.
    Write,
    /// A small C build beside an HTTP server under load.
    Mixed,
    /// A large population of live processes, the oldest replaced one by one
    /// (not in the default set: it is meant for long windows).
    Churn,
}

impl Workload {
    /// Every workload, in the order a full run takes them.
    pub const ALL: [Workload; 4] = [
        Workload::Exec,
        Workload::Connect,
        Workload::Write,
        Workload::Mixed,
    ];

    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Exec => "exec",
            Workload::Connect => "connect",
            Workload::Write => "write",
            Workload::Mixed => "mixed",
            Workload::Churn => "churn",
        }
    }

    /// What one counted operation is.
    pub fn op(self) -> &'static str {
        match self {
            Workload::Exec => "exec",
            Workload::Connect => "connect",
            Workload::Write => "file",
            Workload::Mixed => "iteration",
            Workload::Churn => "replacement",
        }
    }
}

/// What the workloads need from the run.
pub struct LoadOptions {
    /// Program `exec` spawns.
    pub program: PathBuf,
    /// A directory the workloads may fill and empty.
    pub scratch: PathBuf,
    /// Where the write workload creates its files: a tmpfs where there is
    /// one (`/dev/shm`), so that it measures the open/write path and not
    /// the disk's journal, which slows every later window down.
    pub files: PathBuf,
    /// The local server `connect` and `mixed` talk to.
    pub server: Option<ServerAddrs>,
    /// Live processes `churn` keeps (all threads together).
    pub churn_live: usize,
    /// Spawned programs get this process's environment (under `cargo
    /// xtask`, cargo's: dozens of variables, and an `LD_LIBRARY_PATH` that
    /// makes every exec's loader try more directories) instead of only
    /// [`LOAD_ENV`]'s variables.
    pub inherit_env: bool,
}

/// The environment of the programs the load spawns, unless inherited: what
/// a service's processes typically have.
pub const LOAD_ENV: &[&str] = &["PATH", "HOME", "LANG"];

/// A command for `program` with the load's environment.
fn command(program: &Path, inherit_env: bool) -> Command {
    let mut cmd = Command::new(program);
    if !inherit_env {
        cmd.env_clear();
        for (k, v) in std::env::vars_os().filter(|(k, _)| LOAD_ENV.iter().any(|e| k == e)) {
            cmd.env(k, v);
        }
    }
    cmd
}

/// Running load threads.
pub struct Load {
    count: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    done: mpsc::Receiver<()>,
    handles: Vec<JoinHandle<()>>,
    started: Instant,
    cleanup: Vec<PathBuf>,
}

/// What a load did.
pub struct LoadResult {
    /// Operations completed before the stop.
    pub ops: u64,
    /// Seconds from start to stop.
    pub seconds: f64,
    /// Operations that failed.
    pub errors: u64,
}

/// One thread's operation: `Ok` counts it, `Err` counts an error.
type Op = Box<dyn FnMut() -> std::io::Result<()> + Send>;

impl Load {
    /// Starts `threads` threads of `workload`.
    pub fn start(workload: Workload, threads: usize, opts: &LoadOptions) -> Result<Self> {
        let count = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, done) = mpsc::channel();
        let mut handles = Vec::new();
        let mut cleanup = Vec::new();
        for i in 0..threads.max(1) {
            let mut op = make_op(workload, (i, threads.max(1)), opts, &mut cleanup)?;
            let (count, errors, stop, tx) =
                (count.clone(), errors.clone(), stop.clone(), tx.clone());
            let handle = std::thread::Builder::new()
                .name(format!("load-{i}"))
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match op() {
                            Ok(()) => {
                                count.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                                std::thread::sleep(Duration::from_millis(1));
                            }
                        }
                    }
                    let _ = tx.send(());
                })
                .context("cannot start a load thread")?;
            handles.push(handle);
        }
        Ok(Self {
            count,
            errors,
            stop,
            done,
            handles,
            started: Instant::now(),
            cleanup,
        })
    }

    /// Operations so far.
    pub fn ops(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops the threads; counts only the operations completed before the
    /// stop. Removes what the load created.
    pub fn stop(mut self) -> Result<LoadResult> {
        self.stop.store(true, Ordering::Relaxed);
        let seconds = self.started.elapsed().as_secs_f64();
        let ops = self.count.load(Ordering::Relaxed);
        let errors = self.errors.load(Ordering::Relaxed);
        for _ in 0..self.handles.len() {
            self.done.recv_timeout(Duration::from_secs(20)).context(
                "a load thread did not stop within 20 s (a spawned program or a connection hangs?)",
            )?;
        }
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
        for dir in self.cleanup.drain(..) {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Ok(LoadResult {
            ops,
            seconds,
            errors,
        })
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Thread `thread.0` of `thread.1`'s operation.
fn make_op(
    workload: Workload,
    (thread, threads): (usize, usize),
    opts: &LoadOptions,
    cleanup: &mut Vec<PathBuf>,
) -> Result<Op> {
    let server = || {
        opts.server
            .context("this workload needs the local server (internal error)")
    };
    Ok(match workload {
        Workload::Exec => {
            let program = opts.program.clone();
            let inherit = opts.inherit_env;
            Box::new(move || spawn_wait(command(&program, inherit)))
        }
        Workload::Connect => {
            let addr = server()?.connect;
            Box::new(move || connect_reset(addr))
        }
        Workload::Write => {
            let dir = opts.files.join(format!("write-{thread}"));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            cleanup.push(dir.clone());
            let mut n = 0u64;
            Box::new(move || {
                n += 1;
                let mut f = std::fs::File::create(dir.join(format!("f{n}")))?;
                f.write_all(&[b'x'; 64])
            })
        }
        Workload::Churn => {
            let sleep =
                util::which("sleep").context("the churn workload runs `sleep`, not in PATH")?;
            let mut live = Population::start(&sleep, opts.churn_live / threads, opts.inherit_env)?;
            Box::new(move || live.replace_oldest())
        }
        Workload::Mixed => {
            let addr = server()?.http;
            let dir = opts.scratch.join(format!("build-{thread}"));
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            cleanup.push(dir.clone());
            let src = dir.join("unit.c");
            std::fs::write(&src, C_UNIT)?;
            let cc = util::which("cc").context(
                "the mixed workload compiles with `cc`, which is not in PATH (apt install gcc)",
            )?;
            let inherit = opts.inherit_env;
            Box::new(move || {
                let mut cmd = command(&cc, inherit);
                cmd.current_dir(&dir)
                    .args(["-O1", "-c", "unit.c", "-o", "unit.o"]);
                spawn_wait(cmd)?;
                for _ in 0..HTTP_PER_ITERATION {
                    http_get(addr)?;
                }
                Ok(())
            })
        }
    })
}

/// Live `sleep` processes, oldest first; all are killed and reaped when
/// dropped.
struct Population {
    program: PathBuf,
    inherit_env: bool,
    live: VecDeque<Child>,
}

impl Population {
    /// Starts `n` processes.
    fn start(program: &Path, n: usize, inherit_env: bool) -> Result<Self> {
        let mut p = Self {
            program: program.to_path_buf(),
            inherit_env,
            live: VecDeque::with_capacity(n),
        };
        for _ in 0..n {
            let child = p
                .spawn()
                .with_context(|| format!("cannot start {} (process limit?)", program.display()))?;
            p.live.push_back(child);
        }
        Ok(p)
    }

    fn spawn(&self) -> std::io::Result<Child> {
        command(&self.program, self.inherit_env)
            .arg("3600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
    }

    /// Kills and reaps the oldest, starts a new one.
    fn replace_oldest(&mut self) -> std::io::Result<()> {
        if let Some(mut old) = self.live.pop_front() {
            old.kill()?;
            old.wait()?;
        }
        let child = self.spawn()?;
        self.live.push_back(child);
        Ok(())
    }
}

impl Drop for Population {
    fn drop(&mut self) {
        for c in &mut self.live {
            let _ = c.kill();
        }
        for mut c in self.live.drain(..) {
            let _ = c.wait();
        }
    }
}

/// A translation unit big enough that compiling it is real work.
const C_UNIT: &str = r#"
#include <stdio.h>
#include <string.h>
struct item { char name[32]; int weight; };
static int cmp(const void *a, const void *b) {
    const struct item *x = a, *y = b;
    return x->weight - y->weight ? x->weight - y->weight : strcmp(x->name, y->name);
}
int sort_items(struct item *items, int n) {
    qsort(items, n, sizeof *items, cmp);
    int total = 0;
    for (int i = 0; i < n; i++) total += items[i].weight * (i + 1);
    return total;
}
int main(void) {
    struct item items[3] = {{"b", 2}, {"a", 2}, {"c", 1}};
    printf("%d\n", sort_items(items, 3));
    return 0;
}
"#;

fn spawn_wait(mut cmd: Command) -> std::io::Result<()> {
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("exited {status}")))
    }
}

/// Connects, reads the server's greeting byte (so each client waits for
/// its connection to be accepted: the accept queue never overflows into
/// SYN retransmits) and resets (SO_LINGER 0: the port is free again at
/// once, no TIME_WAIT on either side).
fn connect_reset(addr: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut greeting = [0u8; 1];
    s.read_exact(&mut greeting)?;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a correctly sized linger struct.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn http_get(addr: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")?;
    let mut body = Vec::new();
    s.read_to_end(&mut body)?;
    if body.starts_with(b"HTTP/1.0 200") {
        Ok(())
    } else {
        Err(std::io::Error::other("bad HTTP reply"))
    }
}

// ---------------------------------------------------------------------------
// The local server, in its own process (`xtask bench-serve`): a web server
// is another program on a real node, and its children must not look like
// the load generator's.

/// Where the local server listens.
#[derive(Clone, Copy, Debug)]
pub struct ServerAddrs {
    /// HTTP/1.0.
    pub http: SocketAddr,
    /// Greets each connection with one byte and waits for the client to go.
    pub connect: SocketAddr,
}

/// The server process; killed on drop.
pub struct Server {
    child: Child,
    /// Where it listens.
    pub addrs: ServerAddrs,
}

impl Server {
    /// Starts `xtask bench-serve` and reads the address it prints.
    pub fn start(threads: usize) -> Result<Server> {
        let exe = std::env::current_exe().context("cannot find the xtask executable")?;
        let mut cmd = Command::new(exe);
        cmd.arg("bench-serve")
            .arg("--threads")
            .arg(threads.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        util::die_with_parent(&mut cmd, libc::SIGKILL);
        let mut child = cmd.spawn().context("cannot start the benchmark's server")?;
        let stdout = child.stdout.take().expect("piped");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("reading the server's address")?;
        let mut parsed = line.split_whitespace().map(str::parse::<SocketAddr>);
        match (parsed.next(), parsed.next()) {
            (Some(Ok(http)), Some(Ok(connect))) => Ok(Server {
                child,
                addrs: ServerAddrs { http, connect },
            }),
            _ => {
                let _ = child.kill();
                bail!("the benchmark's server printed {line:?}, not two addresses");
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `xtask bench-serve`: HTTP/1.0 on a free loopback port and a greeting
/// server on another (both printed on stdout, in that order), `threads`
/// accepting threads each, until killed.
pub fn serve(threads: usize) -> Result<()> {
    let http = TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    let greet = TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    println!("{} {}", http.local_addr()?, greet.local_addr()?);
    std::io::stdout().flush()?;
    let mut handles = Vec::new();
    for _ in 0..threads.max(1) {
        let l = http.try_clone()?;
        handles.push(std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let _ = answer(s);
            }
        }));
        let l = greet.try_clone()?;
        handles.push(std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                // Greet, then wait for the client's reset (or EOF).
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                if s.write_all(b"!").is_ok() {
                    let _ = s.read(&mut [0u8; 16]);
                }
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn answer(mut s: TcpStream) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut req = Vec::with_capacity(256);
    let mut buf = [0u8; 512];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
        if req.len() > 8192 {
            return Ok(());
        }
    }
    s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
}

/// Makes `path` an executable copy of `from` (the detection probe).
pub fn copy_executable(from: &Path, path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::copy(from, path)
        .with_context(|| format!("cannot copy {} to {}", from.display(), path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}
