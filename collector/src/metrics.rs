//! Prometheus metrics of the collector: what it ingested, refused and
//! holds; served as OpenMetrics text on `GET /metrics` of `--metrics-addr`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::response::IntoResponse;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::blobs::BlobStore;
use crate::store::Store;

/// Label: the stream an item came on.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabel {
    /// `events`, `detections` or `evidence`.
    pub stream: String,
}

/// Label: an RPC and the status it ended with.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    /// e.g. `PushEvents`.
    pub method: String,
    /// gRPC status code name, e.g. `InvalidArgument`.
    pub code: String,
}

/// Label: what a storage size measures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StorageLabel {
    /// `index`, `blobs` or `partial`.
    pub kind: String,
}

/// Label: an index table.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    /// `agents`, `events`, `detections`, `incidents`, `evidence`.
    pub table: String,
}

/// Label: an upload outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `complete`, `suspended`, `duplicate`, `refused`.
    pub outcome: String,
}

/// Label: why the collector refused work to protect itself or others.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// e.g. `agent_uploads`, `idle`, `deadline`, `revoked`.
    pub reason: String,
}

/// Label: an agent (certificate name) and what is counted.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentKindLabel {
    /// The agent's certificate name.
    pub agent: String,
    /// `events`, `detections` or `evidence`.
    pub kind: String,
}

/// All collector metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Items stored (events, detections), by stream.
    pub items: Family<StreamLabel, Counter>,
    /// Batches stored, by stream.
    pub batches: Family<StreamLabel, Counter>,
    /// Batches skipped as duplicates, by stream.
    pub duplicate_batches: Family<StreamLabel, Counter>,
    /// Payload bytes received (JSON of events and detections, evidence
    /// chunk data), by stream.
    pub bytes: Family<StreamLabel, Counter>,
    /// Evidence uploads, by outcome.
    pub uploads: Family<OutcomeLabel, Counter>,
    /// Calls that ended with an error status, by method and code.
    pub errors: Family<ErrorLabel, Counter>,
    /// Bytes on disk, by kind.
    pub storage_bytes: Family<StorageLabel, Gauge>,
    /// Rows stored, by table (events, detections, incidents, evidence,
    /// agents).
    pub stored: Family<TableLabel, Gauge>,
    /// Bundles stored whose predecessor in their agent's chain of custody
    /// is not stored here (yet) or does not precede them.
    pub chain_breaks: Counter,
    /// Bundles stored without a verified agent signature (older agents).
    pub unsigned_evidence: Counter,
    /// Calls or streams refused or cut to protect the collector and the
    /// other agents, by reason: `agent_uploads`, `uploads` (upload slots),
    /// `agent_partials`, `partials` (unfinished uploads), `idle`,
    /// `deadline` (stream time limits), `revoked` (deny-listed
    /// certificate), `quota_events`, `quota_detections`,
    /// `quota_evidence` (per-agent storage quotas), `origin` (a bundle's
    /// signature or agent id does not hold).
    pub refusals: Family<ReasonLabel, Counter>,
    /// Evidence uploads holding a slot now.
    pub uploads_in_progress: Gauge,
    /// Events and detections each agent holds (its quotas count these).
    pub agent_stored_items: Family<AgentKindLabel, Gauge>,
    /// Evidence bytes each agent holds (kind `evidence`).
    pub agent_stored_bytes: Family<AgentKindLabel, Gauge>,
}

impl Metrics {
    /// Counts an error status of `method`.
    pub fn error(&self, method: &str, status: &tonic::Status) {
        self.errors
            .get_or_create(&ErrorLabel {
                method: method.to_string(),
                code: format!("{:?}", status.code()),
            })
            .inc();
    }

    /// The counter of `stream` in `family`.
    pub fn of<'a>(
        family: &'a Family<StreamLabel, Counter>,
        stream: &str,
    ) -> impl std::ops::Deref<Target = Counter> + 'a {
        family.get_or_create(&StreamLabel {
            stream: stream.to_string(),
        })
    }

    /// Counts a protective refusal (see [`Metrics::refusals`]).
    pub fn refused(&self, reason: &str) {
        self.refusals
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// The gauge of items of `kind` `agent` holds.
    pub fn agent_items(
        &self,
        agent: &str,
        kind: &str,
    ) -> impl std::ops::Deref<Target = Gauge> + '_ {
        self.agent_stored_items.get_or_create(&AgentKindLabel {
            agent: agent.to_string(),
            kind: kind.to_string(),
        })
    }

    /// The gauge of bytes of `kind` `agent` holds.
    pub fn agent_bytes(
        &self,
        agent: &str,
        kind: &str,
    ) -> impl std::ops::Deref<Target = Gauge> + '_ {
        self.agent_stored_bytes.get_or_create(&AgentKindLabel {
            agent: agent.to_string(),
            kind: kind.to_string(),
        })
    }

    /// Counts an upload outcome.
    pub fn upload(&self, outcome: &str) {
        self.uploads
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// A registry exposing these metrics, prefix `vigil_collector`.
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut r = Registry::with_prefix("vigil_collector");
        r.register(
            "ingested_items",
            "Events and detections stored",
            self.items.clone(),
        );
        r.register("ingested_batches", "Batches stored", self.batches.clone());
        r.register(
            "duplicate_batches",
            "Batches skipped because their batch id was already stored",
            self.duplicate_batches.clone(),
        );
        r.register(
            "ingested_bytes",
            "Payload bytes received",
            self.bytes.clone(),
        );
        r.register(
            "evidence_uploads",
            "Evidence upload calls by outcome",
            self.uploads.clone(),
        );
        r.register(
            "rpc_errors",
            "Calls that ended with an error status",
            self.errors.clone(),
        );
        r.register("storage_bytes", "Bytes on disk", self.storage_bytes.clone());
        r.register("stored_rows", "Rows in the index", self.stored.clone());
        r.register(
            "evidence_chain_breaks",
            "Bundles stored whose chain-of-custody predecessor is not stored here or does not precede them",
            self.chain_breaks.clone(),
        );
        r.register(
            "evidence_unsigned",
            "Bundles stored without an agent signature (agents before proof of origin)",
            self.unsigned_evidence.clone(),
        );
        r.register(
            "refusals",
            "Calls or streams refused or cut to protect the collector and other agents, by reason",
            self.refusals.clone(),
        );
        r.register(
            "uploads_in_progress",
            "Evidence uploads holding a slot now",
            self.uploads_in_progress.clone(),
        );
        r.register(
            "agent_stored_items",
            "Events and detections each agent holds (per-agent quotas count these)",
            self.agent_stored_items.clone(),
        );
        r.register(
            "agent_stored_bytes",
            "Evidence bytes each agent holds (per-agent quota)",
            self.agent_stored_bytes.clone(),
        );
        r
    }

    /// Refreshes the storage gauges.
    pub async fn refresh_storage(&self, store: &dyn Store, blobs: &BlobStore) {
        match store.stats().await {
            Ok(s) => {
                let set = |k: &str, v: u64| {
                    self.stored
                        .get_or_create(&TableLabel {
                            table: k.to_string(),
                        })
                        .set(v as i64)
                };
                set("agents", s.agents);
                set("events", s.events);
                set("detections", s.detections);
                set("incidents", s.incidents);
                set("evidence", s.evidence);
                self.storage_bytes
                    .get_or_create(&StorageLabel {
                        kind: "index".into(),
                    })
                    .set(s.bytes as i64);
            }
            Err(e) => tracing::warn!(error = %e, "reading store statistics"),
        }
        match blobs.disk_usage() {
            Ok((b, p)) => {
                self.storage_bytes
                    .get_or_create(&StorageLabel {
                        kind: "blobs".into(),
                    })
                    .set(b as i64);
                self.storage_bytes
                    .get_or_create(&StorageLabel {
                        kind: "partial".into(),
                    })
                    .set(p as i64);
            }
            Err(e) => tracing::warn!(error = %e, "measuring blob storage"),
        }
    }
}

/// Serves `GET /metrics` on `addr` until the process ends. The storage
/// gauges are refreshed by a scrape when older than `refresh`.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    store: Arc<dyn Store>,
    blobs: Arc<BlobStore>,
    refresh: Duration,
) -> anyhow::Result<()> {
    let registry = Arc::new(metrics.registry());
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "metrics on /metrics");
    let last_refresh: Arc<tokio::sync::Mutex<Option<Instant>>> = Arc::default();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (registry, metrics, store, blobs, last) = (
                Arc::clone(&registry),
                Arc::clone(&metrics),
                Arc::clone(&store),
                Arc::clone(&blobs),
                Arc::clone(&last_refresh),
            );
            async move {
                {
                    // One refresh at a time; concurrent scrapes wait for it.
                    let mut last = last.lock().await;
                    if last.is_none_or(|t| t.elapsed() >= refresh) {
                        metrics.refresh_storage(store.as_ref(), &blobs).await;
                        *last = Some(Instant::now());
                    }
                }
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &registry) {
                    Ok(()) => (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                        .into_response(),
                    Err(e) => (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        format!("encoding metrics: {e}"),
                    )
                        .into_response(),
                }
            }
        }),
    );
    axum::serve(listener, app).await.context("metrics server")
}
