//! The Ingest service: events, detections and evidence from agents.
//!
//! Every call is checked in this order: the caller's certificate role
//! (`PERMISSION_DENIED`), then each message against the limits
//! (`RESOURCE_EXHAUSTED`) and the contract (`INVALID_ARGUMENT`); only a
//! batch that passes every check reaches the store, atomically. Evidence
//! uploads are bounded in size, in time (idle per chunk, total per call:
//! `DEADLINE_EXCEEDED`), in concurrency and in unfinished count, per agent
//! and collector-wide (`RESOURCE_EXHAUSTED`), and a bundle becomes visible
//! only after its SHA-256 matched its id (`DATA_LOSS` otherwise, with
//! nothing kept; `ABORTED` when the upload resumed on bytes the collector
//! held, which may be what was torn: the agent starts over) and every
//! artifact in it
//! matched its manifest (`INVALID_ARGUMENT` otherwise, nothing kept). A
//! bundle over the size limit is `FAILED_PRECONDITION`: the agent sets it
//! aside instead of retrying until an operator raises the limit. Each
//! stored bundle's place in its agent's chain of custody is checked against
//! the bundles already stored (`first`, `linked`, `gap`, `broken`).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{debug, info, warn};
use vigil_bundle::sign::Signature;
use vigil_proto::ingest_server::Ingest;
use vigil_proto::{
    CommitEvidenceReply, Detection, DetectionBatch, Event, EventBatch, EvidenceChunk,
    EvidenceCommitment, EvidenceInfo, PushAck, Severity, UploadResult, UploadStatusReply,
    UploadStatusRequest,
};

use crate::auth::{self, Gate};
use crate::blobs::{
    BlobState, BlobStore, BundleId, PartialLimits, PartialMeta, Upload, UploadError,
};
use crate::evidence::{manifest_facts, manifest_facts_within, ManifestFacts};
use crate::metrics::Metrics;
use crate::origin::{Origin, OriginPolicy};
use crate::pki::Role;
use crate::quota::{Kind, QuotaLimits, Quotas};
use crate::slots::{Slot, UploadSlots};
use crate::store::{AgentSeen, BatchOutcome, Commitment, Store, StoreError};

/// Limits of the Ingest service.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest gRPC message accepted, bytes (a batch, a chunk).
    pub max_message_bytes: usize,
    /// Most events or detections in one batch.
    pub max_batch_items: usize,
    /// Largest evidence bundle, bytes.
    pub max_bundle_bytes: u64,
    /// Uploads running at once (over all agents).
    pub max_concurrent_uploads: usize,
    /// Uploads running at once for one agent (certificate name).
    pub max_uploads_per_agent: usize,
    /// Unfinished uploads kept on disk (over all agents).
    pub max_partial_uploads: usize,
    /// Unfinished uploads kept on disk for one agent.
    pub max_partial_uploads_per_agent: usize,
    /// Longest wait for the next message of a stream (an upload's chunk,
    /// a batch): past it the stream ends with `DEADLINE_EXCEEDED` (an
    /// upload keeps what arrived, for a resume).
    pub stream_idle_timeout: Duration,
    /// Longest time one upload call may take, all chunks together.
    pub upload_deadline: Duration,
    /// Most bytes a bundle's artifacts may add up to, decompressed (a
    /// manifest claiming more is refused before anything is read).
    pub max_bundle_expanded_bytes: u64,
    /// What one agent may hold: events, detections, evidence bytes.
    pub quotas: QuotaLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 4 << 20,
            max_batch_items: 10_000,
            max_bundle_bytes: 1 << 30,
            max_concurrent_uploads: 8,
            max_uploads_per_agent: 2,
            max_partial_uploads: 64,
            max_partial_uploads_per_agent: 8,
            stream_idle_timeout: Duration::from_secs(30),
            upload_deadline: Duration::from_secs(600),
            max_bundle_expanded_bytes: 16 << 30,
            quotas: QuotaLimits::default(),
        }
    }
}

const MAX_BATCH_ID: usize = 128;
const MAX_LABEL: usize = 256;

/// What one event or detection may carry: far above what an agent sends
/// (its ancestry stops at 64 processes, a command line at 32 KiB), low enough
/// that no item can make the incident merge, the tree or a page costly.
pub mod bounds {
    /// Ancestors.
    pub const ANCESTRY: usize = 256;
    /// ATT&CK ids, and the bytes of one.
    pub const MITRE: usize = 64;
    /// Bytes of one ATT&CK id.
    pub const MITRE_ID: usize = 32;
    /// Arguments of one command line.
    pub const ARGV: usize = 1024;
    /// Bytes of one command line, all arguments together (an agent reads
    /// at most 32 KiB from /proc).
    pub const ARGV_BYTES: usize = 128 << 10;
    /// Bytes of a path (exe) or another single string.
    pub const STRING: usize = 4096;
    /// Bytes of the JSON document.
    pub const JSON: usize = 4 << 20;
}

/// `what i: FIELD ...` as INVALID_ARGUMENT when `ok` is false.
fn bound(ok: bool, what: &str, i: usize, msg: impl FnOnce() -> String) -> Result<(), Status> {
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!("{what} {i}: {}", msg())))
    }
}

/// A command line within [`bounds::ARGV`] and [`bounds::ARGV_BYTES`].
fn check_argv(what: &str, i: usize, field: &str, argv: &[String]) -> Result<(), Status> {
    bound(argv.len() <= bounds::ARGV, what, i, || {
        format!(
            "{field} has {} arguments (at most {})",
            argv.len(),
            bounds::ARGV
        )
    })?;
    let bytes: usize = argv.iter().map(String::len).sum();
    bound(bytes <= bounds::ARGV_BYTES, what, i, || {
        format!("{field} has {bytes} bytes (at most {})", bounds::ARGV_BYTES)
    })
}

/// Strings within [`bounds::STRING`].
fn check_strings(what: &str, i: usize, fields: &[(&str, &str)]) -> Result<(), Status> {
    for (field, v) in fields {
        bound(v.len() <= bounds::STRING, what, i, || {
            format!("{field} has {} bytes (at most {})", v.len(), bounds::STRING)
        })?;
    }
    Ok(())
}

/// Ancestry within [`bounds::ANCESTRY`], each ancestor bounded.
fn check_ancestry(what: &str, i: usize, a: &[vigil_proto::Ancestor]) -> Result<(), Status> {
    bound(a.len() <= bounds::ANCESTRY, what, i, || {
        format!(
            "ancestry has {} entries (at most {})",
            a.len(),
            bounds::ANCESTRY
        )
    })?;
    for x in a {
        check_strings(what, i, &[("ancestry exe", &x.exe)])?;
        check_argv(what, i, "ancestry argv", &x.argv)?;
    }
    Ok(())
}

/// The structured process, if any, bounded like the summary fields.
fn check_process(what: &str, i: usize, p: Option<&vigil_proto::Process>) -> Result<(), Status> {
    let Some(p) = p else { return Ok(()) };
    check_strings(
        what,
        i,
        &[("process exe", &p.exe), ("process comm", &p.comm)],
    )?;
    check_argv(what, i, "process argv", &p.argv)
}

/// Nanoseconds since the Unix epoch, now.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// The Ingest service.
pub struct IngestService {
    store: Arc<dyn Store>,
    blobs: Arc<BlobStore>,
    limits: Limits,
    upload_slots: UploadSlots,
    in_progress: Arc<Mutex<HashSet<BundleId>>>,
    metrics: Arc<Metrics>,
    gate: Arc<Gate>,
    quotas: Arc<Quotas>,
    origin: Arc<OriginPolicy>,
}

impl IngestService {
    /// A service storing into `store` and `blobs`, within `quotas` (built
    /// with `limits.quotas`).
    pub fn new(
        store: Arc<dyn Store>,
        blobs: Arc<BlobStore>,
        limits: Limits,
        metrics: Arc<Metrics>,
        gate: Arc<Gate>,
        quotas: Arc<Quotas>,
        origin: Arc<OriginPolicy>,
    ) -> IngestService {
        IngestService {
            quotas,
            origin,
            store,
            blobs,
            upload_slots: UploadSlots::new(
                limits.max_uploads_per_agent,
                limits.max_concurrent_uploads,
                metrics.uploads_in_progress.clone(),
            ),
            limits,
            in_progress: Arc::default(),
            metrics,
            gate,
        }
    }

    async fn seen<T>(&self, req: &Request<T>, method: &str) -> Result<String, Status> {
        let id = self
            .gate
            .caller(req, Role::Agent)
            .inspect_err(|s| self.metrics.error(method, s))?;
        let seen = AgentSeen {
            name: id.name.clone(),
            cert_sha256: id.cert_sha256,
            peer_addr: auth::peer_addr(req),
        };
        self.store
            .record_agent(&seen, now_ns())
            .await
            .map_err(|e| internal(method, &e))?;
        Ok(id.name)
    }

    fn check_batch(&self, kind: &str, batch_id: &str, items: usize) -> Result<(), Status> {
        if batch_id.len() > MAX_BATCH_ID {
            return Err(Status::invalid_argument(format!(
                "batch_id longer than {MAX_BATCH_ID} bytes"
            )));
        }
        if items > self.limits.max_batch_items {
            return Err(Status::resource_exhausted(format!(
                "batch of {items} {kind} is over the limit of {} per batch: send smaller batches",
                self.limits.max_batch_items
            )));
        }
        Ok(())
    }

    /// Gives back the part of a quota reservation of `n` that a batch did
    /// not store (a duplicate, a failure).
    fn settle(&self, agent: &str, kind: Kind, n: u64, outcome: &Result<BatchOutcome, Status>) {
        let stored = match outcome {
            Ok(BatchOutcome::Stored(m)) => (*m).min(n),
            _ => 0,
        };
        if stored < n {
            self.quotas.release(agent, kind, n - stored);
        }
    }

    fn record(&self, stream: &str, outcome: BatchOutcome, bytes: usize, ack: &mut PushAck) {
        match outcome {
            BatchOutcome::Stored(n) => {
                ack.accepted += n;
                ack.batches += 1;
                Metrics::of(&self.metrics.items, stream).inc_by(n);
                Metrics::of(&self.metrics.batches, stream).inc();
                Metrics::of(&self.metrics.bytes, stream).inc_by(bytes as u64);
            }
            BatchOutcome::Duplicate => {
                ack.duplicate_batches += 1;
                Metrics::of(&self.metrics.duplicate_batches, stream).inc();
            }
        }
    }
}

fn internal(method: &str, e: &StoreError) -> Status {
    warn!(method, error = %e, "store failure");
    Status::internal(format!("collector storage failure: {e}"))
}

/// Rewrites tonic's status for an over-sized message (OUT_OF_RANGE) as
/// RESOURCE_EXHAUSTED with a hint; other statuses pass unchanged.
fn stream_status(status: Status) -> Status {
    if status.code() == Code::OutOfRange && status.message().contains("too large") {
        Status::resource_exhausted(format!(
            "{}: send smaller batches or chunks (collector --max-message-bytes)",
            status.message()
        ))
    } else {
        status
    }
}

/// The JSON document must be one JSON object.
fn check_json(what: &str, i: usize, json: &str) -> Result<(), Status> {
    if !json.trim_start().starts_with('{') {
        return Err(Status::invalid_argument(format!(
            "{what} {i}: json is not a JSON object"
        )));
    }
    serde_json::from_str::<serde::de::IgnoredAny>(json)
        .map(|_| ())
        .map_err(|e| Status::invalid_argument(format!("{what} {i}: json does not parse: {e}")))
}

fn check_workload(key: &mut String, json: &str) {
    if key.is_empty() {
        // Old agents may leave it out: derive it like the agent does.
        let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
        *key = vigil_proto::json::workload_key(v.get("process").and_then(|p| p.get("workload")));
    }
}

/// Validates and normalises one event.
pub fn check_event(i: usize, e: &mut Event) -> Result<(), Status> {
    if e.time_unix_nanos <= 0 {
        return Err(Status::invalid_argument(format!(
            "event {i}: time_unix_nanos must be > 0"
        )));
    }
    if e.kind.is_empty() || e.kind.len() > 32 {
        return Err(Status::invalid_argument(format!(
            "event {i}: kind must be 1-32 bytes"
        )));
    }
    check_strings(
        "event",
        i,
        &[
            ("exe", &e.exe),
            ("comm", &e.comm),
            ("workload_key", &e.workload_key),
        ],
    )?;
    check_argv("event", i, "argv", &e.argv)?;
    check_ancestry("event", i, &e.ancestry)?;
    check_process("event", i, e.process.as_ref())?;
    let built = e.json.is_empty();
    if built {
        // A structured event (agents >= 0.2): stored as its JSON document,
        // the form old agents send, so every reader sees one form.
        e.json = vigil_proto::document::event_json(e).ok_or_else(|| {
            Status::invalid_argument(format!("event {i}: neither json nor a structured payload"))
        })?;
        e.payload = None;
        e.process = None;
        e.ancestry.clear();
    }
    bound(e.json.len() <= bounds::JSON, "event", i, || {
        format!("json has {} bytes (at most {})", e.json.len(), bounds::JSON)
    })?;
    if !built {
        // Only what the agent sent is parsed: a document built here is
        // JSON by construction.
        check_json("event", i, &e.json)?;
    }
    check_workload(&mut e.workload_key, &e.json);
    Ok(())
}

/// Validates and normalises one detection.
pub fn check_detection(i: usize, d: &mut Detection) -> Result<(), Status> {
    if d.time_unix_nanos <= 0 {
        return Err(Status::invalid_argument(format!(
            "detection {i}: time_unix_nanos must be > 0"
        )));
    }
    if d.rule.is_empty() || d.rule.len() > 128 {
        return Err(Status::invalid_argument(format!(
            "detection {i}: rule must be 1-128 bytes"
        )));
    }
    if Severity::try_from(d.severity).is_err() {
        return Err(Status::invalid_argument(format!(
            "detection {i}: unknown severity {}",
            d.severity
        )));
    }
    if let Some(bad) = d
        .evidence_ids
        .iter()
        .find(|b| !vigil_proto::is_valid_bundle_id(b))
    {
        return Err(Status::invalid_argument(format!(
            "detection {i}: evidence id {:?} is not 64 lowercase hex digits",
            bad.chars().take(80).collect::<String>()
        )));
    }
    bound(d.mitre.len() <= bounds::MITRE, "detection", i, || {
        format!(
            "mitre has {} entries (at most {})",
            d.mitre.len(),
            bounds::MITRE
        )
    })?;
    bound(
        d.mitre.iter().all(|m| m.len() <= bounds::MITRE_ID),
        "detection",
        i,
        || format!("a mitre id is longer than {} bytes", bounds::MITRE_ID),
    )?;
    bound(
        d.evidence_ids.len() <= bounds::MITRE,
        "detection",
        i,
        || {
            format!(
                "{} evidence ids (at most {})",
                d.evidence_ids.len(),
                bounds::MITRE
            )
        },
    )?;
    check_strings(
        "detection",
        i,
        &[
            ("summary", &d.summary),
            ("exe", &d.exe),
            ("comm", &d.comm),
            ("workload_key", &d.workload_key),
            ("detected_at", &d.detected_at),
            ("rule_source", &d.rule_source),
            ("capture", &d.capture),
        ],
    )?;
    check_argv("detection", i, "argv", &d.argv)?;
    check_ancestry("detection", i, &d.ancestry)?;
    check_process("detection", i, d.process.as_ref())?;
    if let Some(ev) = &d.event {
        check_strings("detection", i, &[("event comm", &ev.comm)])?;
    }
    let built = d.json.is_empty();
    if built {
        // A structured detection (agents >= 0.2): stored as its JSON
        // document, like an old agent's (the indexed fields stay).
        d.json = vigil_proto::document::detection_json(d).ok_or_else(|| {
            Status::invalid_argument(format!(
                "detection {i}: neither json nor a structured triggering event"
            ))
        })?;
        d.event = None;
        d.process = None;
        d.repeat = None;
    }
    bound(d.json.len() <= bounds::JSON, "detection", i, || {
        format!("json has {} bytes (at most {})", d.json.len(), bounds::JSON)
    })?;
    if !built {
        check_json("detection", i, &d.json)?;
    }
    check_workload(&mut d.workload_key, &d.json);
    Ok(())
}

fn upload_status(e: UploadError) -> Status {
    match e {
        UploadError::InvalidId(_) | UploadError::Invalid(_) => {
            Status::invalid_argument(e.to_string())
        }
        UploadError::TooLarge { .. } => Status::failed_precondition(e.to_string()),
        UploadError::TooManyPartials(_) | UploadError::TooManyAgentPartials { .. } => {
            Status::resource_exhausted(e.to_string())
        }
        UploadError::BadBundle(_) => Status::invalid_argument(e.to_string()),
        // Set aside by the agent (not retried): only an operator can tell
        // a misconfigured agent from an impersonation.
        UploadError::Origin(_) => Status::failed_precondition(e.to_string()),
        UploadError::Gap { .. } => Status::out_of_range(e.to_string()),
        UploadError::OtherUploader => Status::permission_denied(e.to_string()),
        UploadError::HashMismatch { .. } => Status::data_loss(e.to_string()),
        // Retried by the agent (from offset 0, the collector kept nothing):
        // the prefix on the collector's disk may be what was wrong.
        UploadError::ResumeMismatch { .. } => Status::aborted(e.to_string()),
        UploadError::Io(io) => {
            warn!(error = %io, "evidence storage failure");
            Status::internal(format!("collector storage failure: {io}"))
        }
    }
}

/// How long a stream may wait for its next message: `idle` per message,
/// and for an upload a deadline for the whole call.
struct Pace {
    idle: Duration,
    deadline: Option<(Instant, Duration)>,
}

impl Pace {
    /// A batch stream: the idle limit only.
    fn stream(l: &Limits) -> Pace {
        Pace {
            idle: l.stream_idle_timeout,
            deadline: None,
        }
    }

    /// An upload: the idle limit and the upload deadline, from now.
    fn upload(l: &Limits) -> Pace {
        Pace {
            idle: l.stream_idle_timeout,
            deadline: Some((Instant::now() + l.upload_deadline, l.upload_deadline)),
        }
    }
}

impl IngestService {
    /// The next message of `stream`, within `pace` (`DEADLINE_EXCEEDED`
    /// past it, counted as refusal `idle` or `deadline`).
    async fn next<T>(&self, stream: &mut Streaming<T>, pace: &Pace) -> Result<Option<T>, Status> {
        let now = Instant::now();
        let (wait, by_deadline) = match pace.deadline {
            Some((at, _)) if at.saturating_duration_since(now) < pace.idle => {
                (at.saturating_duration_since(now), true)
            }
            _ => (pace.idle, false),
        };
        match tokio::time::timeout(wait, stream.message()).await {
            Ok(r) => r.map_err(stream_status),
            Err(_) if by_deadline => {
                self.metrics.refused("deadline");
                let total = pace.deadline.map(|(_, d)| d).unwrap_or_default();
                Err(Status::deadline_exceeded(format!(
                    "upload took longer than {} (collector --upload-deadline): what arrived is kept, resume from UploadStatus",
                    humantime::format_duration(total)
                )))
            }
            Err(_) => {
                self.metrics.refused("idle");
                Err(Status::deadline_exceeded(format!(
                    "no message for {} (collector --stream-idle-timeout): stream closed",
                    humantime::format_duration(pace.idle)
                )))
            }
        }
    }
}

/// Held while an upload of one bundle runs; refuses a second one.
struct InProgress {
    set: Arc<Mutex<HashSet<BundleId>>>,
    id: BundleId,
    _slot: Slot,
}

impl Drop for InProgress {
    fn drop(&mut self) {
        if let Ok(mut s) = self.set.lock() {
            s.remove(&self.id);
        }
    }
}

/// Runs a blocking step of an upload off the async threads. The guard
/// travels with it so the bundle stays locked until the disk work is done,
/// even when the call is cancelled meanwhile.
async fn blocking<R: Send + 'static>(
    guard: &Arc<InProgress>,
    f: impl FnOnce() -> R + Send + 'static,
) -> Result<R, Status> {
    let g = Arc::clone(guard);
    tokio::task::spawn_blocking(move || {
        let r = f();
        drop(g);
        r
    })
    .await
    .map_err(|e| Status::internal(format!("upload task failed: {e}")))
}

async fn write_chunk(
    guard: &Arc<InProgress>,
    mut up: Upload,
    data: Vec<u8>,
) -> Result<(Upload, Result<(), Status>), Status> {
    // `write` leaves `up` consistent on error (nothing past the failure).
    let (up, r) = blocking(guard, move || {
        let r = up.write(&data);
        (up, r)
    })
    .await?;
    Ok((up, r.map_err(upload_status)))
}

#[tonic::async_trait]
impl Ingest for IngestService {
    async fn push_events(
        &self,
        req: Request<Streaming<EventBatch>>,
    ) -> Result<Response<PushAck>, Status> {
        const M: &str = "PushEvents";
        let agent = self.seen(&req, M).await?;
        let mut stream = req.into_inner();
        let mut ack = PushAck::default();
        let result: Result<(), Status> = async {
            let pace = Pace::stream(&self.limits);
            while let Some(batch) = self.next(&mut stream, &pace).await? {
                let mut events = batch.events;
                self.check_batch("events", &batch.batch_id, events.len())?;
                let mut bytes = 0;
                for (i, e) in events.iter_mut().enumerate() {
                    check_event(i, e)?;
                    bytes += e.json.len();
                }
                let n = events.len() as u64;
                self.quotas.admit(&agent, Kind::Events, n, true)?;
                let outcome = self
                    .store
                    .insert_events(&agent, &batch.batch_id, events, now_ns())
                    .await
                    .map_err(|e| internal(M, &e));
                self.settle(&agent, Kind::Events, n, &outcome);
                self.record("events", outcome?, bytes, &mut ack);
            }
            Ok(())
        }
        .await;
        if let Err(s) = result {
            self.metrics.error(M, &s);
            info!(agent, code = ?s.code(), reason = s.message(), stored_batches = ack.batches, "event stream refused");
            return Err(s);
        }
        debug!(
            agent,
            accepted = ack.accepted,
            batches = ack.batches,
            "events stored"
        );
        Ok(Response::new(ack))
    }

    async fn push_detections(
        &self,
        req: Request<Streaming<DetectionBatch>>,
    ) -> Result<Response<PushAck>, Status> {
        const M: &str = "PushDetections";
        let agent = self.seen(&req, M).await?;
        let mut stream = req.into_inner();
        let mut ack = PushAck::default();
        let result: Result<(), Status> = async {
            let pace = Pace::stream(&self.limits);
            while let Some(batch) = self.next(&mut stream, &pace).await? {
                let mut detections = batch.detections;
                self.check_batch("detections", &batch.batch_id, detections.len())?;
                let mut bytes = 0;
                for (i, d) in detections.iter_mut().enumerate() {
                    check_detection(i, d)?;
                    bytes += d.json.len();
                }
                let n = detections.len() as u64;
                self.quotas.admit(&agent, Kind::Detections, n, true)?;
                let outcome = self
                    .store
                    .insert_detections(&agent, &batch.batch_id, detections, now_ns())
                    .await
                    .map_err(|e| internal(M, &e));
                self.settle(&agent, Kind::Detections, n, &outcome);
                self.record("detections", outcome?, bytes, &mut ack);
            }
            Ok(())
        }
        .await;
        if let Err(s) = result {
            self.metrics.error(M, &s);
            info!(agent, code = ?s.code(), reason = s.message(), "detection stream refused");
            return Err(s);
        }
        info!(
            agent,
            accepted = ack.accepted,
            batches = ack.batches,
            "detections stored"
        );
        Ok(Response::new(ack))
    }

    async fn upload_evidence(
        &self,
        req: Request<Streaming<EvidenceChunk>>,
    ) -> Result<Response<UploadResult>, Status> {
        const M: &str = "UploadEvidence";
        let agent = self.seen(&req, M).await?;
        let result = self.upload(&agent, req.into_inner()).await;
        match &result {
            Ok(r) if r.complete => self.metrics.upload("complete"),
            Ok(_) => self.metrics.upload("suspended"),
            Err(s) => {
                self.metrics.upload("refused");
                self.metrics.error(M, s);
                info!(agent, code = ?s.code(), reason = s.message(), "evidence upload refused");
            }
        }
        result.map(Response::new)
    }

    async fn upload_status(
        &self,
        req: Request<UploadStatusRequest>,
    ) -> Result<Response<UploadStatusReply>, Status> {
        const M: &str = "UploadStatus";
        let agent = self.seen(&req, M).await?;
        let id = BundleId::parse(&req.get_ref().bundle_id)
            .map_err(upload_status)
            .inspect_err(|s| self.metrics.error(M, s))?;
        let blobs = Arc::clone(&self.blobs);
        let id2 = id.clone();
        let state = tokio::task::spawn_blocking(move || blobs.state(&id2))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| upload_status(e.into()))?;
        let reply = match state {
            BlobState::Absent => UploadStatusReply {
                bundle_id: id.to_string(),
                ..Default::default()
            },
            BlobState::Partial { received, meta } => UploadStatusReply {
                bundle_id: id.to_string(),
                received,
                complete: false,
                total_size: meta.total_size,
                receipt: String::new(),
            },
            BlobState::Complete { size } => {
                let receipt = self.ensure_recorded(&id, &agent, size, "", None).await?;
                UploadStatusReply {
                    bundle_id: id.to_string(),
                    received: size,
                    complete: true,
                    total_size: size,
                    receipt,
                }
            }
        };
        Ok(Response::new(reply))
    }

    async fn commit_evidence(
        &self,
        req: Request<EvidenceCommitment>,
    ) -> Result<Response<CommitEvidenceReply>, Status> {
        const M: &str = "CommitEvidence";
        let agent = self.seen(&req, M).await?;
        let result = self.commit(&agent, req.into_inner()).await;
        if let Err(s) = &result {
            self.metrics.error(M, s);
            info!(agent, code = ?s.code(), reason = s.message(), "evidence commitment refused");
        }
        result.map(Response::new)
    }
}

/// Most commitments an agent may hold without their bundle stored: a
/// sealed bundle is uploaded within its spool's bounds, so more means an
/// agent announcing bundles it never sends.
pub const MAX_OPEN_COMMITMENTS: u64 = 10_000;

impl IngestService {
    /// Checks and records a commitment: a valid id at a real place in the
    /// chain, a size the collector would accept, and (when present, or
    /// required) the agent's own signature of the id.
    async fn commit(
        &self,
        agent: &str,
        c: EvidenceCommitment,
    ) -> Result<CommitEvidenceReply, Status> {
        const M: &str = "CommitEvidence";
        let id = BundleId::parse(&c.bundle_id).map_err(upload_status)?;
        if c.seq == 0 {
            return Err(Status::invalid_argument(
                "a commitment needs the bundle's seq (>= 1)",
            ));
        }
        if !(c.prev_bundle_id.is_empty() || vigil_proto::is_valid_bundle_id(&c.prev_bundle_id)) {
            return Err(Status::invalid_argument(
                "prev_bundle_id must be empty or 64 lowercase hex characters",
            ));
        }
        if c.size == 0 || c.size > self.limits.max_bundle_bytes {
            return Err(upload_status(UploadError::TooLarge {
                size: c.size,
                limit: self.limits.max_bundle_bytes,
            }));
        }
        let sig = if c.signature.is_empty() {
            None
        } else {
            Some(
                Signature::parse(&c.signature)
                    .map_err(|e| Status::invalid_argument(format!("bundle {id}: {e}")))?,
            )
        };
        // The id is what is signed; there is no manifest yet to bind.
        self.origin
            .check(id.as_str(), agent, agent, sig.as_ref())
            .map_err(upload_status)?;
        let open = self
            .store
            .open_commitments(agent)
            .await
            .map_err(|e| internal(M, &e))?;
        if open >= MAX_OPEN_COMMITMENTS {
            self.metrics.refused("commitments");
            return Err(Status::resource_exhausted(format!(
                "agent {agent} holds {open} commitments whose bundles never arrived (the limit is {MAX_OPEN_COMMITMENTS}): upload them first"
            )));
        }
        let recorded = self
            .store
            .record_commitment(
                agent,
                &Commitment {
                    bundle_id: id.to_string(),
                    seq: c.seq,
                    prev_bundle_id: c.prev_bundle_id,
                    size: c.size,
                },
                now_ns(),
            )
            .await
            .map_err(|e| internal(M, &e))?;
        let mut conflicts = self
            .store
            .commitments_at(agent, c.seq)
            .await
            .map_err(|e| internal(M, &e))?;
        conflicts.retain(|b| b != id.as_str());
        if !conflicts.is_empty() {
            self.metrics.chain_breaks.inc();
            warn!(agent, bundle = %id, seq = c.seq, conflicts = ?conflicts, "evidence commitment: this agent committed another bundle at the same place in its chain");
        }
        debug!(agent, bundle = %id, seq = c.seq, recorded, "evidence commitment");
        Ok(CommitEvidenceReply {
            recorded,
            conflicts,
        })
    }

    /// A stored bundle's standing against its agent's commitments (see
    /// `EvidenceInfo.commitment`).
    async fn commitment_of(
        &self,
        id: &BundleId,
        agent: &str,
        seq: u64,
    ) -> Result<&'static str, Status> {
        if seq == 0 {
            return Ok("");
        }
        let ids = self
            .store
            .commitments_at(agent, seq)
            .await
            .map_err(|e| internal("UploadEvidence", &e))?;
        Ok(if ids.iter().any(|b| b == id.as_str()) {
            "committed"
        } else if ids.is_empty() {
            "uncommitted"
        } else {
            self.metrics.chain_breaks.inc();
            warn!(agent, bundle = %id, seq, committed = ?ids, "evidence: another bundle was committed at this place in the agent's chain: this one changed after it was sealed, or the chain forked");
            "contradicted"
        })
    }

    /// Records a complete blob in the store when it is not yet (a crash
    /// between the rename and the record leaves a blob without a record).
    /// Its manifest was checked before the rename; it is read again here.
    /// Returns the bundle's receipt (the first one: a bundle sent again
    /// gets the receipt of its first storing, with its time and place).
    async fn ensure_recorded(
        &self,
        id: &BundleId,
        agent: &str,
        size: u64,
        label: &str,
        sig: Option<&Signature>,
    ) -> Result<String, Status> {
        const M: &str = "UploadEvidence";
        if let Some(known) = self
            .store
            .evidence(id.as_str())
            .await
            .map_err(|e| internal(M, &e))?
        {
            debug!(agent, bundle = %id, first_by = known.agent, "bundle already stored: acknowledged with its first receipt");
            return Ok(known.receipt);
        }
        let path = self.blobs.blob_path(id);
        let facts = tokio::task::spawn_blocking(move || manifest_facts(&path))
            .await
            .map_err(|e| Status::internal(format!("upload task failed: {e}")))?
            .unwrap_or_else(|why| {
                warn!(bundle = %id, reason = %why, "a stored bundle's manifest does not verify");
                ManifestFacts::default()
            });
        // Checked before the blob was stored; checked again here (a crash
        // between the two), recorded unsigned when it does not hold.
        let origin = self
            .origin
            .check(id.as_str(), agent, &facts.agent, sig)
            .unwrap_or_else(|why| {
                warn!(bundle = %id, reason = %why, "a stored bundle's signature does not hold: recorded unsigned");
                Origin::default()
            });
        self.record_bundle(id, agent, size, label, facts, origin)
            .await
    }

    /// Records a stored bundle with its manifest facts and its place in
    /// the agent's chain of custody.
    async fn record_bundle(
        &self,
        id: &BundleId,
        agent: &str,
        size: u64,
        label: &str,
        f: ManifestFacts,
        origin: Origin,
    ) -> Result<String, Status> {
        const M: &str = "UploadEvidence";
        let mut chain = if f.seq == 0 {
            ""
        } else if f.prev_bundle_id.is_empty() {
            if f.seq == 1 {
                "first"
            } else {
                "broken"
            }
        } else {
            match self
                .store
                .evidence(&f.prev_bundle_id)
                .await
                .map_err(|e| internal(M, &e))?
            {
                None => "gap",
                // Stored by a collector that did not read manifests yet:
                // its seq is unknown, the id link is what we have.
                Some(p) if p.agent == agent && p.seq == 0 => "linked",
                Some(p) if p.agent == agent && p.seq + 1 == f.seq => "linked",
                Some(_) => "broken",
            }
        };
        // A fork: another bundle of this agent already names the same
        // predecessor (or is its first): one of them replaces a link of
        // the chain (a rewritten tail, a replay of a re-sealed bundle).
        let mut forks = Vec::new();
        if f.seq != 0 {
            forks = self
                .store
                .successors(agent, &f.prev_bundle_id)
                .await
                .map_err(|e| internal(M, &e))?;
            forks.retain(|b| b != id.as_str());
            if !forks.is_empty() {
                chain = "fork";
            }
        }
        if chain == "gap" || chain == "broken" || chain == "fork" {
            self.metrics.chain_breaks.inc();
            warn!(agent, bundle = %id, seq = f.seq, prev = f.prev_bundle_id, chain, forks = ?forks, "evidence chain of custody: the previous bundle is not stored here, does not precede this one, or already has another successor");
        }
        if !origin.signed {
            self.metrics.unsigned_evidence.inc();
            if f.agent != agent {
                warn!(agent, bundle = %id, manifest_agent = f.agent, "unsigned bundle whose manifest names another agent: kept, marked unsigned");
            }
        }
        let commitment = self.commitment_of(id, agent, f.seq).await?;
        let stored = now_ns();
        let receipt = self
            .origin
            .receipt(vigil_bundle::sign::Receipt {
                bundle_id: id.to_string(),
                agent: agent.to_string(),
                seq: f.seq,
                prev_bundle_sha256: f.prev_bundle_id.clone(),
                chain: chain.to_string(),
                signed: origin.signed,
                signer_sha256: origin.signer_sha256.clone(),
                stored_unix_nanos: stored,
                ..Default::default()
            })
            .unwrap_or_default();
        self.store
            .record_evidence(EvidenceInfo {
                bundle_id: id.to_string(),
                agent: agent.to_string(),
                size,
                stored_unix_nanos: stored,
                label: label.to_string(),
                pid: f.pid,
                rule: f.rule,
                detection_unix_nanos: f.detection_unix_nanos,
                seq: f.seq,
                prev_bundle_id: f.prev_bundle_id,
                chain: chain.to_string(),
                manifest_agent: f.agent,
                origin: origin.label().to_string(),
                signature: origin.signature.clone(),
                receipt: receipt.clone(),
                commitment: commitment.to_string(),
            })
            .await
            .map_err(|e| internal(M, &e))?;
        self.quotas.add(agent, Kind::Evidence, size);
        info!(agent, bundle = %id, size, seq = f.seq, chain, origin = origin.label(), commitment, "evidence stored");
        Ok(receipt)
    }

    async fn upload(
        &self,
        agent: &str,
        mut stream: Streaming<EvidenceChunk>,
    ) -> Result<UploadResult, Status> {
        let slot = self.upload_slots.try_acquire(agent).map_err(|r| {
            self.metrics.refused(r.reason());
            Status::resource_exhausted(r.to_string())
        })?;
        let pace = Pace::upload(&self.limits);
        let first = self
            .next(&mut stream, &pace)
            .await?
            .ok_or_else(|| Status::invalid_argument("empty upload: no chunk"))?;
        let id = BundleId::parse(&first.bundle_id).map_err(upload_status)?;
        let total = first.total_size;
        if total == 0 {
            return Err(Status::invalid_argument(
                "the first chunk must carry total_size > 0",
            ));
        }
        if total > self.limits.max_bundle_bytes {
            return Err(upload_status(UploadError::TooLarge {
                size: total,
                limit: self.limits.max_bundle_bytes,
            }));
        }
        let sig = if first.signature.is_empty() {
            None
        } else {
            Some(
                vigil_bundle::sign::Signature::parse(&first.signature)
                    .map_err(|e| Status::invalid_argument(format!("bundle {id}: {e}")))?,
            )
        };
        if first.label.len() > MAX_LABEL {
            return Err(Status::invalid_argument(format!(
                "label longer than {MAX_LABEL} bytes"
            )));
        }
        let guard = {
            let mut set = self
                .in_progress
                .lock()
                .map_err(|_| Status::internal("upload lock poisoned"))?;
            if !set.insert(id.clone()) {
                return Err(Status::aborted(
                    "an upload of this bundle is already in progress: retry after it ends",
                ));
            }
            Arc::new(InProgress {
                set: Arc::clone(&self.in_progress),
                id: id.clone(),
                _slot: slot,
            })
        };

        let blobs = Arc::clone(&self.blobs);
        let id2 = id.clone();
        if let BlobState::Complete { size } = blocking(&guard, move || blobs.state(&id2))
            .await?
            .map_err(|e| upload_status(e.into()))?
        {
            // Content-addressed: someone already stored these exact bytes
            // (a replay gets the first receipt, not a new one).
            let receipt = self
                .ensure_recorded(&id, agent, size, &first.label, sig.as_ref())
                .await?;
            return Ok(UploadResult {
                bundle_id: id.to_string(),
                received: size,
                complete: true,
                receipt,
            });
        }
        // Checked before anything of the bundle is kept (a bundle already
        // stored, above, is acknowledged whatever the quota); what the
        // agent stored before, and a partial upload of it, stay.
        self.quotas.admit(agent, Kind::Evidence, total, false)?;

        let meta = PartialMeta {
            total_size: total,
            agent: agent.to_string(),
            label: first.label.clone(),
            durable: None,
        };
        let (blobs, id2, max_partials, offset) = (
            Arc::clone(&self.blobs),
            id.clone(),
            PartialLimits {
                total: self.limits.max_partial_uploads,
                per_agent: self.limits.max_partial_uploads_per_agent,
            },
            first.offset,
        );
        let mut up = blocking(&guard, move || {
            blobs.begin(&id2, meta, offset, max_partials)
        })
        .await?
        .map_err(|e| {
            if let Some(reason) = e.refusal_reason() {
                self.metrics.refused(reason);
            }
            upload_status(e)
        })?;
        debug!(agent, bundle = %id, offset, total, "upload started");
        let mut received = first.data.len() as u64;
        let (u, mut res) = write_chunk(&guard, up, first.data).await?;
        up = u;
        while res.is_ok() && !up.is_full() {
            match self.next(&mut stream, &pace).await {
                Ok(Some(chunk)) => {
                    res = check_chunk(&id, total, up.position(), &chunk);
                    if res.is_ok() {
                        received += chunk.data.len() as u64;
                        let (u, r) = write_chunk(&guard, up, chunk.data).await?;
                        up = u;
                        res = r;
                    }
                }
                // The agent stopped early: keep what arrived.
                Ok(None) => break,
                Err(s) => res = Err(s),
            }
        }
        Metrics::of(&self.metrics.bytes, "evidence").inc_by(received);
        if let Err(s) = res {
            // Keep the consistent prefix for a resume.
            let held = blocking(&guard, move || up.suspend()).await?;
            debug!(bundle = %id, held = ?held.as_ref().ok(), "upload interrupted");
            return Err(s);
        }
        if !up.is_full() {
            let held = blocking(&guard, move || up.suspend())
                .await?
                .map_err(upload_status)?;
            info!(agent, bundle = %id, held, total, "upload suspended");
            return Ok(UploadResult {
                bundle_id: id.to_string(),
                received: held,
                complete: false,
                receipt: String::new(),
            });
        }
        let limits = vigil_bundle::VerifyLimits {
            max_expanded_bytes: self.limits.max_bundle_expanded_bytes,
            ..vigil_bundle::VerifyLimits::default()
        };
        let (policy, id2, uploader) = (Arc::clone(&self.origin), id.clone(), agent.to_string());
        let (size, (facts, origin)) = blocking(&guard, move || {
            up.finish_checked(|p| {
                let facts = manifest_facts_within(p, limits)?;
                let origin = policy.check(id2.as_str(), &uploader, &facts.agent, sig.as_ref())?;
                Ok((facts, origin))
            })
        })
        .await?
        .map_err(|e| {
            if matches!(e, UploadError::Origin(_)) {
                self.metrics.refused("origin");
            }
            upload_status(e)
        })?;
        let receipt = self
            .record_bundle(&id, agent, size, &first.label, facts, origin)
            .await?;
        Ok(UploadResult {
            bundle_id: id.to_string(),
            received: size,
            complete: true,
            receipt,
        })
    }
}

/// A chunk after the first must continue the same bundle where the last
/// one ended.
fn check_chunk(id: &BundleId, total: u64, position: u64, c: &EvidenceChunk) -> Result<(), Status> {
    if !c.bundle_id.is_empty() && c.bundle_id != id.as_str() {
        return Err(Status::invalid_argument(
            "bundle_id changed within one upload stream",
        ));
    }
    if c.total_size != 0 && c.total_size != total {
        return Err(Status::invalid_argument(
            "total_size changed within one upload stream",
        ));
    }
    if c.offset != position {
        return Err(Status::invalid_argument(format!(
            "chunk at offset {} but the previous one ended at {position}",
            c.offset
        )));
    }
    Ok(())
}
