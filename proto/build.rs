//! Generates the serin.v1 messages and services with `protox` (pure Rust), so the build needs no
//! system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/serin/v1/agent.proto",
        "proto/serin/v1/control.proto",
        "proto/serin/v1/enrol.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // Artifact bytes as `bytes::Bytes`: a decoded chunk is a view of the received buffer
        // (no copy), and a chunk read from disk moves into its message without one.
        .bytes(".serin.v1.ArtifactChunk.data")
        .bytes(".serin.v1.PushArtifactChunk.data")
        // Small initial stream buffers (`src/codec.rs`): one `Attach` stream per agent.
        .codec_path("crate::codec::SerinCodec")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
