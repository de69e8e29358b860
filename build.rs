//! Compiles `proto/` with protox (pure Rust, no system `protoc`) into `OUT_DIR`, together
//! with the file descriptor set that server reflection serves.
use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let fds = protox::compile(["flotilla/v1/rollout.proto"], ["proto"])?;
    std::fs::write(out_dir.join("flotilla_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
