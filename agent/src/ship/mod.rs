//! Shipping to the collector: detections and evidence bundles leave the
//! agent through an on-disk [`spool`] and a gRPC [`client`] with mutual TLS.
//!
//! Flow: the pipeline hands each detection JSON line to the shipper thread
//! through a bounded channel (never blocks; a full channel drops the line,
//! counted in `vigil_spool_dropped_total`); the capture worker queues each
//! sealed archive into the spool itself (it is off the event path). The
//! shipper thread ("vigil-ship", its own single-threaded runtime) writes
//! detections into the spool and sends the spool in order, removing an item
//! only once the collector acknowledged it. When the collector is down or
//! refuses us, it backs off exponentially (1 s to 60 s) and retries; the
//! spool keeps everything meanwhile, across agent restarts.
//!
//! Ordinary events take another road ([`events`]): best effort, in memory,
//! on their own thread and connection, so they never delay or displace a
//! detection or a bundle.

pub mod client;
pub mod events;
pub mod spool;
pub mod wire;

use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tracing::{debug, error, info, warn};

use crate::metrics::{KindLabel, Metrics};
use client::{Client, PkiFiles, ShipError};
use spool::{Item, ItemKind, Priority, Spool};

/// Detection lines waiting for the shipper thread.
const QUEUE: usize = 4096;
/// Most detections per PushDetections call.
const MAX_DETECTIONS_PER_CALL: usize = 500;
/// Back-off bounds.
pub(crate) const BACKOFF_MIN: Duration = Duration::from_secs(1);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How often an idle shipper looks at the spool anyway.
const IDLE_RECHECK: Duration = Duration::from_secs(30);

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
    Detection(String, Priority),
    Wake,
    /// Everything sent before this is in the spool: reply.
    Flush(std::sync::mpsc::Sender<()>),
}

/// Handle given to the pipeline and the capture worker. Cheap to clone.
#[derive(Clone)]
pub struct Shipper {
    tx: SyncSender<Msg>,
    /// Detections in the channel: those below high may use only 3/4 of it.
    pending: Arc<std::sync::atomic::AtomicUsize>,
    spool: Arc<Spool>,
    metrics: Arc<Metrics>,
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
        let (items, bytes) = spool.usage();
        info!(collector = %opts.collector, spool = %opts.spool_dir.display(), items, bytes, "shipping to the collector");
        let (tx, rx) = sync_channel(QUEUE);
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
        };
        std::thread::Builder::new()
            .name("vigil-ship".into())
            .spawn(move || worker.run(rx))?;
        Ok(Shipper {
            tx,
            pending,
            spool,
            metrics,
        })
    }

    /// Queues a detection JSON line; never blocks. `high`: a high or
    /// critical detection, which has reserved room in the channel and the
    /// spool.
    pub fn detection(&self, json: String, high: bool) {
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
        match self.tx.try_send(Msg::Detection(json, prio)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
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
        let sent = match self.tx.send_timeout_compat(Msg::Flush(tx), timeout) {
            Ok(()) => rx.recv_timeout(timeout).is_ok(),
            Err(()) => false,
        };
        if !sent {
            warn!("shipper busy at shutdown: detections not yet spooled are lost");
        }
    }

    /// Queues a sealed evidence archive (from the capture worker: does
    /// file I/O). The archive stays where it is.
    pub fn bundle(&self, archive: &Path, id: &str, high: bool) {
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

impl crate::outputs::Forward for Shipper {
    fn detection(&self, d: &crate::model::Detection) {
        match serde_json::to_string(d) {
            Ok(line) => Shipper::detection(self, line, d.severity >= crate::model::Severity::High),
            Err(e) => {
                self.metrics.output_errors.inc();
                warn!(error = %e, "detection not shipped: it did not serialize");
            }
        }
    }

    fn bundle(&self, archive: &Path, id: &str, high: bool) {
        Shipper::bundle(self, archive, id, high);
    }
}

/// `SyncSender::send` with a deadline (std has none): retries `try_send`.
trait SendTimeout {
    fn send_timeout_compat(&self, m: Msg, timeout: Duration) -> Result<(), ()>;
}

impl SendTimeout for SyncSender<Msg> {
    fn send_timeout_compat(&self, mut m: Msg, timeout: Duration) -> Result<(), ()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.try_send(m) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Disconnected(_)) => return Err(()),
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
}

impl Worker {
    fn run(mut self, rx: Receiver<Msg>) {
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
        let mut backoff = BACKOFF_MIN;
        let mut wait_until: Option<Instant> = None;
        loop {
            // Wait for work, a wake-up, or the end of the back-off; spool
            // whatever arrives meanwhile.
            let timeout = match wait_until {
                Some(t) => t.saturating_duration_since(Instant::now()),
                None => IDLE_RECHECK,
            };
            match rx.recv_timeout(timeout) {
                Ok(m) => self.take(m),
                Err(RecvTimeoutError::Timeout) => wait_until = None,
                // The agent is shutting down: what is not sent stays in the
                // spool for the next start.
                Err(RecvTimeoutError::Disconnected) => return,
            }
            while let Ok(m) = rx.try_recv() {
                self.take(m);
            }
            if wait_until.is_some_and(|t| t > Instant::now()) {
                continue;
            }
            wait_until = None;
            match rt.block_on(self.ship_all()) {
                Ok(()) => backoff = BACKOFF_MIN,
                Err(e) => {
                    self.metrics.ship_errors.inc();
                    self.client = None;
                    match &e {
                        ShipError::Auth(_) => {
                            error!(error = %e, retry_in_s = backoff.as_secs(), "shipping to the collector failed: check the agent certificate and the collector's CA")
                        }
                        _ => {
                            warn!(error = %e, retry_in_s = backoff.as_secs(), "shipping to the collector failed; the spool keeps the items")
                        }
                    }
                    wait_until = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    fn take(&mut self, m: Msg) {
        match m {
            Msg::Detection(json, prio) => {
                self.pending
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                if let Err(e) = self.spool.enqueue_detection(&json, prio) {
                    warn!(error = %e, "detection not spooled: it will not reach the collector");
                }
            }
            Msg::Wake => {}
            Msg::Flush(reply) => {
                let _ = reply.send(());
            }
        }
    }

    async fn client(&mut self) -> Result<&mut Client, ShipError> {
        if self.client.is_none() {
            self.client = Some(Client::connect(&self.url, &self.files).await?);
        }
        Ok(self.client.as_mut().expect("just set"))
    }

    /// Sends the whole spool in order; stops at the first transient error.
    async fn ship_all(&mut self) -> Result<(), ShipError> {
        loop {
            let items = self
                .spool
                .list()
                .map_err(|e| ShipError::Retry(format!("listing the spool: {e}")))?;
            let Some(first) = items.first() else {
                return Ok(());
            };
            match &first.kind {
                ItemKind::Bundle(id) => {
                    let (id, item) = (id.clone(), first.clone());
                    let t0 = Instant::now();
                    let r = self.client().await?.upload_bundle(&item.path, &id).await;
                    match r {
                        Ok(()) => {
                            info!(bundle = %id, bytes = item.size, ms = t0.elapsed().as_millis() as u64, "evidence shipped to the collector");
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
                        let parsed = std::fs::read_to_string(&item.path)
                            .map_err(|e| e.to_string())
                            .and_then(|j| {
                                vigil_proto::Detection::from_agent_json(&j)
                                    .map(|d| (j, d))
                                    .map_err(|e| e.to_string())
                            });
                        match parsed {
                            Ok((json, d)) => {
                                let id = hex::encode(Sha256::digest(json.as_bytes()));
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

    /// After the collector acknowledged bundle `id`: its archive leaves the
    /// node, unless acknowledged archives are kept up to
    /// `keep_shipped_bytes`: then it is marked acknowledged
    /// (`shipped/<id>`), and the oldest marked ones go first. An archive
    /// without a mark (not acknowledged yet, never queued) is never touched.
    fn prune_shipped(&self, id: &str) {
        let Some(dir) = &self.archive_dir else {
            return;
        };
        let archive = |id: &str| dir.join(format!("{id}.tar.zst"));
        let marks = dir.join("shipped");
        let remove = |id: &str| {
            let p = archive(id);
            match std::fs::remove_file(&p) {
                Ok(()) => {
                    self.metrics.archives_pruned.inc();
                    debug!(archive = %p.display(), "shipped archive removed from the node");
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(archive = %p.display(), error = %e, "could not remove a shipped archive");
                    return;
                }
            }
            let _ = std::fs::remove_file(marks.join(id));
        };
        if self.keep_shipped_bytes == 0 {
            remove(id);
            return;
        }
        let marked = vigil_bundle::private::create_missing_dirs(&marks)
            .and_then(|()| vigil_bundle::private::create_new(&marks.join(id)).map(drop));
        if let Err(e) = marked {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                warn!(bundle = id, error = %e, "could not mark an archive as shipped");
            }
        }
        let Ok(rd) = std::fs::read_dir(&marks) else {
            return;
        };
        let mut shipped: Vec<(std::time::SystemTime, u64, String)> = rd
            .flatten()
            .filter_map(|e| {
                let id = e.file_name().to_string_lossy().into_owned();
                if !vigil_proto::is_valid_bundle_id(&id) {
                    return None;
                }
                let m = std::fs::metadata(archive(&id)).ok()?;
                Some((m.modified().ok()?, m.len(), id))
            })
            .collect();
        shipped.sort();
        let mut total: u64 = shipped.iter().map(|(_, n, _)| n).sum();
        for (_, n, id) in shipped {
            if total <= self.keep_shipped_bytes {
                break;
            }
            remove(&id);
            total -= n;
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
