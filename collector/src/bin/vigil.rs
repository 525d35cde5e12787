//! `vigil`: the analyst's command line. Reads incidents, detections and
//! evidence from a collector over mutual TLS (an analyst certificate from
//! `vigil-collector init-pki`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tonic::transport::Channel;
use vigil_collector::client::{self, status_error as status, MAX_CLIENT_MESSAGE};
use vigil_collector::evidence;
use vigil_collector::pki::{ClientFiles, Role};
use vigil_collector::render;
use vigil_proto::query_client::QueryClient;
use vigil_proto::{GetIncidentRequest, ListDetectionsRequest, ListIncidentsRequest, Severity};

/// vigil: incidents, detections and evidence from a vigil collector.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct Connection {
    /// Collector URL.
    #[arg(
        long,
        global = true,
        env = "VIGIL_COLLECTOR",
        default_value = "https://127.0.0.1:7443"
    )]
    collector: String,
    /// PKI directory holding ca.pem and analysts/NAME.{pem,key}.
    #[arg(
        long,
        global = true,
        env = "VIGIL_PKI",
        default_value = "/etc/vigil/pki"
    )]
    pki: PathBuf,
    /// Analyst certificate name in the PKI directory.
    #[arg(long, global = true, env = "VIGIL_ANALYST", default_value = "analyst")]
    name: String,
    /// CA certificate (overrides the PKI directory's).
    #[arg(long, global = true, env = "VIGIL_CA")]
    ca: Option<PathBuf>,
    /// Client certificate (overrides the PKI directory's).
    #[arg(long, global = true, env = "VIGIL_CERT")]
    cert: Option<PathBuf>,
    /// Client key (overrides the PKI directory's).
    #[arg(long, global = true, env = "VIGIL_KEY")]
    key: Option<PathBuf>,
    /// Name the collector's certificate must carry (default: the URL host).
    #[arg(long, global = true)]
    server_name: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Incidents: detections grouped by process tree and time.
    #[command(subcommand)]
    Incidents(IncidentsCmd),
    /// Detections.
    #[command(subcommand)]
    Detections(DetectionsCmd),
    /// Evidence bundles.
    #[command(subcommand)]
    Evidence(EvidenceCmd),
}

#[derive(Args, Debug, Default)]
struct Filters {
    /// Only since this long ago (e.g. 24h, 7d) or this RFC 3339 time.
    #[arg(long)]
    since: Option<String>,
    /// Only before this RFC 3339 time (or this long ago).
    #[arg(long)]
    until: Option<String>,
    /// Only this agent (certificate name).
    #[arg(long)]
    agent: Option<String>,
    /// Only at least this severity: info, low, medium, high, critical.
    #[arg(long)]
    min_severity: Option<String>,
    /// Substring search (rules, summaries, executables, workloads).
    #[arg(long, short = 's')]
    search: Option<String>,
    /// At most this many, newest first (server caps at 1000).
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// JSON output (one document).
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum IncidentsCmd {
    /// List incidents, most recently active first.
    List(Filters),
    /// Show one incident: summary, process tree, timeline, evidence.
    Show {
        /// Incident id.
        id: i64,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Show every event of the timeline (default: the first 100).
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand, Debug)]
enum DetectionsCmd {
    /// List detections, newest first.
    List {
        #[command(flatten)]
        filters: Filters,
        /// Only this rule id.
        #[arg(long)]
        rule: Option<String>,
        /// Only this incident.
        #[arg(long)]
        incident: Option<i64>,
    },
}

#[derive(Subcommand, Debug)]
enum EvidenceCmd {
    /// Download a bundle (resumable; verified before it gets its name).
    Get {
        /// Bundle id (SHA-256).
        id: String,
        /// Output file (default: `./ID.zst`).
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
        /// No progress bar.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// Verify bundle files: each one's SHA-256 against its id and every
    /// artifact against its manifest; with several files (one agent's),
    /// also their chain of custody. No collector needed. Exit status 1 when
    /// anything fails.
    Verify {
        /// The bundle files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Expected id (default: from the file name).
        #[arg(long)]
        id: Option<String>,
    },
}

fn parse_time(s: &str) -> Result<i64> {
    let t = match humantime::parse_duration(s) {
        Ok(d) => SystemTime::now()
            .checked_sub(d)
            .context("duration too long")?,
        Err(_) => humantime::parse_rfc3339_weak(s).with_context(|| {
            format!("{s:?} is neither a duration (24h, 7d) nor an RFC 3339 time")
        })?,
    };
    Ok(t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_nanos() as i64)
}

fn parse_severity(s: &Option<String>) -> Result<i32> {
    match s {
        None => Ok(0),
        Some(s) => Severity::from_label(s)
            .map(|v| v as i32)
            .with_context(|| format!("unknown severity {s:?}: info, low, medium, high, critical")),
    }
}

struct Common {
    since: i64,
    until: i64,
    agent: String,
    min_severity: i32,
    search: String,
}

fn common(f: &Filters) -> Result<Common> {
    Ok(Common {
        since: f.since.as_deref().map(parse_time).transpose()?.unwrap_or(0),
        until: f.until.as_deref().map(parse_time).transpose()?.unwrap_or(0),
        agent: f.agent.clone().unwrap_or_default(),
        min_severity: parse_severity(&f.min_severity)?,
        search: f.search.clone().unwrap_or_default(),
    })
}

async fn connect(c: &Connection) -> Result<QueryClient<Channel>> {
    let mut files = ClientFiles::in_pki(&c.pki, Role::Analyst, &c.name);
    if let Some(p) = &c.ca {
        files.ca = p.clone();
    }
    if let Some(p) = &c.cert {
        files.cert = p.clone();
    }
    if let Some(p) = &c.key {
        files.key = p.clone();
    }
    let channel = client::connect(&c.collector, &files, c.server_name.as_deref()).await?;
    Ok(QueryClient::new(channel).max_decoding_message_size(MAX_CLIENT_MESSAGE))
}

fn print_json(v: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::Incidents(IncidentsCmd::List(f)) => {
            let c = common(&f)?;
            let mut q = connect(&cli.conn).await?;
            let list = q
                .list_incidents(ListIncidentsRequest {
                    since_unix_nanos: c.since,
                    until_unix_nanos: c.until,
                    agent: c.agent,
                    min_severity: c.min_severity,
                    limit: f.limit,
                    search: c.search,
                })
                .await
                .map_err(status)?
                .into_inner()
                .incidents;
            if f.json {
                print_json(&serde_json::Value::Array(
                    list.iter().map(render::incident_summary_json).collect(),
                ))?;
            } else if list.is_empty() {
                println!("no incidents");
            } else {
                print!("{}", render::incidents_table(&list));
            }
        }
        Command::Incidents(IncidentsCmd::Show { id, json, all }) => {
            let mut q = connect(&cli.conn).await?;
            let detail = q
                .get_incident(GetIncidentRequest { id })
                .await
                .map_err(status)?
                .into_inner();
            if json {
                print_json(&render::incident_json(&detail))?;
            } else {
                print!(
                    "{}",
                    render::incident_text(&detail, if all { usize::MAX } else { 100 })
                );
            }
        }
        Command::Detections(DetectionsCmd::List {
            filters,
            rule,
            incident,
        }) => {
            let c = common(&filters)?;
            let mut q = connect(&cli.conn).await?;
            let list = q
                .list_detections(ListDetectionsRequest {
                    since_unix_nanos: c.since,
                    until_unix_nanos: c.until,
                    agent: c.agent,
                    rule: rule.unwrap_or_default(),
                    min_severity: c.min_severity,
                    incident_id: incident.unwrap_or(0),
                    limit: filters.limit,
                    search: c.search,
                })
                .await
                .map_err(status)?
                .into_inner()
                .detections;
            if filters.json {
                print_json(&serde_json::Value::Array(
                    list.iter().map(render::detection_json).collect(),
                ))?;
            } else if list.is_empty() {
                println!("no detections");
            } else {
                print!("{}", render::detections_table(&list));
            }
        }
        Command::Evidence(EvidenceCmd::Get { id, output, quiet }) => {
            let out = output.unwrap_or_else(|| PathBuf::from(format!("{id}.zst")));
            if out.exists() {
                bail!("{} exists; remove it or choose another -o", out.display());
            }
            let mut q = connect(&cli.conn).await?;
            let bar = if quiet {
                ProgressBar::hidden()
            } else {
                let b = ProgressBar::new(0);
                b.set_style(
                    ProgressStyle::with_template(
                        "{spinner} [{elapsed_precise}] [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                b
            };
            let n = evidence::download(&mut q, &id, &out, |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })
            .await?;
            bar.finish_and_clear();
            println!(
                "{}: {} verified (sha256 {id})",
                out.display(),
                render::bytes(n)
            );
        }
        Command::Evidence(EvidenceCmd::Verify { files, id }) => {
            if id.is_some() && files.len() != 1 {
                bail!("--id names one file's bundle: pass a single file with it");
            }
            let mark = |ok: bool| if ok { "OK  " } else { "FAIL" };
            let mut all_ok = true;
            for file in &files {
                let expected = match id.clone().or_else(|| evidence::id_from_file_name(file)) {
                    Some(id) => id,
                    None => bail!(
                        "{}: the file name does not start with the bundle id; pass --id",
                        file.display()
                    ),
                };
                let r = evidence::verify_file(file, &expected)?;
                println!("{}", file.display());
                println!(
                    "  {} sha256 {} (expected {})",
                    mark(r.sha256 == r.expected),
                    r.sha256,
                    r.expected
                );
                match &r.manifest {
                    Ok(m) => {
                        // The manifest is the agent's: nothing of it
                        // reaches the terminal unsanitized.
                        let c = render::clean;
                        for a in &m.artifacts {
                            println!(
                                "  {} {:<14} {:>10}  sha256 {}",
                                mark(true),
                                c(&a.name),
                                render::bytes(a.size),
                                c(&a.sha256)
                            );
                        }
                        println!(
                            "  {} manifest: {} artifacts match; agent {} on {} (boot {}), seq {}, previous {}",
                            mark(true),
                            m.artifacts.len(),
                            c(&m.agent.id),
                            c(&m.agent.hostname),
                            c(&m.agent.boot_id),
                            m.seq,
                            c(m.prev_bundle_sha256.as_deref().unwrap_or("none (first)"))
                        );
                    }
                    Err(e) => println!(
                        "  {} manifest: {}",
                        mark(false),
                        render::clean(&e.to_string())
                    ),
                }
                all_ok &= r.ok();
            }
            if files.len() > 1 {
                match evidence::verify_chain(&files) {
                    Ok(ms) => println!(
                        "{} chain of custody: {} bundles, seq {}..{}, each names its predecessor",
                        mark(true),
                        ms.len(),
                        ms.first().map(|m| m.seq).unwrap_or(0),
                        ms.last().map(|m| m.seq).unwrap_or(0)
                    ),
                    Err(e) => {
                        println!(
                            "{} chain of custody: {}",
                            mark(false),
                            render::clean(&format!("{e:#}"))
                        );
                        all_ok = false;
                    }
                }
            }
            return Ok(all_ok);
        }
    }
    Ok(true)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vigil: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("vigil: {e:#}");
            ExitCode::from(2)
        }
    }
}
