//! Compiles `vigil.proto` with the vendored `protoc`, so building needs no
//! system protobuf compiler.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto = manifest_dir.join("vigil.proto");
    println!("cargo:rerun-if-changed={}", proto.display());

    let protoc = protoc_bin_vendored::protoc_bin_path()
        .map_err(|e| format!("vendored protoc not available for this platform: {e}"))?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);

    tonic_prost_build::configure()
        // Decode errors become INVALID_ARGUMENT instead of prost's INTERNAL.
        .codec_path("crate::codec::VigilCodec")
        .compile_with_config(config, &[proto.as_path()], &[manifest_dir.as_path()])?;
    Ok(())
}
