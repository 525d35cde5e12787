//! `cargo xtask vm-test`: the Debian packages installed and run in Debian 12
//! VMs booted with Debian's own kernels, under QEMU, with systemd as init.
//!
//! The image is made once and cached in `target/vm/image/` (rebuilt when
//! [`RECIPE`] changes): `debootstrap` of bookworm into a directory, Debian's
//! kernel packages (6.1 from bookworm, 6.12 from bookworm-security) installed
//! in it with apt (so each kernel has its own initramfs made by Debian's
//! initramfs-tools and its modules in the image), a unit that runs the test
//! driver at boot, then `mkfs.ext4 -d` makes the root filesystem image from
//! the directory (no loop device, no mount). Each kernel's ELF `vmlinux` is
//! taken out of its `vmlinuz` and booted directly (`-kernel`, PVH entry: 2-3x
//! faster than the bzImage under software emulation).
//!
//! Each run boots a copy of that image with one kernel. The test driver
//! (`vm_guest.sh`, on a 9p share with the two .deb files) installs the
//! packages with dpkg, checks the units, the agent's detection -> evidence ->
//! collector chain, the in-kernel freeze or exec deny, then cuts the power
//! while a collector is under load (`echo b > /proc/sysrq-trigger`: the
//! guest's page cache is lost, QEMU is started again on the same disk),
//! checks that this collector still holds everything it acknowledged, checks
//! the chain again, removes and purges. Its results come back on the share; this side
//! prints them and `N passed, N failed` per kernel. The guest has no network
//! device: the agent and the collector talk over the guest's loopback.

use std::fs;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{package, util};

/// Bump when the image's recipe below changes: the cached image is rebuilt.
const RECIPE: &str = "vigil-vm-image v2: bookworm minbase + curl, kernels 6.1 + 6.12";

/// Debian's mirror (override with VIGIL_VM_MIRROR for a local one).
const MIRROR: &str = "http://deb.debian.org/debian";
const SECURITY_MIRROR: &str = "http://deb.debian.org/debian-security";

/// Packages of the guest beyond debootstrap's minbase: systemd as init, what
/// the maintainer scripts and the units use, and the test driver's tools
/// (busybox's nc is the test's server, jq reads the JSON lines, curl reads
/// the metrics: busybox's wget crashes on them, and bash's /dev/tcp is a
/// shell connecting out, which the agent rightly detects).
const GUEST_PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "kmod",
    "procps",
    "logrotate",
    "busybox",
    "jq",
    "curl",
];

/// The kernels, by the name `--kernel` takes and the Debian package that
/// brings them (metapackages: the newest of each series in the archive).
const KERNELS: &[(&str, &str)] = &[
    ("6.1", "linux-image-amd64"),
    ("6.12", "linux-image-6.12-amd64"),
];

/// Size of the root filesystem image (sparse).
const IMAGE_SIZE: &str = "4G";

/// The guest's test driver.
const GUEST_SCRIPT: &str = include_str!("vm_guest.sh");

pub struct VmTestArgs {
    /// "6.1", "6.12" or "all".
    pub kernel: String,
    /// Package the debug binaries (what `xtask test` does).
    pub debug: bool,
    /// Use the .deb files already in target/debian.
    pub no_build: bool,
    /// Remake the image even when the cached one is current.
    pub rebuild_image: bool,
    /// Bound on each VM run (both boots).
    pub timeout: Duration,
    /// Also run the kernel-facing end-to-end tests ([`GUEST_TESTS`]) inside
    /// each kernel, against the packaged agent.
    pub e2e: bool,
    /// Only the end-to-end tests whose names contain this.
    pub e2e_filter: Option<String>,
}

/// One bootable kernel of the image.
struct Kernel {
    /// The series `--kernel` names ("6.1").
    series: &'static str,
    /// `uname -r` ("6.1.0-57-amd64").
    release: String,
    vmlinux: PathBuf,
    initrd: PathBuf,
}

/// Outcome of one kernel's run.
struct RunResult {
    series: &'static str,
    release: String,
    passed: usize,
    failed: usize,
    skipped: usize,
    error: Option<String>,
}

pub fn vm_test(args: &VmTestArgs) -> Result<()> {
    if !util::is_root() {
        bail!("vm-test makes a Debian root with debootstrap and chroot: run it as root");
    }
    for (tool, pkg) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("debootstrap", "debootstrap"),
        ("mkfs.ext4", "e2fsprogs"),
        ("chroot", "coreutils"),
    ] {
        if util::which(tool).is_none() {
            bail!("{tool} not found in PATH (Debian: apt-get install {pkg})");
        }
    }
    let wanted: Vec<&'static str> = match args.kernel.as_str() {
        "all" => KERNELS.iter().map(|k| k.0).collect(),
        k => match KERNELS.iter().find(|(s, _)| *s == k) {
            Some((s, _)) => vec![*s],
            None => bail!(
                "unknown kernel {k:?}: one of {} or all",
                KERNELS.iter().map(|k| k.0).collect::<Vec<_>>().join(", ")
            ),
        },
    };

    let debs = if args.no_build {
        existing_debs()?
    } else {
        crate::setup::setup(crate::setup::TracefsPolicy::BestEffort)?;
        package::package_after_setup(&package::PackageArgs {
            release: !args.debug,
            check: false,
            no_build: false,
        })?
    };

    // The power-cut test always; the kernel-facing ones unless --no-e2e.
    let mut wanted_tests = vec![POWER_CUT_TEST];
    if args.e2e {
        wanted_tests.extend(GUEST_TESTS);
    }
    let e2e = guest_test_binaries(&wanted_tests)?;

    let vm_dir = util::target_dir().join("vm");
    let t = Instant::now();
    let (image, kernels) = ensure_image(&vm_dir.join("image"), args.rebuild_image)?;
    println!(
        "==> vm-test: image ready in {:.0} s",
        t.elapsed().as_secs_f64()
    );

    let mut results = Vec::new();
    for series in wanted {
        let Some(kernel) = kernels.iter().find(|k| k.series == series) else {
            bail!("the image has no {series} kernel (rebuild with --rebuild-image)");
        };
        println!("==> vm-test: kernel {} ({})", kernel.release, series);
        let t = Instant::now();
        let run_dir = vm_dir.join("run").join(series);
        let r = run_kernel(
            &image,
            kernel,
            &debs,
            &e2e,
            args.e2e_filter.as_deref(),
            &run_dir,
            args.timeout,
        );
        let r = match r {
            Ok(r) => r,
            Err(e) => RunResult {
                series,
                release: kernel.release.clone(),
                passed: 0,
                failed: 0,
                skipped: 0,
                error: Some(format!("{e:#}")),
            },
        };
        println!(
            "==> vm-test: kernel {}: {} passed, {} failed{} in {:.0} s (logs in {})",
            r.release,
            r.passed,
            r.failed,
            if r.skipped > 0 {
                format!(", {} skipped", r.skipped)
            } else {
                String::new()
            },
            t.elapsed().as_secs_f64(),
            run_dir.display()
        );
        results.push(r);
    }
    println!();
    let mut bad = Vec::new();
    for r in &results {
        match &r.error {
            Some(e) => {
                println!("{:<6} {:<24} error: {e}", r.series, r.release);
                bad.push(r.series);
            }
            None => {
                println!(
                    "{:<6} {:<24} {} passed, {} failed",
                    r.series, r.release, r.passed, r.failed
                );
                if r.failed > 0 || r.passed == 0 {
                    bad.push(r.series);
                }
            }
        }
    }
    if !bad.is_empty() {
        bail!("vm-test failed on {}", bad.join(", "));
    }
    Ok(())
}

/// The kernel-facing end-to-end tests the guest runs against the packaged
/// agent (VIGIL_AGENT_BIN=/usr/bin/vigil-agent): they need only /bin/sh,
/// echo and chmod there.
pub const GUEST_TESTS: &[&str] = &["sensor", "deny_exec"];

/// The collector's power-cut test (collector/tests/powercut.rs): the guest
/// runs its load, cuts the power during it, and checks after the reboot.
pub const POWER_CUT_TEST: &str = "powercut";

/// The binaries of test targets `names` (of vigil-tests and
/// vigil-collector), built if needed: (name, executable).
fn guest_test_binaries(names: &[&'static str]) -> Result<Vec<(&'static str, PathBuf)>> {
    let mut cmd = util::cargo();
    cmd.args([
        "test",
        "-p",
        "vigil-tests",
        "-p",
        "vigil-collector",
        "--no-run",
        "--message-format=json",
    ]);
    for t in names {
        cmd.args(["--test", t]);
    }
    let (status, out) = util::capture(&mut cmd, Duration::from_secs(1800))?;
    if !status.success() {
        bail!("building the end-to-end tests failed");
    }
    let artifacts: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact")
        .collect();
    names
        .iter()
        .map(|t| {
            artifacts
                .iter()
                .filter(|v| v["target"]["name"] == *t)
                .find_map(|v| v["executable"].as_str().map(PathBuf::from))
                .map(|p| (*t, p))
                .with_context(|| format!("cargo did not name the {t} test executable"))
        })
        .collect()
}

/// The newest vigil-agent and vigil-collector .deb in target/debian.
fn existing_debs() -> Result<Vec<PathBuf>> {
    let dir = util::target_dir().join("debian");
    let mut out = Vec::new();
    for name in ["vigil-agent", "vigil-collector"] {
        let mut found: Vec<(std::time::SystemTime, PathBuf)> = fs::read_dir(&dir)
            .with_context(|| format!("reading {} (build the packages first)", dir.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{name}_")) && n.ends_with(".deb"))
            })
            .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
            .collect();
        found.sort();
        match found.pop() {
            Some((_, p)) => out.push(p),
            None => bail!(
                "no {name}_*.deb in {} (run cargo xtask package first)",
                dir.display()
            ),
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// The image.

/// The cached image and its kernels, made when missing or stale.
fn ensure_image(dir: &Path, rebuild: bool) -> Result<(PathBuf, Vec<Kernel>)> {
    let image = dir.join("root.img");
    let stamp = dir.join("ready");
    let current = fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == RECIPE);
    if rebuild || !current || !image.exists() {
        build_image(dir)?;
        fs::write(&stamp, RECIPE)?;
    }
    let mut kernels = Vec::new();
    for (series, _) in KERNELS {
        let kdir = dir.join("kernels").join(series);
        let release = fs::read_to_string(kdir.join("release"))
            .with_context(|| format!("{}: the image is incomplete", kdir.display()))?;
        kernels.push(Kernel {
            series,
            release: release.trim().to_string(),
            vmlinux: kdir.join("vmlinux"),
            initrd: kdir.join("initrd.img"),
        });
    }
    Ok((image, kernels))
}

fn build_image(dir: &Path) -> Result<()> {
    let t = Instant::now();
    let rootfs = dir.join("rootfs");
    if rootfs.exists() {
        unmount_chroot(&rootfs);
        fs::remove_dir_all(&rootfs)
            .with_context(|| format!("removing the old {}", rootfs.display()))?;
    }
    let _ = fs::remove_file(dir.join("ready"));
    fs::create_dir_all(dir)?;
    let mirror = std::env::var("VIGIL_VM_MIRROR").unwrap_or_else(|_| MIRROR.to_string());
    println!(
        "==> vm-test: debootstrap bookworm into {}",
        rootfs.display()
    );
    // Twice: a mirror hiccup should not fail a CI run.
    for attempt in 1..=2 {
        let mut cmd = Command::new("debootstrap");
        cmd.args(["--variant=minbase", "--merged-usr"])
            .arg(format!("--include={}", GUEST_PACKAGES.join(",")))
            .arg("bookworm")
            .arg(&rootfs)
            .arg(&mirror);
        match run_logged(
            &mut cmd,
            &dir.join("debootstrap.log"),
            Duration::from_secs(1800),
        ) {
            Ok(()) => break,
            Err(e) if attempt == 1 => {
                eprintln!("warning: {e:#}; trying once more");
                unmount_chroot(&rootfs);
                let _ = fs::remove_dir_all(&rootfs);
                std::thread::sleep(Duration::from_secs(10));
            }
            Err(e) => return Err(e),
        }
    }

    // apt sources (with the security archive, where 6.12 comes from), no
    // service starts inside the chroot.
    fs::write(
        rootfs.join("etc/apt/sources.list"),
        format!(
            "deb {mirror} bookworm main\ndeb {mirror} bookworm-updates main\n\
             deb {SECURITY_MIRROR} bookworm-security main\n"
        ),
    )?;
    let policy = rootfs.join("usr/sbin/policy-rc.d");
    fs::write(&policy, "#!/bin/sh\nexit 101\n")?;
    set_mode(&policy, 0o755)?;
    println!("==> vm-test: installing the kernels (apt in the chroot)");
    let kernel_pkgs: Vec<&str> = KERNELS.iter().map(|k| k.1).collect();
    mount_chroot(&rootfs)?;
    let mut cmd = Command::new("chroot");
    cmd.arg(&rootfs)
        .args([
            "/usr/bin/env",
            "DEBIAN_FRONTEND=noninteractive",
            "/bin/sh",
            "-c",
        ])
        .arg(format!(
            "apt-get -o Acquire::Retries=3 update -q && \
             apt-get -o Acquire::Retries=3 install -y -q --no-install-recommends {} && \
             apt-get clean",
            kernel_pkgs.join(" ")
        ));
    let installed = run_logged(
        &mut cmd,
        &dir.join("kernels.log"),
        Duration::from_secs(2400),
    );
    unmount_chroot(&rootfs);
    installed?;
    fs::remove_file(&policy)?;

    configure_guest(&rootfs)?;

    // Each kernel: its vmlinux and initramfs, beside the image.
    let boot = rootfs.join("boot");
    let kdir = dir.join("kernels");
    let _ = fs::remove_dir_all(&kdir);
    for (series, _) in KERNELS {
        let release = fs::read_dir(&boot)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let n = e.file_name().into_string().ok()?;
                let r = n.strip_prefix("vmlinuz-")?.to_string();
                (r.starts_with(&format!("{series}.")) && r.ends_with("-amd64")).then_some(r)
            })
            .max()
            .with_context(|| format!("no {series} kernel in {}", boot.display()))?;
        let out = kdir.join(series);
        fs::create_dir_all(&out)?;
        let vmlinuz = boot.join(format!("vmlinuz-{release}"));
        let elf = extract_vmlinux(&vmlinuz)
            .with_context(|| format!("extracting vmlinux from {}", vmlinuz.display()))?;
        fs::write(out.join("vmlinux"), elf)?;
        fs::copy(
            boot.join(format!("initrd.img-{release}")),
            out.join("initrd.img"),
        )
        .with_context(|| format!("{}: no initramfs for {release}", boot.display()))?;
        fs::write(out.join("release"), &release)?;
        println!("==> vm-test: kernel {release}");
    }

    println!("==> vm-test: mkfs.ext4 -d (root filesystem image, {IMAGE_SIZE} sparse)");
    let image = dir.join("root.img");
    let _ = fs::remove_file(&image);
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-L", "vigil-root", "-d"])
        .arg(&rootfs)
        .arg(&image)
        .arg(IMAGE_SIZE);
    run_logged(&mut cmd, &dir.join("mkfs.log"), Duration::from_secs(900))?;
    fs::remove_dir_all(&rootfs).with_context(|| format!("removing {}", rootfs.display()))?;
    println!(
        "==> vm-test: image made in {:.0} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The guest's configuration: root filesystem and share, host name, the
/// test driver's unit, a serial console without login, no timers that
/// would compete with the test.
fn configure_guest(rootfs: &Path) -> Result<()> {
    fs::write(
        rootfs.join("etc/fstab"),
        "LABEL=vigil-root / ext4 defaults,errors=remount-ro 0 1\n\
         share /share 9p trans=virtio,version=9p2000.L,msize=262144,nofail 0 0\n",
    )?;
    fs::create_dir_all(rootfs.join("share"))?;
    fs::write(rootfs.join("etc/hostname"), "vigil-vm\n")?;
    fs::write(
        rootfs.join("etc/hosts"),
        "127.0.0.1\tlocalhost\n127.0.1.1\tvigil-vm\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    )?;
    // The 9p modules load from the initramfs' udev anyway; listing them makes
    // the share's mount independent of that.
    fs::write(
        rootfs.join("etc/modules-load.d/vigil-vmtest.conf"),
        "9p\n9pnet_virtio\n",
    )?;
    let unit = "[Unit]\n\
        Description=vigil vm-test driver (cargo xtask vm-test)\n\
        After=multi-user.target\n\
        RequiresMountsFor=/share\n\
        ConditionPathExists=/share/guest.sh\n\
        \n\
        [Service]\n\
        Type=oneshot\n\
        ExecStart=/bin/bash /share/guest.sh\n\
        StandardOutput=journal+console\n\
        StandardError=journal+console\n\
        TimeoutStartSec=infinity\n\
        \n\
        [Install]\n\
        WantedBy=multi-user.target\n";
    let units = rootfs.join("etc/systemd/system");
    fs::write(units.join("vigil-vmtest.service"), unit)?;
    let wants = units.join("multi-user.target.wants");
    fs::create_dir_all(&wants)?;
    let link = wants.join("vigil-vmtest.service");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink("/etc/systemd/system/vigil-vmtest.service", &link)?;
    // Nothing else running in the background during the test.
    for masked in [
        "apt-daily.timer",
        "apt-daily-upgrade.timer",
        "dpkg-db-backup.timer",
        "logrotate.timer",
        "e2scrub_all.timer",
        "fstrim.timer",
        "getty@tty1.service",
    ] {
        let p = units.join(masked);
        let _ = fs::remove_file(&p);
        std::os::unix::fs::symlink("/dev/null", &p)?;
    }
    // An empty root password is not needed: the console is for logs only.
    Ok(())
}

fn mount_chroot(rootfs: &Path) -> Result<()> {
    for (fstype, what, dir) in [
        ("proc", "proc", "proc"),
        ("sysfs", "sysfs", "sys"),
        ("devtmpfs", "udev", "dev"),
        ("devpts", "devpts", "dev/pts"),
    ] {
        let target = rootfs.join(dir);
        fs::create_dir_all(&target)?;
        let st = Command::new("mount")
            .args(["-t", fstype, what])
            .arg(&target)
            .status()
            .context("running mount")?;
        if !st.success() {
            unmount_chroot(rootfs);
            bail!("mounting {fstype} on {}", target.display());
        }
    }
    Ok(())
}

/// Unmounts what [`mount_chroot`] mounted (whatever of it is mounted).
fn unmount_chroot(rootfs: &Path) {
    for dir in ["dev/pts", "dev", "sys", "proc"] {
        let target = rootfs.join(dir);
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&target)
            .stderr(Stdio::null())
            .status();
    }
}

/// The ELF kernel inside a bzImage: the compressed payload is found by its
/// magic and decompressed with the matching tool (what the kernel's
/// scripts/extract-vmlinux does).
fn extract_vmlinux(vmlinuz: &Path) -> Result<Vec<u8>> {
    let data = fs::read(vmlinuz)?;
    let formats: &[(&[u8], &str)] = &[
        (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], "xz"),
        (&[0x28, 0xb5, 0x2f, 0xfd], "zstd"),
        (&[0x1f, 0x8b, 0x08], "gzip"),
    ];
    for (magic, tool) in formats {
        if util::which(tool).is_none() {
            continue;
        }
        let mut from = 0;
        while let Some(pos) = find(&data[from..], magic) {
            let at = from + pos;
            from = at + 1;
            let mut child = Command::new(tool)
                .args(["-dc"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("running {tool}"))?;
            let mut stdin = child.stdin.take().expect("piped");
            let payload = data[at..].to_vec();
            let writer = std::thread::spawn(move || {
                let _ = stdin.write_all(&payload);
            });
            let out = child.wait_with_output()?;
            let _ = writer.join();
            // A trailing-garbage error is expected (the payload is followed
            // by the rest of the bzImage): judge by what came out.
            if out.stdout.len() > 1 << 20 && out.stdout.starts_with(b"\x7fELF") {
                return Ok(out.stdout);
            }
        }
    }
    bail!("no xz, zstd or gzip payload holding an ELF kernel was found")
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// Runs a long command with its output in `log` (the last lines are shown
/// when it fails).
fn run_logged(cmd: &mut Command, log: &Path, timeout: Duration) -> Result<()> {
    let shown = util::display_cmd(cmd);
    let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("cannot run `{shown}`"))?;
    let status = match util::wait_timeout(&mut child, timeout)? {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`{shown}` did not finish within {timeout:?} (log: {})",
                log.display()
            );
        }
    };
    if !status.success() {
        let text = fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        bail!(
            "`{shown}` failed ({}); last lines of {}:\n{}",
            util::describe_status(status),
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// One kernel's run.

fn run_kernel(
    image: &Path,
    kernel: &Kernel,
    debs: &[PathBuf],
    e2e: &[(&str, PathBuf)],
    e2e_filter: Option<&str>,
    run_dir: &Path,
    timeout: Duration,
) -> Result<RunResult> {
    if run_dir.exists() {
        fs::remove_dir_all(run_dir).with_context(|| format!("removing {}", run_dir.display()))?;
    }
    let share = run_dir.join("share");
    fs::create_dir_all(share.join("debs"))?;
    for deb in debs {
        let name = deb.file_name().context("a .deb path without a file name")?;
        fs::copy(deb, share.join("debs").join(name))
            .with_context(|| format!("copying {}", deb.display()))?;
    }
    for (name, bin) in e2e {
        // The power-cut test apart: phase 2 runs everything in tests/.
        let dir = share.join(if *name == POWER_CUT_TEST {
            "powercut"
        } else {
            "tests"
        });
        fs::create_dir_all(&dir)?;
        fs::copy(bin, dir.join(name)).with_context(|| format!("copying {}", bin.display()))?;
    }
    if let Some(f) = e2e_filter {
        // Read by the guest script and handed to each test binary.
        fs::write(share.join("test-filter"), f)?;
    }
    let script = share.join("guest.sh");
    fs::write(&script, GUEST_SCRIPT)?;
    set_mode(&script, 0o755)?;
    // The disk of this run: a copy of the image (sparse), kept across the
    // guest's reboot, thrown away with the next run.
    let disk = run_dir.join("disk.img");
    let st = Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(image)
        .arg(&disk)
        .status()
        .context("running cp")?;
    if !st.success() {
        bail!("copying {} failed", image.display());
    }

    let deadline = Instant::now() + timeout;
    let console = run_dir.join("console.log");
    let mut boots = 0;
    while !share.join("done").exists() {
        boots += 1;
        if boots > 2 {
            bail!(
                "the guest did not finish after {} boots (console: {})",
                boots - 1,
                console.display()
            );
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "timed out after {timeout:?} (console: {})",
                console.display()
            );
        }
        boot(kernel, &disk, &share, &console, left)?;
    }
    let text = fs::read_to_string(share.join("results.txt")).unwrap_or_default();
    let mut r = RunResult {
        series: kernel.series,
        release: kernel.release.clone(),
        passed: 0,
        failed: 0,
        skipped: 0,
        error: None,
    };
    for line in text.lines() {
        if line.starts_with("ok ") {
            r.passed += 1;
        } else if line.starts_with("FAIL ") {
            r.failed += 1;
        } else if line.starts_with("skip ") {
            r.skipped += 1;
        }
    }
    Ok(r)
}

/// One boot of the guest: QEMU until the guest powers off or reboots
/// (`-no-reboot` turns a reboot into QEMU's exit), the serial console
/// appended to `console` and its test lines echoed here.
fn boot(
    kernel: &Kernel,
    disk: &Path,
    share: &Path,
    console: &Path,
    timeout: Duration,
) -> Result<()> {
    let accel = std::env::var("VIGIL_VM_ACCEL").unwrap_or_else(|_| "tcg".into());
    let mut cmd = Command::new("qemu-system-x86_64");
    if accel == "tcg" {
        // Software emulation: one host thread runs both vCPUs in turn.
        // Multi-threaded TCG hung the guest (both vCPUs looping in
        // syscall_trace_enter) when the agent's tracepoints were patched
        // into the kernel text while the other vCPU ran it: an emulation
        // race on cross-modified code, gone with single-threaded TCG.
        cmd.args([
            "-machine",
            "q35",
            "-accel",
            "tcg,thread=single",
            "-cpu",
            "qemu64",
        ]);
    } else {
        cmd.args(["-machine", &format!("q35,accel={accel}"), "-cpu", "host"]);
    }
    cmd.args(["-smp", "2", "-m", "2048"])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(&kernel.vmlinux)
        .arg("-initrd")
        .arg(&kernel.initrd)
        .args([
            "-append",
            "root=LABEL=vigil-root rw console=ttyS0 panic=-1 loglevel=5 \
             systemd.show_status=error net.ifnames=0",
        ])
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=raw,cache=unsafe",
            disk.display()
        ))
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=share,security_model=none,id=share",
            share.display()
        ));
    util::die_with_parent(&mut cmd, libc::SIGKILL);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let mut log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(console)?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        s
    });
    let out_thread = std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let text = String::from_utf8_lossy(&line);
            let _ = writeln!(log, "{}", text.trim_end_matches('\r'));
            if let Some(i) = text.find("vmtest[") {
                println!("      {}", text[i..].trim_end());
            }
        }
    });
    let status = util::wait_timeout(&mut child, timeout)?;
    let status = match status {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let _ = out_thread.join();
            bail!(
                "the VM did not stop within {timeout:?} (console: {})",
                console.display()
            );
        }
    };
    let _ = out_thread.join();
    let err = err_thread.join().unwrap_or_default();
    if !status.success() {
        bail!(
            "qemu-system-x86_64 exited with {}: {}",
            util::describe_status(status),
            err.trim()
        );
    }
    Ok(())
}
