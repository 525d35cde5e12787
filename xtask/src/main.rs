//! Developer tasks for vigil: `cargo xtask <command>` (see `cargo xtask --help`).

mod bench;
mod deploy;
mod disk;
mod fuzz;
mod image;
mod package;
mod podrun;
mod prom;
mod run;
mod setup;
mod util;
mod vm;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::setup::TracefsPolicy;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, run, test and benchmark vigil",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build needs (idempotent)
    ///
    /// Checks each item and skips what is present: the nightly toolchain
    /// (error if missing), its rust-src component, bpf-linker 0.10.3
    /// (`cargo +nightly install bpf-linker@0.10.3 --locked`, in ~/.cargo/bin)
    /// and a tracefs mount at /sys/kernel/tracing (mounting needs root).
    Setup,

    /// Set up, build and run the collector and the agent
    ///
    /// Runs setup, `cargo build -p vigil-agent`, then (unless --no-collector)
    /// `cargo build -p vigil-collector --bins` (--release if asked). Unless
    /// --no-collector: creates a PKI in DATA/pki on first run
    /// (`vigil-collector init-pki`, agent certificate named after the host),
    /// starts `vigil-collector serve` in the background
    /// (gRPC 127.0.0.1:7443, web UI 127.0.0.1:7480, metrics 127.0.0.1:9109,
    /// data in DATA/data, log in DATA/collector.log), waits until it is ready
    /// and prints the UI login URL, the metrics address and a `vigil` CLI
    /// command. Then runs target/{debug,release}/vigil-agent in the
    /// foreground (as root; under sudo when not root and sudo is available)
    /// and stops the collector when the agent exits. Arguments after `--` go
    /// to the agent; default: `--events-json -` (JSON lines on stdout), plus
    /// `--detections-json DATA/detections.jsonl` and `--capture-dir
    /// DATA/capture` when the agent supports them.
    Run {
        /// Build and run the release profile.
        #[arg(long)]
        release: bool,
        /// Run only the agent (no collector build, PKI or server).
        #[arg(long)]
        no_collector: bool,
        /// Local data directory (PKI, collector data, detections, captures)
        /// [default: target/vigil].
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Arguments for vigil-agent.
        #[arg(last = true)]
        agent_args: Vec<String>,
    },

    /// Build the agent, run all tests, clippy, rustfmt, deploy and package checks (what CI runs)
    ///
    /// Runs setup (plus clippy/rustfmt components), `cargo build -p
    /// vigil-agent`, `cargo test --workspace` with VIGIL_AGENT_BIN set to the
    /// absolute path of target/debug/vigil-agent, `cargo clippy --workspace
    /// --all-targets -- -D warnings`, `cargo fmt --all -- --check`, `fuzz
    /// --seconds 10` (each fuzz target from its committed corpus),
    /// `deploy-check` (the Kubernetes manifests, see there), `package
    /// --check --debug --no-build` (the Debian packages, see there), the
    /// images (`cargo xtask image --debug --no-build`: needs podman),
    /// `pod-run` (the manifests' pods run from those images) and `vm-test
    /// --kernel 6.1` with those debug packages (needs qemu-system-x86 and
    /// debootstrap; the VM image is cached in target/vm).
    /// Arguments after `--` are appended to `cargo test` (with `-p`, the
    /// `--workspace` flag is dropped). Test, clippy, fmt, deploy-check and
    /// package all run even if one fails; a summary names the failed steps
    /// and the exit code is non-zero. The end-to-end tests need root.
    Test {
        /// Per-step timeout in minutes (build, test, clippy, fmt); the step's
        /// process group is killed when it expires.
        #[arg(long, default_value_t = 45)]
        step_timeout_mins: u64,
        /// Seconds each fuzz target runs from the committed corpus (`cargo
        /// xtask fuzz`); 0 leaves the fuzzing step out (the corpus is still
        /// replayed by `cargo test`).
        #[arg(long, default_value_t = 10)]
        fuzz_seconds: u64,
        /// Extra arguments for `cargo test` (e.g. `-- -- --test-threads=1`).
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },

    /// What the agent costs the workloads (needs root)
    ///
    /// Builds the agent (release), then for each workload (exec storm,
    /// loopback TCP connect storm, file create/write storm, a mixed C build
    /// beside an HTTP server under load) runs rounds of windows alternating
    /// no sensor, vigil (`--events-json`, detection and capture on) and any
    /// `--compare` command. Reports op/s ratios against the no-sensor
    /// windows, sensor CPU (% of a core, us per event) and peak RSS, BPF
    /// kernel time per op (`--bpf-stats`), events received and dropped per
    /// kind, detection latency p50/p99 (a probe runs a program from a hidden
    /// directory), shipping to a local collector (`--ship`). Writes
    /// <out>/bench.json and bench.md; `--record LABEL` appends the table to
    /// BENCHMARKS.md. Every wait is bounded.
    Bench(bench::BenchArgs),

    /// Fuzz vigil's parsers of untrusted input (cargo fuzz, nightly)
    ///
    /// Installs cargo-fuzz if missing, builds the targets of fuzz/ (the
    /// kernel record decoder, the bundle reader, ingest's protobuf handlers
    /// with the store and the incident views, the agent-JSON conversion, the
    /// Sigma rule and configuration loaders) and runs each for --seconds
    /// from the committed corpus (fuzz/corpus, fuzz/regressions); new
    /// inputs go to target/fuzz/corpus, crashes to target/fuzz/artifacts.
    /// Prints runs per target; fails on any crash, hang or leak.
    Fuzz(fuzz::FuzzArgs),

    /// Run behaviour scenarios against the agent (needs root)
    ///
    /// Builds the agent and the runner, then for each directory (default:
    /// tests/scenarios; any directory with attack/, benign/ and lib.sh works):
    /// learns a baseline while the benign scenarios run, then runs every
    /// scenario against it. Benign ones must raise nothing, attack ones every
    /// `# expect:` line. Prints a table and `N passed, N failed`; exits
    /// non-zero on any failure.
    Scenarios {
        /// Scenario directory (repeatable).
        #[arg(long)]
        dir: Vec<PathBuf>,
        /// Where the agents' output goes.
        #[arg(long, default_value = "target/scenarios")]
        work: PathBuf,
        /// Ship to a real collector started for the run: every attack
        /// scenario must also yield a verified evidence bundle there, the
        /// bundles one unbroken chain, each detection stored once.
        #[arg(long)]
        collector: bool,
        /// Kill that collector after the first attack scenario and restart
        /// it this many seconds after the last (implies --collector).
        #[arg(long, value_name = "SECS")]
        outage: Option<u64>,
    },

    /// Render and validate the Kubernetes manifests (deploy/kubernetes)
    ///
    /// Renders the kustomize base and every overlay with `kubectl kustomize`,
    /// validates every document with `kubernetes-validate --strict` against
    /// Kubernetes 1.32.0, and checks the invariants the design depends on:
    /// the agent DaemonSet's hostPID, tolerations, preStop `resume-frozen`,
    /// probes, no CPU limit, host mounts; the least-privilege overlay's exact
    /// capability list; the unprivileged collector. With the agent and
    /// collector binaries (VIGIL_AGENT_BIN, VIGIL_COLLECTOR_BIN, else
    /// target/debug) also the config and flags against them and
    /// `make-pki-secrets.sh` for real. Needs kubectl and kubernetes-validate
    /// in PATH; no cluster. Prints `N passed, N failed`.
    DeployCheck,

    /// Run the manifests' own pods under podman and detect an attack (root)
    ///
    /// Renders the least-privilege overlay, makes the PKI Secrets with
    /// `make-pki-secrets.sh`, translates the collector StatefulSet's and the
    /// agent DaemonSet's pod templates field by field into `podman run`
    /// (hostPID, securityContext, capabilities, volumes, subPath, env from
    /// the downward API, resources; an unknown field fails the run), starts
    /// them from the images `cargo xtask image` built, runs their probes,
    /// then checks: the agent's PID namespace is the host's, its
    /// capabilities are within the overlay's list, a host process and an
    /// attack in another podman container are detected at the collector
    /// with that container's name and image, the container's evidence
    /// bundle downloads verified, preStop runs, the agent stops cleanly.
    /// Why not `podman kube play` and what cannot be honoured here: see
    /// xtask/src/podrun.rs. Prints `N passed, N failed`.
    PodRun,

    /// Build the agent and collector OCI images with podman (offline)
    ///
    /// From `scratch`: the binaries in /usr/bin, exactly the shared
    /// libraries `ldd` lists, a minimal /etc (root and nobody); labels with
    /// version, source and licence; the collector runs as 65534. Uses the
    /// project's deploy/podman/containers.conf. Tags `vigil-agent:VERSION`
    /// and `vigil-collector:VERSION`, prints each image's size.
    Image(image::ImageArgs),

    /// Build the Debian packages vigil-agent and vigil-collector
    ///
    /// Runs setup and `cargo build --release -p vigil-agent -p
    /// vigil-collector --bins` (unless --no-build), then stages each package
    /// (stripped binaries in /usr/bin, the units from deploy/systemd,
    /// conffiles, maintainer scripts and docs from deploy/debian, manual
    /// pages generated from --help) and builds
    /// target/debian/vigil-{agent,collector}_VERSION_amd64.deb with
    /// `dpkg-deb --build`. With --check, tests them and prints `N passed, N
    /// failed`: contents and modes, conffiles, maintainer scripts (sh -n,
    /// shellcheck), the packaged agent.toml against the agent, the units'
    /// command lines, `systemd-analyze verify` and `security --offline`
    /// (exposure score), lintian (no error), and as root install, upgrade,
    /// remove and purge with `dpkg --root` in a throwaway root (the
    /// maintainer scripts run there through $DPKG_ROOT; the collector is
    /// started as its new user on the PKI the postinst made).
    Package {
        /// Package the release binaries (the default).
        #[arg(long, conflicts_with = "debug")]
        release: bool,
        /// Package the debug binaries instead (what `xtask test` does).
        #[arg(long)]
        debug: bool,
        /// Test the packages after building them.
        #[arg(long)]
        check: bool,
        /// Package the binaries already built (no setup, no cargo build).
        #[arg(long)]
        no_build: bool,
    },

    /// Install and run the Debian packages in VMs booted with Debian's kernels (root)
    ///
    /// Makes (once, cached in target/vm/image) a Debian 12 image with
    /// debootstrap and Debian's kernel packages (6.1 from bookworm, 6.12
    /// from bookworm-security), boots it under QEMU (software emulation
    /// unless VIGIL_VM_ACCEL=kvm) with systemd as init and, per kernel:
    /// installs the .deb files with dpkg, checks the units (is-active,
    /// systemd-analyze verify and security), a detection with its evidence
    /// bundle at the collector (downloaded and verified), the in-kernel
    /// freeze or exec deny of a server's child shell, reboots, checks the
    /// configuration and the chain of custody across the reboot, removes and
    /// purges. Prints `N passed, N failed` per kernel. The guest has no
    /// network; Debian's mirror is needed once, to make the image
    /// (VIGIL_VM_MIRROR overrides it). See xtask/src/vm.rs.
    VmTest {
        /// Kernel series: 6.1, 6.12 or all.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Package the debug binaries instead of release ones.
        #[arg(long)]
        debug: bool,
        /// Use the .deb files already in target/debian (no build).
        #[arg(long)]
        no_build: bool,
        /// Remake the VM image even when the cached one is current.
        #[arg(long)]
        rebuild_image: bool,
        /// Bound on each kernel's run, in minutes.
        #[arg(long, default_value_t = 35)]
        timeout_mins: u64,
        /// Skip the kernel-facing end-to-end tests (tests/tests/sensor.rs)
        /// the guest otherwise runs against the packaged agent.
        #[arg(long)]
        no_e2e: bool,
        /// Run only the end-to-end tests whose names contain this (a
        /// libtest filter), e.g. `io_uring`.
        #[arg(long, value_name = "SUBSTRING")]
        e2e_filter: Option<String>,
    },

    /// The benchmark's local HTTP server (internal: `bench` starts it)
    #[command(hide = true)]
    BenchServe {
        /// Accepting threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },

    /// One HTTP GET, printed (internal: `bench` scrapes the agent through
    /// it, from a process that is not the load's)
    #[command(hide = true)]
    BenchGet {
        /// host:port.
        addr: std::net::SocketAddr,
        /// Path, e.g. /metrics.
        path: String,
        /// Bound on the whole exchange.
        timeout_ms: u64,
    },

    /// Run only the exec-storm generator (no agent, no build)
    ///
    /// For calibrating the machine or checking the benchmark's plumbing.
    Storm {
        /// Duration in seconds.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Generator threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Program to spawn.
        #[arg(long, default_value = "/bin/true")]
        program: PathBuf,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(err) = dispatch(cli.command) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn dispatch(command: Cmd) -> Result<()> {
    match command {
        Cmd::Setup => setup::setup(TracefsPolicy::Require),
        Cmd::Run {
            release,
            no_collector,
            data_dir,
            agent_args,
        } => run::run(run::RunArgs {
            release,
            no_collector,
            data_dir,
            agent_args,
        }),
        Cmd::Test {
            step_timeout_mins,
            fuzz_seconds,
            cargo_test_args,
        } => test(
            Duration::from_secs(step_timeout_mins * 60),
            fuzz_seconds,
            cargo_test_args,
        ),
        Cmd::Bench(args) => bench::bench(args),
        Cmd::Fuzz(args) => fuzz::fuzz(&args),
        Cmd::BenchServe { threads } => bench::serve(threads),
        Cmd::BenchGet {
            addr,
            path,
            timeout_ms,
        } => prom::bench_get(addr, &path, timeout_ms),
        Cmd::Image(args) => image::image(args),
        Cmd::DeployCheck => deploy::deploy_check(),
        Cmd::PodRun => podrun::pod_run(),
        Cmd::Package {
            release: _,
            debug,
            check,
            no_build,
        } => package::package(&package::PackageArgs {
            release: !debug,
            check,
            no_build,
        }),
        Cmd::Scenarios {
            dir,
            work,
            collector,
            outage,
        } => scenarios(dir, work, collector, outage),
        Cmd::VmTest {
            kernel,
            debug,
            no_build,
            rebuild_image,
            timeout_mins,
            no_e2e,
            e2e_filter,
        } => vm::vm_test(&vm::VmTestArgs {
            kernel,
            debug,
            no_build,
            rebuild_image,
            timeout: Duration::from_secs(timeout_mins * 60),
            e2e: !no_e2e,
            e2e_filter,
        }),
        Cmd::Storm {
            seconds,
            threads,
            program,
        } => bench::storm_only(seconds, threads, &program),
    }
}

fn build_agent(release: bool, timeout: Duration) -> util::StepResult {
    let mut cmd = util::cargo();
    cmd.args(["build", "-p", "vigil-agent"]);
    if release {
        cmd.arg("--release");
    }
    let name = if release {
        "build agent (release)"
    } else {
        "build agent (debug)"
    };
    util::run_step(name, &mut cmd, timeout)
}

fn scenarios(
    dirs: Vec<PathBuf>,
    work: PathBuf,
    collector: bool,
    outage: Option<u64>,
) -> Result<()> {
    if !util::is_root() {
        bail!("scenarios load eBPF programs and run attack simulations: run this as root");
    }
    setup::setup(TracefsPolicy::BestEffort)?;
    let timeout = Duration::from_secs(45 * 60);
    let step = build_agent(false, timeout);
    if !step.ok {
        bail!("building vigil-agent failed: {}", step.detail);
    }
    let mut cmd = util::cargo();
    cmd.args(["build", "-p", "vigil-tests", "--bin", "vigil-scenarios"]);
    if collector || outage.is_some() {
        cmd.args(["-p", "vigil-collector", "--bins"]);
    }
    let step = util::run_step("build scenario runner", &mut cmd, timeout);
    if !step.ok {
        bail!("building the scenario runner failed: {}", step.detail);
    }
    let root = util::workspace_root();
    let mut cmd = Command::new(util::target_dir().join("debug/vigil-scenarios"));
    cmd.env("VIGIL_AGENT_BIN", util::agent_bin(false));
    let dirs = if dirs.is_empty() {
        vec![root.join("tests/scenarios")]
    } else {
        dirs
    };
    for d in dirs {
        cmd.arg("--dir").arg(d);
    }
    cmd.arg("--work").arg(root.join(work));
    if collector {
        cmd.arg("--collector");
    }
    if let Some(secs) = outage {
        cmd.arg("--outage").arg(secs.to_string());
    }
    let status = cmd.status().context("running vigil-scenarios")?;
    if !status.success() {
        bail!("scenarios failed");
    }
    Ok(())
}

/// The kernel `xtask test` boots in its VM step: the oldest one vigil is
/// proven on (its verifier is the strictest).
const CI_VM_KERNEL: &str = "6.1";

fn test(step_timeout: Duration, fuzz_seconds: u64, cargo_test_args: Vec<String>) -> Result<()> {
    if !util::is_root() {
        eprintln!("warning: not root: the end-to-end tests load eBPF programs and need root");
    }
    disk::preflight();
    let mut steps = Vec::new();
    let setup_start = std::time::Instant::now();
    let prepared =
        setup::setup(TracefsPolicy::BestEffort).and_then(|_| setup::ensure_lint_components());
    steps.push(util::StepResult {
        name: "setup".into(),
        ok: prepared.is_ok(),
        detail: prepared
            .as_ref()
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default(),
        elapsed: setup_start.elapsed(),
    });
    if let Err(err) = prepared {
        eprintln!("error: {err:#}");
        return util::summarize(&steps);
    }

    let build = build_agent(false, step_timeout);
    let built = build.ok;
    steps.push(build);
    if !built {
        return util::summarize(&steps);
    }

    let agent = util::agent_bin(false);
    disk::report("cargo test");
    let mut cmd = util::cargo();
    // Every test binary runs even after one failed: one run shows them all.
    cmd.args(["test", "--no-fail-fast"]);
    // `-p`/`--package` narrows the run: then --workspace would conflict.
    let narrowed = cargo_test_args
        .iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "-p" || a.starts_with("--package") || a.starts_with("-p"));
    if !narrowed {
        cmd.arg("--workspace");
    }
    cmd.args(&cargo_test_args).env("VIGIL_AGENT_BIN", &agent);
    steps.push(util::run_step("cargo test", &mut cmd, step_timeout));
    if util::interrupted() {
        return util::summarize(&steps);
    }

    let mut cmd = util::cargo();
    cmd.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    steps.push(util::run_step("cargo clippy", &mut cmd, step_timeout));
    if util::interrupted() {
        return util::summarize(&steps);
    }

    let mut cmd = util::cargo();
    cmd.args(["fmt", "--all", "--", "--check"]);
    steps.push(util::run_step("cargo fmt --check", &mut cmd, step_timeout));
    if util::interrupted() {
        return util::summarize(&steps);
    }
    // The test executables were run; only vm-test's guest runs some again.
    if disk::reclaim_enabled() && !narrowed {
        if let Err(e) = disk::remove_test_executables(
            &[("VIGIL_AGENT_BIN", agent.as_os_str())],
            &cargo_test_args,
            &[vm::GUEST_TESTS, &[vm::POWER_CUT_TEST]].concat(),
        ) {
            eprintln!("warning: reclaiming the test executables: {e:#}");
        }
    }

    // Each parser of untrusted input, fuzzed briefly from its corpus.
    if fuzz_seconds > 0 {
        disk::report("fuzz");
        steps.push(util::fn_step(
            &format!("fuzz ({fuzz_seconds} s per target)"),
            || {
                fuzz::fuzz(&fuzz::FuzzArgs {
                    seconds: fuzz_seconds,
                    target: Vec::new(),
                    max_len: 65536,
                })
            },
        ));
    }
    if disk::reclaim_enabled() {
        disk::remove_dir("the fuzz targets' build", &fuzz::build_dir());
        // The host side of that build (build scripts, proc macros): no
        // later step of a test run builds in release.
        disk::remove_dir(
            "the fuzz build's host artifacts",
            &util::target_dir().join("release"),
        );
    }
    if util::interrupted() {
        return util::summarize(&steps);
    }

    // The Kubernetes manifests, against the binaries `cargo test` built.
    println!("==> deploy-check");
    steps.push(util::fn_step("deploy-check", deploy::deploy_check));
    if util::interrupted() {
        return util::summarize(&steps);
    }

    // The Debian packages, from the debug binaries the steps above built
    // (a release build would take minutes more).
    println!("==> package --check (debug binaries)");
    // A narrowed `cargo test` may not have built the collector's binaries.
    let have_bins = ["vigil-agent", "vigil-collector", "vigil"]
        .iter()
        .all(|b| util::is_executable(&util::bin_path(b, false)));
    steps.push(util::fn_step("package --check", || {
        package::package_after_setup(&package::PackageArgs {
            release: false,
            check: true,
            no_build: have_bins,
        })
        .map(drop)
    }));

    // The OCI images, from the debug binaries `cargo test` used (a release
    // build would double the CI time; `cargo xtask image` makes release ones).
    println!("==> images");
    let images = util::fn_step("images", || {
        image::image(image::ImageArgs {
            debug: true,
            no_build: have_bins,
        })
    });
    let have_images = images.ok;
    steps.push(images);
    if util::interrupted() {
        return util::summarize(&steps);
    }

    // Those images, run from the manifests' own pod templates.
    if have_images {
        steps.push(util::fn_step("pod-run", podrun::pod_run));
    }
    if util::interrupted() {
        return util::summarize(&steps);
    }

    // The packages `package --check` built, installed and run in a Debian
    // VM on one of Debian's kernels (`cargo xtask vm-test --kernel all`
    // runs every one).
    disk::report("vm-test");
    println!("==> vm-test --kernel {CI_VM_KERNEL} (the debug packages)");
    steps.push(util::fn_step(&format!("vm-test {CI_VM_KERNEL}"), || {
        vm::vm_test(&vm::VmTestArgs {
            kernel: CI_VM_KERNEL.into(),
            debug: true,
            no_build: true,
            rebuild_image: false,
            // Both boots, emulated: about 20 min here, more on a slower
            // CI machine (a run once needed more than 25).
            timeout: Duration::from_secs(35 * 60),
            e2e: true,
            e2e_filter: None,
        })
    }));

    util::summarize(&steps)
}
