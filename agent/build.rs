//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//! bpfman's rule: the object is part of the binary, never fetched at run time.
use std::path::PathBuf;

fn main() {
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
