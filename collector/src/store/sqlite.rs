//! The embedded default store: one SQLite file (WAL), one writer connection
//! and one reader connection, each used from a blocking task so the async
//! runtime never waits on the disk.
//!
//! Rows keep the indexed fields as columns and the whole wire message
//! (protobuf, with the agent's JSON inside) as `msg`, so what comes out is
//! exactly what went in.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use prost::Message;
use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Transaction};
use vigil_proto::{
    Detection, Event, EvidenceInfo, IncidentDetail, IncidentSummary, ListDetectionsRequest,
    ListIncidentsRequest, Severity, StoredDetection, StoredEvent,
};

use super::{
    effective_limit, like, merge_list, split_list, AgentSeen, AgentUsage, BatchOutcome, Commitment,
    CommitmentRecord, Store, StoreError, StoreStats, INCIDENT_EVENTS_LIMIT,
    INCIDENT_EVENTS_MARGIN_NS, RETENTION_STEP,
};
use crate::incident::{chain, Grouping};

const SCHEMA_VERSION: i64 = 4;

const SCHEMA: &str = r#"
CREATE TABLE agents (
  id INTEGER PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  first_seen_ns INTEGER NOT NULL,
  last_seen_ns INTEGER NOT NULL,
  cert_sha256 TEXT NOT NULL DEFAULT '',
  peer_addr TEXT NOT NULL DEFAULT ''
);
CREATE TABLE batches (
  agent_id INTEGER NOT NULL,
  stream TEXT NOT NULL,
  batch_id TEXT NOT NULL,
  received_ns INTEGER NOT NULL,
  PRIMARY KEY (agent_id, stream, batch_id)
) WITHOUT ROWID;
CREATE INDEX batches_received ON batches(received_ns);
CREATE TABLE events (
  id INTEGER PRIMARY KEY,
  agent_id INTEGER NOT NULL REFERENCES agents(id),
  time_ns INTEGER NOT NULL,
  received_ns INTEGER NOT NULL,
  kind TEXT NOT NULL,
  pid INTEGER NOT NULL,
  ppid INTEGER NOT NULL,
  exe TEXT NOT NULL,
  workload TEXT NOT NULL,
  msg BLOB NOT NULL
);
CREATE INDEX events_time ON events(time_ns);
CREATE INDEX events_agent_time ON events(agent_id, time_ns);
CREATE TABLE incidents (
  id INTEGER PRIMARY KEY,
  agent_id INTEGER NOT NULL REFERENCES agents(id),
  workload TEXT NOT NULL,
  root_pid INTEGER NOT NULL,
  root_exe TEXT NOT NULL,
  first_seen_ns INTEGER NOT NULL,
  last_seen_ns INTEGER NOT NULL,
  max_severity INTEGER NOT NULL,
  detection_count INTEGER NOT NULL,
  rules TEXT NOT NULL,
  mitre TEXT NOT NULL,
  title TEXT NOT NULL
);
CREATE INDEX incidents_last_seen ON incidents(last_seen_ns);
CREATE INDEX incidents_agent_workload ON incidents(agent_id, workload, last_seen_ns);
CREATE TABLE incident_processes (
  pid INTEGER NOT NULL,
  incident_id INTEGER NOT NULL REFERENCES incidents(id) ON DELETE CASCADE,
  PRIMARY KEY (pid, incident_id)
) WITHOUT ROWID;
CREATE TABLE detections (
  id INTEGER PRIMARY KEY,
  agent_id INTEGER NOT NULL REFERENCES agents(id),
  incident_id INTEGER NOT NULL REFERENCES incidents(id),
  time_ns INTEGER NOT NULL,
  received_ns INTEGER NOT NULL,
  rule TEXT NOT NULL,
  severity INTEGER NOT NULL,
  pid INTEGER NOT NULL,
  exe TEXT NOT NULL,
  workload TEXT NOT NULL,
  summary TEXT NOT NULL,
  msg BLOB NOT NULL
);
CREATE INDEX detections_time ON detections(time_ns);
CREATE INDEX detections_incident ON detections(incident_id, time_ns);
CREATE INDEX detections_agent_time ON detections(agent_id, time_ns);
CREATE INDEX detections_rule_time ON detections(rule, time_ns);
CREATE TABLE detection_evidence (
  detection_id INTEGER NOT NULL REFERENCES detections(id) ON DELETE CASCADE,
  bundle_id TEXT NOT NULL,
  PRIMARY KEY (detection_id, bundle_id)
) WITHOUT ROWID;
CREATE INDEX detection_evidence_bundle ON detection_evidence(bundle_id);
CREATE TABLE evidence (
  bundle_id TEXT PRIMARY KEY,
  agent_id INTEGER NOT NULL REFERENCES agents(id),
  size INTEGER NOT NULL,
  stored_ns INTEGER NOT NULL,
  label TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX evidence_agent ON evidence(agent_id, stored_ns);
"#;

/// Version 2: what the collector reads from a bundle's manifest at ingest
/// (the captured process, the detection's time, the chain link).
const MIGRATE_2: &str = r#"
ALTER TABLE evidence ADD COLUMN pid INTEGER NOT NULL DEFAULT 0;
ALTER TABLE evidence ADD COLUMN rule TEXT NOT NULL DEFAULT '';
ALTER TABLE evidence ADD COLUMN detection_ns INTEGER NOT NULL DEFAULT 0;
ALTER TABLE evidence ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE evidence ADD COLUMN prev_bundle_id TEXT NOT NULL DEFAULT '';
ALTER TABLE evidence ADD COLUMN chain TEXT NOT NULL DEFAULT '';
ALTER TABLE evidence ADD COLUMN manifest_agent TEXT NOT NULL DEFAULT '';
CREATE INDEX evidence_subject ON evidence(agent_id, detection_ns);
"#;

/// Version 3: proof of origin (signed or not, the agent's signature, the
/// collector's receipt) and the chain lookups (successors of a bundle).
const MIGRATE_3: &str = r#"
ALTER TABLE evidence ADD COLUMN origin TEXT NOT NULL DEFAULT '';
ALTER TABLE evidence ADD COLUMN signature TEXT NOT NULL DEFAULT '';
ALTER TABLE evidence ADD COLUMN receipt TEXT NOT NULL DEFAULT '';
CREATE INDEX evidence_prev ON evidence(agent_id, prev_bundle_id);
CREATE INDEX evidence_seq ON evidence(agent_id, seq);
"#;

/// Version 4: commitments to bundles made before their upload, and each
/// stored bundle's standing against them.
const MIGRATE_4: &str = r#"
ALTER TABLE evidence ADD COLUMN commitment TEXT NOT NULL DEFAULT '';
CREATE TABLE commitments (
  agent_id INTEGER NOT NULL REFERENCES agents(id),
  bundle_id TEXT NOT NULL,
  seq INTEGER NOT NULL,
  prev_bundle_id TEXT NOT NULL,
  size INTEGER NOT NULL,
  committed_ns INTEGER NOT NULL,
  PRIMARY KEY (agent_id, bundle_id)
) WITHOUT ROWID;
CREATE INDEX commitments_seq ON commitments(agent_id, seq);
CREATE INDEX commitments_bundle ON commitments(bundle_id);
"#;

/// The columns of an evidence record, in [`evidence_row`] order.
const EVIDENCE_COLUMNS: &str = "e.bundle_id, a.name, e.size, e.stored_ns, e.label, e.pid, e.rule,
   e.detection_ns, e.seq, e.prev_bundle_id, e.chain, e.manifest_agent, e.origin, e.signature,
   e.receipt, e.commitment";

fn evidence_row(r: &rusqlite::Row) -> rusqlite::Result<EvidenceInfo> {
    Ok(EvidenceInfo {
        bundle_id: r.get(0)?,
        agent: r.get(1)?,
        size: r.get::<_, i64>(2)? as u64,
        stored_unix_nanos: r.get(3)?,
        label: r.get(4)?,
        pid: r.get(5)?,
        rule: r.get(6)?,
        detection_unix_nanos: r.get(7)?,
        seq: r.get::<_, i64>(8)? as u64,
        prev_bundle_id: r.get(9)?,
        chain: r.get(10)?,
        manifest_agent: r.get(11)?,
        origin: r.get(12)?,
        signature: r.get(13)?,
        receipt: r.get(14)?,
        commitment: r.get(15)?,
    })
}

/// The SQLite store.
#[derive(Clone)]
pub struct SqliteStore {
    path: PathBuf,
    writer: Arc<Mutex<Connection>>,
    reader: Arc<Mutex<Connection>>,
    grouping: Arc<Grouping>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // WAL + FULL: every commit is fsynced before it returns, so what the
    // collector acknowledged survives a power cut (NORMAL would lose the
    // last transactions, which the agent no longer holds).
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(())
}

impl SqliteStore {
    /// Opens (creating and migrating when needed) the database at `path`.
    pub fn open(path: &Path, grouping: Grouping) -> Result<SqliteStore, StoreError> {
        // Created (or tightened) 0600 before SQLite opens it: SQLite gives
        // the -wal and -shm files the database file's mode.
        vigil_bundle::private::open_rw(path)
            .map_err(|e| StoreError::Schema(format!("{}: {e}", path.display())))?;
        for suffix in ["-wal", "-shm"] {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            if std::path::Path::new(&p).exists() {
                vigil_bundle::private::open_rw(std::path::Path::new(&p))
                    .map_err(|e| StoreError::Schema(format!("{}: {e}", path.display())))?;
            }
        }
        let mut writer = Connection::open(path)?;
        configure(&writer)?;
        let version: i64 = writer.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        match version {
            0..=3 => {
                let tx = writer.transaction()?;
                if version == 0 {
                    tx.execute_batch(SCHEMA)?;
                }
                if version < 2 {
                    tx.execute_batch(MIGRATE_2)?;
                }
                if version < 3 {
                    tx.execute_batch(MIGRATE_3)?;
                }
                tx.execute_batch(MIGRATE_4)?;
                tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
                tx.commit()?;
            }
            SCHEMA_VERSION => {}
            v => {
                return Err(StoreError::Schema(format!(
                    "{} has schema version {v}, this collector knows {SCHEMA_VERSION}: \
                     it was written by a newer collector",
                    path.display()
                )));
            }
        }
        let reader = Connection::open(path)?;
        configure(&reader)?;
        Ok(SqliteStore {
            path: path.to_path_buf(),
            writer: Arc::new(Mutex::new(writer)),
            reader: Arc::new(Mutex::new(reader)),
            grouping: Arc::new(grouping),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn with_conn<R, F>(conn: &Arc<Mutex<Connection>>, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let conn = Arc::clone(conn);
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| StoreError::Task("connection mutex poisoned".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    async fn write<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    {
        Self::with_conn(&self.writer, f).await
    }

    async fn read<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    {
        Self::with_conn(&self.reader, f).await
    }
}

fn agent_id(tx: &Transaction<'_>, name: &str, now_ns: i64) -> rusqlite::Result<i64> {
    tx.prepare_cached(
        "INSERT INTO agents (name, first_seen_ns, last_seen_ns) VALUES (?1, ?2, ?2)
         ON CONFLICT(name) DO UPDATE SET last_seen_ns = max(last_seen_ns, excluded.last_seen_ns)
         RETURNING id",
    )?
    .query_row(params![name, now_ns], |r| r.get(0))
}

/// Records the batch id; false when it was already there.
fn claim_batch(
    tx: &Transaction<'_>,
    agent: i64,
    stream: &str,
    batch_id: &str,
    now_ns: i64,
) -> rusqlite::Result<bool> {
    if batch_id.is_empty() {
        return Ok(true);
    }
    let n = tx
        .prepare_cached("INSERT OR IGNORE INTO batches VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![agent, stream, batch_id, now_ns])?;
    Ok(n == 1)
}

/// Finds or creates the incident of `d`; returns its id.
fn assign_incident(
    tx: &Transaction<'_>,
    grouping: &Grouping,
    agent: i64,
    d: &Detection,
) -> rusqlite::Result<i64> {
    let links = chain(d);
    let top = links.last().expect("a chain is never empty");
    let t = d.time_unix_nanos;
    let placeholders = vec!["?"; links.len()].join(",");
    let sql = format!(
        "SELECT i.id, i.root_pid, i.first_seen_ns, i.last_seen_ns, i.max_severity, i.rules, i.mitre
         FROM incident_processes p JOIN incidents i ON i.id = p.incident_id
         WHERE p.pid IN ({placeholders}) AND i.agent_id = ? AND i.workload = ?
           AND i.last_seen_ns >= ? AND i.first_seen_ns <= ?
         ORDER BY i.id LIMIT 1"
    );
    let mut args: Vec<Value> = links.iter().map(|l| Value::Integer(l.pid.into())).collect();
    args.extend([
        Value::Integer(agent),
        Value::Text(d.workload_key.clone()),
        Value::Integer(t.saturating_sub(grouping.window_ns)),
        Value::Integer(t.saturating_add(grouping.window_ns)),
    ]);
    type Found = (i64, u32, i64, i64, i32, String, String);
    let found: Option<Found> = tx
        .prepare_cached(&sql)?
        .query_row(params_from_iter(args), |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        })
        .optional()?;
    let title = if d.summary.is_empty() {
        d.rule.clone()
    } else {
        d.summary.clone()
    };
    let id = match found {
        None => {
            tx.prepare_cached(
                "INSERT INTO incidents (agent_id, workload, root_pid, root_exe, first_seen_ns,
                   last_seen_ns, max_severity, detection_count, rules, mitre, title)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, 1, ?7, ?8, ?9)",
            )?
            .execute(params![
                agent,
                d.workload_key,
                top.pid,
                top.exe,
                t,
                d.severity,
                merge_list("", std::slice::from_ref(&d.rule)),
                merge_list("", &d.mitre),
                title
            ])?;
            tx.last_insert_rowid()
        }
        Some((id, root_pid, first, last, sev, rules, mitre)) => {
            // The new chain reaches above the current root: it becomes the
            // root.
            let (root_pid, root_exe) =
                if top.pid != root_pid && links.iter().any(|l| l.pid == root_pid) {
                    (top.pid, Some(top.exe.clone()))
                } else {
                    (root_pid, None)
                };
            let retitle = crate::incident::retitles(d.severity, t, sev, first);
            tx.prepare_cached(
                "UPDATE incidents SET root_pid = ?2, root_exe = coalesce(?3, root_exe),
                   first_seen_ns = ?4, last_seen_ns = ?5, max_severity = ?6,
                   detection_count = detection_count + 1, rules = ?7, mitre = ?8,
                   title = coalesce(?9, title)
                 WHERE id = ?1",
            )?
            .execute(params![
                id,
                root_pid,
                root_exe,
                first.min(t),
                last.max(t),
                sev.max(d.severity),
                merge_list(&rules, std::slice::from_ref(&d.rule)),
                merge_list(&mitre, &d.mitre),
                retitle.then_some(title),
            ])?;
            id
        }
    };
    let mut ins = tx.prepare_cached("INSERT OR IGNORE INTO incident_processes VALUES (?1, ?2)")?;
    for l in &links {
        ins.execute(params![l.pid, id])?;
    }
    Ok(id)
}

const INCIDENT_COLUMNS: &str = "i.id, a.name, i.workload, i.root_pid, i.root_exe, i.first_seen_ns,
    i.last_seen_ns, i.max_severity, i.detection_count, i.rules, i.mitre, i.title";

fn incident_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<IncidentSummary> {
    Ok(IncidentSummary {
        id: r.get(0)?,
        agent: r.get(1)?,
        workload_key: r.get(2)?,
        root_pid: r.get(3)?,
        root_exe: r.get(4)?,
        first_seen_unix_nanos: r.get(5)?,
        last_seen_unix_nanos: r.get(6)?,
        max_severity: r.get(7)?,
        detection_count: r.get(8)?,
        rules: split_list(&r.get::<_, String>(9)?),
        mitre: split_list(&r.get::<_, String>(10)?),
        title: r.get(11)?,
    })
}

const DETECTION_COLUMNS: &str = "d.id, a.name, d.incident_id, d.received_ns, d.msg";

fn detection_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(StoredDetection, Vec<u8>)> {
    Ok((
        StoredDetection {
            id: r.get(0)?,
            agent: r.get(1)?,
            incident_id: r.get(2)?,
            received_unix_nanos: r.get(3)?,
            detection: None,
        },
        r.get(4)?,
    ))
}

fn decode_detections(
    rows: Vec<(StoredDetection, Vec<u8>)>,
) -> Result<Vec<StoredDetection>, StoreError> {
    rows.into_iter()
        .map(|(mut s, msg)| {
            s.detection = Some(Detection::decode(msg.as_slice())?);
            Ok(s)
        })
        .collect()
}

#[async_trait]
impl Store for SqliteStore {
    async fn record_agent(&self, agent: &AgentSeen, now_ns: i64) -> Result<(), StoreError> {
        let agent = agent.clone();
        self.write(move |c| {
            c.prepare_cached(
                "INSERT INTO agents (name, first_seen_ns, last_seen_ns, cert_sha256, peer_addr)
                 VALUES (?1, ?2, ?2, ?3, ?4)
                 ON CONFLICT(name) DO UPDATE SET last_seen_ns = excluded.last_seen_ns,
                   cert_sha256 = excluded.cert_sha256, peer_addr = excluded.peer_addr",
            )?
            .execute(params![
                agent.name,
                now_ns,
                agent.cert_sha256,
                agent.peer_addr
            ])?;
            Ok(())
        })
        .await
    }

    async fn insert_events(
        &self,
        agent: &str,
        batch_id: &str,
        events: Vec<Event>,
        now_ns: i64,
    ) -> Result<BatchOutcome, StoreError> {
        let (agent, batch_id) = (agent.to_string(), batch_id.to_string());
        self.write(move |c| {
            let tx = c.transaction()?;
            let agent = agent_id(&tx, &agent, now_ns)?;
            if !claim_batch(&tx, agent, "events", &batch_id, now_ns)? {
                return Ok(BatchOutcome::Duplicate);
            }
            {
                let mut ins = tx.prepare_cached(
                    "INSERT INTO events (agent_id, time_ns, received_ns, kind, pid, ppid, exe, workload, msg)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?;
                for e in &events {
                    ins.execute(params![
                        agent,
                        e.time_unix_nanos,
                        now_ns,
                        e.kind,
                        e.pid,
                        e.ppid,
                        e.exe,
                        e.workload_key,
                        e.encode_to_vec()
                    ])?;
                }
            }
            tx.commit()?;
            Ok(BatchOutcome::Stored(events.len() as u64))
        })
        .await
    }

    async fn insert_detections(
        &self,
        agent: &str,
        batch_id: &str,
        detections: Vec<Detection>,
        now_ns: i64,
    ) -> Result<BatchOutcome, StoreError> {
        let (agent, batch_id) = (agent.to_string(), batch_id.to_string());
        let grouping = Arc::clone(&self.grouping);
        self.write(move |c| {
            let tx = c.transaction()?;
            let agent = agent_id(&tx, &agent, now_ns)?;
            if !claim_batch(&tx, agent, "detections", &batch_id, now_ns)? {
                return Ok(BatchOutcome::Duplicate);
            }
            for d in &detections {
                let incident = assign_incident(&tx, &grouping, agent, d)?;
                tx.prepare_cached(
                    "INSERT INTO detections (agent_id, incident_id, time_ns, received_ns, rule,
                       severity, pid, exe, workload, summary, msg)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                )?
                .execute(params![
                    agent,
                    incident,
                    d.time_unix_nanos,
                    now_ns,
                    d.rule,
                    d.severity,
                    d.pid,
                    d.exe,
                    d.workload_key,
                    d.summary,
                    d.encode_to_vec()
                ])?;
                let id = tx.last_insert_rowid();
                let mut ev =
                    tx.prepare_cached("INSERT OR IGNORE INTO detection_evidence VALUES (?1, ?2)")?;
                for b in &d.evidence_ids {
                    ev.execute(params![id, b])?;
                }
                // Bundles stored before their detection arrived.
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO detection_evidence
                     SELECT ?1, bundle_id FROM evidence
                     WHERE agent_id = ?2 AND detection_ns = ?3 AND pid = ?4 AND detection_ns != 0",
                )?
                .execute(params![id, agent, d.time_unix_nanos, d.pid])?;
            }
            tx.commit()?;
            Ok(BatchOutcome::Stored(detections.len() as u64))
        })
        .await
    }

    async fn record_evidence(&self, info: EvidenceInfo) -> Result<(), StoreError> {
        self.write(move |c| {
            let tx = c.transaction()?;
            let agent = agent_id(&tx, &info.agent, info.stored_unix_nanos)?;
            tx.prepare_cached(
                "INSERT OR IGNORE INTO evidence (bundle_id, agent_id, size, stored_ns, label, pid,
                   rule, detection_ns, seq, prev_bundle_id, chain, manifest_agent, origin,
                   signature, receipt, commitment)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            )?
            .execute(params![
                info.bundle_id,
                agent,
                info.size as i64,
                info.stored_unix_nanos,
                info.label,
                info.pid,
                info.rule,
                info.detection_unix_nanos,
                info.seq as i64,
                info.prev_bundle_id,
                info.chain,
                info.manifest_agent,
                info.origin,
                info.signature,
                info.receipt,
                info.commitment
            ])?;
            // The detections of the captured event (stored before it).
            if info.detection_unix_nanos != 0 {
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO detection_evidence
                     SELECT id, ?1 FROM detections
                     WHERE agent_id = ?2 AND time_ns = ?3 AND pid = ?4",
                )?
                .execute(params![
                    info.bundle_id,
                    agent,
                    info.detection_unix_nanos,
                    info.pid
                ])?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn evidence(&self, bundle_id: &str) -> Result<Option<EvidenceInfo>, StoreError> {
        let bundle_id = bundle_id.to_string();
        self.read(move |c| {
            Ok(c.prepare_cached(&format!(
                "SELECT {EVIDENCE_COLUMNS}
                     FROM evidence e JOIN agents a ON a.id = e.agent_id WHERE e.bundle_id = ?1"
            ))?
            .query_row([bundle_id], evidence_row)
            .optional()?)
        })
        .await
    }

    async fn successors(&self, agent: &str, prev: &str) -> Result<Vec<String>, StoreError> {
        let (agent, prev) = (agent.to_string(), prev.to_string());
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT e.bundle_id FROM evidence e JOIN agents a ON a.id = e.agent_id
                 WHERE a.name = ?1 AND e.prev_bundle_id = ?2 AND (?2 <> '' OR e.seq = 1)
                 ORDER BY e.stored_ns, e.bundle_id",
            )?;
            let ids = st
                .query_map(params![agent, prev], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            Ok(ids)
        })
        .await
    }

    async fn record_commitment(
        &self,
        agent: &str,
        c: &Commitment,
        now_ns: i64,
    ) -> Result<bool, StoreError> {
        let (agent, c) = (agent.to_string(), c.clone());
        self.write(move |conn| {
            let tx = conn.transaction()?;
            let agent = agent_id(&tx, &agent, now_ns)?;
            let n = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO commitments
                       (agent_id, bundle_id, seq, prev_bundle_id, size, committed_ns)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![
                    agent,
                    c.bundle_id,
                    c.seq as i64,
                    c.prev_bundle_id,
                    c.size as i64,
                    now_ns
                ])?;
            tx.commit()?;
            Ok(n == 1)
        })
        .await
    }

    async fn commitments_at(&self, agent: &str, seq: u64) -> Result<Vec<String>, StoreError> {
        let agent = agent.to_string();
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT m.bundle_id FROM commitments m JOIN agents a ON a.id = m.agent_id
                 WHERE a.name = ?1 AND m.seq = ?2 ORDER BY m.committed_ns, m.bundle_id",
            )?;
            let ids = st
                .query_map(params![agent, seq as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            Ok(ids)
        })
        .await
    }

    async fn commitment(&self, bundle_id: &str) -> Result<Option<CommitmentRecord>, StoreError> {
        let id = bundle_id.to_string();
        self.read(move |c| {
            Ok(c.prepare_cached(
                "SELECT a.name, m.committed_ns FROM commitments m JOIN agents a ON a.id = m.agent_id
                 WHERE m.bundle_id = ?1 ORDER BY m.committed_ns LIMIT 1",
            )?
            .query_row([id], |r| {
                Ok(CommitmentRecord {
                    agent: r.get(0)?,
                    committed_ns: r.get(1)?,
                })
            })
            .optional()?)
        })
        .await
    }

    async fn open_commitments(&self, agent: &str) -> Result<u64, StoreError> {
        let agent = agent.to_string();
        self.read(move |c| {
            let n: i64 = c
                .prepare_cached(
                    "SELECT count(*) FROM commitments m JOIN agents a ON a.id = m.agent_id
                     WHERE a.name = ?1
                       AND NOT EXISTS (SELECT 1 FROM evidence e WHERE e.bundle_id = m.bundle_id)",
                )?
                .query_row([agent], |r| r.get(0))?;
            Ok(n as u64)
        })
        .await
    }

    async fn chain_head(&self, agent: &str) -> Result<Option<EvidenceInfo>, StoreError> {
        let agent = agent.to_string();
        self.read(move |c| {
            Ok(c.prepare_cached(&format!(
                "SELECT {EVIDENCE_COLUMNS}
                     FROM evidence e JOIN agents a ON a.id = e.agent_id
                     WHERE a.name = ?1 AND e.seq > 0 ORDER BY e.seq DESC, e.stored_ns LIMIT 1"
            ))?
            .query_row([agent], evidence_row)
            .optional()?)
        })
        .await
    }

    async fn list_incidents(
        &self,
        q: &ListIncidentsRequest,
    ) -> Result<Vec<IncidentSummary>, StoreError> {
        let q = q.clone();
        self.read(move |c| {
            let mut wh = vec!["1 = 1".to_string()];
            let mut args: Vec<Value> = Vec::new();
            if q.since_unix_nanos != 0 {
                wh.push("i.last_seen_ns >= ?".into());
                args.push(Value::Integer(q.since_unix_nanos));
            }
            if q.until_unix_nanos != 0 {
                wh.push("i.first_seen_ns < ?".into());
                args.push(Value::Integer(q.until_unix_nanos));
            }
            if !q.agent.is_empty() {
                wh.push("a.name = ?".into());
                args.push(Value::Text(q.agent.clone()));
            }
            if q.min_severity > Severity::Unspecified as i32 {
                wh.push("i.max_severity >= ?".into());
                args.push(Value::Integer(q.min_severity.into()));
            }
            if !q.search.is_empty() {
                wh.push(
                    "(i.title LIKE ? ESCAPE '\\' OR i.rules LIKE ? ESCAPE '\\'
                      OR i.mitre LIKE ? ESCAPE '\\' OR i.root_exe LIKE ? ESCAPE '\\'
                      OR i.workload LIKE ? ESCAPE '\\'
                      OR EXISTS (SELECT 1 FROM detections d WHERE d.incident_id = i.id
                        AND (d.exe LIKE ? ESCAPE '\\' OR d.summary LIKE ? ESCAPE '\\')))"
                        .into(),
                );
                args.extend(std::iter::repeat_n(Value::Text(like(&q.search)), 7));
            }
            let sql = format!(
                "SELECT {INCIDENT_COLUMNS} FROM incidents i JOIN agents a ON a.id = i.agent_id
                 WHERE {} ORDER BY i.last_seen_ns DESC, i.id DESC LIMIT {}",
                wh.join(" AND "),
                effective_limit(q.limit)
            );
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt
                .query_map(params_from_iter(args), incident_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn incident(&self, id: i64) -> Result<Option<IncidentDetail>, StoreError> {
        self.read(move |c| {
            let tx = c.transaction()?;
            let found = tx
                .query_row(
                    &format!(
                        "SELECT {INCIDENT_COLUMNS}, i.agent_id FROM incidents i
                         JOIN agents a ON a.id = i.agent_id WHERE i.id = ?1"
                    ),
                    [id],
                    |r| Ok((incident_row(r)?, r.get::<_, i64>(12)?)),
                )
                .optional()?;
            let Some((summary, agent_id)) = found else {
                return Ok(None);
            };
            let rows = tx
                .prepare(&format!(
                    "SELECT {DETECTION_COLUMNS} FROM detections d JOIN agents a ON a.id = d.agent_id
                     WHERE d.incident_id = ?1 ORDER BY d.time_ns, d.id LIMIT 5000"
                ))?
                .query_map([id], detection_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let detections = decode_detections(rows)?;
            // A detection may name a bundle not stored (yet): its record is
            // then the id alone.
            let evidence = tx
                .prepare(
                    "SELECT de.bundle_id, coalesce(a.name, ''), coalesce(e.size, 0),
                       coalesce(e.stored_ns, 0), coalesce(e.label, ''), coalesce(e.pid, 0),
                       coalesce(e.rule, ''), coalesce(e.detection_ns, 0), coalesce(e.seq, 0),
                       coalesce(e.prev_bundle_id, ''), coalesce(e.chain, ''),
                       coalesce(e.manifest_agent, ''), coalesce(e.origin, ''),
                       coalesce(e.signature, ''), coalesce(e.receipt, ''),
                       coalesce(e.commitment, '')
                     FROM detection_evidence de JOIN detections d ON d.id = de.detection_id
                     LEFT JOIN evidence e ON e.bundle_id = de.bundle_id
                     LEFT JOIN agents a ON a.id = e.agent_id
                     WHERE d.incident_id = ?1 GROUP BY de.bundle_id ORDER BY min(d.time_ns)",
                )?
                .query_map([id], evidence_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            // Events of the detected processes and their children around
            // the incident.
            let mut pids: Vec<u32> = detections
                .iter()
                .filter_map(|d| d.detection.as_ref().map(|d| d.pid))
                .collect();
            pids.sort_unstable();
            pids.dedup();
            let pid_list = pids
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let events = if pids.is_empty() {
                Vec::new()
            } else {
                let rows = tx
                    .prepare(&format!(
                        "SELECT e.id, e.msg FROM events e WHERE e.agent_id = ?1
                           AND e.time_ns BETWEEN ?2 AND ?3
                           AND (e.pid IN ({pid_list}) OR e.ppid IN ({pid_list}))
                         ORDER BY e.time_ns, e.id LIMIT {INCIDENT_EVENTS_LIMIT}"
                    ))?
                    .query_map(
                        params![
                            agent_id,
                            summary.first_seen_unix_nanos - INCIDENT_EVENTS_MARGIN_NS,
                            summary.last_seen_unix_nanos + INCIDENT_EVENTS_MARGIN_NS
                        ],
                        |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)),
                    )?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                rows.into_iter()
                    .map(|(id, msg)| {
                        Ok(StoredEvent {
                            id,
                            agent: summary.agent.clone(),
                            event: Some(Event::decode(msg.as_slice())?),
                        })
                    })
                    .collect::<Result<Vec<_>, StoreError>>()?
            };
            Ok(Some(IncidentDetail {
                incident: Some(summary),
                detections,
                evidence,
                events,
            }))
        })
        .await
    }

    async fn list_detections(
        &self,
        q: &ListDetectionsRequest,
    ) -> Result<Vec<StoredDetection>, StoreError> {
        let q = q.clone();
        self.read(move |c| {
            let mut wh = vec!["1 = 1".to_string()];
            let mut args: Vec<Value> = Vec::new();
            let mut push = |cond: &str, v: Value| {
                wh.push(cond.to_string());
                args.push(v);
            };
            if q.since_unix_nanos != 0 {
                push("d.time_ns >= ?", Value::Integer(q.since_unix_nanos));
            }
            if q.until_unix_nanos != 0 {
                push("d.time_ns < ?", Value::Integer(q.until_unix_nanos));
            }
            if !q.agent.is_empty() {
                push("a.name = ?", Value::Text(q.agent.clone()));
            }
            if !q.rule.is_empty() {
                push("d.rule = ?", Value::Text(q.rule.clone()));
            }
            if q.min_severity > Severity::Unspecified as i32 {
                push("d.severity >= ?", Value::Integer(q.min_severity.into()));
            }
            if q.incident_id != 0 {
                push("d.incident_id = ?", Value::Integer(q.incident_id));
            }
            if !q.search.is_empty() {
                let p = like(&q.search);
                wh.push(
                    "(d.rule LIKE ? ESCAPE '\\' OR d.summary LIKE ? ESCAPE '\\'
                      OR d.exe LIKE ? ESCAPE '\\' OR d.workload LIKE ? ESCAPE '\\')"
                        .into(),
                );
                args.extend(std::iter::repeat_n(Value::Text(p), 4));
            }
            let sql = format!(
                "SELECT {DETECTION_COLUMNS} FROM detections d JOIN agents a ON a.id = d.agent_id
                 WHERE {} ORDER BY d.time_ns DESC, d.id DESC LIMIT {}",
                wh.join(" AND "),
                effective_limit(q.limit)
            );
            let rows = c
                .prepare(&sql)?
                .query_map(params_from_iter(args), detection_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            decode_detections(rows)
        })
        .await
    }

    async fn delete_events_before(&self, before_ns: i64) -> Result<u64, StoreError> {
        let mut total = 0u64;
        loop {
            let n = self
                .write(move |c| {
                    Ok(c.prepare_cached(
                        "DELETE FROM events WHERE id IN
                           (SELECT id FROM events WHERE time_ns < ?1 LIMIT ?2)",
                    )?
                    .execute(params![before_ns, RETENTION_STEP])?)
                })
                .await?;
            total += n as u64;
            if (n as i64) < RETENTION_STEP {
                break;
            }
        }
        self.write(move |c| {
            c.execute("DELETE FROM batches WHERE received_ns < ?1", [before_ns])?;
            Ok(())
        })
        .await?;
        Ok(total)
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let path = self.path.clone();
        self.read(move |c| {
            let count = |table: &str| -> rusqlite::Result<u64> {
                c.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| {
                    r.get::<_, i64>(0)
                })
                .map(|n| n as u64)
            };
            let file_len = |p: PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
            let mut wal = path.clone().into_os_string();
            wal.push("-wal");
            Ok(StoreStats {
                agents: count("agents")?,
                events: count("events")?,
                detections: count("detections")?,
                incidents: count("incidents")?,
                evidence: count("evidence")?,
                bytes: file_len(path) + file_len(PathBuf::from(wal)),
            })
        })
        .await
    }

    async fn usage(&self) -> Result<Vec<(String, AgentUsage)>, StoreError> {
        self.read(move |c| {
            let mut s = c.prepare(
                "SELECT a.name,
                   (SELECT count(*) FROM events WHERE agent_id = a.id),
                   (SELECT count(*) FROM detections WHERE agent_id = a.id),
                   (SELECT coalesce(sum(size), 0) FROM evidence WHERE agent_id = a.id)
                 FROM agents a ORDER BY a.name",
            )?;
            let rows = s.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    AgentUsage {
                        events: r.get::<_, i64>(1)? as u64,
                        detections: r.get::<_, i64>(2)? as u64,
                        evidence_bytes: r.get::<_, i64>(3)? as u64,
                    },
                ))
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }
}

#[cfg(test)]
mod tests;
