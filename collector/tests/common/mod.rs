//! Test harness: a fresh PKI, the real `vigil-collector serve` binary on a
//! loopback port, and mTLS clients.

#![allow(dead_code)]

pub mod postgres;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use vigil_collector::client;
use vigil_collector::pki::{self, ClientFiles, InitPki, Role};
use vigil_proto::ingest_client::IngestClient;
use vigil_proto::query_client::QueryClient;

/// A PKI directory with agents agent-1, agent-2 and analyst "analyst".
pub struct Pki {
    dir: Dir,
}

enum Dir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        pki::init_pki(&InitPki {
            dir: dir.path().to_path_buf(),
            agents: vec!["agent-1".into(), "agent-2".into()],
            analysts: vec!["analyst".into()],
            ..Default::default()
        })
        .unwrap();
        Pki {
            dir: Dir::Temp(dir),
        }
    }

    /// A PKI kept in `dir` (made there once, reused after): it outlives
    /// the test process, as a collector's does.
    pub fn at(dir: &Path) -> Pki {
        if !dir.join("ca.pem").exists() {
            pki::init_pki(&InitPki {
                dir: dir.to_path_buf(),
                agents: vec!["agent-1".into(), "agent-2".into()],
                analysts: vec!["analyst".into()],
                ..Default::default()
            })
            .unwrap();
        }
        Pki {
            dir: Dir::Kept(dir.to_path_buf()),
        }
    }

    pub fn path(&self) -> &Path {
        match &self.dir {
            Dir::Temp(d) => d.path(),
            Dir::Kept(d) => d,
        }
    }

    pub fn agent(&self, name: &str) -> ClientFiles {
        ClientFiles::in_pki(self.path(), Role::Agent, name)
    }

    pub fn analyst(&self) -> ClientFiles {
        ClientFiles::in_pki(self.path(), Role::Analyst, "analyst")
    }
}

/// The index backend a test collector uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The embedded default.
    Sqlite,
    /// A fresh database on the test PostgreSQL server.
    Postgres,
}

impl Backend {
    /// `serve` arguments selecting this backend (a new database each call).
    pub fn args(self) -> Vec<String> {
        match self {
            Backend::Sqlite => vec![],
            Backend::Postgres => vec![
                "--store".into(),
                "postgres".into(),
                "--postgres".into(),
                postgres::database(),
            ],
        }
    }
}

/// Generates `sqlite::NAME` and `postgres::NAME` tests calling
/// `NAME(Backend)`.
#[macro_export]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::common::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::common::Backend::Postgres).await
                }
            )*
        }
    };
}

/// The collector binary: `VIGIL_COLLECTOR_BIN` (a packaged one, where these
/// tests run on another machine) or the one cargo built with them.
pub fn collector_bin() -> PathBuf {
    std::env::var_os("VIGIL_COLLECTOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_vigil-collector").into())
}

/// A running `vigil-collector serve`; killed on drop.
pub struct Collector {
    pub child: Child,
    /// The collector's stderr (printed when the test fails).
    pub log: PathBuf,
    _log_dir: std::sync::Arc<tempfile::TempDir>,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub pki_dir: PathBuf,
    pub extra: Vec<String>,
}

impl Collector {
    /// Starts on a free port with `backend`.
    pub fn start(backend: Backend, pki: &Pki, data_dir: &Path, extra: &[&str]) -> Collector {
        let mut args = backend.args();
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::start_on(pki.path(), data_dir, "127.0.0.1:0", &args)
    }

    /// Starts on `listen`, waits until it listens.
    pub fn start_on(pki_dir: &Path, data_dir: &Path, listen: &str, extra: &[&str]) -> Collector {
        let log_dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
        Self::start_logged(pki_dir, data_dir, listen, extra, log_dir)
    }

    fn start_logged(
        pki_dir: &Path,
        data_dir: &Path,
        listen: &str,
        extra: &[&str],
        log_dir: std::sync::Arc<tempfile::TempDir>,
    ) -> Collector {
        let log = log_dir.path().join("collector.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = Command::new(collector_bin());
        // The collector dies with the test thread that started it, even when
        // the test process is killed before any Drop runs.
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(data_dir)
            .arg("--pki")
            .arg(pki_dir)
            .args(extra)
            .env("VIGIL_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("starting vigil-collector");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let line = rx
            // Long enough for an emulated guest (cargo xtask vm-test).
            .recv_timeout(Duration::from_secs(120))
            .expect("collector did not print its address");
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        Collector {
            child,
            log,
            _log_dir: log_dir,
            addr,
            data_dir: data_dir.to_path_buf(),
            pki_dir: pki_dir.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// SIGKILL, wait.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts again on the same port and data.
    pub fn restart(mut self) -> Collector {
        self.kill();
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        Collector::start_on(
            &self.pki_dir,
            &self.data_dir,
            &self.addr.to_string(),
            &extra,
        )
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub async fn channel(&self, files: &ClientFiles) -> Channel {
        client::connect(&self.url(), files, None).await.unwrap()
    }

    pub async fn ingest(&self, pki: &Pki, agent: &str) -> IngestClient<Channel> {
        IngestClient::new(self.channel(&pki.agent(agent)).await)
            .max_encoding_message_size(usize::MAX)
    }

    pub async fn query(&self, pki: &Pki) -> QueryClient<Channel> {
        QueryClient::new(self.channel(&pki.analyst()).await)
            .max_decoding_message_size(client::MAX_CLIENT_MESSAGE)
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("--- collector log ({}):\n{log}", self.log.display());
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift).
pub fn noise(raw_len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut raw = Vec::with_capacity(raw_len);
    while raw.len() < raw_len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        raw.extend_from_slice(&x.to_le_bytes());
    }
    raw.truncate(raw_len);
    raw
}

/// A real evidence bundle (sealed by the agent's own bundle code) whose
/// `core` artifact is `raw_len` pseudo-random bytes: the first of its own
/// chain, captured from `pid` for a detection at `detection_time`.
pub fn sealed_bundle(raw_len: usize, seed: u64, pid: u32, detection_time: &str) -> Vec<u8> {
    sealed_bundle_as("test-agent", raw_len, seed, pid, detection_time)
}

/// [`sealed_bundle`] sealed by an agent that calls itself `agent_id`.
pub fn sealed_bundle_as(
    agent_id: &str,
    raw_len: usize,
    seed: u64,
    pid: u32,
    detection_time: &str,
) -> Vec<u8> {
    let detection = serde_json::json!({
        "time": detection_time,
        "rule": "web_shell",
        "process": { "pid": pid },
    });
    seal(agent_id, noise(raw_len, seed), pid, detection)
}

/// A sealed bundle whose core is `len` zero bytes: it compresses to
/// almost nothing (a decompression bomb, at small scale).
pub fn zero_bundle(len: usize) -> Vec<u8> {
    let detection = serde_json::json!({ "time": "2026-11-26T14:08:28Z", "rule": "r" });
    seal("test-agent", vec![0u8; len], 7, detection)
}

/// A real bundle sealed by the agent's own bundle code: one `core`
/// artifact holding `core`, the first of `agent_id`'s chain, captured from
/// `pid` for `detection`.
fn seal(agent_id: &str, core: Vec<u8>, pid: u32, detection: serde_json::Value) -> Vec<u8> {
    let root = tempfile::tempdir().unwrap();
    seal_in(root.path(), agent_id, core, pid, detection)
}

/// [`seal`] with the chain state (and work directories) under `root`: the
/// next link of the chain kept there.
pub fn seal_in(
    root: &Path,
    agent_id: &str,
    core: Vec<u8>,
    pid: u32,
    detection: serde_json::Value,
) -> Vec<u8> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let work = tempfile::Builder::new()
        .prefix(&format!("seal-{n}-"))
        .tempdir_in(root)
        .unwrap();
    let cfg = vigil_bundle::BundleConfig {
        out_dir: work.path().join("out"),
        state_dir: root.join("state"),
        agent_id: agent_id.into(),
        zstd_level: 1,
        keep_dir: false,
    };
    let mut b = vigil_bundle::BundleBuilder::create(&work.path().join("b")).unwrap();
    std::fs::write(b.path_of("core"), core).unwrap();
    b.add_file("core", "core").unwrap();
    let m = vigil_bundle::Manifest {
        format: String::new(),
        seq: 0,
        prev_bundle_sha256: None,
        agent: vigil_bundle::AgentIdentity::current(agent_id),
        times: Default::default(),
        acquisition: vigil_bundle::Acquisition {
            method: "test".into(),
            tool: "collector tests".into(),
            tool_version: "0".into(),
            details: serde_json::Value::Null,
        },
        subject: serde_json::json!({ "pid": pid }),
        detection,
        artifacts: vec![],
    };
    let sealed = b.seal(&cfg, m).unwrap();
    std::fs::read(sealed.archive).unwrap()
}

/// One agent's chain of bundles, sealed by the agent's own code with its
/// chain state in a directory of its own (copy it to fork the chain).
pub struct AgentChain {
    pub root: tempfile::TempDir,
    pub agent_id: String,
}

impl AgentChain {
    pub fn new(agent_id: &str) -> AgentChain {
        AgentChain {
            root: tempfile::tempdir().unwrap(),
            agent_id: agent_id.to_string(),
        }
    }

    /// The next bundle of the chain (core: 4 KiB of noise from `seed`).
    pub fn next(&self, seed: u64) -> Vec<u8> {
        next_in_chain(self.root.path(), &self.agent_id, seed)
    }

    /// A second chain that continues from where this one is now.
    pub fn fork(&self) -> AgentChain {
        let f = AgentChain::new(&self.agent_id);
        std::fs::create_dir_all(f.root.path().join("state")).unwrap();
        std::fs::copy(
            self.root.path().join("state/chain.json"),
            f.root.path().join("state/chain.json"),
        )
        .unwrap();
        f
    }
}

/// The next bundle of `agent_id`'s chain whose state is kept under `root`
/// (core: 4 KiB of noise from `seed`).
pub fn next_in_chain(root: &Path, agent_id: &str, seed: u64) -> Vec<u8> {
    let detection = serde_json::json!({
        "time": "2026-11-26T14:08:28Z", "rule": "web_shell", "process": { "pid": 4242 },
    });
    std::fs::create_dir_all(root).unwrap();
    seal_in(root, agent_id, noise(4096, seed), 4242, detection)
}

/// The detached signature of bundle `id` made with `agent`'s certificate
/// key from `pki` (what the agent sends with its upload).
pub fn sign(pki: &Path, agent: &str, id: &str) -> Vec<u8> {
    let f = ClientFiles::in_pki(pki, Role::Agent, agent);
    let key = vigil_bundle::sign::SigningKey::from_pem(
        &std::fs::read_to_string(f.cert).unwrap(),
        &std::fs::read_to_string(f.key).unwrap(),
    )
    .unwrap();
    key.sign_bundle(id).unwrap().to_bytes()
}

/// A bundle (see [`sealed_bundle`]) of about `raw_len` bytes, different per
/// `seed`.
pub fn bundle(raw_len: usize, seed: u64) -> Vec<u8> {
    sealed_bundle(raw_len, seed, 4242, "2026-11-26T14:08:28.972144046Z")
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Every file under `dir`, relative, sorted.
pub fn files_under(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(base, &p, out);
                } else {
                    out.push(p.strip_prefix(base).unwrap().display().to_string());
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` over HTTP/1.0 with `extra` header lines; (status, body).
pub fn http_get(addr: SocketAddr, path: &str, extra: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{extra}\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

/// The value of the first metric line starting with `prefix` on the
/// collector's `/metrics` at `port` (0 when absent).
pub fn metric(port: u16, prefix: &str) -> f64 {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let (_, body) = http_get(addr, "/metrics", "");
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
