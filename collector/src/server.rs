//! `vigil-collector serve`: wires the PKI, the store, the blob store and
//! the two gRPC services into one TLS server, plus retention and metrics.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tracing::{info, warn};
use vigil_proto::ingest_server::IngestServer;
use vigil_proto::query_server::QueryServer;

use crate::auth::Gate;
use crate::blobs::BlobStore;
use crate::incident::Grouping;
use crate::ingest::{now_ns, IngestService, Limits};
use crate::metrics::Metrics;
use crate::pki;
use crate::query::{QueryService, FETCH_CHUNK};
use crate::revoke::DenyList;
use crate::store::{PostgresStore, SqliteStore, Store};

/// Where the index lives.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum StoreConfig {
    /// `DATA/vigil.db` (embedded, the default).
    #[default]
    Sqlite,
    /// A PostgreSQL database (libpq connection string or URL).
    Postgres(String),
}

/// Settings of `serve`.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// gRPC address (port 0: any free port; the bound address is printed).
    pub listen: SocketAddr,
    /// Where the SQLite database and the blobs live.
    pub data_dir: PathBuf,
    /// The index backend.
    pub store: StoreConfig,
    /// The PKI directory (`init-pki`).
    pub pki_dir: PathBuf,
    /// Ingest limits.
    pub limits: Limits,
    /// Delete events older than this many days (0: keep forever).
    pub retention_days: u32,
    /// Drop unfinished uploads untouched for this long.
    pub partial_ttl: Duration,
    /// Incident grouping.
    pub grouping: Grouping,
    /// Prometheus endpoint, if any.
    pub metrics_addr: Option<SocketAddr>,
    /// Web UI address, if any.
    pub ui_addr: Option<SocketAddr>,
    /// Serve the web UI over HTTPS with the PKI's server certificate.
    pub ui_tls: bool,
    /// File holding the UI token (default: `DATA/ui-token`, created).
    pub ui_token_file: Option<PathBuf>,
    /// The certificate deny-list (default: `DATA/revoked`), re-read when
    /// it changes.
    pub revoked_file: Option<PathBuf>,
    /// Refuse evidence bundles without an agent signature.
    pub require_signed_evidence: bool,
    /// How long a UI session lasts after sign-in.
    pub ui_session_ttl: Duration,
    /// File with the UI viewer token (incidents without evidence
    /// downloads; created when missing), if any.
    pub ui_viewer_token_file: Option<PathBuf>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: "127.0.0.1:7443".parse().expect("valid address"),
            data_dir: PathBuf::from("/var/lib/vigil-collector"),
            store: StoreConfig::Sqlite,
            pki_dir: PathBuf::from("/etc/vigil/pki"),
            limits: Limits::default(),
            retention_days: 30,
            partial_ttl: Duration::from_secs(7 * 24 * 3600),
            grouping: Grouping::default(),
            metrics_addr: None,
            ui_addr: None,
            ui_tls: false,
            ui_token_file: None,
            revoked_file: None,
            require_signed_evidence: false,
            ui_session_ttl: Duration::from_secs(12 * 3600),
            ui_viewer_token_file: None,
        }
    }
}

/// How often retention runs.
const RETENTION_PERIOD: Duration = Duration::from_secs(3600);

/// Where the collector listens, once it does.
#[derive(Clone, Debug)]
pub struct Listening {
    /// The gRPC address.
    pub grpc: SocketAddr,
    /// The web UI address and its token file, when enabled.
    pub ui: Option<(SocketAddr, PathBuf)>,
    /// Whether the web UI is served over HTTPS.
    pub ui_tls: bool,
}

/// Runs the collector until `shutdown` completes. `on_listening` is called
/// once every socket listens.
pub async fn serve(
    cfg: ServeConfig,
    on_listening: impl FnOnce(&Listening),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let tls = pki::server_tls(&cfg.pki_dir)?;
    vigil_bundle::private::secure_dir(&cfg.data_dir).context("the data directory")?;
    let store: Arc<dyn Store> = match &cfg.store {
        StoreConfig::Sqlite => {
            let db = cfg.data_dir.join("vigil.db");
            Arc::new(
                SqliteStore::open(&db, cfg.grouping.clone())
                    .with_context(|| format!("opening {}", db.display()))?,
            )
        }
        StoreConfig::Postgres(conn) => Arc::new(
            PostgresStore::connect(conn, cfg.grouping.clone())
                .await
                .context("connecting to PostgreSQL (--postgres)")?,
        ),
    };
    let blobs = Arc::new(
        BlobStore::open(&cfg.data_dir)
            .with_context(|| format!("opening the blob store in {}", cfg.data_dir.display()))?,
    );
    let metrics = Arc::new(Metrics::default());
    let revoked_file = cfg
        .revoked_file
        .clone()
        .unwrap_or_else(|| crate::revoke::default_path(&cfg.data_dir));
    let gate = Arc::new(Gate::new(
        DenyList::at(revoked_file.clone()),
        Arc::clone(&metrics),
    ));

    if let Some(addr) = cfg.metrics_addr {
        let (m, s, b) = (Arc::clone(&metrics), Arc::clone(&store), Arc::clone(&blobs));
        let task = crate::metrics::serve(addr, m, s, b, Duration::from_secs(5));
        tokio::spawn(async move {
            if let Err(e) = task.await {
                warn!(error = format!("{e:#}"), "metrics endpoint stopped");
            }
        });
    }
    let quotas = Arc::new(
        crate::quota::Quotas::load(store.as_ref(), cfg.limits.quotas, Arc::clone(&metrics))
            .await
            .context("reading what each agent holds (quotas)")?,
    );
    tokio::spawn(retention(
        Arc::clone(&store),
        Arc::clone(&quotas),
        Arc::clone(&blobs),
        cfg.retention_days,
        cfg.partial_ttl,
    ));

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));

    let max = cfg.limits.max_message_bytes;
    let ingest = IngestServer::new(IngestService::new(
        Arc::clone(&store),
        Arc::clone(&blobs),
        cfg.limits.clone(),
        Arc::clone(&metrics),
        Arc::clone(&gate),
        quotas,
        Arc::new(crate::origin::OriginPolicy::from_pki(
            &cfg.pki_dir,
            cfg.require_signed_evidence,
        )?),
    ))
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let query = QueryServer::new(QueryService::new(
        Arc::clone(&store),
        Arc::clone(&blobs),
        Arc::clone(&metrics),
        gate,
    ))
    .max_decoding_message_size(64 << 10)
    .max_encoding_message_size((64 << 20).max(2 * FETCH_CHUNK));

    info!(
        %addr,
        data_dir = %cfg.data_dir.display(),
        store = match cfg.store { StoreConfig::Sqlite => "sqlite", StoreConfig::Postgres(_) => "postgres" },
        pki = %cfg.pki_dir.display(),
        revoked = %revoked_file.display(),
        max_message_bytes = max,
        max_bundle_bytes = cfg.limits.max_bundle_bytes,
        "collector listening (mutual TLS)"
    );
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let mut ui = None;
    if let Some(ui_addr) = cfg.ui_addr {
        let token_file = cfg
            .ui_token_file
            .clone()
            .unwrap_or_else(|| cfg.data_dir.join("ui-token"));
        let token = crate::web::load_or_create_token(&token_file)?;
        let viewer_token = match &cfg.ui_viewer_token_file {
            Some(p) => Some(crate::web::load_or_create_token(p)?),
            None => None,
        };
        let listener = tokio::net::TcpListener::bind(ui_addr)
            .await
            .with_context(|| format!("binding the web UI address {ui_addr}"))?;
        let bound = listener.local_addr()?;
        let ui_tls = if cfg.ui_tls {
            Some(pki::ui_tls_config(&cfg.pki_dir)?)
        } else {
            if !crate::web::is_loopback(&bound) {
                warn!(%bound, "the web UI is served without TLS off loopback: use --ui-tls or a TLS proxy");
            }
            None
        };
        info!(addr = %bound, tls = cfg.ui_tls, token_file = %token_file.display(), "web UI listening");
        let app = crate::web::router(
            Arc::clone(&store),
            Arc::clone(&blobs),
            crate::web::UiConfig {
                token,
                viewer_token,
                session_ttl: cfg.ui_session_ttl,
                secure_cookies: cfg.ui_tls,
            },
        );
        let mut rx = shutdown_rx.clone();
        tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|v| *v).await;
            };
            let served = match ui_tls {
                Some(tls) => crate::web::serve_tls(listener, app, tls, stop).await,
                None => crate::web::serve(listener, app, stop).await,
            };
            if let Err(e) = served {
                warn!(error = format!("{e:#}"), "web UI stopped");
            }
        });
        ui = Some((bound, token_file));
    }
    on_listening(&Listening {
        grpc: addr,
        ui,
        ui_tls: cfg.ui_tls,
    });
    let shutdown = async move {
        shutdown.await;
        let _ = shutdown_tx.send(true);
    };
    Server::builder()
        .tls_config(tls)
        .context("TLS configuration")?
        .max_concurrent_streams(Some(256))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(ingest)
        .add_service(query)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("gRPC server")?;
    info!("collector stopped");
    Ok(())
}

async fn retention(
    store: Arc<dyn Store>,
    quotas: Arc<crate::quota::Quotas>,
    blobs: Arc<BlobStore>,
    days: u32,
    partial_ttl: Duration,
) {
    let mut tick = tokio::time::interval(RETENTION_PERIOD);
    loop {
        tick.tick().await;
        if days > 0 {
            let before = now_ns() - i64::from(days) * 86_400 * 1_000_000_000;
            match store.delete_events_before(before).await {
                Ok(0) => {}
                Ok(n) => {
                    info!(deleted = n, days, "retention: old events deleted");
                    // The agents' event quotas have room again.
                    if let Err(e) = quotas.reload(store.as_ref()).await {
                        warn!(error = %e, "re-reading per-agent usage after retention");
                    }
                }
                Err(e) => warn!(error = %e, "retention failed"),
            }
        }
        let b = Arc::clone(&blobs);
        match tokio::task::spawn_blocking(move || b.remove_stale_partials(partial_ttl)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => info!(removed = n, "retention: abandoned uploads removed"),
            Ok(Err(e)) => warn!(error = %e, "partial upload cleanup failed"),
            Err(e) => warn!(error = %e, "partial upload cleanup task failed"),
        }
    }
}
