//! Containment: opt-in response actions on a detection, by rule or by
//! severity (`contain_rules`, `contain_min_severity`): kill the process, or
//! its whole process group, or refuse its (and its children's) connects in
//! the kernel (`contain_action`). Off unless configured.
//!
//! Evidence comes first: a detection that asks for containment also asks
//! for a capture (within the capture budgets), and the capture kills the
//! process instead of resuming it, so it never runs another instruction
//! after its memory was taken. When no capture is taken (budget, queue,
//! capture off or failed), the process is killed at once. `deny_connect`
//! is applied at once (the `DENY_CONNECT` map, read by cgroup
//! connect4/connect6/sendmsg4/sendmsg6 programs attached only for it) and
//! the process runs on, captured like any other.
//!
//! With `contain_dry_run`, nothing is killed: every action is reported as
//! what would have been done. Every action, done or not, is a JSON line in
//! `actions_json`, a log line, and `vigil_containment_actions_total{action,
//! result}`.
//!
//! Invariants: signals go through a pidfd checked against the process's
//! start time, so a recycled pid is never hit; a process group is killed
//! only when it is not the agent's, not init's and not group 0 or 1; a
//! stand-in ancestor captured for a process already gone is never killed.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tracing::warn;

use crate::metrics::{ActionLabel, Metrics};
use crate::model::{Detection, Severity};

/// What containment does to a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// SIGKILL to the process.
    Kill,
    /// SIGKILL to its whole process group (a pipeline, a script and its
    /// children; a non-interactive shell shares its parent's group, so this
    /// can take the parent down too).
    KillGroup,
    /// The process keeps running (and can be examined) but its connects
    /// and unconnected sends, and those of its children, are refused in
    /// the kernel (cgroup connect4/connect6/sendmsg4/sendmsg6 hooks).
    DenyConnect,
}

impl Action {
    /// From the config's spelling.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "kill" => Ok(Action::Kill),
            "kill_group" => Ok(Action::KillGroup),
            "deny_connect" => Ok(Action::DenyConnect),
            other => anyhow::bail!(
                "contain_action must be \"kill\", \"kill_group\" or \"deny_connect\", got {other:?}"
            ),
        }
    }

    /// The config's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Kill => "kill",
            Action::KillGroup => "kill_group",
            Action::DenyConnect => "deny_connect",
        }
    }
}

/// Which detections are contained, and how.
#[derive(Clone, Debug)]
pub struct Policy {
    rules: HashSet<String>,
    min_severity: Option<Severity>,
    action: Action,
    dry_run: bool,
    /// Where other agents pin their freeze ledgers: a process known there
    /// (or running this agent's executable) is never contained.
    peer_pin_dir: Option<std::path::PathBuf>,
}

/// What containment decided for one event.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The rule that asked (the most severe matching detection's).
    pub rule: String,
    /// Its severity.
    pub severity: Severity,
    /// What to do.
    pub action: Action,
    /// Only report.
    pub dry_run: bool,
}

impl Policy {
    /// A policy; `None` when it can match nothing (containment off).
    pub fn new(
        rules: &[String],
        min_severity: Option<Severity>,
        action: Action,
        dry_run: bool,
    ) -> Option<Self> {
        if rules.is_empty() && min_severity.is_none() {
            return None;
        }
        Some(Self {
            rules: rules.iter().cloned().collect(),
            min_severity,
            action,
            dry_run,
            peer_pin_dir: None,
        })
    }

    /// Never contains another vigil agent: one known by its ledger pinned
    /// in `pin_dir` or by running this agent's executable (see
    /// [`crate::frozen::peer_agent`]). Two agents on a node (a package
    /// beside a DaemonSet, two versions during an upgrade) each see the
    /// other load its programs; neither may kill the other.
    pub fn sparing_peers(mut self, pin_dir: std::path::PathBuf) -> Self {
        self.peer_pin_dir = Some(pin_dir);
        self
    }

    /// Why `pid` (started at `start_ticks`; read from /proc when unknown)
    /// is never contained, if it is not: it is another vigil agent.
    pub fn spared(&self, pid: u32, start_ticks: Option<u64>) -> Option<String> {
        let dir = self.peer_pin_dir.as_deref()?;
        let start = start_ticks
            .or_else(|| crate::capture::procutil::start_time(pid as i32).ok())
            .unwrap_or(0);
        crate::frozen::peer_agent(dir, pid as i32, start).map(|why| {
            format!("process {pid} is another vigil agent ({why}): never contained by this one")
        })
    }

    /// What it does.
    pub fn action(&self) -> Action {
        self.action
    }

    /// Whether a detection of `rule` at `severity` asks for containment.
    pub fn asks(&self, rule: &str, severity: Severity) -> bool {
        self.rules.contains(rule) || self.min_severity.is_some_and(|m| severity >= m)
    }

    /// The decision for an event's detections: the most severe one that
    /// asks (the first of equals), if any.
    pub fn decide(&self, dets: &[Detection]) -> Option<Decision> {
        self.decide_by(dets.iter().map(|d| (d.rule.as_str(), d.severity)))
    }

    /// [`Policy::decide`] over (rule, severity) pairs.
    pub fn decide_by<'a>(
        &self,
        found: impl IntoIterator<Item = (&'a str, Severity)>,
    ) -> Option<Decision> {
        let (rule, severity) = found
            .into_iter()
            .enumerate()
            .filter(|(_, (r, s))| self.asks(r, *s))
            .max_by_key(|(i, (_, s))| (*s, std::cmp::Reverse(*i)))
            .map(|(_, f)| f)?;
        Some(Decision {
            rule: rule.to_string(),
            severity,
            action: self.action,
            dry_run: self.dry_run,
        })
    }
}

/// How an action ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Done.
    Done,
    /// Dry run: reported only.
    DryRun,
    /// The process was gone (or its pid recycled) before it could be hit.
    Gone,
    /// Refused by a safety rule (e.g. the agent's own process group).
    Refused,
    /// The signal failed.
    Failed,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::DryRun => "dry_run",
            Outcome::Gone => "gone",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }
}

/// One action as its JSON line.
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    /// When it was done (RFC 3339).
    pub time: String,
    /// The process.
    pub pid: u32,
    /// The rule that asked.
    pub rule: String,
    /// Its severity.
    pub severity: Severity,
    /// What was (or would have been) done.
    pub action: Action,
    /// How it ended.
    pub result: Outcome,
    /// The process group, for `kill_group`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process_group: Option<i32>,
    /// The evidence bundle taken before, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle_id: Option<String>,
    /// Why it failed or was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Record {
    /// A record of `d` on `pid` that ended as `result`.
    pub fn new(d: &Decision, pid: u32, result: Outcome) -> Self {
        Self {
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            pid,
            rule: d.rule.clone(),
            severity: d.severity,
            action: d.action,
            result,
            process_group: None,
            bundle_id: None,
            error: None,
        }
    }
}

/// Where action records go: a JSON lines file (optional), the log and the
/// metrics. Shared by the pipeline and the capture worker.
pub struct ActionLog {
    out: Option<Mutex<std::io::BufWriter<std::fs::File>>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for ActionLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActionLog")
            .field("to_file", &self.out.is_some())
            .finish()
    }
}

impl ActionLog {
    /// Appends to `path` (0600) when given.
    pub fn open(path: Option<&Path>, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Self>> {
        let out = match path {
            Some(p) => {
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    vigil_bundle::private::create_missing_dirs(dir)?;
                }
                Some(Mutex::new(std::io::BufWriter::new(
                    vigil_bundle::private::open_append(p).map_err(|e| {
                        anyhow::anyhow!("opening actions output {}: {e}", p.display())
                    })?,
                )))
            }
            None => None,
        };
        Ok(Arc::new(Self { out, metrics }))
    }

    /// Reports one action.
    pub fn record(&self, r: &Record) {
        self.metrics
            .containment_actions
            .get_or_create(&ActionLabel {
                action: r.action.as_str().into(),
                result: r.result.as_str().into(),
            })
            .inc();
        warn!(
            pid = r.pid,
            rule = %r.rule,
            action = r.action.as_str(),
            result = r.result.as_str(),
            error = r.error.as_deref().unwrap_or(""),
            "containment"
        );
        let Some(out) = &self.out else { return };
        let mut w = out.lock().unwrap_or_else(|e| e.into_inner());
        let res = serde_json::to_writer(&mut *w, r)
            .map_err(std::io::Error::other)
            .and_then(|()| w.write_all(b"\n"))
            .and_then(|()| w.flush());
        if let Err(e) = res {
            self.metrics.output_errors.inc();
            warn!(error = %e, "writing the actions output failed");
        }
    }
}

/// Whether `pid` is still the process that started at `start_ticks`.
fn same_process(pid: u32, start_ticks: Option<u64>) -> bool {
    start_ticks
        .is_some_and(|t| crate::capture::procutil::start_time(pid as i32).is_ok_and(|now| now == t))
}

/// The process group of `pid`, if it may be killed whole: `pid` is still
/// the process that started at `start_ticks` (checked after the group is
/// read, so a recycled pid never names a group), and the group is not 0
/// or 1, not init's, not the agent's.
pub fn killable_group(pid: u32, start_ticks: Option<u64>) -> Result<i32, String> {
    if start_ticks.is_none() {
        return Err(format!(
            "start time of {pid} unknown: its process group is not killed"
        ));
    }
    // SAFETY: getpgid has no memory-safety preconditions.
    let pgid = unsafe { libc::getpgid(pid as i32) };
    if pgid < 0 {
        return Err(format!(
            "process group of {pid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    if !same_process(pid, start_ticks) {
        return Err(format!(
            "{pid} is gone or another process now: its group is not killed"
        ));
    }
    // SAFETY: as above.
    let (mine, init) = unsafe { (libc::getpgid(0), libc::getpgid(1)) };
    if pgid <= 1 || pgid == mine || pgid == init {
        return Err(format!(
            "process group {pgid} is init's, the agent's or a system group: not killed"
        ));
    }
    Ok(pgid)
}

/// SIGKILL to process group `pgid`.
pub fn kill_group(pgid: i32) -> Result<(), String> {
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(-pgid, libc::SIGKILL) } == 0 {
        Ok(())
    } else {
        Err(format!(
            "killing process group {pgid}: {}",
            std::io::Error::last_os_error()
        ))
    }
}

/// Refuses `pid`'s connects from now on (and its children's), through the
/// kernel's deny list (`None`: the hooks could not be attached here).
pub fn deny_now(
    d: &Decision,
    pid: u32,
    start_ticks: Option<u64>,
    deny: Option<&crate::sensor::DenyList>,
) -> Record {
    if d.dry_run {
        return Record::new(d, pid, Outcome::DryRun);
    }
    let mut rec = Record::new(d, pid, Outcome::Done);
    let Some(list) = deny else {
        rec.result = Outcome::Failed;
        rec.error = Some("the connect refusal hooks are not attached on this kernel".into());
        return rec;
    };
    if let Err(e) = list.deny(pid) {
        rec.result = Outcome::Failed;
        rec.error = Some(e);
        return rec;
    }
    // Checked after the entry is in: a process that exits from now on has
    // it cleared by the kernel; one already gone (its pid free or reused)
    // must not leave it to whoever gets the pid.
    if !same_process(pid, start_ticks) {
        list.allow(pid);
        rec.result = Outcome::Gone;
    }
    rec
}

/// Carries out `d` on `pid` now (no capture holds it): the process if it is
/// still the one that started at `start_ticks`, or its group.
pub fn execute_now(d: &Decision, pid: u32, start_ticks: Option<u64>) -> Record {
    if d.dry_run {
        return Record::new(d, pid, Outcome::DryRun);
    }
    if d.action == Action::DenyConnect {
        // Applied by the pipeline, which holds the deny list; never a kill.
        let mut rec = Record::new(d, pid, Outcome::Failed);
        rec.error = Some("deny_connect is applied through the deny list".into());
        return rec;
    }
    let mut rec = Record::new(d, pid, Outcome::Done);
    if d.action == Action::KillGroup {
        match killable_group(pid, start_ticks) {
            Ok(pgid) => {
                rec.process_group = Some(pgid);
                // The process itself first (checked against its start
                // time), then the rest of its group.
                let _ =
                    crate::capture::freeze::signal_if_same(pid as i32, start_ticks, libc::SIGKILL);
                if let Err(e) = kill_group(pgid) {
                    rec.result = Outcome::Failed;
                    rec.error = Some(e);
                }
            }
            Err(e) => {
                rec.result = Outcome::Refused;
                rec.error = Some(e);
            }
        }
        return rec;
    }
    match crate::capture::freeze::signal_if_same(pid as i32, start_ticks, libc::SIGKILL) {
        Ok(true) => {}
        Ok(false) => rec.result = Outcome::Gone,
        Err(e) => {
            rec.result = Outcome::Failed;
            rec.error = Some(e.to_string());
        }
    }
    rec
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Another agent (its ledger pinned where this one pins) is spared;
    /// the same pid with another start time (recycled) is not, nor anyone
    /// when the policy spares no peers.
    #[test]
    fn another_agent_is_spared() {
        let pins = tempfile::tempdir().unwrap();
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = other.id();
        let start = crate::capture::procutil::start_time(pid as i32).unwrap();
        std::fs::write(pins.path().join(format!("frozen.{pid}.{start}")), "").unwrap();
        let p = Policy::new(&[], Some(Severity::High), Action::Kill, false).unwrap();
        assert_eq!(p.spared(pid, Some(start)), None);
        let p = p.sparing_peers(pins.path().to_path_buf());
        let why = p.spared(pid, Some(start)).expect("spared");
        assert!(why.contains("another vigil agent"), "{why}");
        assert_eq!(p.spared(pid, Some(start + 1)), None);
        // Its start time unknown (no event said it): read from /proc.
        assert!(p.spared(pid, None).is_some());
        other.kill().unwrap();
        other.wait().unwrap();
    }

    #[test]
    fn off_unless_configured() {
        assert!(Policy::new(&[], None, Action::Kill, false).is_none());
    }

    #[test]
    fn by_rule_or_severity_most_severe_first() {
        let p = Policy::new(
            &["reverse_shell".to_string()],
            Some(Severity::Critical),
            Action::Kill,
            false,
        )
        .unwrap();
        let dets = [
            ("exec_from_temp_dir", Severity::Medium),
            ("reverse_shell", Severity::High),
            ("miner", Severity::Critical),
        ];
        let d = p.decide_by(dets).unwrap();
        assert_eq!(d.rule, "miner");
        assert_eq!(
            p.decide_by(dets[..2].to_vec()).unwrap().rule,
            "reverse_shell"
        );
        // A near miss: high, but neither the rule nor critical.
        assert!(p.decide_by([("masquerading", Severity::High)]).is_none());
    }

    #[test]
    fn a_dry_run_touches_nothing() {
        let d = Decision {
            rule: "r".into(),
            severity: Severity::High,
            action: Action::Kill,
            dry_run: true,
        };
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let rec = execute_now(&d, child.id(), None);
        assert_eq!(rec.result, Outcome::DryRun);
        assert!(child.try_wait().unwrap().is_none(), "still running");
        let rec = execute_now(
            &Decision {
                dry_run: false,
                ..d
            },
            child.id(),
            None,
        );
        assert_eq!(rec.result, Outcome::Done);
        let st = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn a_recycled_pid_is_not_hit() {
        let d = Decision {
            rule: "r".into(),
            severity: Severity::High,
            action: Action::Kill,
            dry_run: false,
        };
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let start: u64 = after.split_whitespace().nth(19).unwrap().parse().unwrap();
        let rec = execute_now(&d, child.id(), Some(start + 1));
        assert_eq!(rec.result, Outcome::Gone);
        assert!(child.try_wait().unwrap().is_none());
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn deny_connect_without_its_hooks_fails_clearly() {
        assert_eq!(Action::parse("deny_connect").unwrap(), Action::DenyConnect);
        assert!(Action::parse("quarantine").is_err());
        let d = Decision {
            rule: "r".into(),
            severity: Severity::High,
            action: Action::DenyConnect,
            dry_run: false,
        };
        let rec = deny_now(&d, std::process::id(), None, None);
        assert_eq!(rec.result, Outcome::Failed);
        assert!(rec.error.unwrap().contains("not attached"));
        // Never a kill, whoever asks.
        assert_eq!(execute_now(&d, 1, None).result, Outcome::Failed);
    }

    #[test]
    fn the_agents_own_group_is_never_killed() {
        let me = std::process::id();
        let start = crate::capture::procutil::start_time(me as i32).unwrap();
        assert!(killable_group(me, Some(start)).is_err());
        // Nor any group when the process cannot be told from a newer one.
        let mut child = std::process::Command::new("setsid")
            .args(["sleep", "5"])
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        let cs = crate::capture::procutil::start_time(child.id() as i32).unwrap();
        assert!(killable_group(child.id(), None).is_err());
        assert!(killable_group(child.id(), Some(cs + 1)).is_err());
        assert_eq!(killable_group(child.id(), Some(cs)), Ok(child.id() as i32));
        let _ = child.kill();
        let _ = child.wait();
    }
}
