//! Builds the eBPF programs (sensor-ebpf, nightly, bpfel target) and embeds
//! the object in the agent.
use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("agent crate has no parent dir"))?
        .join("sensor-ebpf");
    let root = root.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    println!("cargo:rerun-if-changed={root}/src");
    println!("cargo:rerun-if-changed={root}/../sensor-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "vigil-sensor-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF programs (needs nightly + rust-src + bpf-linker: run `cargo xtask setup`)")
}
