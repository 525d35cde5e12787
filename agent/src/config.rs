//! Agent configuration: a TOML file (every option) overlaid by command-line
//! flags. `vigil-agent --print-config` shows the merged result.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::sensor::Feature;

/// Default config file, read when it exists and no `--config` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/vigil/agent.toml";

/// Every agent option. Field names are the TOML keys.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Write every event as a JSON line here; "-" is stdout.
    pub events_json: Option<PathBuf>,
    /// Event lines give each ancestor's argv too (`{pid, exe, argv}`, the
    /// form before version 0.2); by default an ancestor is `{pid, exe}`
    /// and its arguments are in its own exec event. Detections always
    /// carry the full ancestry.
    pub events_ancestry_argv: bool,
    /// Serve Prometheus metrics on this address (GET /metrics).
    pub metrics_addr: Option<SocketAddr>,
    /// Kernel BTF file (default /sys/kernel/btf/vmlinux).
    pub btf_path: Option<PathBuf>,
    /// How often the agent drains the ring buffer when the kernel has not
    /// woken it, in milliseconds.
    pub poll_interval_ms: u64,
    /// Bytes pending in the ring buffer before the kernel wakes the agent.
    pub wakeup_bytes: u32,
    /// Ring buffer size in bytes (power of two).
    pub ring_buffer_bytes: u32,
    /// Most processes kept in the process tree.
    pub max_processes: usize,
    /// Seconds an exited process stays in the tree (for late events).
    pub exit_grace_secs: u64,
    /// Connects of one process to one destination are reported once per
    /// this many seconds (the kernel counts the repeats in
    /// `vigil_connect_dedup_total`); 0 reports every connect.
    pub connect_dedup_secs: u64,
    /// Hooks to leave off: "file_write", "chmod", "rename", "connect", "listen".
    pub disable: Vec<String>,
    /// Log format: "text" or "json".
    pub log_format: String,
    /// Write every detection as a JSON line here; "-" is stdout.
    pub detections_json: Option<PathBuf>,
    /// Learn the baseline for this long after start ("10m", "2h", "0s").
    pub learn: String,
    /// The learned baseline: read at start when it exists, written every
    /// minute and at exit. The file is the export/import format.
    pub baseline_file: Option<PathBuf>,
    /// Directory of Sigma rules (reloaded when it changes).
    pub rules_dir: Option<PathBuf>,
    /// Turn detection off entirely.
    pub detection: bool,
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
    /// Serve file writes and connects with BPF LSM hooks (`file_open`,
    /// `socket_connect`) where the kernel allows them: one program each, and
    /// they see what the syscall tracepoints miss (io_uring). Else, or where
    /// BPF LSM is unavailable, syscall tracepoints.
    pub prefer_lsm: bool,
    /// Capture evidence (core, context, executable) on detection.
    pub capture: bool,
    /// Where capture work, sealed bundles and chain state live.
    pub capture_dir: PathBuf,
    /// Detections at or above this severity are captured: low, medium,
    /// high, critical.
    pub capture_min_severity: String,
    /// Rules whose detections are captured whatever their severity
    /// (default: execution from temp and hidden directories, where
    /// droppers run their payloads).
    pub capture_rules: Vec<String>,
    /// Kill the process after its capture instead of resuming it.
    pub capture_contain: bool,
    /// Contain the processes of these rules' detections (see
    /// `contain_action`); their memory is captured first.
    pub contain_rules: Vec<String>,
    /// Also contain every detection at or above this severity: low,
    /// medium, high, critical, or "off".
    pub contain_min_severity: String,
    /// What containment does: "kill" (the process), "kill_group" (its
    /// whole process group) or "deny_connect" (its connects and those of
    /// its children refused in the kernel; it runs on).
    pub contain_action: String,
    /// Report what containment would do and kill nothing.
    pub contain_dry_run: bool,
    /// Write each containment action (done or dry run) as a JSON line here.
    pub actions_json: Option<PathBuf>,
    /// Cap on the memory bytes in one core file, MiB.
    pub capture_max_core_mib: u64,
    /// When the detected process exited before it could be stopped,
    /// capture its nearest living ancestor instead (the manifest's
    /// `subject.stands_in_for` names the detected process).
    pub capture_ancestor_fallback: bool,
    /// Wall-clock limit of one capture, ms: past it the process is resumed
    /// (by the freeze watchdog) and the capture reported as timed out.
    pub capture_deadline_ms: u64,
    /// A process the kernel froze at exec and no capture took is resumed
    /// by the watchdog this long after its freeze, ms.
    pub freeze_release_ms: u64,
    /// bpffs directory for the frozen-process ledger (survives an agent
    /// crash; `vigil-agent resume-frozen` reads it).
    pub bpf_pin_dir: PathBuf,
    /// Disk budget of the capture directory, MiB: captures of detections
    /// below high stop at 80 % of it, high and critical ones at 100 %; what
    /// is refused is counted (`vigil_captures_refused_total{reason}`).
    pub capture_max_disk_mib: u64,
    /// Acknowledged archives kept on the node, MiB (0: an archive leaves
    /// the node once the collector acknowledged it).
    pub capture_keep_shipped_mib: u64,
    /// Capture budget window, seconds.
    pub capture_budget_window_secs: u64,
    /// Captures per workload per window (detections below critical).
    pub capture_budget_per_workload: u32,
    /// Captures per uid per window (detections below critical).
    pub capture_budget_per_uid: u32,
    /// Captures per workload per window for critical detections, counted
    /// apart so that a flood of lesser ones never uses them up.
    pub capture_budget_critical: u32,
    /// Window in which repeats of one detection (rule, workload,
    /// executable, argv shape) collapse into one report, seconds.
    pub aggregate_window_secs: u64,
    /// Repeats reported one by one per window before they collapse.
    pub aggregate_emit_first: u32,
    /// The same for high and critical detections.
    pub aggregate_emit_first_high: u32,
    /// Write each capture outcome (bundle id, archive, timings) as a JSON
    /// line here.
    pub evidence_json: Option<PathBuf>,
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
    pub ship_events: bool,
    /// Name containers (name, image and digest, Kubernetes pod and
    /// namespace) from the container runtimes' state files.
    pub container_meta: bool,
    /// Root below which the runtimes' state is read (`/run/containerd`,
    /// `/var/lib/containers`, `/var/lib/docker`): "/" on a host and in the
    /// DaemonSet (which mounts them at their host paths), or where an
    /// agent in a container sees the host's root (e.g. "/host").
    pub runtime_state_root: PathBuf,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            events_json: None,
            events_ancestry_argv: false,
            metrics_addr: None,
            btf_path: None,
            poll_interval_ms: 10,
            wakeup_bytes: 256 * 1024,
            ring_buffer_bytes: 16 * 1024 * 1024,
            max_processes: 65_536,
            exit_grace_secs: 10,
            connect_dedup_secs: 10,
            disable: Vec::new(),
            log_format: "text".into(),
            detections_json: None,
            learn: "0s".into(),
            baseline_file: None,
            rules_dir: None,
            detection: true,
            freeze: vec!["server_child".into(), "memfd".into()],
            freeze_names: [
                "sh", "bash", "dash", "zsh", "ksh", "ash", "busybox", "curl", "wget", "nc", "ncat",
                "netcat", "socat", "telnet",
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            capture: true,
            capture_dir: PathBuf::from("/var/lib/vigil/capture"),
            capture_min_severity: "high".into(),
            capture_rules: vec!["exec_from_temp_dir".into(), "exec_from_hidden_dir".into()],
            capture_contain: false,
            contain_rules: Vec::new(),
            contain_min_severity: "off".into(),
            contain_action: "kill".into(),
            contain_dry_run: false,
            actions_json: None,
            capture_max_core_mib: 512,
            capture_ancestor_fallback: true,
            capture_deadline_ms: 10_000,
            freeze_release_ms: 500,
            deny_exec: Vec::new(),
            prefer_lsm: true,
            bpf_pin_dir: PathBuf::from(crate::frozen::DEFAULT_PIN_DIR),
            capture_max_disk_mib: 2048,
            capture_keep_shipped_mib: 0,
            capture_budget_window_secs: 600,
            capture_budget_per_workload: 100,
            capture_budget_per_uid: 200,
            capture_budget_critical: 50,
            aggregate_window_secs: 60,
            aggregate_emit_first: 3,
            aggregate_emit_first_high: 20,
            evidence_json: None,
            collector: None,
            collector_pki: None,
            agent_name: None,
            spool_dir: PathBuf::from("/var/lib/vigil/spool"),
            spool_max_mib: 1024,
            spool_max_items: 100_000,
            ship_events: true,
            container_meta: true,
            runtime_state_root: PathBuf::from("/"),
        }
    }
}

impl AgentConfig {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        let cfg: Self = toml::from_str(&text)
            .with_context(|| format!("parsing config file {}", path.display()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values a TOML file or flags could get wrong.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.ring_buffer_bytes.is_power_of_two() && self.ring_buffer_bytes >= 4096,
            "ring_buffer_bytes must be a power of two of at least 4096, got {}",
            self.ring_buffer_bytes
        );
        anyhow::ensure!(self.poll_interval_ms > 0, "poll_interval_ms must be > 0");
        anyhow::ensure!(
            self.aggregate_emit_first >= 1
                && self.aggregate_emit_first_high >= 1
                && self.aggregate_window_secs >= 1,
            "aggregate_emit_first, aggregate_emit_first_high and aggregate_window_secs must be >= 1"
        );
        anyhow::ensure!(
            self.freeze.is_empty() || self.ring_buffer_bytes >= 16384,
            "ring_buffer_bytes must be >= 16384 while freeze is on (a frozen exec's record reserves 8320 bytes), got {}",
            self.ring_buffer_bytes
        );
        anyhow::ensure!(
            self.capture_budget_window_secs >= 1,
            "capture_budget_window_secs must be >= 1"
        );
        anyhow::ensure!(
            self.capture_deadline_ms >= 100,
            "capture_deadline_ms must be >= 100, got {}",
            self.capture_deadline_ms
        );
        anyhow::ensure!(
            (50..=60_000).contains(&self.freeze_release_ms),
            "freeze_release_ms must be between 50 and 60000, got {}",
            self.freeze_release_ms
        );
        anyhow::ensure!(self.max_processes >= 16, "max_processes must be >= 16");
        anyhow::ensure!(
            matches!(self.log_format.as_str(), "text" | "json"),
            "log_format must be \"text\" or \"json\", got {:?}",
            self.log_format
        );
        self.disabled_features()?;
        self.learn_duration()?;
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
        self.freeze_policy()?;
        self.deny_policy()?;
        self.capture_severity()?;
        self.contain_policy()?;
        anyhow::ensure!(
            self.freeze_names
                .iter()
                .all(|n| !n.is_empty() && n.len() < 16),
            "freeze_names entries must be 1 to 15 bytes"
        );
        Ok(())
    }

    /// `capture_min_severity` parsed.
    pub fn capture_severity(&self) -> anyhow::Result<crate::model::Severity> {
        use crate::model::Severity;
        Ok(match self.capture_min_severity.as_str() {
            "low" => Severity::Low,
            "medium" => Severity::Medium,
            "high" => Severity::High,
            "critical" => Severity::Critical,
            other => anyhow::bail!(
                "capture_min_severity must be low, medium, high or critical, got {other:?}"
            ),
        })
    }

    /// The containment policy; `None` when containment is off.
    pub fn contain_policy(&self) -> anyhow::Result<Option<crate::contain::Policy>> {
        use crate::model::Severity;
        let min = match self.contain_min_severity.as_str() {
            "off" => None,
            "low" => Some(Severity::Low),
            "medium" => Some(Severity::Medium),
            "high" => Some(Severity::High),
            "critical" => Some(Severity::Critical),
            other => anyhow::bail!(
                "contain_min_severity must be off, low, medium, high or critical, got {other:?}"
            ),
        };
        let action = crate::contain::Action::parse(&self.contain_action)?;
        Ok(crate::contain::Policy::new(
            &self.contain_rules,
            min,
            action,
            self.contain_dry_run,
        ))
    }

    /// The capture budget settings.
    pub fn capture_budget(&self) -> crate::budget::BudgetOptions {
        crate::budget::BudgetOptions {
            window: std::time::Duration::from_secs(self.capture_budget_window_secs),
            per_workload: self.capture_budget_per_workload,
            per_uid: self.capture_budget_per_uid,
            critical_per_workload: self.capture_budget_critical,
        }
    }

    /// `freeze` as kernel policy bits.
    pub fn freeze_policy(&self) -> anyhow::Result<u32> {
        policy_bits("freeze", &self.freeze)
    }

    /// `deny_exec` as kernel policy bits.
    pub fn deny_policy(&self) -> anyhow::Result<u32> {
        policy_bits("deny_exec", &self.deny_exec)
    }

    /// `learn` as a duration.
    pub fn learn_duration(&self) -> anyhow::Result<std::time::Duration> {
        humantime::parse_duration(&self.learn).map_err(|e| {
            anyhow::anyhow!(
                "learn = {:?} is not a duration (e.g. \"10m\"): {e}",
                self.learn
            )
        })
    }

    /// The `disable` list as features.
    pub fn disabled_features(&self) -> anyhow::Result<Vec<Feature>> {
        // Process hooks cannot be left off; the deny hooks follow their policies.
        const OPTIONAL: [Feature; 5] = [
            Feature::FileWrite,
            Feature::Chmod,
            Feature::Rename,
            Feature::Connect,
            Feature::Listen,
        ];
        self.disable
            .iter()
            .map(|s| {
                OPTIONAL.into_iter().find(|f| f.name() == s).ok_or_else(|| {
                    anyhow::anyhow!(
                        "unknown hook group {s:?} in disable (known: {}; process hooks cannot be disabled)",
                        OPTIONAL.map(Feature::name).join(", ")
                    )
                })
            })
            .collect()
    }
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

    #[test]
    fn full_file_parses_and_unknown_keys_are_refused() {
        let cfg: AgentConfig = toml::from_str(
            r#"
            events_json = "/var/log/vigil/events.jsonl"
            metrics_addr = "127.0.0.1:9108"
            poll_interval_ms = 5
            disable = ["rename"]
            "#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.poll_interval_ms, 5);
        assert_eq!(cfg.disabled_features().unwrap(), vec![Feature::Rename]);
        assert!(toml::from_str::<AgentConfig>("nonsense = 1").is_err());
        let bad = AgentConfig {
            ring_buffer_bytes: 1000,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = AgentConfig {
            disable: vec!["exec".into()],
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn default_round_trips() {
        let text = toml::to_string(&AgentConfig::default()).unwrap();
        assert_eq!(
            toml::from_str::<AgentConfig>(&text).unwrap(),
            AgentConfig::default()
        );
    }
}
