//! Shipping to the collector: detections and evidence bundles leave the
//! agent through an on-disk [`spool`] and a gRPC [`client`] with mutual TLS.
//!
//! Flow: the pipeline hands each detection's wire form to the shipper
//! thread through a bounded channel (never blocks; a full channel drops it,
//! counted in `vigil_spool_dropped_total`); the capture worker queues each
//! sealed archive into the spool itself (it is off the event path). The
//! shipper thread ("vigil-ship", its own single-threaded runtime) writes
//! detections into the spool and sends the spool in order, removing an item
//! only once the collector acknowledged it. When the collector is down or
//! refuses us, it backs off exponentially (1 s to 60 s) and retries; the
//! spool keeps everything meanwhile, across agent restarts.
//!
//! Two lanes, one thread, one connection, one back-off: the spool
//! (detections and bundles) is the priority lane; ordinary events
//! ([`events`]) are the best-effort lane, in memory, served one batch at a
//! time and only when the spool is empty, so they never delay or displace
//! a detection or a bundle.

pub mod client;
pub mod events;
pub mod kept;
pub mod receipts;
pub mod spool;
pub mod wire;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tracing::{debug, error, info, warn};

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::{channel, Receiver, Sender};

use crate::metrics::{KindLabel, Metrics};
use client::{Client, PkiFiles, ShipError};
use events::{EventLane, EventSink, Handover, Intake};
use spool::{Item, ItemKind, Priority, Spool};

/// Detections waiting for the shipper thread.
const QUEUE: usize = 4096;
/// Most detections per PushDetections call.
const MAX_DETECTIONS_PER_CALL: usize = 500;
/// Back-off bounds.
pub(crate) const BACKOFF_MIN: Duration = Duration::from_secs(1);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How often an idle shipper looks at the spool anyway.
const IDLE_RECHECK: Duration = Duration::from_secs(30);
/// Longest one batch of events may take to send.
const EVENT_SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// At shutdown, what is left of the event lane gets this long.
const EVENT_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Shipping settings (from the agent config).
#[derive(Clone, Debug)]
pub struct ShipOptions {
    /// Collector URL, e.g. `https://127.0.0.1:7443`.
    pub collector: String,
    /// PKI directory (init-pki layout).
    pub pki_dir: PathBuf,
    /// This agent's certificate name.
    pub agent_name: String,
    /// Spool directory.
    pub spool_dir: PathBuf,
    /// Spool byte limit.
    pub spool_max_bytes: u64,
    /// Spool item limit.
    pub spool_max_items: u64,
    /// Where the sealed archives are (the capture's bundle directory):
    /// once the collector acknowledged one, it leaves the node, except the
    /// newest acknowledged ones up to `keep_shipped_bytes`.
    pub archive_dir: Option<PathBuf>,
    /// Bytes of acknowledged archives kept on the node for local analysis.
    pub keep_shipped_bytes: u64,
}

enum Msg {
    /// A detection's protobuf encoding.
    Detection(Vec<u8>, Priority),
    Wake,
    /// Everything sent before this is in the spool (and the events handed
    /// over so far had a bounded chance to leave): reply.
    Flush(std::sync::mpsc::Sender<()>),
}

/// Handle given to the pipeline and the capture worker. Cheap to clone.
#[derive(Clone)]
pub struct Shipper {
    tx: Sender<Msg>,
    /// The best-effort lane's entrance (see [`Shipper::event_sink`]).
    events: Handover,
    /// Detections in the channel: those below high may use only 3/4 of it.
    pending: Arc<std::sync::atomic::AtomicUsize>,
    spool: Arc<Spool>,
    metrics: Arc<Metrics>,
    /// Signs each bundle handed over (proof of origin), with the key of
    /// the agent's collector certificate; `None` when that key cannot sign.
    signer: Option<Arc<Signer>>,
}

/// The agent's bundle signer: its certificate key and name.
struct Signer {
    key: vigil_bundle::sign::SigningKey,
    name: String,
    /// A bundle naming another agent was met (warned once).
    warned: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Shipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shipper").finish_non_exhaustive()
    }
}

impl Shipper {
    /// Opens the spool and starts the shipper thread.
    pub fn start(opts: ShipOptions, metrics: Arc<Metrics>) -> anyhow::Result<Shipper> {
        let spool = Arc::new(
            Spool::open(
                &opts.spool_dir,
                opts.spool_max_bytes,
                opts.spool_max_items,
                metrics.clone(),
            )
            .map_err(|e| anyhow::anyhow!("spool directory {}: {e}", opts.spool_dir.display()))?,
        );
        let files = PkiFiles::in_dir(&opts.pki_dir, &opts.agent_name);
        for p in [&files.ca, &files.cert, &files.key] {
            anyhow::ensure!(
                p.exists(),
                "collector PKI file {} is missing (create it with `vigil-collector init-pki --dir {} --agent {}`)",
                p.display(),
                opts.pki_dir.display(),
                opts.agent_name
            );
        }
        let signer = signer(&files, &opts.agent_name);
        let receipts = receipts::Receipts::new(
            &opts.spool_dir,
            &opts.agent_name,
            std::fs::read_to_string(&files.ca).map_err(|e| format!("{}: {e}", files.ca.display())),
        );
        let (items, bytes) = spool.usage();
        info!(collector = %opts.collector, spool = %opts.spool_dir.display(), items, bytes, "shipping to the collector");
        let (tx, rx) = channel(QUEUE);
        let (events, events_rx) = events::handover();
        let pending = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let worker = Worker {
            url: opts.collector,
            files,
            spool: spool.clone(),
            metrics: metrics.clone(),
            client: None,
            pending: pending.clone(),
            archive_dir: opts.archive_dir,
            keep_shipped_bytes: opts.keep_shipped_bytes,
            lane: EventLane::new(metrics.clone()),
            receipts,
            committed: Default::default(),
            commit_unsupported: false,
        };
        std::thread::Builder::new()
            .name("vigil-ship".into())
            .spawn(move || worker.run(rx, events_rx))?;
        Ok(Shipper {
            tx,
            events,
            pending,
            spool,
            metrics,
            signer,
        })
    }

    /// Queues a detection in its wire form (protobuf); never blocks.
    /// `high`: a high or critical detection, which has reserved room in
    /// the channel and the spool.
    pub fn detection(&self, wire: Vec<u8>, high: bool) {
        use std::sync::atomic::Ordering;
        let prio = if high {
            Priority::High
        } else {
            Priority::Normal
        };
        if !high && self.pending.load(Ordering::Relaxed) >= QUEUE / 4 * 3 {
            self.metrics.spool_dropped.inc();
            warn!("shipping queue 3/4 full: detection below high not shipped (room kept for high and critical)");
            return;
        }
        self.pending.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(Msg::Detection(wire, prio)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Closed(_)) => {
                self.pending.fetch_sub(1, Ordering::Relaxed);
                self.metrics.spool_dropped.inc();
                warn!("shipping queue full: detection not shipped");
            }
        }
    }

    /// At shutdown: waits (at most `timeout`) until every detection handed
    /// over so far is in the spool, so the next start ships it. Whatever
    /// the timeout leaves in the channel is lost (logged).
    pub fn flush(&self, timeout: Duration) {
        let (tx, rx) = std::sync::mpsc::channel();
        let sent = match send_timeout(&self.tx, Msg::Flush(tx), timeout) {
            Ok(()) => rx.recv_timeout(timeout).is_ok(),
            Err(()) => false,
        };
        if !sent {
            warn!("shipper busy at shutdown: detections not yet spooled are lost");
        }
    }

    /// Queues a sealed evidence archive (from the capture worker, right
    /// after sealing: does file I/O). The archive stays where it is. Its id
    /// is signed first (proof of origin: the signature goes with the
    /// upload), when its manifest names this agent's certificate.
    pub fn bundle(&self, archive: &Path, id: &str, high: bool) {
        if let Some(s) = &self.signer {
            self.sign(s, archive, id);
        }
        let prio = if high {
            Priority::High
        } else {
            Priority::Normal
        };
        match self.spool.enqueue_bundle(archive, id, prio) {
            Ok(p) => debug!(bundle = id, path = %p.display(), "bundle spooled"),
            Err(e) => {
                // A full spool counts its refusals itself.
                if !matches!(e, spool::SpoolError::Full { .. }) {
                    self.metrics.spool_dropped.inc();
                }
                warn!(bundle = id, archive = %archive.display(), error = %e, "bundle not spooled: it stays in the capture directory but will not reach the collector")
            }
        }
        let _ = self.tx.try_send(Msg::Wake);
    }
}

/// The signer from the agent's certificate and key (`None`, logged, when
/// they cannot sign: bundles then leave unsigned).
fn signer(files: &PkiFiles, name: &str) -> Option<Arc<Signer>> {
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    let key = read(&files.cert).and_then(|c| {
        read(&files.key).and_then(|k| {
            vigil_bundle::sign::SigningKey::from_pem(&c, &k).map_err(|e| e.to_string())
        })
    });
    match key {
        Ok(key) => Some(Arc::new(Signer {
            key,
            name: name.to_string(),
            warned: Default::default(),
        })),
        Err(e) => {
            warn!(
                error = e,
                "the agent certificate's key cannot sign evidence: bundles are shipped unsigned"
            );
            None
        }
    }
}

impl Shipper {
    fn sign(&self, s: &Signer, archive: &Path, id: &str) {
        use std::sync::atomic::Ordering;
        // The collector binds the manifest's agent id to the certificate
        // name: a bundle naming another id would be refused once signed.
        match vigil_bundle::read_manifest(archive) {
            Ok(m) if m.agent.id == s.name => {}
            Ok(m) => {
                if !s.warned.swap(true, Ordering::Relaxed) {
                    warn!(manifest_agent = m.agent.id, certificate = s.name, "bundles name another agent id than the collector certificate: shipped unsigned (set [capture] agent_id to the certificate name)");
                }
                return;
            }
            Err(e) => {
                warn!(bundle = id, error = %e, "reading the manifest to sign the bundle: shipped unsigned");
                return;
            }
        }
        let sig = match s.key.sign_bundle(id) {
            Ok(sig) => sig,
            Err(e) => {
                warn!(bundle = id, error = %e, "signing the bundle failed: shipped unsigned");
                return;
            }
        };
        if let Err(e) = self.spool.put_signature(id, &sig.to_bytes()) {
            warn!(bundle = id, error = %e, "storing the bundle's signature failed: shipped unsigned");
        }
    }
}

impl crate::outputs::Forward for Shipper {
    fn detection(&self, d: &crate::model::Detection) {
        let wire = wire::detection(d);
        Shipper::detection(self, wire, d.severity >= crate::model::Severity::High);
    }

    fn bundle(&self, archive: &Path, id: &str, high: bool) {
        Shipper::bundle(self, archive, id, high);
    }
}

impl Shipper {
    /// The pipeline's sink for ordinary events (the best-effort lane).
    pub fn event_sink(&self) -> EventSink {
        EventSink::new(self.events.clone(), self.metrics.clone())
    }
}

/// A blocking send with a deadline, from a thread outside any runtime:
/// retries `try_send`.
fn send_timeout(tx: &Sender<Msg>, mut m: Msg, timeout: Duration) -> Result<(), ()> {
    let deadline = Instant::now() + timeout;
    loop {
        match tx.try_send(m) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Closed(_)) => return Err(()),
            Err(TrySendError::Full(back)) => {
                if Instant::now() >= deadline {
                    return Err(());
                }
                m = back;
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

struct Worker {
    url: String,
    files: PkiFiles,
    spool: Arc<Spool>,
    metrics: Arc<Metrics>,
    client: Option<Client>,
    pending: Arc<std::sync::atomic::AtomicUsize>,
    archive_dir: Option<PathBuf>,
    keep_shipped_bytes: u64,
    lane: EventLane,
    receipts: receipts::Receipts,
    /// Spooled bundles already committed to this run (a restart commits
    /// again: the collector records a commitment once); only ids still in
    /// the spool are kept.
    committed: std::collections::HashSet<String>,
    /// The collector predates commitments: none sent until reconnected.
    commit_unsupported: bool,
}

impl Worker {
    fn run(mut self, rx: Receiver<Msg>, events: Intake) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                error!(error = %e, "shipper runtime failed: nothing will be shipped");
                return;
            }
        };
        rt.block_on(self.serve(rx, events));
    }

    /// The loop: take what arrives (detections into the spool, events into
    /// their batches), then send: the spool first, whole and in order; a
    /// batch of events only when the spool is done. One back-off for both.
    async fn serve(&mut self, mut rx: Receiver<Msg>, mut events: Intake) {
        let mut backoff = BACKOFF_MIN;
        let mut retry_at: Option<Instant> = None;
        // The spool may hold items from the last run.
        let mut spool_due = true;
        let mut recheck_at = Instant::now() + IDLE_RECHECK;
        let mut events_open = true;
        loop {
            let now = Instant::now();
            let work = spool_due || self.lane.ready();
            let wake = match retry_at {
                Some(t) => t,
                None if work => now,
                None => recheck_at,
            };
            let wake = self.lane.due().map_or(wake, |d| d.min(wake));
            tokio::select! {
                biased;
                m = rx.recv() => match m {
                    Some(m) => {
                        if matches!(m, Msg::Flush(_)) {
                            // The events handed over before it, too.
                            while let Some(e) = events.try_recv() {
                                self.lane.push(e);
                            }
                        }
                        self.take(m).await;
                        spool_due = true;
                    }
                    // The agent is shutting down: what is not sent stays in
                    // the spool for the next start.
                    None => return,
                },
                e = events.recv(), if events_open => match e {
                    Some(e) => self.lane.push(e),
                    None => events_open = false,
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
            // What else is waiting, bounded (the event lane is best effort).
            while let Ok(m) = rx.try_recv() {
                if matches!(m, Msg::Flush(_)) {
                    while let Some(e) = events.try_recv() {
                        self.lane.push(e);
                    }
                }
                self.take(m).await;
                spool_due = true;
            }
            for _ in 0..events::CHUNKS_PER_TURN {
                match events.try_recv() {
                    Some(e) => self.lane.push(e),
                    None => break,
                }
            }
            self.lane.close_if_due();
            let now = Instant::now();
            if now >= recheck_at {
                spool_due = true;
                recheck_at = now + IDLE_RECHECK;
            }
            if retry_at.is_some_and(|t| t > now) {
                continue;
            }
            retry_at = None;
            let sent = if spool_due {
                self.ship_all().await.map(|()| spool_due = false)
            } else if self.lane.ready() {
                self.send_events(EVENT_SEND_TIMEOUT).await
            } else {
                continue;
            };
            match sent {
                Ok(()) => backoff = BACKOFF_MIN,
                Err(e) => {
                    self.metrics.ship_errors.inc();
                    self.client = None;
                    self.commit_unsupported = false;
                    match &e {
                        ShipError::Auth(_) => {
                            error!(error = %e, retry_in_s = backoff.as_secs(), "shipping to the collector failed: check the agent certificate and the collector's CA")
                        }
                        _ => {
                            warn!(error = %e, retry_in_s = backoff.as_secs(), held_event_batches = self.lane.held(), "shipping to the collector failed; the spool keeps the items, events are held in memory")
                        }
                    }
                    retry_at = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// One batch of events, bounded in time. Cancel-safe: a batch leaves
    /// the lane only once acknowledged, so one cut off by the timeout is
    /// sent again (same id: stored once).
    async fn send_events(&mut self, timeout: Duration) -> Result<(), ShipError> {
        let sent = tokio::time::timeout(timeout, async {
            self.connect().await?;
            match self.client.as_mut() {
                Some(c) => self.lane.send_one(c).await,
                None => Err(ShipError::Retry("not connected".into())),
            }
        })
        .await;
        sent.unwrap_or_else(|_| Err(ShipError::Retry("sending events timed out".into())))
    }

    async fn take(&mut self, m: Msg) {
        match m {
            Msg::Detection(wire, prio) => {
                self.pending
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                if let Err(e) = self.spool.enqueue_detection(&wire, prio) {
                    warn!(error = %e, "detection not spooled: it will not reach the collector");
                }
            }
            Msg::Wake => {}
            Msg::Flush(reply) => {
                // Shutting down: the events handed over so far get a short,
                // bounded chance (they are best effort; detections are
                // already safe in the spool).
                self.lane.close();
                let deadline = Instant::now() + EVENT_FLUSH_TIMEOUT;
                while self.lane.ready() {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() || self.send_events(left).await.is_err() {
                        break;
                    }
                }
                let _ = reply.send(());
            }
        }
    }

    async fn client(&mut self) -> Result<&mut Client, ShipError> {
        self.connect().await?;
        Ok(self.client.as_mut().expect("just set"))
    }

    /// Connects unless connected.
    async fn connect(&mut self) -> Result<(), ShipError> {
        if self.client.is_none() {
            self.client = Some(Client::connect(&self.url, &self.files).await?);
        }
        Ok(())
    }

    /// Commits to every spooled bundle not committed yet (small messages,
    /// sent before any upload: a bundle sealed while another uploads is
    /// announced at the next turn). A commitment the collector refuses is
    /// logged and not retried; the bundle is still uploaded.
    async fn commit_all(&mut self, items: &[Item]) -> Result<(), ShipError> {
        if self.commit_unsupported {
            return Ok(());
        }
        // Only what is still spooled (uploaded or set aside: forgotten).
        let spooled: std::collections::HashSet<&str> = items
            .iter()
            .filter_map(|i| match &i.kind {
                ItemKind::Bundle(id) => Some(id.as_str()),
                ItemKind::Detection => None,
            })
            .collect();
        self.committed.retain(|id| spooled.contains(id.as_str()));
        for item in items {
            let ItemKind::Bundle(id) = &item.kind else {
                continue;
            };
            if self.committed.contains(id) {
                continue;
            }
            let (seq, prev) = match vigil_bundle::read_manifest(&item.path) {
                Ok(m) => (m.seq, m.prev_bundle_sha256.unwrap_or_default()),
                // Unreadable: the upload finds out and sets it aside.
                Err(_) => {
                    self.committed.insert(id.clone());
                    continue;
                }
            };
            let c = vigil_proto::EvidenceCommitment {
                bundle_id: id.clone(),
                seq,
                prev_bundle_id: prev,
                size: item.size,
                signature: self.spool.signature(id).unwrap_or_default(),
            };
            match self.client().await?.commit_bundle(c).await {
                Ok(true) => debug!(bundle = %id, seq, "evidence commitment sent"),
                Ok(false) => {
                    info!("the collector does not take evidence commitments (an older collector): bundles are uploaded without");
                    self.commit_unsupported = true;
                    return Ok(());
                }
                Err(ShipError::Rejected(m)) => {
                    warn!(bundle = %id, reason = m, "the collector refused the bundle's commitment; it is uploaded anyway");
                }
                Err(e) => return Err(e),
            }
            self.committed.insert(id.clone());
        }
        Ok(())
    }

    /// Sends the whole spool in order; stops at the first transient error.
    async fn ship_all(&mut self) -> Result<(), ShipError> {
        loop {
            let items = self
                .spool
                .list()
                .map_err(|e| ShipError::Retry(format!("listing the spool: {e}")))?;
            self.commit_all(&items).await?;
            let Some(first) = items.first() else {
                return Ok(());
            };
            match &first.kind {
                ItemKind::Bundle(id) => {
                    let (id, item) = (id.clone(), first.clone());
                    let t0 = Instant::now();
                    let sig = self.spool.signature(&id);
                    let r = self
                        .client()
                        .await?
                        .upload_bundle(&item.path, &id, sig)
                        .await;
                    match r {
                        Ok(receipt) => {
                            info!(bundle = %id, bytes = item.size, ms = t0.elapsed().as_millis() as u64, "evidence shipped to the collector");
                            self.keep_receipt(&id, &receipt);
                            self.done(&[item], "bundle")?;
                            self.prune_shipped(&id);
                        }
                        Err(ShipError::Rejected(m)) => self.reject(&item, &m)?,
                        Err(e) => return Err(e),
                    }
                }
                ItemKind::Detection => {
                    let mut batch = Vec::new();
                    let mut sent = Vec::new();
                    for item in items
                        .iter()
                        .take_while(|i| i.kind == ItemKind::Detection)
                        .take(MAX_DETECTIONS_PER_CALL)
                    {
                        let parsed = std::fs::read(&item.path)
                            .map_err(|e| e.to_string())
                            .and_then(|b| {
                                use prost::Message as _;
                                vigil_proto::Detection::decode(&b[..])
                                    .map(|d| (b, d))
                                    .map_err(|e| format!("not a detection: {e}"))
                            });
                        match parsed {
                            Ok((wire, d)) => {
                                let id = hex::encode(Sha256::digest(&wire));
                                batch.push((format!("det-{id}"), d));
                                sent.push(item.clone());
                            }
                            Err(e) => self.reject(item, &e)?,
                        }
                    }
                    if !batch.is_empty() {
                        let r = self.client().await?.push_detections(batch).await;
                        match r {
                            Ok(()) => self.done(&sent, "detection")?,
                            // A refused call must not block the queue: set
                            // its items aside.
                            Err(ShipError::Rejected(m)) => {
                                for i in &sent {
                                    self.reject(i, &m)?;
                                }
                            }
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
        }
    }

    /// Removes acknowledged items. A failure stops this round (back-off)
    /// rather than resending the same item in a loop.
    fn done(&self, items: &[Item], kind: &str) -> Result<(), ShipError> {
        self.metrics
            .ship_sent
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc_by(items.len() as u64);
        for i in items {
            self.spool.remove(i).map_err(|e| {
                ShipError::Retry(format!(
                    "removing shipped item {} from the spool: {e}",
                    i.path.display()
                ))
            })?;
        }
        Ok(())
    }

    /// Checks and logs the collector's receipt for bundle `id`; an
    /// archive kept on the node gets its signature and verified receipt
    /// next to it (before the spool lets go of the signature).
    fn keep_receipt(&self, id: &str, receipt: &str) {
        let checked = self.receipts.check(id, receipt);
        let outcome = match &checked {
            Ok(r) => {
                debug!(bundle = id, seq = r.seq, chain = %r.chain, "collector receipt verified");
                "verified"
            }
            Err(e) => {
                warn!(bundle = id, problem = %e, "the collector's receipt for a bundle it acknowledged does not verify");
                e.outcome()
            }
        };
        self.metrics
            .evidence_receipts
            .get_or_create(&crate::metrics::ReasonLabel {
                reason: outcome.into(),
            })
            .inc();
        if let Err(e) = self.receipts.log(id, receipt, &checked) {
            warn!(bundle = id, error = %e, "could not log the collector's receipt");
        }
        let Some(dir) = self
            .archive_dir
            .as_ref()
            .filter(|_| self.keep_shipped_bytes > 0)
        else {
            return;
        };
        let archive = dir.join(format!("{id}.tar.zst"));
        if !archive.exists() {
            return;
        }
        let sig = self.spool.signature(id);
        let sidecars = [
            ("sig", sig.as_deref()),
            ("receipt", checked.as_ref().ok().map(|_| receipt.as_bytes())),
        ];
        for (ext, data) in sidecars {
            if let Some(data) = data {
                let p = receipts::sidecar(&archive, ext);
                if let Err(e) = receipts::write_sidecar(&p, data) {
                    warn!(path = %p.display(), error = %e, "could not keep a shipped archive's {ext}");
                }
            }
        }
    }

    /// After the collector acknowledged bundle `id`: its archive leaves the
    /// node, or is kept within `keep_shipped_bytes` (see [`kept`]).
    fn prune_shipped(&self, id: &str) {
        if let Some(dir) = &self.archive_dir {
            let removed = kept::Kept::new(dir, self.keep_shipped_bytes).acknowledged(id);
            self.metrics.archives_pruned.inc_by(removed as u64);
        }
    }

    fn reject(&self, item: &Item, why: &str) -> Result<(), ShipError> {
        self.metrics.ship_errors.inc();
        match self.spool.reject(item) {
            Ok(p) => {
                self.metrics.ship_rejected.inc();
                error!(path = %p.display(), reason = why, "collector rejected a spooled item: set aside");
                Ok(())
            }
            Err(e) => Err(ShipError::Retry(format!(
                "collector rejected {} ({why}) and it could not be set aside: {e}",
                item.path.display()
            ))),
        }
    }
}
