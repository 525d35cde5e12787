//! Agent configuration: a TOML file (every option) overlaid by command-line
//! flags. `vigil-agent --print-config` shows the merged result.
//!
//! The file has one section per component, in the order events flow:
//! `[sensor]` (kernel hooks, ring buffer, freezing), `[tree]` (process
//! tree and workload identity), `[detect]`, `[capture]`, `[contain]`,
//! `[ship]` and `[outputs]` (local JSON lines, metrics, logs). Each section
//! is validated and turned into its component's options by its own type.
//! The flat keys of earlier versions (`capture_dir = ...` at the top level)
//! are still accepted: [`FLAT_KEYS`] maps each to its section.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::model::Severity;
use crate::sensor::Feature;

/// Default config file, read when it exists and no `--config` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/vigil/agent.toml";

/// Every agent option, by component. Section and field names are the TOML
/// keys.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Kernel hooks, ring buffer, freezing at exec.
    pub sensor: SensorConfig,
    /// The process tree and workload identity.
    pub tree: TreeConfig,
    /// Detection rules, baseline, repeat aggregation.
    pub detect: DetectConfig,
    /// Evidence capture on detection.
    pub capture: CaptureConfig,
    /// Containment (opt-in).
    pub contain: ContainConfig,
    /// Shipping to a collector.
    pub ship: ShipConfig,
    /// Local outputs: JSON lines, metrics, the agent's own log.
    pub outputs: OutputsConfig,
}

/// `[sensor]`: what the kernel side hooks and how events reach the agent.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SensorConfig {
    /// Kernel BTF file (default /sys/kernel/btf/vmlinux).
    pub btf_path: Option<PathBuf>,
    /// How often the agent drains the ring buffer when the kernel has not
    /// woken it, in milliseconds (a safety net: the kernel wakes it for the
    /// first record after a drain).
    pub poll_interval_ms: u64,
    /// The kernel wakes the agent for the first event after a drain; the
    /// agent waits at least this long after a drain before it takes the
    /// next wakeup, in milliseconds. Bounds wakeups under load (at most
    /// 1000 / this many drains a second) and, at light load, about how long
    /// an event waits in the ring buffer (so detection latency). 0: every
    /// wakeup is taken at once.
    pub min_wakeup_interval_ms: u64,
    /// Bytes pending in the ring buffer before the kernel wakes the agent.
    pub wakeup_bytes: u32,
    /// Ring buffer size in bytes (power of two); 0 sizes it by the number
    /// of online CPUs (see [`SensorConfig::ring_bytes`]).
    pub ring_buffer_bytes: u32,
    /// Connects of one process to one destination are reported once per
    /// this many seconds (the kernel counts the repeats in
    /// `vigil_connect_dedup_total`); 0 reports every connect.
    pub connect_dedup_secs: u64,
    /// Hook groups to leave off, by `Feature::name` ("file_write", "chmod",
    /// "rename", "connect", "listen", "utimes", "comm", "send",
    /// "process_access", "module", "bpf", "exec_mem", "unlink"; the process
    /// hooks are always on).
    pub disable: Vec<String>,
    /// Serve file writes and connects with BPF LSM hooks (`file_open`,
    /// `socket_connect`) where the kernel allows them: one program each, and
    /// they see what the syscall tracepoints miss (io_uring). Else, or where
    /// BPF LSM is unavailable, syscall tracepoints.
    pub prefer_lsm: bool,
    /// What the kernel stops at exec for inspection before it runs:
    /// "server_child" (a shell/downloader started by a listening process),
    /// "memfd". Stopped processes are resumed by the agent (after
    /// evidence capture), and only while the agent is alive.
    pub freeze: Vec<String>,
    /// Program names frozen under "server_child".
    pub freeze_names: Vec<String>,
    /// What the kernel refuses to exec at all (same policy names as
    /// `freeze`): on kernels with BPF LSM the exec fails with EPERM before
    /// the program exists and an `exec_denied` event is reported; where the
    /// LSM hook cannot attach, these execs are frozen instead.
    pub deny_exec: Vec<String>,
    /// A process the kernel froze at exec and no capture took is resumed
    /// by the watchdog this long after its freeze, ms.
    pub freeze_release_ms: u64,
    /// bpffs directory for the frozen-process ledger (survives an agent
    /// crash; `vigil-agent resume-frozen` reads it).
    pub bpf_pin_dir: PathBuf,
}

impl Default for SensorConfig {
    fn default() -> Self {
        Self {
            btf_path: None,
            poll_interval_ms: 100,
            min_wakeup_interval_ms: 4,
            wakeup_bytes: 256 * 1024,
            ring_buffer_bytes: 0,
            connect_dedup_secs: 10,
            disable: Vec::new(),
            prefer_lsm: true,
            freeze: vec!["server_child".into(), "memfd".into()],
            freeze_names: [
                "sh", "bash", "dash", "zsh", "ksh", "ash", "busybox", "curl", "wget", "nc", "ncat",
                "netcat", "socat", "telnet",
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            deny_exec: Vec::new(),
            freeze_release_ms: 500,
            bpf_pin_dir: PathBuf::from(crate::frozen::DEFAULT_PIN_DIR),
        }
    }
}

/// Ring buffer bytes per online CPU when `ring_buffer_bytes` is 0 ...
pub const RING_BYTES_PER_CPU: u32 = 4 << 20;
/// ... and the bounds of that size.
pub const RING_BYTES_AUTO: std::ops::RangeInclusive<u32> = (8 << 20)..=(64 << 20);

impl SensorConfig {
    /// The ring buffer's size: `ring_buffer_bytes`, or when it is 0,
    /// [`RING_BYTES_PER_CPU`] per online CPU (every CPU produces; one
    /// thread drains), rounded up to a power of two within
    /// [`RING_BYTES_AUTO`]: 8 MiB up to 2 CPUs, 16 MiB for 3-4, 32 MiB
    /// for 5-8, 64 MiB from 9. It is kernel memory, and the agent's mapping of it counts
    /// twice in its RSS (the data pages are mapped twice, for wrap-around).
    pub fn ring_bytes(&self) -> u32 {
        if self.ring_buffer_bytes != 0 {
            return self.ring_buffer_bytes;
        }
        let cpus = aya::util::online_cpus().map_or(2, |c| c.len().max(1)) as u32;
        Self::ring_bytes_for(cpus)
    }

    fn ring_bytes_for(cpus: u32) -> u32 {
        cpus.saturating_mul(RING_BYTES_PER_CPU)
            .clamp(*RING_BYTES_AUTO.start(), *RING_BYTES_AUTO.end())
            .next_power_of_two()
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.ring_buffer_bytes == 0
                || (self.ring_buffer_bytes.is_power_of_two() && self.ring_buffer_bytes >= 4096),
            "ring_buffer_bytes must be 0 (sized by CPUs) or a power of two of at least 4096, got {}",
            self.ring_buffer_bytes
        );
        anyhow::ensure!(self.poll_interval_ms > 0, "poll_interval_ms must be > 0");
        anyhow::ensure!(
            self.freeze.is_empty() || self.ring_bytes() >= 16384,
            "ring_buffer_bytes must be >= 16384 while freeze is on (a frozen exec's record reserves 8320 bytes), got {}",
            self.ring_buffer_bytes
        );
        anyhow::ensure!(
            (50..=60_000).contains(&self.freeze_release_ms),
            "freeze_release_ms must be between 50 and 60000, got {}",
            self.freeze_release_ms
        );
        anyhow::ensure!(
            self.freeze_names
                .iter()
                .all(|n| !n.is_empty() && n.len() < 16),
            "freeze_names entries must be 1 to 15 bytes"
        );
        self.disabled_features()?;
        self.freeze_policy()?;
        self.deny_policy()?;
        Ok(())
    }

    /// `freeze` as kernel policy bits.
    pub fn freeze_policy(&self) -> anyhow::Result<u32> {
        policy_bits("freeze", &self.freeze)
    }

    /// `deny_exec` as kernel policy bits.
    pub fn deny_policy(&self) -> anyhow::Result<u32> {
        policy_bits("deny_exec", &self.deny_exec)
    }

    /// The `disable` list as features.
    pub fn disabled_features(&self) -> anyhow::Result<Vec<Feature>> {
        // Every hook group but the process hooks (required) and the deny
        // hooks (they follow their policies): derived from `Feature::ALL`,
        // so a new group cannot be forgotten here.
        let optional: Vec<Feature> = Feature::ALL
            .into_iter()
            .filter(|f| {
                !matches!(
                    f,
                    Feature::Process | Feature::DenyConnect | Feature::DenyExec
                )
            })
            .collect();
        self.disable
            .iter()
            .map(|s| {
                optional.iter().copied().find(|f| f.name() == s).ok_or_else(|| {
                    anyhow::anyhow!(
                        "unknown hook group {s:?} in disable (known: {}; process hooks cannot be disabled)",
                        optional.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ")
                    )
                })
            })
            .collect()
    }

    /// The sensor's load options (`offsets` from the kernel's BTF;
    /// `deny_connect` when containment may refuse connects).
    pub fn options(
        &self,
        offsets: vigil_sensor_common::KernelOffsets,
        uring: Result<crate::btf::UringHook, String>,
        deny_connect: bool,
    ) -> anyhow::Result<crate::sensor::SensorOptions> {
        Ok(crate::sensor::SensorOptions {
            offsets,
            uring,
            ring_bytes: self.ring_bytes(),
            wakeup_bytes: self.wakeup_bytes,
            disabled: self.disabled_features()?,
            freeze_policy: self.freeze_policy()?,
            deny_policy: self.deny_policy()?,
            prefer_lsm: self.prefer_lsm,
            freeze_names: self.freeze_names.clone(),
            freeze_sizes: crate::identity::Identities::scan().sizes_of(&self.freeze_names),
            connect_dedup_ns: self.connect_dedup_secs.saturating_mul(1_000_000_000),
            pin_dir: self.bpf_pin_dir.clone(),
            deny_connect,
        })
    }

    /// The frozen-process ledger's options.
    pub fn ledger(&self) -> crate::frozen::LedgerOptions {
        crate::frozen::LedgerOptions {
            release_after: Duration::from_millis(self.freeze_release_ms),
        }
    }
}

/// `[tree]`: the live process tree and who a process belongs to.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TreeConfig {
    /// Most processes kept in the process tree.
    pub max_processes: usize,
    /// Seconds an exited process stays in the tree (for late events).
    pub exit_grace_secs: u64,
    /// Name containers (name, image and digest, Kubernetes pod and
    /// namespace) from the container runtimes' state files.
    pub container_meta: bool,
    /// Root below which the runtimes' state is read (`/run/containerd`,
    /// `/var/lib/containers`, `/var/lib/docker`): "/" on a host and in the
    /// DaemonSet (which mounts them at their host paths), or where an
    /// agent in a container sees the host's root (e.g. "/host").
    pub runtime_state_root: PathBuf,
}

impl Default for TreeConfig {
    fn default() -> Self {
        Self {
            max_processes: 65_536,
            exit_grace_secs: 10,
            container_meta: true,
            runtime_state_root: PathBuf::from("/"),
        }
    }
}

impl TreeConfig {
    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.max_processes >= 16, "max_processes must be >= 16");
        Ok(())
    }

    /// An empty process tree of this size.
    pub fn build(&self) -> crate::tree::ProcessTree {
        crate::tree::ProcessTree::new(
            self.max_processes,
            Duration::from_secs(self.exit_grace_secs),
        )
    }

    /// The workload cache (container identity from the runtimes' state
    /// when `container_meta`).
    pub fn workloads(&self) -> crate::workload_cache::WorkloadCache {
        let w = crate::workload_cache::WorkloadCache::new(4096);
        if self.container_meta {
            w.with_runtime_state(&self.runtime_state_root)
        } else {
            w
        }
    }
}

/// `[detect]`: rules, the learned baseline and repeat aggregation.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DetectConfig {
    /// Detection on (off: events only, and no capture).
    pub enabled: bool,
    /// Learn the baseline for this long after start ("10m", "2h", "0s").
    pub learn: String,
    /// The learned baseline: read at start when it exists, written every
    /// minute and at exit. The file is the export/import format.
    pub baseline_file: Option<PathBuf>,
    /// Directory of Sigma rules (reloaded when it changes).
    pub rules_dir: Option<PathBuf>,
    /// Window in which repeats of one detection (rule, workload,
    /// executable, argv shape) collapse into one report, seconds.
    pub aggregate_window_secs: u64,
    /// Repeats reported one by one per window before they collapse.
    pub aggregate_emit_first: u32,
    /// The same for high and critical detections.
    pub aggregate_emit_first_high: u32,
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            learn: "0s".into(),
            baseline_file: None,
            rules_dir: None,
            aggregate_window_secs: 60,
            aggregate_emit_first: 3,
            aggregate_emit_first_high: 20,
        }
    }
}

impl DetectConfig {
    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.aggregate_emit_first >= 1
                && self.aggregate_emit_first_high >= 1
                && self.aggregate_window_secs >= 1,
            "aggregate_emit_first, aggregate_emit_first_high and aggregate_window_secs must be >= 1"
        );
        self.learn_duration()?;
        Ok(())
    }

    /// `learn` as a duration.
    pub fn learn_duration(&self) -> anyhow::Result<Duration> {
        humantime::parse_duration(&self.learn).map_err(|e| {
            anyhow::anyhow!(
                "learn = {:?} is not a duration (e.g. \"10m\"): {e}",
                self.learn
            )
        })
    }

    /// The repeat aggregation's options.
    pub fn aggregation(&self) -> crate::budget::AggregateOptions {
        crate::budget::AggregateOptions {
            window: Duration::from_secs(self.aggregate_window_secs),
            emit_first: self.aggregate_emit_first,
            emit_first_high: self.aggregate_emit_first_high,
        }
    }
}

/// `[capture]`: evidence taken on detection, and its bounds.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CaptureConfig {
    /// Capture evidence (core, context, executable) on detection.
    pub enabled: bool,
    /// Where capture work, sealed bundles and chain state live.
    pub dir: PathBuf,
    /// Detections at or above this severity are captured: low, medium,
    /// high, critical.
    pub min_severity: String,
    /// Rules whose detections are captured whatever their severity
    /// (default: execution from temp and hidden directories, where
    /// droppers run their payloads).
    pub rules: Vec<String>,
    /// Kill the process after its capture instead of resuming it.
    pub contain: bool,
    /// Cap on the memory bytes in one core file, MiB.
    pub max_core_mib: u64,
    /// When the detected process exited before it could be stopped,
    /// capture its nearest living ancestor instead (the manifest's
    /// `subject.stands_in_for` names the detected process).
    pub ancestor_fallback: bool,
    /// Wall-clock limit of one capture, ms: past it the process is resumed
    /// (by the freeze watchdog) and the capture reported as timed out.
    pub deadline_ms: u64,
    /// Disk budget of the capture directory, MiB: captures of detections
    /// below high stop at 80 % of it, high and critical ones at 100 %; what
    /// is refused is counted (`vigil_captures_refused_total{reason}`).
    pub max_disk_mib: u64,
    /// Acknowledged archives kept on the node, MiB (0: an archive leaves
    /// the node once the collector acknowledged it).
    pub keep_shipped_mib: u64,
    /// Capture budget window, seconds.
    pub budget_window_secs: u64,
    /// Captures per workload per window (detections below critical).
    pub budget_per_workload: u32,
    /// Captures per uid per window (detections below critical).
    pub budget_per_uid: u32,
    /// Captures per workload per window for critical detections, counted
    /// apart so that a flood of lesser ones never uses them up.
    pub budget_critical: u32,
    /// The agent id written in every bundle's manifest (default: `[ship]
    /// agent_name` when shipping, so bundles are signed: the collector
    /// binds a signed bundle's agent id to the certificate that uploads
    /// it; else the host name).
    pub agent_id: Option<String>,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dir: PathBuf::from("/var/lib/vigil/capture"),
            min_severity: "high".into(),
            rules: vec!["exec_from_temp_dir".into(), "exec_from_hidden_dir".into()],
            contain: false,
            max_core_mib: 512,
            ancestor_fallback: true,
            deadline_ms: 10_000,
            max_disk_mib: 2048,
            keep_shipped_mib: 0,
            budget_window_secs: 600,
            budget_per_workload: 100,
            budget_per_uid: 200,
            budget_critical: 50,
            agent_id: None,
        }
    }
}

impl CaptureConfig {
    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.budget_window_secs >= 1,
            "budget_window_secs must be >= 1"
        );
        anyhow::ensure!(
            self.deadline_ms >= 100,
            "deadline_ms must be >= 100, got {}",
            self.deadline_ms
        );
        self.severity()?;
        if let Some(id) = &self.agent_id {
            anyhow::ensure!(
                !id.is_empty() && id.len() <= 64 && !id.chars().any(char::is_control),
                "agent_id must be 1-64 printable characters, got {id:?}"
            );
        }
        Ok(())
    }

    /// `min_severity` parsed.
    pub fn severity(&self) -> anyhow::Result<Severity> {
        match parse_severity(&self.min_severity) {
            Some(Some(s)) => Ok(s),
            _ => anyhow::bail!(
                "min_severity must be low, medium, high or critical, got {:?}",
                self.min_severity
            ),
        }
    }

    /// The capture budget settings.
    pub fn budget(&self) -> crate::budget::BudgetOptions {
        crate::budget::BudgetOptions {
            window: Duration::from_secs(self.budget_window_secs),
            per_workload: self.budget_per_workload,
            per_uid: self.budget_per_uid,
            critical_per_workload: self.budget_critical,
        }
    }

    /// The responder's options; what the capture worker hands over goes
    /// to `forward`, what containment did to `actions`.
    pub fn response(
        &self,
        agent_id: String,
        evidence_json: Option<PathBuf>,
        forward: Option<std::sync::Arc<dyn crate::outputs::Forward>>,
        actions: Option<std::sync::Arc<crate::contain::ActionLog>>,
    ) -> anyhow::Result<crate::respond::ResponseOptions> {
        Ok(crate::respond::ResponseOptions {
            dir: self.dir.clone(),
            agent_id: self.agent_id.clone().unwrap_or(agent_id),
            min_severity: self.severity()?,
            capture_rules: self.rules.clone(),
            contain: self.contain,
            max_core_bytes: self.max_core_mib << 20,
            evidence_json,
            forward,
            ancestor_fallback: self.ancestor_fallback,
            deadline: Duration::from_millis(self.deadline_ms),
            budget: self.budget(),
            max_disk_bytes: self.max_disk_mib << 20,
            peer_pin_dir: None,
            actions,
        })
    }
}

/// `[contain]`: what is done to a detected process (off by default).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ContainConfig {
    /// Contain the processes of these rules' detections (see `action`);
    /// their memory is captured first.
    pub rules: Vec<String>,
    /// Also contain every detection at or above this severity: low,
    /// medium, high, critical, or "off".
    pub min_severity: String,
    /// What containment does: "kill" (the process), "kill_group" (its
    /// whole process group) or "deny_connect" (its connects and those of
    /// its children refused in the kernel; it runs on).
    pub action: String,
    /// Report what containment would do and kill nothing.
    pub dry_run: bool,
}

impl Default for ContainConfig {
    fn default() -> Self {
        Self {
            rules: Vec::new(),
            min_severity: "off".into(),
            action: "kill".into(),
            dry_run: false,
        }
    }
}

impl ContainConfig {
    /// The containment policy; `None` when containment is off.
    pub fn policy(&self) -> anyhow::Result<Option<crate::contain::Policy>> {
        let min = match parse_severity(&self.min_severity) {
            Some(s) => s,
            None => anyhow::bail!(
                "min_severity must be off, low, medium, high or critical, got {:?}",
                self.min_severity
            ),
        };
        let action = crate::contain::Action::parse(&self.action)?;
        Ok(crate::contain::Policy::new(
            &self.rules,
            min,
            action,
            self.dry_run,
        ))
    }

    /// True when containment may refuse connects in the kernel.
    pub fn denies_connects(&self) -> anyhow::Result<bool> {
        Ok(self
            .policy()?
            .is_some_and(|p| p.action() == crate::contain::Action::DenyConnect))
    }
}

/// `[ship]`: the collector and the spool that holds what waits for it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ShipConfig {
    /// Ship detections and evidence bundles to this collector
    /// (e.g. "https://127.0.0.1:7443"); needs `collector_pki` and
    /// `agent_name`.
    pub collector: Option<String>,
    /// PKI directory as `vigil-collector init-pki` writes it (ca.pem,
    /// agents/NAME.pem, agents/NAME.key).
    pub collector_pki: Option<PathBuf>,
    /// This agent's certificate name in `collector_pki`.
    pub agent_name: Option<String>,
    /// Where items wait for the collector (survives restarts).
    pub spool_dir: PathBuf,
    /// Spool size limit, MiB.
    pub spool_max_mib: u64,
    /// Spool item limit.
    pub spool_max_items: u64,
    /// Also ship every event to the collector (best effort: batched, held
    /// in memory while it is unreachable, never at the expense of
    /// detections and evidence).
    pub events: bool,
}

impl Default for ShipConfig {
    fn default() -> Self {
        Self {
            collector: None,
            collector_pki: None,
            agent_name: None,
            spool_dir: PathBuf::from("/var/lib/vigil/spool"),
            spool_max_mib: 1024,
            spool_max_items: 100_000,
            events: true,
        }
    }
}

impl ShipConfig {
    fn validate(&self) -> anyhow::Result<()> {
        if let Some(url) = &self.collector {
            anyhow::ensure!(
                url.starts_with("https://"),
                "collector must be an https:// URL (mutual TLS), got {url:?}"
            );
            anyhow::ensure!(
                self.collector_pki.is_some() && self.agent_name.is_some(),
                "collector needs collector_pki and agent_name (--collector-pki DIR --agent-name NAME)"
            );
            anyhow::ensure!(
                self.spool_max_mib > 0 && self.spool_max_items > 0,
                "spool_max_mib and spool_max_items must be > 0"
            );
        }
        Ok(())
    }

    /// The shipper's options when a collector is configured (`archives`:
    /// where sealed bundles are, when capture is on).
    pub fn options(
        &self,
        archives: Option<PathBuf>,
        keep_shipped_mib: u64,
    ) -> Option<crate::ship::ShipOptions> {
        match (&self.collector, &self.collector_pki, &self.agent_name) {
            (Some(url), Some(pki), Some(name)) => Some(crate::ship::ShipOptions {
                collector: url.clone(),
                pki_dir: pki.clone(),
                agent_name: name.clone(),
                spool_dir: self.spool_dir.clone(),
                spool_max_bytes: self.spool_max_mib << 20,
                spool_max_items: self.spool_max_items,
                archive_dir: archives,
                keep_shipped_bytes: keep_shipped_mib << 20,
            }),
            _ => None,
        }
    }
}

/// `[outputs]`: what the agent writes on the node itself.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OutputsConfig {
    /// Write every event as a JSON line here; "-" is stdout.
    pub events_json: Option<PathBuf>,
    /// Event lines give each ancestor's argv too (`{pid, exe, argv}`, the
    /// form before version 0.2); by default an ancestor is `{pid, exe}`
    /// and its arguments are in its own exec event. Detections always
    /// carry the full ancestry.
    pub events_ancestry_argv: bool,
    /// Write every detection as a JSON line here; "-" is stdout.
    pub detections_json: Option<PathBuf>,
    /// Write each capture outcome (bundle id, archive, timings) as a JSON
    /// line here.
    pub evidence_json: Option<PathBuf>,
    /// Write each containment action (done or dry run) as a JSON line here.
    pub actions_json: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (GET /metrics).
    pub metrics_addr: Option<SocketAddr>,
    /// Log format: "text" or "json".
    pub log_format: String,
}

impl Default for OutputsConfig {
    fn default() -> Self {
        Self {
            events_json: None,
            events_ancestry_argv: false,
            detections_json: None,
            evidence_json: None,
            actions_json: None,
            metrics_addr: None,
            log_format: "text".into(),
        }
    }
}

impl OutputsConfig {
    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            matches!(self.log_format.as_str(), "text" | "json"),
            "log_format must be \"text\" or \"json\", got {:?}",
            self.log_format
        );
        Ok(())
    }
}

/// The keys of the flat (pre-section) file, each with its section and its
/// name there.
#[rustfmt::skip]
pub const FLAT_KEYS: &[(&str, &str, &str)] = &[
    ("btf_path", "sensor", "btf_path"),
    ("poll_interval_ms", "sensor", "poll_interval_ms"),
    ("min_wakeup_interval_ms", "sensor", "min_wakeup_interval_ms"),
    ("wakeup_bytes", "sensor", "wakeup_bytes"),
    ("ring_buffer_bytes", "sensor", "ring_buffer_bytes"),
    ("connect_dedup_secs", "sensor", "connect_dedup_secs"),
    ("disable", "sensor", "disable"),
    ("prefer_lsm", "sensor", "prefer_lsm"),
    ("freeze", "sensor", "freeze"),
    ("freeze_names", "sensor", "freeze_names"),
    ("deny_exec", "sensor", "deny_exec"),
    ("freeze_release_ms", "sensor", "freeze_release_ms"),
    ("bpf_pin_dir", "sensor", "bpf_pin_dir"),
    ("max_processes", "tree", "max_processes"),
    ("exit_grace_secs", "tree", "exit_grace_secs"),
    ("container_meta", "tree", "container_meta"),
    ("runtime_state_root", "tree", "runtime_state_root"),
    ("detection", "detect", "enabled"),
    ("learn", "detect", "learn"),
    ("baseline_file", "detect", "baseline_file"),
    ("rules_dir", "detect", "rules_dir"),
    ("aggregate_window_secs", "detect", "aggregate_window_secs"),
    ("aggregate_emit_first", "detect", "aggregate_emit_first"),
    ("aggregate_emit_first_high", "detect", "aggregate_emit_first_high"),
    ("capture", "capture", "enabled"),
    ("capture_dir", "capture", "dir"),
    ("capture_min_severity", "capture", "min_severity"),
    ("capture_rules", "capture", "rules"),
    ("capture_contain", "capture", "contain"),
    ("capture_max_core_mib", "capture", "max_core_mib"),
    ("capture_ancestor_fallback", "capture", "ancestor_fallback"),
    ("capture_deadline_ms", "capture", "deadline_ms"),
    ("capture_max_disk_mib", "capture", "max_disk_mib"),
    ("capture_keep_shipped_mib", "capture", "keep_shipped_mib"),
    ("capture_budget_window_secs", "capture", "budget_window_secs"),
    ("capture_budget_per_workload", "capture", "budget_per_workload"),
    ("capture_budget_per_uid", "capture", "budget_per_uid"),
    ("capture_budget_critical", "capture", "budget_critical"),
    ("capture_agent_id", "capture", "agent_id"),
    ("contain_rules", "contain", "rules"),
    ("contain_min_severity", "contain", "min_severity"),
    ("contain_action", "contain", "action"),
    ("contain_dry_run", "contain", "dry_run"),
    ("collector", "ship", "collector"),
    ("collector_pki", "ship", "collector_pki"),
    ("agent_name", "ship", "agent_name"),
    ("spool_dir", "ship", "spool_dir"),
    ("spool_max_mib", "ship", "spool_max_mib"),
    ("spool_max_items", "ship", "spool_max_items"),
    ("ship_events", "ship", "events"),
    ("events_json", "outputs", "events_json"),
    ("events_ancestry_argv", "outputs", "events_ancestry_argv"),
    ("detections_json", "outputs", "detections_json"),
    ("evidence_json", "outputs", "evidence_json"),
    ("actions_json", "outputs", "actions_json"),
    ("metrics_addr", "outputs", "metrics_addr"),
    ("log_format", "outputs", "log_format"),
];

/// The sections, in file order.
pub const SECTIONS: [&str; 7] = [
    "sensor", "tree", "detect", "capture", "contain", "ship", "outputs",
];

impl AgentConfig {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        let cfg = Self::parse(&text)
            .with_context(|| format!("parsing config file {}", path.display()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses a TOML text: sections, flat keys of earlier versions, or
    /// both (a setting given both ways is an error).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let table: toml::Table = toml::from_str(text)?;
        let is_section = |k: &str, v: &toml::Value| SECTIONS.contains(&k) && v.is_table();
        if table.iter().all(|(k, v)| is_section(k, v)) {
            // The sectioned form as is: errors keep their line.
            return Ok(toml::from_str(text)?);
        }
        let mut grouped = toml::Table::new();
        for (key, value) in table {
            match value {
                toml::Value::Table(items) if SECTIONS.contains(&key.as_str()) => {
                    for (k, v) in items {
                        put(&mut grouped, &key, &k, v, &format!("[{key}] {k}"))?;
                    }
                    continue;
                }
                _ => {}
            }
            // (`capture = true` is the flat key of `[capture] enabled`.)
            let Some((_, section, name)) = FLAT_KEYS.iter().find(|(f, _, _)| *f == key) else {
                anyhow::bail!(
                    "unknown key {key:?} (sections: {}; flat keys of earlier versions are also read)",
                    SECTIONS.join(", ")
                );
            };
            put(&mut grouped, section, name, value, &key)?;
        }
        Ok(toml::Value::Table(grouped).try_into()?)
    }

    /// Checks values a TOML file or flags could get wrong.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.sensor.validate().context("[sensor]")?;
        self.tree.validate().context("[tree]")?;
        self.detect.validate().context("[detect]")?;
        self.capture.validate().context("[capture]")?;
        self.contain.policy().context("[contain]")?;
        self.ship.validate().context("[ship]")?;
        self.outputs.validate().context("[outputs]")?;
        Ok(())
    }

    /// Capture runs: detection and capture both on.
    pub fn captures(&self) -> bool {
        self.detect.enabled && self.capture.enabled
    }
}

/// Puts `key = value` into `section`, unless given already (by `what`).
fn put(
    grouped: &mut toml::Table,
    section: &str,
    key: &str,
    value: toml::Value,
    what: &str,
) -> anyhow::Result<()> {
    let entry = grouped
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(t) = entry else {
        unreachable!("sections are tables")
    };
    anyhow::ensure!(
        !t.contains_key(key),
        "{what}: [{section}] {key} is set twice (once as a flat key of an earlier version)"
    );
    t.insert(key.to_string(), value);
    Ok(())
}

/// A severity name, or "off" (`Some(None)`); `None` if unknown.
fn parse_severity(s: &str) -> Option<Option<Severity>> {
    Some(match s {
        "off" => None,
        "low" => Some(Severity::Low),
        "medium" => Some(Severity::Medium),
        "high" => Some(Severity::High),
        "critical" => Some(Severity::Critical),
        _ => return None,
    })
}

/// Exec policy names (`freeze`, `deny_exec`) as kernel policy bits.
fn policy_bits(key: &str, names: &[String]) -> anyhow::Result<u32> {
    use vigil_sensor_common as c;
    names.iter().try_fold(0u32, |acc, f| {
        Ok(acc
            | match f.as_str() {
                "server_child" => c::FREEZE_SERVER_CHILD,
                "memfd" => c::FREEZE_MEMFD,
                other => {
                    anyhow::bail!("unknown {key} policy {other:?} (known: server_child, memfd)")
                }
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ring buffer grows with the CPUs that fill it, within bounds,
    /// as a power of two; a size set in the file is kept.
    #[test]
    fn the_ring_buffer_is_sized_by_cpus_unless_set() {
        let mib = |n: u32| n << 20;
        for (cpus, want) in [
            (1, 8),
            (2, 8),
            (3, 16),
            (4, 16),
            (5, 32),
            (8, 32),
            (9, 64),
            (512, 64),
        ] {
            assert_eq!(SensorConfig::ring_bytes_for(cpus), mib(want), "{cpus} CPUs");
        }
        let mut c = SensorConfig::default();
        assert!(RING_BYTES_AUTO.contains(&c.ring_bytes()));
        c.ring_buffer_bytes = 16384;
        assert_eq!(c.ring_bytes(), 16384);
        assert!(c.validate().is_ok());
        c.ring_buffer_bytes = 0;
        assert!(c.validate().is_ok());
    }

    /// Every optional setting set, so that serialization shows every key.
    fn everything_set() -> AgentConfig {
        let mut c = AgentConfig::default();
        c.sensor.btf_path = Some("/sys/kernel/btf/vmlinux".into());
        c.detect.baseline_file = Some("/var/lib/vigil/baseline.json".into());
        c.detect.rules_dir = Some("/etc/vigil/rules".into());
        c.ship.collector = Some("https://collector:7443".into());
        c.ship.collector_pki = Some("/etc/vigil/pki".into());
        c.ship.agent_name = Some("node-1".into());
        c.outputs.events_json = Some("/var/log/vigil/events.jsonl".into());
        c.outputs.detections_json = Some("/var/log/vigil/detections.jsonl".into());
        c.outputs.evidence_json = Some("/var/log/vigil/evidence.jsonl".into());
        c.outputs.actions_json = Some("/var/log/vigil/actions.jsonl".into());
        c.outputs.metrics_addr = Some("127.0.0.1:9108".parse().unwrap());
        c.capture.dir = "/srv/capture".into();
        c.capture.agent_id = Some("node-1".into());
        c.ship.events = false;
        c.detect.enabled = false;
        c
    }

    #[test]
    fn sections_parse_and_unknown_keys_are_refused() {
        let cfg = AgentConfig::parse(
            r#"
            [sensor]
            poll_interval_ms = 5
            disable = ["rename"]
            [outputs]
            events_json = "/var/log/vigil/events.jsonl"
            metrics_addr = "127.0.0.1:9108"
            "#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.sensor.poll_interval_ms, 5);
        assert_eq!(
            cfg.sensor.disabled_features().unwrap(),
            vec![Feature::Rename]
        );
        // Every optional group is accepted (utimes and comm once were
        // documented but refused); the required ones are not.
        let mut c = AgentConfig::default();
        c.sensor.disable = vec!["comm".into(), "utimes".into(), "unlink".into()];
        assert_eq!(c.sensor.disabled_features().unwrap().len(), 3);
        c.sensor.disable = vec!["process".into()];
        assert!(c.sensor.disabled_features().is_err());
        assert!(AgentConfig::parse("nonsense = 1").is_err());
        assert!(AgentConfig::parse("[sensor]\nnonsense = 1").is_err());
        assert!(AgentConfig::parse("[nonsense]\npoll_interval_ms = 1").is_err());
        assert!(AgentConfig::parse("sensor = 1").is_err());
        let mut bad = AgentConfig::default();
        bad.sensor.ring_buffer_bytes = 1000;
        assert!(bad.validate().is_err());
        let mut bad = AgentConfig::default();
        bad.sensor.disable = vec!["exec".into()];
        let err = format!("{:#}", bad.validate().unwrap_err());
        assert!(err.contains("[sensor]") && err.contains("exec"), "{err}");
    }

    /// The flat file of earlier versions gives the same configuration as
    /// the sectioned one, key by key, and every sectioned key has its flat
    /// name (the map is complete).
    #[test]
    fn flat_keys_of_earlier_versions_map_to_every_section_key() {
        let want = everything_set();
        let toml::Value::Table(grouped) = toml::Value::try_from(&want).unwrap() else {
            panic!("a table")
        };
        let mut flat = toml::Table::new();
        let mut covered = 0;
        for (section, items) in &grouped {
            let toml::Value::Table(items) = items else {
                panic!("{section} is a table")
            };
            for (k, v) in items {
                let (f, _, _) = FLAT_KEYS
                    .iter()
                    .find(|(_, s, n)| s == section && n == k)
                    .unwrap_or_else(|| panic!("[{section}] {k} has no flat key"));
                flat.insert(f.to_string(), v.clone());
                covered += 1;
            }
        }
        assert_eq!(covered, FLAT_KEYS.len(), "a flat key maps to no field");
        let text = toml::to_string(&flat).unwrap();
        assert_eq!(AgentConfig::parse(&text).unwrap(), want);
        // Flat and sectioned keys mixed, as an old file with a new section.
        let mixed = AgentConfig::parse("capture_dir = \"/a\"\n[ship]\nevents = false\n").unwrap();
        assert_eq!(mixed.capture.dir, PathBuf::from("/a"));
        assert!(!mixed.ship.events);
    }

    #[test]
    fn a_setting_given_flat_and_in_its_section_is_an_error() {
        let err = AgentConfig::parse("capture_dir = \"/a\"\n[capture]\ndir = \"/b\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("set twice"), "{err}");
    }

    #[test]
    fn default_and_everything_set_round_trip() {
        for cfg in [AgentConfig::default(), everything_set()] {
            let text = toml::to_string(&cfg).unwrap();
            assert_eq!(AgentConfig::parse(&text).unwrap(), cfg, "{text}");
        }
    }
}
