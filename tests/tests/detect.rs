//! Detection end to end: Sigma rules loaded from a directory (and reloaded
//! when it changes), evaluated on real kernel events.

use std::process::Command;
use std::time::Duration;

use vigil_tests::{marker, Agent};

fn sigma_rule(id: &str, marker: &str) -> String {
    format!(
        r#"title: Test marker process
id: {id}
status: test
logsource:
    product: linux
    category: process_creation
detection:
    sel:
        Image|endswith: '/true'
        CommandLine|contains: '{marker}'
    condition: sel
level: medium
tags:
    - attack.execution
    - attack.t1059
"#
    )
}

fn detections(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn wait_for_rule(path: &std::path::Path, rule: &str) -> Option<serde_json::Value> {
    for _ in 0..200 {
        if let Some(d) = detections(path).into_iter().find(|d| d["rule"] == rule) {
            return Some(d);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn sigma_rules_match_and_reload() {
    let rules = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let dets = out.path().join("detections.jsonl");
    let m1 = marker("sigma1");
    std::fs::write(
        rules.path().join("one.yml"),
        sigma_rule("vigil-test-0001", &m1),
    )
    .unwrap();
    let agent = Agent::start(&[
        "--rules-dir",
        &rules.path().to_string_lossy(),
        "--detections-json",
        &dets.to_string_lossy(),
    ]);
    Command::new("/bin/true").arg(&m1).status().unwrap();
    let d = wait_for_rule(&dets, "sigma:vigil-test-0001").expect("sigma detection");
    assert_eq!(d["rule_source"], "sigma");
    assert_eq!(d["mitre"][0], "T1059");
    assert_eq!(d["severity"], "medium");
    assert!(d["process"]["argv"].to_string().contains(&m1));

    // A rule added while running is picked up.
    let m2 = marker("sigma2");
    std::fs::write(
        rules.path().join("two.yml"),
        sigma_rule("vigil-test-0002", &m2),
    )
    .unwrap();
    let mut found = None;
    for _ in 0..20 {
        Command::new("/bin/true").arg(&m2).status().unwrap();
        if let Some(d) = (0..10).find_map(|_| {
            std::thread::sleep(Duration::from_millis(50));
            detections(&dets)
                .into_iter()
                .find(|d| d["rule"] == "sigma:vigil-test-0002")
        }) {
            found = Some(d);
            break;
        }
    }
    assert!(found.is_some(), "new rule file was not loaded");
    std::thread::sleep(Duration::from_millis(1200));
    let m = agent.metrics();
    assert!(agent.metric("vigil_sigma_rules") >= 2.0, "{m}");
}

#[test]
fn missing_rules_dir_is_a_clear_startup_error() {
    let out = Command::new(vigil_tests::agent_bin())
        .args(["--rules-dir", "/nonexistent/vigil-rules"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rules directory /nonexistent/vigil-rules does not exist"),
        "{err}"
    );
}
