//! Fused elementwise ops of the decoder's inference forward on CUDA (src/model/elementwise.cu):
//! the residual add with the norm after it, and silu(gate) * up from the stacked gate/up matmul.
//! Each saves one launch where two ran: three per layer, ~90 per decoding step of SmolLM2's 30
//! layers, whose steps are bound by launches. On by default on CUDA in bf16 inference
//! (`REFRAG_FUSED_ELEMENTWISE=0`: candle's ops); `refrag doctor` compares them with candle's
//! ops. Measured on the H200: decoding 2.65-2.86 -> 2.12-2.26 ms per token at batch 1, an
//! 8192-token prefill 43.9 -> 33.4 ms (docs/research/2026-12-04-training-kernels.md).

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

/// Whether the decoder uses these kernels (unless `REFRAG_FUSED_ELEMENTWISE=0`; read once).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        cfg!(feature = "cuda") && !matches!(std::env::var("REFRAG_FUSED_ELEMENTWISE").as_deref(), Ok("0"))
    })
}

/// `silu(gu[.., :f]) * gu[.., f:]` for `gu` [.., 2f] (bf16, contiguous): [.., f].
pub fn silu_mul(gu: &Tensor) -> Result<Tensor> {
    gu.apply_op1_no_bwd(&SiluMul)
}

/// `x + y` and its RMS norm times `w` ([hidden]), for `x`, `y` [.., hidden] (bf16, contiguous):
/// (the sum, the normed sum), both [.., hidden].
pub fn add_rms_norm(x: &Tensor, y: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let both = x.apply_op3_no_bwd(y, w, &AddRmsNorm { eps: eps as f32 })?;
    Ok((both.get(0)?, both.get(1)?))
}

struct SiluMul;

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "refrag-silu-mul"
    }

    cuda_only!(op1, "the fused silu-mul kernel");

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, gu: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        use candle_core::{backend::BackendStorage, bail};
        use half::bf16;

        let dims = l.shape().dims();
        let two_f = *dims.last().unwrap_or(&0);
        if !l.is_contiguous() || !two_f.is_multiple_of(2) {
            bail!("fused silu-mul: a contiguous [.., 2f] input, got {:?} (strides {:?})", dims, l.stride());
        }
        let (f, rows) = (two_f / 2, l.shape().elem_count() / two_f.max(1));
        let dev = gu.device().clone();
        let func = dev.get_or_load_custom_func("refrag_silu_mul_bf16", "refrag_elementwise", PTX)?;
        let src = gu.as_cuda_slice::<bf16>()?.slice(l.start_offset()..);
        // SAFETY: the kernel writes every element (one thread each).
        let out = unsafe { dev.alloc::<bf16>(rows * f)? };
        let n = (rows * f) as u32;
        let cfg =
            LaunchConfig { grid_dim: (n.div_ceil(256).max(1), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let (rows_, f_) = (rows as i32, f as i32);
        let mut launch = func.builder();
        launch.arg(&src).arg(&out).arg(&rows_).arg(&f_);
        // SAFETY: the arguments match the kernel's signature; the sizes were checked above.
        unsafe { launch.launch(cfg) }.w()?;
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("a last dim") = f;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev), Shape::from(shape)))
    }
}

struct AddRmsNorm {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    eps: f32,
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "refrag-add-rms-norm"
    }

    cuda_only!(op3, "the fused add-norm kernel");

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        y: &candle_core::CudaStorage,
        yl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        use candle_core::{backend::BackendStorage, bail};
        use half::bf16;

        let hidden = *xl.shape().dims().last().unwrap_or(&0);
        if xl.shape() != yl.shape() || wl.shape().dims() != [hidden] || hidden == 0 {
            bail!("fused add-norm: shapes {:?} + {:?}, weight {:?}", xl.shape(), yl.shape(), wl.shape());
        }
        if !(xl.is_contiguous() && yl.is_contiguous() && wl.is_contiguous()) {
            bail!("fused add-norm: inputs must be contiguous");
        }
        let rows = xl.shape().elem_count() / hidden;
        let dev = x.device().clone();
        let func = dev.get_or_load_custom_func("refrag_add_rms_norm_bf16", "refrag_elementwise", PTX)?;
        let (xs, ys, ws) = (
            x.as_cuda_slice::<bf16>()?.slice(xl.start_offset()..),
            y.as_cuda_slice::<bf16>()?.slice(yl.start_offset()..),
            w.as_cuda_slice::<bf16>()?.slice(wl.start_offset()..),
        );
        // SAFETY: every row's sum and norm are written by its block.
        let out = unsafe { dev.alloc::<bf16>(2 * rows * hidden)? };
        // candle's rms-norm kernel's block (one warp below 1024 columns): the same order of
        // the sum of squares, so the same rounding of the norm
        let block = if hidden < 1024 { 32 } else { 1024 };
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 };
        let (rows_, hidden_) = (rows as i32, hidden as i32);
        let mut launch = func.builder();
        launch.arg(&xs).arg(&ys).arg(&ws).arg(&out).arg(&rows_).arg(&hidden_).arg(&self.eps);
        // SAFETY: the arguments match the kernel's signature; the shapes were checked above.
        unsafe { launch.launch(cfg) }.w()?;
        let mut shape = vec![2];
        shape.extend_from_slice(xl.shape().dims());
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev), Shape::from(shape)))
    }
}

/// The PTX of elementwise.cu.
#[cfg(feature = "cuda")]
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/elementwise.ptx"));

/// The largest difference between the fused ops and candle's (add, rms-norm, silu, mul) on
/// random bf16 inputs on `device` (a few rows and a long prefill's worth); bf16 rounding is
/// ~1e-2 at these magnitudes, a wrong index ~1.
pub fn parity(device: &candle_core::Device) -> anyhow::Result<f32> {
    use candle_core::DType;
    let mut worst = 0f32;
    let diff = |a: &Tensor, b: &Tensor| -> anyhow::Result<f32> {
        let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?.abs()?;
        Ok(d.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    };
    let bf = |t: Tensor| t.to_dtype(DType::BF16);
    for (b, t, hidden, ffn) in [(1, 1, 576, 1536), (2, 1, 576, 1536), (1, 517, 576, 1536), (1, 3, 100, 40)] {
        let x = bf(Tensor::randn(0f32, 1.0, (b, t, hidden), device)?)?;
        let y = bf(Tensor::randn(0f32, 1.0, (b, t, hidden), device)?)?;
        let w = bf((Tensor::rand(0f32, 1.0, hidden, device)? + 0.5)?)?;
        let (sum, normed) = add_rms_norm(&x, &y, &w, 1e-5)?;
        let want_sum = (&x + &y)?;
        worst = worst.max(diff(&sum, &want_sum)?);
        worst = worst.max(diff(&normed, &candle_nn::ops::rms_norm(&want_sum, &w, 1e-5)?)?);
        let gu = bf(Tensor::randn(0f32, 2.0, (b, t, 2 * ffn), device)?)?;
        let (gate, up) = (gu.narrow(2, 0, ffn)?, gu.narrow(2, ffn, ffn)?);
        worst = worst.max(diff(&silu_mul(&gu)?, &(candle_nn::ops::silu(&gate)? * up)?)?);
    }
    Ok(worst)
}
