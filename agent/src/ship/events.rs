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

/// Events waiting for the shipper thread (a second of a busy node's
/// events; past it they are dropped and counted: the lane is best effort,
/// and its memory stays small).
pub const QUEUE: usize = 4_096;
/// Most events per batch.
pub const BATCH_EVENTS: usize = 2_000;
/// Most encoded bytes per batch (the collector takes 4 MiB messages).
pub const BATCH_BYTES: usize = 1 << 20;
/// Longest an event waits for its batch to fill.
pub const BATCH_DELAY: Duration = Duration::from_secs(1);
/// Batches kept while the collector is unreachable or slower than the
/// node (at most `BACKLOG_BATCHES * BATCH_EVENTS` events) ...
pub const BACKLOG_BATCHES: usize = 64;
/// ... and at most this many encoded bytes: the agent's memory (a batch
/// in memory takes about three times its encoded size; a write storm with
/// an 8 MiB bound ended at 95 MB of RSS). On an ordinary node, minutes of
/// events.
pub const BACKLOG_BYTES: usize = 2 << 20;

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
    backlog: VecDeque<(String, Vec<Event>, usize)>,
    backlog_bytes: usize,
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
            backlog_bytes: 0,
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

    /// Moves the open batch to the backlog, dropping the oldest batches
    /// while the backlog would be over [`BACKLOG_BATCHES`] or
    /// [`BACKLOG_BYTES`].
    pub(super) fn close(&mut self) {
        if self.open.is_empty() {
            return;
        }
        let bytes = std::mem::take(&mut self.open_bytes);
        while !self.backlog.is_empty()
            && (self.backlog.len() >= BACKLOG_BATCHES || self.backlog_bytes + bytes > BACKLOG_BYTES)
        {
            self.pop_oldest(true);
        }
        let id = format!("ev-{}-{}", self.run_id, self.next_batch);
        self.next_batch += 1;
        self.backlog_bytes += bytes;
        self.backlog
            .push_back((id, std::mem::take(&mut self.open), bytes));
    }

    /// The oldest batch leaves the backlog (`dropped`: counted as lost).
    fn pop_oldest(&mut self, dropped: bool) {
        if let Some((_, old, bytes)) = self.backlog.pop_front() {
            self.backlog_bytes -= bytes;
            if dropped {
                self.metrics.ship_events_dropped.inc_by(old.len() as u64);
            }
        }
    }

    /// Sends the oldest batch; it leaves the backlog once acknowledged (or
    /// refused for good: dropped, counted).
    pub(super) async fn send_one(&mut self, client: &mut Client) -> Result<(), ShipError> {
        let Some((id, events, _)) = self.backlog.front() else {
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
        self.pop_oldest(false);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(argv_bytes: usize) -> Event {
        Event {
            kind: "exec".into(),
            argv: vec!["x".repeat(argv_bytes)],
            ..Event::default()
        }
    }

    /// The backlog is bounded in batches and in bytes; what it drops is
    /// counted, oldest first, and batches keep their order.
    #[test]
    fn the_backlog_is_bounded_in_batches_and_bytes() {
        let m = Arc::new(Metrics::default());
        let mut lane = EventLane::new(m.clone());
        for _ in 0..BACKLOG_BATCHES + 3 {
            lane.push(event(10));
            lane.close();
        }
        assert_eq!(lane.held(), BACKLOG_BATCHES);
        assert_eq!(m.ship_events_dropped.get(), 3);
        assert_eq!(
            lane.backlog.front().unwrap().0,
            format!("ev-{}-3", lane.run_id)
        );
        // Big batches: the byte bound drops more.
        let mut lane = EventLane::new(m.clone());
        let before = m.ship_events_dropped.get();
        for _ in 0..20 {
            lane.push(event(1 << 20)); // a batch of its own: over BATCH_BYTES
        }
        assert!(
            lane.backlog_bytes <= BACKLOG_BYTES,
            "{}",
            lane.backlog_bytes
        );
        assert!(lane.held() <= BACKLOG_BYTES >> 20);
        assert_eq!(
            m.ship_events_dropped.get() - before,
            20 - lane.held() as u64
        );
        let total: usize = lane.backlog.iter().map(|b| b.2).sum();
        assert_eq!(total, lane.backlog_bytes);
    }
}
