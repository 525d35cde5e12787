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
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lru::LruCache;
use tracing::{info, warn};

use crate::capture::freeze::FreezeError;
use crate::capture::{CaptureConfig, CaptureError, CaptureOutcome, CaptureRequest, Capturer};
use crate::detect::{Detection, Severity};
use crate::metrics::Metrics;

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
    pub ship: Option<crate::ship::Shipper>,
    /// When the detected process exited before it could be stopped,
    /// capture its nearest living ancestor instead (the process that
    /// started it: a web server, the dropper's shell), once per branch per
    /// [`FALLBACK_QUIET`].
    pub ancestor_fallback: bool,
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
}

/// The pipeline's handle on the capture worker.
pub struct Responder {
    tx: Option<SyncSender<CaptureJob>>,
    min_severity: Severity,
    capture_rules: std::collections::HashSet<String>,
    metrics: Arc<Metrics>,
    captured: LruCache<(u32, u64), ()>,
    worker: Option<std::thread::JoinHandle<()>>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

impl Responder {
    /// Starts the worker. Processes a previous agent left stopped are resumed
    /// here (see `capture::freeze::resume_leftovers`).
    pub fn start(opts: ResponseOptions, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let mut cfg = CaptureConfig::under(&opts.dir, &opts.agent_id);
        cfg.core.max_total_bytes = opts.max_core_bytes;
        let (capturer, resumed) = Capturer::new(cfg)
            .map_err(|e| anyhow::anyhow!("capture directory {}: {e}", opts.dir.display()))?;
        if !resumed.is_empty() {
            warn!(pids = ?resumed, "resumed processes a previous agent left stopped");
        }
        let (tx, rx) = sync_channel::<CaptureJob>(16);
        let m = metrics.clone();
        let contain = opts.contain;
        let fallback = opts.ancestor_fallback;
        let mut recent: LruCache<(i32, i32), Instant> =
            LruCache::new(NonZeroUsize::new(256).expect("non-zero"));
        let ship = opts.ship.clone();
        let mut out = match &opts.evidence_json {
            Some(p) => Some(std::io::BufWriter::new(
                vigil_bundle::private::open_append(p)
                    .map_err(|e| anyhow::anyhow!("opening {}: {e}", p.display()))?,
            )),
            None => None,
        };
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = stopping.clone();
        let worker = std::thread::Builder::new()
            .name("vigil-capture".into())
            .spawn(move || {
                for job in rx {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        // Shutting down: no new captures, but nothing stays
                        // stopped.
                        if job.frozen {
                            resume(job.pid, &m);
                        }
                        continue;
                    }
                    let (result, stand_in) =
                        capture_job(&capturer, &job, contain, fallback, &mut recent);
                    // The capture releases its own process; any other way,
                    // a process the kernel froze is released here.
                    let released = result.is_ok() && stand_in.is_none();
                    let line = match result {
                        Ok(outcome) => {
                            m.captures.inc();
                            if !outcome.killed {
                                m.resumed.inc();
                            }
                            info!(
                                pid = job.pid,
                                captured_pid = outcome.pid,
                                bundle = %outcome.bundle_id,
                                archive = %outcome.archive.display(),
                                stopped_ms = outcome.timings.stopped_us / 1000,
                                total_ms = outcome.timings.total_us / 1000,
                                "evidence captured"
                            );
                            if let Some(s) = &ship {
                                s.bundle(&outcome.archive, &outcome.bundle_id);
                            }
                            serde_json::json!({
                                "detection": job.detection,
                                "evidence": outcome,
                                "stand_in": stand_in.is_some(),
                            })
                        }
                        Err(e) => {
                            m.capture_errors.inc();
                            warn!(pid = job.pid, error = %e, "evidence capture failed");
                            serde_json::json!({
                                "detection": job.detection,
                                "error": e.to_string(),
                            })
                        }
                    };
                    if job.frozen && !released {
                        resume(job.pid, &m);
                    }
                    if let Some(w) = &mut out {
                        let r = serde_json::to_writer(&mut *w, &line)
                            .map_err(std::io::Error::other)
                            .and_then(|()| w.write_all(b"\n"))
                            .and_then(|()| w.flush());
                        if let Err(e) = r {
                            m.output_errors.inc();
                            warn!(error = %e, "writing evidence output failed");
                        }
                    }
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            min_severity: opts.min_severity,
            capture_rules: opts.capture_rules.iter().cloned().collect(),
            metrics,
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
        self.tx.take();
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
    /// above the minimum, or a capture rule), if any and if the process was
    /// not captured yet.
    pub fn wants(&mut self, dets: &[Detection], pid: u32, start_boot_ns: u64) -> Option<usize> {
        if self.captured.contains(&(pid, start_boot_ns)) {
            return None;
        }
        dets.iter()
            .position(|d| d.severity >= self.min_severity || self.capture_rules.contains(&d.rule))
    }

    /// Queues a capture; never blocks. A dropped job of a frozen process
    /// resumes it.
    pub fn submit(&mut self, job: CaptureJob) {
        self.captured.put((job.pid, job.start_boot_ns), ());
        let (pid, frozen) = (job.pid, job.frozen);
        let sent = match &self.tx {
            Some(tx) => tx.try_send(job),
            None => Err(TrySendError::Disconnected(job)),
        };
        match sent {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.metrics.captures_dropped.inc();
                warn!(pid, "capture queue full: capture dropped");
                if frozen {
                    resume(pid, &self.metrics);
                }
            }
        }
    }
}

/// SIGCONT, counted.
pub fn resume(pid: u32, metrics: &Metrics) {
    use nix::sys::signal::{kill, Signal};
    match kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGCONT) {
        Ok(()) => {
            metrics.resumed.inc();
        }
        Err(e) => {
            metrics.resume_errors.inc();
            warn!(pid, error = %e, "could not resume a frozen process");
        }
    }
}

fn ticks_per_second() -> u64 {
    procfs::ticks_per_second().max(1)
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
    capturer: &Capturer,
    job: &CaptureJob,
    contain: bool,
    fallback: bool,
    recent: &mut LruCache<(i32, i32), Instant>,
) -> (Result<CaptureOutcome, CaptureError>, Option<i32>) {
    let req = CaptureRequest {
        start_time: (job.start_boot_ns > 0)
            .then(|| job.start_boot_ns / (1_000_000_000 / ticks_per_second())),
        detection: job.detection.clone(),
        ancestors: job.ancestors.clone(),
        timeline: job.timeline.clone(),
        contain,
        core: None,
        stand_in_for: None,
    };
    let first = capturer.capture_process(job.pid as i32, &req);
    let gone = matches!(
        first,
        Err(CaptureError::Freeze(
            FreezeError::Gone { .. } | FreezeError::Recycled { .. }
        ))
    );
    if !gone || !fallback {
        return (first, None);
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
            start_time: (start_ns > 0).then(|| start_ns / (1_000_000_000 / ticks_per_second())),
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
        let started = Instant::now();
        match capturer.capture_process(anc, &stand_in) {
            Err(
                e @ CaptureError::Freeze(FreezeError::Gone { .. } | FreezeError::Recycled { .. }),
            ) => last = Some((e, anc)),
            r => {
                // Limits count from the start: a long capture must not
                // stretch the quiet time after it.
                recent.put((anc, branch), started);
                return (r, Some(anc));
            }
        }
    }
    match last {
        Some((e, anc)) => (Err(e), Some(anc)),
        None => (Err(first), None),
    }
}

/// Ancestors tried in turn when they are gone too.
const MAX_STAND_IN_TRIES: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;

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
        };
        let mut recent = LruCache::new(NonZeroUsize::new(4).unwrap());

        let (r, _) = capture_job(&cap, &job, false, false, &mut recent);
        assert!(r.is_err(), "no fallback when it is off");

        let (r, stand_in) = capture_job(&cap, &job, false, true, &mut recent);
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
        let (r, _) = capture_job(&cap, &job, false, true, &mut recent);
        assert!(r.is_err());
        parent.kill().unwrap();
        parent.wait().unwrap();
    }
}
