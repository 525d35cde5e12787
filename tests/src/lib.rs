//! Helpers for vigil's end-to-end tests: start the real `vigil-agent`
//! binary (which loads the real eBPF programs into the running kernel), read
//! its JSON events and its metrics.
//!
//! The agent binary comes from `VIGIL_AGENT_BIN` (set by `cargo xtask test`)
//! or `target/debug/vigil-agent`. Tests need root.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod collector;
pub mod scenarios;

/// Path of the agent binary under test.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VIGIL_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/vigil-agent");
    assert!(
        p.exists(),
        "agent binary not found at {}: run the suite with `cargo xtask test` (it builds the agent first)",
        p.display()
    );
    p
}

/// Fails the test early, with a clear message, when not root.
pub fn require_root() {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "vigil's end-to-end tests load eBPF programs and must run as root"
    );
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A unique marker string for this test run.
/// Whether the `--detections-json` file at `path` holds a detection of
/// `rule` for process `pid`.
pub fn detected(path: &Path, pid: u32, rule: &str) -> bool {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .any(|d| d["process"]["pid"].as_u64() == Some(u64::from(pid)) && d["rule"] == rule)
}

pub fn marker(tag: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("vigil-{tag}-{}-{t}", std::process::id())
}

/// A running agent; stopped with SIGINT on drop.
pub struct Agent {
    child: Option<Child>,
    /// Directory holding the agent's output.
    pub dir: tempfile::TempDir,
    /// The JSON lines events file.
    pub events_path: PathBuf,
    /// Metrics address.
    pub metrics_addr: String,
    stderr_lines: mpsc::Receiver<String>,
    startup_log: Vec<String>,
    /// Events parsed so far: the file is read from where the last read
    /// stopped, so waiting on a large events file costs only its new lines.
    seen: std::sync::Mutex<EventCache>,
}

/// The events file as read so far.
#[derive(Default)]
struct EventCache {
    /// Bytes of the file consumed (complete lines only).
    offset: u64,
    /// Parsed events, in file order.
    events: Vec<Value>,
}

impl Agent {
    /// Starts the agent and waits until it reports ready (at most 120 s: the
    /// first load verifies every program).
    pub fn start(extra: &[&str]) -> Agent {
        Agent::start_env(extra, &[])
    }

    /// [`Agent::start`] with extra environment variables.
    pub fn start_env(extra: &[&str], env: &[(&str, &str)]) -> Agent {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("vigil-e2e")
            .tempdir()
            .expect("temp dir");
        let events_path = dir.path().join("events.jsonl");
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(agent_bin());
        cmd.arg("--events-json").arg(&events_path);
        // Defaults, not the machine's /etc/vigil/agent.toml (a VM or host
        // with the package installed has one): an empty config file, which
        // a `-c` in `extra` (or VIGIL_AGENT_CONFIG in `env`) replaces.
        let empty_cfg = dir.path().join("defaults.toml");
        // An emulated machine (vm-test's guest under TCG runs code tens of
        // times slower) raises the capture deadline, a safety bound that
        // assumes real hardware, through VIGIL_TEST_CAPTURE_DEADLINE_MS.
        let defaults = std::env::var("VIGIL_TEST_CAPTURE_DEADLINE_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(|ms| format!("capture_deadline_ms = {ms}\n"))
            .unwrap_or_default();
        std::fs::write(&empty_cfg, defaults).expect("writing the defaults config");
        cmd.env("VIGIL_AGENT_CONFIG", &empty_cfg);
        // The caller may choose the capture directory (e.g. a small file
        // system); else one in the temp dir.
        if !extra.contains(&"--capture-dir") {
            cmd.arg("--capture-dir").arg(dir.path().join("capture"));
        }
        let mut child = cmd
            .arg("--evidence-json")
            .arg(dir.path().join("evidence.jsonl"))
            .arg("--metrics-addr")
            .arg(&metrics_addr)
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning vigil-agent");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut log = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let ready = line.contains("vigil-agent: ready");
                    log.push(line);
                    if ready {
                        break;
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("agent did not become ready; its log:\n{}", log.join("\n"));
                }
            }
        }
        Agent {
            child: Some(child),
            dir,
            events_path,
            metrics_addr,
            stderr_lines: rx,
            startup_log: log,
            seen: Default::default(),
        }
    }

    /// The agent's log up to "ready" (hooks attached or refused, and why).
    pub fn startup_log(&self) -> &[String] {
        &self.startup_log
    }

    /// Every evidence capture outcome written so far.
    pub fn evidence(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("evidence.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Reads the lines appended to the events file since the last read
    /// (a line still being written waits for the next read), and runs `f`
    /// on every event parsed so far.
    fn with_events<R>(&self, f: impl FnOnce(&[Value]) -> R) -> R {
        use std::io::{Seek, SeekFrom};
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut fresh = Vec::new();
        if let Ok(mut file) = std::fs::File::open(&self.events_path) {
            if file.seek(SeekFrom::Start(seen.offset)).is_ok() {
                let _ = file.read_to_end(&mut fresh);
            }
        }
        let complete = fresh.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        for line in fresh[..complete].split(|&b| b == b'\n') {
            if line.is_empty() {
                continue;
            }
            let v = serde_json::from_slice(line).unwrap_or_else(|e| {
                panic!("bad JSON line {:?}: {e}", String::from_utf8_lossy(line))
            });
            seen.events.push(v);
        }
        seen.offset += complete as u64;
        f(&seen.events)
    }

    /// Every event written so far.
    pub fn events(&self) -> Vec<Value> {
        self.with_events(<[Value]>::to_vec)
    }

    /// Waits (at most `timeout`) until `pred` holds for the events seen.
    pub fn wait_until(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let done = Instant::now() > deadline;
            if let Some(evs) = self.with_events(|evs| (pred(evs) || done).then(|| evs.to_vec())) {
                return evs;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (at most 60 s: a debug agent may be busy with a burst) for the
    /// first event matching `pred`; panics with context if none.
    pub fn expect_event(&self, what: &str, mut pred: impl FnMut(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(e) = self.with_events(|evs| evs.iter().find(|e| pred(e)).cloned()) {
                return e;
            }
            if Instant::now() > deadline {
                let (n, last) = self.with_events(|evs| (evs.len(), evs.last().cloned()));
                let drops: Vec<String> = self
                    .try_metrics()
                    .unwrap_or_else(|e| format!("no metrics: {e}"))
                    .lines()
                    .filter(|l| {
                        l.starts_with("no metrics")
                            || (!l.starts_with('#')
                                && (l.contains("dropped") || l.contains("decode_errors")))
                    })
                    .map(String::from)
                    .collect();
                panic!(
                    "no event for {what} (events file {}, {n} events, the last: {}; {})",
                    self.events_path.display(),
                    last.map_or_else(|| "none".into(), |v| v.to_string()),
                    drops.join(", ")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The Prometheus exposition text.
    pub fn metrics(&self) -> String {
        self.try_metrics().expect("reading the agent's metrics")
    }

    /// The Prometheus exposition text, or why it could not be read.
    pub fn try_metrics(&self) -> std::io::Result<String> {
        let mut s = TcpStream::connect(&self.metrics_addr)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    /// A metric sample's value (`name{labels}` exactly as exposed), 0 if absent.
    pub fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent stopped").id()
    }

    /// Kills the agent with SIGKILL, as a crash or the OOM killer would
    /// (nothing of its shutdown runs), and reaps it.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("agent already stopped");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Log lines the agent wrote since the last call (or since it was ready).
    pub fn log_lines(&self) -> Vec<String> {
        self.stderr_lines.try_iter().collect()
    }

    /// Stops the agent with SIGINT; returns its exit status and the rest of
    /// its log.
    pub fn stop(&mut self) -> (std::process::ExitStatus, Vec<String>) {
        let mut child = self.child.take().expect("agent already stopped");
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        // The agent's own shutdown bounds: up to 30 s for a capture in
        // progress to finish (its process is released either way), 3 s for
        // the shipper's flush, plus the drains; an emulated machine is slow.
        let limit = Duration::from_secs(60);
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let rest: Vec<String> = self.stderr_lines.try_iter().collect();
                let tail = &rest[rest.len().saturating_sub(40)..];
                panic!(
                    "agent did not stop within {limit:?} of SIGINT; the end of its log:\n{}",
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let rest = self.stderr_lines.try_iter().collect();
        (status, rest)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// Field accessors for event JSON.
pub trait EventExt {
    /// "type".
    fn kind(&self) -> &str;
    /// "pid".
    fn pid(&self) -> u64;
    /// A string field.
    fn str_of(&self, k: &str) -> &str;
    /// argv as strings.
    fn argv(&self) -> Vec<String>;
}

impl EventExt for Value {
    fn kind(&self) -> &str {
        self["type"].as_str().unwrap_or("")
    }
    fn pid(&self) -> u64 {
        self["pid"].as_u64().unwrap_or(0)
    }
    fn str_of(&self, k: &str) -> &str {
        self[k].as_str().unwrap_or("")
    }
    fn argv(&self) -> Vec<String> {
        self["argv"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }
}
