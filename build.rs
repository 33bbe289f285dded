//! With the `cuda` feature: compiles the decoder's fused attention kernel
//! (src/model/attention.cu) to PTX with nvcc, for the compute capability in CUDA_COMPUTE_CAP
//! (default 80: the kernel's bf16 tensor-core instructions need sm_80 or newer).
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/model/attention.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("attention.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=compute_{cap}"), "-o"])
        .arg(&out)
        .arg("src/model/attention.cu")
        .status()
        .unwrap_or_else(|e| panic!("running {nvcc} (the CUDA compiler, needed by --features cuda): {e}"));
    assert!(status.success(), "{nvcc} failed on src/model/attention.cu");
}
