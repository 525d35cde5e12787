//! Every process vigil stops is let go: the ledger of kernel freezes, the
//! claims of captures in progress, and the watchdog that enforces both.
//!
//! ## The guarantee
//!
//! - **Kernel freezes** (SIGSTOP at exec by the freeze policy) are recorded
//!   by the program itself in the `FROZEN` map before the signal, and only
//!   once the ring buffer has room for the record that tells the agent (see
//!   `emit_frozen` in the eBPF programs). The agent pins that map in bpffs
//!   as `PIN_DIR/frozen.<agent pid>.<agent start ticks>`, so the record
//!   outlives an agent that dies; [`resume_leftovers`] (run at every start
//!   and by `vigil-agent resume-frozen`, e.g. from `ExecStopPost=`) resumes
//!   what a dead agent left.
//! - **Captures** claim the process they work on with a wall-clock deadline
//!   ([`FreezeLedger::claim`]). Agent-side freezes are also listed in the
//!   capture state's `stopped.json` (see `capture::freeze`).
//! - **The watchdog** (a thread, every [`WATCHDOG_TICK`]) resumes every
//!   process in the ledger that nothing owns after `release_after` (a
//!   record lost to a decode error, a detection that asked for nothing),
//!   and every claimed process (a capture job, queued or running) whose
//!   deadline passed (the capture is then reported as timed out), again at
//!   every pass while the stuck capture could stop it again. Entries of
//!   processes that are gone are dropped.
//!
//! Signals go through pidfds checked against the start time, so a recycled
//! pid is never resumed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use tracing::{info, warn};
use vigil_sensor_common::FrozenEntry;

use crate::capture::freeze::signal_if_same;
use crate::metrics::Metrics;

/// Where the agent pins its ledger map (bpffs).
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/vigil";

/// How often the watchdog looks.
pub const WATCHDOG_TICK: Duration = Duration::from_millis(50);

/// The kernel's frozen-process map, as the agent sees it.
pub type FrozenMap = BpfHashMap<MapData, u32, FrozenEntry>;

/// Watchdog settings.
#[derive(Clone, Debug)]
pub struct LedgerOptions {
    /// A kernel-frozen process that no capture owns is resumed this long
    /// after its freeze.
    pub release_after: Duration,
}

/// Shared handle on the ledger (cheap to clone).
#[derive(Clone)]
pub struct FreezeLedger {
    inner: Arc<Inner>,
}

struct Inner {
    map: Option<Mutex<FrozenMap>>,
    pin_path: Option<PathBuf>,
    claims: Mutex<HashMap<u32, Claim>>,
    next_claim: AtomicU64,
    options: LedgerOptions,
    metrics: Arc<Metrics>,
}

struct Claim {
    id: u64,
    start_ticks: Option<u64>,
    deadline: Instant,
    expired: bool,
}

/// A capture's hold on a process: until it is dropped or its deadline
/// passes, the watchdog leaves the process stopped.
pub struct ClaimGuard {
    ledger: FreezeLedger,
    pid: u32,
    id: u64,
    deadline: Instant,
}

impl ClaimGuard {
    /// When the claim expires.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Whether the deadline passed (the watchdog resumed the process).
    pub fn timed_out(&self) -> bool {
        let claims = self.ledger.claims();
        claims
            .get(&self.pid)
            .is_some_and(|c| c.id == self.id && c.expired)
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        let mut claims = self.ledger.claims();
        if claims.get(&self.pid).is_some_and(|c| c.id == self.id) {
            claims.remove(&self.pid);
        }
    }
}

fn ticks_per_second() -> u64 {
    crate::procscan::ticks_per_second().max(1)
}

/// Start time in clock ticks (as in /proc/PID/stat) from ns since boot.
pub fn boot_ns_to_ticks(ns: u64) -> u64 {
    ns / (1_000_000_000 / ticks_per_second())
}

impl FreezeLedger {
    /// A ledger over the kernel's map (`None`: kernel freezing is off, only
    /// claims are watched), pinned at `pin_path` if it was pinned.
    pub fn new(
        map: Option<FrozenMap>,
        pin_path: Option<PathBuf>,
        options: LedgerOptions,
        metrics: Arc<Metrics>,
    ) -> Self {
        metrics.freeze_ledger_pinned.set(pin_path.is_some() as i64);
        FreezeLedger {
            inner: Arc::new(Inner {
                map: map.map(Mutex::new),
                pin_path,
                claims: Mutex::new(HashMap::new()),
                next_claim: AtomicU64::new(1),
                options,
                metrics,
            }),
        }
    }

    fn claims(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Claim>> {
        self.inner.claims.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn map(&self) -> Option<std::sync::MutexGuard<'_, FrozenMap>> {
        self.inner
            .map
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A capture takes `pid` (start time in clock ticks, if known) until
    /// `deadline`.
    pub fn claim(&self, pid: u32, start_ticks: Option<u64>, deadline: Instant) -> ClaimGuard {
        let id = self.inner.next_claim.fetch_add(1, Ordering::Relaxed);
        self.claims().insert(
            pid,
            Claim {
                id,
                start_ticks,
                deadline,
                expired: false,
            },
        );
        ClaimGuard {
            ledger: self.clone(),
            pid,
            id,
            deadline,
        }
    }

    /// Lets a kernel-frozen process go: its ledger entry is removed, then it
    /// gets SIGCONT if it is still the process the entry names. Nothing
    /// happens when there is no entry (someone released it already). Only
    /// without a ledger map (unit tests) is `start_ticks` used instead.
    pub fn release(&self, pid: u32, start_ticks: Option<u64>) {
        let start = match self.inner.map {
            Some(_) => match self.take_entry(pid, None) {
                Some(e) => Some(boot_ns_to_ticks(e.start_boot_ns)),
                None => return,
            },
            None => start_ticks,
        };
        self.resume(pid, start);
    }

    /// SIGCONT to `pid` if it still has `start` (clock ticks), counted.
    fn resume(&self, pid: u32, start: Option<u64>) -> bool {
        match signal_if_same(pid as i32, start, libc::SIGCONT) {
            Ok(sent) => {
                if sent {
                    self.inner.metrics.resumed.inc();
                }
                sent
            }
            Err(e) => {
                self.inner.metrics.resume_errors.inc();
                warn!(pid, error = %e, "could not resume a frozen process");
                false
            }
        }
    }

    /// Forgets `pid`'s entry once its capture released it, if the entry is
    /// that freeze's: one made before `before_boot_ns` (a freeze of a later
    /// exec of the same process is left to be released).
    pub fn forget(&self, pid: u32, before_boot_ns: u64) {
        self.take_entry(pid, Some(before_boot_ns));
    }

    /// Removes and returns `pid`'s entry (only if frozen before `before`).
    fn take_entry(&self, pid: u32, before: Option<u64>) -> Option<FrozenEntry> {
        let mut map = self.map()?;
        let e = map.get(&pid, 0).ok()?;
        if before.is_some_and(|b| e.frozen_boot_ns >= b) {
            return None;
        }
        let _ = map.remove(&pid);
        Some(e)
    }

    /// One watchdog pass at `now` (boot ns `now_boot`): resumes claimed
    /// processes past their deadline (and again at every pass while their
    /// capture still runs and they are stopped: nothing may stop them
    /// again), unowned kernel freezes older than `release_after`, and drops
    /// entries of processes that are gone. Locks are held only to read and
    /// update the tables, never across a signal. Returns how many processes
    /// it resumed.
    pub fn sweep(&self, now: Instant, now_boot: u64) -> usize {
        let mut resumed = 0;
        // Claims past their deadline.
        let mut expired_now = Vec::new();
        let mut still_expired = Vec::new();
        let owned: std::collections::HashSet<u32> = {
            let mut claims = self.claims();
            for (&pid, c) in claims.iter_mut() {
                if c.expired {
                    still_expired.push((pid, c.start_ticks));
                } else if now >= c.deadline {
                    c.expired = true;
                    expired_now.push((pid, c.start_ticks));
                }
            }
            claims
                .iter()
                .filter(|(_, c)| !c.expired)
                .map(|(&p, _)| p)
                .collect()
        };
        for &(pid, start) in &expired_now {
            self.inner.metrics.capture_timeouts.inc();
            warn!(pid, "capture passed its deadline: resuming the process");
            if let Some(mut map) = self.map() {
                let _ = map.remove(&pid);
            }
            resumed += self.resume(pid, start) as usize;
        }
        for (pid, start) in still_expired {
            if process_state(pid) == Some('T') {
                warn!(
                    pid,
                    "the capture past its deadline stopped the process again: resuming"
                );
                resumed += self.resume(pid, start) as usize;
            }
        }
        // Unowned kernel freezes.
        let entries: Vec<(u32, FrozenEntry)> = match self.map() {
            Some(map) => map.iter().filter_map(Result::ok).collect(),
            None => return resumed,
        };
        let release_after = self.inner.options.release_after.as_nanos() as u64;
        let mut now_frozen = 0i64;
        for (pid, e) in entries {
            let age = now_boot.saturating_sub(e.frozen_boot_ns);
            if owned.contains(&pid) || age < release_after {
                now_frozen += 1;
                continue;
            }
            // Removed first (only if still this freeze), then resumed: a
            // new freeze of the same pid is never forgotten.
            if self.take_entry(pid, Some(e.frozen_boot_ns + 1)).is_none() {
                continue;
            }
            let start = boot_ns_to_ticks(e.start_boot_ns);
            match signal_if_same(pid as i32, Some(start), libc::SIGCONT) {
                Ok(true) => {
                    self.inner.metrics.freeze_watchdog_released.inc();
                    self.inner.metrics.resumed.inc();
                    resumed += 1;
                    warn!(
                        pid,
                        frozen_ms = age / 1_000_000,
                        "watchdog: released a frozen process no capture owned"
                    );
                }
                Ok(false) => {}
                Err(err) => {
                    self.inner.metrics.resume_errors.inc();
                    warn!(pid, error = %err, "watchdog: could not resume a frozen process");
                }
            }
        }
        self.inner.metrics.frozen_now.set(now_frozen);
        resumed
    }

    /// Starts the watchdog thread; it runs until the process exits.
    pub fn start_watchdog(&self) -> anyhow::Result<()> {
        let ledger = self.clone();
        std::thread::Builder::new()
            .name("vigil-freeze-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(WATCHDOG_TICK);
                ledger.sweep(Instant::now(), crate::model::boot_ns_now());
            })
            .context("starting the freeze watchdog")?;
        Ok(())
    }

    /// At shutdown: resumes every process still in the ledger and removes
    /// the pin (nothing is left for a later start to do).
    pub fn release_all(&self) -> usize {
        let entries: Vec<(u32, FrozenEntry)> = match self.map() {
            Some(mut map) => {
                let all: Vec<_> = map.iter().filter_map(Result::ok).collect();
                for (pid, _) in &all {
                    let _ = map.remove(pid);
                }
                all
            }
            None => Vec::new(),
        };
        let n = entries
            .into_iter()
            .filter(|(pid, e)| self.resume(*pid, Some(boot_ns_to_ticks(e.start_boot_ns))))
            .count();
        if let Some(p) = &self.inner.pin_path {
            if let Err(e) = std::fs::remove_file(p) {
                warn!(path = %p.display(), error = %e, "could not remove the ledger pin");
            }
        }
        n
    }
}

/// The state letter of `pid` (/proc/PID/stat), if it exists.
fn process_state(pid: u32) -> Option<char> {
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .ok()
        .map(|s| s.state)
}

/// The pin file name of this agent's ledger: `frozen.<pid>.<start ticks>`.
pub fn pin_name() -> String {
    let me = std::process::id();
    let start = procfs::process::Process::myself()
        .and_then(|p| p.stat())
        .map(|s| s.starttime)
        .unwrap_or(0);
    format!("frozen.{me}.{start}")
}

/// Why `pid` (start time `start_ticks`) is another vigil agent, if it is:
/// its freeze ledger is pinned in `pin_dir` (every agent pins one before it
/// loads its programs, where bpffs allows it), or it runs this agent's very
/// executable file (the same path, device and inode; for kernels that
/// refuse pinning). Such an agent has a freeze watchdog of its own: if two
/// agents stopped each other, both would stay stopped, each waiting for its
/// own stopped watchdog; and one must not kill the other (two agents on a
/// node during an upgrade or a migration). So an agent never stops or
/// contains another (it still reports what the other does).
pub fn peer_agent(pin_dir: &Path, pid: i32, start_ticks: u64) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    use std::sync::OnceLock;
    if pid as u32 == std::process::id() {
        return None;
    }
    let path = pin_dir.join(format!("frozen.{pid}.{start_ticks}"));
    if path.exists() {
        return Some(format!("its freeze ledger {} is pinned", path.display()));
    }
    // The link's text first: only a process whose executable has this
    // agent's path gets its file looked up (a file on a hung or hostile
    // mount is never touched).
    static MINE: OnceLock<Option<(PathBuf, u64, u64)>> = OnceLock::new();
    let (exe, dev, ino) = MINE
        .get_or_init(|| {
            let link = std::fs::read_link("/proc/self/exe").ok()?;
            let m = std::fs::metadata("/proc/self/exe").ok()?;
            Some((link, m.dev(), m.ino()))
        })
        .as_ref()?;
    let theirs = format!("/proc/{pid}/exe");
    if std::fs::read_link(&theirs).ok().as_ref() != Some(exe) {
        return None;
    }
    std::fs::metadata(&theirs)
        .ok()
        .filter(|m| (m.dev(), m.ino()) == (*dev, *ino))
        .map(|_| "it runs this agent's executable".into())
}

/// Whether the pin file `name` belongs to an agent that still runs (other
/// than this process).
fn owner_alive(name: &str) -> bool {
    let mut it = name.strip_prefix("frozen.").unwrap_or("").split('.');
    let (Some(pid), Some(start)) = (
        it.next().and_then(|p| p.parse::<i32>().ok()),
        it.next().and_then(|s| s.parse::<u64>().ok()),
    ) else {
        return false;
    };
    if pid as u32 == std::process::id() {
        return false;
    }
    procfs::process::Process::new(pid)
        .and_then(|p| p.stat())
        .is_ok_and(|s| s.starttime == start)
}

/// What [`resume_leftovers`] did.
#[derive(Debug, Default, serde::Serialize)]
pub struct LeftoverReport {
    /// Pins of dead agents that were read and removed.
    pub ledgers: Vec<PathBuf>,
    /// Processes resumed.
    pub resumed: Vec<u32>,
    /// Entries whose process was gone or recycled (dropped).
    pub stale: usize,
    /// Pins of agents that still run (left alone).
    pub live_ledgers: Vec<PathBuf>,
    /// Processes found in /proc stopped before their first instruction
    /// (what a kernel freeze leaves when no ledger could be pinned), resumed.
    pub resumed_at_exec: Vec<u32>,
    /// Other agents running: /proc was not scanned (their freezes are
    /// theirs to release).
    pub running_agents: Vec<u32>,
}

/// Resumes what dead agents left frozen: every process in the ledgers they
/// left pinned in `pin_dir` (pins removed), and every process found in
/// /proc stopped before its first instruction (see [`stopped_at_exec`]),
/// which is what a kernel freeze leaves where pinning is refused. While
/// another agent runs, its ledger and the /proc scan are left to it unless
/// `include_running`. A missing `pin_dir` is nothing to do.
pub fn resume_leftovers(pin_dir: &Path, include_running: bool) -> anyhow::Result<LeftoverReport> {
    let mut report = LeftoverReport {
        running_agents: running_agents(),
        ..LeftoverReport::default()
    };
    match std::fs::read_dir(pin_dir) {
        Ok(rd) => {
            for ent in rd.flatten() {
                let name = ent.file_name().to_string_lossy().into_owned();
                if !name.starts_with("frozen.") {
                    continue;
                }
                let path = ent.path();
                if owner_alive(&name) && !include_running {
                    report.live_ledgers.push(path);
                    continue;
                }
                let r = release_ledger(&path)?;
                report.resumed.extend(r.resumed);
                report.stale += r.stale;
                report.ledgers.extend(r.ledgers);
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", pin_dir.display())),
    }
    if report.running_agents.is_empty() || include_running {
        for p in procfs::process::all_processes()
            .context("listing /proc")?
            .flatten()
        {
            let pid = p.pid;
            let Some(start) = stopped_at_exec(pid) else {
                continue;
            };
            if let Ok(true) = signal_if_same(pid, Some(start), libc::SIGCONT) {
                warn!(pid, "resumed a process left stopped at exec");
                report.resumed_at_exec.push(pid as u32);
            }
        }
    }
    Ok(report)
}

/// Whether `pid` is stopped (state T) before running a single instruction
/// of the program it exec'd, as the kernel freeze leaves it: one thread,
/// its stack pointer still at the start of the stack the exec built
/// (/proc/PID/syscall vs /proc/PID/stat `startstack`; any instruction that
/// touches the stack moves it). Returns its start time (clock ticks).
pub fn stopped_at_exec(pid: i32) -> Option<u64> {
    let stat = procfs::process::Process::new(pid).ok()?.stat().ok()?;
    if stat.state != 'T' || stat.num_threads != 1 || stat.startstack == 0 {
        return None;
    }
    let sc = std::fs::read_to_string(format!("/proc/{pid}/syscall")).ok()?;
    // "NR ARGS... SP PC" (in a syscall) or "-1 SP PC"; "running" otherwise.
    let fields: Vec<&str> = sc.split_whitespace().collect();
    let sp = fields.len().checked_sub(2).map(|i| fields[i])?;
    let sp = u64::from_str_radix(sp.trim_start_matches("0x"), 16).ok()?;
    (sp == stat.startstack).then_some(stat.starttime)
}

/// Other vigil agents running on this machine (not this process, not a
/// `resume-frozen` run).
fn running_agents() -> Vec<u32> {
    let me = std::process::id() as i32;
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    all.flatten()
        .filter(|p| p.pid != me)
        .filter(|p| {
            p.stat()
                .is_ok_and(|s| s.comm == "vigil-agent" && !matches!(s.state, 'Z' | 'X'))
        })
        .filter(|p| {
            p.cmdline()
                .is_ok_and(|c| !c.iter().any(|a| a == "resume-frozen"))
        })
        .map(|p| p.pid as u32)
        .collect()
}

/// Resumes every process in the pinned ledger at `path` and removes the pin.
pub fn release_ledger(path: &Path) -> anyhow::Result<LeftoverReport> {
    let mut report = LeftoverReport::default();
    let map = MapData::from_pin(path)
        .with_context(|| format!("opening the pinned ledger {}", path.display()))?;
    let map: FrozenMap = BpfHashMap::try_from(Map::HashMap(map))
        .with_context(|| format!("{} is not a vigil ledger", path.display()))?;
    for (pid, e) in map.iter().filter_map(Result::ok) {
        match signal_if_same(
            pid as i32,
            Some(boot_ns_to_ticks(e.start_boot_ns)),
            libc::SIGCONT,
        ) {
            Ok(true) => {
                warn!(pid, ledger = %path.display(), "resumed a process an agent left frozen");
                report.resumed.push(pid);
            }
            Ok(false) => report.stale += 1,
            Err(err) => warn!(pid, error = %err, "could not resume a leftover frozen process"),
        }
    }
    std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    info!(ledger = %path.display(), "removed a frozen-process ledger");
    report.ledgers.push(path.to_path_buf());
    Ok(report)
}
