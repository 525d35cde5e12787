//! Incidents: detections grouped by process tree and time, so that one
//! attack chain (a web app spawning a shell that downloads and runs a
//! miner) is one incident, not five.
//!
//! The rule: two detections of the same agent and workload belong to the
//! same incident when their process chains share a process and they are no
//! further apart in time than the window (10 minutes by default). A
//! detection's chain is the triggering process and its ancestors, cut below
//! the first supervisor (init, systemd, container shims, sshd, cron, ...):
//! those parent everything on the machine, so sharing one says nothing.
//! The top of the chain is the incident's root.
//!
//! This module holds the pure logic (chains, trees); the store applies it
//! inside its write transaction.

use std::collections::BTreeMap;

use vigil_proto::{Detection, StoredDetection, StoredEvent};

/// Executables (basenames, when installed in a system directory) that
/// supervise unrelated process trees; a chain stops below them.
pub const SUPERVISORS: &[&str] = &[
    "init",
    "systemd",
    "containerd-shim",
    "containerd-shim-runc-v1",
    "containerd-shim-runc-v2",
    "containerd-shim-runsc-v1",
    "conmon",
    "runc",
    "crun",
    "tini",
    "docker-init",
    "dumb-init",
    "sshd",
    "sshd-session",
    "login",
    "agetty",
    "cron",
    "crond",
    "atd",
    "kthreadd",
];

const SYSTEM_DIRS: &[&str] = &["/usr/", "/bin/", "/sbin/", "/lib/", "/lib64/", "/opt/"];

/// How detections are grouped.
#[derive(Clone, Debug)]
pub struct Grouping {
    /// Maximum time between two detections of one incident, in nanoseconds.
    pub window_ns: i64,
}

impl Default for Grouping {
    fn default() -> Self {
        Grouping {
            window_ns: 600 * 1_000_000_000,
        }
    }
}

/// One process of a chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainLink {
    /// Process id.
    pub pid: u32,
    /// Executable path.
    pub exe: String,
}

/// Whether `exe` is a supervisor installed in a system directory (a
/// `/tmp/sshd` is not: it is more likely the attack).
pub fn is_supervisor(pid: u32, exe: &str) -> bool {
    if pid <= 2 {
        return true;
    }
    let base = exe.rsplit('/').next().unwrap_or(exe);
    SYSTEM_DIRS.iter().any(|d| exe.starts_with(d))
        && (SUPERVISORS.contains(&base) || base.starts_with("containerd-shim"))
}

/// The chain of a detection: the triggering process, then its ancestors up
/// to (not including) the first supervisor. Never empty.
pub fn chain(d: &Detection) -> Vec<ChainLink> {
    let mut out = vec![ChainLink {
        pid: d.pid,
        exe: d.exe.clone(),
    }];
    for a in &d.ancestry {
        if is_supervisor(a.pid, &a.exe) || out.iter().any(|l| l.pid == a.pid) {
            break;
        }
        out.push(ChainLink {
            pid: a.pid,
            exe: a.exe.clone(),
        });
    }
    out
}

/// A node of an incident's process tree.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TreeNode {
    /// Process id.
    pub pid: u32,
    /// Executable path (the latest seen).
    pub exe: String,
    /// Command line (the latest seen).
    pub argv: Vec<String>,
    /// Rules that fired on this process.
    pub rules: Vec<String>,
    /// Children, by pid.
    pub children: Vec<TreeNode>,
}

/// Builds the process tree of an incident from its detections' chains and
/// its events (exec and fork events add processes the detections did not
/// name). Roots are the tops of the chains, normally one: the incident's
/// root.
pub fn build_tree(detections: &[StoredDetection], events: &[StoredEvent]) -> Vec<TreeNode> {
    #[derive(Default)]
    struct Info {
        exe: String,
        argv: Vec<String>,
        rules: Vec<String>,
        parent: Option<u32>,
    }
    let mut nodes: BTreeMap<u32, Info> = BTreeMap::new();
    fn add(
        nodes: &mut BTreeMap<u32, Info>,
        pid: u32,
        exe: &str,
        argv: &[String],
        parent: Option<u32>,
    ) {
        let n = nodes.entry(pid).or_default();
        if !exe.is_empty() {
            n.exe = exe.to_string();
        }
        if !argv.is_empty() {
            n.argv = argv.to_vec();
        }
        if parent.is_some() && parent != Some(pid) {
            n.parent = parent;
        }
    }
    for d in detections.iter().filter_map(|s| s.detection.as_ref()) {
        let links = chain(d);
        // Ancestors first so the subject's own values win.
        for (i, link) in links.iter().enumerate().skip(1).rev() {
            let argv = d
                .ancestry
                .get(i - 1)
                .map(|a| a.argv.clone())
                .unwrap_or_default();
            add(
                &mut nodes,
                link.pid,
                &link.exe,
                &argv,
                links.get(i + 1).map(|l| l.pid),
            );
        }
        add(
            &mut nodes,
            d.pid,
            &d.exe,
            &d.argv,
            links.get(1).map(|l| l.pid),
        );
    }
    for e in events.iter().filter_map(|s| s.event.as_ref()) {
        if matches!(e.kind.as_str(), "exec" | "fork")
            && (nodes.contains_key(&e.ppid) || nodes.contains_key(&e.pid))
        {
            let parent = (e.ppid != 0).then_some(e.ppid);
            let parent = parent.filter(|p| nodes.contains_key(p));
            add(&mut nodes, e.pid, &e.exe, &e.argv, parent);
        }
    }
    for d in detections.iter().filter_map(|s| s.detection.as_ref()) {
        if let Some(n) = nodes.get_mut(&d.pid) {
            if !n.rules.contains(&d.rule) {
                n.rules.push(d.rule.clone());
            }
        }
    }
    // Break any cycle (pid reuse) by refusing parents that lead back.
    let pids: Vec<u32> = nodes.keys().copied().collect();
    for pid in pids {
        let mut seen = vec![pid];
        let mut cur = nodes[&pid].parent;
        while let Some(p) = cur {
            if seen.contains(&p) {
                nodes.get_mut(&pid).expect("present").parent = None;
                break;
            }
            seen.push(p);
            cur = nodes.get(&p).and_then(|n| n.parent);
        }
    }
    let mut children: BTreeMap<Option<u32>, Vec<u32>> = BTreeMap::new();
    for (pid, n) in &nodes {
        let parent = n.parent.filter(|p| nodes.contains_key(p));
        children.entry(parent).or_default().push(*pid);
    }
    fn build(
        pid: u32,
        nodes: &BTreeMap<u32, Info>,
        children: &BTreeMap<Option<u32>, Vec<u32>>,
    ) -> TreeNode {
        let n = &nodes[&pid];
        TreeNode {
            pid,
            exe: n.exe.clone(),
            argv: n.argv.clone(),
            rules: n.rules.clone(),
            children: children
                .get(&Some(pid))
                .map(|c| c.iter().map(|p| build(*p, nodes, children)).collect())
                .unwrap_or_default(),
        }
    }
    children
        .get(&None)
        .map(|roots| roots.iter().map(|p| build(*p, &nodes, &children)).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_proto::{Ancestor, Event};

    fn anc(pid: u32, exe: &str) -> Ancestor {
        Ancestor {
            pid,
            exe: exe.into(),
            argv: vec![exe.rsplit('/').next().unwrap().into()],
        }
    }

    fn det(pid: u32, exe: &str, rule: &str, ancestry: Vec<Ancestor>) -> Detection {
        Detection {
            pid,
            exe: exe.into(),
            rule: rule.into(),
            argv: vec![exe.into()],
            ancestry,
            ..Default::default()
        }
    }

    #[test]
    fn chain_stops_at_supervisors() {
        let d = det(
            300,
            "/usr/bin/curl",
            "r",
            vec![
                anc(200, "/bin/sh"),
                anc(100, "/usr/bin/node"),
                anc(50, "/usr/bin/containerd-shim-runc-v2"),
                anc(1, "/sbin/init"),
            ],
        );
        let pids: Vec<u32> = chain(&d).iter().map(|l| l.pid).collect();
        assert_eq!(pids, vec![300, 200, 100]);

        let ssh = det(
            10,
            "/usr/bin/bash",
            "r",
            vec![
                anc(9, "/usr/sbin/sshd"),
                anc(8, "/usr/sbin/sshd"),
                anc(1, "/lib/systemd/systemd"),
            ],
        );
        assert_eq!(chain(&ssh).len(), 1);

        // A fake sshd outside system dirs is not a supervisor.
        let fake = det(
            10,
            "/usr/bin/id",
            "r",
            vec![anc(9, "/tmp/sshd"), anc(1, "/sbin/init")],
        );
        assert_eq!(chain(&fake).len(), 2);
        // The subject is always in its chain, even a supervisor name.
        assert_eq!(chain(&det(1, "/sbin/init", "r", vec![])).len(), 1);
    }

    #[test]
    fn tree_from_chains_and_events() {
        let s = |d: Detection| StoredDetection {
            detection: Some(d),
            ..Default::default()
        };
        let shell = det(
            200,
            "/bin/sh",
            "web_shell",
            vec![anc(100, "/usr/bin/node"), anc(1, "/sbin/init")],
        );
        let curl = det(
            300,
            "/usr/bin/curl",
            "download",
            vec![
                anc(200, "/bin/sh"),
                anc(100, "/usr/bin/node"),
                anc(1, "/sbin/init"),
            ],
        );
        let ev = StoredEvent {
            event: Some(Event {
                kind: "exec".into(),
                pid: 301,
                ppid: 200,
                exe: "/tmp/xmrig".into(),
                argv: vec!["xmrig".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let tree = build_tree(&[s(shell), s(curl)], &[ev]);
        assert_eq!(tree.len(), 1);
        let root = &tree[0];
        assert_eq!((root.pid, root.exe.as_str()), (100, "/usr/bin/node"));
        assert_eq!(root.argv, vec!["node"]);
        assert_eq!(root.children.len(), 1);
        let sh = &root.children[0];
        assert_eq!(sh.rules, vec!["web_shell"]);
        let kids: Vec<u32> = sh.children.iter().map(|c| c.pid).collect();
        assert_eq!(kids, vec![300, 301]);
        assert_eq!(sh.children[0].rules, vec!["download"]);
    }
}
