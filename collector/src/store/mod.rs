//! The index of what agents sent: agents, events, detections, incidents and
//! evidence records, behind the [`Store`] trait so a scale-out backend can
//! replace the embedded default ([`SqliteStore`]). Evidence bytes are not
//! here: see [`crate::blobs`].
//!
//! Contract of every implementation: a batch is stored atomically (all of
//! it or none); a batch whose (agent, stream, batch id) was stored before
//! is not stored again; incidents are assigned inside the same transaction
//! as their detections, with [`crate::incident`]'s rule.

#[cfg(test)]
pub(crate) mod conformance;
mod postgres;
mod sqlite;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

use async_trait::async_trait;
use vigil_proto::{
    Detection, Event, EvidenceInfo, IncidentDetail, IncidentSummary, ListDetectionsRequest,
    ListIncidentsRequest, StoredDetection,
};

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused.
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored record does not decode (corruption or a downgrade).
    #[error("stored record does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    /// PostgreSQL refused or the connection failed.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// The blocking task running the query died.
    #[error("store task failed: {0}")]
    Task(String),
    /// The database is not one this collector can use.
    #[error("{0}")]
    Schema(String),
}

/// Result of storing one batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Stored this many items.
    Stored(u64),
    /// Already stored earlier under the same batch id: nothing done.
    Duplicate,
}

/// Who sent something, as the TLS layer verified it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentSeen {
    /// Certificate CN.
    pub name: String,
    /// SHA-256 of the client certificate.
    pub cert_sha256: String,
    /// Remote address, when known.
    pub peer_addr: String,
}

/// Row counts and sizes, for metrics and `vigil` status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Agents ever seen.
    pub agents: u64,
    /// Events stored.
    pub events: u64,
    /// Detections stored.
    pub detections: u64,
    /// Incidents.
    pub incidents: u64,
    /// Evidence bundles recorded.
    pub evidence: u64,
    /// Bytes the index takes on disk.
    pub bytes: u64,
}

/// What one agent holds in the collector (per-agent storage quotas).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentUsage {
    /// Events stored.
    pub events: u64,
    /// Detections stored.
    pub detections: u64,
    /// Bytes of the evidence bundles recorded under the agent.
    pub evidence_bytes: u64,
}

/// An agent's commitment to a sealed bundle, made before its upload
/// (`CommitEvidence`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Commitment {
    /// The bundle's id.
    pub bundle_id: String,
    /// Its place in the agent's chain (>= 1).
    pub seq: u64,
    /// Its predecessor's id ("" for seq 1).
    pub prev_bundle_id: String,
    /// Its size in bytes.
    pub size: u64,
}

/// What the store holds of one commitment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitmentRecord {
    /// The committing agent.
    pub agent: String,
    /// When the collector recorded it (ns since the Unix epoch).
    pub committed_ns: i64,
}

/// The index of everything agents sent.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Records that an agent connected (first/last seen, certificate).
    async fn record_agent(&self, agent: &AgentSeen, now_ns: i64) -> Result<(), StoreError>;

    /// Stores a batch of events from `agent`; an empty `batch_id` disables
    /// de-duplication.
    async fn insert_events(
        &self,
        agent: &str,
        batch_id: &str,
        events: Vec<Event>,
        now_ns: i64,
    ) -> Result<BatchOutcome, StoreError>;

    /// Stores a batch of detections from `agent` and assigns each to an
    /// incident.
    async fn insert_detections(
        &self,
        agent: &str,
        batch_id: &str,
        detections: Vec<Detection>,
        now_ns: i64,
    ) -> Result<BatchOutcome, StoreError>;

    /// Records a verified evidence bundle (idempotent: the first record of
    /// a bundle id wins).
    async fn record_evidence(&self, info: EvidenceInfo) -> Result<(), StoreError>;

    /// The record of one evidence bundle.
    async fn evidence(&self, bundle_id: &str) -> Result<Option<EvidenceInfo>, StoreError>;

    /// Ids of `agent`'s bundles naming `prev` as their predecessor (for
    /// `prev` empty: its bundles with seq 1), oldest first. More than one
    /// is a fork of its chain.
    async fn successors(&self, agent: &str, prev: &str) -> Result<Vec<String>, StoreError>;

    /// The record of `agent`'s bundle with the highest seq.
    async fn chain_head(&self, agent: &str) -> Result<Option<EvidenceInfo>, StoreError>;

    /// Records `agent`'s commitment (idempotent: false when this agent
    /// committed this bundle id before).
    async fn record_commitment(
        &self,
        agent: &str,
        c: &Commitment,
        now_ns: i64,
    ) -> Result<bool, StoreError>;

    /// Ids `agent` committed at `seq`, oldest first.
    async fn commitments_at(&self, agent: &str, seq: u64) -> Result<Vec<String>, StoreError>;

    /// The commitment to bundle `bundle_id`, if an agent made one.
    async fn commitment(&self, bundle_id: &str) -> Result<Option<CommitmentRecord>, StoreError>;

    /// How many of `agent`'s commitments have no stored bundle (yet).
    async fn open_commitments(&self, agent: &str) -> Result<u64, StoreError>;

    /// Incidents matching the filters, most recently active first.
    async fn list_incidents(
        &self,
        query: &ListIncidentsRequest,
    ) -> Result<Vec<IncidentSummary>, StoreError>;

    /// One incident with its detections, evidence and related events.
    async fn incident(&self, id: i64) -> Result<Option<IncidentDetail>, StoreError>;

    /// Detections matching the filters, newest first.
    async fn list_detections(
        &self,
        query: &ListDetectionsRequest,
    ) -> Result<Vec<StoredDetection>, StoreError>;

    /// Deletes events older than `before_ns` (and de-duplication records
    /// received before it); returns the number of events deleted.
    async fn delete_events_before(&self, before_ns: i64) -> Result<u64, StoreError>;

    /// Counts and sizes.
    async fn stats(&self) -> Result<StoreStats, StoreError>;

    /// What every agent holds (agents holding nothing may be left out).
    async fn usage(&self) -> Result<Vec<(String, AgentUsage)>, StoreError>;
}

/// Default and maximum number of rows a list query returns.
pub const DEFAULT_LIMIT: u32 = 100;
/// See [`DEFAULT_LIMIT`].
pub const MAX_LIMIT: u32 = 1000;
/// Maximum number of events returned with an incident.
pub const INCIDENT_EVENTS_LIMIT: usize = 500;

/// A limit from a request: 0 means the default; capped at [`MAX_LIMIT`].
pub fn effective_limit(requested: u32) -> u32 {
    match requested {
        0 => DEFAULT_LIMIT,
        n => n.min(MAX_LIMIT),
    }
}
/// Events this long before and after an incident's span are shown with it.
pub const INCIDENT_EVENTS_MARGIN_NS: i64 = 60 * 1_000_000_000;
/// Rows deleted per retention step (the writer is released between steps
/// so ingest carries on).
pub const RETENTION_STEP: i64 = 5000;

/// Adds `add` to a comma-separated sorted set.
pub(crate) fn merge_list(current: &str, add: &[String]) -> String {
    let mut items: Vec<&str> = current.split(',').filter(|s| !s.is_empty()).collect();
    for a in add {
        let a = a.as_str();
        if !a.is_empty() && !a.contains(',') && !items.contains(&a) {
            items.push(a);
        }
    }
    items.sort_unstable();
    items.join(",")
}

/// The items of a comma-separated set.
pub(crate) fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// A LIKE pattern matching `s` anywhere, with `%`, `_` and `\` escaped
/// (use with `ESCAPE '\'`).
pub(crate) fn like(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('%');
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}
