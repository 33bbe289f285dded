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
pub mod load;
pub mod policy;
pub mod projector;
pub mod weights;
