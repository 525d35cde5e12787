//! Evidence capture on detection (issue 4): freeze the process, write its
//! core, copy its executable, collect its context, seal it all in a
//! hash-chained bundle, then resume or kill it.
//!
//! ```text
//! Capturer::capture_process(pid, &CaptureRequest)
//!   freeze   SIGSTOP the thread group, wait until every thread is stopped
//!   core     ELF core (registers, memory, auxv, file mappings) -> `core`
//!   context  cmdline, environ, fds + sockets, maps, ancestors, timeline
//!   exe      /proc/PID/exe opened; copied now if deleted or a memfd
//!   release  SIGCONT, or SIGKILL when the request says contain
//!   exe      copied now if a file on disk (from the fd opened above)
//!   seal     context.json, manifest.json, <id>.tar.zst chained to the
//!            previous bundle
//! ```
//!
//! Everything here blocks (ptrace, process_vm_readv, file I/O, zstd) and a
//! 200 MB process takes about a second: call it from a blocking thread
//! (`tokio::task::spawn_blocking`), never from the event loop. The process
//! is released before sealing, so it is stopped only for freeze + core +
//! context (+ the copy of a fileless executable).
//!
//! Modules: [`freeze`] (stop, resume, leftovers after an agent crash),
//! [`core`] (the ELF core), [`context`] (process context), [`bundle`]
//! (manifest, archive, verification, chain).

/// The bundle format lives in its own crate, shared with the collector.
pub use vigil_bundle as bundle;
pub mod context;
pub mod core;
pub mod freeze;
pub(crate) mod procutil;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod testutil;

use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use self::bundle::{
    Acquisition, AgentIdentity, BundleBuilder, BundleConfig, BundleError, Manifest, Times,
};
use self::context::ContextOptions;
use self::core::{CoreOptions, RegionAction};
use self::freeze::{FreezeError, FreezeInfo, FreezeOptions, Freezer, FrozenProcess};

/// How the agent captures (from its configuration).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaptureConfig {
    /// Bundle directories being filled (one per capture; removed after
    /// sealing unless `bundle.keep_dir`).
    pub work_dir: PathBuf,
    /// Sealed archives, chain state, agent id, compression.
    pub bundle: BundleConfig,
    /// Freeze timeout.
    #[serde(skip)]
    pub freeze: FreezeOptions,
    /// Core size caps.
    pub core: CoreOptions,
    /// Context bounds.
    pub context: ContextOptions,
    /// Bytes of the executable copied (it is hashed whole).
    pub max_exe_bytes: u64,
}

impl CaptureConfig {
    /// Defaults under one directory: `ROOT/work`, `ROOT/bundles`, `ROOT/state`.
    pub fn under(root: &std::path::Path, agent_id: &str) -> CaptureConfig {
        CaptureConfig {
            work_dir: root.join("work"),
            bundle: BundleConfig {
                out_dir: root.join("bundles"),
                state_dir: root.join("state"),
                agent_id: agent_id.to_string(),
                zstd_level: 1,
                keep_dir: false,
            },
            freeze: FreezeOptions::default(),
            core: CoreOptions::default(),
            context: ContextOptions::default(),
            max_exe_bytes: 256 << 20,
        }
    }
}

/// One capture, as the detection stage asks for it.
#[derive(Debug, Clone, Default)]
pub struct CaptureRequest {
    /// The process's start time (clock ticks since boot, /proc/PID/stat
    /// field 22; `tree` start_boot_ns / (1e9 / USER_HZ)), to refuse a
    /// recycled pid. `None`: trust the pid.
    pub start_time: Option<u64>,
    /// The detection (goes into the manifest as is).
    pub detection: serde_json::Value,
    /// Ancestor pids, parent first (their context is collected too).
    pub ancestors: Vec<i32>,
    /// Recent events of the process and its parent, oldest first.
    pub timeline: Vec<serde_json::Value>,
    /// Kill the process after the capture instead of resuming it.
    pub contain: bool,
    /// Core caps for this capture (else the config's).
    pub core: Option<CoreOptions>,
    /// Bytes of the executable copied for this capture (else the config's).
    pub max_exe_bytes: Option<u64>,
    /// Set when this process is captured in place of the detected one,
    /// which exited before it could be stopped: who that was (goes into
    /// the manifest's `subject.stands_in_for`).
    pub stand_in_for: Option<serde_json::Value>,
}

/// Time spent in each step, in µs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StepTimings {
    /// SIGSTOP until every thread stopped.
    pub freeze_us: u64,
    /// Core file (registers + memory).
    pub core_us: u64,
    /// Executable copy and hash.
    pub exe_us: u64,
    /// Context of the process and its ancestors.
    pub context_us: u64,
    /// SIGCONT/SIGKILL.
    pub release_us: u64,
    /// Manifest, archive (zstd), chain state.
    pub seal_us: u64,
    /// How long the process was stopped by us (freeze to release).
    pub stopped_us: u64,
    /// Everything.
    pub total_us: u64,
}

/// The core file in brief (the full report is the `core-report.json`
/// artifact).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CoreSummary {
    /// Core file bytes.
    pub size: u64,
    /// Memory bytes in it.
    pub dumped_bytes: u64,
    /// Mapping bytes left out (caps, unreadable, vvar...).
    pub left_out_bytes: u64,
    /// Mappings truncated or skipped.
    pub regions_left_out: usize,
    /// Unreadable ranges written as zeros.
    pub unreadable_ranges: usize,
    /// Threads.
    pub threads: usize,
    /// Threads with all registers (ptrace).
    pub threads_with_registers: usize,
}

/// What a capture produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaptureOutcome {
    /// The bundle id (sha256 of the archive).
    pub bundle_id: String,
    /// The sealed archive.
    pub archive: PathBuf,
    /// Archive bytes.
    pub archive_size: u64,
    /// Uncompressed bytes (artifacts + manifest).
    pub content_size: u64,
    /// Position in the agent's chain.
    pub seq: u64,
    /// The process.
    pub pid: i32,
    /// Killed (contain) rather than resumed.
    pub killed: bool,
    /// What the freeze did.
    pub freeze: FreezeInfo,
    /// The core, in brief (`None` when it failed: see `warnings`).
    pub core: Option<CoreSummary>,
    /// Step timings.
    pub timings: StepTimings,
    /// Parts that failed (the rest was captured).
    pub warnings: Vec<String>,
}

/// Capture failures. A step that fails after the freeze (core, exe,
/// context) is not one: the bundle is sealed without it and the outcome and
/// manifest say what is missing.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Could not stop the process (gone, recycled pid, signal refused).
    #[error("freeze: {0}")]
    Freeze(#[from] FreezeError),
    /// Resume or kill failed (the bundle was not sealed).
    #[error("release: {0}")]
    Release(FreezeError),
    /// Creating or sealing the bundle.
    #[error("bundle: {0}")]
    Bundle(#[from] BundleError),
}

/// `VIGIL_FAULT_CAPTURE_STALL_MS`: every capture blocks this long right
/// after its freeze, as a read of a stalled FUSE/NFS executable would. For
/// tests of the capture deadline; read once.
fn fault_capture_stall() -> Option<std::time::Duration> {
    static STALL: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    *STALL.get_or_init(|| {
        std::env::var("VIGIL_FAULT_CAPTURE_STALL_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&ms| ms > 0)
            .map(std::time::Duration::from_millis)
    })
}

/// Captures processes: one per agent, shared (cheap to clone; captures can
/// run in parallel, sealing is serialized by the chain lock).
#[derive(Debug, Clone)]
pub struct Capturer {
    config: CaptureConfig,
    freezer: Freezer,
    identity: AgentIdentity,
}

impl Capturer {
    /// Creates the directories, resumes processes a previous agent left
    /// stopped (see [`freeze`]), and returns the capturer with their pids.
    pub fn new(config: CaptureConfig) -> Result<(Capturer, Vec<i32>), CaptureError> {
        // Private (0700, refused when a link or writable by others): the
        // evidence holds the process's secrets.
        for d in [
            &config.work_dir,
            &config.bundle.out_dir,
            &config.bundle.state_dir,
        ] {
            bundle::private::secure_dir(d).map_err(|source| BundleError::Io {
                path: d.clone(),
                source,
            })?;
        }
        let resumed = freeze::resume_leftovers(&config.bundle.state_dir)?;
        let freezer = Freezer::new(&config.bundle.state_dir, config.freeze.clone())?;
        let identity = AgentIdentity::current(&config.bundle.agent_id);
        Ok((
            Capturer {
                config,
                freezer,
                identity,
            },
            resumed,
        ))
    }

    /// The freezer (to stop a process at once from the event loop, then
    /// hand it to [`Capturer::capture_frozen`] on a blocking thread).
    pub fn freezer(&self) -> &Freezer {
        &self.freezer
    }

    /// The configuration.
    pub fn config(&self) -> &CaptureConfig {
        &self.config
    }

    /// Freeze, capture, release, seal. Blocking.
    pub fn capture_process(
        &self,
        pid: i32,
        req: &CaptureRequest,
    ) -> Result<CaptureOutcome, CaptureError> {
        let t0 = Instant::now();
        let times = start_times();
        let frozen = match req.start_time {
            Some(st) => self.freezer.freeze_checked(pid, st)?,
            None => self.freezer.freeze(pid)?,
        };
        if let Some(stall) = fault_capture_stall() {
            // Fault injection (tests only): a read of the stopped process
            // that blocks, as on a stalled FUSE/NFS executable.
            tracing::warn!(
                pid,
                ms = stall.as_millis() as u64,
                "fault injection: capture stalls"
            );
            std::thread::sleep(stall);
        }
        self.capture_inner(frozen, req, t0, times)
    }

    /// Capture a process already frozen with [`Capturer::freezer`]. Blocking.
    pub fn capture_frozen(
        &self,
        frozen: FrozenProcess,
        req: &CaptureRequest,
    ) -> Result<CaptureOutcome, CaptureError> {
        self.capture_inner(frozen, req, Instant::now(), start_times())
    }

    fn copy_exe(
        &self,
        src: std::io::Result<std::fs::File>,
        b: &BundleBuilder,
        req: &CaptureRequest,
    ) -> std::io::Result<context::ExeCopy> {
        let max = req.max_exe_bytes.unwrap_or(self.config.max_exe_bytes);
        context::copy_exe_from(src?, &b.path_of("exe"), max)
    }

    fn capture_inner(
        &self,
        frozen: FrozenProcess,
        req: &CaptureRequest,
        t0: Instant,
        mut times: Times,
    ) -> Result<CaptureOutcome, CaptureError> {
        let pid = frozen.pid();
        let span = tracing::info_span!("capture", pid);
        let _e = span.enter();
        let mut timings = StepTimings {
            freeze_us: frozen.info.wait_us,
            ..Default::default()
        };
        let mut warnings = Vec::new();
        let dir = self.config.work_dir.join(format!(
            "{}-{pid}-{}",
            frozen.info.start_time,
            procutil::clock_ns(libc::CLOCK_MONOTONIC)
        ));
        let mut b = BundleBuilder::create(&dir)?;

        // Core.
        let t = Instant::now();
        let core_opts = req.core.as_ref().unwrap_or(&self.config.core);
        let core = match self::core::write_core(pid, &b.path_of("core"), core_opts) {
            Ok(r) => {
                b.add_hashed("core", "core", &r.sha256, r.size)?;
                b.add_json("core-report.json", "core_report", &r)?;
                Some(CoreSummary {
                    size: r.size,
                    dumped_bytes: r.dumped_bytes,
                    left_out_bytes: r.left_out_bytes,
                    regions_left_out: r
                        .regions
                        .iter()
                        .filter(|x| x.action != RegionAction::Dumped)
                        .count(),
                    unreadable_ranges: r.unreadable.len(),
                    threads: r.threads.len(),
                    threads_with_registers: r
                        .threads
                        .iter()
                        .filter(|t| t.registers == "full")
                        .count(),
                })
            }
            Err(self::core::CoreError::Gone { .. }) => {
                // It exited between the stop and the read (a writer like
                // `tee -a` that is done at once): nothing of it is left to
                // seal. Reported as gone, so the caller can take its
                // nearest living ancestor instead of an empty bundle.
                drop(frozen);
                drop(b);
                let _ = std::fs::remove_dir_all(&dir);
                return Err(CaptureError::Freeze(FreezeError::Gone { pid }));
            }
            Err(e) => {
                warnings.push(format!("core: {e}"));
                let _ = std::fs::remove_file(b.path_of("core"));
                None
            }
        };
        timings.core_us = t.elapsed().as_micros() as u64;

        // Context (in memory; written once the executable's hash is known).
        // Only the subject's is taken while it is stopped; its ancestors
        // (whose executables get hashed, which can take a while for a big
        // runtime like node) after the release, to keep the stop short.
        let t = Instant::now();
        let mut ctx = context::collect(pid, &[], req.timeline.clone(), &self.config.context);
        let mut context_elapsed = t.elapsed();

        // Executable: opened now (the open file outlives the process). A
        // deleted file or a memfd is copied while the process is stopped (it
        // could rewrite a memfd); a file on disk after the release (the
        // kernel refuses writes to a running executable).
        let t = Instant::now();
        let exe_src = std::fs::File::open(format!("/proc/{pid}/exe"));
        let copy_now = ctx.subject.exe_deleted || ctx.subject.exe.is_none();
        let (mut exe_result, exe_src) = if copy_now {
            let r = self.copy_exe(exe_src, &b, req);
            timings.exe_us = t.elapsed().as_micros() as u64;
            (Some(r), None)
        } else {
            (None, Some((exe_src, t.elapsed())))
        };

        // Release before sealing: the process waits for nothing else.
        let t = Instant::now();
        let freeze_info = frozen.info.clone();
        let r = if req.contain {
            frozen.kill()
        } else {
            frozen.resume()
        };
        r.map_err(CaptureError::Release)?;
        timings.release_us = t.elapsed().as_micros() as u64;
        timings.stopped_us = t0.elapsed().as_micros() as u64;
        times.ended = bundle::now_rfc3339();
        times.monotonic_end_ns = procutil::clock_ns(libc::CLOCK_MONOTONIC);

        let t = Instant::now();
        ctx.ancestry = req
            .ancestors
            .iter()
            .map(|&a| {
                context::process_context(
                    a,
                    &self.config.context,
                    self.config.context.hash_ancestor_exes,
                )
            })
            .collect();
        context_elapsed += t.elapsed();
        timings.context_us = context_elapsed.as_micros() as u64;

        if let Some((src, opened)) = exe_src {
            let t = Instant::now();
            exe_result = Some(self.copy_exe(src, &b, req));
            timings.exe_us = (opened + t.elapsed()).as_micros() as u64;
        }
        let exe = match exe_result {
            Some(Ok(c)) => {
                b.add_hashed("exe", "exe", &c.copied_sha256, c.copied)?;
                if c.copied < c.size {
                    warnings.push(format!("exe: copied {} of {} bytes", c.copied, c.size));
                }
                ctx.subject.exe_sha256 = Some(c.sha256.clone());
                ctx.subject.exe_size = Some(c.size);
                Some(c)
            }
            Some(Err(e)) => {
                warnings.push(format!("exe: {e}"));
                let _ = std::fs::remove_file(b.path_of("exe"));
                None
            }
            None => None,
        };
        b.add_json("context.json", "context", &ctx)?;

        // Seal.
        let t = Instant::now();
        let manifest = Manifest {
            format: String::new(),
            seq: 0,
            prev_bundle_sha256: None,
            agent: self.identity.clone(),
            times,
            acquisition: Acquisition {
                method: "sigstop+ptrace+process_vm_readv".into(),
                tool: "vigil-agent".into(),
                tool_version: env!("CARGO_PKG_VERSION").into(),
                details: serde_json::json!({
                    "freeze": &freeze_info,
                    "core": &core,
                    "exe": &exe,
                    "released": if req.contain { "killed" } else { "resumed" },
                    "timings_us": &timings,
                    "warnings": &warnings,
                }),
            },
            subject: serde_json::json!({
                "pid": pid,
                "start_time": freeze_info.start_time,
                "comm": &ctx.subject.comm,
                "exe": &ctx.subject.exe,
                "exe_sha256": &ctx.subject.exe_sha256,
                "stands_in_for": &req.stand_in_for,
            }),
            detection: req.detection.clone(),
            artifacts: Vec::new(),
        };
        let sealed = b.seal(&self.config.bundle, manifest)?;
        timings.seal_us = t.elapsed().as_micros() as u64;
        timings.total_us = t0.elapsed().as_micros() as u64;
        tracing::info!(
            bundle = %sealed.id,
            size = sealed.archive_size,
            total_ms = timings.total_us / 1000,
            stopped_ms = timings.stopped_us / 1000,
            "capture sealed"
        );
        Ok(CaptureOutcome {
            bundle_id: sealed.id,
            archive: sealed.archive,
            archive_size: sealed.archive_size,
            content_size: sealed.content_size,
            seq: sealed.manifest.seq,
            pid,
            killed: req.contain,
            freeze: freeze_info,
            core,
            timings,
            warnings,
        })
    }
}

fn start_times() -> Times {
    Times {
        started: bundle::now_rfc3339(),
        monotonic_start_ns: procutil::clock_ns(libc::CLOCK_MONOTONIC),
        boottime_start_ns: procutil::clock_ns(libc::CLOCK_BOOTTIME),
        ..Default::default()
    }
}
