//! `cargo xtask image`: OCI images of the agent and the collector, built
//! offline with podman from `scratch`: the binaries (debug info stripped),
//! exactly the shared libraries `ldd` says they load, and a minimal /etc. No registry, no base
//! image, no package manager inside.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::util;

/// `cargo xtask image` options.
#[derive(clap::Args, Debug)]
pub struct ImageArgs {
    /// Package the debug binaries (already built by `cargo xtask test`)
    /// instead of building release ones.
    #[arg(long)]
    pub debug: bool,
    /// Do not build; use the binaries already in target/.
    #[arg(long)]
    pub no_build: bool,
}

/// One image: name, binaries in /usr/bin, the user it runs as.
struct Spec {
    name: &'static str,
    bins: &'static [&'static str],
    /// `USER` of the image (numeric; the agent starts as root and drops
    /// capabilities itself, the collector never needs root).
    user: u32,
    entrypoint: &'static str,
    description: &'static str,
}

const IMAGES: &[Spec] = &[
    Spec {
        name: "vigil-agent",
        bins: &["vigil-agent"],
        user: 0,
        entrypoint: "/usr/bin/vigil-agent",
        description: "vigil runtime security sensor: eBPF agent (DaemonSet)",
    },
    Spec {
        name: "vigil-collector",
        bins: &["vigil-collector", "vigil"],
        user: 65534,
        entrypoint: "/usr/bin/vigil-collector",
        description: "vigil collector: stores events, detections and evidence",
    },
];

/// The containers.conf the project runs podman with (see
/// ../shared/TOOLCHAIN.md: runc, no default ulimits), so that nothing of
/// the machine's own podman configuration has to change.
pub fn containers_conf() -> PathBuf {
    util::workspace_root().join("deploy/podman/containers.conf")
}

/// A podman command using the project's containers.conf.
pub fn podman() -> Command {
    let mut c = Command::new("podman");
    c.env("CONTAINERS_CONF", containers_conf());
    c
}

/// The workspace version (xtask shares it).
fn version() -> Result<String> {
    Ok(env!("CARGO_PKG_VERSION").to_string())
}

/// The workspace licence (xtask shares it).
fn license() -> String {
    env!("CARGO_PKG_LICENSE").to_string()
}

/// The shared libraries `bin` loads, as absolute paths (the dynamic loader
/// included), from `ldd`.
pub(crate) fn libraries(bin: &Path) -> Result<BTreeSet<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd (binutils/libc-bin)")?;
    if !out.status.success() {
        bail!(
            "ldd {}: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut libs = BTreeSet::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vDSO has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.insert(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// Copies `src` to `root` + its absolute path, following symlinks (the
/// image gets the file under the name the loader asks for).
pub(crate) fn copy_into(root: &Path, src: &Path) -> Result<()> {
    let dst = root.join(src.strip_prefix("/").unwrap_or(src));
    if let Some(d) = dst.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::copy(src, &dst).with_context(|| format!("copying {}", src.display()))?;
    Ok(())
}

/// Stages the root file system of `spec` under `dir/rootfs` and writes
/// `dir/Containerfile`.
fn stage(spec: &Spec, release: bool, dir: &Path, version: &str) -> Result<()> {
    let root = dir.join("rootfs");
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    std::fs::create_dir_all(root.join("usr/bin"))?;
    let mut libs = BTreeSet::new();
    for b in spec.bins {
        let src = util::bin_path(b, release);
        if !src.exists() {
            bail!(
                "{} is missing: build it (cargo build {}-p {})",
                src.display(),
                if release { "--release " } else { "" },
                if b.starts_with("vigil-agent") {
                    "vigil-agent"
                } else {
                    "vigil-collector"
                }
            );
        }
        let dst = root.join("usr/bin").join(b);
        std::fs::copy(&src, &dst)?;
        // Debug info stays in target/; the image carries the code only.
        let st = Command::new("strip")
            .arg("--strip-debug")
            .arg(&dst)
            .status()
            .context("running strip (binutils)")?;
        if !st.success() {
            bail!("strip --strip-debug {} failed", dst.display());
        }
        libs.extend(libraries(&src)?);
    }
    for l in &libs {
        copy_into(&root, l)?;
    }
    let etc = root.join("etc");
    std::fs::create_dir_all(etc.join("vigil"))?;
    std::fs::write(
        etc.join("passwd"),
        "root:x:0:0:root:/:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    )?;
    std::fs::write(etc.join("group"), "root:x:0:\nnogroup:x:65534:\n")?;
    for d in ["tmp", "var/lib"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    let containerfile = format!(
        "FROM scratch\n\
         COPY rootfs/ /\n\
         LABEL org.opencontainers.image.title=\"{name}\" \\\n      \
         org.opencontainers.image.description=\"{desc}\" \\\n      \
         org.opencontainers.image.version=\"{version}\" \\\n      \
         org.opencontainers.image.source=\"vigil source tree (built offline by cargo xtask image)\" \\\n      \
         org.opencontainers.image.licenses=\"{license}\"\n\
         USER {user}\n\
         ENTRYPOINT [\"{entry}\"]\n",
        name = spec.name,
        desc = spec.description,
        license = license(),
        user = spec.user,
        entry = spec.entrypoint,
    );
    std::fs::write(dir.join("Containerfile"), containerfile)?;
    Ok(())
}

/// Builds both images, then runs each one's binaries (`--version`) under
/// podman: the libraries staged are enough to start.
pub fn image(args: ImageArgs) -> Result<()> {
    build_images(&args)?;
    smoke()
}

/// Runs every binary of every image with `--version`.
fn smoke() -> Result<()> {
    let version = version()?;
    for spec in IMAGES {
        let tag = format!("{}:{version}", spec.name);
        for b in spec.bins {
            let mut run = podman();
            run.args(["run", "--rm", "--network=none", "--entrypoint"])
                .arg(format!("/usr/bin/{b}"))
                .args([&tag, "--version"]);
            let (st, out) = util::capture(&mut run, Duration::from_secs(120))?;
            if !st.success() || !out.contains(&version) {
                bail!("{b} in {tag} does not start: {st} {}", out.trim());
            }
            println!("==> image {tag}: /usr/bin/{b} runs ({})", out.trim());
        }
    }
    Ok(())
}

/// Builds both images; prints name, tag and size of each.
fn build_images(args: &ImageArgs) -> Result<()> {
    if util::which("podman").is_none() {
        bail!("podman is not installed (apt-get install podman runc)");
    }
    let release = !args.debug;
    if !args.no_build {
        util::build_binaries(release, Duration::from_secs(3600))?;
    }
    let version = version()?;
    let out = util::target_dir().join("image");
    let mut failed = 0;
    for spec in IMAGES {
        let dir = out.join(spec.name);
        stage(spec, release, &dir, &version)?;
        let tag = format!("{}:{version}", spec.name);
        let mut build = podman();
        build
            .args(["build", "--quiet", "--pull=never", "-t", &tag, "-f"])
            .arg(dir.join("Containerfile"))
            .arg(&dir);
        let (st, text) = util::capture(&mut build, Duration::from_secs(600))?;
        if !st.success() {
            eprintln!("==> image {tag}: podman build failed:\n{text}");
            failed += 1;
            continue;
        }
        let size = podman()
            .args(["image", "inspect", "--format", "{{.Size}}", &tag])
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0);
        println!(
            "==> image {tag}: {:.1} MB ({} profile)",
            size as f64 / 1e6,
            if release { "release" } else { "debug" }
        );
    }
    if failed > 0 {
        bail!("{failed} image(s) failed to build");
    }
    Ok(())
}
