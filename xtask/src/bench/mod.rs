//! `cargo xtask bench`: what the sensor costs the workloads users judge
//! sensors by. For each workload ([`load::Workload`]) it runs rounds of
//! windows, one per arm: no sensor, vigil, and each `--compare` command,
//! alternating on the same machine in the same run (in a balanced order
//! per round, `round_order`), and reports the
//! operation rate of each arm against the no-sensor window of its round,
//! the sensor's CPU and memory, vigil's kernel time per operation, events
//! received and dropped per kind, and detection latency (from a probe that
//! runs a program from a hidden directory now and then, in every arm).

mod load;
mod report;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

pub use load::serve;
use load::{Load, LoadOptions, Server, Workload};

use crate::prom::{self, Scrape};
use crate::util;

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
const SETTLE_MAX: Duration = Duration::from_secs(6);
const SETTLE_QUIET: Duration = Duration::from_millis(1500);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Peak RSS is sampled every this many `SAMPLE_EVERY`s.
const RSS_EVERY_SAMPLES: u32 = 10;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Workloads to run, in order (comma-separated or repeated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Workload::ALL)]
    pub workload: Vec<Workload>,
    /// Seconds of load per window.
    #[arg(long, default_value_t = 10.0)]
    pub window_secs: f64,
    /// Rounds per workload; each round runs every arm once (no sensor,
    /// vigil, each --compare command), in that order.
    #[arg(long, default_value_t = 2)]
    pub rounds: u32,
    /// Output directory (relative paths are relative to the workspace root):
    /// bench.json, bench.md, the agent's logs and last outputs.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// Load threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Live processes the churn workload keeps.
    #[arg(long, default_value_t = 5000)]
    pub churn_live: usize,
    /// Program the exec workload spawns.
    #[arg(long, default_value = "/bin/true")]
    pub program: PathBuf,
    /// The load's programs inherit the benchmark's environment (under
    /// cargo: cargo's, with dozens of variables and a long
    /// `LD_LIBRARY_PATH`) instead of only PATH, HOME and LANG.
    #[arg(long)]
    pub inherit_env: bool,
    /// Turn on kernel BPF run-time statistics (kernel.bpf_stats_enabled)
    /// during the run and report the kernel time of all the agent's BPF
    /// programs per operation (machine-wide: other activity counts too; the
    /// stats themselves add a little overhead).
    #[arg(long)]
    pub bpf_stats: bool,
    /// Ship to a local collector (started for the run, release build):
    /// detections, evidence and every event.
    #[arg(long)]
    pub ship: bool,
    /// Another sensor to measure in the same alternation: a shell command
    /// (`sh -c`), started before its window in its own process group and
    /// stopped after it (SIGINT, then SIGKILL). Repeat for several.
    #[arg(long, value_name = "CMD")]
    pub compare: Vec<String>,
    /// Seconds a --compare command gets to start before its window.
    #[arg(long, default_value_t = 3.0)]
    pub compare_ready_secs: f64,
    /// Detection probes per second (0: none): a copy of `sleep` run from a
    /// hidden directory, in every arm; vigil's detections of it give the
    /// detection latency.
    #[arg(long, default_value_t = 0.5)]
    pub probe_rate: f64,
    /// Append the result table to BENCHMARKS.md under this label.
    #[arg(long, value_name = "LABEL")]
    pub record: Option<String>,
    /// Do not build; use the existing release binaries.
    #[arg(long)]
    pub no_build: bool,
    /// Extra arguments for the agent.
    #[arg(last = true)]
    pub agent_args: Vec<String>,
}

/// `cargo xtask storm`: the exec load alone, for calibration.
pub fn storm_only(seconds: f64, threads: usize, program: &Path) -> Result<()> {
    util::install_signal_handlers();
    println!(
        "==> exec storm: {threads} thread(s) spawning {} for {seconds} s (no agent)",
        program.display()
    );
    let opts = LoadOptions {
        program: program.to_path_buf(),
        scratch: std::env::temp_dir(),
        files: std::env::temp_dir(),
        server: None,
        churn_live: 0,
        inherit_env: false,
    };
    let storm = Load::start(Workload::Exec, threads, &opts)?;
    let pb = bar(seconds, "storm");
    while storm.elapsed().as_secs_f64() < seconds && !util::interrupted() {
        std::thread::sleep(SAMPLE_EVERY);
        let e = storm.elapsed().as_secs_f64();
        pb.set_position((e * 1000.0) as u64);
        pb.set_message(format!("{:>7.0} exec/s", storm.ops() as f64 / e));
    }
    let r = storm.stop()?;
    pb.finish_and_clear();
    println!(
        "{} execs in {:.2} s: {:.0} exec/s ({:.0} per thread), {} spawn errors",
        r.ops,
        r.seconds,
        r.ops as f64 / r.seconds,
        r.ops as f64 / r.seconds / threads.max(1) as f64,
        r.errors
    );
    if util::interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// /proc sampling

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Run time and run count of each BPF program the process holds, by
/// program id (from /proc/PID/fdinfo); needs kernel.bpf_stats_enabled=1.
fn bpf_prog_stats(pid: u32) -> Option<BTreeMap<u32, (u64, u64)>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .ok()?
        .flatten()
    {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        if !info.contains("prog_type:") {
            continue;
        }
        let field = |name: &str| -> Option<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
        };
        if let (Some(id), Some(t), Some(c)) =
            (field("prog_id:"), field("run_time_ns:"), field("run_cnt:"))
        {
            out.insert(id as u32, (t, c));
        }
    }
    Some(out)
}

/// One bpf(2) command on a zeroed `union bpf_attr` (16 words: more than
/// the commands used here read). Returns the syscall's result.
fn bpf_cmd(cmd: libc::c_long, attr: &mut [u64; 16]) -> libc::c_long {
    // SAFETY: attr is a valid, writable bpf_attr of the size passed; any
    // pointer the caller put in it names a live buffer of the stated size.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    }
}

/// A loaded BPF program's name (the kernel keeps its first 15 bytes), by
/// id: BPF_PROG_GET_FD_BY_ID then BPF_OBJ_GET_INFO_BY_FD (needs root).
fn bpf_prog_name(id: u32) -> Option<String> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // struct bpf_prog_info: `name` is the 16 bytes at offset 64; the rest
    // stays zero (the kernel accepts a longer, zero-filled buffer).
    const NAME_AT: usize = 64;
    let mut attr = [0u64; 16];
    attr[0] = u64::from(id);
    let fd = bpf_cmd(BPF_PROG_GET_FD_BY_ID, &mut attr);
    if fd < 0 {
        return None;
    }
    // SAFETY: a new fd the kernel just returned, owned (closed) here only.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    let mut info = [0u8; 256];
    let mut attr = [0u64; 16];
    attr[0] = fd.as_raw_fd() as u64 | ((info.len() as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    if bpf_cmd(BPF_OBJ_GET_INFO_BY_FD, &mut attr) != 0 {
        return None;
    }
    let name = &info[NAME_AT..NAME_AT + 16];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Some(String::from_utf8_lossy(&name[..end]).into_owned())
}

const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Enables BPF run-time stats; restores the previous value on drop.
struct BpfStatsGuard {
    previous: String,
}

impl BpfStatsGuard {
    fn enable() -> Result<Self> {
        let previous = std::fs::read_to_string(BPF_STATS_SYSCTL)
            .with_context(|| format!("cannot read {BPF_STATS_SYSCTL}"))?;
        std::fs::write(BPF_STATS_SYSCTL, "1")
            .with_context(|| format!("cannot enable {BPF_STATS_SYSCTL}"))?;
        Ok(Self {
            previous: previous.trim().to_string(),
        })
    }
}

impl Drop for BpfStatsGuard {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS_SYSCTL, &self.previous);
    }
}

// ---------------------------------------------------------------------------
// The agent under test

struct Agent {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    log: PathBuf,
}

fn free_local_addr() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot find a free TCP port")?;
    Ok(listener.local_addr()?)
}

impl Agent {
    fn start(bin: &Path, args: &[OsString], log: PathBuf) -> Result<Self> {
        let addr = free_local_addr()?;
        let log_file =
            File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("--metrics-addr")
            .arg(addr.to_string())
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        // Own process group: a Ctrl-C reaches xtask, which stops the agent
        // itself after reading its final metrics; SIGINT if xtask dies.
        util::own_process_group(&mut cmd, libc::SIGINT);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", util::display_cmd(&cmd)))?;
        Ok(Self {
            pid: child.id(),
            child,
            addr,
            log,
        })
    }

    fn check_alive(&mut self) -> Result<()> {
        util::check_running(&mut self.child, "the agent", &self.log, 30)
    }

    /// Waits until `/metrics` answers 200 (bounded).
    fn wait_ready(&mut self, spinner: &ProgressBar) -> Result<Duration> {
        let start = Instant::now();
        loop {
            self.check_alive()?;
            if util::interrupted() {
                bail!("interrupted");
            }
            if let Ok((200, _)) =
                prom::http_get_apart(self.addr, "/metrics", Duration::from_secs(1))
            {
                return Ok(start.elapsed());
            }
            if start.elapsed() > READY_TIMEOUT {
                bail!(
                    "the agent's metrics endpoint http://{}/metrics did not answer within {} s\n{}",
                    self.addr,
                    READY_TIMEOUT.as_secs(),
                    util::log_tail(&self.log, 30)
                );
            }
            spinner.tick();
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGINT, bounded wait, then SIGKILL (its group: any helpers too).
    fn stop(&mut self) -> String {
        util::stop_group_leader(&mut self.child, libc::SIGINT, STOP_TIMEOUT)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// CPU ticks (the members' own and their waited-for children's) and RSS
/// (KiB) summed over the processes of process group `pgid`.
fn group_usage(pgid: u32) -> (u64, u64) {
    // SAFETY: sysconf has no preconditions.
    let page_kb = (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) / 1024) as u64;
    let (mut ticks, mut rss) = (0u64, 0u64);
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return (0, 0);
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        // After "(comm)": state, ppid, pgrp, ... utime (12th), stime,
        // cutime, cstime, ... rss (22nd).
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        if f.get(2).and_then(|v| v.parse::<u32>().ok()) != Some(pgid) {
            continue;
        }
        ticks += num(11) + num(12) + num(13) + num(14);
        rss += num(21) * page_kb;
    }
    (ticks, rss)
}

// ---------------------------------------------------------------------------
// Arms: what runs beside the load

/// One arm of a round.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Arm {
    /// No sensor: the reference.
    None,
    /// The vigil agent.
    Vigil,
    /// A `--compare` command.
    Compare(String),
}

impl Arm {
    fn label(&self) -> String {
        match self {
            Arm::None => "none".into(),
            Arm::Vigil => "vigil".into(),
            Arm::Compare(c) => {
                let short: String = c.chars().take(40).collect();
                if short.len() < c.len() {
                    format!("{short}...")
                } else {
                    short
                }
            }
        }
    }
}

/// A `--compare` command, leader of its own process group.
struct Other {
    child: Child,
    pgid: u32,
    log: PathBuf,
}

impl Other {
    fn start(command: &str, log: PathBuf) -> Result<Self> {
        let log_file =
            File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(command)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        util::own_process_group(&mut cmd, libc::SIGKILL);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{command}`"))?;
        Ok(Self {
            pgid: child.id(),
            child,
            log,
        })
    }

    fn check_alive(&mut self) -> Result<()> {
        util::check_running(&mut self.child, "the compared command", &self.log, 20)
    }

    fn stop(&mut self) -> String {
        util::stop_group_leader(&mut self.child, libc::SIGINT, Duration::from_secs(5))
    }
}

impl Drop for Other {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// The sensor of a window.
enum Sensor {
    Vigil(Agent),
    Other(Other),
}

impl Sensor {
    fn pgid(&self) -> u32 {
        match self {
            Sensor::Vigil(a) => a.pid,
            Sensor::Other(o) => o.pgid,
        }
    }
    fn check_alive(&mut self) -> Result<()> {
        match self {
            Sensor::Vigil(a) => a.check_alive(),
            Sensor::Other(o) => o.check_alive(),
        }
    }
    fn stop(&mut self) -> String {
        match self {
            Sensor::Vigil(a) => a.stop(),
            Sensor::Other(o) => o.stop(),
        }
    }
}

// ---------------------------------------------------------------------------
// The detection probe

/// Runs a copy of `sleep` from a hidden directory every `1 / rate` s.
struct Probe {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<u64>,
}

impl Probe {
    fn start(program: &Path, rate: f64) -> Option<Probe> {
        if rate <= 0.0 {
            return None;
        }
        let every = Duration::from_secs_f64(1.0 / rate);
        let stop = Arc::new(AtomicBool::new(false));
        let (program, flag) = (program.to_path_buf(), stop.clone());
        let handle = std::thread::spawn(move || {
            let mut runs = 0;
            while !flag.load(Ordering::Relaxed) {
                let started = Instant::now();
                // Lives long enough to be captured itself (not a stand-in).
                let ok = Command::new(&program)
                    .arg("0.3")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                runs += u64::from(ok);
                while started.elapsed() < every && !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            runs
        });
        Some(Probe { stop, handle })
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------
// Results

/// One window: one arm under one workload.
#[derive(Serialize, Debug, Clone)]
pub struct WindowResult {
    workload: Workload,
    round: u32,
    arm: Arm,
    seconds: f64,
    ops: u64,
    ops_per_s: f64,
    errors: u64,
    probes: u64,
    /// The local collector's CPU during the load (--ship), % of one core.
    #[serde(skip_serializing_if = "Option::is_none")]
    collector_cpu_pct: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sensor: Option<SensorStats>,
}

/// What the sensor of a window did.
#[derive(Serialize, Debug, Clone, Default)]
pub struct SensorStats {
    /// Seconds from start until ready (vigil: /metrics answered).
    startup_s: f64,
    /// utime+stime of the sensor's process group during the load, % of one core.
    cpu_pct: Option<f64>,
    rss_max_mb: Option<f64>,
    rss_mean_mb: Option<f64>,
    /// Mean RSS over the first and the last fifth of the window's samples
    /// (flat memory: the two agree).
    rss_first_mb: Option<f64>,
    rss_last_mb: Option<f64>,
    /// vigil only, deltas over the window: events received per kind.
    events: BTreeMap<String, f64>,
    /// Events lost in the kernel (ring buffer full) per kind.
    kernel_dropped: BTreeMap<String, f64>,
    decode_errors: Option<f64>,
    /// Events received per second, all kinds.
    events_per_s: Option<f64>,
    /// Agent CPU per event received, microseconds (= ms per 1,000 events).
    cpu_us_per_event: Option<f64>,
    /// Items shipped to the collector per kind (--ship).
    shipped: BTreeMap<String, f64>,
    ship_events_dropped: Option<f64>,
    /// Kernel time of the agent's BPF programs (--bpf-stats) per operation.
    bpf_ns_per_op: Option<f64>,
    /// The same per program (by name; programs sharing a name summed).
    bpf_ns_per_op_by_program: BTreeMap<String, f64>,
    bpf_programs: Option<usize>,
    /// From each detection's `latency_ns`, ms.
    detection_latency_ms: Vec<f64>,
    process_tree_size: Option<f64>,
    exit: String,
}

/// Per-label deltas of counter family `name` (label `key`) between scrapes.
fn per_label(before: &Scrape, after: &Scrape, name: &str, key: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for s in after.samples.iter().filter(|s| s.name == name) {
        let Some((_, v)) = s.labels.iter().find(|(k, _)| k == key) else {
            continue;
        };
        let b = before.sum(name, &[(key, v)]).unwrap_or(0.0);
        let d = s.value - b;
        if d > 0.0 {
            *out.entry(v.clone()).or_insert(0.0) += d;
        }
    }
    out
}

fn sub(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? - b.unwrap_or(0.0))
}

/// `latency_ns` of every detection in a `--detections-json` file, in ms.
fn detection_latencies(path: &Path) -> Vec<f64> {
    let Ok(file) = File::open(path) else {
        return Vec::new();
    };
    BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
        .filter_map(|v| v.get("latency_ns").and_then(serde_json::Value::as_u64))
        .map(|ns| ns as f64 / 1e6)
        .collect()
}

// ---------------------------------------------------------------------------
// Driver

fn bar(seconds: f64, prefix: &str) -> ProgressBar {
    let pb = ProgressBar::new((seconds * 1000.0) as u64);
    pb.set_style(
        ProgressStyle::with_template("{prefix:<28} [{bar:30.cyan/blue}] {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_prefix(prefix.to_string());
    pb
}

struct Ctx<'a> {
    args: &'a BenchArgs,
    out: PathBuf,
    agent_bin: PathBuf,
    window: Duration,
    multi: MultiProgress,
    load: LoadOptions,
    probe: PathBuf,
    ship_args: Vec<OsString>,
    collector_pgid: Option<u32>,
    windows_total: usize,
}

pub fn bench(args: BenchArgs) -> Result<()> {
    if !util::is_root() {
        bail!("the benchmark starts the agent, which loads eBPF programs: run it as root (sudo -E cargo xtask bench)");
    }
    if args.rounds == 0 || args.workload.is_empty() {
        bail!("nothing to run: --rounds and --workload must not be empty");
    }
    if args.window_secs.is_nan() || args.window_secs < 1.0 {
        bail!("--window-secs must be at least 1, got {}", args.window_secs);
    }
    if !(0.0..=20.0).contains(&args.probe_rate) {
        bail!("--probe-rate must be between 0 and 20 per second");
    }
    if args.workload.contains(&Workload::Exec) && !util::is_executable(&args.program) {
        bail!(
            "exec program {} is not an executable file",
            args.program.display()
        );
    }
    let out = if args.out.is_absolute() {
        args.out.clone()
    } else {
        util::workspace_root().join(&args.out)
    };
    crate::setup::setup(crate::setup::TracefsPolicy::Require)?;
    if !args.no_build {
        let mut cmd = util::cargo();
        cmd.args(["build", "--release", "-p", "vigil-agent"]);
        if args.ship {
            cmd.args(["-p", "vigil-collector", "--bins"]);
        }
        let step = util::run_step("build (release)", &mut cmd, Duration::from_secs(45 * 60));
        if !step.ok {
            bail!("building failed: {}", step.detail);
        }
    }
    let agent_bin = util::agent_bin(true);
    if !agent_bin.exists() {
        bail!(
            "{} does not exist (build it, or drop --no-build)",
            agent_bin.display()
        );
    }
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let _bpf_stats = args.bpf_stats.then(BpfStatsGuard::enable).transpose()?;
    util::install_signal_handlers();

    let server = if args
        .workload
        .iter()
        .any(|w| matches!(w, Workload::Connect | Workload::Mixed))
    {
        Some(Server::start(args.threads)?)
    } else {
        None
    };
    let ship_dir = out.join("ship");
    let mut collector = if args.ship {
        Some(crate::run::Collector::start(true, &ship_dir)?)
    } else {
        None
    };
    let probe = out.join("probe/.vigil-probe/sleep-probe");
    if args.probe_rate > 0.0 {
        let sleep = util::which("sleep").context("`sleep` is not in PATH")?;
        load::copy_executable(&sleep, &probe)?;
    }
    let mut arms = vec![Arm::None, Arm::Vigil];
    arms.extend(args.compare.iter().cloned().map(Arm::Compare));
    let windows_total = args.workload.len() * args.rounds as usize * arms.len();

    println!(
        "==> bench: workloads {}, {} round(s) of {} windows of {:.0} s ({}); {} load thread(s), their programs' environment {}; results in {}",
        args.workload.iter().map(|w| w.name()).collect::<Vec<_>>().join(","),
        args.rounds,
        arms.len(),
        args.window_secs,
        arms.iter().map(Arm::label).collect::<Vec<_>>().join(", "),
        args.threads,
        if args.inherit_env {
            format!("inherited ({} variables)", std::env::vars_os().count())
        } else {
            load::LOAD_ENV.join(", ")
        },
        out.display()
    );
    let multi = if console_is_tty() {
        MultiProgress::new()
    } else {
        MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
    };
    let ctx = Ctx {
        args: &args,
        agent_bin,
        window: Duration::from_secs_f64(args.window_secs),
        multi,
        load: LoadOptions {
            program: args.program.clone(),
            scratch: out.join("scratch"),
            files: if Path::new("/dev/shm").is_dir() {
                PathBuf::from("/dev/shm/vigil-bench")
            } else {
                out.join("scratch")
            },
            server: server.as_ref().map(|s| s.addrs),
            churn_live: args.churn_live,
            inherit_env: args.inherit_env,
        },
        probe,
        ship_args: if args.ship {
            crate::run::ship_agent_args(&ship_dir)
        } else {
            Vec::new()
        },
        out: out.clone(),
        collector_pgid: collector.as_ref().map(crate::run::Collector::pgid),
        windows_total,
    };
    let overall = ctx.multi.add(ProgressBar::new(windows_total as u64));
    overall.set_style(
        ProgressStyle::with_template(
            "{prefix:<28} [{bar:30.green/white}] window {pos}/{len}, {elapsed} elapsed",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    overall.set_prefix("bench");
    let started_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut results = Vec::new();
    for &workload in &args.workload {
        for round in 1..=args.rounds {
            for arm in round_order(arms.len(), round as usize - 1)
                .into_iter()
                .map(|i| &arms[i])
            {
                let r = run_window(&ctx, results.len() + 1, workload, round, arm)?;
                ctx.multi
                    .suspend(|| println!("{}", report::window_line(&r)));
                results.push(r);
                overall.inc(1);
            }
        }
    }
    overall.finish_and_clear();
    let collector_exit = collector.as_mut().map(|c| c.stop());
    drop(server);

    let rows = report::rows(&results);
    let table = report::markdown(&rows, &args, &machine());
    println!("\n{table}");
    let json = serde_json::json!({
        "benchmark": "workloads",
        "started_unix": started_unix,
        "config": {
            "workloads": args.workload,
            "window_secs": args.window_secs,
            "rounds": args.rounds,
            "threads": args.threads,
            "program": args.program,
            "agent": ctx.agent_bin,
            "agent_args": args.agent_args,
            "compare": args.compare,
            "bpf_stats": args.bpf_stats,
            "ship": args.ship,
            "probe_rate": args.probe_rate,
        },
        "machine": machine(),
        "windows": results,
        "summary": rows,
        "collector_exit": collector_exit,
    });
    let json_path = out.join("bench.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    std::fs::write(out.join("bench.md"), &table)?;
    println!("==> wrote {} and bench.md", json_path.display());
    if let Some(label) = &args.record {
        let path = util::workspace_root().join("BENCHMARKS.md");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let entry = format!("### {} — {label}\n\n{table}", today());
        std::fs::write(&path, record_into(&text, &entry))
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("==> recorded the table in {}", path.display());
    }
    Ok(())
}

/// The section of BENCHMARKS.md that `--record` adds to.
const RECORD_SECTION: &str = "## Overhead by workload";

/// `doc` with `entry` added as the last part of its [`RECORD_SECTION`]
/// (before the next `## ` heading), or at its end when it has none.
fn record_into(doc: &str, entry: &str) -> String {
    let entry = entry.trim_end_matches('\n');
    let at = doc.find(RECORD_SECTION).map(|start| {
        let body = start + RECORD_SECTION.len();
        doc[body..]
            .find("\n## ")
            .map_or(doc.len(), |next| body + next + 1)
    });
    match at {
        Some(at) if at < doc.len() => {
            let head = doc[..at].trim_end_matches('\n');
            format!("{head}\n\n{entry}\n\n{}", &doc[at..])
        }
        _ => format!("{}\n\n{entry}\n", doc.trim_end_matches('\n')),
    }
}

/// The machine, for the report.
#[derive(Serialize, Debug, Clone)]
pub struct Machine {
    cpus: usize,
    kernel: String,
}

fn machine() -> Machine {
    Machine {
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

fn today() -> String {
    let out = Command::new("date").arg("+%Y-%m-%d").output();
    out.ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn console_is_tty() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

fn start_sensor(
    ctx: &Ctx,
    index: usize,
    arm: &Arm,
    label: &str,
) -> Result<(Option<Sensor>, f64, PathBuf)> {
    let detections = ctx.out.join(format!("detections-w{index}.jsonl"));
    let spinner = ctx.multi.add(ProgressBar::new_spinner());
    let started = Instant::now();
    let sensor = match arm {
        Arm::None => None,
        Arm::Vigil => {
            spinner.set_message(format!("{label}: starting the agent, waiting for /metrics"));
            let _ = std::fs::remove_file(&detections);
            let mut args: Vec<OsString> = Vec::new();
            let own_config = ctx
                .args
                .agent_args
                .iter()
                .any(|a| a == "-c" || a.starts_with("--config"));
            if !own_config {
                args.extend(["--config".into(), bench_config(&ctx.out)?.into()]);
            }
            args.extend::<[OsString; 6]>([
                "--events-json".into(),
                ctx.out.join("events.jsonl").into(),
                "--detections-json".into(),
                detections.clone().into(),
                "--capture-dir".into(),
                ctx.out.join("capture").into(),
            ]);
            let _ = std::fs::remove_file(ctx.out.join("events.jsonl"));
            args.extend(ctx.ship_args.iter().cloned());
            args.extend(ctx.args.agent_args.iter().map(OsString::from));
            let mut a = Agent::start(
                &ctx.agent_bin,
                &args,
                ctx.out.join(format!("agent-w{index}.log")),
            )?;
            a.wait_ready(&spinner)?;
            Some(Sensor::Vigil(a))
        }
        Arm::Compare(cmd) => {
            spinner.set_message(format!("{label}: starting `{cmd}`"));
            let mut o = Other::start(cmd, ctx.out.join(format!("compare-w{index}.log")))?;
            let ready = Duration::from_secs_f64(ctx.args.compare_ready_secs);
            while started.elapsed() < ready {
                o.check_alive()?;
                spinner.tick();
                std::thread::sleep(Duration::from_millis(100));
            }
            Some(Sensor::Other(o))
        }
    };
    spinner.finish_and_clear();
    Ok((sensor, started.elapsed().as_secs_f64(), detections))
}

/// The order of `n` arms in round `r` (from 0): a Williams design, so that
/// over `n` rounds (`2n` for an odd `n`) every arm runs in every position
/// and right after every other arm equally often. What a window leaves
/// behind (a sensor's teardown, its output's writeback, a warm cache)
/// then falls on every arm alike, and no arm always runs first.
fn round_order(n: usize, r: usize) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    // 0, 1, n-1, 2, n-2, ...
    let base = (0..n).map(|j| {
        if j % 2 == 1 {
            j.div_ceil(2)
        } else {
            (n - j / 2) % n
        }
    });
    let cycle = if n.is_multiple_of(2) { n } else { 2 * n };
    let r = r % cycle;
    let mut row: Vec<usize> = base.map(|b| (b + r % n) % n).collect();
    if r >= n {
        row.reverse();
    }
    row
}

/// The agent's configuration in the benchmark (not the machine's
/// /etc/vigil/agent.toml): defaults, except that the detection probe's
/// detections are not captured, so that windows measure the event path
/// (captures are benchmarked apart, see BENCHMARKS.md). `-c` in the agent
/// arguments replaces it.
fn bench_config(out: &Path) -> Result<PathBuf> {
    let path = out.join("agent.toml");
    std::fs::write(
        &path,
        "# Written by `cargo xtask bench`: defaults, but the probe's detections\n\
         # (exec from a hidden directory, medium) are not captured.\n\
         capture_rules = []\n",
    )
    .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

fn run_window(
    ctx: &Ctx,
    index: usize,
    workload: Workload,
    round: u32,
    arm: &Arm,
) -> Result<WindowResult> {
    let label = format!(
        "w{index}/{} {} {}",
        ctx.windows_total,
        workload.name(),
        arm.label()
    );
    let (mut sensor, startup_s, detections) = start_sensor(ctx, index, arm, &label)?;
    let vigil = |s: &Option<Sensor>| match s {
        Some(Sensor::Vigil(a)) => Some(a.addr),
        _ => None,
    };
    let metrics_addr = vigil(&sensor);
    let before = match metrics_addr {
        Some(addr) => Some(prom::scrape(addr, SCRAPE_TIMEOUT).context("scraping the agent")?),
        None => None,
    };
    let pgid = sensor.as_ref().map(Sensor::pgid);
    let bpf = |_: ()| {
        metrics_addr
            .and(pgid)
            .filter(|_| ctx.args.bpf_stats)
            .and_then(bpf_prog_stats)
    };
    let bpf0 = bpf(());
    let cpu0 = pgid.map(|p| group_usage(p).0);
    let coll0 = ctx.collector_pgid.map(|p| group_usage(p).0);
    let mut rss = Vec::new();

    let pb = ctx.multi.add(bar(ctx.window.as_secs_f64(), &label));
    let probe = Probe::start(&ctx.probe, ctx.args.probe_rate);
    let load = Load::start(workload, ctx.args.threads, &ctx.load)?;
    let total = ctx.window.as_secs_f64();
    let mut samples = 0u32;
    loop {
        std::thread::sleep(SAMPLE_EVERY);
        samples += 1;
        let elapsed = load.elapsed().as_secs_f64();
        // A group sample walks /proc: once a second, so the benchmark's own
        // work in sensor windows stays negligible next to the no-sensor ones.
        if let Some(p) = pgid.filter(|_| samples % RSS_EVERY_SAMPLES == 1) {
            rss.push(group_usage(p).1 as f64 / 1024.0);
        }
        let rate = load.ops() as f64 / elapsed.max(1e-3);
        pb.set_position((elapsed.min(total) * 1000.0) as u64);
        pb.set_message(format!(
            "{elapsed:>5.1}/{total:.1} s {rate:>8.0} {}/s",
            workload.op()
        ));
        if let Some(s) = sensor.as_mut() {
            if let Err(err) = s.check_alive() {
                let _ = load.stop();
                pb.finish_and_clear();
                return Err(err);
            }
        }
        if elapsed >= total || util::interrupted() {
            break;
        }
    }
    // The tree while the load's processes still live (churn's population
    // ends with the load).
    let tree_live = metrics_addr
        .and_then(|a| prom::scrape(a, SCRAPE_TIMEOUT).ok())
        .and_then(|m| m.sum("vigil_process_tree_size", &[]));
    let result = load.stop()?;
    let cpu1 = pgid.map(|p| group_usage(p).0);
    let coll1 = ctx.collector_pgid.map(|p| group_usage(p).0);
    let bpf1 = bpf(());
    let probes = probe.map_or(0, Probe::stop);
    pb.finish_and_clear();

    let mut stats = SensorStats {
        startup_s,
        ..SensorStats::default()
    };
    let secs = result.seconds;
    if let (Some(addr), Some(before)) = (metrics_addr, &before) {
        let after = settle(addr);
        if let Some(after) = &after {
            let delta = |name: &str| sub(after.sum(name, &[]), before.sum(name, &[]));
            stats.events = per_label(before, after, "vigil_events_total", "kind");
            stats.kernel_dropped = per_label(before, after, "vigil_kernel_dropped_total", "kind");
            stats.shipped = per_label(before, after, "vigil_ship_sent_total", "kind");
            stats.decode_errors = delta("vigil_decode_errors_total");
            stats.ship_events_dropped = delta("vigil_ship_events_dropped_total");
            stats.process_tree_size = tree_live;
            stats.events_per_s = Some(stats.events.values().sum::<f64>() / secs);
        } else {
            ctx.multi.suspend(|| {
                eprintln!("warning: {label}: could not scrape the agent's metrics after the load")
            });
        }
        if let (Some(p0), Some(p1)) = (&bpf0, &bpf1) {
            if !p1.is_empty() && result.ops > 0 {
                stats.bpf_programs = Some(p1.len());
                let ops = result.ops as f64;
                let mut total = 0u64;
                for (id, (ns1, _)) in p1 {
                    let ns = ns1.saturating_sub(p0.get(id).map_or(0, |p| p.0));
                    total += ns;
                    if ns > 0 {
                        let name = bpf_prog_name(*id).unwrap_or_else(|| format!("id {id}"));
                        *stats.bpf_ns_per_op_by_program.entry(name).or_insert(0.0) +=
                            ns as f64 / ops;
                    }
                }
                stats.bpf_ns_per_op = Some(total as f64 / ops);
            }
        }
    }
    if let (Some(c0), Some(c1)) = (cpu0, cpu1) {
        let cpu_s = c1.saturating_sub(c0) as f64 / clock_ticks_per_sec();
        stats.cpu_pct = Some(cpu_s / secs * 100.0);
        let events: f64 = stats.events.values().sum();
        if events > 0.0 {
            stats.cpu_us_per_event = Some(cpu_s * 1e6 / events);
        }
    }
    if !rss.is_empty() {
        stats.rss_max_mb = rss.iter().copied().reduce(f64::max);
        stats.rss_mean_mb = Some(rss.iter().sum::<f64>() / rss.len() as f64);
        let fifth = rss.len().div_ceil(5);
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        stats.rss_first_mb = Some(mean(&rss[..fifth]));
        stats.rss_last_mb = Some(mean(&rss[rss.len() - fifth..]));
    }
    if let Some(mut s) = sensor.take() {
        stats.exit = s.stop();
    }
    if metrics_addr.is_some() {
        stats.detection_latency_ms = detection_latencies(&detections);
    }
    if util::interrupted() {
        bail!("interrupted");
    }
    Ok(WindowResult {
        workload,
        round,
        arm: arm.clone(),
        seconds: secs,
        ops: result.ops,
        ops_per_s: result.ops as f64 / secs,
        errors: result.errors,
        probes,
        collector_cpu_pct: coll0
            .zip(coll1)
            .map(|(a, b)| b.saturating_sub(a) as f64 / clock_ticks_per_sec() / secs * 100.0),
        sensor: pgid.map(|_| stats),
    })
}

/// Lets the agent drain its ring buffer and publish its kernel-side
/// counters (synced about once a second): scrapes until the event counters
/// have not moved for SETTLE_QUIET (bounded by SETTLE_MAX).
fn settle(addr: SocketAddr) -> Option<Scrape> {
    let start = Instant::now();
    let mut last_change = Instant::now();
    let mut last = None;
    let mut after = None;
    while start.elapsed() < SETTLE_MAX {
        std::thread::sleep(Duration::from_millis(250));
        if let Ok(s) = prom::scrape(addr, SCRAPE_TIMEOUT) {
            let now = [
                s.sum("vigil_events_total", &[]),
                s.sum("vigil_kernel_events_total", &[]),
                s.sum("vigil_kernel_dropped_total", &[]),
            ];
            if last != Some(now) {
                last = Some(now);
                last_change = Instant::now();
            }
            after = Some(s);
            if last_change.elapsed() >= SETTLE_QUIET {
                break;
            }
        }
    }
    after
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Over a full cycle of rounds, every arm runs in every position and
    /// right after every other arm equally often; the first round starts
    /// with `none`.
    #[test]
    fn rounds_are_balanced() {
        assert!(round_order(0, 3).is_empty());
        assert_eq!(round_order(1, 5), vec![0]);
        assert_eq!(round_order(4, 0), vec![0, 1, 3, 2]);
        for n in 2..=6usize {
            let cycle = if n.is_multiple_of(2) { n } else { 2 * n };
            let rows: Vec<Vec<usize>> = (0..cycle).map(|r| round_order(n, r)).collect();
            let mut at = vec![vec![0; n]; n];
            let mut after = vec![vec![0; n]; n];
            for row in &rows {
                let mut sorted = row.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "n={n}: {row:?}");
                for (pos, &arm) in row.iter().enumerate() {
                    at[arm][pos] += 1;
                }
                for w in row.windows(2) {
                    after[w[0]][w[1]] += 1;
                }
            }
            let per_position = cycle / n;
            assert!(
                at.iter().flatten().all(|&c| c == per_position),
                "n={n}: {at:?}"
            );
            let per_pair = (cycle * (n - 1)) / (n * (n - 1));
            for (i, row) in after.iter().enumerate() {
                for (j, &c) in row.iter().enumerate() {
                    assert_eq!(c, if i == j { 0 } else { per_pair }, "n={n}: {after:?}");
                }
            }
            assert_eq!(round_order(n, cycle), rows[0], "n={n}: a cycle repeats");
        }
    }

    #[test]
    fn a_record_ends_its_section() {
        let doc = "# B\n\n## Overhead by workload\n\nintro\n\n### old\n\nt1\n\n## Exec\n\nx\n";
        assert_eq!(
            record_into(doc, "### new\n\nt2\n"),
            "# B\n\n## Overhead by workload\n\nintro\n\n### old\n\nt1\n\n### new\n\nt2\n\n## Exec\n\nx\n"
        );
        // The section last in the file, or missing: at the end.
        assert_eq!(
            record_into("## Overhead by workload\n\nintro\n", "### new\n"),
            "## Overhead by workload\n\nintro\n\n### new\n"
        );
        assert_eq!(record_into("# B\n", "### new\n"), "# B\n\n### new\n");
    }

    #[test]
    fn proc_sampling_reads_self() {
        // SAFETY: getpgrp has no preconditions.
        let pgid = unsafe { libc::getpgrp() } as u32;
        let (_, rss) = group_usage(pgid);
        assert!(rss > 0, "this process is in its own group's sum");
    }

    #[test]
    fn per_label_deltas() {
        let before = Scrape::from_text("vigil_events_total{kind=\"exec\"} 10\n");
        let after = Scrape::from_text(
            "vigil_events_total{kind=\"exec\"} 25\nvigil_events_total{kind=\"fork\"} 4\n",
        );
        let d = per_label(&before, &after, "vigil_events_total", "kind");
        assert_eq!(d.get("exec"), Some(&15.0));
        assert_eq!(d.get("fork"), Some(&4.0));
    }
}
