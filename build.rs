//! With the `cuda` feature: compiles the decoder's CUDA kernels (src/model/attention.cu, the
//! fused attention; src/model/elementwise.cu, fused elementwise ops;
//! src/model/diffops.cu, training kernels with a backward) to PTX with nvcc, for the
//! compute capability in CUDA_COMPUTE_CAP (default 80: the attention kernel's bf16 tensor-core
//! instructions need sm_80 or newer).
use std::path::PathBuf;
use std::process::Command;

const KERNELS: [&str; 3] = ["attention", "diffops", "elementwise"];

fn main() {
    for k in KERNELS {
        println!("cargo:rerun-if-changed=src/model/{k}.cu");
    }
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    for k in KERNELS {
        let src = format!("src/model/{k}.cu");
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=compute_{cap}"), "-o"])
            .arg(dir.join(format!("{k}.ptx")))
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("running {nvcc} (the CUDA compiler, needed by --features cuda): {e}"));
        assert!(status.success(), "{nvcc} failed on {src}");
    }
}
