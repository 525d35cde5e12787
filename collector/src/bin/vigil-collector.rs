//! `vigil-collector`: the collector server (`serve`), its PKI tool
//! (`init-pki`) and its revocation list (`revoke`, `unrevoke`, `revoked`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use vigil_collector::incident::Grouping;
use vigil_collector::ingest::Limits;
use vigil_collector::pki::{self, InitPki};
use vigil_collector::revoke;
use vigil_collector::server::{self, ServeConfig, StoreConfig};

/// vigil collector: receives events, detections and evidence from agents
/// over mutual TLS, stores them, groups detections into incidents.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format: text or json (level via VIGIL_LOG, e.g. VIGIL_LOG=debug).
    #[arg(long, global = true, default_value = "text", env = "VIGIL_LOG_FORMAT")]
    log_format: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the collector.
    Serve(Box<ServeArgs>),
    /// Create or complete a PKI directory: CA, server and client
    /// certificates. Existing files are kept unless --renew or --rotate-ca.
    InitPki(InitPkiArgs),
    /// Print the web UI's login token (from the data directory, or
    /// --ui-token-file): for images without a shell or `cat`, e.g.
    /// `kubectl exec vigil-collector-0 -- vigil-collector ui-token`.
    UiToken(UiTokenArgs),
    /// Revoke a certificate: by name (every certificate with that CN) or
    /// by fingerprint (sha256:HEX, as the agents table records it). The
    /// running collector refuses it from its next call (PERMISSION_DENIED),
    /// no restart needed.
    Revoke(RevokeArgs),
    /// Take an entry off the revocation list.
    Unrevoke(RevokeArgs),
    /// List the revoked certificates.
    Revoked(RevokedArgs),
}

#[derive(clap::Args, Debug)]
struct RevokedArgs {
    /// The collector's data directory.
    #[arg(
        long,
        default_value = "/var/lib/vigil-collector",
        env = "VIGIL_COLLECTOR_DATA"
    )]
    data_dir: PathBuf,
    /// The deny-list file, when `serve` was given another one.
    #[arg(long)]
    revoked_file: Option<PathBuf>,
}

impl RevokedArgs {
    fn path(&self) -> PathBuf {
        self.revoked_file
            .clone()
            .unwrap_or_else(|| revoke::default_path(&self.data_dir))
    }
}

#[derive(clap::Args, Debug)]
struct RevokeArgs {
    /// A certificate name (CN) or sha256:FINGERPRINT.
    entry: String,
    #[command(flatten)]
    list: RevokedArgs,
}

#[derive(clap::Args, Debug)]
struct UiTokenArgs {
    /// The collector's data directory.
    #[arg(
        long,
        default_value = "/var/lib/vigil-collector",
        env = "VIGIL_COLLECTOR_DATA"
    )]
    data_dir: PathBuf,
    /// The token file, when `serve` was given another one.
    #[arg(long)]
    ui_token_file: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// gRPC listen address (port 0: any free port; the bound address is
    /// printed on stdout as "listening on ADDR").
    #[arg(long, default_value = "127.0.0.1:7443", env = "VIGIL_COLLECTOR_LISTEN")]
    listen: SocketAddr,
    /// Database and evidence directory.
    #[arg(
        long,
        default_value = "/var/lib/vigil-collector",
        env = "VIGIL_COLLECTOR_DATA"
    )]
    data_dir: PathBuf,
    /// Index backend: sqlite (DATA/vigil.db, embedded) or postgres
    /// (--postgres). Evidence blobs stay in the data directory either way.
    #[arg(long, default_value = "sqlite", value_parser = ["sqlite", "postgres"], env = "VIGIL_COLLECTOR_STORE")]
    store: String,
    /// PostgreSQL connection string for --store postgres (libpq form,
    /// e.g. "host=/run/postgresql dbname=vigil user=vigil", or a
    /// postgresql:// URL).
    #[arg(
        long,
        env = "VIGIL_COLLECTOR_POSTGRES",
        required_if_eq("store", "postgres")
    )]
    postgres: Option<String>,
    /// PKI directory made by init-pki (ca.pem, server.pem, server.key).
    #[arg(long, default_value = "/etc/vigil/pki", env = "VIGIL_PKI")]
    pki: PathBuf,
    /// Largest gRPC message accepted (an event batch, an evidence chunk).
    #[arg(long, default_value_t = 4 << 20)]
    max_message_bytes: usize,
    /// Most events or detections per batch.
    #[arg(long, default_value_t = 10_000)]
    max_batch_items: usize,
    /// Largest evidence bundle.
    #[arg(long, default_value_t = 1 << 30)]
    max_bundle_bytes: u64,
    /// Most bytes a bundle's artifacts may add up to, decompressed: a
    /// manifest claiming more (a decompression bomb) is refused before
    /// anything is read.
    #[arg(long, default_value_t = 16 << 30)]
    max_bundle_expanded_bytes: u64,
    /// Evidence uploads running at once, over all agents.
    #[arg(long, default_value_t = 8)]
    max_concurrent_uploads: usize,
    /// Evidence uploads running at once for one agent (certificate name).
    #[arg(long, default_value_t = 2)]
    max_uploads_per_agent: usize,
    /// Unfinished uploads kept on disk for resumption, over all agents.
    #[arg(long, default_value_t = 64)]
    max_partial_uploads: usize,
    /// Unfinished uploads kept on disk for one agent.
    #[arg(long, default_value_t = 8)]
    max_partial_uploads_per_agent: usize,
    /// Longest wait for the next message of a stream (a chunk, a batch;
    /// e.g. 30s): an idle stream is closed with DEADLINE_EXCEEDED.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    stream_idle_timeout: Duration,
    /// Longest time one evidence upload call may take (e.g. 10m); what
    /// arrived is kept and the agent resumes.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    upload_deadline: Duration,
    /// Events one agent (certificate name) may hold (0: unlimited); past
    /// it its event batches are refused with RESOURCE_EXHAUSTED until
    /// retention makes room.
    #[arg(long, default_value_t = 20_000_000)]
    max_agent_events: u64,
    /// Detections one agent may hold (0: unlimited).
    #[arg(long, default_value_t = 1_000_000)]
    max_agent_detections: u64,
    /// Bytes of evidence bundles one agent may hold (0: unlimited).
    #[arg(long, default_value_t = 50 << 30)]
    max_agent_evidence_bytes: u64,
    /// Delete events older than this many days (0: keep forever).
    /// Detections, incidents and evidence are kept.
    #[arg(long, default_value_t = 30)]
    retention_days: u32,
    /// Drop unfinished uploads untouched for this long (e.g. 7d).
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    partial_ttl: Duration,
    /// Largest gap between two detections of one incident (e.g. 10m).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    incident_window: Duration,
    /// Serve Prometheus metrics on this address (GET /metrics).
    #[arg(long, env = "VIGIL_COLLECTOR_METRICS")]
    metrics_addr: Option<SocketAddr>,
    /// Serve the incident web UI on this address (plain HTTP unless
    /// --ui-tls: then keep it on loopback or behind a TLS proxy). Printed
    /// on stdout as "ui on http://ADDR/" (https with --ui-tls).
    #[arg(long, env = "VIGIL_COLLECTOR_UI")]
    ui_addr: Option<SocketAddr>,
    /// Serve the web UI over HTTPS with the collector's own certificate
    /// from the PKI (PKI/server.pem; browsers must trust PKI/ca.pem):
    /// session cookies are then marked Secure.
    #[arg(long)]
    ui_tls: bool,
    /// File with the UI token (created with a random token when missing;
    /// default DATA/ui-token).
    #[arg(long)]
    ui_token_file: Option<PathBuf>,
    /// The certificate deny-list (default DATA/revoked; edit it with
    /// `vigil-collector revoke`), re-read when it changes.
    #[arg(long)]
    revoked_file: Option<PathBuf>,
    /// Refuse evidence bundles the agent did not sign (agents before
    /// proof of origin); by default they are kept and marked unsigned.
    #[arg(long)]
    require_signed_evidence: bool,
    /// How long a web UI session lasts after sign-in (e.g. 12h); "Sign
    /// out" ends it sooner, a restart ends them all.
    #[arg(long, default_value = "12h", value_parser = humantime::parse_duration)]
    ui_session_ttl: Duration,
    /// A second UI token, for viewers: incidents, trees, timelines and the
    /// API, but no evidence downloads (the UI token is the analyst's).
    /// Created with a random token when missing. Default: no viewer role.
    #[arg(long)]
    ui_viewer_token_file: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct InitPkiArgs {
    /// The PKI directory (created when missing).
    #[arg(long, env = "VIGIL_PKI")]
    dir: PathBuf,
    /// Extra server certificate SAN (DNS name or IP address), besides
    /// localhost, 127.0.0.1 and ::1. Repeatable; re-issues the server
    /// certificate.
    #[arg(long = "san")]
    sans: Vec<String>,
    /// Issue an agent certificate with this name (the CN, recorded with
    /// everything the agent sends). Repeatable.
    #[arg(long = "agent")]
    agents: Vec<String>,
    /// Issue an analyst certificate (for the `vigil` CLI). Repeatable;
    /// "analyst" is issued by default when the directory has none.
    #[arg(long = "analyst")]
    analysts: Vec<String>,
    /// Re-issue the named certificates and the server's with the same CA.
    #[arg(long)]
    renew: bool,
    /// New CA: re-issues the server certificate and every agent and analyst
    /// certificate in the directory. Every agent needs its new files.
    #[arg(long)]
    rotate_ca: bool,
    /// Validity of issued certificates, days.
    #[arg(long, default_value_t = 365)]
    days: u32,
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VIGIL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
}

fn main() -> std::process::ExitCode {
    // Evidence, the database and private keys are the collector user's only
    // (modes are also set explicitly).
    vigil_bundle::private::set_private_umask();
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    if let Command::Serve(a) = &cli.command {
        // Refused before anything starts: a link, a directory writable by
        // others or owned by another user (a looser mode is tightened).
        if let Err(e) = vigil_bundle::private::secure_dir(&a.data_dir) {
            eprintln!("vigil-collector: configuration error: data directory (--data-dir): {e}");
            return std::process::ExitCode::from(2);
        }
    }
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vigil-collector: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::UiToken(a) => {
            let path = a
                .ui_token_file
                .unwrap_or_else(|| a.data_dir.join("ui-token"));
            let token = std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "reading the UI token {} (it is made when `serve` first runs with --ui-addr)",
                    path.display()
                )
            })?;
            anyhow::ensure!(!token.trim().is_empty(), "{} is empty", path.display());
            println!("{}", token.trim());
            Ok(())
        }
        Command::Revoke(a) => {
            let entry = revoke::Entry::parse(&a.entry)?;
            let path = a.list.path();
            if revoke::revoke(&path, entry.clone())? {
                println!("revoked {entry} (in {})", path.display());
            } else {
                println!("{entry} was already revoked (in {})", path.display());
            }
            Ok(())
        }
        Command::Unrevoke(a) => {
            let entry = revoke::Entry::parse(&a.entry)?;
            let path = a.list.path();
            if revoke::unrevoke(&path, &entry)? {
                println!("{entry} is no longer revoked (in {})", path.display());
                Ok(())
            } else {
                anyhow::bail!("{entry} is not in {}", path.display())
            }
        }
        Command::Revoked(a) => {
            for e in revoke::read(&a.path())? {
                println!("{e}");
            }
            Ok(())
        }
        Command::InitPki(a) => {
            let mut analysts = a.analysts;
            let (existing, _) = pki::client_paths(&a.dir, pki::Role::Analyst, "analyst");
            if analysts.is_empty()
                && !existing.exists()
                && !a
                    .dir
                    .join("analysts")
                    .read_dir()
                    .is_ok_and(|mut d| d.next().is_some())
            {
                analysts.push("analyst".into());
            }
            let report = pki::init_pki(&InitPki {
                dir: a.dir.clone(),
                extra_sans: a.sans,
                agents: a.agents,
                analysts,
                renew: a.renew,
                rotate_ca: a.rotate_ca,
                leaf_days: a.days,
            })?;
            for p in &report.written {
                println!("wrote {}", p.display());
            }
            for p in &report.kept {
                println!("kept  {}", p.display());
            }
            Ok(())
        }
        Command::Serve(a) => {
            let cfg = ServeConfig {
                listen: a.listen,
                data_dir: a.data_dir,
                store: match (a.store.as_str(), a.postgres) {
                    ("postgres", Some(conn)) => StoreConfig::Postgres(conn),
                    _ => StoreConfig::Sqlite,
                },
                pki_dir: a.pki,
                limits: Limits {
                    max_message_bytes: a.max_message_bytes,
                    max_batch_items: a.max_batch_items,
                    max_bundle_bytes: a.max_bundle_bytes,
                    max_concurrent_uploads: a.max_concurrent_uploads.max(1),
                    max_uploads_per_agent: a.max_uploads_per_agent.max(1),
                    max_partial_uploads: a.max_partial_uploads.max(1),
                    max_partial_uploads_per_agent: a.max_partial_uploads_per_agent.max(1),
                    stream_idle_timeout: a.stream_idle_timeout.max(Duration::from_millis(100)),
                    upload_deadline: a.upload_deadline.max(Duration::from_secs(1)),
                    max_bundle_expanded_bytes: a.max_bundle_expanded_bytes,
                    quotas: vigil_collector::quota::QuotaLimits {
                        events: a.max_agent_events,
                        detections: a.max_agent_detections,
                        evidence_bytes: a.max_agent_evidence_bytes,
                    },
                },
                retention_days: a.retention_days,
                partial_ttl: a.partial_ttl,
                grouping: Grouping {
                    window_ns: i64::try_from(a.incident_window.as_nanos()).unwrap_or(i64::MAX),
                },
                metrics_addr: a.metrics_addr,
                ui_addr: a.ui_addr,
                ui_tls: a.ui_tls,
                ui_token_file: a.ui_token_file,
                revoked_file: a.revoked_file,
                require_signed_evidence: a.require_signed_evidence,
                ui_session_ttl: a.ui_session_ttl.max(Duration::from_secs(1)),
                ui_viewer_token_file: a.ui_viewer_token_file,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("vigil-collector")
                .build()?;
            rt.block_on(server::serve(
                cfg,
                |l| {
                    use std::io::Write;
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "listening on {}", l.grpc);
                    if let Some((addr, token)) = &l.ui {
                        let scheme = if l.ui_tls { "https" } else { "http" };
                        let _ = writeln!(
                            out,
                            "ui on {scheme}://{addr}/ (token in {})",
                            token.display()
                        );
                    }
                    let _ = out.flush();
                },
                shutdown_signal(),
            ))
        }
    }
}
