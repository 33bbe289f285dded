//! Device selection: `--device auto|cpu|cuda[:N]`.

use anyhow::{bail, Result};
use candle_core::Device;

/// Parse a device string. `auto` takes the first CUDA device when the binary was built with
/// the `cuda` feature and one is present, else the CPU.
pub fn parse(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                Ok(Device::new_cuda(0).unwrap_or(Device::Cpu))
            } else {
                Ok(Device::Cpu)
            }
        }
        s if s == "cuda" || s.starts_with("cuda:") => {
            if !candle_core::utils::cuda_is_available() {
                bail!("--device {s}: this refrag was built without CUDA (rebuild with `--features cuda`)");
            }
            let n: usize = match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map_err(|_| anyhow::anyhow!("--device {s}: bad GPU index"))?,
                None => 0,
            };
            Device::new_cuda(n).map_err(|e| anyhow::anyhow!("--device {s}: {e}"))
        }
        s => bail!("--device {s}: expected auto, cpu, cuda or cuda:N"),
    }
}

/// Short name for reports.
pub fn name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        _ => "other".into(),
    }
}
