//! Generates the tonic/prost code from `proto/` with protox (pure Rust, no `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/membrane/v1/certificates.proto",
        "proto/membrane/v1/authorization.proto",
        "proto/membrane/v1/egress.proto",
        "proto/membrane/v1/discovery.proto",
        "proto/membrane/v1/federation.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
