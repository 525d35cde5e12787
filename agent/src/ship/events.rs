//! Ordinary events to the collector (so its incident timelines show what the
//! processes did): the shipper's best-effort lane. Detections and evidence
//! go first: the shipper thread serves this lane only when the spool is
//! empty and it is not backing off, one batch at a time, on the same
//! connection and with the same back-off.
//!
//! The pipeline's [`EventSink`] builds each event's wire form
//! (`wire::event`) and hands it over a bounded channel (a full channel drops
//! the event, counted in `vigil_ship_events_dropped_total`). The
//! [`EventLane`] groups them in batches (at most [`BATCH_EVENTS`] events,
//! [`BATCH_BYTES`] or [`BATCH_DELAY`]), each with a batch id unique to this
//! agent run so a resend after a lost acknowledgement is stored once, and
//! sends them in order. While the collector is unreachable it keeps a
//! bounded backlog in memory ([`BACKLOG_BATCHES`]) and drops the oldest
//! batch beyond it (counted): events are not spooled to disk.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::Sender;
use tracing::warn;
use vigil_proto::Event;

use super::client::{Client, ShipError};
use crate::metrics::{KindLabel, Metrics};
use crate::model::EnrichedEvent;
use crate::outputs::Sink;

/// Events waiting for the shipper thread.
pub const QUEUE: usize = 16_384;
/// Most events per batch.
pub const BATCH_EVENTS: usize = 2_000;
/// Most encoded bytes per batch (the collector takes 4 MiB messages).
pub const BATCH_BYTES: usize = 1 << 20;
/// Longest an event waits for its batch to fill.
pub const BATCH_DELAY: Duration = Duration::from_secs(1);
/// Batches kept while the collector is unreachable (at most
/// `BACKLOG_BATCHES * BATCH_EVENTS` events).
pub const BACKLOG_BATCHES: usize = 64;

/// The pipeline's side: a sink that queues each event for the shipper.
pub struct EventSink {
    tx: Sender<Event>,
    metrics: Arc<Metrics>,
    warned: bool,
}

impl EventSink {
    pub(super) fn new(tx: Sender<Event>, metrics: Arc<Metrics>) -> Self {
        Self {
            tx,
            metrics,
            warned: false,
        }
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
        match self.tx.try_send(super::wire::event(ev, false)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.dropped("shipping queue full"),
            Err(TrySendError::Closed(_)) => self.dropped("shipping thread gone"),
        }
    }
}

/// The shipper thread's side: batches and the backlog.
pub(super) struct EventLane {
    open: Vec<Event>,
    open_bytes: usize,
    open_since: Instant,
    backlog: VecDeque<(String, Vec<Event>)>,
    run_id: u128,
    next_batch: u64,
    metrics: Arc<Metrics>,
}

impl EventLane {
    pub(super) fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            open: Vec::new(),
            open_bytes: 0,
            open_since: Instant::now(),
            backlog: VecDeque::new(),
            run_id: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
            next_batch: 0,
            metrics,
        }
    }

    /// Adds an event to the open batch (closed when full).
    pub(super) fn push(&mut self, ev: Event) {
        if self.open.is_empty() {
            self.open_since = Instant::now();
        }
        self.open_bytes += prost::Message::encoded_len(&ev);
        self.open.push(ev);
        if self.open.len() >= BATCH_EVENTS || self.open_bytes >= BATCH_BYTES {
            self.close();
        }
    }

    /// When the open batch is due ([`BATCH_DELAY`] after its first event).
    pub(super) fn due(&self) -> Option<Instant> {
        (!self.open.is_empty()).then(|| self.open_since + BATCH_DELAY)
    }

    /// Closes the open batch if it is due.
    pub(super) fn close_if_due(&mut self) {
        if self.due().is_some_and(|t| t <= Instant::now()) {
            self.close();
        }
    }

    /// A batch is ready to send.
    pub(super) fn ready(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// Batches held.
    pub(super) fn held(&self) -> usize {
        self.backlog.len()
    }

    /// Moves the open batch to the backlog, dropping the oldest batch when
    /// the backlog is full.
    pub(super) fn close(&mut self) {
        if self.open.is_empty() {
            return;
        }
        if self.backlog.len() >= BACKLOG_BATCHES {
            if let Some((_, old)) = self.backlog.pop_front() {
                self.metrics.ship_events_dropped.inc_by(old.len() as u64);
            }
        }
        let id = format!("ev-{}-{}", self.run_id, self.next_batch);
        self.next_batch += 1;
        self.open_bytes = 0;
        self.backlog.push_back((id, std::mem::take(&mut self.open)));
    }

    /// Sends the oldest batch; it leaves the backlog once acknowledged (or
    /// refused for good: dropped, counted).
    pub(super) async fn send_one(&mut self, client: &mut Client) -> Result<(), ShipError> {
        let Some((id, events)) = self.backlog.front() else {
            return Ok(());
        };
        let n = events.len() as u64;
        match client.push_events(id.clone(), events.clone()).await {
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
            // Over the collector's message or batch limits: resending the
            // same batch would fail the same way.
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
        Ok(())
    }
}
