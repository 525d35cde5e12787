//! `cargo xtask package`: the Debian packages `vigil-agent` and
//! `vigil-collector`, built with plain `dpkg-deb --build` from a tree staged
//! here (no cargo-deb: see README, "Installing on a VM").
//!
//! What goes in each package is in [`PACKAGES`]; the files themselves are in
//! `deploy/systemd/` (the units) and `deploy/debian/` (control templates,
//! maintainer scripts, conffiles, copyright, changelog, README.Debian,
//! lintian overrides). Manual pages are generated from the built binaries'
//! `--help` (every subcommand's too). Binaries are stripped the way
//! dh_strip does; `Depends:` comes from `dpkg-shlibdeps`.
//!
//! `--check` then tests the packages for real and prints `N passed, N
//! failed`: the contents and their modes, the conffiles, the maintainer
//! scripts (`sh -n`, shellcheck), the packaged agent.toml against the agent,
//! the units' command lines against the binaries, `systemd-analyze verify`
//! and `security --offline` (exposure score), lintian (no error), and (as
//! root) install, upgrade, remove and purge with `dpkg --root` in a
//! throwaway root, maintainer scripts included (they honour `$DPKG_ROOT`),
//! with the collector started as its new user on the PKI the postinst made.

use std::collections::BTreeSet;
use std::io::{BufRead as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::util;

/// The Debian revision appended to the workspace version.
pub const DEB_REVISION: &str = "1";
pub const MAINTAINER: &str = "vigil maintainers <vigil-maintainers@example.invalid>";
/// The license `deploy/debian/copyright` is written for (the workspace's).
const LICENSE: &str = "Apache-2.0";
/// Highest `systemd-analyze security` exposure accepted (measured with
/// systemd 252: agent 3.9, collector 1.2).
const EXPOSURE_MAX: &[(&str, f64)] = &[("vigil-agent", 4.5), ("vigil-collector", 2.0)];

const QUERY: Duration = Duration::from_secs(120);

/// The agent unit's bounding set, exactly (its comments say why each):
/// SECURITY.md's runtime set plus what loading needs.
const AGENT_BOUNDING_SET: &[&str] = &[
    "CAP_BPF",
    "CAP_PERFMON",
    "CAP_SYS_ADMIN",
    "CAP_SYS_PTRACE",
    "CAP_KILL",
    "CAP_DAC_READ_SEARCH",
    "CAP_SETPCAP",
];

pub struct PackageArgs {
    /// Package the release binaries (else debug).
    pub release: bool,
    /// Run the checks after building.
    pub check: bool,
    /// Use the binaries already in target/{debug,release}.
    pub no_build: bool,
}

/// One binary package.
struct Pkg {
    name: &'static str,
    /// Binaries in /usr/bin, with their manual page section.
    bins: &'static [(&'static str, u8)],
    unit: &'static str,
    /// (file in deploy/debian, installed path): conffiles.
    conffiles: &'static [(&'static str, &'static str)],
    /// Directories shipped even when empty.
    dirs: &'static [&'static str],
}

const PACKAGES: &[Pkg] = &[
    Pkg {
        name: "vigil-agent",
        bins: &[("vigil-agent", 8)],
        unit: "vigil-agent.service",
        conffiles: &[
            ("agent.toml", "etc/vigil/agent.toml"),
            ("vigil-agent.logrotate", "etc/logrotate.d/vigil-agent"),
        ],
        dirs: &[],
    },
    Pkg {
        name: "vigil-collector",
        bins: &[("vigil-collector", 8), ("vigil", 1)],
        unit: "vigil-collector.service",
        conffiles: &[("collector.env", "etc/vigil/collector/collector.env")],
        dirs: &["etc/vigil/collector"],
    },
];

/// What `FILES` in each manual page says.
fn man_files(bin: &str) -> &'static str {
    match bin {
        "vigil-agent" => {
            "/etc/vigil/agent.toml          configuration (every key with its default)\n\
             /lib/systemd/system/vigil-agent.service   the unit (every setting commented)\n\
             /var/lib/vigil                  capture/, spool/, baseline (0700)\n\
             /var/log/vigil                  detections.jsonl, evidence.jsonl (0700)\n\
             /sys/fs/bpf/vigil               the frozen-process ledger\n\
             /etc/vigil/pki                  ca.pem, agents/NAME.pem, agents/NAME.key"
        }
        "vigil-collector" => {
            "/etc/vigil/collector/collector.env   addresses and store of the unit\n\
             /lib/systemd/system/vigil-collector.service   the unit (every setting commented)\n\
             /etc/vigil/pki                  the PKI (init-pki)\n\
             /var/lib/vigil-collector        database, evidence, ui-token (0700)"
        }
        _ => "/etc/vigil/pki                  ca.pem, analysts/NAME.pem, analysts/NAME.key",
    }
}

struct Built {
    pkg: &'static Pkg,
    deb: PathBuf,
}

pub fn package(args: &PackageArgs) -> Result<()> {
    if !args.no_build {
        crate::setup::setup(crate::setup::TracefsPolicy::BestEffort)?;
    }
    package_after_setup(args).map(drop)
}

/// [`package`] without `setup` (`xtask test` ran it already). Returns the
/// .deb files built.
pub fn package_after_setup(args: &PackageArgs) -> Result<Vec<PathBuf>> {
    if !args.no_build {
        util::build_binaries(args.release, QUERY * 30)?;
    }
    let bin_dir = util::target_dir().join(if args.release { "release" } else { "debug" });
    let out = util::target_dir().join("debian");
    let start = Instant::now();
    let (version, built) = build_all(&bin_dir, &out, args.release)?;
    for b in &built {
        println!("==> package: {}", b.deb.display());
    }
    println!(
        "==> package: version {version} ({} binaries) in {:.1} s",
        if args.release { "release" } else { "debug" },
        start.elapsed().as_secs_f64()
    );
    if args.check {
        check_all(&built, &bin_dir, &out, &version)?;
    }
    Ok(built.into_iter().map(|b| b.deb).collect())
}

fn deploy_dir() -> PathBuf {
    util::workspace_root().join("deploy")
}

fn run_output(cmd: &mut Command) -> Result<String> {
    let shown = util::display_cmd(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}{}",
            util::describe_status(out.status),
            String::from_utf8_lossy(&out.stdout).trim_end(),
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `vigil-agent --version` is "vigil-agent 0.1.0".
fn upstream_version(bin: &Path) -> Result<String> {
    let out = run_output(Command::new(bin).arg("--version"))?;
    out.split_whitespace()
        .nth(1)
        .map(String::from)
        .with_context(|| format!("no version in `{} --version`: {out:?}", bin.display()))
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// Creates `dir` and its missing parents below `stage`, 0755.
fn mkdirs(stage: &Path, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut d = dir.to_path_buf();
    while d.starts_with(stage) && d != stage {
        set_mode(&d, 0o755)?;
        d.pop();
    }
    Ok(())
}

fn install(stage: &Path, src: &Path, dest: &str, mode: u32) -> Result<PathBuf> {
    let to = stage.join(dest);
    mkdirs(stage, to.parent().expect("a file path"))?;
    std::fs::copy(src, &to)
        .with_context(|| format!("copying {} to {}", src.display(), to.display()))?;
    set_mode(&to, mode)?;
    Ok(to)
}

fn write(stage: &Path, dest: &str, data: &[u8], mode: u32) -> Result<PathBuf> {
    let to = stage.join(dest);
    mkdirs(stage, to.parent().expect("a file path"))?;
    std::fs::write(&to, data).with_context(|| format!("writing {}", to.display()))?;
    set_mode(&to, mode)?;
    Ok(to)
}

/// `gzip -9n` (no name, no timestamp: reproducible).
fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut child = Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run gzip")?;
    let mut stdin = child.stdin.take().expect("piped");
    let input = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output()?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("gzip writer panicked"))??;
    if !out.status.success() {
        bail!("gzip failed");
    }
    Ok(out.stdout)
}

fn build_all(bin_dir: &Path, out: &Path, release: bool) -> Result<(String, Vec<Built>)> {
    for tool in ["dpkg-deb", "dpkg-shlibdeps", "strip", "gzip"] {
        if util::which(tool).is_none() {
            bail!("{tool} not found in PATH (Debian: apt-get install dpkg-dev binutils gzip)");
        }
    }
    let agent = bin_dir.join("vigil-agent");
    let upstream = upstream_version(&agent)?;
    for (bin, _) in PACKAGES.iter().flat_map(|p| p.bins) {
        let v = upstream_version(&bin_dir.join(bin))?;
        if v != upstream {
            bail!("{bin} is version {v}, vigil-agent {upstream}: build them together");
        }
    }
    let version = format!("{upstream}-{DEB_REVISION}");
    let changelog = std::fs::read_to_string(deploy_dir().join("debian/changelog"))
        .context("reading deploy/debian/changelog")?;
    let top = changelog.lines().next().unwrap_or_default();
    if !top.starts_with(&format!("vigil ({version}) ")) {
        bail!(
            "deploy/debian/changelog's newest entry is {top:?}, the packages are {version}: \
             add an entry for {version} (or bump DEB_REVISION in xtask/src/package.rs)"
        );
    }
    let _ = std::fs::remove_dir_all(out);
    let work = out.join("build");
    mkdirs(out, &work.join("debian"))?;
    // dpkg-shlibdeps wants a debian/control naming the packages.
    let mut control = String::from("Source: vigil\n");
    for p in PACKAGES {
        control.push_str(&format!("\nPackage: {}\nArchitecture: amd64\n", p.name));
    }
    std::fs::write(work.join("debian/control"), control)?;
    let mut built = Vec::new();
    for pkg in PACKAGES {
        let stage = work.join("debian").join(pkg.name);
        let deb = out.join(format!("{}_{version}_amd64.deb", pkg.name));
        stage_package(pkg, bin_dir, &work, &stage, &version, &changelog)?;
        let mut cmd = Command::new("dpkg-deb");
        cmd.args(["--root-owner-group", "-Zxz"])
            .arg(if release { "-z6" } else { "-z1" })
            .arg("--build")
            .arg(&stage)
            .arg(&deb);
        run_output(&mut cmd)?;
        built.push(Built { pkg, deb });
    }
    Ok((version, built))
}

fn stage_package(
    pkg: &'static Pkg,
    bin_dir: &Path,
    work: &Path,
    stage: &Path,
    version: &str,
    changelog: &str,
) -> Result<()> {
    let deb = deploy_dir().join("debian");
    mkdirs(work, stage)?;
    let doc = format!("usr/share/doc/{}", pkg.name);
    let mut stripped = Vec::new();
    for (bin, section) in pkg.bins {
        let src = bin_dir.join(bin);
        let dest = stage.join("usr/bin").join(bin);
        mkdirs(stage, dest.parent().expect("usr/bin"))?;
        // What dh_strip does for executables.
        let mut cmd = Command::new("strip");
        cmd.args([
            "--remove-section=.comment",
            "--remove-section=.note",
            "--strip-unneeded",
            "-o",
        ])
        .arg(&dest)
        .arg(&src);
        run_output(&mut cmd)?;
        set_mode(&dest, 0o755)?;
        stripped.push(dest);
        let page = man_page(&src, bin, *section, version)?;
        write(
            stage,
            &format!("usr/share/man/man{section}/{bin}.{section}.gz"),
            &gzip(page.as_bytes())?,
            0o644,
        )?;
    }
    install(
        stage,
        &deploy_dir().join("systemd").join(pkg.unit),
        &format!("lib/systemd/system/{}", pkg.unit),
        0o644,
    )?;
    for (src, dest) in pkg.conffiles {
        install(stage, &deb.join(src), dest, 0o644)?;
    }
    for d in pkg.dirs {
        mkdirs(stage, &stage.join(d))?;
    }
    install(
        stage,
        &deb.join("copyright"),
        &format!("{doc}/copyright"),
        0o644,
    )?;
    install(
        stage,
        &deb.join(format!("{}.README.Debian", pkg.name)),
        &format!("{doc}/README.Debian"),
        0o644,
    )?;
    write(
        stage,
        &format!("{doc}/changelog.Debian.gz"),
        &gzip(changelog.as_bytes())?,
        0o644,
    )?;
    let overrides = deb.join(format!("{}.lintian-overrides", pkg.name));
    if overrides.exists() {
        install(
            stage,
            &overrides,
            &format!("usr/share/lintian/overrides/{}", pkg.name),
            0o644,
        )?;
    }

    // Control area.
    let depends = shlibs_depends(work, pkg.name, &stripped)?;
    let installed_kib = installed_size(stage)?;
    let template = std::fs::read_to_string(deb.join(format!("{}.control", pkg.name)))?;
    let control = template
        .replace("@VERSION@", version)
        .replace("@MAINTAINER@", MAINTAINER)
        .replace("@INSTALLED_SIZE@", &installed_kib.to_string())
        .replace("@SHLIBS_DEPENDS@", &depends);
    if [
        "@VERSION@",
        "@MAINTAINER@",
        "@INSTALLED_SIZE@",
        "@SHLIBS_DEPENDS@",
    ]
    .iter()
    .any(|p| control.contains(p))
    {
        bail!("{}.control: a placeholder is left: {control}", pkg.name);
    }
    write(stage, "DEBIAN/control", control.as_bytes(), 0o644)?;
    let conffiles: String = pkg
        .conffiles
        .iter()
        .map(|(_, dest)| format!("/{dest}\n"))
        .collect();
    write(stage, "DEBIAN/conffiles", conffiles.as_bytes(), 0o644)?;
    for script in ["postinst", "prerm", "postrm"] {
        install(
            stage,
            &deb.join(format!("{}.{script}", pkg.name)),
            &format!("DEBIAN/{script}"),
            0o755,
        )?;
    }
    let md5sums = md5sums(stage)?;
    write(stage, "DEBIAN/md5sums", md5sums.as_bytes(), 0o644)?;
    set_mode(&stage.join("DEBIAN"), 0o755)?;
    Ok(())
}

/// `Depends:` for the ELF files, from `dpkg-shlibdeps`.
fn shlibs_depends(work: &Path, pkg: &str, bins: &[PathBuf]) -> Result<String> {
    let mut cmd = Command::new("dpkg-shlibdeps");
    cmd.current_dir(work).arg("-O");
    // The package's own files, relative to `work` (found in its directory).
    for b in bins {
        cmd.arg(b.strip_prefix(work).unwrap_or(b));
    }
    let out = run_output(&mut cmd)?;
    out.lines()
        .find_map(|l| {
            l.split_once("shlibs:Depends=")
                .map(|(_, d)| d.trim().to_string())
        })
        .filter(|d| !d.is_empty())
        .with_context(|| format!("dpkg-shlibdeps printed no shlibs:Depends for {pkg}: {out:?}"))
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let p = e.path();
        files.push(p.clone());
        if e.file_type()?.is_dir() {
            walk(&p, files)?;
        }
    }
    Ok(())
}

/// Like dpkg-gencontrol: KiB of every file rounded up, plus one per
/// directory.
fn installed_size(stage: &Path) -> Result<u64> {
    let mut all = Vec::new();
    walk(stage, &mut all)?;
    let mut kib = 0;
    for p in all.iter().filter(|p| !p.starts_with(stage.join("DEBIAN"))) {
        let m = std::fs::symlink_metadata(p)?;
        kib += if m.is_file() {
            m.len().div_ceil(1024)
        } else {
            1
        };
    }
    Ok(kib)
}

fn md5sums(stage: &Path) -> Result<String> {
    let mut all = Vec::new();
    walk(stage, &mut all)?;
    let files: Vec<PathBuf> = all
        .into_iter()
        .filter(|p| !p.starts_with(stage.join("DEBIAN")) && p.is_file())
        .map(|p| p.strip_prefix(stage).expect("below stage").to_path_buf())
        .collect();
    let mut cmd = Command::new("md5sum");
    cmd.current_dir(stage).args(&files);
    run_output(&mut cmd)
}

// ---------------------------------------------------------------------------
// Manual pages from --help.

/// Subcommand names from a clap help text ("Commands:" section, without
/// "help").
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .filter(|c| c != "help")
        .collect()
}

/// Text for a `.nf` block: backslashes escaped, no line read as a request.
fn roff_escape(text: &str) -> String {
    text.lines()
        .map(|l| {
            let l = l.replace('\\', "\\e");
            if l.starts_with('.') || l.starts_with('\'') {
                format!("\\&{l}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect()
}

fn help_of(bin: &Path, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(bin);
    cmd.args(args).arg("--help").env_clear();
    run_output(&mut cmd)
}

fn man_page(bin: &Path, name: &str, section: u8, version: &str) -> Result<String> {
    let help = help_of(bin, &[])?;
    let summary = help.lines().next().unwrap_or(name).trim();
    let summary = summary
        .strip_prefix(&format!("{name}: "))
        .or_else(|| summary.strip_prefix("vigil: "))
        .unwrap_or(summary);
    let title = name.to_uppercase();
    let mut page = format!(
        ".TH {title} {section} \"\" \"vigil {version}\" \"vigil\"\n\
         .SH NAME\n{name} \\- {}\n\
         .SH DESCRIPTION\n\
         The text of \\fB{name} \\-\\-help\\fR, then that of every command.\n\
         .PP\n.nf\n{}.fi\n",
        roff_escape(summary).trim_end(),
        roff_escape(&help)
    );
    // Commands, then their commands (vigil incidents list, ...).
    let mut queue: Vec<Vec<String>> = subcommands(&help).into_iter().map(|c| vec![c]).collect();
    let mut i = 0;
    while i < queue.len() {
        let path = queue[i].clone();
        let args: Vec<&str> = path.iter().map(String::as_str).collect();
        let sub = help_of(bin, &args)?;
        page.push_str(&format!(
            ".SH \"{} {}\"\n.nf\n{}.fi\n",
            name.to_uppercase(),
            path.join(" ").to_uppercase(),
            roff_escape(&sub)
        ));
        if path.len() < 2 {
            for (k, c) in subcommands(&sub).into_iter().enumerate() {
                let mut p = path.clone();
                p.push(c);
                queue.insert(i + 1 + k, p);
            }
        }
        i += 1;
    }
    page.push_str(&format!(
        ".SH FILES\n.nf\n{}\n.fi\n.SH SEE ALSO\n",
        roff_escape(man_files(name)).trim_end()
    ));
    let see: Vec<String> = [("vigil-agent", 8), ("vigil-collector", 8), ("vigil", 1)]
        .iter()
        .filter(|(n, _)| *n != name)
        .map(|(n, s)| format!(".BR {n} ({s})"))
        .collect();
    page.push_str(&see.join(",\n"));
    page.push_str(
        "\n.PP\nREADME.md and SECURITY.md of the vigil sources; \
         /usr/share/doc/vigil-agent/README.Debian, /usr/share/doc/vigil-collector/README.Debian.\n",
    );
    Ok(page)
}

// ---------------------------------------------------------------------------
// Checks.

use crate::util::Report;

/// Runs a block that returns a Result (a closure with `?` inside).
fn attempt<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    f()
}

fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        bail!("{}", msg())
    }
}

fn check_all(built: &[Built], bin_dir: &Path, out: &Path, version: &str) -> Result<()> {
    let start = Instant::now();
    println!("==> package --check");
    let mut report = Report::default();
    let root = out.join("check/root");
    let _ = std::fs::remove_dir_all(out.join("check"));
    std::fs::create_dir_all(&root)?;
    for b in built {
        check_deb(&mut report, b, version);
        let mut cmd = Command::new("dpkg-deb");
        cmd.arg("-x").arg(&b.deb).arg(&root);
        report.check(
            &format!("{}: dpkg-deb -x", b.pkg.name),
            run_output(&mut cmd).map(|_| ()),
        );
    }
    check_scripts(&mut report);
    check_agent_toml(&mut report, &bin_dir.join("vigil-agent"), &root);
    check_exec_lines(&mut report, bin_dir, &root);
    report.check(
        "copyright is for the workspace license",
        workspace_license().and_then(|l| {
            let text = std::fs::read_to_string(deploy_dir().join("debian/copyright"))?;
            ensure(
                l == LICENSE && text.contains(&format!("License: {LICENSE}\n")),
                || format!("workspace license {l:?}, copyright written for {LICENSE}"),
            )
        }),
    );
    check_systemd(&mut report, &root, &out.join("check"));
    check_lintian(&mut report, built);
    if !util::is_root() {
        report.skip(
            "install/upgrade/remove/purge (dpkg --root)",
            "not root (dpkg and the maintainer scripts chown)",
        );
    } else {
        check_dpkg_root(&mut report, built);
    }
    println!(
        "==> package --check: {} passed, {} failed{} in {:.1} s",
        report.passed,
        report.failed,
        if report.skipped > 0 {
            format!(", {} skipped", report.skipped)
        } else {
            String::new()
        },
        start.elapsed().as_secs_f64()
    );
    if report.failed > 0 {
        bail!("{} package check(s) failed", report.failed);
    }
    Ok(())
}

fn workspace_license() -> Result<String> {
    let text = std::fs::read_to_string(util::workspace_root().join("Cargo.toml"))?;
    let mut in_pkg = false;
    for l in text.lines() {
        let l = l.trim();
        if l.starts_with('[') {
            in_pkg = l == "[workspace.package]";
        } else if in_pkg {
            if let Some(v) = l.strip_prefix("license") {
                if let Some((_, v)) = v.split_once('=') {
                    return Ok(v.trim().trim_matches('"').to_string());
                }
            }
        }
    }
    bail!("no license in [workspace.package] of Cargo.toml")
}

/// One line of `dpkg-deb --contents`: (mode string, owner, path).
fn contents(deb: &Path) -> Result<Vec<(String, String, String)>> {
    let out = run_output(Command::new("dpkg-deb").arg("--contents").arg(deb))?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 6).then(|| {
                (
                    f[0].to_string(),
                    f[1].to_string(),
                    f[5..].join(" ").trim_end_matches('/').to_string(),
                )
            })
        })
        .collect())
}

fn check_deb(report: &mut Report, b: &Built, version: &str) {
    let name = b.pkg.name;
    let field = |f: &str| -> Result<String> {
        run_output(Command::new("dpkg-deb").arg("--field").arg(&b.deb).arg(f))
            .map(|s| s.trim().to_string())
    };
    report.check(
        &format!("{name}: control (Package, Version, amd64, Depends libc6)"),
        attempt(|| {
            let (p, v, a, d) = (
                field("Package")?,
                field("Version")?,
                field("Architecture")?,
                field("Depends")?,
            );
            ensure(
                p == name && v == version && a == "amd64" && d.contains("libc6"),
                || format!("Package {p} Version {v} Architecture {a} Depends {d}"),
            )
        }),
    );
    let list = match contents(&b.deb) {
        Ok(l) => l,
        Err(e) => {
            report.check(&format!("{name}: dpkg-deb --contents"), Err(e));
            return;
        }
    };
    let doc = format!("./usr/share/doc/{name}");
    let mut want: Vec<(String, &str)> = vec![
        (format!("./lib/systemd/system/{}", b.pkg.unit), "-rw-r--r--"),
        (format!("{doc}/copyright"), "-rw-r--r--"),
        (format!("{doc}/changelog.Debian.gz"), "-rw-r--r--"),
        (format!("{doc}/README.Debian"), "-rw-r--r--"),
    ];
    for (bin, section) in b.pkg.bins {
        want.push((format!("./usr/bin/{bin}"), "-rwxr-xr-x"));
        want.push((
            format!("./usr/share/man/man{section}/{bin}.{section}.gz"),
            "-rw-r--r--",
        ));
    }
    for (_, dest) in b.pkg.conffiles {
        want.push((format!("./{dest}"), "-rw-r--r--"));
    }
    for d in b.pkg.dirs {
        want.push((format!("./{d}"), "drwxr-xr-x"));
    }
    let mut problems = Vec::new();
    for (path, mode) in &want {
        match list.iter().find(|(_, _, p)| p == path) {
            None => problems.push(format!("{path} missing")),
            Some((m, _, _)) if m != mode => problems.push(format!("{path} is {m}, want {mode}")),
            _ => {}
        }
    }
    report.check(
        &format!("{name}: contents and modes ({} paths)", want.len()),
        ensure(problems.is_empty(), || problems.join("; ")),
    );
    let bad: Vec<String> = list
        .iter()
        .filter(|(m, o, _)| {
            o != "root/root"
                || m.as_bytes().get(5) == Some(&b'w')
                || m.as_bytes().get(8) == Some(&b'w')
                || m.contains('s')
                || m.contains('S')
        })
        .map(|(m, o, p)| format!("{m} {o} {p}"))
        .collect();
    report.check(
        &format!("{name}: everything root/root, nothing group/world-writable or set-id"),
        ensure(bad.is_empty(), || bad.join("; ")),
    );
    // Nothing under /var or /run is shipped: the postinst makes the
    // directories with their modes.
    let var: Vec<&String> = list
        .iter()
        .map(|(_, _, p)| p)
        .filter(|p| p.starts_with("./var") || p.starts_with("./run"))
        .collect();
    report.check(
        &format!("{name}: no /var or /run in the package"),
        ensure(var.is_empty(), || format!("{var:?}")),
    );
    let want_conf: BTreeSet<String> = b
        .pkg
        .conffiles
        .iter()
        .map(|(_, d)| format!("/{d}"))
        .collect();
    let etc_files: BTreeSet<String> = list
        .iter()
        .filter(|(m, _, p)| m.starts_with('-') && p.starts_with("./etc/"))
        .map(|(_, _, p)| p[1..].to_string())
        .collect();
    report.check(
        &format!("{name}: conffiles = every file in /etc"),
        run_output(
            Command::new("dpkg-deb")
                .arg("--info")
                .arg(&b.deb)
                .arg("conffiles"),
        )
        .and_then(|c| {
            let have: BTreeSet<String> = c.lines().map(|l| l.trim().to_string()).collect();
            ensure(have == want_conf && etc_files == want_conf, || {
                format!("conffiles {have:?}, files in /etc {etc_files:?}, want {want_conf:?}")
            })
        }),
    );
    report.check(
        &format!("{name}: postinst, prerm, postrm (0755)"),
        run_output(Command::new("dpkg-deb").arg("--info").arg(&b.deb)).and_then(|info| {
            let missing: Vec<&str> = ["postinst", "prerm", "postrm"]
                .into_iter()
                .filter(|s| {
                    // " 3019 bytes,  78 lines  *  postinst  #!/bin/sh"
                    // (`*`: executable).
                    !info.lines().any(|l| {
                        let f: Vec<&str> = l.split_whitespace().collect();
                        f.contains(&"*") && f.contains(s)
                    })
                })
                .collect();
            ensure(missing.is_empty(), || {
                format!("not listed as scripts: {missing:?}\n{info}")
            })
        }),
    );
}

fn check_scripts(report: &mut Report) {
    let dir = deploy_dir().join("debian");
    let scripts: Vec<PathBuf> = PACKAGES
        .iter()
        .flat_map(|p| {
            ["postinst", "prerm", "postrm"]
                .into_iter()
                .map(|s| dir.join(format!("{}.{s}", p.name)))
        })
        .collect();
    let mut bad = Vec::new();
    for s in &scripts {
        let ok = Command::new("sh")
            .arg("-n")
            .arg(s)
            .status()
            .map(|st| st.success())
            .unwrap_or(false);
        let text = std::fs::read_to_string(s).unwrap_or_default();
        if !ok || !text.starts_with("#!/bin/sh\n") || !text.contains("\nset -e\n") {
            bad.push(s.display().to_string());
        }
    }
    report.check(
        "maintainer scripts: #!/bin/sh, set -e, sh -n",
        ensure(bad.is_empty(), || format!("{bad:?}")),
    );
    match util::which("shellcheck") {
        None => report.skip(
            "maintainer scripts: shellcheck",
            "shellcheck not installed (apt-get install shellcheck)",
        ),
        Some(sc) => {
            let mut cmd = Command::new(sc);
            cmd.args(["-s", "sh"]).args(&scripts);
            report.check(
                "maintainer scripts: shellcheck -s sh",
                run_output(&mut cmd).map(|_| ()),
            );
        }
    }
}

/// `section.key = value` lines of `vigil-agent --print-config`.
fn print_config(agent: &Path, config: &Path) -> Result<Vec<String>> {
    let mut cmd = Command::new(agent);
    cmd.arg("--config")
        .arg(config)
        .arg("--print-config")
        .env_clear();
    Ok(qualified(&run_output(&mut cmd)?)
        .into_iter()
        .filter(|(_, _, commented)| !commented)
        .map(|(key, value, _)| format!("{key} = {value}"))
        .collect())
}

/// The settings of a sectioned TOML text, commented ones (`# key = value`)
/// included: (`section.key`, value, commented), in file order.
fn qualified(text: &str) -> Vec<(String, String, bool)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (body, commented) = match line.strip_prefix("# ") {
            Some(rest) => (rest, true),
            None => (line, false),
        };
        let Some((key, value)) = body.split_once(" = ") else {
            continue;
        };
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            continue;
        }
        out.push((format!("{section}.{key}"), value.to_string(), commented));
    }
    out
}

fn check_agent_toml(report: &mut Report, agent: &Path, root: &Path) {
    let path = root.join("etc/vigil/agent.toml");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let in_file = qualified(&text);
    report.check(
        "agent.toml: the agent loads it (-c FILE --print-config)",
        print_config(agent, &path).map(|_| ()),
    );
    // Every default the agent prints is in the file, in its section, as
    // "# key = default" or set to something else on purpose.
    let empty = root.join("../empty.toml");
    report.check(
        "agent.toml: every key the agent prints, with its default",
        std::fs::write(&empty, "")
            .map_err(Into::into)
            .and_then(|_| print_config(agent, &empty))
            .and_then(|defaults| {
                let missing: Vec<&String> = defaults
                    .iter()
                    .filter(|line| {
                        let (key, value) = line.split_once(" = ").unwrap_or_default();
                        !in_file
                            .iter()
                            .any(|(k, v, c)| k == key && (!*c || v == value))
                    })
                    .collect();
                ensure(!defaults.is_empty() && missing.is_empty(), || {
                    format!("not in agent.toml as `# key = default` in its [section]: {missing:?}")
                })
            }),
    );
    // With every commented key uncommented, the agent still loads it and
    // prints exactly the keys of the file: no key is misspelt or in the
    // wrong section, none missing (the optional ones, printed only when
    // set, included).
    let all = root.join("../agent-all.toml");
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                }) =>
            {
                format!("{rest}\n")
            }
            _ => format!("{l}\n"),
        })
        .collect();
    let file_keys: BTreeSet<String> = in_file.iter().map(|(k, _, _)| k.clone()).collect();
    report.check(
        "agent.toml: every key uncommented loads, and those are all the keys",
        std::fs::write(&all, &uncommented)
            .map_err(Into::into)
            .and_then(|_| print_config(agent, &all))
            .and_then(|lines| {
                let printed: BTreeSet<String> = lines
                    .iter()
                    .filter_map(|l| l.split(" = ").next().map(String::from))
                    .collect();
                ensure(printed == file_keys, || {
                    format!(
                        "printed but not in the file {:?}, in the file but not printed {:?}",
                        printed.difference(&file_keys).collect::<Vec<_>>(),
                        file_keys.difference(&printed).collect::<Vec<_>>()
                    )
                })
            }),
    );
}

/// `Key=value` lines of a unit file (comments and sections skipped).
fn unit_settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('[') && !l.is_empty())
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Every Exec line of both units parses with the binaries built (`--help`
/// appended: clap rejects an unknown flag or a bad value before it prints
/// help), and the addresses the collector unit sets parse.
fn check_exec_lines(report: &mut Report, bin_dir: &Path, root: &Path) {
    for pkg in PACKAGES {
        let unit = root.join("lib/systemd/system").join(pkg.unit);
        let text = std::fs::read_to_string(&unit).unwrap_or_default();
        let settings = unit_settings(&text);
        let execs: Vec<&String> = settings
            .iter()
            .filter(|(k, _)| k.starts_with("Exec"))
            .map(|(_, v)| v)
            .collect();
        report.check(
            &format!("{}: Exec lines parse with the built binaries", pkg.unit),
            attempt(|| {
                ensure(!execs.is_empty(), || "no Exec line".into())?;
                for line in &execs {
                    let words: Vec<&str> = line
                        .trim_start_matches(['-', '@', '+', '!'])
                        .split_whitespace()
                        .collect();
                    let bin = Path::new(words[0])
                        .file_name()
                        .context("no program")?
                        .to_string_lossy()
                        .into_owned();
                    ensure(words[0] == format!("/usr/bin/{bin}"), || {
                        format!("{} is not a packaged binary", words[0])
                    })?;
                    let mut cmd = Command::new(bin_dir.join(&bin));
                    cmd.args(&words[1..]).arg("--help").env_clear();
                    run_output(&mut cmd).with_context(|| line.to_string())?;
                }
                Ok(())
            }),
        );
        let addrs: Vec<(String, String)> = settings
            .iter()
            .filter(|(k, _)| k == "Environment")
            .filter_map(|(_, v)| {
                v.split_once('=')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
            })
            .collect();
        if !addrs.is_empty() {
            report.check(
                &format!("{}: Environment= addresses parse", pkg.unit),
                attempt(|| {
                    for (k, v) in &addrs {
                        ensure(k.starts_with("VIGIL_COLLECTOR_"), || {
                            format!("{k}: unexpected")
                        })?;
                        v.parse::<std::net::SocketAddr>()
                            .with_context(|| format!("{k}={v}"))?;
                    }
                    // The variables are the ones `serve` reads.
                    let help = help_of(&bin_dir.join("vigil-collector"), &["serve"])?;
                    for (k, _) in &addrs {
                        ensure(help.contains(&format!("[env: {k}=")), || {
                            format!("`vigil-collector serve` reads no {k}")
                        })?;
                    }
                    Ok(())
                }),
            );
        }
    }
    // What the README promises of the agent unit.
    let agent = std::fs::read_to_string(root.join("lib/systemd/system/vigil-agent.service"))
        .unwrap_or_default();
    let s = unit_settings(&agent);
    let get = |k: &str| -> Vec<&str> {
        s.iter()
            .filter(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    report.check(
        "vigil-agent.service: resume-frozen --include-running after stop, restart on failure",
        ensure(
            get("ExecStopPost") == ["/usr/bin/vigil-agent resume-frozen --include-running"]
                && get("Restart") == ["on-failure"]
                && get("NoNewPrivileges") == ["yes"]
                && get("ProtectProc").is_empty()
                && get("PrivatePIDs").is_empty(),
            || format!("{s:?}"),
        ),
    );
    let bounding = get("CapabilityBoundingSet");
    report.check(
        "vigil-agent.service: bounding set exactly the documented one, covering SECURITY.md's",
        crate::deploy::security_md_caps().and_then(|kept| {
            let have: BTreeSet<&str> = bounding.iter().flat_map(|v| v.split_whitespace()).collect();
            let want: BTreeSet<&str> = AGENT_BOUNDING_SET.iter().copied().collect();
            let missing: Vec<String> = kept
                .iter()
                .map(|c| format!("CAP_{c}"))
                .filter(|c| !have.contains(c.as_str()))
                .collect();
            ensure(have == want && missing.is_empty(), || {
                format!(
                    "bounding set {have:?}, want {want:?}; SECURITY.md's not in it: {missing:?}"
                )
            })
        }),
    );
    let collector =
        std::fs::read_to_string(root.join("lib/systemd/system/vigil-collector.service"))
            .unwrap_or_default();
    let c = unit_settings(&collector);
    let cget = |k: &str| -> Vec<&str> {
        c.iter()
            .filter(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    report.check(
        "vigil-collector.service: its own user, no capabilities",
        ensure(
            cget("User") == ["vigil-collector"]
                && cget("Group") == ["vigil-collector"]
                && cget("CapabilityBoundingSet") == [""]
                && cget("AmbientCapabilities") == [""]
                && cget("NoNewPrivileges") == ["yes"],
            || format!("{c:?}"),
        ),
    );
}

fn check_systemd(report: &mut Report, root: &Path, work: &Path) {
    let Some(analyze) = util::which("systemd-analyze") else {
        report.skip("systemd-analyze", "not installed (package systemd)");
        return;
    };
    // `verify --root` resolves every unit in the root: give it the host's
    // (targets, mounts, sockets) next to the packaged ones.
    let units = root.join("lib/systemd/system");
    for host in ["/lib/systemd/system", "/usr/lib/systemd/system"] {
        if let Ok(rd) = std::fs::read_dir(host) {
            for e in rd.flatten() {
                let to = units.join(e.file_name());
                if !to.exists() && e.path().is_file() {
                    let _ = std::fs::copy(e.path(), &to);
                }
            }
            break;
        }
    }
    let unit_paths: Vec<PathBuf> = PACKAGES.iter().map(|p| units.join(p.unit)).collect();
    // Documentation=man:... is checked with `man` against the packaged pages.
    let mut cmd = Command::new(&analyze);
    cmd.arg("verify")
        .arg(format!("--root={}", root.display()))
        .args(&unit_paths)
        .env("MANPATH", root.join("usr/share/man"))
        .env("SYSTEMD_COLORS", "0");
    report.check(
        "systemd-analyze verify (both units, binaries and man pages from the packages)",
        cmd.stdin(Stdio::null())
            .output()
            .map_err(Into::into)
            .and_then(|o| {
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
                ensure(o.status.success() && text.trim().is_empty(), || {
                    format!("{}: {}", util::describe_status(o.status), text.trim_end())
                })
            }),
    );
    for (pkg, path) in PACKAGES.iter().zip(&unit_paths) {
        let max = EXPOSURE_MAX
            .iter()
            .find(|(n, _)| *n == pkg.name)
            .map(|(_, m)| *m)
            .unwrap_or(5.0);
        let mut cmd = Command::new(&analyze);
        cmd.args(["security", "--offline=yes", "--no-pager"])
            .arg(format!("--root={}", root.display()))
            .arg(path)
            .env("SYSTEMD_COLORS", "0");
        let table = work.join(format!("security-{}.txt", pkg.name));
        report.check(
            &format!(
                "systemd-analyze security --offline {}: exposure <= {max}",
                pkg.unit
            ),
            cmd.stdin(Stdio::null())
                .output()
                .map_err(Into::into)
                .and_then(|o| {
                    let text = String::from_utf8_lossy(&o.stdout).into_owned();
                    let _ = std::fs::write(&table, &text);
                    let line = text
                        .lines()
                        .find(|l| l.contains("Overall exposure level"))
                        .with_context(|| {
                            format!(
                                "no exposure level in the output: {}{}",
                                text,
                                String::from_utf8_lossy(&o.stderr)
                            )
                        })?;
                    let score: f64 = line
                        .split(':')
                        .nth(1)
                        .and_then(|s| s.split_whitespace().next())
                        .and_then(|s| s.parse().ok())
                        .with_context(|| format!("cannot read the score in {line:?}"))?;
                    println!(
                        "        {} (table: {})",
                        line.trim_start_matches(['→', ' ']).trim(),
                        table.display()
                    );
                    ensure(score <= max, || format!("exposure {score} > {max}"))
                }),
        );
    }
}

fn check_lintian(report: &mut Report, built: &[Built]) {
    let Some(lintian) = util::which("lintian") else {
        report.skip(
            "lintian",
            "not installed (apt-get install lintian; .ci/run does)",
        );
        return;
    };
    for b in built {
        let mut cmd = Command::new(&lintian);
        // Errors are counted here: with --show-overrides, lintian 2.116
        // exits 2 when an overridden tag is an error (--fail-on error).
        cmd.args(["--fail-on", "none", "--show-overrides"])
            .arg(&b.deb)
            .env("LC_ALL", "C.UTF-8");
        let result = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(anyhow::Error::from)
            .and_then(|o| {
                let text = String::from_utf8_lossy(&o.stdout).into_owned();
                let tags: Vec<&str> = text.lines().filter(|l| l.contains(": ")).collect();
                let count = |p: &str| tags.iter().filter(|l| l.starts_with(p)).count();
                println!(
                    "        lintian {}: {} errors, {} warnings, {} overridden",
                    b.pkg.name,
                    count("E: "),
                    count("W: "),
                    count("O: ")
                );
                for t in &tags {
                    println!("          {t}");
                }
                ensure(o.status.success() && count("E: ") == 0, || {
                    format!(
                        "{}{}",
                        util::describe_status(o.status),
                        String::from_utf8_lossy(&o.stderr).trim_end()
                    )
                })
            });
        report.check(&format!("lintian {}: no error", b.pkg.name), result);
    }
}

// ---------------------------------------------------------------------------
// dpkg --root: install, upgrade, remove, purge in a throwaway root.

struct Root {
    dir: PathBuf,
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn dpkg(root: &Path, args: &[&std::ffi::OsStr]) -> Result<String> {
    let mut cmd = Command::new("dpkg");
    cmd.arg(format!("--root={}", root.display()))
        .args([
            "--force-script-chrootless",
            "--force-depends",
            "--force-unsafe-io",
            "--log=/dev/null",
        ])
        .args(args)
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env_remove("DPKG_ROOT");
    let shown = util::display_cmd(&cmd);
    let out = cmd.stdin(Stdio::null()).output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure(out.status.success(), || {
        format!(
            "`{shown}` failed ({}):\n{}",
            util::describe_status(out.status),
            text.trim_end()
        )
    })?;
    Ok(text)
}

fn new_root() -> Result<Root> {
    let dir = std::env::temp_dir().join(format!("vigil-deb-root.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let root = Root { dir };
    let r = &root.dir;
    for d in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
        "etc",
        "var/log",
        "usr/bin",
    ] {
        std::fs::create_dir_all(r.join(d))?;
    }
    for f in ["var/lib/dpkg/status", "var/lib/dpkg/available"] {
        std::fs::write(r.join(f), "")?;
    }
    // An account database of its own (useradd --prefix writes it).
    std::fs::write(r.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(r.join("etc/group"), "root:x:0:\n")?;
    std::fs::write(r.join("etc/shadow"), "root:*:19000:0:99999:7:::\n")?;
    std::fs::write(r.join("etc/gshadow"), "root:*::\n")?;
    set_mode(&r.join("etc/shadow"), 0o640)?;
    set_mode(&r.join("etc/gshadow"), 0o640)?;
    // The collector user must reach the PKI and data directory below it.
    set_mode(r, 0o755)?;
    Ok(root)
}

/// (uid, gid) of `user` in the root's /etc/passwd.
fn account(root: &Path, user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 7 || f[0] != user {
            return None;
        }
        Some((f[2].parse().ok()?, f[3].parse().ok()?))
    })
}

fn mode_owner(path: &Path) -> Result<(u32, u32, u32)> {
    let m =
        std::fs::symlink_metadata(path).with_context(|| format!("{} missing", path.display()))?;
    Ok((m.mode() & 0o7777, m.uid(), m.gid()))
}

fn expect_mode(path: &Path, mode: u32, uid: u32, gid: u32) -> Result<()> {
    let (m, u, g) = mode_owner(path)?;
    ensure((m, u, g) == (mode, uid, gid), || {
        format!(
            "{}: {m:o} {u}:{g}, want {mode:o} {uid}:{gid}",
            path.display()
        )
    })
}

/// Paths below `dir` whose name (below `dir`) mentions vigil.
fn find_vigil_units(dir: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    let _ = walk(dir, &mut all);
    all.into_iter()
        .filter(|p| {
            p.strip_prefix(dir)
                .is_ok_and(|rel| rel.to_string_lossy().contains("vigil"))
        })
        .collect()
}

fn check_dpkg_root(report: &mut Report, built: &[Built]) {
    let root = match new_root() {
        Ok(r) => r,
        Err(e) => {
            report.check("dpkg --root: throwaway root", Err(e));
            return;
        }
    };
    let r = root.dir.as_path();
    let debs: Vec<&std::ffi::OsStr> = built.iter().map(|b| b.deb.as_os_str()).collect();
    let mut install: Vec<&std::ffi::OsStr> = vec![std::ffi::OsStr::new("-i")];
    install.extend(&debs);
    let installed = dpkg(r, &install);
    let ok = installed.is_ok();
    report.check(
        "dpkg --root -i both packages (maintainer scripts with DPKG_ROOT)",
        installed.map(|_| ()),
    );
    if !ok {
        return;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let ids = account(r, "vigil-collector");
    report.check(
        "postinst: system user vigil-collector, no login, no home",
        attempt(|| {
            let passwd = std::fs::read_to_string(r.join("etc/passwd"))?;
            let line = passwd
                .lines()
                .find(|l| l.starts_with("vigil-collector:"))
                .context("no vigil-collector in etc/passwd")?;
            let f: Vec<&str> = line.split(':').collect();
            let uid: u32 = f[2].parse()?;
            ensure(
                uid < 1000 && f[5] == "/nonexistent" && f[6] == "/usr/sbin/nologin",
                || line.to_string(),
            )?;
            let group = std::fs::read_to_string(r.join("etc/group"))?;
            ensure(
                group.lines().any(|l| l.starts_with("vigil-collector:")),
                || "no vigil-collector group".into(),
            )
        }),
    );
    let (uid, gid) = ids.unwrap_or((u32::MAX, u32::MAX));
    let pki = r.join("etc/vigil/pki");
    report.check(
        "postinst: /var/lib/vigil, /var/log/vigil 0700 root; /var/lib/vigil-collector 0700 vigil-collector",
        expect_mode(&r.join("var/lib/vigil"), 0o700, 0, 0)
            .and_then(|_| expect_mode(&r.join("var/log/vigil"), 0o700, 0, 0))
            .and_then(|_| expect_mode(&r.join("var/lib/vigil-collector"), 0o700, uid, gid)),
    );
    report.check(
        "postinst: PKI made, server key for the collector group, CA and agent keys root's",
        expect_mode(&pki, 0o750, 0, gid)
            .and_then(|_| expect_mode(&pki.join("server.key"), 0o640, 0, gid))
            .and_then(|_| expect_mode(&pki.join("ca.key"), 0o600, 0, 0))
            .and_then(|_| expect_mode(&pki.join("ca.pem"), 0o644, 0, 0))
            .and_then(|_| expect_mode(&pki.join("agents"), 0o700, 0, 0))
            .and_then(|_| expect_mode(&pki.join(format!("agents/{host}.key")), 0o600, 0, 0))
            .and_then(|_| expect_mode(&pki.join("analysts/analyst.key"), 0o600, 0, 0)),
    );
    let wants = r.join("etc/systemd/system/multi-user.target.wants");
    report.check(
        "postinst: both units enabled (deb-systemd-helper, in the root)",
        attempt(|| {
            for pkg in PACKAGES {
                let link = std::fs::read_link(wants.join(pkg.unit))
                    .with_context(|| format!("{} not enabled", pkg.unit))?;
                ensure(
                    link == Path::new("/lib/systemd/system").join(pkg.unit),
                    || format!("{} -> {}", pkg.unit, link.display()),
                )?;
            }
            Ok(())
        }),
    );
    report.check(
        "the collector starts as vigil-collector on that PKI and data directory",
        collector_starts(r, uid, gid),
    );
    // Upgrade (the same version again: postinst configure with $2 set).
    let ca = std::fs::read(pki.join("ca.pem")).unwrap_or_default();
    report.check(
        "dpkg --root -i again (upgrade path): PKI kept, modes kept",
        dpkg(r, &install).and_then(|_| {
            ensure(
                std::fs::read(pki.join("ca.pem")).unwrap_or_default() == ca && !ca.is_empty(),
                || "ca.pem changed".into(),
            )?;
            expect_mode(&pki.join("server.key"), 0o640, 0, gid)?;
            ensure(account(r, "vigil-collector") == ids, || {
                "the account changed".into()
            })
        }),
    );
    let names: Vec<&std::ffi::OsStr> = PACKAGES
        .iter()
        .map(|p| std::ffi::OsStr::new(p.name))
        .collect();
    let mut remove: Vec<&std::ffi::OsStr> = vec![std::ffi::OsStr::new("-r")];
    remove.extend(&names);
    report.check(
        "dpkg --root -r: binaries gone; conffiles, state, PKI and user kept",
        dpkg(r, &remove).and_then(|_| {
            for gone in [
                "usr/bin/vigil-agent",
                "usr/bin/vigil-collector",
                "usr/bin/vigil",
            ] {
                ensure(!r.join(gone).exists(), || format!("{gone} still there"))?;
            }
            for kept in [
                "etc/vigil/agent.toml",
                "etc/logrotate.d/vigil-agent",
                "etc/vigil/collector/collector.env",
                "etc/vigil/pki/ca.key",
                "var/lib/vigil",
                "var/lib/vigil-collector",
            ] {
                ensure(r.join(kept).exists(), || format!("{kept} removed"))?;
            }
            ensure(account(r, "vigil-collector").is_some(), || {
                "the user was removed".into()
            })
        }),
    );
    let mut purge: Vec<&std::ffi::OsStr> = vec![std::ffi::OsStr::new("-P")];
    purge.extend(&names);
    report.check(
        "dpkg --root -P: /etc/vigil, /var/lib/vigil*, /var/log/vigil, the user and unit links gone",
        dpkg(r, &purge).and_then(|_| {
            for gone in [
                "etc/vigil",
                "etc/logrotate.d/vigil-agent",
                "var/lib/vigil",
                "var/lib/vigil-collector",
                "var/log/vigil",
            ] {
                ensure(!r.join(gone).exists(), || format!("{gone} still there"))?;
            }
            let passwd = std::fs::read_to_string(r.join("etc/passwd"))?;
            let group = std::fs::read_to_string(r.join("etc/group"))?;
            ensure(
                !passwd.contains("vigil-collector") && !group.contains("vigil-collector"),
                || "vigil-collector still in etc/passwd or etc/group".into(),
            )?;
            let left = find_vigil_units(&r.join("etc/systemd"));
            ensure(left.is_empty(), || format!("left in etc/systemd: {left:?}"))
        }),
    );
}

/// Runs `vigil-collector serve` as (uid, gid), no supplementary groups, on
/// the root's PKI and data directory: it must get to "listening on".
fn collector_starts(r: &Path, uid: u32, gid: u32) -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    ensure(uid != u32::MAX, || "no vigil-collector account".into())?;
    let bin = r.join("usr/bin/vigil-collector");
    let mut cmd = Command::new(&bin);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(r.join("var/lib/vigil-collector"))
        .arg("--pki")
        .arg(r.join("etc/vigil/pki"))
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .uid(uid)
        .gid(gid);
    // (std drops the supplementary groups when root sets a uid.)
    util::die_with_parent(&mut cmd, libc::SIGKILL);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    let result = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) if line.contains("listening on") => break Ok(()),
            Ok(line) => seen.push(line),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Ok(Some(status)) = child.try_wait() {
                    break Err(anyhow::anyhow!(
                        "exited ({}) before listening: {seen:?}",
                        util::describe_status(status)
                    ));
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let _ = child.wait();
                break Err(anyhow::anyhow!("exited before listening: {seen:?}"));
            }
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!("not listening after 20 s: {seen:?}"));
        }
    };
    let _ = child.kill();
    let out = child.wait_with_output();
    result.map_err(|e| {
        let err = out
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .unwrap_or_default();
        anyhow::anyhow!("{e:#}; stderr: {}", err.trim_end())
    })
}
