//! The networks and where their weights come from: the decoder (SmolLM2, GGUF) and its
//! tokenizer, the MiniLM encoder, the chunk encoder grown from the decoder ([`grown`]), the
//! projector, the expansion policy's network, the ops with a written-out backward; [`compressor`], the one way decoder tokens become chunk vectors;
//! [`weights`], trained weights and their card; [`load`], everything a command reads, settled
//! once; [`cache`] and [`hub`], the pinned base models.

/// The `cpu_fwd` of a candle custom op whose kernel runs on CUDA only (`op1` or `op3` inputs):
/// an error naming the kernel.
macro_rules! cuda_only {
    (op1, $what:literal) => {
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!(concat!($what, " runs on CUDA only"))
        }
    };
    (op2, $what:literal) => {
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!(concat!($what, " runs on CUDA only"))
        }
    };
    (op3, $what:literal) => {
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!(concat!($what, " runs on CUDA only"))
        }
    };
}

/// The device address of `t`'s first element (a tensor on the GPU of dtype `T`), for kernels
/// that read or write a tensor other than their inputs. The memory lives as long as `t`;
/// candle runs one stream, so no event needs recording.
#[cfg(feature = "cuda")]
pub(crate) fn device_ptr<T: candle_core::cuda_backend::CudaDType>(
    t: &candle_core::Tensor,
    stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
) -> candle_core::Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let (st, l) = t.storage_and_layout();
    let candle_core::Storage::Cuda(c) = &*st else { candle_core::bail!("a tensor that is not on the GPU") };
    let view = c.as_cuda_slice::<T>()?.slice(l.start_offset()..);
    let (ptr, _sync) = view.device_ptr(stream);
    Ok(ptr)
}

pub mod attention;
pub mod cache;
pub mod compressor;
pub mod decoder;
pub mod diffops;
pub mod elementwise;
pub mod encoder;
pub mod gguf_tokenizer;
pub mod grown;
pub mod hub;
pub mod layer_grad;
pub mod load;
pub mod policy;
pub mod projector;
pub mod q4cpu;
pub mod weights;
