//! Ordinary events to the collector (so its incident timelines show what the
//! processes did): the shipper's best-effort lane. Detections and evidence
//! go first: the shipper thread serves this lane only when the spool is
//! empty and it is not backing off, one batch at a time, on the same
//! connection and with the same back-off.
//!
//! The pipeline's [`EventSink`] writes each event's protobuf once, straight
//! from the model (`wire::append_event`), into a chunk, and hands the chunk
//! over at the end of a ring-buffer drain at most every [`HANDOVER_EVERY`]
//! (each hand-over wakes the shipper thread), or at [`CHUNK_BYTES`]. The
//! hand-over holds at most [`QUEUE_BYTES`]; a chunk that does not fit is
//! dropped, counted in `vigil_ship_events_dropped_total`. The [`EventLane`]
//! joins chunks into batches (at most [`BATCH_EVENTS`] events,
//! [`BATCH_BYTES`] or [`BATCH_DELAY`]), each with a batch id unique to this
//! agent run so a resend after a lost acknowledgement is stored once, and
//! sends them in order, still encoded (`vigil_proto::EncodedEventBatch`).
//! While the collector is unreachable it keeps a bounded backlog in memory
//! ([`BACKLOG_BATCHES`], [`BACKLOG_BYTES`]) and drops the oldest batch
//! beyond it (counted): events are not spooled to disk.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::bytes::Bytes;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tracing::warn;
use vigil_proto::EncodedEventBatch;

use super::client::{Client, ShipError};
use crate::metrics::{KindLabel, Metrics};
use crate::model::EnrichedEvent;
use crate::outputs::Sink;

/// Encoded bytes waiting for the shipper thread (a few seconds of a busy
/// node's events; past it they are dropped and counted: the lane is best
/// effort, and its memory stays small).
pub const QUEUE_BYTES: usize = 4 << 20;
/// A drain's end hands the chunk over only this long after the last
/// hand-over (the agent's poll tick flushes too, so an idle node's last
/// events wait no longer than this and a tick).
pub const HANDOVER_EVERY: Duration = Duration::from_millis(50);
/// A chunk is handed over once it holds this many bytes ...
pub const CHUNK_BYTES: usize = 64 << 10;
/// ... or this many events, even mid-drain.
pub const CHUNK_EVENTS: usize = BATCH_EVENTS / 4;
/// Chunks the shipper thread takes in per turn of its loop.
pub const CHUNKS_PER_TURN: usize = 64;
/// Most events per batch.
pub const BATCH_EVENTS: usize = 2_000;
/// Most encoded bytes per batch (the collector takes 4 MiB messages): a
/// chunk that would take the batch past this or [`BATCH_EVENTS`] starts
/// the next one (a single chunk is at most `CHUNK_BYTES` and one event).
pub const BATCH_BYTES: usize = 1 << 20;
/// Longest an event waits for its batch to fill.
pub const BATCH_DELAY: Duration = Duration::from_secs(1);
/// Batches kept while the collector is unreachable or slower than the
/// node (at most `BACKLOG_BATCHES * BATCH_EVENTS` events) ...
pub const BACKLOG_BATCHES: usize = 64;
/// ... and at most this many encoded bytes, which is what they take in
/// memory (the batches are kept encoded, trimmed to their length). On an
/// ordinary node, minutes of events.
pub const BACKLOG_BYTES: usize = 4 << 20;

/// Encoded events on their way to the lane: `EventBatch.events` entries.
pub(super) struct Chunk {
    body: Vec<u8>,
    events: usize,
}

/// The hand-over between the pipeline and the shipper thread, bounded in
/// bytes ([`QUEUE_BYTES`]).
pub(super) fn handover() -> (Handover, Intake) {
    let (tx, rx) = unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    (
        Handover {
            tx,
            queued: queued.clone(),
        },
        Intake { rx, queued },
    )
}

/// The pipeline's end of the hand-over.
#[derive(Clone)]
pub(super) struct Handover {
    tx: UnboundedSender<Chunk>,
    queued: Arc<AtomicUsize>,
}

impl Handover {
    /// Queues a chunk; gives it back with the reason when it cannot be.
    fn send(&self, c: Chunk) -> Result<(), (Chunk, &'static str)> {
        let n = c.body.len();
        if self.queued.fetch_add(n, Ordering::Relaxed) + n > QUEUE_BYTES {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            return Err((c, "shipping queue full"));
        }
        self.tx.send(c).map_err(|e| {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            (e.0, "shipping thread gone")
        })
    }
}

/// The shipper thread's end of the hand-over.
pub(super) struct Intake {
    rx: UnboundedReceiver<Chunk>,
    queued: Arc<AtomicUsize>,
}

impl Intake {
    /// The next chunk; `None` once every [`Handover`] is gone.
    /// Cancel-safe (the chunk is taken only when this returns).
    pub(super) async fn recv(&mut self) -> Option<Chunk> {
        let c = self.rx.recv().await?;
        Some(self.taken(c))
    }

    /// A chunk if one is waiting.
    pub(super) fn try_recv(&mut self) -> Option<Chunk> {
        let c = self.rx.try_recv().ok()?;
        Some(self.taken(c))
    }

    fn taken(&self, c: Chunk) -> Chunk {
        self.queued.fetch_sub(c.body.len(), Ordering::Relaxed);
        c
    }
}

/// The pipeline's side: a sink that encodes each event into the open
/// chunk and hands chunks over.
pub struct EventSink {
    handover: Handover,
    open: Chunk,
    metrics: Arc<Metrics>,
    warned: bool,
    last_handover: Instant,
    every: Duration,
}

impl EventSink {
    pub(super) fn new(handover: Handover, metrics: Arc<Metrics>) -> Self {
        Self {
            handover,
            open: Chunk {
                body: Vec::new(),
                events: 0,
            },
            metrics,
            warned: false,
            last_handover: Instant::now(),
            every: HANDOVER_EVERY,
        }
    }

    /// Hands the open chunk over (a new one starts as large as it was).
    fn hand_over(&mut self) {
        if self.open.events == 0 {
            return;
        }
        self.last_handover = Instant::now();
        let cap = self.open.body.len().clamp(1 << 10, CHUNK_BYTES);
        let c = std::mem::replace(
            &mut self.open,
            Chunk {
                body: Vec::with_capacity(cap),
                events: 0,
            },
        );
        if let Err((c, why)) = self.handover.send(c) {
            self.metrics.ship_events_dropped.inc_by(c.events as u64);
            if !self.warned {
                warn!(
                    reason = why,
                    "events not shipped to the collector (counted in vigil_ship_events_dropped_total)"
                );
                self.warned = true;
            }
        }
    }
}

impl Sink for EventSink {
    fn emit(&mut self, ev: &EnrichedEvent) {
        super::wire::append_event(&mut self.open.body, ev);
        self.open.events += 1;
        if self.open.body.len() >= CHUNK_BYTES || self.open.events >= CHUNK_EVENTS {
            self.hand_over();
        }
    }

    fn flush(&mut self) {
        if self.last_handover.elapsed() >= self.every {
            self.hand_over();
        }
    }

    fn finish(&mut self) {
        self.hand_over();
    }
}

impl Drop for EventSink {
    fn drop(&mut self) {
        self.hand_over();
    }
}

/// The shipper thread's side: batches and the backlog.
pub(super) struct EventLane {
    open: Vec<u8>,
    open_events: usize,
    open_since: Instant,
    backlog: VecDeque<Batch>,
    backlog_bytes: usize,
    run_id: u128,
    next_batch: u64,
    metrics: Arc<Metrics>,
}

/// A closed batch: its id, its encoded events and how many.
struct Batch {
    id: String,
    body: Bytes,
    events: usize,
}

impl EventLane {
    pub(super) fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            open: Vec::new(),
            open_events: 0,
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

    /// Adds a chunk of events to the open batch (closed when full; closed
    /// first if the chunk would take it past a bound).
    pub(super) fn push(&mut self, c: Chunk) {
        if self.open_events > 0
            && (self.open_events + c.events > BATCH_EVENTS
                || self.open.len() + c.body.len() > BATCH_BYTES)
        {
            self.close();
        }
        if self.open_events == 0 {
            self.open_since = Instant::now();
            self.open.clear();
        }
        if self.open.is_empty() {
            self.open = c.body;
        } else {
            self.open.extend_from_slice(&c.body);
        }
        self.open_events += c.events;
        if self.open_events >= BATCH_EVENTS || self.open.len() >= BATCH_BYTES {
            self.close();
        }
    }

    /// When the open batch is due ([`BATCH_DELAY`] after its first event).
    pub(super) fn due(&self) -> Option<Instant> {
        (self.open_events > 0).then(|| self.open_since + BATCH_DELAY)
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
        if self.open_events == 0 {
            return;
        }
        let mut open = std::mem::take(&mut self.open);
        // Held as counted: the batch's bytes, not the buffer's doubling.
        open.shrink_to_fit();
        let body = Bytes::from(open);
        let events = std::mem::take(&mut self.open_events);
        while !self.backlog.is_empty()
            && (self.backlog.len() >= BACKLOG_BATCHES
                || self.backlog_bytes + body.len() > BACKLOG_BYTES)
        {
            self.pop_oldest(true);
        }
        let id = format!("ev-{}-{}", self.run_id, self.next_batch);
        self.next_batch += 1;
        self.backlog_bytes += body.len();
        self.backlog.push_back(Batch { id, body, events });
    }

    /// The oldest batch leaves the backlog (`dropped`: counted as lost).
    fn pop_oldest(&mut self, dropped: bool) {
        if let Some(old) = self.backlog.pop_front() {
            self.backlog_bytes -= old.body.len();
            if dropped {
                self.metrics.ship_events_dropped.inc_by(old.events as u64);
            }
        }
    }

    /// Sends the oldest batch; it leaves the backlog once acknowledged (or
    /// refused for good: dropped, counted).
    pub(super) async fn send_one(&mut self, client: &mut Client) -> Result<(), ShipError> {
        let Some(b) = self.backlog.front() else {
            return Ok(());
        };
        let n = b.events as u64;
        let batch = EncodedEventBatch {
            batch_id: b.id.clone(),
            events: b.body.clone(),
        };
        match client.push_events(batch).await {
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

    /// A chunk of `n` events, each with an argv of `argv_bytes`.
    fn chunk(n: usize, argv_bytes: usize) -> Chunk {
        let mut body = Vec::new();
        for _ in 0..n {
            let ev = vigil_proto::Event {
                kind: "exec".into(),
                argv: vec!["x".repeat(argv_bytes)],
                ..Default::default()
            };
            EncodedEventBatch::append_entry(&mut body, &prost::Message::encode_to_vec(&ev));
        }
        Chunk { body, events: n }
    }

    /// The backlog is bounded in batches and in bytes; what it drops is
    /// counted, oldest first, and batches keep their order.
    #[test]
    fn the_backlog_is_bounded_in_batches_and_bytes() {
        let m = Arc::new(Metrics::default());
        let mut lane = EventLane::new(m.clone());
        for _ in 0..BACKLOG_BATCHES + 3 {
            lane.push(chunk(2, 10));
            lane.close();
        }
        assert_eq!(lane.held(), BACKLOG_BATCHES);
        assert_eq!(m.ship_events_dropped.get(), 6);
        assert_eq!(
            lane.backlog.front().unwrap().id,
            format!("ev-{}-3", lane.run_id)
        );
        // Big batches: the byte bound drops more.
        let mut lane = EventLane::new(m.clone());
        let before = m.ship_events_dropped.get();
        for _ in 0..20 {
            lane.push(chunk(1, 1 << 20)); // a batch of its own: over BATCH_BYTES
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
        let total: usize = lane.backlog.iter().map(|b| b.body.len()).sum();
        assert_eq!(total, lane.backlog_bytes);
    }

    /// Chunks join into one batch up to its bounds: a chunk that would
    /// take it past BATCH_EVENTS starts the next batch; the batch is the
    /// events of its chunks, in order.
    #[test]
    fn chunks_join_into_batches_within_bounds() {
        let mut lane = EventLane::new(Arc::new(Metrics::default()));
        lane.push(chunk(3, 10));
        lane.push(chunk(BATCH_EVENTS - 4, 1));
        assert!(!lane.ready());
        lane.push(chunk(2, 5));
        assert_eq!(lane.held(), 1, "the first batch closed before the chunk");
        assert!(lane.due().is_some(), "the chunk opened the next one");
        let b = lane.backlog.front().unwrap();
        assert_eq!(b.events, BATCH_EVENTS - 1);
        let plain: vigil_proto::EventBatch = prost::Message::decode(
            &prost::Message::encode_to_vec(&EncodedEventBatch {
                batch_id: b.id.clone(),
                events: b.body.clone(),
            })[..],
        )
        .unwrap();
        assert_eq!(plain.events.len(), BATCH_EVENTS - 1);
        assert_eq!(plain.events[0].argv[0].len(), 10);
        assert_eq!(plain.events[BATCH_EVENTS - 2].argv[0].len(), 1);
        // Reaching the bound exactly closes the batch.
        lane.push(chunk(BATCH_EVENTS - 2, 1));
        assert_eq!(lane.held(), 2);
        assert_eq!(lane.backlog[1].events, BATCH_EVENTS);
        assert_eq!(lane.due(), None);
        // Bytes: a chunk that would pass BATCH_BYTES starts a new batch.
        lane.push(chunk(1, BATCH_BYTES / 2));
        lane.push(chunk(1, BATCH_BYTES / 2));
        assert_eq!(lane.held(), 3);
        assert!(lane
            .backlog
            .iter()
            .all(|b| b.body.len() <= BATCH_BYTES + CHUNK_BYTES));
    }

    /// The sink hands over what it encoded, in chunks within their bounds,
    /// at a flush [`HANDOVER_EVERY`] after the last hand-over and at
    /// finish; what cannot be handed over is counted as dropped.
    #[test]
    fn the_sink_hands_over_chunks_and_counts_what_does_not_fit() {
        use crate::model::fixtures::{enriched, payloads, workloads};
        let m = Arc::new(Metrics::default());
        let (tx, mut rx) = handover();
        let mut sink = EventSink::new(tx.clone(), m.clone());
        let ev = enriched(payloads().remove(0), workloads().remove(0));
        let one = super::super::wire::event(&ev, false).len() + 8;
        // A drain's end within HANDOVER_EVERY of the last hand-over keeps
        // the chunk open; one after it hands it over.
        sink.every = Duration::from_secs(3600);
        sink.emit(&ev);
        sink.flush();
        assert!(rx.try_recv().is_none(), "kept open");
        sink.every = Duration::ZERO;
        sink.flush();
        assert_eq!(rx.try_recv().map(|c| c.events), Some(1));
        let n = 2 * CHUNK_EVENTS + 7;
        sink.every = Duration::from_secs(3600);
        for _ in 0..n {
            sink.emit(&ev);
        }
        // Full chunks went at once; the rest at the end.
        sink.finish();
        sink.finish();
        let mut got = 0;
        while let Some(c) = rx.try_recv() {
            assert!(c.events <= CHUNK_EVENTS && c.body.len() < CHUNK_BYTES + one);
            got += c.events;
        }
        assert_eq!(got, n);
        assert_eq!(m.ship_events_dropped.get(), 0);
        assert_eq!(tx.queued.load(Ordering::Relaxed), 0, "all taken");
        // A nearly full hand-over: the next chunk does not fit.
        assert!(tx.send(chunk(1, QUEUE_BYTES - 64)).is_ok());
        sink.emit(&ev);
        sink.emit(&ev);
        sink.finish();
        assert_eq!(m.ship_events_dropped.get(), 2);
        // The shipper thread gone.
        drop(rx);
        sink.emit(&ev);
        drop(sink);
        assert_eq!(m.ship_events_dropped.get(), 3, "handed over at drop");
    }

    /// The hand-over holds at most QUEUE_BYTES: a chunk past it comes
    /// back; taking chunks out makes room again.
    #[test]
    fn the_handover_is_bounded_in_bytes() {
        let (tx, mut rx) = handover();
        let big = || chunk(1, QUEUE_BYTES / 3);
        assert!(tx.send(big()).is_ok());
        assert!(tx.send(big()).is_ok());
        let (back, why) = tx.send(big()).err().unwrap();
        assert_eq!((back.events, why), (1, "shipping queue full"));
        assert!(tx.send(chunk(1, 10)).is_ok(), "a small one still fits");
        assert!(rx.try_recv().is_some());
        assert!(tx.send(big()).is_ok(), "room again");
        drop(rx);
        let (_, why) = tx.send(chunk(1, 1)).err().unwrap();
        assert_eq!(why, "shipping thread gone");
    }
}
