//! Ordinary events to the collector (so its incident timelines show what the
//! processes did): best effort, and never at the expense of detections and
//! evidence, which go through the spool on their own thread and connection.
//!
//! The pipeline's [`EventSink`] serializes each event and hands it over a
//! bounded channel (a full channel drops the event, counted in
//! `vigil_ship_events_dropped_total`). The "vigil-ship-events" thread groups
//! them in batches (at most [`BATCH_EVENTS`] events or [`BATCH_DELAY`]),
//! each with a batch id unique to this agent run so a resend after a lost
//! acknowledgement is stored once, and sends them in order. While the
//! collector is unreachable it keeps a bounded backlog in memory
//! ([`BACKLOG_BATCHES`]) and drops the oldest batch beyond it (counted):
//! events are not spooled to disk.

use std::collections::VecDeque;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{error, warn};
use vigil_proto::Event;

use super::client::{Client, PkiFiles, ShipError};
use super::{BACKOFF_MAX, BACKOFF_MIN};
use crate::metrics::{KindLabel, Metrics};
use crate::model::EnrichedEvent;
use crate::outputs::{EventLine, Sink};

/// Serialized events waiting for the thread.
const QUEUE: usize = 16_384;
/// Most events per batch.
pub const BATCH_EVENTS: usize = 2_000;
/// Most JSON bytes per batch (the collector takes 4 MiB messages; the
/// protobuf is somewhat larger than the JSON it is built from).
pub const BATCH_BYTES: usize = 1 << 20;
/// Longest an event waits for its batch to fill.
pub const BATCH_DELAY: Duration = Duration::from_secs(1);
/// Batches kept while the collector is unreachable (at most
/// `BACKLOG_BATCHES * BATCH_EVENTS` events).
pub const BACKLOG_BATCHES: usize = 64;

/// The pipeline's side: a sink that queues each event for the collector.
pub struct EventSink {
    tx: Option<SyncSender<Event>>,
    thread: Option<std::thread::JoinHandle<()>>,
    metrics: Arc<Metrics>,
    warned: bool,
}

impl Drop for EventSink {
    /// At shutdown: the thread sends what it holds (bounded: 5 s) and ends.
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl EventSink {
    /// Starts the "vigil-ship-events" thread shipping to `url`.
    pub fn start(url: &str, files: PkiFiles, metrics: Arc<Metrics>) -> anyhow::Result<EventSink> {
        let (tx, rx) = sync_channel(QUEUE);
        let run = Runner {
            url: url.to_string(),
            files,
            metrics: metrics.clone(),
            client: None,
            backlog: VecDeque::new(),
            run_id: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
            next_batch: 0,
        };
        let thread = std::thread::Builder::new()
            .name("vigil-ship-events".into())
            .spawn(move || run.run(rx))?;
        Ok(EventSink {
            tx: Some(tx),
            thread: Some(thread),
            metrics,
            warned: false,
        })
    }

    fn dropped(&mut self, why: &str) {
        self.metrics.ship_events_dropped.inc();
        if !self.warned {
            warn!(
                reason = why,
                "events not shipped to the collector (counted in vigil_ship_events_dropped_total)"
            );
            self.warned = true;
        }
    }
}

impl Sink for EventSink {
    fn emit(&mut self, ev: &EnrichedEvent) {
        let Some(tx) = &self.tx else { return };
        let line = EventLine {
            ev,
            ancestry_argv: false,
        };
        let Ok(json) = serde_json::to_string(&line) else {
            self.metrics.output_errors.inc();
            return;
        };
        match tx.try_send(super::wire::event(ev, json)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.dropped("shipping queue full"),
            Err(TrySendError::Disconnected(_)) => self.dropped("shipping thread gone"),
        }
    }
}

struct Runner {
    url: String,
    files: PkiFiles,
    metrics: Arc<Metrics>,
    client: Option<Client>,
    backlog: VecDeque<(String, Vec<Event>)>,
    run_id: u128,
    next_batch: u64,
}

impl Runner {
    fn run(mut self, rx: Receiver<Event>) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                error!(error = %e, "event shipper runtime failed: events will not be shipped");
                return;
            }
        };
        let mut backoff = BACKOFF_MIN;
        let mut retry_at: Option<Instant> = None;
        let mut open: Vec<Event> = Vec::new();
        let mut open_bytes = 0usize;
        let mut open_since = Instant::now();
        loop {
            let deadline = if open.is_empty() {
                retry_at.unwrap_or_else(|| Instant::now() + BATCH_DELAY)
            } else {
                open_since + BATCH_DELAY
            };
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(ev) => {
                    if open.is_empty() {
                        open_since = Instant::now();
                    }
                    open_bytes += ev.json.len();
                    open.push(ev);
                    while open.len() < BATCH_EVENTS && open_bytes < BATCH_BYTES {
                        match rx.try_recv() {
                            Ok(ev) => {
                                open_bytes += ev.json.len();
                                open.push(ev);
                            }
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // Shutting down: one last attempt, bounded.
                    self.close(&mut open);
                    let _ = rt.block_on(async {
                        tokio::time::timeout(Duration::from_secs(5), self.send_backlog()).await
                    });
                    return;
                }
            }
            if open.len() >= BATCH_EVENTS
                || open_bytes >= BATCH_BYTES
                || (!open.is_empty() && open_since.elapsed() >= BATCH_DELAY)
            {
                self.close(&mut open);
                open_bytes = 0;
            }
            if self.backlog.is_empty() || retry_at.is_some_and(|t| t > Instant::now()) {
                continue;
            }
            // Bounded, so a hung collector delays shutdown by 30 s at most.
            let sent = rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(30), self.send_backlog())
                    .await
                    .unwrap_or_else(|_| Err(ShipError::Retry("timed out".into())))
            });
            match sent {
                Ok(()) => {
                    backoff = BACKOFF_MIN;
                    retry_at = None;
                }
                Err(e) => {
                    self.metrics.ship_errors.inc();
                    self.client = None;
                    warn!(error = %e, retry_in_s = backoff.as_secs(), held_batches = self.backlog.len(), "shipping events failed; holding them in memory");
                    retry_at = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Moves the open batch to the backlog, dropping the oldest batch when
    /// the backlog is full.
    fn close(&mut self, open: &mut Vec<Event>) {
        if open.is_empty() {
            return;
        }
        if self.backlog.len() >= BACKLOG_BATCHES {
            if let Some((_, old)) = self.backlog.pop_front() {
                self.metrics.ship_events_dropped.inc_by(old.len() as u64);
            }
        }
        let id = format!("ev-{}-{}", self.run_id, self.next_batch);
        self.next_batch += 1;
        self.backlog.push_back((id, std::mem::take(open)));
    }

    /// Sends the backlog in order; a batch leaves it once acknowledged (or
    /// refused for good: dropped, counted).
    async fn send_backlog(&mut self) -> Result<(), ShipError> {
        while let Some((id, events)) = self.backlog.front() {
            let (id, events) = (id.clone(), events.clone());
            let n = events.len() as u64;
            if self.client.is_none() {
                self.client = Some(Client::connect(&self.url, &self.files).await?);
            }
            let client = self.client.as_mut().expect("just set");
            match client.push_events(id, events).await {
                Ok(()) => {
                    self.metrics
                        .ship_sent
                        .get_or_create(&KindLabel {
                            kind: "event".into(),
                        })
                        .inc_by(n);
                }
                Err(ShipError::Rejected(m)) => {
                    warn!(
                        reason = m,
                        events = n,
                        "the collector refused a batch of events: dropped"
                    );
                    self.metrics.ship_events_dropped.inc_by(n);
                }
                // Over the collector's message or batch limits: resending
                // the same batch would fail the same way.
                Err(ShipError::Retry(m))
                    if m.starts_with("OutOfRange") || m.starts_with("ResourceExhausted") =>
                {
                    warn!(
                        reason = m,
                        events = n,
                        "a batch of events is over the collector's limits: dropped"
                    );
                    self.metrics.ship_events_dropped.inc_by(n);
                }
                Err(e) => return Err(e),
            }
            self.backlog.pop_front();
        }
        Ok(())
    }
}
