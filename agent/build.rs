//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//! bpfman's rule: the object is part of the binary, never fetched at run time.
//!
//! Also generates the gRPC code for `proto/csi.proto` and `proto/admin.proto`:
//! protox (pure Rust, no system `protoc`) parses them into a descriptor set,
//! tonic-prost-build emits messages, servers and clients into `OUT_DIR`.
use std::path::PathBuf;

fn main() {
    compile_protos();
    println!("cargo:rerun-if-env-changed=CBT_EBPF_OBJECT");
    let path = match std::env::var_os("CBT_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => {
            let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
            manifest.join("../tracker-ebpf/target/bpfel-unknown-none/release/cbt-ebpf")
        }
    };
    if !path.exists() {
        panic!(
            "eBPF object not found at {}: run `cargo xtask build-ebpf` (or `cargo xtask test`) first",
            path.display()
        );
    }
    println!("cargo:rerun-if-changed={}", path.display());
    println!("cargo:rustc-env=CBT_EBPF_OBJECT={}", path.canonicalize().expect("exists").display());
}

fn compile_protos() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let proto_dir = manifest.join("../proto");
    let files = [proto_dir.join("csi.proto"), proto_dir.join("admin.proto")];
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let fds = protox::compile(&files, [&proto_dir]).unwrap_or_else(|e| panic!("{}: {e}", proto_dir.display()));
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Requests carry secrets: their Debug impls are written by hand to redact them.
        .skip_debug([".csi.v1.GetMetadataAllocatedRequest", ".csi.v1.GetMetadataDeltaRequest"])
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("generating code for {}: {e}", proto_dir.display()));
}
