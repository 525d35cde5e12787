//! A compromised agent against the real collector (issue 13): a hostile
//! client holding a real agent certificate (`agent-1`) attacks; each test
//! checks the refusal is a clear gRPC status, counted, and that the
//! collector keeps serving the other agent (`agent-2`), the analysts and
//! the web UI, with nothing stored before lost.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{bundle, free_port, http_get, metric, sha256_hex, Backend, Collector, Pki};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use vigil_proto::{
    Detection, DetectionBatch, EvidenceChunk, FetchEvidenceRequest, ListDetectionsRequest,
    UploadStatusRequest,
};

/// All of `data` in chunks of `size` bytes (see [`chunks_of`]).
fn whole(data: &[u8], size: usize) -> Vec<EvidenceChunk> {
    chunks_of(&sha256_hex(data), data, 0, size)
}

/// Chunks of `data` from `offset`, `size` bytes each, the first carrying
/// the id and the total size.
fn chunks_of(id: &str, data: &[u8], offset: usize, size: usize) -> Vec<EvidenceChunk> {
    data[offset..]
        .chunks(size)
        .enumerate()
        .map(|(i, c)| EvidenceChunk {
            bundle_id: if i == 0 {
                id.to_string()
            } else {
                String::new()
            },
            total_size: data.len() as u64,
            offset: (offset + i * size) as u64,
            data: c.to_vec(),
            label: String::new(),
            signature: Vec::new(),
        })
        .collect()
}

fn detection(sec: u32, rule: &str) -> Detection {
    Detection::from_agent_json(&format!(
        r#"{{"time":"2026-11-26T14:09:{sec:02}Z","rule":"{rule}","severity":"high","mitre":["T1059"],"summary":"{rule}","process":{{"pid":4242,"ppid":1,"exe":"/bin/sh","comm":"sh","argv":["sh"],"uid":33}},"ancestry":[]}}"#
    ))
    .unwrap()
}

fn rule_of(d: &vigil_proto::StoredDetection) -> &str {
    d.detection.as_ref().map(|x| x.rule.as_str()).unwrap_or("")
}

/// A collector with its UI and metrics on, and what agent-2 stored before
/// the attack.
struct Site {
    pki: Pki,
    data: tempfile::TempDir,
    c: Collector,
    ui: SocketAddr,
    metrics: u16,
    token: String,
    /// The bundle agent-2 stored before the attack.
    kept: Vec<u8>,
    /// Detections stored so far (by agent-2).
    detections: usize,
}

impl Site {
    /// `chunks` sent as one `UploadEvidence` call by `agent`.
    async fn send(
        &self,
        agent: &str,
        chunks: Vec<EvidenceChunk>,
    ) -> Result<vigil_proto::UploadResult, tonic::Status> {
        self.c
            .ingest(&self.pki, agent)
            .await
            .upload_evidence(tokio_stream::iter(chunks))
            .await
            .map(tonic::Response::into_inner)
    }

    /// Starts a collector with `extra` arguments; agent-2 stores a
    /// detection and a bundle.
    async fn start(backend: Backend, extra: &[&str]) -> Site {
        let pki = Pki::new();
        let data = tempfile::tempdir().unwrap();
        let ui: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let metrics = free_port();
        let (ui_s, m_s) = (ui.to_string(), format!("127.0.0.1:{metrics}"));
        let mut args = vec!["--ui-addr", &ui_s, "--metrics-addr", &m_s];
        args.extend_from_slice(extra);
        let c = Collector::start(backend, &pki, data.path(), &args);
        let token = std::fs::read_to_string(data.path().join("ui-token"))
            .unwrap()
            .trim()
            .to_string();
        let mut site = Site {
            pki,
            data,
            c,
            ui,
            metrics,
            token,
            kept: bundle(300 << 10, 77),
            detections: 0,
        };
        site.good_agent_stores("before").await;
        let kept = site.kept.clone();
        let r = site.send("agent-2", whole(&kept, 64 << 10)).await.unwrap();
        assert!(r.complete);
        site
    }

    /// agent-2 stores one detection.
    async fn good_agent_stores(&mut self, batch: &str) {
        let ack = self
            .c
            .ingest(&self.pki, "agent-2")
            .await
            .push_detections(tokio_stream::iter(vec![DetectionBatch {
                batch_id: batch.into(),
                detections: vec![detection(self.detections as u32 % 60, "good_agent_rule")],
            }]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ack.accepted, 1);
        self.detections += 1;
    }

    /// The collector still serves: agent-2 stores, an analyst lists every
    /// detection stored and fetches the bundle kept before the attack
    /// byte for byte, the UI answers with the stored detections.
    async fn assert_serving(&mut self) {
        assert!(self.c.is_running(), "the collector died");
        self.good_agent_stores(&format!("after-{}", self.detections))
            .await;
        let mut q = self.c.query(&self.pki).await;
        let listed = q
            .list_detections(ListDetectionsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .detections;
        let good = listed
            .iter()
            .filter(|d| rule_of(d) == "good_agent_rule" && d.agent == "agent-2")
            .count();
        assert_eq!(good, self.detections, "stored detections lost");
        let mut stream = q
            .fetch_evidence(FetchEvidenceRequest {
                bundle_id: sha256_hex(&self.kept),
                offset: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let mut back = Vec::new();
        while let Some(m) = stream.message().await.unwrap() {
            back.extend_from_slice(&m.data);
        }
        assert!(back == self.kept, "the bundle stored before changed");
        let (ui, auth) = (self.ui, format!("Authorization: Bearer {}\r\n", self.token));
        let (status, body) =
            tokio::task::spawn_blocking(move || http_get(ui, "/api/detections", &auth))
                .await
                .unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("good_agent_rule"), "{body}");
    }

    fn metric(&self, prefix: &str) -> f64 {
        metric(self.metrics, prefix)
    }

    /// Waits (up to 60 s) until the metric line `prefix` reads `want`.
    async fn wait_metric(&self, prefix: &str, want: f64) {
        for _ in 0..600 {
            if self.metric(prefix) == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{prefix} never reached {want}: {}", self.metric(prefix));
    }

    fn refusals(&self, reason: &str) -> f64 {
        self.metric(&format!(
            "vigil_collector_refusals_total{{reason=\"{reason}\"}}"
        ))
    }
}

const IN_PROGRESS: &str = "vigil_collector_uploads_in_progress ";

/// agent-1 opens upload streams and sends nothing: it gets its share of
/// slots (2) and no more, agent-2 still uploads, the collector-wide cap
/// holds, and idle streams are closed after the idle timeout (1 s here),
/// giving the slots back.
async fn one_agent_cannot_hold_the_upload_slots(backend: Backend) {
    let mut site = Site::start(
        backend,
        &[
            "--max-concurrent-uploads",
            "3",
            "--max-uploads-per-agent",
            "2",
            "--stream-idle-timeout",
            "1s",
        ],
    )
    .await;
    // Two idle streams: slots are taken before the first message.
    let mut idle = Vec::new();
    let mut senders = Vec::new();
    for _ in 0..2 {
        let (tx, rx) = tokio::sync::mpsc::channel::<EvidenceChunk>(1);
        let mut hostile = site.c.ingest(&site.pki, "agent-1").await;
        idle.push(tokio::spawn(async move {
            hostile.upload_evidence(ReceiverStream::new(rx)).await
        }));
        senders.push(tx);
    }
    site.wait_metric(IN_PROGRESS, 2.0).await;
    let third = bundle(1000, 1);
    let err = site
        .send("agent-1", whole(&third, 1 << 20))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("per-agent limit"), "{err:?}");

    // agent-2 takes the last slot with an upload it pauses: the
    // collector-wide cap then refuses its next one.
    let paused = bundle(600 << 10, 2);
    let paused_id = sha256_hex(&paused);
    let (tx2, rx2) = tokio::sync::mpsc::channel(4);
    let mut good = site.c.ingest(&site.pki, "agent-2").await;
    let held = tokio::spawn(async move { good.upload_evidence(ReceiverStream::new(rx2)).await });
    let mut parts = chunks_of(&paused_id, &paused, 0, 256 << 10).into_iter();
    tx2.send(parts.next().unwrap()).await.unwrap();
    site.wait_metric(IN_PROGRESS, 3.0).await;
    let other = bundle(2000, 3);
    let err = site
        .send("agent-2", whole(&other, 1 << 20))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("collector-wide limit"), "{err:?}");

    // The idle streams are cut, the paused one too (its bytes kept).
    for h in idle {
        let err = tokio::time::timeout(Duration::from_secs(60), h)
            .await
            .expect("an idle upload stream was never closed")
            .unwrap()
            .unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
        assert!(err.message().contains("stream-idle-timeout"), "{err:?}");
    }
    let err = tokio::time::timeout(Duration::from_secs(60), held)
        .await
        .expect("the paused upload was never closed")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    drop(senders);
    site.wait_metric(IN_PROGRESS, 0.0).await;
    let st = site
        .c
        .ingest(&site.pki, "agent-2")
        .await
        .upload_status(UploadStatusRequest {
            bundle_id: paused_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.received, 256 << 10);
    // ... and resumes.
    let r = site
        .send(
            "agent-2",
            chunks_of(&paused_id, &paused, st.received as usize, 256 << 10),
        )
        .await
        .unwrap();
    assert!(r.complete);
    // Slots given back: agent-1 uploads again.
    let r = site.send("agent-1", whole(&third, 1 << 20)).await.unwrap();
    assert!(r.complete);
    assert!(site.refusals("agent_uploads") >= 1.0);
    assert!(site.refusals("uploads") >= 1.0);
    assert!(site.refusals("idle") >= 3.0);
    site.assert_serving().await;
}

/// agent-1 trickles chunks, each well within the idle timeout: the upload
/// ends at its deadline (3 s here) with DEADLINE_EXCEEDED, what arrived is
/// kept, and a resume completes it.
async fn a_trickled_upload_ends_at_its_deadline(backend: Backend) {
    let mut site = Site::start(
        backend,
        &["--stream-idle-timeout", "20s", "--upload-deadline", "3s"],
    )
    .await;
    let slow = bundle(256 << 10, 5);
    let id = sha256_hex(&slow);
    let parts = chunks_of(&id, &slow, 0, 4 << 10);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let feeder = tokio::spawn(async move {
        for p in parts {
            if tx.send(p).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
    });
    let mut hostile = site.c.ingest(&site.pki, "agent-1").await;
    let err = tokio::time::timeout(
        Duration::from_secs(60),
        hostile.upload_evidence(ReceiverStream::new(rx)),
    )
    .await
    .expect("the trickled upload was never cut")
    .unwrap_err();
    feeder.abort();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("upload-deadline"), "{err:?}");
    assert_eq!(site.refusals("deadline"), 1.0);
    let st = hostile
        .upload_status(UploadStatusRequest {
            bundle_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(st.received > 0 && !st.complete, "{st:?}");
    let r = hostile
        .upload_evidence(tokio_stream::iter(chunks_of(
            &id,
            &slow,
            st.received as usize,
            64 << 10,
        )))
        .await
        .unwrap()
        .into_inner();
    assert!(r.complete);
    site.assert_serving().await;
}

/// agent-1 leaves unfinished uploads behind: it may keep 2, the
/// collector 3 in all; agent-2 still gets the room left.
async fn unfinished_uploads_are_bounded_per_agent(backend: Backend) {
    let mut site = Site::start(
        backend,
        &[
            "--max-partial-uploads",
            "3",
            "--max-partial-uploads-per-agent",
            "2",
        ],
    )
    .await;
    let half = |seed: u64, agent: &'static str| {
        let b = bundle(200 << 10, seed);
        let id = sha256_hex(&b);
        let first = chunks_of(&id, &b, 0, 64 << 10).remove(0);
        (agent, first)
    };
    for seed in [10, 11] {
        let (agent, first) = half(seed, "agent-1");
        let r = site.send(agent, vec![first]).await.unwrap();
        assert!(!r.complete);
    }
    let (_, first) = half(12, "agent-1");
    let err = site.send("agent-1", vec![first]).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("per-agent limit"), "{err:?}");
    // agent-2 gets the third place, then the collector is full.
    let (_, first) = half(13, "agent-2");
    let r = site.send("agent-2", vec![first]).await.unwrap();
    assert!(!r.complete);
    let (_, first) = half(14, "agent-2");
    let err = site.send("agent-2", vec![first]).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("collector-wide limit"), "{err:?}");
    assert_eq!(site.refusals("agent_partials"), 1.0);
    assert_eq!(site.refusals("partials"), 1.0);
    site.assert_serving().await;
}

/// `vigil-collector ARGS --data-dir DATA`: (success, stdout).
fn admin(site: &Site, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vigil-collector"))
        .args(args)
        .arg("--data-dir")
        .arg(site.data.path())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// SHA-256 of the DER form of agent `name`'s certificate.
fn fingerprint(pki: &Pki, name: &str) -> String {
    let pem = std::fs::read(pki.path().join("agents").join(format!("{name}.pem"))).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    sha256_hex(&pem.contents)
}

/// A stolen agent certificate is revoked while the collector runs: its
/// holder's next call on its open connection, whatever the method, is
/// PERMISSION_DENIED (counted), by name or by certificate fingerprint;
/// the other agent, the analysts and the UI go on; unrevoking restores it.
async fn a_revoked_certificate_is_refused_without_a_restart(backend: Backend) {
    let mut site = Site::start(backend, &[]).await;
    let mut hostile = site.c.ingest(&site.pki, "agent-1").await;
    let push = |batch: &str| {
        tokio_stream::iter(vec![DetectionBatch {
            batch_id: batch.into(),
            detections: vec![detection(1, "stolen")],
        }])
    };
    hostile.push_detections(push("a")).await.unwrap();

    let (ok, out) = admin(&site, &["revoke", "agent-1"]);
    assert!(ok, "{out}");
    let err = hostile.push_detections(push("b")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("revoked"), "{err:?}");
    let kept = sha256_hex(&site.kept);
    let err = hostile
        .upload_status(UploadStatusRequest {
            bundle_id: kept.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let b = bundle(1000, 8);
    // On the connection opened before the revocation...
    let err = hostile
        .upload_evidence(tokio_stream::iter(whole(&b, 1 << 20)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // ... and on a new one.
    let err = site
        .c
        .ingest(&site.pki, "agent-1")
        .await
        .push_detections(push("c"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(site.refusals("revoked"), 4.0);
    let (ok, out) = admin(&site, &["revoked"]);
    assert!(ok && out.lines().any(|l| l == "agent-1"), "{out}");
    site.assert_serving().await;

    // Unrevoked: accepted again; revoked by fingerprint: refused again.
    let (ok, out) = admin(&site, &["unrevoke", "agent-1"]);
    assert!(ok, "{out}");
    hostile.push_detections(push("d")).await.unwrap();
    let fp = format!("sha256:{}", fingerprint(&site.pki, "agent-1"));
    let (ok, out) = admin(&site, &["revoke", &fp]);
    assert!(ok, "{out}");
    let err = hostile.push_detections(push("e")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // What the agent stored before its revocation stays.
    let stored = site
        .c
        .query(&site.pki)
        .await
        .list_detections(ListDetectionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .detections;
    assert_eq!(stored.iter().filter(|d| rule_of(d) == "stolen").count(), 2);
    site.assert_serving().await;
    let (ok, _) = admin(&site, &["unrevoke", "not-there"]);
    assert!(!ok);
}

fn event_batch(batch: &str, n: usize) -> vigil_proto::EventBatch {
    vigil_proto::EventBatch {
        batch_id: batch.into(),
        events: (0..n)
            .map(|i| vigil_proto::Event {
                time_unix_nanos: 1_800_000_000_000_000_000 + i as i64,
                kind: "exec".into(),
                pid: 4000 + i as u32,
                json: r#"{"type":"exec"}"#.into(),
                ..Default::default()
            })
            .collect(),
    }
}

/// A stolen certificate fills its agent's storage quotas (events,
/// detections, evidence bytes): past each, RESOURCE_EXHAUSTED naming the
/// quota, counted; what it stored stays; the other agent goes on; the
/// quota holds across a restart (usage read back from the store).
async fn one_agent_cannot_fill_the_store(backend: Backend) {
    let mut site = Site::start(
        backend,
        &[
            "--max-agent-events",
            "5",
            "--max-agent-detections",
            "3",
            "--max-agent-evidence-bytes",
            "1000000",
        ],
    )
    .await;
    let mut hostile = site.c.ingest(&site.pki, "agent-1").await;
    let quota_refused = |e: &tonic::Status, flag: &str| {
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(
            e.message().contains("storage quota of agent agent-1") && e.message().contains(flag),
            "{e:?}"
        );
    };
    // Events: 4 + 1 fit, one more does not; a refused batch stores nothing.
    let ack = hostile
        .push_events(tokio_stream::iter(vec![event_batch("e1", 4)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.accepted, 4);
    let err = hostile
        .push_events(tokio_stream::iter(vec![event_batch("e2", 2)]))
        .await
        .unwrap_err();
    quota_refused(&err, "--max-agent-events");
    hostile
        .push_events(tokio_stream::iter(vec![event_batch("e3", 1)]))
        .await
        .unwrap();
    let err = hostile
        .push_events(tokio_stream::iter(vec![event_batch("e4", 1)]))
        .await
        .unwrap_err();
    quota_refused(&err, "--max-agent-events");
    // Detections.
    let dets = |batch: &str, n: usize| {
        tokio_stream::iter(vec![DetectionBatch {
            batch_id: batch.into(),
            detections: (0..n).map(|i| detection(i as u32, "flood")).collect(),
        }])
    };
    hostile.push_detections(dets("d1", 3)).await.unwrap();
    let err = hostile.push_detections(dets("d2", 1)).await.unwrap_err();
    quota_refused(&err, "--max-agent-detections");
    // Evidence: a 600 KB bundle fits in 1 MB, a second does not; the
    // first sent again is still acknowledged (already stored).
    let first = bundle(600 << 10, 91);
    let r = site
        .send("agent-1", whole(&first, 256 << 10))
        .await
        .unwrap();
    assert!(r.complete);
    let second = bundle(600 << 10, 92);
    let err = site
        .send("agent-1", whole(&second, 256 << 10))
        .await
        .unwrap_err();
    quota_refused(&err, "--max-agent-evidence-bytes");
    let again = site
        .send("agent-1", whole(&first, 256 << 10))
        .await
        .unwrap();
    assert!(again.complete);

    assert_eq!(site.refusals("quota_events"), 2.0);
    assert_eq!(site.refusals("quota_detections"), 1.0);
    assert_eq!(site.refusals("quota_evidence"), 1.0);
    let held = |kind: &str| {
        site.metric(&format!(
            "vigil_collector_agent_stored_items{{agent=\"agent-1\",kind=\"{kind}\"}}"
        ))
    };
    assert_eq!((held("events"), held("detections")), (5.0, 3.0));
    assert_eq!(
        site.metric("vigil_collector_agent_stored_bytes{agent=\"agent-1\",kind=\"evidence\"}"),
        first.len() as f64
    );
    // The other agent is not affected.
    site.assert_serving().await;
    assert_eq!(
        site.metric("vigil_collector_agent_stored_items{agent=\"agent-2\",kind=\"detections\"}"),
        2.0
    );
    // What agent-1 stored is all there.
    let stored = site
        .c
        .query(&site.pki)
        .await
        .list_detections(ListDetectionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .detections;
    assert_eq!(stored.iter().filter(|d| rule_of(d) == "flood").count(), 3);

    // After a restart the usage is read back: still refused.
    let extra = site.c.extra.clone();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    site.c.kill();
    site.c = Collector::start_on(
        &site.c.pki_dir.clone(),
        &site.c.data_dir.clone(),
        &site.c.addr.to_string(),
        &extra,
    );
    let err = site
        .c
        .ingest(&site.pki, "agent-1")
        .await
        .push_detections(dets("d3", 1))
        .await
        .unwrap_err();
    quota_refused(&err, "--max-agent-detections");
    site.assert_serving().await;
}

on_both_stores!(
    one_agent_cannot_fill_the_store,
    one_agent_cannot_hold_the_upload_slots,
    a_trickled_upload_ends_at_its_deadline,
    unfinished_uploads_are_bounded_per_agent,
    a_revoked_certificate_is_refused_without_a_restart,
);
