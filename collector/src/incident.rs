//! Incidents: detections grouped by process tree and time, so that one
//! attack chain (a web app spawning a shell that downloads and runs a
//! miner) is one incident, not five.
//!
//! The rule: two detections of the same agent and workload belong to the
//! same incident when their process chains share a process and they are no
//! further apart in time than the window (10 minutes by default). A
//! detection's chain is the triggering process and its ancestors, cut below
//! the first supervisor (init, systemd, container shims, sshd, cron, ...)
//! and below a session's shell (a shell started by a supervisor or a
//! terminal multiplexer: a login shell, a container's entry script, a tmux
//! pane): those parent everything on the machine or everything a person
//! does, so sharing one says nothing. Two attacks and an analyst's own
//! commands from one login shell are three chains. The top of the chain is
//! the incident's root: where the suspicious chain starts.
//!
//! An incident is titled by its most severe detection; among equals, the
//! earliest (the cause, not its consequences).
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

/// Terminal multiplexers and session programs: a shell they start is a
/// person's session.
const SESSION_HOSTS: &[&str] = &["tmux", "screen", "su", "sudo", "script", "mosh-server"];

const SHELLS: &[&str] = &[
    "sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "fish", "tcsh", "csh",
];

fn in_system_dir(exe: &str) -> bool {
    SYSTEM_DIRS.iter().any(|d| exe.starts_with(d))
}

fn base(exe: &str) -> &str {
    exe.rsplit('/').next().unwrap_or(exe)
}

/// A shell running a session rather than a command: started by a
/// supervisor or a session host, with no `-c` command.
fn is_session_shell(exe: &str, argv: &[String], parent_pid: u32, parent_exe: &str) -> bool {
    let b = base(exe);
    let shell = in_system_dir(exe) && SHELLS.contains(&b.trim_start_matches('-'));
    let command = argv
        .iter()
        .skip(1)
        .any(|a| a.starts_with('-') && !a.starts_with("--") && a.contains('c'));
    shell
        && !command
        && (is_supervisor(parent_pid, parent_exe)
            || (in_system_dir(parent_exe) && SESSION_HOSTS.contains(&base(parent_exe))))
}

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
    for (i, a) in d.ancestry.iter().enumerate() {
        if is_supervisor(a.pid, &a.exe) || out.iter().any(|l| l.pid == a.pid) {
            break;
        }
        let session = d
            .ancestry
            .get(i + 1)
            .is_some_and(|p| is_session_shell(&a.exe, &a.argv, p.pid, &p.exe));
        if session {
            break;
        }
        out.push(ChainLink {
            pid: a.pid,
            exe: a.exe.clone(),
        });
    }
    out
}

/// Whether a detection of `severity` at `t` retitles an incident whose
/// most severe detection so far is `max_severity` and whose first is at
/// `first_ns`: a more severe one does, and an equally severe one that came
/// first (the cause of what followed).
pub fn retitles(severity: i32, t: i64, max_severity: i32, first_ns: i64) -> bool {
    severity > max_severity || (severity == max_severity && t < first_ns)
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
    bound_depth(&mut nodes, |n| &mut n.parent);
    let mut children: BTreeMap<Option<u32>, Vec<u32>> = BTreeMap::new();
    for (pid, n) in &nodes {
        let parent = n.parent.filter(|p| nodes.contains_key(p));
        children.entry(parent).or_default().push(*pid);
    }
    // Built bottom-up (no recursion: depth is bounded, but the walk need
    // not rely on it): children before their parent, deepest first.
    let mut order = Vec::with_capacity(nodes.len());
    let mut stack: Vec<u32> = children.get(&None).cloned().unwrap_or_default();
    while let Some(pid) = stack.pop() {
        order.push(pid);
        if let Some(c) = children.get(&Some(pid)) {
            stack.extend(c.iter().copied());
        }
    }
    let mut built: BTreeMap<u32, TreeNode> = BTreeMap::new();
    for pid in order.into_iter().rev() {
        let n = &nodes[&pid];
        let kids = children
            .get(&Some(pid))
            .map(|c| c.iter().filter_map(|p| built.remove(p)).collect())
            .unwrap_or_default();
        built.insert(
            pid,
            TreeNode {
                pid,
                exe: n.exe.clone(),
                argv: n.argv.clone(),
                rules: n.rules.clone(),
                children: kids,
            },
        );
    }
    children
        .get(&None)
        .map(|roots| roots.iter().filter_map(|p| built.remove(p)).collect())
        .unwrap_or_default()
}

/// Deepest a process is drawn below its incident's root: a deeper one
/// (only a hostile agent's chain of forks gets there) starts a tree of its
/// own, so every walk of a tree is bounded.
pub const MAX_TREE_DEPTH: usize = 128;

/// Breaks every cycle of parent links (pid reuse) and every chain deeper
/// than [`MAX_TREE_DEPTH`], by clearing a parent link. Iterative, linear
/// in the number of nodes.
fn bound_depth<T>(nodes: &mut BTreeMap<u32, T>, parent: impl Fn(&mut T) -> &mut Option<u32>) {
    use std::collections::{HashMap, HashSet};
    let pids: Vec<u32> = nodes.keys().copied().collect();
    let mut depth: HashMap<u32, usize> = HashMap::with_capacity(pids.len());
    let parent_of = |nodes: &mut BTreeMap<u32, T>, pid: u32| -> Option<u32> {
        let p = *parent(nodes.get_mut(&pid).expect("present"));
        p.filter(|p| *p != pid && nodes.contains_key(p))
    };
    for pid in pids {
        if depth.contains_key(&pid) {
            continue;
        }
        // Up from `pid` to a root, a node of known depth, or a cycle.
        let mut path = vec![pid];
        let mut on_path: HashSet<u32> = HashSet::from([pid]);
        let mut cur = parent_of(nodes, pid);
        let mut top = 0;
        while let Some(p) = cur {
            if let Some(d) = depth.get(&p) {
                top = d + 1;
                break;
            }
            if !on_path.insert(p) {
                // A cycle: the last node on the path points back into it.
                let last = *path.last().expect("non-empty");
                *parent(nodes.get_mut(&last).expect("present")) = None;
                break;
            }
            path.push(p);
            cur = parent_of(nodes, p);
        }
        // Down again, numbering; too deep starts over as a root.
        let mut d = top;
        for &q in path.iter().rev() {
            if d > MAX_TREE_DEPTH {
                *parent(nodes.get_mut(&q).expect("present")) = None;
                d = 0;
            }
            depth.insert(q, d);
            d += 1;
        }
    }
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
    fn chains_stop_below_a_session_shell_but_not_below_a_command_shell() {
        let login = |pid| Ancestor {
            pid,
            exe: "/usr/bin/bash".into(),
            argv: vec!["-bash".into()],
        };
        let under_login = |pid: u32, exe: &str, mid: Vec<Ancestor>| {
            let mut a = mid;
            a.extend([
                login(500),
                anc(499, "/usr/sbin/sshd"),
                anc(1, "/lib/systemd/systemd"),
            ]);
            det(pid, exe, "r", a)
        };
        // Two attacks and the analyst's CLI from one login shell: chains
        // share nothing.
        let a = under_login(
            610,
            "/usr/bin/curl",
            vec![anc(600, "/bin/sh"), anc(590, "/usr/bin/python3")],
        );
        let b = under_login(701, "/usr/bin/dash", vec![anc(700, "/usr/bin/wget")]);
        let cli = under_login(800, "/usr/local/bin/vigil", vec![]);
        let pids = |d: &Detection| chain(d).iter().map(|l| l.pid).collect::<Vec<_>>();
        assert_eq!(pids(&a), [610, 600, 590]);
        assert_eq!(pids(&b), [701, 700]);
        assert_eq!(pids(&cli), [800]);
        // A tmux pane's shell is a session too.
        let t = det(
            900,
            "/usr/bin/nc",
            "r",
            vec![
                anc(899, "/usr/bin/zsh"),
                anc(898, "/usr/bin/tmux"),
                anc(1, "/sbin/init"),
            ],
        );
        assert_eq!(pids(&t), [900]);
        // Near miss: a shell running a command for a server stays in the
        // chain (it is part of the attack).
        let web = det(
            960,
            "/usr/bin/curl",
            "r",
            vec![
                Ancestor {
                    pid: 950,
                    exe: "/bin/sh".into(),
                    argv: vec!["/bin/sh".into(), "-c".into(), "curl x".into()],
                },
                anc(940, "/usr/bin/node"),
                anc(1, "/sbin/init"),
            ],
        );
        assert_eq!(pids(&web), [960, 950, 940]);
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

    /// A hostile chain of 30,000 forks (each event's parent the one
    /// before) and a cycle: built without recursion, no deeper than
    /// MAX_TREE_DEPTH, every process kept.
    #[test]
    fn deep_chains_and_cycles_are_bounded() {
        fn depth(n: &TreeNode) -> usize {
            let mut max = 0;
            let mut stack = vec![(n, 1)];
            while let Some((n, d)) = stack.pop() {
                max = max.max(d);
                stack.extend(n.children.iter().map(|c| (c, d + 1)));
            }
            max
        }
        fn count(roots: &[TreeNode]) -> usize {
            let mut n = 0;
            let mut stack: Vec<&TreeNode> = roots.iter().collect();
            while let Some(t) = stack.pop() {
                n += 1;
                stack.extend(t.children.iter());
            }
            n
        }
        let d = StoredDetection {
            detection: Some(det(2, "/bin/sh", "r", vec![anc(1, "/usr/bin/node")])),
            ..Default::default()
        };
        let mut events: Vec<StoredEvent> = (3..30_003u32)
            .map(|pid| StoredEvent {
                event: Some(Event {
                    kind: "fork".into(),
                    pid,
                    ppid: pid - 1,
                    exe: "/bin/sh".into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect();
        // A cycle through the chain: 1's parent is the last fork.
        events.push(StoredEvent {
            event: Some(Event {
                kind: "exec".into(),
                pid: 1,
                ppid: 30_002,
                exe: "/usr/bin/node".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        let roots = build_tree(&[d], &events);
        assert_eq!(count(&roots), 30_002);
        assert!(roots.iter().all(|r| depth(r) <= MAX_TREE_DEPTH + 1));
    }
}
