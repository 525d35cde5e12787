//! The real collector for end-to-end tests: `vigil-collector init-pki` and
//! `serve` (mutual TLS on loopback), the `vigil` CLI, and where blobs land.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::agent_bin;

/// A collector binary (`vigil-collector`, `vigil`): next to the agent
/// binary, else built here.
pub fn collector_bin(name: &str) -> PathBuf {
    let dir = agent_bin().parent().unwrap().to_path_buf();
    let p = dir.join(name);
    if !p.exists() {
        let st = Command::new(env!("CARGO"))
            .args(["build", "-p", "vigil-collector", "--bins"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .status()
            .expect("cargo build");
        assert!(st.success(), "building vigil-collector failed");
    }
    assert!(p.exists(), "{} not found", p.display());
    p
}

/// `vigil-collector init-pki` in `dir` with agent certificate `agent` and
/// analyst certificate `analyst`.
pub fn init_pki(dir: &Path, agent: &str) {
    let out = Command::new(collector_bin("vigil-collector"))
        .args(["init-pki", "--dir"])
        .arg(dir)
        .args(["--agent", agent, "--analyst", "analyst"])
        .output()
        .unwrap();
    assert!(out.status.success(), "init-pki: {out:?}");
}

/// A running `vigil-collector serve`; SIGTERM on drop.
pub struct Collector {
    child: Child,
    /// Its data directory.
    pub data: PathBuf,
}

impl Collector {
    /// Starts it on 127.0.0.1:`port` and waits until it listens.
    pub fn start(port: u16, pki: &Path, data: &Path) -> Collector {
        Collector::start_with(port, pki, data, &[])
    }

    /// [`Collector::start`] with more `serve` arguments.
    pub fn start_with(port: u16, pki: &Path, data: &Path, extra: &[&str]) -> Collector {
        Collector::spawn(port, pki, data, extra, None)
    }

    /// [`Collector::start`] as user (and group) `uid`, unprivileged, as it
    /// is deployed: `pki` and the parent of `data` must be theirs.
    pub fn start_as(port: u16, pki: &Path, data: &Path, uid: u32) -> Collector {
        Collector::spawn(port, pki, data, &[], Some(uid))
    }

    /// The collector's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn spawn(port: u16, pki: &Path, data: &Path, extra: &[&str], uid: Option<u32>) -> Collector {
        let mut bin = collector_bin("vigil-collector");
        if uid.is_some() {
            // The build tree may be where `uid` cannot reach (a checkout in
            // /root): it runs a copy kept beside its data directory.
            let dir = data.parent().expect("data has a parent");
            let copy = dir.join("vigil-collector");
            std::fs::copy(&bin, &copy).expect("copying vigil-collector");
            bin = copy;
        }
        let mut cmd = Command::new(&bin);
        if let Some(uid) = uid {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(uid);
        }
        let mut child = cmd
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(data)
            .arg("--pki")
            .arg(pki)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning vigil-collector");
        let out = child.stdout.take().unwrap();
        let mut lines = BufReader::new(out).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains("listening on") => break,
                Some(Ok(_)) => {}
                _ => {
                    let _ = child.kill();
                    panic!("the collector did not start");
                }
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Collector {
            child,
            data: data.to_path_buf(),
        }
    }

    /// Where bundle `id` is stored once complete.
    pub fn blob(&self, id: &str) -> PathBuf {
        self.data.join("blobs/sha256").join(&id[..2]).join(&id[2..])
    }
}

impl Collector {
    /// Stops it (SIGTERM, then SIGKILL after 10 s) and waits.
    pub fn stop(self) {}

    /// Kills it at once (SIGKILL), as a crash would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent's arguments to ship to the collector at `url` as `name`, with
/// the certificates of `pki` and its spool in `spool`. Shipped archives stay
/// on the node (`--keep-shipped-mib`) so that tests can compare them with
/// what the collector stored; the default (they leave) has its own test.
pub fn shipping_args(url: &str, pki: &Path, name: &str, spool: &Path) -> Vec<String> {
    vec![
        "--keep-shipped-mib".into(),
        "4096".into(),
        "--collector".into(),
        url.into(),
        "--collector-pki".into(),
        pki.to_string_lossy().into_owned(),
        "--agent-name".into(),
        name.into(),
        "--spool-dir".into(),
        spool.to_string_lossy().into_owned(),
    ]
}

/// Runs the `vigil` CLI as the analyst of `pki` against `url`.
pub fn vigil_cli(url: &str, pki: &Path, args: &[&str]) -> std::process::Output {
    Command::new(collector_bin("vigil"))
        .args(["--collector", url, "--pki"])
        .arg(pki)
        .args(["--name", "analyst"])
        .args(args)
        .output()
        .unwrap()
}
