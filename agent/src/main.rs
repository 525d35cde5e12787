//! `vigil-agent`: the vigil runtime sensor's agent.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use vigil_agent::config::{AgentConfig, DEFAULT_CONFIG_PATH};

/// vigil runtime security sensor: eBPF process, file and network events,
/// a live process tree, JSON output and Prometheus metrics.
#[derive(Parser, Debug)]
#[command(name = "vigil-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML config file (default: /etc/vigil/agent.toml when it exists).
    #[arg(long, short = 'c', env = "VIGIL_AGENT_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Write every event as a JSON line to PATH ("-" for stdout).
    #[arg(long, value_name = "PATH")]
    events_json: Option<PathBuf>,
    /// Serve Prometheus metrics on ADDR (e.g. 127.0.0.1:9108).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Kernel BTF file (default: /sys/kernel/btf/vmlinux).
    #[arg(long, value_name = "PATH")]
    btf: Option<PathBuf>,
    /// Hook groups to leave off (file_write, chmod, rename, connect, listen,
    /// utimes, comm, send, process_access, module, bpf, exec_mem, unlink;
    /// the process hooks are always on); repeatable.
    #[arg(long, value_name = "GROUP")]
    disable: Vec<String>,
    /// Log format: text or json.
    #[arg(long)]
    log_format: Option<String>,
    /// Write every detection as a JSON line to PATH ("-" for stdout).
    #[arg(long, value_name = "PATH")]
    detections_json: Option<PathBuf>,
    /// Learn the per-workload baseline for DURATION after start (e.g. 10m).
    #[arg(long, value_name = "DURATION")]
    learn: Option<String>,
    /// Baseline file: loaded at start if present, saved every minute and at exit.
    #[arg(long, value_name = "PATH")]
    baseline_file: Option<PathBuf>,
    /// Directory of Sigma rules (process_creation, file_event, network_connection).
    #[arg(long, value_name = "DIR")]
    rules_dir: Option<PathBuf>,
    /// Where evidence capture keeps its work, sealed bundles and chain state.
    #[arg(long, value_name = "DIR", global = true)]
    capture_dir: Option<PathBuf>,
    /// Do not capture evidence on detection.
    #[arg(long)]
    no_capture: bool,
    /// Write each evidence capture outcome as a JSON line to PATH.
    #[arg(long, value_name = "PATH")]
    evidence_json: Option<PathBuf>,
    /// Ship detections and evidence to this collector (https://HOST:PORT).
    #[arg(long, value_name = "URL")]
    collector: Option<String>,
    /// Collector PKI directory (from `vigil-collector init-pki`).
    #[arg(long, value_name = "DIR")]
    collector_pki: Option<PathBuf>,
    /// This agent's certificate name in the PKI directory.
    #[arg(long, value_name = "NAME")]
    agent_name: Option<String>,
    /// Where items wait for the collector (default /var/lib/vigil/spool).
    #[arg(long, value_name = "DIR")]
    spool_dir: Option<PathBuf>,
    /// Spool size limit in MiB (default 1024).
    #[arg(long, value_name = "MIB")]
    spool_max_mib: Option<u64>,
    /// Acknowledged evidence archives kept on the node, MiB (default 0:
    /// an archive leaves once the collector acknowledged it).
    #[arg(long, value_name = "MIB")]
    keep_shipped_mib: Option<u64>,
    /// Print the merged configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Resume every process a vigil agent stopped and did not release
    ///
    /// Reads the frozen-process ledgers that dead agents left pinned in
    /// bpffs (`bpf_pin_dir`) and the capture state's `stopped.json`, sends
    /// SIGCONT to each listed process that still has the listed start time,
    /// and removes the records. Ledgers of a running agent are left to it
    /// unless --include-running. Run at every start (the agent does) and as
    /// the systemd unit's `ExecStopPost=` / the pod's `preStop`. Prints a
    /// JSON summary.
    ResumeFrozen {
        /// Also release what a running agent holds (its captures lose
        /// their freeze).
        #[arg(long)]
        include_running: bool,
    },
}

fn resume_frozen(cfg: &AgentConfig, include_running: bool) -> anyhow::Result<serde_json::Value> {
    let report = vigil_agent::frozen::resume_leftovers(&cfg.sensor.bpf_pin_dir, include_running)?;
    // Agent-side freezes of captures in progress: only when no agent runs
    // (a running one releases its own).
    let state = cfg.capture.dir.join("state");
    let agent_side = if report.running_agents.is_empty() || include_running {
        vigil_agent::capture::freeze::resume_leftovers(&state)
            .map_err(|e| anyhow::anyhow!("{e}"))?
    } else {
        Vec::new()
    };
    Ok(serde_json::json!({
        "resumed": report.resumed,
        "resumed_at_exec": report.resumed_at_exec,
        "resumed_from_capture_state": agent_side,
        "stale_entries": report.stale,
        "ledgers_removed": report.ledgers,
        "running_agents_left_alone": if include_running { Vec::new() } else { report.running_agents },
    }))
}

fn load_config(cli: &Cli) -> anyhow::Result<AgentConfig> {
    let mut cfg = match &cli.config {
        Some(p) => AgentConfig::from_file(p)?,
        None if std::path::Path::new(DEFAULT_CONFIG_PATH).exists() => {
            AgentConfig::from_file(std::path::Path::new(DEFAULT_CONFIG_PATH))?
        }
        None => AgentConfig::default(),
    };
    if let Some(p) = &cli.events_json {
        cfg.outputs.events_json = Some(p.clone());
    }
    if let Some(a) = cli.metrics_addr {
        cfg.outputs.metrics_addr = Some(a);
    }
    if let Some(b) = &cli.btf {
        cfg.sensor.btf_path = Some(b.clone());
    }
    cfg.sensor.disable.extend(cli.disable.iter().cloned());
    if let Some(p) = &cli.detections_json {
        cfg.outputs.detections_json = Some(p.clone());
    }
    if let Some(l) = &cli.learn {
        cfg.detect.learn = l.clone();
    }
    if let Some(p) = &cli.baseline_file {
        cfg.detect.baseline_file = Some(p.clone());
    }
    if let Some(p) = &cli.rules_dir {
        cfg.detect.rules_dir = Some(p.clone());
    }
    if let Some(p) = &cli.capture_dir {
        cfg.capture.dir = p.clone();
    }
    if cli.no_capture {
        cfg.capture.enabled = false;
    }
    if let Some(p) = &cli.evidence_json {
        cfg.outputs.evidence_json = Some(p.clone());
    }
    if let Some(u) = &cli.collector {
        cfg.ship.collector = Some(u.clone());
    }
    if let Some(p) = &cli.collector_pki {
        cfg.ship.collector_pki = Some(p.clone());
    }
    if let Some(n) = &cli.agent_name {
        cfg.ship.agent_name = Some(n.clone());
    }
    if let Some(p) = &cli.spool_dir {
        cfg.ship.spool_dir = p.clone();
    }
    if let Some(m) = cli.spool_max_mib {
        cfg.ship.spool_max_mib = m;
    }
    if let Some(m) = cli.keep_shipped_mib {
        cfg.capture.keep_shipped_mib = m;
    }
    if let Some(f) = &cli.log_format {
        cfg.outputs.log_format = f.clone();
    }
    // `resume-frozen` reads only where the ledgers and the capture state
    // are: a configuration the agent would refuse (e.g. a collector without
    // an agent name) must not keep it from releasing processes.
    if cli.command.is_none() {
        cfg.validate()?;
    }
    Ok(cfg)
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

fn main() -> std::process::ExitCode {
    // Evidence and state are private (modes are also set explicitly).
    vigil_bundle::private::set_private_umask();
    let cli = Cli::parse();
    let cfg = match load_config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vigil-agent: configuration error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    if cli.print_config {
        print!("{}", toml::to_string(&cfg).unwrap_or_default());
        return std::process::ExitCode::SUCCESS;
    }
    init_logging(&cfg.outputs.log_format);
    if let Some(Command::ResumeFrozen { include_running }) = &cli.command {
        return match resume_frozen(&cfg, *include_running) {
            Ok(v) => {
                println!("{v}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vigil-agent resume-frozen: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    if let Err(e) = vigil_agent::dirs::secure_dirs(&cfg) {
        eprintln!("vigil-agent: configuration error: {e:#}");
        return std::process::ExitCode::from(2);
    }
    // Privileged start on this one thread, then every capability but the
    // runtime set goes, then the threads start.
    let result = vigil_agent::runner::prepare(cfg).and_then(|prepared| {
        vigil_agent::privilege::drop_to_runtime_set().context("dropping privileges after load")?;
        // One thread runs the agent's loop and polls the kernel's readiness
        // itself: a wakeup is one thread switch (a multi-thread runtime's
        // `block_on` takes two, a worker waking this thread). The loop is
        // the only busy task; the metrics listener's scrapes share it, and
        // the capture, shipper and freeze watchdog have their own threads.
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?
            .block_on(vigil_agent::runner::run(prepared))
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vigil-agent: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
