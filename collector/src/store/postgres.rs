//! The scale-out index: PostgreSQL (tokio-postgres), same tables and the
//! same contract as the SQLite store. One writer connection serialises the
//! write transactions (so incident assignment needs no extra locking), one
//! reader connection serves queries; both reconnect when the server went
//! away.
//!
//! Event batches go in with one `INSERT ... SELECT FROM UNNEST(arrays)`, so a
//! batch is one round trip whatever its size.

use std::collections::HashMap;

use async_trait::async_trait;
use prost::Message;
use tokio::sync::Mutex;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, NoTls, Row, Statement, Transaction};
use tracing::{info, warn};
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

const SCHEMA_VERSION: i32 = 4;

const SCHEMA: &str = r#"
CREATE TABLE agents (
  id BIGSERIAL PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  first_seen_ns BIGINT NOT NULL,
  last_seen_ns BIGINT NOT NULL,
  cert_sha256 TEXT NOT NULL DEFAULT '',
  peer_addr TEXT NOT NULL DEFAULT ''
);
CREATE TABLE batches (
  agent_id BIGINT NOT NULL,
  stream TEXT NOT NULL,
  batch_id TEXT NOT NULL,
  received_ns BIGINT NOT NULL,
  PRIMARY KEY (agent_id, stream, batch_id)
);
CREATE INDEX batches_received ON batches(received_ns);
CREATE TABLE events (
  id BIGSERIAL PRIMARY KEY,
  agent_id BIGINT NOT NULL REFERENCES agents(id),
  time_ns BIGINT NOT NULL,
  received_ns BIGINT NOT NULL,
  kind TEXT NOT NULL,
  pid BIGINT NOT NULL,
  ppid BIGINT NOT NULL,
  exe TEXT NOT NULL,
  workload TEXT NOT NULL,
  msg BYTEA NOT NULL
);
CREATE INDEX events_time ON events(time_ns);
CREATE INDEX events_agent_time ON events(agent_id, time_ns);
CREATE TABLE incidents (
  id BIGSERIAL PRIMARY KEY,
  agent_id BIGINT NOT NULL REFERENCES agents(id),
  workload TEXT NOT NULL,
  root_pid BIGINT NOT NULL,
  root_exe TEXT NOT NULL,
  first_seen_ns BIGINT NOT NULL,
  last_seen_ns BIGINT NOT NULL,
  max_severity INTEGER NOT NULL,
  detection_count INTEGER NOT NULL,
  rules TEXT NOT NULL,
  mitre TEXT NOT NULL,
  title TEXT NOT NULL
);
CREATE INDEX incidents_last_seen ON incidents(last_seen_ns);
CREATE INDEX incidents_agent_workload ON incidents(agent_id, workload, last_seen_ns);
CREATE TABLE incident_processes (
  pid BIGINT NOT NULL,
  incident_id BIGINT NOT NULL REFERENCES incidents(id) ON DELETE CASCADE,
  PRIMARY KEY (pid, incident_id)
);
CREATE TABLE detections (
  id BIGSERIAL PRIMARY KEY,
  agent_id BIGINT NOT NULL REFERENCES agents(id),
  incident_id BIGINT NOT NULL REFERENCES incidents(id),
  time_ns BIGINT NOT NULL,
  received_ns BIGINT NOT NULL,
  rule TEXT NOT NULL,
  severity INTEGER NOT NULL,
  pid BIGINT NOT NULL,
  exe TEXT NOT NULL,
  workload TEXT NOT NULL,
  summary TEXT NOT NULL,
  msg BYTEA NOT NULL
);
CREATE INDEX detections_time ON detections(time_ns);
CREATE INDEX detections_incident ON detections(incident_id, time_ns);
CREATE INDEX detections_agent_time ON detections(agent_id, time_ns);
CREATE INDEX detections_rule_time ON detections(rule, time_ns);
CREATE TABLE detection_evidence (
  detection_id BIGINT NOT NULL REFERENCES detections(id) ON DELETE CASCADE,
  bundle_id TEXT NOT NULL,
  PRIMARY KEY (detection_id, bundle_id)
);
CREATE INDEX detection_evidence_bundle ON detection_evidence(bundle_id);
CREATE TABLE evidence (
  bundle_id TEXT PRIMARY KEY,
  agent_id BIGINT NOT NULL REFERENCES agents(id),
  size BIGINT NOT NULL,
  stored_ns BIGINT NOT NULL,
  label TEXT NOT NULL
);
CREATE INDEX evidence_agent ON evidence(agent_id, stored_ns);
"#;

/// Version 2: what the collector reads from a bundle's manifest at ingest.
const MIGRATE_2: &str = r#"
ALTER TABLE evidence ADD COLUMN pid BIGINT NOT NULL DEFAULT 0;
ALTER TABLE evidence ADD COLUMN rule TEXT NOT NULL DEFAULT '';
ALTER TABLE evidence ADD COLUMN detection_ns BIGINT NOT NULL DEFAULT 0;
ALTER TABLE evidence ADD COLUMN seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE evidence ADD COLUMN prev_bundle_id TEXT NOT NULL DEFAULT '';
ALTER TABLE evidence ADD COLUMN chain TEXT NOT NULL DEFAULT '';
ALTER TABLE evidence ADD COLUMN manifest_agent TEXT NOT NULL DEFAULT '';
CREATE INDEX evidence_subject ON evidence(agent_id, detection_ns);
"#;

/// Version 3: proof of origin and the chain lookups.
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
  agent_id BIGINT NOT NULL REFERENCES agents(id),
  bundle_id TEXT NOT NULL,
  seq BIGINT NOT NULL,
  prev_bundle_id TEXT NOT NULL,
  size BIGINT NOT NULL,
  committed_ns BIGINT NOT NULL,
  PRIMARY KEY (agent_id, bundle_id)
);
CREATE INDEX commitments_seq ON commitments(agent_id, seq);
CREATE INDEX commitments_bundle ON commitments(bundle_id);
"#;

/// The columns of an evidence record, in [`evidence_row`] order.
const EVIDENCE_COLUMNS: &str = "e.bundle_id, a.name, e.size, e.stored_ns, e.label, e.pid, e.rule,
   e.detection_ns, e.seq, e.prev_bundle_id, e.chain, e.manifest_agent, e.origin, e.signature,
   e.receipt, e.commitment";

/// One connection and its prepared statements.
struct Conn {
    config: Config,
    client: Option<Client>,
    statements: HashMap<&'static str, Statement>,
}

impl Conn {
    async fn open(config: &Config) -> Result<Client, StoreError> {
        let (client, connection) = config.connect(NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                warn!(error = %e, "postgres connection ended");
            }
        });
        Ok(client)
    }

    /// The client, reconnecting when the last one is closed.
    async fn client(&mut self) -> Result<&mut Client, StoreError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.statements.clear();
            self.client = Some(Self::open(&self.config).await?);
            info!("connected to postgres");
        }
        Ok(self.client.as_mut().expect("just set"))
    }

    /// A prepared statement for `sql` (prepared once per connection).
    async fn stmt(&mut self, sql: &'static str) -> Result<Statement, StoreError> {
        self.client().await?;
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self
            .client
            .as_ref()
            .expect("connected")
            .prepare(sql)
            .await?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }
}

/// The PostgreSQL store.
pub struct PostgresStore {
    writer: Mutex<Conn>,
    reader: Mutex<Conn>,
    grouping: Grouping,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects (libpq connection string: `host=... dbname=...` or a
    /// `postgresql://` URL) and creates the schema when the database has
    /// none.
    pub async fn connect(conn: &str, grouping: Grouping) -> Result<PostgresStore, StoreError> {
        let config: Config = conn.parse()?;
        let mut client = Conn::open(&config).await?;
        let tx = client.transaction().await?;
        // Two collectors starting at once: one creates, the other waits.
        tx.execute("SELECT pg_advisory_xact_lock(7443)", &[])
            .await?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            .await?;
        let version: Option<i32> = tx
            .query_opt("SELECT version FROM schema_version", &[])
            .await?
            .map(|r| r.get(0));
        match version {
            None => {
                tx.batch_execute(SCHEMA).await?;
                tx.batch_execute(MIGRATE_2).await?;
                tx.batch_execute(MIGRATE_3).await?;
                tx.batch_execute(MIGRATE_4).await?;
                tx.execute("INSERT INTO schema_version VALUES ($1)", &[&SCHEMA_VERSION])
                    .await?;
            }
            Some(v @ (1..=3)) => {
                if v == 1 {
                    tx.batch_execute(MIGRATE_2).await?;
                }
                if v < 3 {
                    tx.batch_execute(MIGRATE_3).await?;
                }
                tx.batch_execute(MIGRATE_4).await?;
                tx.execute("UPDATE schema_version SET version = $1", &[&SCHEMA_VERSION])
                    .await?;
            }
            Some(SCHEMA_VERSION) => {}
            Some(v) => {
                return Err(StoreError::Schema(format!(
                    "the database has schema version {v}, this collector knows \
                     {SCHEMA_VERSION}: it was written by a newer collector"
                )));
            }
        }
        tx.commit().await?;
        let conn = |client| {
            Mutex::new(Conn {
                config: config.clone(),
                client,
                statements: HashMap::new(),
            })
        };
        Ok(PostgresStore {
            writer: conn(Some(client)),
            reader: conn(None),
            grouping,
        })
    }
}

async fn agent_id(
    tx: &Transaction<'_>,
    st: &Statement,
    name: &str,
    now_ns: i64,
) -> Result<i64, StoreError> {
    Ok(tx.query_one(st, &[&name, &now_ns]).await?.get(0))
}

const AGENT_ID: &str = "INSERT INTO agents (name, first_seen_ns, last_seen_ns) VALUES ($1, $2, $2)
     ON CONFLICT (name) DO UPDATE SET last_seen_ns = GREATEST(agents.last_seen_ns, EXCLUDED.last_seen_ns)
     RETURNING id";
const CLAIM_BATCH: &str = "INSERT INTO batches VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING";
const INSERT_EVENTS: &str = "INSERT INTO events
       (agent_id, time_ns, received_ns, kind, pid, ppid, exe, workload, msg)
     SELECT $1, t, $2, k, p, pp, e, w, m
     FROM UNNEST($3::BIGINT[], $4::TEXT[], $5::BIGINT[], $6::BIGINT[], $7::TEXT[], $8::TEXT[], $9::BYTEA[])
       AS u(t, k, p, pp, e, w, m)";
const FIND_INCIDENT: &str =
    "SELECT i.id, i.root_pid, i.first_seen_ns, i.last_seen_ns, i.max_severity,
       i.rules, i.mitre
     FROM incident_processes p JOIN incidents i ON i.id = p.incident_id
     WHERE p.pid = ANY($1) AND i.agent_id = $2 AND i.workload = $3
       AND i.last_seen_ns >= $4 AND i.first_seen_ns <= $5
     ORDER BY i.id LIMIT 1";
const NEW_INCIDENT: &str = "INSERT INTO incidents (agent_id, workload, root_pid, root_exe,
       first_seen_ns, last_seen_ns, max_severity, detection_count, rules, mitre, title)
     VALUES ($1, $2, $3, $4, $5, $5, $6, 1, $7, $8, $9) RETURNING id";
const UPDATE_INCIDENT: &str =
    "UPDATE incidents SET root_pid = $2, root_exe = coalesce($3, root_exe),
       first_seen_ns = $4, last_seen_ns = $5, max_severity = $6,
       detection_count = detection_count + 1, rules = $7, mitre = $8,
       title = coalesce($9, title)
     WHERE id = $1";
const INCIDENT_PROCESSES: &str =
    "INSERT INTO incident_processes SELECT p, $2 FROM UNNEST($1::BIGINT[]) AS u(p)
     ON CONFLICT DO NOTHING";
const INSERT_DETECTION: &str =
    "INSERT INTO detections (agent_id, incident_id, time_ns, received_ns,
       rule, severity, pid, exe, workload, summary, msg)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING id";
const DETECTION_EVIDENCE: &str =
    "INSERT INTO detection_evidence SELECT $1, b FROM UNNEST($2::TEXT[]) AS u(b)
     ON CONFLICT DO NOTHING";
/// Held by a transaction that links detections and bundles of one agent.
const LINK_LOCK: &str = "SELECT pg_advisory_xact_lock(7444, ($1::BIGINT % 2147483647)::INT)";
/// Bundles stored before their detection arrived.
const EARLIER_EVIDENCE: &str = "INSERT INTO detection_evidence
     SELECT $1, bundle_id FROM evidence
     WHERE agent_id = $2 AND detection_ns = $3 AND pid = $4 AND detection_ns <> 0
     ON CONFLICT DO NOTHING";

/// Statements of the detection path, prepared before the transaction.
struct DetectionStatements {
    find: Statement,
    new: Statement,
    update: Statement,
    processes: Statement,
    insert: Statement,
    evidence: Statement,
    earlier_evidence: Statement,
}

async fn assign_incident(
    tx: &Transaction<'_>,
    st: &DetectionStatements,
    grouping: &Grouping,
    agent: i64,
    d: &Detection,
) -> Result<i64, StoreError> {
    let links = chain(d);
    let top = links.last().expect("a chain is never empty");
    let pids: Vec<i64> = links.iter().map(|l| i64::from(l.pid)).collect();
    let t = d.time_unix_nanos;
    let found = tx
        .query_opt(
            &st.find,
            &[
                &pids,
                &agent,
                &d.workload_key,
                &t.saturating_sub(grouping.window_ns),
                &t.saturating_add(grouping.window_ns),
            ],
        )
        .await?;
    let id: i64 = match found {
        None => {
            let title = if d.summary.is_empty() {
                &d.rule
            } else {
                &d.summary
            };
            tx.query_one(
                &st.new,
                &[
                    &agent,
                    &d.workload_key,
                    &i64::from(top.pid),
                    &top.exe,
                    &t,
                    &d.severity,
                    &merge_list("", std::slice::from_ref(&d.rule)),
                    &merge_list("", &d.mitre),
                    title,
                ],
            )
            .await?
            .get(0)
        }
        Some(r) => {
            let (id, root_pid, first, last, sev): (i64, i64, i64, i64, i32) =
                (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
            let (rules, mitre): (String, String) = (r.get(5), r.get(6));
            let top_pid = i64::from(top.pid);
            let (root_pid, root_exe) = if top_pid != root_pid && pids.contains(&root_pid) {
                (top_pid, Some(top.exe.clone()))
            } else {
                (root_pid, None)
            };
            let title = if d.summary.is_empty() {
                &d.rule
            } else {
                &d.summary
            };
            let retitle =
                crate::incident::retitles(d.severity, t, sev, first).then_some(title.as_str());
            tx.execute(
                &st.update,
                &[
                    &id,
                    &root_pid,
                    &root_exe,
                    &first.min(t),
                    &last.max(t),
                    &sev.max(d.severity),
                    &merge_list(&rules, std::slice::from_ref(&d.rule)),
                    &merge_list(&mitre, &d.mitre),
                    &retitle,
                ],
            )
            .await?;
            id
        }
    };
    tx.execute(&st.processes, &[&pids, &id]).await?;
    Ok(id)
}

/// Positional parameters of a query built at run time.
#[derive(Default)]
struct Params(Vec<Box<dyn ToSql + Sync + Send>>);

impl Params {
    /// Adds a value; returns its placeholder (`$n`).
    fn push(&mut self, v: impl ToSql + Sync + Send + 'static) -> String {
        self.0.push(Box::new(v));
        format!("${}", self.0.len())
    }

    fn refs(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.0
            .iter()
            .map(|b| b.as_ref() as &(dyn ToSql + Sync))
            .collect()
    }
}

const INCIDENT_COLUMNS: &str = "i.id, a.name, i.workload, i.root_pid, i.root_exe, i.first_seen_ns,
    i.last_seen_ns, i.max_severity, i.detection_count, i.rules, i.mitre, i.title, i.agent_id";

fn incident_row(r: &Row) -> IncidentSummary {
    IncidentSummary {
        id: r.get(0),
        agent: r.get(1),
        workload_key: r.get(2),
        root_pid: r.get::<_, i64>(3) as u32,
        root_exe: r.get(4),
        first_seen_unix_nanos: r.get(5),
        last_seen_unix_nanos: r.get(6),
        max_severity: r.get(7),
        detection_count: r.get::<_, i32>(8) as u32,
        rules: split_list(r.get(9)),
        mitre: split_list(r.get(10)),
        title: r.get(11),
    }
}

const DETECTION_COLUMNS: &str = "d.id, a.name, d.incident_id, d.received_ns, d.msg";

fn detection_row(r: &Row) -> Result<StoredDetection, StoreError> {
    Ok(StoredDetection {
        id: r.get(0),
        agent: r.get(1),
        incident_id: r.get(2),
        received_unix_nanos: r.get(3),
        detection: Some(Detection::decode(r.get::<_, &[u8]>(4))?),
    })
}

fn evidence_row(r: &Row) -> EvidenceInfo {
    EvidenceInfo {
        bundle_id: r.get(0),
        agent: r.get(1),
        size: r.get::<_, i64>(2) as u64,
        stored_unix_nanos: r.get(3),
        label: r.get(4),
        pid: r.get::<_, i64>(5) as u32,
        rule: r.get(6),
        detection_unix_nanos: r.get(7),
        seq: r.get::<_, i64>(8) as u64,
        prev_bundle_id: r.get(9),
        chain: r.get(10),
        manifest_agent: r.get(11),
        origin: r.get(12),
        signature: r.get(13),
        receipt: r.get(14),
        commitment: r.get(15),
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn record_agent(&self, agent: &AgentSeen, now_ns: i64) -> Result<(), StoreError> {
        let mut c = self.writer.lock().await;
        let st = c
            .stmt(
                "INSERT INTO agents (name, first_seen_ns, last_seen_ns, cert_sha256, peer_addr)
                 VALUES ($1, $2, $2, $3, $4)
                 ON CONFLICT (name) DO UPDATE SET last_seen_ns = EXCLUDED.last_seen_ns,
                   cert_sha256 = EXCLUDED.cert_sha256, peer_addr = EXCLUDED.peer_addr",
            )
            .await?;
        c.client()
            .await?
            .execute(
                &st,
                &[&agent.name, &now_ns, &agent.cert_sha256, &agent.peer_addr],
            )
            .await?;
        Ok(())
    }

    async fn insert_events(
        &self,
        agent: &str,
        batch_id: &str,
        events: Vec<Event>,
        now_ns: i64,
    ) -> Result<BatchOutcome, StoreError> {
        let mut c = self.writer.lock().await;
        let (st_agent, st_claim, st_insert) = (
            c.stmt(AGENT_ID).await?,
            c.stmt(CLAIM_BATCH).await?,
            c.stmt(INSERT_EVENTS).await?,
        );
        let n = events.len();
        let mut times = Vec::with_capacity(n);
        let mut kinds = Vec::with_capacity(n);
        let mut pids = Vec::with_capacity(n);
        let mut ppids = Vec::with_capacity(n);
        let mut exes = Vec::with_capacity(n);
        let mut workloads = Vec::with_capacity(n);
        let mut msgs = Vec::with_capacity(n);
        for e in &events {
            times.push(e.time_unix_nanos);
            kinds.push(e.kind.as_str());
            pids.push(i64::from(e.pid));
            ppids.push(i64::from(e.ppid));
            exes.push(e.exe.as_str());
            workloads.push(e.workload_key.as_str());
            msgs.push(e.encode_to_vec());
        }
        let tx = c.client().await?.transaction().await?;
        let agent = agent_id(&tx, &st_agent, agent, now_ns).await?;
        if !batch_id.is_empty()
            && tx
                .execute(&st_claim, &[&agent, &"events", &batch_id, &now_ns])
                .await?
                == 0
        {
            return Ok(BatchOutcome::Duplicate);
        }
        if n > 0 {
            tx.execute(
                &st_insert,
                &[
                    &agent, &now_ns, &times, &kinds, &pids, &ppids, &exes, &workloads, &msgs,
                ],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(BatchOutcome::Stored(n as u64))
    }

    async fn insert_detections(
        &self,
        agent: &str,
        batch_id: &str,
        detections: Vec<Detection>,
        now_ns: i64,
    ) -> Result<BatchOutcome, StoreError> {
        let mut c = self.writer.lock().await;
        let (st_agent, st_claim) = (c.stmt(AGENT_ID).await?, c.stmt(CLAIM_BATCH).await?);
        let st = DetectionStatements {
            find: c.stmt(FIND_INCIDENT).await?,
            new: c.stmt(NEW_INCIDENT).await?,
            update: c.stmt(UPDATE_INCIDENT).await?,
            processes: c.stmt(INCIDENT_PROCESSES).await?,
            insert: c.stmt(INSERT_DETECTION).await?,
            evidence: c.stmt(DETECTION_EVIDENCE).await?,
            earlier_evidence: c.stmt(EARLIER_EVIDENCE).await?,
        };
        let tx = c.client().await?.transaction().await?;
        let agent = agent_id(&tx, &st_agent, agent, now_ns).await?;
        // Detections and bundles of one agent link to each other from
        // either side: serialize them across collectors sharing the database.
        tx.execute(LINK_LOCK, &[&agent]).await?;
        if !batch_id.is_empty()
            && tx
                .execute(&st_claim, &[&agent, &"detections", &batch_id, &now_ns])
                .await?
                == 0
        {
            return Ok(BatchOutcome::Duplicate);
        }
        for d in &detections {
            let incident = assign_incident(&tx, &st, &self.grouping, agent, d).await?;
            let id: i64 = tx
                .query_one(
                    &st.insert,
                    &[
                        &agent,
                        &incident,
                        &d.time_unix_nanos,
                        &now_ns,
                        &d.rule,
                        &d.severity,
                        &i64::from(d.pid),
                        &d.exe,
                        &d.workload_key,
                        &d.summary,
                        &d.encode_to_vec(),
                    ],
                )
                .await?
                .get(0);
            if !d.evidence_ids.is_empty() {
                tx.execute(&st.evidence, &[&id, &d.evidence_ids]).await?;
            }
            tx.execute(
                &st.earlier_evidence,
                &[&id, &agent, &d.time_unix_nanos, &i64::from(d.pid)],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(BatchOutcome::Stored(detections.len() as u64))
    }

    async fn record_evidence(&self, info: EvidenceInfo) -> Result<(), StoreError> {
        let mut c = self.writer.lock().await;
        let st_agent = c.stmt(AGENT_ID).await?;
        let st = c
            .stmt(
                "INSERT INTO evidence (bundle_id, agent_id, size, stored_ns, label, pid, rule,
                   detection_ns, seq, prev_bundle_id, chain, manifest_agent, origin, signature,
                   receipt, commitment)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
                 ON CONFLICT DO NOTHING",
            )
            .await?;
        let st_link = c
            .stmt(
                "INSERT INTO detection_evidence
                 SELECT id, $1 FROM detections WHERE agent_id = $2 AND time_ns = $3 AND pid = $4
                 ON CONFLICT DO NOTHING",
            )
            .await?;
        let tx = c.client().await?.transaction().await?;
        let agent = agent_id(&tx, &st_agent, &info.agent, info.stored_unix_nanos).await?;
        tx.execute(LINK_LOCK, &[&agent]).await?;
        tx.execute(
            &st,
            &[
                &info.bundle_id,
                &agent,
                &(info.size as i64),
                &info.stored_unix_nanos,
                &info.label,
                &i64::from(info.pid),
                &info.rule,
                &info.detection_unix_nanos,
                &(info.seq as i64),
                &info.prev_bundle_id,
                &info.chain,
                &info.manifest_agent,
                &info.origin,
                &info.signature,
                &info.receipt,
                &info.commitment,
            ],
        )
        .await?;
        // The detections of the captured event (stored before it).
        if info.detection_unix_nanos != 0 {
            tx.execute(
                &st_link,
                &[
                    &info.bundle_id,
                    &agent,
                    &info.detection_unix_nanos,
                    &i64::from(info.pid),
                ],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn evidence(&self, bundle_id: &str) -> Result<Option<EvidenceInfo>, StoreError> {
        let mut c = self.reader.lock().await;
        let st = c
            .stmt(
                "SELECT e.bundle_id, a.name, e.size, e.stored_ns, e.label, e.pid, e.rule,
                   e.detection_ns, e.seq, e.prev_bundle_id, e.chain, e.manifest_agent, e.origin,
                   e.signature, e.receipt, e.commitment
                 FROM evidence e JOIN agents a ON a.id = e.agent_id WHERE e.bundle_id = $1",
            )
            .await?;
        let row = c.client().await?.query_opt(&st, &[&bundle_id]).await?;
        Ok(row.as_ref().map(evidence_row))
    }

    async fn successors(&self, agent: &str, prev: &str) -> Result<Vec<String>, StoreError> {
        let mut c = self.reader.lock().await;
        let rows = c
            .client()
            .await?
            .query(
                "SELECT e.bundle_id FROM evidence e JOIN agents a ON a.id = e.agent_id
                 WHERE a.name = $1 AND e.prev_bundle_id = $2 AND ($2 <> '' OR e.seq = 1)
                 ORDER BY e.stored_ns, e.bundle_id",
                &[&agent, &prev],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn record_commitment(
        &self,
        agent: &str,
        c: &Commitment,
        now_ns: i64,
    ) -> Result<bool, StoreError> {
        let mut conn = self.writer.lock().await;
        let st_agent = conn.stmt(AGENT_ID).await?;
        let st = conn
            .stmt(
                "INSERT INTO commitments
                   (agent_id, bundle_id, seq, prev_bundle_id, size, committed_ns)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            )
            .await?;
        let tx = conn.client().await?.transaction().await?;
        let agent = agent_id(&tx, &st_agent, agent, now_ns).await?;
        let n = tx
            .execute(
                &st,
                &[
                    &agent,
                    &c.bundle_id,
                    &(c.seq as i64),
                    &c.prev_bundle_id,
                    &(c.size as i64),
                    &now_ns,
                ],
            )
            .await?;
        tx.commit().await?;
        Ok(n == 1)
    }

    async fn commitments_at(&self, agent: &str, seq: u64) -> Result<Vec<String>, StoreError> {
        let mut c = self.reader.lock().await;
        let rows = c
            .client()
            .await?
            .query(
                "SELECT m.bundle_id FROM commitments m JOIN agents a ON a.id = m.agent_id
                 WHERE a.name = $1 AND m.seq = $2 ORDER BY m.committed_ns, m.bundle_id",
                &[&agent, &(seq as i64)],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn commitment(&self, bundle_id: &str) -> Result<Option<CommitmentRecord>, StoreError> {
        let mut c = self.reader.lock().await;
        let row = c
            .client()
            .await?
            .query_opt(
                "SELECT a.name, m.committed_ns FROM commitments m JOIN agents a ON a.id = m.agent_id
                 WHERE m.bundle_id = $1 ORDER BY m.committed_ns LIMIT 1",
                &[&bundle_id],
            )
            .await?;
        Ok(row.map(|r| CommitmentRecord {
            agent: r.get(0),
            committed_ns: r.get(1),
        }))
    }

    async fn open_commitments(&self, agent: &str) -> Result<u64, StoreError> {
        let mut c = self.reader.lock().await;
        let row = c
            .client()
            .await?
            .query_one(
                "SELECT count(*) FROM commitments m JOIN agents a ON a.id = m.agent_id
                 WHERE a.name = $1
                   AND NOT EXISTS (SELECT 1 FROM evidence e WHERE e.bundle_id = m.bundle_id)",
                &[&agent],
            )
            .await?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    async fn chain_head(&self, agent: &str) -> Result<Option<EvidenceInfo>, StoreError> {
        let mut c = self.reader.lock().await;
        let row = c
            .client()
            .await?
            .query_opt(
                &format!(
                    "SELECT {EVIDENCE_COLUMNS} FROM evidence e JOIN agents a ON a.id = e.agent_id
                     WHERE a.name = $1 AND e.seq > 0 ORDER BY e.seq DESC, e.stored_ns LIMIT 1"
                ),
                &[&agent],
            )
            .await?;
        Ok(row.as_ref().map(evidence_row))
    }

    async fn list_incidents(
        &self,
        q: &ListIncidentsRequest,
    ) -> Result<Vec<IncidentSummary>, StoreError> {
        let mut p = Params::default();
        let mut wh = vec!["TRUE".to_string()];
        if q.since_unix_nanos != 0 {
            wh.push(format!("i.last_seen_ns >= {}", p.push(q.since_unix_nanos)));
        }
        if q.until_unix_nanos != 0 {
            wh.push(format!("i.first_seen_ns < {}", p.push(q.until_unix_nanos)));
        }
        if !q.agent.is_empty() {
            wh.push(format!("a.name = {}", p.push(q.agent.clone())));
        }
        if q.min_severity > Severity::Unspecified as i32 {
            wh.push(format!("i.max_severity >= {}", p.push(q.min_severity)));
        }
        if !q.search.is_empty() {
            let s = p.push(like(&q.search));
            wh.push(format!(
                "(i.title LIKE {s} OR i.rules LIKE {s} OR i.mitre LIKE {s} OR i.root_exe LIKE {s}
                  OR i.workload LIKE {s} OR EXISTS (SELECT 1 FROM detections d
                    WHERE d.incident_id = i.id AND (d.exe LIKE {s} OR d.summary LIKE {s})))"
            ));
        }
        let sql = format!(
            "SELECT {INCIDENT_COLUMNS} FROM incidents i JOIN agents a ON a.id = i.agent_id
             WHERE {} ORDER BY i.last_seen_ns DESC, i.id DESC LIMIT {}",
            wh.join(" AND "),
            effective_limit(q.limit)
        );
        let mut c = self.reader.lock().await;
        let rows = c.client().await?.query(&sql, &p.refs()).await?;
        Ok(rows.iter().map(incident_row).collect())
    }

    async fn incident(&self, id: i64) -> Result<Option<IncidentDetail>, StoreError> {
        let mut c = self.reader.lock().await;
        let client = c.client().await?;
        let Some(row) = client
            .query_opt(
                &format!(
                    "SELECT {INCIDENT_COLUMNS} FROM incidents i
                     JOIN agents a ON a.id = i.agent_id WHERE i.id = $1"
                ),
                &[&id],
            )
            .await?
        else {
            return Ok(None);
        };
        let summary = incident_row(&row);
        let agent_id: i64 = row.get(12);
        let detections = client
            .query(
                &format!(
                    "SELECT {DETECTION_COLUMNS} FROM detections d JOIN agents a ON a.id = d.agent_id
                     WHERE d.incident_id = $1 ORDER BY d.time_ns, d.id LIMIT 5000"
                ),
                &[&id],
            )
            .await?
            .iter()
            .map(detection_row)
            .collect::<Result<Vec<_>, _>>()?;
        let evidence = client
            .query(
                "SELECT de.bundle_id, coalesce(max(a.name), ''), coalesce(max(e.size), 0),
                   coalesce(max(e.stored_ns), 0), coalesce(max(e.label), ''),
                   coalesce(max(e.pid), 0), coalesce(max(e.rule), ''),
                   coalesce(max(e.detection_ns), 0), coalesce(max(e.seq), 0),
                   coalesce(max(e.prev_bundle_id), ''), coalesce(max(e.chain), ''),
                   coalesce(max(e.manifest_agent), ''), coalesce(max(e.origin), ''),
                   coalesce(max(e.signature), ''), coalesce(max(e.receipt), ''),
                   coalesce(max(e.commitment), '')
                 FROM detection_evidence de JOIN detections d ON d.id = de.detection_id
                 LEFT JOIN evidence e ON e.bundle_id = de.bundle_id
                 LEFT JOIN agents a ON a.id = e.agent_id
                 WHERE d.incident_id = $1 GROUP BY de.bundle_id ORDER BY min(d.time_ns)",
                &[&id],
            )
            .await?
            .iter()
            .map(evidence_row)
            .collect();
        let mut pids: Vec<i64> = detections
            .iter()
            .filter_map(|d| d.detection.as_ref().map(|d| i64::from(d.pid)))
            .collect();
        pids.sort_unstable();
        pids.dedup();
        let events = client
            .query(
                &format!(
                    "SELECT e.id, e.msg FROM events e WHERE e.agent_id = $1
                       AND e.time_ns BETWEEN $2 AND $3
                       AND (e.pid = ANY($4) OR e.ppid = ANY($4))
                     ORDER BY e.time_ns, e.id LIMIT {INCIDENT_EVENTS_LIMIT}"
                ),
                &[
                    &agent_id,
                    &(summary.first_seen_unix_nanos - INCIDENT_EVENTS_MARGIN_NS),
                    &(summary.last_seen_unix_nanos + INCIDENT_EVENTS_MARGIN_NS),
                    &pids,
                ],
            )
            .await?
            .iter()
            .map(|r| {
                Ok(StoredEvent {
                    id: r.get(0),
                    agent: summary.agent.clone(),
                    event: Some(Event::decode(r.get::<_, &[u8]>(1))?),
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Some(IncidentDetail {
            incident: Some(summary),
            detections,
            evidence,
            events,
        }))
    }

    async fn list_detections(
        &self,
        q: &ListDetectionsRequest,
    ) -> Result<Vec<StoredDetection>, StoreError> {
        let mut p = Params::default();
        let mut wh = vec!["TRUE".to_string()];
        if q.since_unix_nanos != 0 {
            wh.push(format!("d.time_ns >= {}", p.push(q.since_unix_nanos)));
        }
        if q.until_unix_nanos != 0 {
            wh.push(format!("d.time_ns < {}", p.push(q.until_unix_nanos)));
        }
        if !q.agent.is_empty() {
            wh.push(format!("a.name = {}", p.push(q.agent.clone())));
        }
        if !q.rule.is_empty() {
            wh.push(format!("d.rule = {}", p.push(q.rule.clone())));
        }
        if q.min_severity > Severity::Unspecified as i32 {
            wh.push(format!("d.severity >= {}", p.push(q.min_severity)));
        }
        if q.incident_id != 0 {
            wh.push(format!("d.incident_id = {}", p.push(q.incident_id)));
        }
        if !q.search.is_empty() {
            let s = p.push(like(&q.search));
            wh.push(format!(
                "(d.rule LIKE {s} OR d.summary LIKE {s} OR d.exe LIKE {s} OR d.workload LIKE {s})"
            ));
        }
        let sql = format!(
            "SELECT {DETECTION_COLUMNS} FROM detections d JOIN agents a ON a.id = d.agent_id
             WHERE {} ORDER BY d.time_ns DESC, d.id DESC LIMIT {}",
            wh.join(" AND "),
            effective_limit(q.limit)
        );
        let mut c = self.reader.lock().await;
        let rows = c.client().await?.query(&sql, &p.refs()).await?;
        rows.iter().map(detection_row).collect()
    }

    async fn delete_events_before(&self, before_ns: i64) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let mut c = self.writer.lock().await;
            let st = c
                .stmt(
                    "DELETE FROM events WHERE id IN
                       (SELECT id FROM events WHERE time_ns < $1 LIMIT $2)",
                )
                .await?;
            let n = c
                .client()
                .await?
                .execute(&st, &[&before_ns, &RETENTION_STEP])
                .await?;
            total += n;
            if (n as i64) < RETENTION_STEP {
                break;
            }
        }
        let mut c = self.writer.lock().await;
        c.client()
            .await?
            .execute("DELETE FROM batches WHERE received_ns < $1", &[&before_ns])
            .await?;
        Ok(total)
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let mut c = self.reader.lock().await;
        let r = c
            .client()
            .await?
            .query_one(
                "SELECT (SELECT count(*) FROM agents), (SELECT count(*) FROM events),
                   (SELECT count(*) FROM detections), (SELECT count(*) FROM incidents),
                   (SELECT count(*) FROM evidence), pg_database_size(current_database())",
                &[],
            )
            .await?;
        let n = |i: usize| r.get::<_, i64>(i) as u64;
        Ok(StoreStats {
            agents: n(0),
            events: n(1),
            detections: n(2),
            incidents: n(3),
            evidence: n(4),
            bytes: n(5),
        })
    }

    async fn usage(&self) -> Result<Vec<(String, AgentUsage)>, StoreError> {
        let mut c = self.reader.lock().await;
        let rows = c
            .client()
            .await?
            .query(
                "SELECT a.name,
                   (SELECT count(*) FROM events WHERE agent_id = a.id),
                   (SELECT count(*) FROM detections WHERE agent_id = a.id),
                   (SELECT coalesce(sum(size), 0)::BIGINT FROM evidence WHERE agent_id = a.id)
                 FROM agents a ORDER BY a.name",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    AgentUsage {
                        events: r.get::<_, i64>(1) as u64,
                        detections: r.get::<_, i64>(2) as u64,
                        evidence_bytes: r.get::<_, i64>(3) as u64,
                    },
                )
            })
            .collect())
    }
}

#[cfg(test)]
#[path = "../../tests/common/postgres.rs"]
mod test_server;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::conformance::{self, conformance_tests};

    async fn fresh() -> ((), Arc<dyn Store>) {
        let conn = test_server::database();
        (
            (),
            Arc::new(
                PostgresStore::connect(&conn, Grouping::default())
                    .await
                    .unwrap(),
            ),
        )
    }

    conformance_tests!(fresh().await);

    #[tokio::test]
    async fn persists_across_a_reconnect() {
        let conn = test_server::database();
        let s = PostgresStore::connect(&conn, Grouping::default())
            .await
            .unwrap();
        conformance::batches_are_atomic_and_deduplicated(&s).await;
        drop(s);
        let s = PostgresStore::connect(&conn, Grouping::default())
            .await
            .unwrap();
        assert_eq!(s.stats().await.unwrap().events, 6);
    }
}
