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
                let d = Device::new_cuda(0).unwrap_or(Device::Cpu);
                tune_cuda(&d);
                Ok(d)
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
            let d = Device::new_cuda(n).map_err(|e| anyhow::anyhow!("--device {s}: {e}"))?;
            tune_cuda(&d);
            Ok(d)
        }
        s => bail!("--device {s}: expected auto, cpu, cuda or cuda:N"),
    }
}

/// CUDA allocator settings for refrag's use (one stream, driven from one thread):
/// - no per-buffer event tracking: cudarc creates two CUDA events for every allocation so that
///   buffers shared between streams stay ordered; with one stream they only cost time;
/// - freed memory stays in the stream-ordered pool instead of going back to the driver at every
///   synchronisation (the pool's default release threshold is 0), so a training step reuses
///   the previous step's memory instead of mapping it again.
///
/// `REFRAG_CUDA_DEFAULTS=1` keeps cudarc's defaults (for side-by-side measurements). Measured on
/// an H200: training tokens/s within 2% either way. (Training's out-of-memory errors came from
/// one forward/backward pass's peak plus the pool's growth: `--micro-tokens` and
/// `trim_if_large`, README "GPU memory in training".)
#[cfg(feature = "cuda")]
fn tune_cuda(dev: &Device) {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Device::Cuda(d) = dev else { return };
    if std::env::var("REFRAG_CUDA_DEFAULTS").is_ok_and(|v| v == "1") {
        return;
    }
    // SAFETY: refrag runs its tensor work on the thread that created the device, on its one
    // stream; nothing needs cross-stream ordering.
    unsafe { d.disable_event_tracking() };
    set_blas_workspace(d);
    let Some(pool) = default_pool(dev) else { return };
    let mut keep = u64::MAX;
    // SAFETY: a plain driver call on a valid pool; a failure leaves the default setting.
    let r = unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut keep as *mut u64 as *mut std::ffi::c_void,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        tracing::debug!("CUDA memory pool release threshold not set: {r:?}");
    }
}

/// Give cuBLAS a workspace of its own (32 MiB, kept for the process), so that its calls
/// captured into a CUDA graph (decoding steps, `Decoder::step`) have one: cuBLAS does not
/// allocate its default workspace while a stream is being captured.
#[cfg(feature = "cuda")]
fn set_blas_workspace(d: &candle_core::CudaDevice) {
    use candle_core::cuda_backend::cudarc::{cublas::sys as blas, driver::DevicePtr};
    const BYTES: usize = 32 << 20;
    let Ok(ws) = d.alloc_zeros::<u8>(BYTES) else { return };
    let stream = d.cuda_stream();
    let status = {
        let (ptr, _sync) = ws.device_ptr(&stream);
        // SAFETY: a valid handle and a device buffer of BYTES that is never freed (forgotten below).
        unsafe { blas::cublasSetWorkspace_v2(*d.cublas_handle().handle(), ptr as *mut std::ffi::c_void, BYTES) }
    };
    if status != blas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        tracing::debug!("cuBLAS workspace not set: {status:?}");
        return;
    }
    std::mem::forget(ws);
}

#[cfg(not(feature = "cuda"))]
fn tune_cuda(_: &Device) {}

/// GPU memory in MiB, for training logs: what live tensors hold (`used`), what the
/// stream-ordered pool holds from the driver (`reserved`, >= used: freed blocks kept for
/// reuse) and the device's free and total memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuMemory {
    pub used: f64,
    pub reserved: f64,
    /// The highest `used` / `reserved` since the previous reading (the step's peak).
    pub peak_used: f64,
    pub peak_reserved: f64,
    pub free: f64,
    pub total: f64,
}

#[cfg(feature = "cuda")]
fn default_pool(dev: &Device) -> Option<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Device::Cuda(d) = dev else { return None };
    let ctx = d.cuda_stream().context().clone();
    ctx.bind_to_thread().ok()?;
    let mut pool = std::mem::MaybeUninit::<sys::CUmemoryPool>::uninit();
    // SAFETY: a plain driver query on a valid device.
    let r = unsafe { sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), ctx.cu_device()) };
    // SAFETY: written on success.
    (r == sys::CUresult::CUDA_SUCCESS).then(|| unsafe { pool.assume_init() })
}

/// GPU memory now and its peaks since the last call (which resets them); None on the CPU or
/// when the driver does not say.
#[cfg(feature = "cuda")]
pub fn memory(dev: &Device) -> Option<GpuMemory> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let pool = default_pool(dev)?;
    let attr = |a: sys::CUmemPool_attribute| -> Option<f64> {
        let mut v = 0u64;
        // SAFETY: these attributes are u64 values written into `v`.
        let r = unsafe { sys::cuMemPoolGetAttribute(pool, a, &mut v as *mut u64 as *mut std::ffi::c_void) };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(v as f64 / 1048576.0)
    };
    let used = attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?;
    let reserved = attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?;
    let peak_used = attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?;
    let peak_reserved = attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?;
    // the high watermarks start again from the current values
    for a in [
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
    ] {
        let mut zero = 0u64;
        // SAFETY: resetting a high watermark takes a u64 zero.
        unsafe { sys::cuMemPoolSetAttribute(pool, a, &mut zero as *mut u64 as *mut std::ffi::c_void) };
    }
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: two out-parameters; the context is bound (default_pool).
    let r = unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) };
    if r != sys::CUresult::CUDA_SUCCESS {
        return None;
    }
    Some(GpuMemory {
        used,
        reserved,
        peak_used,
        peak_reserved,
        free: free as f64 / 1048576.0,
        total: total as f64 / 1048576.0,
    })
}

#[cfg(not(feature = "cuda"))]
pub fn memory(_: &Device) -> Option<GpuMemory> {
    None
}

/// Give the memory pool's unused blocks back to the driver ([`release_unused`]) once it holds
/// more than half of the device or the device is crowded (`m`: its memory just now;
/// [`pool_too_large`]). The pool keeps freed blocks for
/// reuse (tune_cuda), yet over a LoRA training run it grows by 0.15-0.3 GB per forward/backward pass
/// while the step's peak of live tensors stays flat (H200, cpt at L = 1, passes of 8192 tokens:
/// peak 35 GB every step, pool +2.4 GB per step). Measured: trimming fires at half the device
/// and takes the pool from 72 to 46 GB, but the run still failed an allocation 21 steps later
/// with the pool at 66 GB and 76 GB free (cause not found; README "GPU memory in training").
/// Returns whether it trimmed; `REFRAG_CUDA_TRIM=0` never trims.
#[cfg(feature = "cuda")]
pub fn trim_if_large(dev: &Device, m: &GpuMemory) -> bool {
    if std::env::var("REFRAG_CUDA_TRIM").is_ok_and(|v| v == "0") {
        return false;
    }
    if !pool_too_large(m) {
        return false;
    }
    release_unused(dev)
}

/// The pool holds half the device, or the device is crowded (under a quarter free, as when
/// several runs share one GPU: each would otherwise wait for half of it) while the pool keeps
/// more than 1 GB it is not using.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn pool_too_large(m: &GpuMemory) -> bool {
    m.reserved >= m.total / 2.0 || (m.free < m.total / 4.0 && m.reserved - m.used > 1024.0)
}

#[cfg(not(feature = "cuda"))]
pub fn trim_if_large(_: &Device, _: &GpuMemory) -> bool {
    false
}

/// Wait for the device's queued work, then give the memory pool's unused blocks back to the
/// driver. Returns whether it trimmed (false on the CPU).
#[cfg(feature = "cuda")]
pub fn release_unused(dev: &Device) -> bool {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Some(pool) = default_pool(dev) else { return false };
    if dev.synchronize().is_err() {
        return false;
    }
    // SAFETY: the stream is idle; trimming releases only blocks no allocation holds.
    unsafe { sys::cuMemPoolTrimTo(pool, 0) == sys::CUresult::CUDA_SUCCESS }
}

#[cfg(not(feature = "cuda"))]
pub fn release_unused(_: &Device) -> bool {
    false
}

/// Short name for reports.
pub fn name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        _ => "other".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_is_trimmed_when_it_holds_half_the_device_or_the_device_is_crowded() {
        let m = |used: f64, reserved: f64, free: f64| GpuMemory {
            used,
            reserved,
            peak_used: used,
            peak_reserved: reserved,
            free,
            total: 140_000.0,
        };
        assert!(pool_too_large(&m(30_000.0, 72_000.0, 68_000.0)), "half the device");
        assert!(!pool_too_large(&m(30_000.0, 40_000.0, 100_000.0)), "room to spare");
        // another process holds most of the device: this pool's 10 GB of unused blocks go back
        assert!(pool_too_large(&m(30_000.0, 40_000.0, 20_000.0)), "crowded");
        // crowded, but this pool keeps nothing it could give back
        assert!(!pool_too_large(&m(39_500.0, 40_000.0, 20_000.0)), "nothing to give back");
    }
}
