//! `cargo xtask bench`: exec-storm benchmark, alternating windows without and
//! with the agent, on the same machine in the same run.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::prom::{self, Scrape};
use crate::util;

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
const SETTLE_MAX: Duration = Duration::from_secs(6);
const SETTLE_QUIET: Duration = Duration::from_millis(1500);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Seconds of storm with the agent running, summed over the agent
    /// windows; the no-agent windows add the same again.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Number of alternating windows (even: no agent, agent, no agent, ...).
    /// Each window lasts 2 * seconds / windows.
    #[arg(long, default_value_t = 6)]
    pub windows: u32,
    /// Output directory (relative paths are relative to the workspace root):
    /// exec-storm.json, events.jsonl of the last agent window, agent logs.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// Storm generator threads (each spawns and waits for the program in a loop).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Program the storm executes.
    #[arg(long, default_value = "/bin/true")]
    pub program: PathBuf,
    /// Turn on kernel BPF run-time statistics (kernel.bpf_stats_enabled)
    /// during the run and report the kernel time of all the agent's BPF
    /// programs per storm exec (machine-wide: other activity counts too; the
    /// stats themselves add a little overhead).
    #[arg(long)]
    pub bpf_stats: bool,
    /// Do not build; use the existing target/release/vigil-agent.
    #[arg(long)]
    pub no_build: bool,
    /// Extra arguments for the agent (after the events/metrics arguments).
    #[arg(last = true)]
    pub agent_args: Vec<String>,
}

// ---------------------------------------------------------------------------
// Storm generator

pub struct StormResult {
    pub execs: u64,
    pub seconds: f64,
    pub spawn_errors: u64,
}

/// Threads that spawn and wait for a program as fast as they can.
pub struct Storm {
    count: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    done: mpsc::Receiver<()>,
    handles: Vec<JoinHandle<()>>,
    started: Instant,
}

impl Storm {
    pub fn start(threads: usize, program: &Path) -> Result<Self> {
        let count = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, done) = mpsc::channel();
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let (count, errors, stop, tx) =
                (count.clone(), errors.clone(), stop.clone(), tx.clone());
            let program = program.to_path_buf();
            let handle = std::thread::Builder::new()
                .name(format!("storm-{i}"))
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let spawned = Command::new(&program)
                            .stdin(Stdio::null())
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .spawn();
                        match spawned.and_then(|mut c| c.wait()) {
                            Ok(_) => {
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
                .context("cannot start a storm thread")?;
            handles.push(handle);
        }
        Ok(Self {
            count,
            errors,
            stop,
            done,
            handles,
            started: Instant::now(),
        })
    }

    pub fn execs(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops the threads; counts only the execs completed before the stop.
    pub fn stop(mut self) -> Result<StormResult> {
        self.stop.store(true, Ordering::Relaxed);
        let seconds = self.started.elapsed().as_secs_f64();
        let execs = self.count.load(Ordering::Relaxed);
        let spawn_errors = self.errors.load(Ordering::Relaxed);
        for _ in 0..self.handles.len() {
            self.done
                .recv_timeout(Duration::from_secs(10))
                .context("a storm thread did not stop within 10 s (a spawned program hangs?)")?;
        }
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
        Ok(StormResult {
            execs,
            seconds,
            spawn_errors,
        })
    }
}

impl Drop for Storm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `cargo xtask storm`: the generator alone, for calibration.
pub fn storm_only(seconds: f64, threads: usize, program: &Path) -> Result<()> {
    util::install_signal_handlers();
    println!(
        "==> exec storm: {threads} thread(s) spawning {} for {seconds} s (no agent)",
        program.display()
    );
    let storm = Storm::start(threads, program)?;
    let pb = bar(seconds, "storm");
    while storm.elapsed().as_secs_f64() < seconds && !util::interrupted() {
        std::thread::sleep(SAMPLE_EVERY);
        let e = storm.elapsed().as_secs_f64();
        pb.set_position((e * 1000.0) as u64);
        pb.set_message(format!("{:>7.0} exec/s", storm.execs() as f64 / e));
    }
    let r = storm.stop()?;
    pb.finish_and_clear();
    println!(
        "{} execs in {:.2} s: {:.0} exec/s ({:.0} per thread), {} spawn errors",
        r.execs,
        r.seconds,
        r.execs as f64 / r.seconds,
        r.execs as f64 / r.seconds / threads.max(1) as f64,
        r.spawn_errors
    );
    if util::interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// /proc sampling

fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// utime + stime of all the process's threads, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after "(comm)": state is field 3; utime/stime are fields 14/15.
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Sum of run_time_ns / run_cnt over the BPF programs the process holds
/// (deduplicated by prog_id); needs kernel.bpf_stats_enabled=1.
fn bpf_prog_stats(pid: u32) -> Option<(u64, u64, usize)> {
    let mut seen = std::collections::HashSet::new();
    let (mut ns, mut cnt) = (0u64, 0u64);
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
        let (Some(id), Some(t), Some(c)) =
            (field("prog_id:"), field("run_time_ns:"), field("run_cnt:"))
        else {
            continue;
        };
        if seen.insert(id) {
            ns += t;
            cnt += c;
        }
    }
    Some((ns, cnt, seen.len()))
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

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    if tail.is_empty() {
        format!("(log {} is empty)", path.display())
    } else {
        format!("last lines of {}:\n{tail}", path.display())
    }
}

impl Agent {
    fn start(bin: &Path, events: &Path, log: PathBuf, extra: &[String]) -> Result<Self> {
        let addr = free_local_addr()?;
        let log_file =
            File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("--events-json")
            .arg(events)
            .arg("--metrics-addr")
            .arg(addr.to_string())
            .args(extra)
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
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the agent exited early ({})\n{}",
                util::describe_status(status),
                log_tail(&self.log, 30)
            );
        }
        Ok(())
    }

    /// Waits until `/metrics` answers 200 (bounded).
    fn wait_ready(&mut self, spinner: &ProgressBar) -> Result<Duration> {
        let start = Instant::now();
        loop {
            self.check_alive()?;
            if util::interrupted() {
                bail!("interrupted");
            }
            if let Ok((200, _)) = prom::http_get(self.addr, "/metrics", Duration::from_secs(1)) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > READY_TIMEOUT {
                bail!(
                    "the agent's metrics endpoint http://{}/metrics did not answer within {} s\n{}",
                    self.addr,
                    READY_TIMEOUT.as_secs(),
                    log_tail(&self.log, 30)
                );
            }
            spinner.tick();
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn scrape(&self) -> Result<Scrape> {
        prom::scrape(self.addr, SCRAPE_TIMEOUT)
    }

    /// SIGINT, bounded wait, then SIGKILL. Returns a description of the exit.
    fn stop(&mut self) -> String {
        if let Ok(Some(status)) = self.child.try_wait() {
            return format!("had already exited ({})", util::describe_status(status));
        }
        util::kill_pid(self.pid, libc::SIGINT);
        match util::wait_timeout(&mut self.child, STOP_TIMEOUT) {
            Ok(Some(status)) => util::describe_status(status),
            _ => {
                // The agent leads its own process group: take any helpers too.
                util::kill_group(self.pid, libc::SIGKILL);
                let _ = self.child.wait();
                format!(
                    "did not stop within {} s of SIGINT: killed",
                    STOP_TIMEOUT.as_secs()
                )
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

// ---------------------------------------------------------------------------
// Results

#[derive(Serialize, Debug, Clone)]
struct WindowResult {
    index: usize,
    agent: bool,
    seconds: f64,
    execs: u64,
    exec_per_s: f64,
    spawn_errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    agent_stats: Option<AgentStats>,
}

#[derive(Serialize, Debug, Clone, Default)]
struct AgentStats {
    /// Seconds from start until /metrics answered.
    startup_s: f64,
    /// Deltas over the window (from storm start to the settled end).
    events_exec: Option<f64>,
    events_exec_per_s: Option<f64>,
    /// Decoded exec events / execs the storm made (other execs on the
    /// machine count too, so slightly above 1.0 is normal).
    coverage: Option<f64>,
    kernel_events_exec: Option<f64>,
    kernel_dropped_exec: Option<f64>,
    decode_errors: Option<f64>,
    /// Gauge at the end of the window.
    process_tree_size: Option<f64>,
    rss_max_mb: Option<f64>,
    rss_mean_mb: Option<f64>,
    /// utime+stime of the agent during the storm, % of one core.
    cpu_pct: Option<f64>,
    /// Lines in events.jsonl after the agent stopped.
    events_json_lines: Option<u64>,
    /// Kernel time of the agent's BPF programs (--bpf-stats).
    #[serde(skip_serializing_if = "Option::is_none")]
    bpf_run_time_ns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bpf_run_cnt: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bpf_programs: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bpf_ns_per_exec: Option<f64>,
    exit: String,
}

#[derive(Serialize, Debug)]
struct Report {
    benchmark: &'static str,
    started_unix: u64,
    config: Config,
    machine: Machine,
    windows: Vec<WindowResult>,
    pairs: Vec<Pair>,
    summary: Summary,
}

#[derive(Serialize, Debug)]
struct Config {
    /// Storm seconds with the agent, summed over the agent windows.
    seconds_with_agent: u64,
    windows: u32,
    window_seconds: f64,
    threads: usize,
    program: PathBuf,
    agent: PathBuf,
    agent_args: Vec<String>,
    bpf_stats: bool,
}

#[derive(Serialize, Debug)]
struct Machine {
    cpus: usize,
    kernel: String,
}

/// One no-agent window and the agent window after it.
#[derive(Serialize, Debug)]
struct Pair {
    without_exec_per_s: f64,
    with_exec_per_s: f64,
    ratio: f64,
}

#[derive(Serialize, Debug, Default)]
struct Summary {
    exec_per_s_without: Option<f64>,
    exec_per_s_with: Option<f64>,
    /// Median over pairs of (with / without).
    ratio: Option<f64>,
    events_exec_per_s: Option<f64>,
    coverage: Option<f64>,
    kernel_dropped_exec_total: Option<f64>,
    decode_errors_total: Option<f64>,
    rss_max_mb: Option<f64>,
    rss_mean_mb: Option<f64>,
    cpu_pct: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bpf_ns_per_exec: Option<f64>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn sub(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? - b.unwrap_or(0.0))
}

fn count_lines(path: &Path) -> Option<u64> {
    let file = File::open(path).ok()?;
    let mut reader = BufReader::new(file);
    let mut buf = Vec::new();
    let mut n = 0;
    while reader.read_until(b'\n', &mut buf).ok()? > 0 {
        n += 1;
        buf.clear();
    }
    Some(n)
}

// ---------------------------------------------------------------------------
// Driver

fn bar(seconds: f64, prefix: &str) -> ProgressBar {
    let pb = ProgressBar::new((seconds * 1000.0) as u64);
    pb.set_style(
        ProgressStyle::with_template("{prefix:<22} [{bar:30.cyan/blue}] {msg}")
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
}

pub fn bench(args: BenchArgs) -> Result<()> {
    if !util::is_root() {
        bail!("the benchmark starts the agent, which loads eBPF programs: run it as root (sudo -E cargo xtask bench)");
    }
    if args.windows < 2 || !args.windows.is_multiple_of(2) {
        bail!(
            "--windows must be even and >= 2 (alternating no-agent / agent), got {}",
            args.windows
        );
    }
    let window = Duration::from_secs_f64(args.seconds as f64 * 2.0 / args.windows as f64);
    if window < Duration::from_secs(1) {
        bail!("windows of {window:?} are too short: raise --seconds or lower --windows");
    }
    if !util::is_executable(&args.program) {
        bail!(
            "storm program {} is not an executable file",
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
        let step = util::run_step(
            "build agent (release)",
            &mut cmd,
            Duration::from_secs(45 * 60),
        );
        if !step.ok {
            bail!("building the agent failed: {}", step.detail);
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
    let _bpf_stats = if args.bpf_stats {
        Some(BpfStatsGuard::enable()?)
    } else {
        None
    };
    util::install_signal_handlers();

    println!(
        "==> exec storm: {} windows of {:.1} s alternating without/with {} ({} thread(s) spawning {}); results in {}",
        args.windows,
        window.as_secs_f64(),
        agent_bin.display(),
        args.threads,
        args.program.display(),
        out.display()
    );
    let multi = if console_is_tty() {
        MultiProgress::new()
    } else {
        MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
    };
    let ctx = Ctx {
        args: &args,
        out: out.clone(),
        agent_bin,
        window,
        multi,
    };
    let overall = ctx.multi.add(ProgressBar::new(args.windows as u64));
    overall.set_style(
        ProgressStyle::with_template(
            "{prefix:<22} [{bar:30.green/white}] window {pos}/{len}, {elapsed} elapsed",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    overall.set_prefix("bench");

    let started_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut results: Vec<WindowResult> = Vec::new();
    for index in 0..args.windows as usize {
        let with_agent = index % 2 == 1;
        let result = run_window(&ctx, index, with_agent)?;
        ctx.multi.suspend(|| println!("{}", window_line(&result)));
        results.push(result);
        overall.inc(1);
    }
    overall.finish_and_clear();

    let pairs: Vec<Pair> = results
        .chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| Pair {
            without_exec_per_s: c[0].exec_per_s,
            with_exec_per_s: c[1].exec_per_s,
            ratio: c[1].exec_per_s / c[0].exec_per_s,
        })
        .collect();
    let summary = summarize(&results, &pairs);
    print_report(&results, &pairs, &summary);

    let report = Report {
        benchmark: "exec-storm",
        started_unix,
        config: Config {
            seconds_with_agent: args.seconds,
            windows: args.windows,
            window_seconds: window.as_secs_f64(),
            threads: args.threads,
            program: args.program.clone(),
            agent: ctx.agent_bin.clone(),
            agent_args: args.agent_args.clone(),
            bpf_stats: args.bpf_stats,
        },
        machine: Machine {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
        },
        windows: results,
        pairs,
        summary,
    };
    let json_path = out.join("exec-storm.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    println!("==> wrote {}", json_path.display());
    Ok(())
}

fn console_is_tty() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

fn run_window(ctx: &Ctx, index: usize, with_agent: bool) -> Result<WindowResult> {
    let label = format!(
        "w{}/{} {}",
        index + 1,
        ctx.args.windows,
        if with_agent { "agent" } else { "no agent" }
    );
    let events_path = ctx.out.join("events.jsonl");
    let mut agent = None;
    let mut stats = AgentStats::default();
    if with_agent {
        // events.jsonl holds the last agent window's events.
        let _ = std::fs::remove_file(&events_path);
        let spinner = ctx.multi.add(ProgressBar::new_spinner());
        spinner.set_message(format!("{label}: starting the agent, waiting for /metrics"));
        let mut a = Agent::start(
            &ctx.agent_bin,
            &events_path,
            ctx.out.join(format!("agent-w{}.log", index + 1)),
            &ctx.args.agent_args,
        )?;
        stats.startup_s = a.wait_ready(&spinner)?.as_secs_f64();
        spinner.finish_and_clear();
        agent = Some(a);
    }

    let before = match &agent {
        Some(a) => Some(a.scrape().context("scraping the agent before the storm")?),
        None => None,
    };
    let pid = agent.as_ref().map(|a| a.pid);
    let bpf0 = pid.filter(|_| ctx.args.bpf_stats).and_then(bpf_prog_stats);
    let cpu0 = pid.and_then(cpu_ticks);
    let mut rss = Vec::new();

    let pb = ctx.multi.add(bar(ctx.window.as_secs_f64(), &label));
    let storm = Storm::start(ctx.args.threads, &ctx.args.program)?;
    let total = ctx.window.as_secs_f64();
    loop {
        std::thread::sleep(SAMPLE_EVERY);
        let elapsed = storm.elapsed().as_secs_f64();
        if let Some(pid) = pid {
            if let Some(kb) = rss_kb(pid) {
                rss.push(kb as f64 / 1024.0);
            }
        }
        let rate = storm.execs() as f64 / elapsed.max(1e-3);
        let rss_now = rss
            .last()
            .map(|r| format!("  agent rss {r:.1} MB"))
            .unwrap_or_default();
        pb.set_position((elapsed.min(total) * 1000.0) as u64);
        pb.set_message(format!(
            "{elapsed:>5.1}/{total:.1} s {rate:>7.0} exec/s{rss_now}"
        ));
        if let Some(a) = agent.as_mut() {
            if let Err(err) = a.check_alive() {
                let _ = storm.stop();
                pb.finish_and_clear();
                return Err(err);
            }
        }
        if elapsed >= total || util::interrupted() {
            break;
        }
    }
    let storm_result = storm.stop()?;
    let cpu1 = pid.and_then(cpu_ticks);
    let bpf1 = pid.filter(|_| ctx.args.bpf_stats).and_then(bpf_prog_stats);
    pb.finish_and_clear();

    if let Some(mut a) = agent {
        // Let the agent drain its ring buffer and publish its kernel-side
        // counters (synced periodically, about once a second): wait until the
        // exec counters have not moved for SETTLE_QUIET (bounded by SETTLE_MAX).
        let settle_start = Instant::now();
        let mut last_change = Instant::now();
        let mut last: Option<[Option<f64>; 3]> = None;
        let mut after = None;
        while settle_start.elapsed() < SETTLE_MAX {
            std::thread::sleep(Duration::from_millis(250));
            if let Ok(s) = a.scrape() {
                let now = [
                    s.sum("vigil_events_total", &[("kind", "exec")]),
                    s.sum("vigil_kernel_events_total", &[("kind", "exec")]),
                    s.sum("vigil_kernel_dropped_total", &[("kind", "exec")]),
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
        let secs = storm_result.seconds;
        if let (Some(before), Some(after)) = (&before, &after) {
            let delta = |name: &str, labels: &[(&str, &str)]| {
                sub(after.sum(name, labels), before.sum(name, labels))
            };
            stats.events_exec = delta("vigil_events_total", &[("kind", "exec")]);
            stats.events_exec_per_s = stats.events_exec.map(|e| e / secs);
            stats.coverage = stats
                .events_exec
                .filter(|_| storm_result.execs > 0)
                .map(|e| e / storm_result.execs as f64);
            stats.kernel_events_exec = delta("vigil_kernel_events_total", &[("kind", "exec")]);
            stats.kernel_dropped_exec = delta("vigil_kernel_dropped_total", &[("kind", "exec")]);
            stats.decode_errors = delta("vigil_decode_errors_total", &[]);
            stats.process_tree_size = after.sum("vigil_process_tree_size", &[]);
        } else {
            ctx.multi.suspend(|| {
                eprintln!("warning: {label}: could not scrape the agent's metrics after the storm")
            });
        }
        if !rss.is_empty() {
            stats.rss_max_mb = rss.iter().copied().reduce(f64::max);
            stats.rss_mean_mb = Some(rss.iter().sum::<f64>() / rss.len() as f64);
        }
        if let (Some(c0), Some(c1)) = (cpu0, cpu1) {
            stats.cpu_pct =
                Some((c1.saturating_sub(c0)) as f64 / clock_ticks_per_sec() / secs * 100.0);
        }
        if let (Some((ns0, cnt0, _)), Some((ns1, cnt1, progs @ 1..))) = (bpf0, bpf1) {
            let ns = ns1.saturating_sub(ns0);
            stats.bpf_run_time_ns = Some(ns);
            stats.bpf_run_cnt = Some(cnt1.saturating_sub(cnt0));
            stats.bpf_programs = Some(progs);
            if storm_result.execs > 0 {
                stats.bpf_ns_per_exec = Some(ns as f64 / storm_result.execs as f64);
            }
        }
        stats.exit = a.stop();
        stats.events_json_lines = count_lines(&events_path);
    }
    if util::interrupted() {
        bail!("interrupted");
    }
    Ok(WindowResult {
        index: index + 1,
        agent: with_agent,
        seconds: storm_result.seconds,
        execs: storm_result.execs,
        exec_per_s: storm_result.execs as f64 / storm_result.seconds,
        spawn_errors: storm_result.spawn_errors,
        agent_stats: with_agent.then_some(stats),
    })
}

fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) => format!("{v:.decimals$}"),
        None => "-".to_string(),
    }
}

fn window_line(r: &WindowResult) -> String {
    let mut line = format!(
        "window {:>2} {:<8} {:>6.1} s {:>8.0} exec/s",
        r.index,
        if r.agent { "agent" } else { "no-agent" },
        r.seconds,
        r.exec_per_s
    );
    if let Some(s) = &r.agent_stats {
        line += &format!(
            "  decoded {}/s  drops {}  rss {} MB  cpu {}%  (agent exit: {})",
            fmt_opt(s.events_exec_per_s, 0),
            fmt_opt(s.kernel_dropped_exec, 0),
            fmt_opt(s.rss_max_mb, 1),
            fmt_opt(s.cpu_pct, 1),
            s.exit
        );
    }
    if r.spawn_errors > 0 {
        line += &format!("  spawn errors {}", r.spawn_errors);
    }
    line
}

fn summarize(results: &[WindowResult], pairs: &[Pair]) -> Summary {
    let agent: Vec<&AgentStats> = results
        .iter()
        .filter_map(|r| r.agent_stats.as_ref())
        .collect();
    let collect =
        |f: fn(&AgentStats) -> Option<f64>| agent.iter().filter_map(|s| f(s)).collect::<Vec<_>>();
    let total = |v: Vec<f64>| (!v.is_empty()).then(|| v.iter().sum());
    Summary {
        exec_per_s_without: median(
            results
                .iter()
                .filter(|r| !r.agent)
                .map(|r| r.exec_per_s)
                .collect(),
        ),
        exec_per_s_with: median(
            results
                .iter()
                .filter(|r| r.agent)
                .map(|r| r.exec_per_s)
                .collect(),
        ),
        ratio: median(pairs.iter().map(|p| p.ratio).collect()),
        events_exec_per_s: median(collect(|s| s.events_exec_per_s)),
        coverage: median(collect(|s| s.coverage)),
        kernel_dropped_exec_total: total(collect(|s| s.kernel_dropped_exec)),
        decode_errors_total: total(collect(|s| s.decode_errors)),
        rss_max_mb: collect(|s| s.rss_max_mb).into_iter().reduce(f64::max),
        rss_mean_mb: median(collect(|s| s.rss_mean_mb)),
        cpu_pct: median(collect(|s| s.cpu_pct)),
        bpf_ns_per_exec: median(collect(|s| s.bpf_ns_per_exec)),
    }
}

fn print_report(results: &[WindowResult], pairs: &[Pair], s: &Summary) {
    println!();
    println!(
        "{:>3}  {:<8} {:>6} {:>9} {:>9} {:>6} {:>9} {:>7} {:>7} {:>6} {:>8} {:>8} {:>6}",
        "win",
        "agent",
        "secs",
        "exec/s",
        "decoded/s",
        "cover",
        "k-events",
        "drops",
        "dec-err",
        "tree",
        "rss-max",
        "rss-mean",
        "cpu%"
    );
    for r in results {
        let a = r.agent_stats.clone().unwrap_or_default();
        let dash = |v: Option<f64>, d: usize| if r.agent { fmt_opt(v, d) } else { "".into() };
        println!(
            "{:>3}  {:<8} {:>6.1} {:>9.0} {:>9} {:>6} {:>9} {:>7} {:>7} {:>6} {:>8} {:>8} {:>6}",
            r.index,
            if r.agent { "yes" } else { "no" },
            r.seconds,
            r.exec_per_s,
            dash(a.events_exec_per_s, 0),
            dash(a.coverage, 3),
            dash(a.kernel_events_exec, 0),
            dash(a.kernel_dropped_exec, 0),
            dash(a.decode_errors, 0),
            dash(a.process_tree_size, 0),
            dash(a.rss_max_mb, 1),
            dash(a.rss_mean_mb, 1),
            dash(a.cpu_pct, 1),
        );
    }
    println!();
    for (i, p) in pairs.iter().enumerate() {
        println!(
            "pair {}: {:.0} exec/s without, {:.0} with: ratio {:.3}",
            i + 1,
            p.without_exec_per_s,
            p.with_exec_per_s,
            p.ratio
        );
    }
    println!();
    println!("medians:");
    println!(
        "  exec/s without agent    {}",
        fmt_opt(s.exec_per_s_without, 0)
    );
    println!(
        "  exec/s with agent       {}",
        fmt_opt(s.exec_per_s_with, 0)
    );
    println!("  ratio with/without      {}", fmt_opt(s.ratio, 3));
    println!(
        "  decoded exec events/s   {}",
        fmt_opt(s.events_exec_per_s, 0)
    );
    println!("  coverage (decoded/exec) {}", fmt_opt(s.coverage, 3));
    println!(
        "  kernel drops (total)    {}",
        fmt_opt(s.kernel_dropped_exec_total, 0)
    );
    println!(
        "  decode errors (total)   {}",
        fmt_opt(s.decode_errors_total, 0)
    );
    println!(
        "  agent RSS max / mean    {} / {} MB",
        fmt_opt(s.rss_max_mb, 1),
        fmt_opt(s.rss_mean_mb, 1)
    );
    println!(
        "  agent CPU               {} % of one core",
        fmt_opt(s.cpu_pct, 1)
    );
    if s.bpf_ns_per_exec.is_some() {
        println!(
            "  BPF kernel time/exec    {} us",
            fmt_opt(s.bpf_ns_per_exec.map(|ns| ns / 1000.0), 1)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn proc_sampling_reads_self() {
        let pid = std::process::id();
        assert!(rss_kb(pid).unwrap() > 0);
        assert!(cpu_ticks(pid).is_some());
    }
}
