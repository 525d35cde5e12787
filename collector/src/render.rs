//! How incidents, detections and evidence look to analysts: text tables,
//! the process tree as an indented ASCII tree, the timeline, and the JSON
//! documents of `--json`. Shared by the `vigil` CLI and (later) the web UI.

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use serde_json::{json, Value};
use vigil_proto::{
    EvidenceInfo, IncidentDetail, IncidentSummary, Severity, StoredDetection, StoredEvent,
};

use crate::incident::{build_tree, TreeNode};

/// RFC 3339 UTC with nanoseconds; empty for 0.
pub fn time_nanos(ns: i64) -> String {
    if ns <= 0 {
        return String::new();
    }
    humantime::format_rfc3339_nanos(UNIX_EPOCH + Duration::from_nanos(ns as u64)).to_string()
}

/// RFC 3339 UTC with seconds; empty for 0.
pub fn time_secs(ns: i64) -> String {
    if ns <= 0 {
        return String::new();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_nanos(ns as u64)).to_string()
}

/// The severity label of a wire value.
pub fn severity(v: i32) -> &'static str {
    Severity::try_from(v)
        .unwrap_or(Severity::Unspecified)
        .label()
}

/// Bytes as B, KiB, MiB, GiB.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A command line for display: arguments with spaces or quotes are quoted;
/// the whole is cut at `max` characters.
pub fn command_line(argv: &[String], max: usize) -> String {
    let mut s = String::new();
    for (i, a) in argv.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        if a.is_empty() || a.contains([' ', '"', '\'', '\t']) {
            s.push_str(&format!("{a:?}"));
        } else {
            s.push_str(a);
        }
    }
    // Control and bidirectional characters must not reach the terminal.
    let s = clean(&s);
    if s.chars().count() > max {
        let mut cut: String = s.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    } else {
        s
    }
}

/// `s` safe to print to a terminal: every control character (escape
/// sequences, carriage returns, bells, C1 controls such as CSI) and every
/// bidirectional formatting character (which can make a terminal show
/// text in another order than it is) becomes `?`. Everything an agent sent
/// (rule names, paths, manifest fields, errors quoting them) goes through
/// this before it reaches a terminal.
pub fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if unsafe_for_terminal(c) { '?' } else { c })
        .collect()
}

/// Control characters and bidirectional formatting characters.
fn unsafe_for_terminal(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Pretty JSON of `v` safe to print to a terminal and still the same JSON:
/// serde escapes C0 controls in strings; DEL, C1 controls and bidirectional
/// formatting characters (which can only be inside strings) are escaped
/// here as `\uXXXX`.
pub fn terminal_json(v: &Value) -> String {
    let text = serde_json::to_string_pretty(v).unwrap_or_default();
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c != '\n' && unsafe_for_terminal(c) {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Left-aligned columns separated by two spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let n = cells.len();
        for (i, c) in cells.into_iter().enumerate() {
            if i + 1 == n {
                out.push_str(&c);
            } else {
                let pad = widths[i] - c.chars().count();
                out.push_str(&c);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push('\n');
    };
    line(header.iter().map(|h| h.to_string()).collect(), &mut out);
    for r in rows {
        line(r.iter().map(|c| clean(c)).collect(), &mut out);
    }
    out
}

/// `vigil incidents list`.
pub fn incidents_table(incidents: &[IncidentSummary]) -> String {
    let rows: Vec<Vec<String>> = incidents
        .iter()
        .map(|i| {
            vec![
                i.id.to_string(),
                time_secs(i.last_seen_unix_nanos),
                severity(i.max_severity).to_string(),
                i.detection_count.to_string(),
                i.agent.clone(),
                i.workload_key.clone(),
                command_line(std::slice::from_ref(&i.title), 80),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "LAST SEEN",
            "SEVERITY",
            "DETECTIONS",
            "AGENT",
            "WORKLOAD",
            "TITLE",
        ],
        &rows,
    )
}

/// `vigil detections list`.
pub fn detections_table(detections: &[StoredDetection]) -> String {
    let rows: Vec<Vec<String>> = detections
        .iter()
        .filter_map(|s| s.detection.as_ref().map(|d| (s, d)))
        .map(|(s, d)| {
            vec![
                s.id.to_string(),
                time_secs(d.time_unix_nanos),
                severity(d.severity).to_string(),
                d.rule.clone(),
                s.incident_id.to_string(),
                s.agent.clone(),
                d.pid.to_string(),
                command_line(std::slice::from_ref(&d.summary), 80),
            ]
        })
        .collect();
    table(
        &[
            "ID", "TIME", "SEVERITY", "RULE", "INCIDENT", "AGENT", "PID", "SUMMARY",
        ],
        &rows,
    )
}

/// The process tree as an indented ASCII tree.
pub fn tree_text(roots: &[TreeNode]) -> String {
    fn node(n: &TreeNode, prefix: &str, last: bool, top: bool, out: &mut String) {
        let label = {
            let cmd = if n.argv.is_empty() {
                clean(&n.exe)
            } else {
                command_line(&n.argv, 100)
            };
            let exe = if !n.argv.is_empty() && n.argv[0] != n.exe && !n.exe.is_empty() {
                format!(" ({})", clean(&n.exe))
            } else {
                String::new()
            };
            let rules = if n.rules.is_empty() {
                String::new()
            } else {
                format!("  <- {}", clean(&n.rules.join(", ")))
            };
            format!("{cmd}{exe}  [pid {}]{rules}", n.pid)
        };
        let (branch, next) = if top {
            ("", String::new())
        } else if last {
            ("`-- ", format!("{prefix}    "))
        } else {
            ("|-- ", format!("{prefix}|   "))
        };
        let _ = writeln!(out, "{prefix}{branch}{label}");
        for (i, c) in n.children.iter().enumerate() {
            node(c, &next, i + 1 == n.children.len(), false, out);
        }
    }
    let mut out = String::new();
    for r in roots {
        node(r, "", true, true, &mut out);
    }
    out
}

/// One line of the merged timeline.
struct TimelineEntry {
    time: i64,
    text: String,
}

/// Detections and events, oldest first; events cut at `max_events`.
pub fn timeline_text(
    detections: &[StoredDetection],
    events: &[StoredEvent],
    max_events: usize,
) -> String {
    let mut entries: Vec<TimelineEntry> = Vec::new();
    for d in detections.iter().filter_map(|s| s.detection.as_ref()) {
        entries.push(TimelineEntry {
            time: d.time_unix_nanos,
            text: format!(
                "DETECTION {} {}  pid {}  {}",
                severity(d.severity).to_uppercase(),
                clean(&d.rule),
                d.pid,
                clean(&d.summary)
            ),
        });
    }
    let shown = events.len().min(max_events);
    for e in events
        .iter()
        .take(max_events)
        .filter_map(|s| s.event.as_ref())
    {
        entries.push(TimelineEntry {
            time: e.time_unix_nanos,
            text: format!(
                "{:<9} pid {}  ppid {}  {}",
                clean(&e.kind),
                e.pid,
                e.ppid,
                if e.argv.is_empty() {
                    clean(&e.exe)
                } else {
                    command_line(&e.argv, 100)
                }
            ),
        });
    }
    entries.sort_by_key(|e| e.time);
    let mut out = String::new();
    for e in &entries {
        let _ = writeln!(out, "{}  {}", time_nanos(e.time), e.text);
    }
    if events.len() > shown {
        let _ = writeln!(
            out,
            "... {} more events (--all to show them)",
            events.len() - shown
        );
    }
    out
}

/// What the agent learned of a detection's container from its runtime
/// (pod, container name, image and digest), as one line; `None` when the
/// detection names no container.
pub fn container_identity(detection_json: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(detection_json).ok()?;
    let w = &v["process"]["workload"];
    let field = |k: &str| w[k].as_str().filter(|s| !s.is_empty());
    let mut parts = Vec::new();
    if let Some(pod) = field("pod_name") {
        let ns = field("pod_namespace").unwrap_or("?");
        parts.push(format!("pod {ns}/{pod}"));
    }
    if let Some(c) = field("container_name") {
        parts.push(format!("container {c}"));
    }
    if let Some(img) = field("image") {
        match field("image_digest") {
            Some(d) => parts.push(format!("image {img} ({d})")),
            None => parts.push(format!("image {img}")),
        }
    }
    (!parts.is_empty()).then(|| parts.join(" · "))
}

/// The container identity of an incident's first detection that names one.
pub fn incident_container(d: &IncidentDetail) -> Option<String> {
    d.detections
        .iter()
        .filter_map(|s| s.detection.as_ref())
        .find_map(|det| container_identity(&det.json))
}

/// `vigil incidents show`.
pub fn incident_text(d: &IncidentDetail, max_events: usize) -> String {
    let mut out = String::new();
    let Some(i) = &d.incident else {
        return out;
    };
    let _ = writeln!(out, "Incident {}: {}", i.id, clean(&i.title));
    let span =
        Duration::from_nanos((i.last_seen_unix_nanos - i.first_seen_unix_nanos).max(0) as u64);
    let span = humantime::format_duration(Duration::from_secs(span.as_secs())).to_string();
    for (k, v) in [
        ("severity", severity(i.max_severity).to_string()),
        ("agent", clean(&i.agent)),
        ("workload", clean(&i.workload_key)),
        (
            "container",
            incident_container(d).map(|c| clean(&c)).unwrap_or_default(),
        ),
        (
            "root",
            format!("{} (pid {})", clean(&i.root_exe), i.root_pid),
        ),
        (
            "seen",
            format!(
                "{} .. {} ({span})",
                time_secs(i.first_seen_unix_nanos),
                time_secs(i.last_seen_unix_nanos)
            ),
        ),
        ("detections", i.detection_count.to_string()),
        ("rules", clean(&i.rules.join(", "))),
        ("mitre", clean(&i.mitre.join(", "))),
    ] {
        if !v.is_empty() || k != "container" {
            let _ = writeln!(out, "  {k:<10}  {v}");
        }
    }
    let _ = writeln!(out, "\nProcess tree");
    out.push_str(&tree_text(&build_tree(&d.detections, &d.events)));
    let _ = writeln!(out, "\nTimeline");
    out.push_str(&timeline_text(&d.detections, &d.events, max_events));
    let _ = writeln!(out, "\nEvidence");
    if d.evidence.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for e in &d.evidence {
        if e.stored_unix_nanos == 0 {
            let _ = writeln!(out, "  {}  (not uploaded yet)", e.bundle_id);
        } else {
            let _ = writeln!(
                out,
                "  {}  {}  from {}  stored {}  {}{}",
                e.bundle_id,
                bytes(e.size),
                clean(&e.agent),
                time_secs(e.stored_unix_nanos),
                clean(&e.label),
                provenance(e)
            );
        }
    }
    out
}

/// JSON of an incident summary.
pub fn incident_summary_json(i: &IncidentSummary) -> Value {
    json!({
        "id": i.id,
        "agent": i.agent,
        "workload": i.workload_key,
        "root": {"pid": i.root_pid, "exe": i.root_exe},
        "first_seen": time_nanos(i.first_seen_unix_nanos),
        "last_seen": time_nanos(i.last_seen_unix_nanos),
        "severity": severity(i.max_severity),
        "detection_count": i.detection_count,
        "rules": i.rules,
        "mitre": i.mitre,
        "title": i.title,
    })
}

/// JSON of a stored detection: the agent's document under `detection`.
pub fn detection_json(s: &StoredDetection) -> Value {
    let doc = s
        .detection
        .as_ref()
        .map(|d| serde_json::from_str::<Value>(&d.json).unwrap_or(Value::String(d.json.clone())))
        .unwrap_or(Value::Null);
    json!({
        "id": s.id,
        "agent": s.agent,
        "incident_id": s.incident_id,
        "received": time_nanos(s.received_unix_nanos),
        "detection": doc,
    })
}

/// What the manifest says of a bundle, for a line: `  pid 5 (web_shell),
/// chain #3 linked`; empty when unknown.
/// With the bundle's origin: `signed`, or `UNSIGNED` (an agent before
/// signatures) and the agent id its manifest claims when that is not the
/// uploader.
pub fn provenance(e: &EvidenceInfo) -> String {
    if e.seq == 0 {
        return String::new();
    }
    let origin = match e.origin.as_str() {
        "signed" => ", signed".to_string(),
        "unsigned" if e.manifest_agent != e.agent => format!(
            ", UNSIGNED (manifest names agent {})",
            clean(&e.manifest_agent)
        ),
        "unsigned" => ", UNSIGNED".to_string(),
        _ => String::new(),
    };
    let commitment = match e.commitment.as_str() {
        "contradicted" => ", CONTRADICTS ITS COMMITMENT",
        "committed" => ", committed",
        _ => "",
    };
    format!(
        "  pid {} ({}), chain #{} {}{origin}{commitment}",
        e.pid,
        clean(&e.rule),
        e.seq,
        clean(&e.chain)
    )
}

/// JSON of an evidence record.
pub fn evidence_json(e: &EvidenceInfo) -> Value {
    json!({
        "bundle_id": e.bundle_id,
        "agent": e.agent,
        "size": e.size,
        "stored": time_nanos(e.stored_unix_nanos),
        "label": e.label,
        "uploaded": e.stored_unix_nanos != 0,
        "pid": e.pid,
        "rule": e.rule,
        "detection_time": time_nanos(e.detection_unix_nanos),
        "seq": e.seq,
        "prev_bundle_id": e.prev_bundle_id,
        "chain": e.chain,
        "manifest_agent": e.manifest_agent,
        "origin": e.origin,
        "commitment": e.commitment,
        "receipt": e.receipt,
    })
}

fn tree_json(n: &TreeNode) -> Value {
    json!({
        "pid": n.pid,
        "exe": n.exe,
        "argv": n.argv,
        "rules": n.rules,
        "children": n.children.iter().map(tree_json).collect::<Vec<_>>(),
    })
}

/// JSON of an incident with its tree, detections, events and evidence.
pub fn incident_json(d: &IncidentDetail) -> Value {
    json!({
        "incident": d.incident.as_ref().map(incident_summary_json),
        "tree": build_tree(&d.detections, &d.events).iter().map(tree_json).collect::<Vec<_>>(),
        "detections": d.detections.iter().map(detection_json).collect::<Vec<_>>(),
        "events": d.events.iter().filter_map(|e| e.event.as_ref()).map(|e| {
            serde_json::from_str::<Value>(&e.json).unwrap_or(Value::String(e.json.clone()))
        }).collect::<Vec<_>>(),
        "evidence": d.evidence.iter().map(evidence_json).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn terminal_text_and_json_carry_no_controls() {
        let evil = "a\u{1b}]0;x\u{7}\u{9b}31m\u{7f}\u{202e}gpj.exe\u{2066}";
        assert_eq!(super::clean(evil), "a?]0;x??31m??gpj.exe?");
        let v = serde_json::json!({ "rule": evil, "n": 1 });
        let text = super::terminal_json(&v);
        assert!(
            !text
                .chars()
                .any(|c| c != '\n' && super::unsafe_for_terminal(c)),
            "{text:?}"
        );
        // Still the same JSON.
        assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap(), v);
    }

    use super::*;

    #[test]
    fn container_identity_from_the_detection() {
        let j = r#"{"process":{"workload":{"kind":"pod","pod_name":"shop-1","pod_namespace":"prod",
            "container_name":"web","image":"reg.example/web:2","image_digest":"sha256:ab"}}}"#;
        assert_eq!(
            container_identity(j).as_deref(),
            Some("pod prod/shop-1 · container web · image reg.example/web:2 (sha256:ab)")
        );
        let host = r#"{"process":{"workload":{"kind":"host","cgroup":"/"}}}"#;
        assert_eq!(container_identity(host), None);
        assert_eq!(container_identity("not json"), None);
    }

    fn n(pid: u32, argv: &[&str], rules: &[&str], children: Vec<TreeNode>) -> TreeNode {
        TreeNode {
            pid,
            exe: argv[0].to_string(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            rules: rules.iter().map(|s| s.to_string()).collect(),
            children,
        }
    }

    #[test]
    fn ascii_tree() {
        let t = n(
            100,
            &["/usr/bin/node", "app.js"],
            &[],
            vec![n(
                200,
                &["/bin/sh", "-c", "curl x | sh"],
                &["web_shell"],
                vec![
                    n(301, &["/usr/bin/curl", "x"], &["downloader"], vec![]),
                    n(
                        302,
                        &["/tmp/xmrig"],
                        &["miner", "tmp_exec"],
                        vec![n(400, &["/bin/id"], &[], vec![])],
                    ),
                ],
            )],
        );
        let expected = "\
/usr/bin/node app.js  [pid 100]
`-- /bin/sh -c \"curl x | sh\"  [pid 200]  <- web_shell
    |-- /usr/bin/curl x  [pid 301]  <- downloader
    `-- /tmp/xmrig  [pid 302]  <- miner, tmp_exec
        `-- /bin/id  [pid 400]
";
        assert_eq!(tree_text(&[t]), expected);
    }

    #[test]
    fn command_lines_are_safe_and_bounded() {
        let argv = vec!["sh".to_string(), "-c".into(), "echo \x1b[31mred".into()];
        let s = command_line(&argv, 100);
        assert!(!s.contains('\x1b'), "{s}");
        assert_eq!(command_line(&["x".repeat(50)], 10).chars().count(), 10);
    }

    #[test]
    fn units_and_times() {
        assert_eq!(bytes(10), "10 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(time_secs(1_795_702_108_972_144_046), "2026-11-26T14:08:28Z");
        assert_eq!(time_nanos(0), "");
    }

    #[test]
    fn tables_align() {
        let t = table(&["A", "LONG"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    LONG\nxyz  1\n");
    }
}
