//! Prometheus metrics: what the agent saw, dropped and holds.
//!
//! Kernel counters are absolute totals read from the STATS map; they are
//! turned into counter increments here so the exposition stays monotonic.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use vigil_sensor_common as raw;

use crate::sensor::HookStatus;

/// Label: event kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// exec, fork, exit, connect, file_open, chmod, rename.
    pub kind: String,
}

/// Label: why something was refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The reason.
    pub reason: String,
}

/// Labels: a containment action and how it ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    /// kill, kill_group.
    pub action: String,
    /// done, dry_run, gone, refused, failed.
    pub result: String,
}

/// Label: hook name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HookLabel {
    /// e.g. "syscalls/openat".
    pub hook: String,
}

/// Labels: a sensor feature and the kind of hook serving it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabel {
    /// e.g. "file_write".
    pub feature: String,
    /// "lsm", "tracepoint", "cgroup", "freeze" or "off".
    pub path: String,
}

/// Label: detection rule.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabel {
    /// Rule id.
    pub rule: String,
    /// low, medium, high, critical.
    pub severity: String,
}

/// All agent metrics.
#[derive(Default)]
pub struct Metrics {
    /// Events decoded by the agent, by kind.
    pub events: Family<KindLabel, Counter>,
    /// `events`' counters indexed by kind, resolved on first use.
    event_counters: std::sync::OnceLock<Vec<Counter>>,
    /// Records the kernel put in the ring buffer, by kind.
    pub kernel_events: Family<KindLabel, Counter>,
    /// Records the kernel dropped because the ring buffer was full, by kind.
    pub kernel_dropped: Family<KindLabel, Counter>,
    /// Records the decoder refused.
    pub decode_errors: Counter,
    /// Processes in the tree.
    pub tree_size: Gauge,
    /// Exited processes reaped from the tree.
    pub tree_reaped: Counter,
    /// Processes not added because the tree was full of live ones.
    pub tree_rejected: Counter,
    /// Events about a process the tree did not know.
    pub tree_unknown_pid: Counter,
    /// Highest ring buffer fill seen by the kernel programs, bytes.
    pub ringbuf_max_fill: Gauge,
    /// Syscalls whose arguments the kernel holds until their exit.
    pub syscalls_in_flight: Gauge,
    /// File opens suppressed by de-duplication (in the kernel, and by the
    /// agent for io_uring opens).
    pub file_dedup: Counter,
    /// Connects suppressed by in-kernel de-duplication (same process and
    /// destination within `connect_dedup_secs`).
    pub connect_dedup: Counter,
    /// Exec-memory, ptrace-write and process_vm_writev records suppressed in
    /// the kernel (the process already reported that kind and target).
    pub once_dedup: Counter,
    /// Syscalls not tracked because the in-flight table was full.
    pub inflight_full: Counter,
    /// Kernel pointer reads that failed.
    pub kernel_read_errors: Counter,
    /// 1 if a hook is attached, 0 if unavailable.
    pub hook_attached: Family<HookLabel, Gauge>,
    /// 1 for the kind of hook that serves each feature (see
    /// `sensor::feature_path`).
    pub hook_path: Family<PathLabel, Gauge>,
    /// 1 when the deny_exec policy is enforced by the BPF LSM exec hook, 0
    /// when it is off or frozen instead (no BPF LSM here).
    pub exec_deny_active: Gauge,
    /// Failures writing event output.
    pub output_errors: Counter,
    /// Detections raised, by rule.
    pub detections: Family<RuleLabel, Counter>,
    /// Findings suppressed by the learned baseline.
    pub detections_suppressed: Counter,
    /// Entries in the learned baseline.
    pub baseline_entries: Gauge,
    /// Sigma rules loaded.
    pub sigma_rules: Gauge,
    /// Processes stopped at exec by the kernel's freeze policy.
    pub frozen: Counter,
    /// Execs refused by the BPF LSM hook under deny_exec.
    pub exec_denied: Counter,
    /// Frozen processes the agent resumed.
    pub resumed: Counter,
    /// Frozen processes the agent failed to resume.
    pub resume_errors: Counter,
    /// Freezes skipped because the agent's heartbeat was stale.
    pub freeze_skipped: Counter,
    /// Freezes the kernel refused because the ring buffer had no room for
    /// the record (the process ran on unfrozen).
    pub freeze_no_room: Counter,
    /// Freezes the kernel refused because the frozen-process ledger was full.
    pub freeze_no_ledger: Counter,
    /// Frozen processes released by the watchdog: no capture owned them in
    /// time (record lost, queue behind, decode error).
    pub freeze_watchdog_released: Counter,
    /// Capture threads past their deadline that have not come back.
    pub captures_stuck: Gauge,
    /// Detections folded into a repeat report instead of reported one by one.
    pub detections_aggregated: Counter,
    /// Captures refused by a budget, by reason (workload_budget,
    /// uid_budget, critical_reserve, disk_budget).
    pub captures_refused: Family<ReasonLabel, Counter>,
    /// Containment actions, by action and result.
    pub containment_actions: Family<ActionLabel, Counter>,
    /// Archives removed from the node after the collector acknowledged them.
    pub archives_pruned: Counter,
    /// The collector's receipts for acknowledged bundles, by outcome
    /// (`verified`, `invalid`, `none`).
    pub evidence_receipts: Family<ReasonLabel, Counter>,
    /// Bytes the capture directory holds (at the last capture decision).
    pub capture_disk_bytes: Gauge,
    /// Captures stopped by their deadline (their process was resumed).
    pub capture_timeouts: Counter,
    /// Processes now stopped by the kernel and not yet released.
    pub frozen_now: Gauge,
    /// 1 when kernel freezes are recorded in a pinned map (they survive an
    /// agent crash); 0 when the map could not be pinned and kernel freezing
    /// is off.
    pub freeze_ledger_pinned: Gauge,
    /// Evidence bundles captured.
    pub captures: Counter,
    /// Captures that failed.
    pub capture_errors: Counter,
    /// Captures dropped because the queue was full.
    pub captures_dropped: Counter,
    /// Items the collector acknowledged, by kind (detection, bundle).
    pub ship_sent: Family<KindLabel, Counter>,
    /// Failed shipping attempts (connect, TLS, refused, ...).
    pub ship_errors: Counter,
    /// Items the collector refused for good (over its size limit, not a
    /// valid bundle), set aside in the spool's `rejected/`.
    pub ship_rejected: Counter,
    /// Events not shipped (queue full, backlog full while the collector
    /// was unreachable, refused).
    pub ship_events_dropped: Counter,
    /// Items waiting in the spool.
    pub spool_items: Gauge,
    /// Bytes waiting in the spool.
    pub spool_bytes: Gauge,
    /// Items refused because the spool (or the queue to it) was full.
    pub spool_dropped: Counter,
    last_kernel: std::sync::Mutex<Vec<u64>>,
    /// Liveness and readiness of the event loop (`/healthz`, `/readyz`).
    pub health: Health,
}

/// Liveness and readiness for probes, independent of how busy the agent
/// is: live while the event loop drained the ring buffer lately (it does
/// at least every `poll_interval_ms` when it runs at all), ready once the
/// programs are attached and the loop runs.
#[derive(Debug, Default)]
pub struct Health {
    last_drain_boot_ns: std::sync::atomic::AtomicU64,
    ready: std::sync::atomic::AtomicBool,
}

/// `/healthz` fails when the ring buffer was not drained for this long.
pub const LIVENESS_MAX_STALL: std::time::Duration = std::time::Duration::from_secs(30);

impl Health {
    /// The event loop drained the ring buffer now.
    pub fn drained(&self) {
        self.last_drain_boot_ns.store(
            crate::model::boot_ns_now(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// The agent is attached and running.
    pub fn set_ready(&self, ready: bool) {
        self.ready
            .store(ready, std::sync::atomic::Ordering::Relaxed);
    }

    /// `Ok` while live; else how long the loop has been stalled.
    pub fn live(&self) -> Result<(), String> {
        let last = self
            .last_drain_boot_ns
            .load(std::sync::atomic::Ordering::Relaxed);
        let age = std::time::Duration::from_nanos(crate::model::boot_ns_now().saturating_sub(last));
        if last != 0 && age < LIVENESS_MAX_STALL {
            Ok(())
        } else {
            Err(format!(
                "the event loop has not drained the ring buffer for {} s",
                age.as_secs()
            ))
        }
    }

    /// Whether the agent is ready.
    pub fn ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Metrics {
    /// A registry exposing these metrics.
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut r = Registry::with_prefix("vigil");
        r.register(
            "ship_sent",
            "Items the collector acknowledged, by kind",
            self.ship_sent.clone(),
        );
        r.register(
            "ship_errors",
            "Failed attempts to ship to the collector",
            self.ship_errors.clone(),
        );
        r.register(
            "ship_events_dropped",
            "Events not shipped to the collector (queue or backlog full, refused)",
            self.ship_events_dropped.clone(),
        );
        r.register(
            "ship_rejected",
            "Items the collector refused for good, set aside in the spool's rejected/ directory",
            self.ship_rejected.clone(),
        );
        r.register(
            "spool_items",
            "Items waiting in the spool",
            self.spool_items.clone(),
        );
        r.register(
            "spool_bytes",
            "Bytes waiting in the spool",
            self.spool_bytes.clone(),
        );
        r.register(
            "spool_dropped",
            "Items refused because the spool was full",
            self.spool_dropped.clone(),
        );
        r.register("events", "Events decoded by the agent", self.events.clone());
        r.register(
            "kernel_events",
            "Records emitted by the kernel programs",
            self.kernel_events.clone(),
        );
        r.register(
            "kernel_dropped",
            "Records dropped in the kernel because the ring buffer was full",
            self.kernel_dropped.clone(),
        );
        r.register(
            "process_tree_unknown_pid",
            "Events about a process the tree did not know (added from the event)",
            self.tree_unknown_pid.clone(),
        );
        r.register(
            "decode_errors",
            "Malformed records refused by the decoder",
            self.decode_errors.clone(),
        );
        r.register(
            "process_tree_size",
            "Processes held in the process tree",
            self.tree_size.clone(),
        );
        r.register(
            "process_tree_reaped",
            "Exited processes reaped from the tree",
            self.tree_reaped.clone(),
        );
        r.register(
            "process_tree_rejected",
            "Processes not added because the tree was full",
            self.tree_rejected.clone(),
        );
        r.register(
            "ringbuf_max_fill_bytes",
            "Highest ring buffer fill seen by the kernel programs",
            self.ringbuf_max_fill.clone(),
        );
        r.register(
            "syscalls_in_flight",
            "Syscalls whose arguments the kernel holds until their exit; above 0 while nothing blocks in such a syscall means entries were lost and every syscall exit pays a look-up again",
            self.syscalls_in_flight.clone(),
        );
        r.register(
            "file_dedup",
            "File opens suppressed by de-duplication (in the kernel; by the agent for opens submitted through io_uring)",
            self.file_dedup.clone(),
        );
        r.register(
            "connect_dedup",
            "Connects suppressed by in-kernel de-duplication (same process and destination within connect_dedup_secs)",
            self.connect_dedup.clone(),
        );
        r.register(
            "once_dedup",
            "Exec-memory, ptrace-write and process_vm_writev records suppressed in the kernel (reported once per process, kind and target)",
            self.once_dedup.clone(),
        );
        r.register(
            "inflight_full",
            "Syscalls untracked because the in-flight table was full",
            self.inflight_full.clone(),
        );
        r.register(
            "kernel_read_errors",
            "Kernel pointer reads that failed",
            self.kernel_read_errors.clone(),
        );
        r.register(
            "hook_attached",
            "1 if the hook is attached, 0 if unavailable",
            self.hook_attached.clone(),
        );
        r.register(
            "hook_path",
            "1 for the kind of hook serving each feature: lsm, tracepoint, cgroup, freeze (deny_exec without BPF LSM) or off",
            self.hook_path.clone(),
        );
        r.register(
            "exec_deny_active",
            "1 if deny_exec is enforced in the kernel (BPF LSM), 0 if off or frozen instead",
            self.exec_deny_active.clone(),
        );
        r.register(
            "output_errors",
            "Failures writing event output",
            self.output_errors.clone(),
        );
        r.register("detections", "Detections raised", self.detections.clone());
        r.register(
            "detections_suppressed",
            "Findings suppressed by the learned baseline",
            self.detections_suppressed.clone(),
        );
        r.register(
            "baseline_entries",
            "Entries in the learned baseline",
            self.baseline_entries.clone(),
        );
        r.register(
            "sigma_rules",
            "Sigma rules loaded",
            self.sigma_rules.clone(),
        );
        r.register(
            "frozen",
            "Processes stopped at exec by the kernel freeze policy",
            self.frozen.clone(),
        );
        r.register(
            "exec_denied",
            "Execs refused in the kernel under deny_exec (BPF LSM)",
            self.exec_denied.clone(),
        );
        r.register(
            "resumed",
            "Stopped processes (kernel freeze or capture) resumed by the agent",
            self.resumed.clone(),
        );
        r.register(
            "resume_errors",
            "Frozen processes the agent failed to resume",
            self.resume_errors.clone(),
        );
        r.register(
            "freeze_skipped_no_agent",
            "Freezes skipped because the agent heartbeat was stale",
            self.freeze_skipped.clone(),
        );
        r.register(
            "freeze_refused_no_room",
            "Freezes refused because the ring buffer had no room for the record",
            self.freeze_no_room.clone(),
        );
        r.register(
            "freeze_refused_ledger_full",
            "Freezes refused because the frozen-process ledger was full",
            self.freeze_no_ledger.clone(),
        );
        r.register(
            "freeze_watchdog_released",
            "Frozen processes released by the watchdog because no capture owned them in time",
            self.freeze_watchdog_released.clone(),
        );
        r.register(
            "captures_stuck",
            "Capture threads past their deadline that have not come back (blocked in the kernel)",
            self.captures_stuck.clone(),
        );
        r.register(
            "detections_aggregated",
            "Detections folded into one repeat report instead of reported one by one",
            self.detections_aggregated.clone(),
        );
        r.register(
            "captures_refused",
            "Evidence captures refused by a budget, by reason",
            self.captures_refused.clone(),
        );
        r.register(
            "containment_actions",
            "Containment actions (kill, kill_group) by result (done, dry_run, gone, refused, failed)",
            self.containment_actions.clone(),
        );
        r.register(
            "archives_pruned",
            "Evidence archives removed from the node after the collector acknowledged them",
            self.archives_pruned.clone(),
        );
        r.register(
            "evidence_receipts",
            "The collector's receipts for acknowledged bundles, by outcome (verified, invalid, none)",
            self.evidence_receipts.clone(),
        );
        r.register(
            "capture_disk_bytes",
            "Bytes held by the capture directory",
            self.capture_disk_bytes.clone(),
        );
        r.register(
            "capture_timeouts",
            "Evidence captures stopped by their deadline (process resumed)",
            self.capture_timeouts.clone(),
        );
        r.register(
            "frozen_now",
            "Processes stopped by the kernel freeze and not yet released",
            self.frozen_now.clone(),
        );
        r.register(
            "freeze_ledger_pinned",
            "1 when kernel freezes are recorded in a pinned map that survives an agent crash",
            self.freeze_ledger_pinned.clone(),
        );
        r.register(
            "captures",
            "Evidence bundles captured",
            self.captures.clone(),
        );
        r.register(
            "capture_errors",
            "Evidence captures that failed",
            self.capture_errors.clone(),
        );
        r.register(
            "captures_dropped",
            "Evidence captures dropped because the queue was full",
            self.captures_dropped.clone(),
        );
        r
    }

    /// Counts a decoded event.
    pub fn count_event(&self, kind: raw::EventKind) {
        // One counter handle per kind, resolved once: no label string,
        // hash or lock per event.
        let by_kind = self.event_counters.get_or_init(|| {
            let mut v = vec![Counter::default(); raw::EVENT_KIND_SLOTS];
            for k in raw::EventKind::ALL {
                v[k as usize] = self
                    .events
                    .get_or_create(&KindLabel {
                        kind: k.name().into(),
                    })
                    .clone();
            }
            v
        });
        if let Some(c) = by_kind.get(kind as usize) {
            c.inc();
        }
    }

    /// Counts a detection.
    pub fn count_detection(&self, d: &crate::model::Detection) {
        self.detections
            .get_or_create(&RuleLabel {
                rule: d.rule.clone(),
                severity: format!("{:?}", d.severity).to_lowercase(),
            })
            .inc();
    }

    /// Records which kind of hook serves each feature, and whether deny_exec
    /// is enforced in the kernel.
    pub fn set_paths(&self, paths: &[(crate::sensor::Feature, &'static str)]) {
        for (f, path) in paths {
            self.hook_path
                .get_or_create(&PathLabel {
                    feature: f.name().into(),
                    path: (*path).into(),
                })
                .set(1);
            if *f == crate::sensor::Feature::DenyExec {
                self.exec_deny_active.set((*path == "lsm") as i64);
            }
        }
    }

    /// Records hook status.
    pub fn set_hooks(&self, hooks: &[HookStatus]) {
        for h in hooks {
            self.hook_attached
                .get_or_create(&HookLabel {
                    hook: h.hook.clone(),
                })
                .set(h.error.is_none() as i64);
        }
    }

    /// Folds in absolute kernel counters (from `Sensor::kernel_stats`).
    pub fn update_kernel(&self, now: &[u64]) {
        let mut last = self.last_kernel.lock().unwrap_or_else(|e| e.into_inner());
        if last.len() != now.len() {
            *last = vec![0; now.len()];
        }
        let delta = |slot: u32, last: &mut Vec<u64>| -> u64 {
            let i = slot as usize;
            let d = now[i].saturating_sub(last[i]);
            last[i] = now[i];
            d
        };
        for k in raw::EventKind::ALL {
            let label = KindLabel {
                kind: k.name().into(),
            };
            self.kernel_events
                .get_or_create(&label)
                .inc_by(delta(raw::stat_emitted(k), &mut last));
            self.kernel_dropped
                .get_or_create(&label)
                .inc_by(delta(raw::stat_dropped(k), &mut last));
        }
        self.file_dedup
            .inc_by(delta(raw::STAT_FILE_DEDUP, &mut last));
        self.connect_dedup
            .inc_by(delta(raw::STAT_CONNECT_DEDUP, &mut last));
        self.once_dedup
            .inc_by(delta(raw::STAT_ONCE_DEDUP, &mut last));
        self.inflight_full
            .inc_by(delta(raw::STAT_STASH_FULL, &mut last));
        self.kernel_read_errors
            .inc_by(delta(raw::STAT_READ_ERRORS, &mut last));
        self.frozen.inc_by(delta(raw::STAT_FROZEN, &mut last));
        self.exec_denied
            .inc_by(delta(raw::STAT_EXEC_DENIED, &mut last));
        self.freeze_skipped
            .inc_by(delta(raw::STAT_FREEZE_NO_AGENT, &mut last));
        self.freeze_no_room
            .inc_by(delta(raw::STAT_FREEZE_NO_ROOM, &mut last));
        self.freeze_no_ledger
            .inc_by(delta(raw::STAT_FREEZE_NO_LEDGER, &mut last));
        self.ringbuf_max_fill
            .set(now[raw::STAT_RINGBUF_MAX_FILL as usize] as i64);
    }
}

/// Serves GET /metrics (and /healthz) until the task is dropped.
pub async fn serve(
    listener: std::net::TcpListener,
    registry: Registry,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    use axum::{
        http::{header, StatusCode},
        routing::get,
        Router,
    };
    let registry = Arc::new(registry);
    let (live, ready) = (metrics.clone(), metrics);
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut body = String::new();
                    match prometheus_client::encoding::text::encode(&mut body, &registry) {
                        Ok(()) => (
                            [(
                                header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            body,
                        ),
                        Err(e) => (
                            [(header::CONTENT_TYPE, "text/plain")],
                            format!("encoding error: {e}"),
                        ),
                    }
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let m = live.clone();
                async move {
                    match m.health.live() {
                        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
                        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let m = ready.clone();
                async move {
                    if m.health.ready() {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "starting or stopping\n")
                    }
                }
            }),
        );
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)
        .map_err(|e| anyhow::anyhow!("serving metrics address {addr}: {e}"))?;
    tracing::info!(%addr, "serving metrics at http://{addr}/metrics");
    axum::serve(listener, app).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_follows_the_event_loop_and_readiness_its_state() {
        let h = Health::default();
        assert!(h.live().is_err(), "never drained: not live");
        assert!(!h.ready());
        h.drained();
        h.set_ready(true);
        assert!(h.live().is_ok());
        assert!(h.ready());
        // A loop that stopped draining long ago is not live.
        h.last_drain_boot_ns.store(
            crate::model::boot_ns_now() - LIVENESS_MAX_STALL.as_nanos() as u64 - 1,
            std::sync::atomic::Ordering::Relaxed,
        );
        assert!(h.live().unwrap_err().contains("not drained"));
    }
}
