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
    /// Verify bundle files: each one's SHA-256 against its id, every
    /// artifact against its manifest, the agent's signature (FILE.sig,
    /// against the CA, bound to the manifest's agent id) and the
    /// collector's receipt (FILE.receipt); with several files (one
    /// agent's), also their chain of custody. When the collector is
    /// reachable, also its record: it holds this exact bundle, its origin,
    /// its place in the agent's chain, forks, the chain head. Exit status 1
    /// when anything fails.
    Verify {
        /// The bundle files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Expected id (default: from the file name).
        #[arg(long)]
        id: Option<String>,
        /// Do not ask the collector (self-consistency only).
        #[arg(long)]
        offline: bool,
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
    // What agents sent is inside: printed without terminal controls.
    println!("{}", render::terminal_json(v));
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
            // The agent's signature and the collector's receipt go next
            // to it, for `vigil evidence verify` offline.
            let st = q
                .evidence_status(vigil_proto::EvidenceStatusRequest {
                    bundle_id: id.clone(),
                })
                .await
                .map_err(status)?
                .into_inner();
            if let Some(info) = st.info {
                for (ext, doc) in [("sig", &info.signature), ("receipt", &info.receipt)] {
                    if !doc.is_empty() {
                        let p = evidence::sidecar(&out, ext);
                        std::fs::write(&p, doc)
                            .with_context(|| format!("writing {}", p.display()))?;
                        println!("{}: written", p.display());
                    }
                }
                if info.origin == "unsigned" {
                    println!("note: the agent did not sign this bundle (an agent before signatures): its origin rests on the collector's record");
                }
            }
        }
        Command::Evidence(EvidenceCmd::Verify { files, id, offline }) => {
            if id.is_some() && files.len() != 1 {
                bail!("--id names one file's bundle: pass a single file with it");
            }
            let mark = |ok: bool| if ok { "OK  " } else { "FAIL" };
            let mut all_ok = true;
            let ca_path = cli
                .conn
                .ca
                .clone()
                .unwrap_or_else(|| cli.conn.pki.join("ca.pem"));
            let ca = std::fs::read_to_string(&ca_path).ok();
            let mut online = if offline {
                Err("--offline".to_string())
            } else {
                connect(&cli.conn).await.map_err(|e| format!("{e:#}"))
            };
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
                let manifest = r.manifest.as_ref().ok().map(|m| &**m);
                let o = evidence::check_origin(file, &r.sha256, manifest, ca.as_deref());
                let c = render::clean;
                let ca_note = if o.ca_checked {
                    String::new()
                } else {
                    format!(
                        " (certificate NOT checked against a CA: no {})",
                        ca_path.display()
                    )
                };
                match &o.signature {
                    None => println!(
                        "  WARN unsigned: no {} (an agent before signatures, or the signature was not kept): its origin rests on the collector's record",
                        evidence::sidecar(file, "sig").display()
                    ),
                    Some(Ok(who)) => println!(
                        "  {} signed by agent {}, the agent the manifest names{ca_note}",
                        mark(true),
                        c(who)
                    ),
                    Some(Err(e)) => println!("  {} signature: {}", mark(false), c(e)),
                }
                match &o.receipt {
                    None => {}
                    Some(Ok(rc)) => println!(
                        "  {} receipt: stored by the collector from agent {}, seq {}, chain {}, {}{ca_note}",
                        mark(true),
                        c(&rc.agent),
                        rc.seq,
                        c(&rc.chain),
                        if rc.signed { "signed" } else { "unsigned" }
                    ),
                    Some(Err(e)) => println!("  {} receipt: {}", mark(false), c(e)),
                }
                all_ok &= o.ok();
                if let Ok(q) = &mut online {
                    all_ok &= collector_record(q, &r.sha256, manifest).await?;
                }
            }
            if let Err(why) = &online {
                println!(
                    "offline ({}): checked self-consistency only (hash, manifest, signature, receipt); not checked: that the collector holds these exact bundles, their place in the agent's chain, forks, the chain head",
                    render::clean(why)
                );
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

/// Compares a bundle with the collector's record of it; false when the
/// collector holds no such bundle or reports a fork.
async fn collector_record(
    q: &mut QueryClient<Channel>,
    sha256: &str,
    manifest: Option<&vigil_bundle::Manifest>,
) -> Result<bool> {
    let mark = |ok: bool| if ok { "OK  " } else { "FAIL" };
    let c = render::clean;
    let st = q
        .evidence_status(vigil_proto::EvidenceStatusRequest {
            bundle_id: sha256.to_string(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let Some(info) = st.info.filter(|_| st.found) else {
        if st.committed {
            println!(
                "  {} collector: agent {} committed to this bundle when it was sealed, but it never arrived",
                mark(false),
                c(&st.committed_by)
            );
        } else {
            println!(
                "  {} collector: holds no bundle with this content (sha256 {sha256}): altered after it was uploaded, or not uploaded yet",
                mark(false)
            );
        }
        return Ok(false);
    };
    let mut ok = true;
    println!(
        "  {} collector: holds it from agent {} ({}), seq {}, chain {}; the agent's chain head there: seq {} ({})",
        mark(true),
        c(&info.agent),
        if info.origin.is_empty() {
            "stored before origin checks".to_string()
        } else {
            c(&info.origin).to_string()
        },
        info.seq,
        c(&info.chain),
        st.head_seq,
        c(&st.head_bundle_id)
    );
    if let Some(m) = manifest {
        if m.agent.id != info.agent {
            println!(
                "  WARN the manifest names agent {}, the collector received it from {}",
                c(&m.agent.id),
                c(&info.agent)
            );
        }
    }
    match info.commitment.as_str() {
        "committed" => println!("  {} the agent committed to it when it was sealed", mark(true)),
        "contradicted" => {
            ok = false;
            println!(
                "  {} the agent committed to another bundle at seq {} when it was sealed: this one changed before its upload, or the chain forked",
                mark(false),
                info.seq
            );
        }
        "uncommitted" => println!(
            "  NOTE no commitment for it reached the collector before its upload (an older agent, or one cut off until then)"
        ),
        _ => {}
    }
    if !st.forks.is_empty() || info.chain == "fork" || info.chain == "broken" {
        ok = false;
        println!(
            "  {} chain of custody at the collector: {}; other bundles naming the same predecessor: {}",
            mark(false),
            c(&info.chain),
            if st.forks.is_empty() { "none".to_string() } else { c(&st.forks.join(", ")) }
        );
    }
    Ok(ok)
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
            // Errors may quote the collector or a bundle (agent strings).
            eprintln!("vigil: {}", render::clean(&format!("{e:#}")));
            ExitCode::from(2)
        }
    }
}
