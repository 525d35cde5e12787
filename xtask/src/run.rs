//! `cargo xtask run`: the one-command quick start. Builds the agent and the
//! collector, creates a local PKI on first run, starts the collector in the
//! background (own process group, stopped when the agent exits, killed by the
//! kernel if xtask dies) and runs the agent in the foreground.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::setup::{self, TracefsPolicy};
use crate::util;

/// Fixed local addresses of the quick-start collector.
const GRPC_ADDR: &str = "127.0.0.1:7443";
const UI_ADDR: &str = "127.0.0.1:7480";
const METRICS_ADDR: &str = "127.0.0.1:9109";
/// How long the collector may take to print its `listening on` and `ui on` lines.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the collector may take to stop after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// After a Ctrl-C, how long the agent gets before xtask sends it SIGTERM
/// itself (for a signal that reached only xtask), and before SIGKILL.
const AGENT_TERM_AFTER: Duration = Duration::from_secs(3);
const AGENT_KILL_AFTER: Duration = Duration::from_secs(60);

pub struct RunArgs {
    pub release: bool,
    pub no_collector: bool,
    pub data_dir: Option<PathBuf>,
    pub agent_args: Vec<String>,
}

pub fn run(args: RunArgs) -> Result<()> {
    let root = util::is_root();
    let sudo = util::which("sudo");
    if !root && sudo.is_none() {
        bail!("the agent loads eBPF programs and must run as root, and sudo is not available: run this as root");
    }
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| util::target_dir().join("vigil"));
    let data_dir = std::path::absolute(&data_dir)
        .with_context(|| format!("bad data directory {}", data_dir.display()))?;

    setup::setup(TracefsPolicy::BestEffort)?;
    build(args.release, !args.no_collector)?;
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;

    let bin = util::agent_bin(args.release);
    let agent_args: Vec<OsString> = if args.agent_args.is_empty() {
        default_agent_args(&data_dir, !args.no_collector)
    } else {
        args.agent_args.iter().map(OsString::from).collect()
    };
    let mut cmd = if root {
        Command::new(&bin)
    } else {
        let mut c = Command::new(sudo.expect("checked above"));
        c.arg("--").arg(&bin);
        c
    };
    cmd.args(&agent_args);
    let running = format!(
        "==> running {}{} (Ctrl-C stops it)",
        if root { "" } else { "under sudo: " },
        util::display_cmd(&cmd)
    );

    if args.no_collector {
        eprintln!("{running}");
        let err = cmd.exec();
        return Err(err).with_context(|| format!("cannot execute {}", bin.display()));
    }

    util::install_signal_handlers();
    let mut collector = Collector::start(args.release, &data_dir)?;
    collector.print_banner(args.release);
    eprintln!(
        "==> the agent ships detections and evidence to the collector (spool: {})",
        data_dir.join("spool").display()
    );
    eprintln!("{running}");
    // The agent stays in xtask's process group: a Ctrl-C in the terminal
    // reaches it directly (and sudo can prompt for a password).
    util::die_with_parent(&mut cmd, libc::SIGTERM);
    let mut agent = cmd
        .spawn()
        .with_context(|| format!("cannot execute {}", bin.display()))?;
    let status = wait_agent(&mut agent, &mut collector);
    let stopped = collector.stop();
    eprintln!("==> collector stopped ({stopped})");
    let status = status?;
    if status.success() || util::interrupted() {
        Ok(())
    } else {
        bail!("the agent exited with {}", util::describe_status(status))
    }
}

/// Builds the agent, then the collector's binaries, as two cargo runs: each
/// package then gets the same features as when it is built alone (by
/// `cargo xtask test`, or its author), so nothing is rebuilt for a third,
/// unified feature set.
fn build(release: bool, collector: bool) -> Result<()> {
    let profile = if release { "release" } else { "debug" };
    let mut packages = vec![("agent", vec!["-p", "vigil-agent"])];
    if collector {
        packages.push(("collector", vec!["-p", "vigil-collector", "--bins"]));
    }
    for (what, args) in packages {
        let mut cmd = util::cargo();
        cmd.arg("build").args(args);
        if release {
            cmd.arg("--release");
        }
        let step = util::run_step(
            &format!("build {what} ({profile})"),
            &mut cmd,
            Duration::from_secs(45 * 60),
        );
        if !step.ok {
            bail!("building the {what} failed: {}", step.detail);
        }
    }
    Ok(())
}

/// `--events-json -`, detections and captures under DATA, and, when the
/// collector runs beside it, shipping to it with the agent certificate
/// `init-pki` made.
fn default_agent_args(data_dir: &Path, ship: bool) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--events-json".into(),
        "-".into(),
        "--detections-json".into(),
        data_dir.join("detections.jsonl").into(),
        "--capture-dir".into(),
        data_dir.join("capture").into(),
    ];
    if ship {
        args.extend(ship_agent_args(data_dir));
    }
    args
}

/// The agent arguments that ship to the collector `Collector::start`
/// runs for `data_dir`, with the agent certificate `init-pki` made.
pub(crate) fn ship_agent_args(data_dir: &Path) -> Vec<OsString> {
    vec![
        "--collector".into(),
        format!("https://{GRPC_ADDR}").into(),
        "--collector-pki".into(),
        data_dir.join("pki").into(),
        "--agent-name".into(),
        agent_name().into(),
        "--spool-dir".into(),
        data_dir.join("spool").into(),
    ]
}

/// The agent certificate's name: the host name, reduced to what `init-pki`
/// accepts (1-64 of `[A-Za-z0-9._-]`, starting with a letter or digit).
fn agent_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    cert_name(host.trim())
}

fn cert_name(raw: &str) -> String {
    let mapped: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name: String = mapped
        .trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
        .chars()
        .take(64)
        .collect();
    if name.is_empty() {
        "agent".into()
    } else {
        name
    }
}

/// `ui on http://ADDR/ (token in FILE)` -> (`http://ADDR/`, FILE).
fn parse_ui_line(line: &str) -> Option<(String, PathBuf)> {
    let rest = line.strip_prefix("ui on ")?;
    let (url, file) = rest.split_once(" (token in ")?;
    let file = file.strip_suffix(')')?;
    Some((url.to_string(), PathBuf::from(file)))
}

fn login_url(ui_url: &str, token: &str) -> String {
    format!("{}/login?token={token}", ui_url.trim_end_matches('/'))
}

/// The analyst certificate `init-pki` made: `analyst` when present, else the
/// first one in `PKI/analysts/`.
fn analyst_name(pki: &Path) -> String {
    if pki.join("analysts/analyst.pem").exists() {
        return "analyst".into();
    }
    let mut names: Vec<String> = std::fs::read_dir(pki.join("analysts"))
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.strip_suffix(".pem").map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.into_iter().next().unwrap_or_else(|| "analyst".into())
}

/// The collector child: leader of its own process group, SIGTERM from the
/// kernel if xtask dies, stopped (SIGTERM, bounded wait, SIGKILL) on drop.
pub(crate) struct Collector {
    child: Child,
    pgid: u32,
    log: PathBuf,
    data: PathBuf,
    pki: PathBuf,
    grpc: String,
    ui_url: String,
    token_file: PathBuf,
    exit_reported: bool,
}

impl Collector {
    /// Creates the PKI when `DATA/pki/ca.pem` is missing, starts `serve` and
    /// waits (bounded) for its `listening on` and `ui on` lines.
    pub(crate) fn start(release: bool, data_dir: &Path) -> Result<Self> {
        let bin = util::bin_path("vigil-collector", release);
        let pki = data_dir.join("pki");
        if !pki.join("ca.pem").exists() {
            let mut cmd = Command::new(&bin);
            cmd.arg("init-pki")
                .arg("--dir")
                .arg(&pki)
                .arg("--agent")
                .arg(agent_name());
            let step = util::run_step("create the PKI", &mut cmd, Duration::from_secs(120));
            if !step.ok {
                bail!("vigil-collector init-pki failed: {}", step.detail);
            }
        }

        let data = data_dir.join("data");
        let log = data_dir.join("collector.log");
        let log_file =
            File::create(&log).with_context(|| format!("cannot open {}", log.display()))?;
        let mut cmd = Command::new(&bin);
        cmd.arg("serve")
            .args(["--listen", GRPC_ADDR])
            .arg("--data-dir")
            .arg(&data)
            .arg("--pki")
            .arg(&pki)
            .args(["--ui-addr", UI_ADDR, "--metrics-addr", METRICS_ADDR])
            .env("NO_COLOR", "1") // its log goes to a file
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file);
        util::own_process_group(&mut cmd, libc::SIGTERM);
        eprintln!(
            "==> starting the collector: {} (log: {})",
            util::display_cmd(&cmd),
            log.display()
        );
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let stdout = child.stdout.take().expect("piped");
        let pgid = child.id();
        let mut collector = Collector {
            child,
            pgid,
            log,
            data,
            pki,
            grpc: GRPC_ADDR.into(),
            ui_url: String::new(),
            token_file: PathBuf::new(),
            exit_reported: false,
        };

        // Lines go through a channel so the wait is bounded; the reader keeps
        // draining stdout after the start so the collector never blocks on it.
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(line) => {
                        let _ = tx.send(line);
                    }
                    Err(_) => break,
                }
            }
        });
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut listening = false;
        let mut ui = None;
        while !listening || ui.is_none() {
            if util::interrupted() {
                bail!("interrupted while the collector was starting");
            }
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("listening on ") {
                        collector.grpc = addr.trim().to_string();
                        listening = true;
                    } else if let Some(parsed) = parse_ui_line(&line) {
                        ui = Some(parsed);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let status = util::wait_timeout(&mut collector.child, Duration::from_secs(5))?;
                    bail!(
                        "the collector closed its output before it was ready ({}); is {GRPC_ADDR}, {UI_ADDR} or {METRICS_ADDR} in use? (`--no-collector` skips it)\n{}",
                        status.map_or_else(|| "still running".into(), util::describe_status),
                        util::log_tail(&collector.log, 20)
                    );
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "the collector did not print `listening on` and `ui on` within {} s\n{}",
                    READY_TIMEOUT.as_secs(),
                    util::log_tail(&collector.log, 20)
                );
            }
        }
        let (ui_url, token_file) = ui.expect("loop exits with it");
        collector.ui_url = ui_url;
        collector.token_file = token_file;
        Ok(collector)
    }

    fn print_banner(&self, release: bool) {
        let login = match std::fs::read_to_string(&self.token_file) {
            Ok(token) => login_url(&self.ui_url, token.trim()),
            Err(err) => format!(
                "{} (cannot read the token in {}: {err}; open {}login?token=TOKEN)",
                self.ui_url,
                self.token_file.display(),
                self.ui_url
            ),
        };
        let vigil = util::bin_path("vigil", release);
        eprintln!("==> collector ready: gRPC (mTLS) on {}", self.grpc);
        eprintln!("==>   web UI:  {login}");
        eprintln!("==>   metrics: http://{METRICS_ADDR}/metrics");
        eprintln!(
            "==>   CLI:     {} --collector https://{} --pki {} --name {} incidents list",
            vigil.display(),
            self.grpc,
            self.pki.display(),
            analyst_name(&self.pki)
        );
        eprintln!(
            "==>   data:    {} (PKI in {}, log {})",
            self.data.display(),
            self.pki.display(),
            self.log.display()
        );
    }

    /// Reports (once) that the collector exited on its own.
    fn check_alive(&mut self) {
        if self.exit_reported {
            return;
        }
        if let Ok(Some(status)) = self.child.try_wait() {
            self.exit_reported = true;
            eprintln!(
                "==> warning: the collector exited ({}); the agent keeps running\n{}",
                util::describe_status(status),
                util::log_tail(&self.log, 20)
            );
        }
    }

    /// Its process group (for CPU accounting).
    pub(crate) fn pgid(&self) -> u32 {
        self.pgid
    }

    /// SIGTERM to the group, bounded wait, then SIGKILL. Describes the exit.
    pub(crate) fn stop(&mut self) -> String {
        util::stop_group_leader(&mut self.child, libc::SIGTERM, STOP_TIMEOUT)
    }
}

/// Waits for the agent. After a Ctrl-C (or SIGTERM) to xtask the agent gets
/// a few seconds to stop on its own (the terminal signals it too), then
/// SIGTERM, then SIGKILL.
fn wait_agent(agent: &mut Child, collector: &mut Collector) -> Result<ExitStatus> {
    let mut interrupted_at: Option<Instant> = None;
    let mut termed = false;
    loop {
        if let Some(status) = agent.try_wait().context("waiting for the agent")? {
            return Ok(status);
        }
        collector.check_alive();
        if util::interrupted() {
            let since = *interrupted_at.get_or_insert_with(Instant::now);
            if !termed && since.elapsed() >= AGENT_TERM_AFTER {
                util::kill_pid(agent.id(), libc::SIGTERM);
                termed = true;
            }
            if since.elapsed() >= AGENT_KILL_AFTER {
                eprintln!(
                    "==> the agent did not stop within {} s: killing it (a process it froze may stay stopped: `ps -eo pid,stat,comm | awk '$2 ~ /T/'`, then `kill -CONT PID`)",
                    AGENT_KILL_AFTER.as_secs()
                );
                util::kill_pid(agent.id(), libc::SIGKILL);
                return agent.wait().context("waiting for the agent");
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cert_names() {
        assert_eq!(cert_name("web-1.example"), "web-1.example");
        assert_eq!(cert_name(""), "agent");
        assert_eq!(cert_name("-x y"), "x-y");
        assert_eq!(cert_name("ünï"), "n-");
        assert_eq!(cert_name(&"a".repeat(100)).len(), 64);
    }

    #[test]
    fn ui_line() {
        let (url, file) =
            parse_ui_line("ui on http://127.0.0.1:7480/ (token in /tmp/d/ui-token)").unwrap();
        assert_eq!(url, "http://127.0.0.1:7480/");
        assert_eq!(file, PathBuf::from("/tmp/d/ui-token"));
        assert_eq!(
            login_url(&url, "abc"),
            "http://127.0.0.1:7480/login?token=abc"
        );
        assert!(parse_ui_line("listening on 127.0.0.1:7443").is_none());
    }
}
