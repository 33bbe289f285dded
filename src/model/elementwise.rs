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

/// Whether a captured decoding step rotates and writes its keys and values with
/// [`decode_qkv`] (with the other kernels, unless `REFRAG_FUSED_QKV=0`; read once).
pub fn decode_qkv_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| enabled() && !matches!(std::env::var("REFRAG_FUSED_QKV").as_deref(), Ok("0")))
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

/// A decoding step's queries, keys and values from the stacked Q/K/V matmul's output `qkv`
/// ([b, 1, (nq + 2 nk) * 64], bf16, contiguous), at the position held on the device in `pos`
/// (u32 [1]): the queries rotated with the scaled query tables, returned as [b, nq, 1, 64]; the
/// keys rotated with the key tables and the values written into `k_cache`, `v_cache`
/// ([b, nk, capacity, 64], contiguous) at that position. One launch where five ran (the copy
/// into heads, two rotations, two scatters): what a captured decoding step replays.
pub fn decode_qkv(qkv: &Tensor, at: DecodeQkv) -> Result<Tensor> {
    qkv.apply_op1_no_bwd(&at)
}

/// The rest of [`decode_qkv`]'s inputs. The caches are written in place through their device
/// memory (no op of candle's reads them in between: one stream, in order).
pub struct DecodeQkv<'a> {
    pub pos: &'a Tensor,
    /// Query tables (scaled by 1/sqrt(head_dim)), then key tables: [positions, 32] each.
    pub cos_q: &'a Tensor,
    pub sin_q: &'a Tensor,
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub k_cache: &'a Tensor,
    pub v_cache: &'a Tensor,
    pub n_q: usize,
    pub n_kv: usize,
}

impl CustomOp1 for DecodeQkv<'_> {
    fn name(&self) -> &'static str {
        "refrag-decode-qkv"
    }

    cuda_only!(op1, "the fused decoding Q/K/V kernel");

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, qkv: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        use candle_core::{backend::BackendStorage, bail, DType};
        use half::bf16;

        let (b, t, width) = l.shape().dims3()?;
        let heads = self.n_q + 2 * self.n_kv;
        let (cb, ckv, cap, cd) = self.k_cache.dims4()?;
        let tables = [self.cos_q, self.sin_q, self.cos, self.sin];
        if t != 1
            || width != heads * 64
            || (cb, ckv, cd) != (b, self.n_kv, 64)
            || self.v_cache.dims() != [b, ckv, cap, cd]
        {
            bail!("fused decoding Q/K/V: qkv {:?}, caches {:?}", l.shape(), self.k_cache.shape());
        }
        let contiguous = |x: &Tensor| x.is_contiguous() && x.dtype() == DType::BF16;
        if !l.is_contiguous() || !contiguous(self.k_cache) || !contiguous(self.v_cache) {
            bail!("fused decoding Q/K/V: contiguous bf16 inputs and caches");
        }
        if tables.iter().any(|x| !contiguous(x) || x.dims2().map_or(true, |(_, w)| w != 32))
            || self.pos.dtype() != DType::U32
        {
            bail!("fused decoding Q/K/V: bf16 tables [positions, 32] and a u32 position");
        }
        let dev = qkv.device().clone();
        let stream = dev.cuda_stream();
        let func = dev.get_or_load_custom_func("refrag_decode_qkv_bf16", "refrag_elementwise", PTX)?;
        let src = qkv.as_cuda_slice::<bf16>()?.slice(l.start_offset()..);
        // SAFETY: every query element is written (one thread per pair of each head).
        let q = unsafe { dev.alloc::<bf16>(b * self.n_q * 64)? };
        let pos = super::device_ptr::<u32>(self.pos, &stream)?;
        let [cq, sq, ck, sk] = [0, 1, 2, 3].map(|i| super::device_ptr::<bf16>(tables[i], &stream));
        let (kc, vc) =
            (super::device_ptr::<bf16>(self.k_cache, &stream)?, super::device_ptr::<bf16>(self.v_cache, &stream)?);
        let (nq, nk, cap_) = (self.n_q as i32, self.n_kv as i32, cap as i32);
        let mut launch = func.builder();
        launch.arg(&src).arg(&pos);
        let (cq, sq, ck, sk) = (cq?, sq?, ck?, sk?);
        launch.arg(&cq).arg(&sq).arg(&ck).arg(&sk).arg(&q).arg(&kc).arg(&vc).arg(&nq).arg(&nk).arg(&cap_);
        let cfg = LaunchConfig { grid_dim: (heads as u32, b as u32, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments match the kernel's signature; the shapes were checked above and
        // the position is below the tables' and caches' lengths (the caller's KV state checks it).
        unsafe { launch.launch(cfg) }.w()?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(q, dev), Shape::from((b, self.n_q, 1, 64))))
    }
}

/// The PTX of elementwise.cu.
#[cfg(feature = "cuda")]
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/elementwise.ptx"));

/// The largest difference between the fused ops and candle's (add, rms-norm, silu, mul; the
/// decoding step's copies, rotations and scatters) on random bf16 inputs on `device` (a few rows and a long prefill's worth); bf16 rounding is
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
    // the decoding step's Q/K/V (9 query heads over 3 KV heads, as SmolLM2) at a position
    // of a 40-position cache, against candle's copies, rotations and scatters
    for (b, p) in [(1usize, 0usize), (2, 17), (1, 39)] {
        let (nq, nk, cap) = (9, 3, 40);
        let qkv = bf(Tensor::randn(0f32, 1.0, (b, 1, (nq + 2 * nk) * 64), device)?)?;
        let table = || bf(Tensor::randn(0f32, 1.0, (cap, 32), device)?);
        let (cos_q, sin_q, cos, sin) = (table()?, table()?, table()?, table()?);
        let k_cache = Tensor::zeros((b, nk, cap, 64), DType::BF16, device)?;
        let v_cache = k_cache.zeros_like()?;
        let pos = Tensor::new(&[p as u32], device)?;
        let (cos_q, sin_q, cos, sin, k_cache, v_cache, pos) = (&cos_q, &sin_q, &cos, &sin, &k_cache, &v_cache, &pos);
        let q = decode_qkv(&qkv, DecodeQkv { pos, cos_q, sin_q, cos, sin, k_cache, v_cache, n_q: nq, n_kv: nk })?;
        let heads = qkv.reshape((b, 1, nq + 2 * nk, 64))?.transpose(1, 2)?.contiguous()?;
        let part = |at, n| heads.narrow(1, at, n)?.contiguous();
        let row = |t: &Tensor| t.narrow(0, p, 1);
        let want_q = candle_nn::rotary_emb::rope_i(&part(0, nq)?, &row(cos_q)?, &row(sin_q)?)?;
        let want_k = candle_nn::rotary_emb::rope_i(&part(nq, nk)?, &row(cos)?, &row(sin)?)?;
        worst = worst.max(diff(&q, &want_q)?);
        worst = worst.max(diff(&k_cache.narrow(2, p, 1)?, &want_k)?);
        worst = worst.max(diff(&v_cache.narrow(2, p, 1)?, &part(nq + nk, nk)?)?);
        // nothing else written
        let total = |t: &Tensor| -> anyhow::Result<f32> { Ok(t.to_dtype(DType::F32)?.abs()?.sum_all()?.to_scalar()?) };
        let rest = (total(k_cache)? - total(&want_k)?).abs();
        worst = worst.max(rest / 100.0);
    }
    Ok(worst)
}
