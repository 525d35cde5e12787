//! Response to detections: evidence capture on a worker thread, off the
//! event path.
//!
//! The pipeline hands a [`CaptureJob`] per process worth capturing (severity
//! at or above the configured minimum, once per process); a bounded queue
//! feeds one worker that freezes (or finds frozen by the kernel), captures,
//! seals and releases. A full queue drops the job (counted) and resumes a
//! frozen process at once: the event path never waits and no process stays
//! stopped.

use std::io::Write;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lru::LruCache;
use tracing::{info, warn};

use crate::budget::{disk_usage, BudgetOptions, CaptureBudget, Refusal};
use crate::capture::freeze::FreezeError;
use crate::capture::{CaptureConfig, CaptureError, CaptureOutcome, CaptureRequest, Capturer};
use crate::frozen::FreezeLedger;
use crate::metrics::Metrics;
use crate::metrics::ReasonLabel;
use crate::model::{Detection, Severity};

/// Capture settings (from the agent config).
#[derive(Clone, Debug)]
pub struct ResponseOptions {
    /// Root of capture work, bundles and chain state.
    pub dir: PathBuf,
    /// Agent id recorded in manifests.
    pub agent_id: String,
    /// Detections at or above this severity are captured.
    pub min_severity: Severity,
    /// Rules whose detections are captured whatever their severity.
    pub capture_rules: Vec<String>,
    /// Kill the process after capture instead of resuming it.
    pub contain: bool,
    /// Cap on memory bytes in one core file.
    pub max_core_bytes: u64,
    /// Where each capture outcome is written as a JSON line, if anywhere.
    pub evidence_json: Option<PathBuf>,
    /// Where sealed archives are queued for the collector, if anywhere.
    pub forward: Option<Arc<dyn crate::outputs::Forward>>,
    /// When the detected process exited before it could be stopped,
    /// capture its nearest living ancestor instead (the process that
    /// started it: a web server, the dropper's shell), once per branch per
    /// [`FALLBACK_QUIET`].
    pub ancestor_fallback: bool,
    /// Wall-clock limit of one capture: past it the watchdog resumes the
    /// process and the capture is reported as timed out.
    pub deadline: Duration,
    /// Captures per workload / uid per window, and the critical reserve.
    pub budget: BudgetOptions,
    /// Bytes the capture directory may hold: captures of detections below
    /// high stop at 80 % of it, high and critical ones at 100 %.
    pub max_disk_bytes: u64,
    /// Where agents pin their freeze ledgers: a process with a live
    /// ledger there (or running this agent's executable) is another agent,
    /// never stopped for a capture.
    pub peer_pin_dir: Option<PathBuf>,
    /// Where containment actions taken after a capture are reported.
    pub actions: Option<Arc<crate::contain::ActionLog>>,
}

/// One capture to do.
pub struct CaptureJob {
    /// Process id.
    pub pid: u32,
    /// Start time in ns since boot (0 if unknown).
    pub start_boot_ns: u64,
    /// The detection that asked for it.
    pub detection: serde_json::Value,
    /// Ancestor pids, parent first.
    pub ancestors: Vec<i32>,
    /// Their start times (ns since boot; 0 when unknown), same order: a
    /// stand-in capture refuses a pid recycled since.
    pub ancestor_starts: Vec<u64>,
    /// Recent events of the process and its parent.
    pub timeline: Vec<serde_json::Value>,
    /// Stopped by the kernel at exec: must be released whatever happens.
    pub frozen: bool,
    /// Severity of the detection that asked: high and critical jobs have
    /// reserved room in the queue, on disk and in the spool.
    pub severity: Severity,
    /// Containment asked for this process: the capture kills it instead of
    /// resuming it (unless a dry run); when the capture does not hold it,
    /// it is contained right after.
    pub contain: Option<crate::contain::Decision>,
}

/// The pipeline's handle on the capture worker.
pub struct Responder {
    queue: Arc<JobQueue>,
    budget: CaptureBudget,
    deadline: Duration,
    min_severity: Severity,
    capture_rules: std::collections::HashSet<String>,
    metrics: Arc<Metrics>,
    ledger: FreezeLedger,
    captured: LruCache<(u32, u64), ()>,
    worker: Option<std::thread::JoinHandle<()>>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

/// Captures that passed their deadline and whose thread has not come back
/// (blocked in the kernel): while this many are stuck, new captures are
/// skipped (counted) instead of piling up threads.
pub const MAX_STUCK_CAPTURES: usize = 2;

/// What one capture thread needs.
#[derive(Clone)]
struct JobContext {
    capturer: Capturer,
    ledger: FreezeLedger,
    contain: bool,
    fallback: bool,
    recent: Arc<std::sync::Mutex<LruCache<(i32, i32), Instant>>>,
}

/// A capture's result, the stand-in it took (if any), and whether it ran
/// past its deadline (the process was resumed during it).
type JobResult = (Result<CaptureOutcome, CaptureError>, Option<i32>, bool);

/// The capture worker thread: takes jobs in priority order, runs each on
/// its own thread with a deadline, reports each outcome.
struct Worker {
    ctx: JobContext,
    metrics: Arc<Metrics>,
    forward: Option<Arc<dyn crate::outputs::Forward>>,
    deadline: Duration,
    capture_dir: PathBuf,
    max_disk: u64,
    /// Capture threads past their deadline that have not come back.
    stuck: Vec<std::thread::JoinHandle<()>>,
    out: Option<std::io::BufWriter<std::fs::File>>,
    actions: Option<Arc<crate::contain::ActionLog>>,
}

impl Worker {
    fn run(mut self, queue: &JobQueue, stop: &std::sync::atomic::AtomicBool) {
        while let Some(q) = queue.pop() {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Shutting down: no new captures, but nothing stays stopped
                // (and what asked for containment is contained).
                if let Some(d) = &q.job.contain {
                    let rec = crate::contain::execute_now(d, q.job.pid, start_ticks(&q.job));
                    self.record(&rec);
                }
                if q.job.frozen {
                    self.ctx.ledger.release(q.job.pid, None);
                }
                continue;
            }
            let line = self.handle_contained(q);
            self.write(&line);
        }
    }

    /// [`Worker::handle`], then the containment the job asked for: done by
    /// the capture (it killed the process instead of resuming it), else
    /// now. The evidence line gets the action's record.
    fn handle_contained(&mut self, q: Queued) -> serde_json::Value {
        use crate::contain::{Action, Outcome, Record};
        let Some(d) = q.job.contain.clone() else {
            return self.handle(q);
        };
        let pid = q.job.pid;
        let start = start_ticks(&q.job);
        // The group is read while the process exists: the capture kills it.
        let group = (d.action == Action::KillGroup && !d.dry_run)
            .then(|| crate::contain::killable_group(pid, start));
        let mut line = self.handle(q);
        let killed = line["evidence"]["killed"] == true && line["stand_in"] != true;
        let mut rec = if d.dry_run {
            Record::new(&d, pid, Outcome::DryRun)
        } else if killed {
            let mut r = Record::new(&d, pid, Outcome::Done);
            match group {
                Some(Ok(g)) => {
                    r.process_group = Some(g);
                    if let Err(e) = crate::contain::kill_group(g) {
                        r.result = Outcome::Failed;
                        r.error = Some(e);
                    }
                }
                // The process itself is dead; say why its group is not.
                Some(Err(e)) => r.error = Some(e),
                None => {}
            }
            r
        } else {
            // Refused, failed, gone or a stand-in: the process was not held.
            crate::contain::execute_now(&d, pid, start)
        };
        rec.bundle_id = line["evidence"]["bundle_id"].as_str().map(String::from);
        self.record(&rec);
        line["containment"] = serde_json::to_value(&rec).unwrap_or_default();
        line
    }

    fn record(&self, rec: &crate::contain::Record) {
        if let Some(log) = &self.actions {
            log.record(rec);
        }
    }

    /// One job: budget checks, then the capture on its own thread. Returns
    /// the evidence output line.
    fn handle(&mut self, Queued { job, hold }: Queued) -> serde_json::Value {
        let m = self.metrics.clone();
        let led = self.ctx.ledger.clone();
        self.stuck.retain(|h| !h.is_finished());
        m.captures_stuck.set(self.stuck.len() as i64);
        let refuse = |why: String| {
            warn!(pid = job.pid, "{why}");
            if job.frozen {
                led.release(job.pid, None);
            }
            serde_json::json!({"detection": job.detection, "error": why})
        };
        let Some(room) = disk_room(&self.capture_dir, self.max_disk, job.severity, &m) else {
            refused(&m, Refusal::Disk);
            return refuse(format!(
                "capture refused: the capture directory holds its budget of {} bytes",
                self.max_disk
            ));
        };
        // Critical detections are captured even then: each may add a stuck
        // thread, bounded by the critical budget.
        if self.stuck.len() >= MAX_STUCK_CAPTURES && job.severity < Severity::Critical {
            m.captures_dropped.inc();
            return refuse(format!(
                "capture skipped: {} earlier captures are stuck past their deadline",
                self.stuck.len()
            ));
        }
        let (pid, frozen, severity) = (job.pid, job.frozen, job.severity);
        let detection = job.detection.clone();
        let started_boot = crate::model::boot_ns_now();
        // A process frozen while queued has been stopped since its hold
        // began: the capture gets what is left of that deadline.
        let mut until = Instant::now() + self.deadline;
        if let Some(h) = &hold {
            until = until.min(h.deadline());
        }
        // The work files and the sealed archive coexist: half the room each.
        let limits = CaptureLimits {
            core_bytes: (room / 2).min(self.ctx.capturer.config().core.max_total_bytes),
            exe_bytes: (room / 2).min(self.ctx.capturer.config().max_exe_bytes),
        };
        let (done_tx, done_rx) = std::sync::mpsc::channel::<JobResult>();
        let c = self.ctx.clone();
        let spawned = std::thread::Builder::new()
            .name("vigil-capture-job".into())
            .spawn(move || {
                // The queue's hold lasts until the capture claims the
                // process itself.
                let _hold = hold;
                let _ = done_tx.send(capture_job(&c, &job, until, limits));
            });
        // The watchdog resumes the process at the deadline; this waits a
        // little longer for the thread to say how it ended.
        let wait = until.saturating_duration_since(Instant::now()) + DEADLINE_GRACE;
        let waited = match &spawned {
            Ok(_) => done_rx.recv_timeout(wait),
            Err(_) => Err(std::sync::mpsc::RecvTimeoutError::Disconnected),
        };
        match waited {
            Ok((result, stand_in, timed_out)) => {
                // The capture releases its own process; any other way, a
                // process the kernel froze is released here.
                if frozen {
                    if result.is_ok() && stand_in.is_none() {
                        led.forget(pid, started_boot);
                    } else {
                        led.release(pid, None);
                    }
                }
                let mut line = outcome_line(
                    &m,
                    self.forward.as_deref(),
                    pid,
                    severity,
                    detection,
                    result,
                    stand_in,
                );
                if timed_out {
                    line["timed_out"] = serde_json::Value::Bool(true);
                }
                line
            }
            Err(e) => {
                m.capture_errors.inc();
                if frozen {
                    led.release(pid, None);
                }
                let (why, timed_out) = match (e, spawned) {
                    (std::sync::mpsc::RecvTimeoutError::Timeout, Ok(h)) => {
                        self.stuck.push(h);
                        m.captures_stuck.set(self.stuck.len() as i64);
                        (
                            format!(
                                "capture timed out after {} ms; the process was resumed",
                                self.deadline.as_millis()
                            ),
                            true,
                        )
                    }
                    (_, Err(e)) => (format!("capture thread could not start: {e}"), false),
                    (_, Ok(_)) => (
                        "capture thread panicked; the process was resumed".into(),
                        false,
                    ),
                };
                warn!(pid, "{why}");
                serde_json::json!({"detection": detection, "error": why, "timed_out": timed_out})
            }
        }
    }

    fn write(&mut self, line: &serde_json::Value) {
        let Some(w) = &mut self.out else { return };
        let r = serde_json::to_writer(&mut *w, line)
            .map_err(std::io::Error::other)
            .and_then(|()| w.write_all(b"\n"))
            .and_then(|()| w.flush());
        if let Err(e) = r {
            self.metrics.output_errors.inc();
            warn!(error = %e, "writing evidence output failed");
        }
    }
}

/// Byte caps of one capture (from the disk budget's room).
#[derive(Clone, Copy, Debug)]
struct CaptureLimits {
    core_bytes: u64,
    exe_bytes: u64,
}

impl Responder {
    /// Starts the worker. Processes a previous agent left stopped are resumed
    /// here (see `capture::freeze::resume_leftovers`).
    pub fn start(
        opts: ResponseOptions,
        ledger: FreezeLedger,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let mut cfg = CaptureConfig::under(&opts.dir, &opts.agent_id);
        cfg.core.max_total_bytes = opts.max_core_bytes;
        cfg.freeze.peer_pin_dir = opts.peer_pin_dir.clone();
        let (capturer, resumed) = Capturer::new(cfg)
            .map_err(|e| anyhow::anyhow!("capture directory {}: {e}", opts.dir.display()))?;
        if !resumed.is_empty() {
            warn!(pids = ?resumed, "resumed processes a previous agent left stopped");
        }
        let queue = Arc::new(JobQueue::default());
        let out = match &opts.evidence_json {
            Some(p) => Some(std::io::BufWriter::new(
                vigil_bundle::private::open_append(p)
                    .map_err(|e| anyhow::anyhow!("opening {}: {e}", p.display()))?,
            )),
            None => None,
        };
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let worker = Worker {
            ctx: JobContext {
                capturer,
                ledger: ledger.clone(),
                contain: opts.contain,
                fallback: opts.ancestor_fallback,
                recent: Arc::new(std::sync::Mutex::new(LruCache::new(
                    NonZeroUsize::new(256).expect("non-zero"),
                ))),
            },
            metrics: metrics.clone(),
            forward: opts.forward.clone(),
            deadline: opts.deadline,
            capture_dir: opts.dir.clone(),
            max_disk: opts.max_disk_bytes,
            stuck: Vec::new(),
            out,
            actions: opts.actions.clone(),
        };
        let (rx, stop) = (queue.clone(), stopping.clone());
        let deadline = opts.deadline;
        let worker = std::thread::Builder::new()
            .name("vigil-capture".into())
            .spawn(move || worker.run(&rx, &stop))?;
        Ok(Self {
            queue,
            budget: CaptureBudget::new(opts.budget.clone()),
            deadline,
            min_severity: opts.min_severity,
            capture_rules: opts.capture_rules.iter().cloned().collect(),
            metrics,
            ledger,
            captured: LruCache::new(NonZeroUsize::new(4096).expect("non-zero")),
            worker: Some(worker),
            stopping,
        })
    }

    /// At shutdown: queued jobs are not captured (their frozen processes are
    /// resumed), the capture in progress finishes (and releases its process),
    /// bounded by `timeout`. Without this, exiting would kill the worker
    /// thread with a process still stopped.
    pub fn shutdown(&mut self, timeout: std::time::Duration) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.queue.close();
        let Some(w) = self.worker.take() else { return };
        let deadline = std::time::Instant::now() + timeout;
        while !w.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if w.is_finished() {
            let _ = w.join();
        } else {
            warn!("a capture still runs at shutdown; its process is listed in the capture state and resumed at the next start");
        }
    }

    /// Which of `dets` asks for a capture of its process (severity at or
    /// above the minimum, or a capture rule; the most severe of those), if
    /// any, if the process was not captured yet and if the capture budget
    /// allows it (refusals are counted by reason).
    pub fn wants(
        &mut self,
        dets: &[Detection],
        pid: u32,
        start_boot_ns: u64,
        contain: Option<&crate::contain::Decision>,
    ) -> Option<usize> {
        if self.captured.contains(&(pid, start_boot_ns)) {
            return None;
        }
        // The most severe of the detections that qualify asks (the first
        // of equals): the bundle is linked to it.
        let i = dets
            .iter()
            .enumerate()
            .filter(|(_, d)| {
                d.severity >= self.min_severity
                    || self.capture_rules.contains(&d.rule)
                    || contain.is_some_and(|c| c.rule == d.rule)
            })
            .max_by_key(|(i, d)| (d.severity, std::cmp::Reverse(*i)))
            .map(|(i, _)| i)?;
        // The most severe detection of the event decides which budget pays.
        let critical = dets.iter().any(|d| d.severity >= Severity::Critical);
        let d = &dets[i];
        match self.budget.admit(
            &d.process.workload.key(),
            d.process.uid,
            critical,
            Instant::now(),
        ) {
            Ok(()) => Some(i),
            Err(r) => {
                refused(&self.metrics, r);
                tracing::debug!(pid, reason = r.as_str(), "capture refused by its budget");
                None
            }
        }
    }

    /// Queues a capture; never blocks. A dropped job of a frozen process
    /// resumes it. False when the job was dropped (queue full, closed).
    pub fn submit(&mut self, job: CaptureJob) -> bool {
        self.captured.put((job.pid, job.start_boot_ns), ());
        let (pid, frozen) = (job.pid, job.frozen);
        // A frozen process waiting in the queue is owned by its job: the
        // watchdog leaves it stopped until the capture deadline counted from
        // now (the capture's own claim replaces this one when it starts).
        let hold = frozen.then(|| {
            let start =
                (job.start_boot_ns > 0).then(|| crate::frozen::boot_ns_to_ticks(job.start_boot_ns));
            self.ledger
                .claim(pid, start, Instant::now() + self.deadline)
        });
        if !self.queue.push(Queued { job, hold }) {
            self.metrics.captures_dropped.inc();
            warn!(pid, "capture queue full: capture dropped");
            if frozen {
                self.ledger.release(pid, None);
            }
            return false;
        }
        true
    }
}

/// A job in the queue, with the hold on its frozen process.
struct Queued {
    job: CaptureJob,
    hold: Option<crate::frozen::ClaimGuard>,
}

/// Capture jobs waiting for the worker: bounded, with room kept for high
/// and critical detections (a flood of lesser ones fills only the rest),
/// which also go first.
#[derive(Default)]
struct JobQueue {
    state: std::sync::Mutex<QueueState>,
    ready: std::sync::Condvar,
}

#[derive(Default)]
struct QueueState {
    urgent: std::collections::VecDeque<Queued>,
    normal: std::collections::VecDeque<Queued>,
    closed: bool,
}

/// Jobs the queue holds.
const QUEUE_SLOTS: usize = 16;
/// Of those, kept for high and critical detections.
const QUEUE_RESERVED: usize = 4;

impl JobQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `job`; false (the job dropped) when there is no room for it.
    fn push(&self, job: Queued) -> bool {
        let mut st = self.lock();
        let held = st.urgent.len() + st.normal.len();
        let urgent = job.job.severity >= Severity::High;
        let room = if urgent {
            QUEUE_SLOTS
        } else {
            QUEUE_SLOTS - QUEUE_RESERVED
        };
        if st.closed || held >= room {
            return false;
        }
        if urgent {
            st.urgent.push_back(job);
        } else {
            st.normal.push_back(job);
        }
        self.ready.notify_one();
        true
    }

    /// The next job (urgent first); `None` once closed and empty.
    fn pop(&self) -> Option<Queued> {
        let mut st = self.lock();
        loop {
            if let Some(j) = st.urgent.pop_front().or_else(|| st.normal.pop_front()) {
                return Some(j);
            }
            if st.closed {
                return None;
            }
            st = self.ready.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }
}

fn refused(m: &Metrics, r: Refusal) {
    m.captures_refused
        .get_or_create(&ReasonLabel {
            reason: r.as_str().into(),
        })
        .inc();
}

/// Bytes a capture of `severity` may still write under `dir` (`None`: the
/// directory holds its budget already).
fn disk_room(dir: &std::path::Path, max: u64, severity: Severity, m: &Metrics) -> Option<u64> {
    let used = disk_usage(dir);
    m.capture_disk_bytes.set(used as i64);
    let allowed = if severity >= Severity::High {
        max
    } else {
        max / 5 * 4
    };
    allowed.checked_sub(used).filter(|&room| room > 0)
}

/// How long past a capture's deadline the worker waits for its thread
/// before it reports the capture as timed out and moves on.
const DEADLINE_GRACE: Duration = Duration::from_millis(500);

/// Counts and reports a capture that came back (the evidence output line).
#[allow(clippy::too_many_arguments)]
fn outcome_line(
    m: &Metrics,
    forward: Option<&dyn crate::outputs::Forward>,
    pid: u32,
    severity: Severity,
    detection: serde_json::Value,
    result: Result<CaptureOutcome, CaptureError>,
    stand_in: Option<i32>,
) -> serde_json::Value {
    match result {
        Ok(outcome) => {
            m.captures.inc();
            if !outcome.killed {
                m.resumed.inc();
            }
            info!(
                pid,
                captured_pid = outcome.pid,
                bundle = %outcome.bundle_id,
                archive = %outcome.archive.display(),
                stopped_ms = outcome.timings.stopped_us / 1000,
                total_ms = outcome.timings.total_us / 1000,
                "evidence captured"
            );
            if let Some(s) = forward {
                s.bundle(
                    &outcome.archive,
                    &outcome.bundle_id,
                    severity >= Severity::High,
                );
            }
            serde_json::json!({
                "detection": detection,
                "evidence": outcome,
                "stand_in": stand_in.is_some(),
            })
        }
        Err(e) => {
            m.capture_errors.inc();
            warn!(pid, error = %e, "evidence capture failed");
            serde_json::json!({
                "detection": detection,
                "error": e.to_string(),
            })
        }
    }
}

/// An ancestor captured in place of a detected process is not captured
/// again for another process of the same branch (under the same child of
/// that ancestor: one script, one request) for this long: a burst of
/// short-lived processes yields one snapshot of their parent per branch.
pub const FALLBACK_QUIET: Duration = Duration::from_secs(30);

/// Captures the job's process; when it is gone (exited, pid recycled) and
/// `fallback` is on, its nearest living ancestor instead (never pid 1 or 2,
/// never the agent). Returns the outcome and, for a stand-in, its pid.
fn capture_job(
    ctx: &JobContext,
    job: &CaptureJob,
    deadline: Instant,
    limits: CaptureLimits,
) -> JobResult {
    let (capturer, fallback) = (&ctx.capturer, ctx.fallback);
    // Kill instead of resume: everything (capture_contain), or this job's
    // containment (not a dry run). Stand-ins are never killed.
    let contain = job.contain.as_ref().map_or(ctx.contain, |d| !d.dry_run);
    let timed_out = std::cell::Cell::new(false);
    // Each process this job stops is claimed until the deadline: the
    // watchdog resumes it then, whatever the capture is doing.
    let capture = |pid: i32, req: &CaptureRequest| {
        let claim = ctx.ledger.claim(pid as u32, req.start_time, deadline);
        let mut r = capturer.capture_process(pid, req);
        if claim.timed_out() {
            timed_out.set(true);
            if let Ok(o) = &mut r {
                o.warnings.push(
                    "the capture passed its deadline: the process was resumed while it was read"
                        .into(),
                );
            }
        }
        r
    };
    let req = CaptureRequest {
        start_time: (job.start_boot_ns > 0)
            .then(|| crate::frozen::boot_ns_to_ticks(job.start_boot_ns)),
        detection: job.detection.clone(),
        ancestors: job.ancestors.clone(),
        timeline: job.timeline.clone(),
        contain,
        core: Some(crate::capture::core::CoreOptions {
            max_total_bytes: limits.core_bytes,
            ..capturer.config().core.clone()
        }),
        max_exe_bytes: Some(limits.exe_bytes),
        stand_in_for: None,
    };
    let first = capture(job.pid as i32, &req);
    let gone = matches!(
        first,
        Err(CaptureError::Freeze(
            FreezeError::Gone { .. } | FreezeError::Recycled { .. }
        ))
    );
    if !gone || !fallback {
        return (first, None, timed_out.get());
    }
    let me = std::process::id() as i32;
    let Err(first) = first else {
        unreachable!("matched an error above")
    };
    let why = first.to_string();
    let mut last: Option<(CaptureError, i32)> = None;
    // Ancestors may be gone too (the capture queue can lag behind a
    // script that already ended): walk up, a few at most.
    let candidates = job
        .ancestors
        .iter()
        .enumerate()
        .filter(|&(_, &p)| p > 2 && p != me)
        .take(MAX_STAND_IN_TRIES);
    for (at, &anc) in candidates {
        // The branch: the ancestor's child on the way down to the process.
        let branch = if at == 0 {
            job.pid as i32
        } else {
            job.ancestors[at - 1]
        };
        // Once per branch. (Distinct branches are not limited here: a
        // burst of direct children is bounded by the capture queue, whose
        // overflow is dropped and counted.)
        let mut recent = ctx.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent
            .get(&(anc, branch))
            .is_some_and(|t| t.elapsed() < FALLBACK_QUIET)
        {
            // Captured moments ago for a process of the same branch (the
            // same script, the same request): that bundle stands in.
            break;
        }
        let start_ns = job.ancestor_starts.get(at).copied().unwrap_or(0);
        let stand_in = CaptureRequest {
            start_time: (start_ns > 0).then(|| crate::frozen::boot_ns_to_ticks(start_ns)),
            ancestors: job.ancestors[at + 1..].to_vec(),
            // Never kill a parent for its child's detection.
            contain: false,
            stand_in_for: Some(serde_json::json!({
                "pid": job.pid,
                "reason": why,
                "detection_process": job.detection.get("process"),
            })),
            ..req.clone()
        };
        info!(
            pid = job.pid,
            ancestor = anc,
            "the detected process is gone: capturing its nearest living ancestor"
        );
        drop(recent);
        let started = Instant::now();
        match capture(anc, &stand_in) {
            Err(
                e @ CaptureError::Freeze(FreezeError::Gone { .. } | FreezeError::Recycled { .. }),
            ) => last = Some((e, anc)),
            r => {
                // Limits count from the start: a long capture must not
                // stretch the quiet time after it.
                ctx.recent
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .put((anc, branch), started);
                return (r, Some(anc), timed_out.get());
            }
        }
    }
    match last {
        Some((e, anc)) => (Err(e), Some(anc), timed_out.get()),
        None => (Err(first), None, timed_out.get()),
    }
}

/// Ancestors tried in turn when they are gone too.
const MAX_STAND_IN_TRIES: usize = 4;

/// The job's process start time in clock ticks (what /proc shows), if known.
fn start_ticks(job: &CaptureJob) -> Option<u64> {
    (job.start_boot_ns > 0).then(|| crate::frozen::boot_ns_to_ticks(job.start_boot_ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_room_keeps_a_fifth_for_high_and_critical() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), vec![0u8; 800]).unwrap();
        let m = Metrics::default();
        // 800 of 1000 used: nothing left below high, 200 for high+.
        assert_eq!(disk_room(d.path(), 1000, Severity::Medium, &m), None);
        assert_eq!(disk_room(d.path(), 1000, Severity::High, &m), Some(200));
        assert_eq!(disk_room(d.path(), 1000, Severity::Critical, &m), Some(200));
        assert_eq!(m.capture_disk_bytes.get(), 800);
        std::fs::write(d.path().join("b"), vec![0u8; 200]).unwrap();
        assert_eq!(disk_room(d.path(), 1000, Severity::Critical, &m), None);
        assert_eq!(disk_room(d.path(), 10_000, Severity::Low, &m), Some(7000));
    }

    #[test]
    fn the_queue_keeps_room_for_high_and_serves_them_first() {
        let q = JobQueue::default();
        let job = |pid: u32, severity: Severity| Queued {
            job: CaptureJob {
                pid,
                start_boot_ns: 0,
                detection: serde_json::Value::Null,
                ancestors: vec![],
                ancestor_starts: vec![],
                timeline: vec![],
                frozen: false,
                severity,
                contain: None,
            },
            hold: None,
        };
        for i in 0..(QUEUE_SLOTS - QUEUE_RESERVED) as u32 {
            assert!(q.push(job(i, Severity::Medium)));
        }
        assert!(!q.push(job(99, Severity::Medium)));
        for i in 0..QUEUE_RESERVED as u32 {
            assert!(q.push(job(100 + i, Severity::Critical)));
        }
        assert!(!q.push(job(200, Severity::Critical)));
        assert_eq!(q.pop().unwrap().job.pid, 100, "high first");
        q.close();
        let rest: Vec<u32> = std::iter::from_fn(|| q.pop().map(|j| j.job.pid)).collect();
        assert_eq!(rest.len(), QUEUE_SLOTS - 1, "closing serves what is queued");
    }

    #[test]
    fn capture_gone_process_falls_back_to_its_nearest_living_ancestor() {
        let root = tempfile::tempdir().unwrap();
        let (cap, _) = Capturer::new(CaptureConfig::under(root.path(), "t")).unwrap();
        let mut parent = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let gone_pid = gone.id();
        gone.wait().unwrap();
        let mut gone_parent = std::process::Command::new("true").spawn().unwrap();
        let gone_parent_pid = gone_parent.id() as i32;
        gone_parent.wait().unwrap();
        let job = CaptureJob {
            pid: gone_pid,
            start_boot_ns: 0,
            detection: serde_json::json!({"rule": "r", "process": {"pid": gone_pid}}),
            ancestor_starts: vec![],
            // pid 1 and the agent itself are never stand-ins; an ancestor
            // gone too is passed over.
            ancestors: vec![
                gone_parent_pid,
                1,
                std::process::id() as i32,
                parent.id() as i32,
            ],
            timeline: vec![],
            frozen: false,
            severity: Severity::High,
            contain: None,
        };
        let metrics = Arc::new(Metrics::default());
        let ledger = FreezeLedger::new(
            None,
            None,
            crate::frozen::LedgerOptions {
                release_after: Duration::from_millis(500),
            },
            metrics,
        );
        let mut ctx = JobContext {
            capturer: cap,
            ledger,
            contain: false,
            fallback: false,
            recent: Arc::new(std::sync::Mutex::new(LruCache::new(
                NonZeroUsize::new(4).unwrap(),
            ))),
        };
        let until = Instant::now() + Duration::from_secs(60);
        const LIMITS: CaptureLimits = CaptureLimits {
            core_bytes: 64 << 20,
            exe_bytes: 64 << 20,
        };

        let (r, _, _) = capture_job(&ctx, &job, until, LIMITS);
        assert!(r.is_err(), "no fallback when it is off");

        ctx.fallback = true;
        let (r, stand_in, _) = capture_job(&ctx, &job, until, LIMITS);
        assert_eq!(stand_in, Some(parent.id() as i32));
        let out = r.unwrap();
        assert_eq!(out.pid, parent.id() as i32);
        let m = vigil_bundle::verify_bundle(&out.archive).unwrap().manifest;
        assert_eq!(m.subject["pid"], parent.id());
        assert_eq!(m.subject["stands_in_for"]["pid"], gone_pid);
        assert!(m.subject["stands_in_for"]["reason"]
            .as_str()
            .unwrap()
            .contains("gone"));
        // Resumed, not killed.
        assert!(parent.try_wait().unwrap().is_none());

        // Within the quiet period the same ancestor is not captured again.
        let (r, _, _) = capture_job(&ctx, &job, until, LIMITS);
        assert!(r.is_err());
        parent.kill().unwrap();
        parent.wait().unwrap();
    }
}
