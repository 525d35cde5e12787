//! Behaviour every [`Store`] must have; each backend runs these against a
//! fresh, empty store (see [`conformance_tests`]).

use vigil_proto::{
    Ancestor, Detection, Event, EvidenceInfo, ListDetectionsRequest, ListIncidentsRequest,
    Severity, StoredDetection,
};

use super::{BatchOutcome, Store};

const SEC: i64 = 1_000_000_000;
const T0: i64 = 1_800_000_000 * SEC;

fn anc(pid: u32, exe: &str) -> Ancestor {
    Ancestor {
        pid,
        exe: exe.into(),
        argv: vec![exe.into()],
    }
}

fn det(
    t: i64,
    pid: u32,
    exe: &str,
    rule: &str,
    sev: Severity,
    ancestry: Vec<Ancestor>,
) -> Detection {
    Detection {
        time_unix_nanos: t,
        rule: rule.into(),
        severity: sev as i32,
        mitre: vec!["T1059".into()],
        summary: format!("{rule} on {exe}"),
        pid,
        exe: exe.into(),
        argv: vec![exe.into(), "-x".into()],
        workload_key: "container:abc".into(),
        ancestry,
        json: "{}".into(),
        ..Default::default()
    }
}

fn web_chain() -> Vec<Ancestor> {
    vec![
        anc(100, "/usr/bin/node"),
        anc(50, "/usr/bin/containerd-shim-runc-v2"),
        anc(1, "/sbin/init"),
    ]
}

fn ev(t: i64, kind: &str, pid: u32, ppid: u32) -> Event {
    Event {
        time_unix_nanos: t,
        kind: kind.into(),
        pid,
        ppid,
        exe: "/bin/x".into(),
        workload_key: "host".into(),
        json: format!(r#"{{"type":"{kind}"}}"#),
        ..Default::default()
    }
}

pub async fn batches_are_atomic_and_deduplicated(s: &dyn Store) {
    let events = vec![ev(T0, "exec", 1, 0), ev(T0 + 1, "exit", 1, 0)];
    assert_eq!(
        s.insert_events("a1", "b1", events.clone(), T0)
            .await
            .unwrap(),
        BatchOutcome::Stored(2)
    );
    assert_eq!(
        s.insert_events("a1", "b1", events.clone(), T0)
            .await
            .unwrap(),
        BatchOutcome::Duplicate
    );
    // Same batch id from another agent, or no batch id: stored.
    assert_eq!(
        s.insert_events("a2", "b1", events.clone(), T0)
            .await
            .unwrap(),
        BatchOutcome::Stored(2)
    );
    assert_eq!(
        s.insert_events("a2", "", events.clone(), T0).await.unwrap(),
        BatchOutcome::Stored(2)
    );
    let st = s.stats().await.unwrap();
    assert_eq!((st.agents, st.events), (2, 6));
    assert!(st.bytes > 0);
    // Per-agent usage (quotas): a duplicate counts once.
    s.insert_detections(
        "a2",
        "d1",
        vec![det(T0, 5, "/bin/x", "r", Severity::Low, vec![])],
        T0,
    )
    .await
    .unwrap();
    s.record_evidence(EvidenceInfo {
        bundle_id: "ab".repeat(32),
        agent: "a2".into(),
        size: 1234,
        stored_unix_nanos: T0,
        ..Default::default()
    })
    .await
    .unwrap();
    let usage = s.usage().await.unwrap();
    let of = |name: &str| {
        usage
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, u)| *u)
            .unwrap_or_default()
    };
    assert_eq!(
        of("a2"),
        super::AgentUsage {
            events: 4,
            detections: 1,
            evidence_bytes: 1234
        }
    );
    assert_eq!(of("a1").events, 2);
    assert_eq!(of("a1").detections + of("a1").evidence_bytes, 0);
}

pub async fn one_attack_chain_is_one_incident(s: &dyn Store) {
    let mut sh_chain = web_chain();
    sh_chain.insert(0, anc(200, "/bin/sh"));
    let batch = vec![
        det(T0, 200, "/bin/sh", "web_shell", Severity::High, web_chain()),
        det(
            T0 + 5 * SEC,
            201,
            "/usr/bin/curl",
            "downloader",
            Severity::Medium,
            sh_chain.clone(),
        ),
        det(
            T0 + 9 * SEC,
            202,
            "/tmp/xmrig",
            "miner",
            Severity::Critical,
            sh_chain,
        ),
    ];
    s.insert_detections("web-1", "d1", batch, T0).await.unwrap();
    // Same chain, later batch, within the window.
    let late = det(
        T0 + 300 * SEC,
        300,
        "/usr/bin/id",
        "recon",
        Severity::Low,
        web_chain(),
    );
    s.insert_detections("web-1", "d2", vec![late], T0)
        .await
        .unwrap();

    let list = s
        .list_incidents(&ListIncidentsRequest::default())
        .await
        .unwrap();
    assert_eq!(list.len(), 1, "{list:#?}");
    let inc = &list[0];
    assert_eq!(inc.detection_count, 4);
    assert_eq!(inc.root_pid, 100);
    assert_eq!(inc.root_exe, "/usr/bin/node");
    assert_eq!(inc.max_severity, Severity::Critical as i32);
    assert_eq!(inc.rules, vec!["downloader", "miner", "recon", "web_shell"]);
    assert_eq!(inc.mitre, vec!["T1059"]);
    // Titled by the most severe detection.
    assert_eq!(inc.title, "miner on /tmp/xmrig");
    assert_eq!(inc.first_seen_unix_nanos, T0);
    assert_eq!(inc.last_seen_unix_nanos, T0 + 300 * SEC);
    assert_eq!(inc.agent, "web-1");
}

pub async fn unrelated_detections_are_separate_incidents(s: &dyn Store) {
    let ssh = |pid: u32, sshd: u32| {
        vec![
            anc(pid, "/usr/bin/bash"),
            anc(sshd, "/usr/sbin/sshd"),
            anc(1, "/lib/systemd/systemd"),
        ]
    };
    let mut a = det(T0, 10, "/usr/bin/nc", "revshell", Severity::High, ssh(9, 8));
    a.workload_key = "session:session-1.scope".into();
    // Another ssh session under the same sshd: not the same tree.
    let mut b = det(
        T0 + SEC,
        20,
        "/usr/bin/nc",
        "revshell",
        Severity::High,
        ssh(19, 8),
    );
    b.workload_key = a.workload_key.clone();
    // Same tree as `a` but outside the window.
    let mut c = det(
        T0 + 700 * SEC,
        11,
        "/usr/bin/nc",
        "revshell",
        Severity::High,
        ssh(9, 8),
    );
    c.workload_key = a.workload_key.clone();
    // Same pids, another workload.
    let d = det(T0, 10, "/usr/bin/nc", "revshell", Severity::High, ssh(9, 8));
    // Same everything, another agent.
    let mut e = a.clone();
    e.time_unix_nanos += 1;
    s.insert_detections("h1", "", vec![a, b, c, d], T0)
        .await
        .unwrap();
    s.insert_detections("h2", "", vec![e], T0).await.unwrap();
    let list = s
        .list_incidents(&ListIncidentsRequest::default())
        .await
        .unwrap();
    assert_eq!(list.len(), 5, "{list:#?}");
    assert!(list.iter().all(|i| i.detection_count == 1));
}

pub async fn activity_under_one_login_shell_is_rooted_where_each_chain_starts(s: &dyn Store) {
    // One person's login shell runs a web app that gets attacked, a second,
    // unrelated attack, and the analyst's own commands; interleaved.
    let login = Ancestor {
        pid: 500,
        exe: "/usr/bin/bash".into(),
        argv: vec!["-bash".into()],
    };
    let under = |mid: Vec<Ancestor>| {
        let mut a = mid;
        a.extend([
            login.clone(),
            anc(499, "/usr/sbin/sshd"),
            anc(1, "/lib/systemd/systemd"),
        ]);
        a
    };
    let app = || vec![anc(600, "/bin/sh"), anc(590, "/usr/bin/python3")];
    let mut batch = vec![
        // The analyst checks something first (a low finding).
        det(
            T0,
            800,
            "/usr/bin/ss",
            "recon",
            Severity::Low,
            under(vec![]),
        ),
        // The web app's shell, then its download, then a miner (its cause
        // is the shell: equally severe findings keep the first as title).
        det(
            T0 + SEC,
            600,
            "/bin/sh",
            "server_child",
            Severity::High,
            under(vec![anc(590, "/usr/bin/python3")]),
        ),
        det(
            T0 + 2 * SEC,
            610,
            "/usr/bin/curl",
            "ingress",
            Severity::High,
            under(app()),
        ),
        // The unrelated attack from the same shell.
        det(
            T0 + 3 * SEC,
            701,
            "/usr/bin/dash",
            "pipe_to_shell",
            Severity::High,
            under(vec![anc(700, "/usr/bin/wget")]),
        ),
        det(
            T0 + 4 * SEC,
            620,
            "/tmp/m",
            "miner",
            Severity::Critical,
            under(app()),
        ),
        det(
            T0 + 5 * SEC,
            801,
            "/usr/bin/id",
            "recon",
            Severity::Low,
            under(vec![]),
        ),
    ];
    for d in &mut batch {
        d.workload_key = "session:session-3.scope".into();
    }
    s.insert_detections("h1", "", batch, T0).await.unwrap();
    let list = s
        .list_incidents(&ListIncidentsRequest::default())
        .await
        .unwrap();
    let mut roots: Vec<(u32, u32, String)> = list
        .iter()
        .map(|i| (i.root_pid, i.detection_count, i.title.clone()))
        .collect();
    roots.sort();
    assert_eq!(
        roots,
        [
            (590, 3, "miner on /tmp/m".to_string()),
            (700, 1, "pipe_to_shell on /usr/bin/dash".to_string()),
            (800, 1, "recon on /usr/bin/ss".to_string()),
            (801, 1, "recon on /usr/bin/id".to_string()),
        ],
        "{list:#?}"
    );
}

pub async fn root_moves_up_when_a_detection_reaches_higher(s: &dyn Store) {
    // First detection only knows the shell as its top (its parent was a
    // supervisor-less short chain), the second reaches node above it.
    let first = det(
        T0,
        201,
        "/usr/bin/curl",
        "downloader",
        Severity::Medium,
        vec![anc(200, "/bin/sh")],
    );
    let mut chain = vec![anc(200, "/bin/sh")];
    chain.extend(web_chain());
    let second = det(
        T0 + SEC,
        202,
        "/usr/bin/wget",
        "downloader",
        Severity::Medium,
        chain,
    );
    s.insert_detections("w", "", vec![first, second], T0)
        .await
        .unwrap();
    let list = s
        .list_incidents(&ListIncidentsRequest::default())
        .await
        .unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0].root_pid, list[0].root_exe.as_str()),
        (100, "/usr/bin/node")
    );
}

pub async fn filters_and_search(s: &dyn Store) {
    let mut other = det(
        T0 + 2 * SEC,
        900,
        "/usr/sbin/nginx_%x",
        "masquerade",
        Severity::Low,
        vec![],
    );
    other.workload_key = "systemd:nginx.service".into();
    s.insert_detections(
        "a1",
        "",
        vec![det(
            T0,
            200,
            "/bin/sh",
            "web_shell",
            Severity::High,
            web_chain(),
        )],
        T0,
    )
    .await
    .unwrap();
    s.insert_detections("a2", "", vec![other], T0)
        .await
        .unwrap();

    let q = |f: fn(&mut ListDetectionsRequest)| {
        let mut r = ListDetectionsRequest::default();
        f(&mut r);
        r
    };
    let n = |v: Vec<StoredDetection>| v.len();
    assert_eq!(n(s.list_detections(&q(|_| {})).await.unwrap()), 2);
    assert_eq!(
        n(s.list_detections(&q(|r| r.agent = "a2".into()))
            .await
            .unwrap()),
        1
    );
    assert_eq!(
        n(s.list_detections(&q(|r| r.rule = "web_shell".into()))
            .await
            .unwrap()),
        1
    );
    assert_eq!(
        n(
            s.list_detections(&q(|r| r.min_severity = Severity::Medium as i32))
                .await
                .unwrap()
        ),
        1
    );
    assert_eq!(
        n(s.list_detections(&q(|r| r.since_unix_nanos = T0 + SEC))
            .await
            .unwrap()),
        1
    );
    assert_eq!(
        n(s.list_detections(&q(|r| r.until_unix_nanos = T0 + SEC))
            .await
            .unwrap()),
        1
    );
    assert_eq!(n(s.list_detections(&q(|r| r.limit = 1)).await.unwrap()), 1);
    // LIKE wildcards in the search are literal.
    assert_eq!(
        n(s.list_detections(&q(|r| r.search = "nginx_%".into()))
            .await
            .unwrap()),
        1
    );
    assert_eq!(
        n(s.list_detections(&q(|r| r.search = "_%".into()))
            .await
            .unwrap()),
        1
    );
    assert_eq!(
        n(s.list_detections(&q(|r| r.search = "zzz".into()))
            .await
            .unwrap()),
        0
    );
    let newest = s.list_detections(&q(|_| {})).await.unwrap();
    assert_eq!(newest[0].detection.as_ref().unwrap().rule, "masquerade");

    let inc = |f: fn(&mut ListIncidentsRequest)| {
        let mut r = ListIncidentsRequest::default();
        f(&mut r);
        r
    };
    assert_eq!(
        s.list_incidents(&inc(|r| r.search = "node".into()))
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        s.list_incidents(&inc(|r| r.search = "nginx.service".into()))
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        s.list_incidents(&inc(|r| r.min_severity = Severity::High as i32))
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        s.list_incidents(&inc(|r| r.agent = "nobody".into()))
            .await
            .unwrap()
            .len(),
        0
    );
    let id = s
        .list_incidents(&inc(|r| r.agent = "a1".into()))
        .await
        .unwrap()[0]
        .id;
    let by_incident = s
        .list_detections(&ListDetectionsRequest {
            incident_id: id,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_incident.len(), 1);
    assert_eq!(by_incident[0].incident_id, id);
}

pub async fn incident_detail_has_detections_evidence_and_events(s: &dyn Store) {
    let bundle = "ab".repeat(32);
    let pending = "cd".repeat(32);
    let mut d = det(T0, 200, "/bin/sh", "web_shell", Severity::High, web_chain());
    d.evidence_ids = vec![bundle.clone(), pending.clone()];
    s.insert_detections("a1", "", vec![d.clone()], T0)
        .await
        .unwrap();
    s.record_evidence(EvidenceInfo {
        bundle_id: bundle.clone(),
        agent: "a1".into(),
        size: 1234,
        stored_unix_nanos: T0,
        label: "core".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    s.insert_events(
        "a1",
        "",
        vec![
            ev(T0 + SEC, "exec", 201, 200),        // child of the detected shell
            ev(T0 + 2 * SEC, "exit", 200, 100),    // the shell itself
            ev(T0 + SEC, "exec", 999, 1),          // unrelated
            ev(T0 + 3600 * SEC, "exec", 202, 200), // too late
        ],
        T0,
    )
    .await
    .unwrap();
    // Events of another agent are not mixed in.
    s.insert_events("a2", "", vec![ev(T0, "exec", 201, 200)], T0)
        .await
        .unwrap();

    let id = s
        .list_incidents(&ListIncidentsRequest::default())
        .await
        .unwrap()[0]
        .id;
    let detail = s.incident(id).await.unwrap().unwrap();
    assert_eq!(detail.detections.len(), 1);
    assert_eq!(detail.detections[0].detection.as_ref().unwrap(), &d);
    assert_eq!(detail.evidence.len(), 2);
    assert_eq!(detail.evidence[0].size, 1234);
    assert_eq!(detail.evidence[0].label, "core");
    let pend = detail
        .evidence
        .iter()
        .find(|e| e.bundle_id == pending)
        .unwrap();
    assert_eq!(pend.stored_unix_nanos, 0);
    let pids: Vec<u32> = detail
        .events
        .iter()
        .map(|e| e.event.as_ref().unwrap().pid)
        .collect();
    assert_eq!(pids, vec![201, 200]);
    assert!(s.incident(id + 100).await.unwrap().is_none());
    assert_eq!(s.evidence(&bundle).await.unwrap().unwrap().agent, "a1");
    assert!(s.evidence(&pending).await.unwrap().is_none());
}

/// A bundle names its detection by (agent, pid, event time) in its
/// manifest: it is linked to that event's detections whichever arrives
/// first, and not to another agent's.
pub async fn evidence_links_to_its_detection_in_either_order(s: &dyn Store) {
    let info = |id: &str, agent: &str, pid: u32, t: i64| EvidenceInfo {
        bundle_id: id.into(),
        agent: agent.into(),
        size: 10,
        stored_unix_nanos: T0,
        label: "vigil-agent capture".into(),
        pid,
        rule: "web_shell".into(),
        detection_unix_nanos: t,
        seq: 2,
        prev_bundle_id: "ee".repeat(32),
        chain: "gap".into(),
        manifest_agent: agent.into(),
        origin: "signed".into(),
        signature: format!("{{\"sig\":\"{id}\"}}"),
        receipt: "{\"receipt\":1}".into(),
        commitment: "committed".into(),
    };
    // Detection first, then its bundle.
    let d1 = det(T0, 300, "/bin/sh", "web_shell", Severity::High, web_chain());
    s.insert_detections("b1", "", vec![d1], T0).await.unwrap();
    let early = "a1".repeat(32);
    s.record_evidence(info(&early, "b1", 300, T0))
        .await
        .unwrap();
    // Bundle first (another process, later), then its detection.
    let late = "b2".repeat(32);
    s.record_evidence(info(&late, "b1", 301, T0 + SEC))
        .await
        .unwrap();
    // Same pid and time from another agent: not linked.
    let foreign = "c3".repeat(32);
    s.record_evidence(info(&foreign, "b2", 301, T0 + SEC))
        .await
        .unwrap();
    let mut chain = web_chain();
    chain.insert(0, anc(300, "/bin/sh"));
    let d2 = det(
        T0 + SEC,
        301,
        "/usr/bin/curl",
        "web_downloader",
        Severity::High,
        chain,
    );
    s.insert_detections("b1", "", vec![d2], T0).await.unwrap();

    let got = s.evidence(&early).await.unwrap().unwrap();
    assert_eq!(got, info(&early, "b1", 300, T0));
    // Chain lookups: both of b1's bundles name the same predecessor (a
    // fork); b2's does too but is another agent's.
    let prev = "ee".repeat(32);
    assert_eq!(
        s.successors("b1", &prev).await.unwrap(),
        vec![early.clone(), late.clone()]
    );
    assert_eq!(
        s.successors("b2", &prev).await.unwrap(),
        vec![foreign.clone()]
    );
    assert!(s.successors("b1", "").await.unwrap().is_empty());
    assert_eq!(s.chain_head("b1").await.unwrap().unwrap().seq, 2);
    assert!(s.chain_head("nobody").await.unwrap().is_none());
    let incidents = s
        .list_incidents(&ListIncidentsRequest::default())
        .await
        .unwrap();
    let mut ids: Vec<String> = Vec::new();
    for i in incidents {
        let detail = s.incident(i.id).await.unwrap().unwrap();
        ids.extend(detail.evidence.into_iter().map(|e| e.bundle_id));
    }
    ids.sort();
    assert_eq!(ids, vec![early, late]);
}

/// Commitments: recorded once per (agent, id), found by seq and by id,
/// counted open until their bundle is stored.
pub async fn commitments_are_recorded_once_and_closed_by_their_bundle(s: &dyn Store) {
    let c = |id: &str, seq: u64| super::Commitment {
        bundle_id: id.into(),
        seq,
        prev_bundle_id: if seq == 1 {
            String::new()
        } else {
            "ee".repeat(32)
        },
        size: 10,
    };
    let (a, b, other) = ("a1".repeat(32), "b2".repeat(32), "c3".repeat(32));
    assert!(s.record_commitment("n1", &c(&a, 1), T0).await.unwrap());
    assert!(
        !s.record_commitment("n1", &c(&a, 1), T0 + SEC)
            .await
            .unwrap(),
        "a resend"
    );
    assert!(s
        .record_commitment("n1", &c(&b, 2), T0 + SEC)
        .await
        .unwrap());
    // The same seq again with another id (a rewritten bundle), and the
    // same seq by another agent.
    assert!(s
        .record_commitment("n1", &c(&other, 2), T0 + 2 * SEC)
        .await
        .unwrap());
    assert!(s
        .record_commitment("n2", &c(&other, 2), T0 + 3 * SEC)
        .await
        .unwrap());
    assert_eq!(
        s.commitments_at("n1", 2).await.unwrap(),
        vec![b.clone(), other.clone()]
    );
    assert_eq!(
        s.commitments_at("n2", 2).await.unwrap(),
        vec![other.clone()]
    );
    assert!(s.commitments_at("n1", 3).await.unwrap().is_empty());
    assert!(s.commitments_at("nobody", 1).await.unwrap().is_empty());
    let rec = s.commitment(&a).await.unwrap().unwrap();
    assert_eq!((rec.agent.as_str(), rec.committed_ns), ("n1", T0));
    assert_eq!(
        s.commitment(&other).await.unwrap().unwrap().agent,
        "n1",
        "the first"
    );
    assert!(s.commitment(&"dd".repeat(32)).await.unwrap().is_none());
    assert_eq!(s.open_commitments("n1").await.unwrap(), 3);
    s.record_evidence(EvidenceInfo {
        bundle_id: a.clone(),
        agent: "n1".into(),
        size: 10,
        stored_unix_nanos: T0,
        seq: 1,
        commitment: "committed".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(s.open_commitments("n1").await.unwrap(), 2);
    assert_eq!(
        s.evidence(&a).await.unwrap().unwrap().commitment,
        "committed"
    );
}

pub async fn retention_deletes_old_events_only(s: &dyn Store) {
    let old: Vec<Event> = (0..12_000).map(|i| ev(T0 + i, "exec", 5, 1)).collect();
    s.insert_events("a", "old", old, T0).await.unwrap();
    s.insert_events(
        "a",
        "new",
        vec![ev(T0 + 100 * SEC, "exec", 6, 1)],
        T0 + 100 * SEC,
    )
    .await
    .unwrap();
    s.insert_detections(
        "a",
        "",
        vec![det(T0, 5, "/bin/x", "r", Severity::Low, vec![])],
        T0,
    )
    .await
    .unwrap();
    assert_eq!(s.delete_events_before(T0 + 50 * SEC).await.unwrap(), 12_000);
    let st = s.stats().await.unwrap();
    assert_eq!((st.events, st.detections), (1, 1));
    // The batch record went with it: the old batch id is accepted again.
    assert_eq!(
        s.insert_events("a", "old", vec![ev(T0, "exec", 5, 1)], T0)
            .await
            .unwrap(),
        BatchOutcome::Stored(1)
    );
    // New batch record kept.
    assert_eq!(
        s.insert_events("a", "new", vec![], T0).await.unwrap(),
        BatchOutcome::Duplicate
    );
}

/// Generates one `#[tokio::test]` per conformance check; `$make` is an
/// expression (it may `.await`) giving `(keep_alive, store)` for a fresh,
/// empty store.
macro_rules! conformance_tests {
    ($make:expr) => {
        conformance_tests!(@each $make;
            batches_are_atomic_and_deduplicated,
            one_attack_chain_is_one_incident,
            unrelated_detections_are_separate_incidents,
            activity_under_one_login_shell_is_rooted_where_each_chain_starts,
            root_moves_up_when_a_detection_reaches_higher,
            filters_and_search,
            incident_detail_has_detections_evidence_and_events,
            evidence_links_to_its_detection_in_either_order,
            commitments_are_recorded_once_and_closed_by_their_bundle,
            retention_deletes_old_events_only,
        );
    };
    (@each $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let (_keep, store) = $make;
                $crate::store::conformance::$name(&*store).await;
            }
        )*
    };
}
pub(crate) use conformance_tests;
