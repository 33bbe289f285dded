//! The decoder's inference kernels on CUDA besides attention (src/model/elementwise.cu): the
//! residual add with the norm after it, silu(gate) * up, a decoding step's Q/K/V rotation and
//! cache write, one-row matrix-vector products (with the add + norm before them or the silu
//! inside), and greedy argmax. A decoding step's time is set by how many kernels it launches and
//! how much code each fetches cold, not by arithmetic: these keep both small. On by default on
//! CUDA in bf16 inference (`REFRAG_FUSED_ELEMENTWISE=0`: candle's ops and cuBLAS;
//! `REFRAG_GEMV=0`: cuBLAS for the products alone); `refrag doctor` compares them with candle's
//! ops. Measured on the H200: decoding 2.65 -> 0.75 ms per token at batch 1 over sessions 32-35
//! (docs/research/2026-12-04-training-kernels.md, 2026-12-04-decode-kernels.md).

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

/// Whether [`add_rms_norm`] takes these tensors: contiguous rows of a multiple of 8 values
/// (it moves them in 16-byte pieces, at most 3 per thread: up to 768 values, or 1,024 to 12,288)
/// that start 16-byte aligned (the sums are kept in shared memory as f32).
pub fn add_rms_norm_fits(x: &Tensor, y: &Tensor, w: &Tensor) -> bool {
    let hidden = x.dims().last().copied().unwrap_or(0);
    hidden > 0
        && hidden.is_multiple_of(8)
        && hidden <= 12_288
        && hidden / 8 <= ADD_NORM_PIECES * add_norm_block(hidden)
        && x.shape() == y.shape()
        && w.dims() == [hidden]
        && [x, y, w].iter().all(|t| t.is_contiguous() && t.layout().start_offset().is_multiple_of(8))
}

/// `x + y` and its RMS norm times `w` ([hidden]), for `x`, `y` [.., hidden] (bf16; see
/// [`add_rms_norm_fits`]): (the sum, the normed sum), both [.., hidden].
pub fn add_rms_norm(x: &Tensor, y: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let both = x.apply_op3_no_bwd(y, w, &AddRmsNorm { eps: eps as f32 })?;
    Ok((both.get(0)?, both.get(1)?))
}

/// `x + y` and its RMS norm times `w`: [`add_rms_norm`]'s one kernel where it applies (CUDA,
/// bf16, [`add_rms_norm_fits`], the kernels on), candle's add and rms-norm elsewhere (the same
/// bits).
pub fn add_norm(x: &Tensor, y: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let kernel = enabled() && x.device().is_cuda() && x.dtype() == candle_core::DType::BF16;
    if kernel && add_rms_norm_fits(x, y, w) {
        return add_rms_norm(x, y, w, eps);
    }
    let s = (x + y)?;
    let h = candle_nn::ops::rms_norm(&s, w, eps as f32)?;
    Ok((s, h))
}

/// Whether one-row matrix products use [`gemv`] (with the other kernels, unless
/// `REFRAG_GEMV=0`; read once).
pub fn gemv_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| enabled() && !matches!(std::env::var("REFRAG_GEMV").as_deref(), Ok("0")))
}

/// Whether [`gemv`] takes `x` [1, k] and `w` [n, k] (with `silu`, [`gemv_silu`] takes `x` [1, 2k]):
/// bf16 on CUDA, contiguous, 16-byte aligned rows of a multiple of 8 values, no gradient to track.
pub fn gemv_fits(x: &Tensor, w: &Tensor, silu: bool) -> bool {
    let aligned = |t: &Tensor| t.is_contiguous() && t.layout().start_offset().is_multiple_of(8);
    let (Ok((1, xk)), Ok((_, k))) = (x.dims2(), w.dims2()) else { return false };
    gemv_enabled()
        && x.device().is_cuda()
        && x.dtype() == candle_core::DType::BF16
        && w.dtype() == candle_core::DType::BF16
        && xk == if silu { 2 * k } else { k }
        && k.is_multiple_of(8)
        && (!silu || k <= 16_384)
        && aligned(x)
        && aligned(w)
        && !x.track_op()
}

/// `x w^T` for one row `x` [1, k] and `w` [n, k] (see [`gemv_fits`]): [1, n].
pub fn gemv(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.apply_op2_no_bwd(w, &Gemv { silu: false })
}

/// `(silu(gate) * up) w^T` for the stacked gate/up row `gu` [1, 2k] and `w` [n, k] (see
/// [`gemv_fits`]): [1, n], the activation rounded as [`silu_mul`] rounds it.
pub fn gemv_silu(gu: &Tensor, w: &Tensor) -> Result<Tensor> {
    gu.apply_op2_no_bwd(w, &Gemv { silu: true })
}

struct Gemv {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    silu: bool,
}

impl candle_core::CustomOp2 for Gemv {
    fn name(&self) -> &'static str {
        "refrag-gemv"
    }

    cuda_only!(op2, "the gemv kernel");

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        use candle_core::{backend::BackendStorage, bail};
        use half::bf16;

        let (rows, xk) = xl.shape().dims2()?;
        let (n, k) = wl.shape().dims2()?;
        let aligned = |l: &Layout| l.is_contiguous() && l.start_offset().is_multiple_of(8);
        let want = if self.silu { 2 * k } else { k };
        if rows != 1 || xk != want || !k.is_multiple_of(8) || !aligned(xl) || !aligned(wl) {
            bail!("gemv: x [1, k] and w [n, k], k a multiple of 8, aligned; got {:?} and {:?}", xl.shape(), wl.shape());
        }
        let dev = x.device().clone();
        let name = if self.silu { "refrag_gemv_silu_bf16" } else { "refrag_gemv_bf16" };
        let func = dev.get_or_load_custom_func(name, "refrag_elementwise", PTX)?;
        let (xs, ws) = (
            x.as_cuda_slice::<bf16>()?.slice(xl.start_offset()..),
            w.as_cuda_slice::<bf16>()?.slice(wl.start_offset()..),
        );
        // SAFETY: one warp writes each output.
        let out = unsafe { dev.alloc::<bf16>(n)? };
        let (n_, k_) = (n as i32, k as i32);
        let mut launch = func.builder();
        launch.arg(&xs).arg(&ws).arg(&out).arg(&n_).arg(&k_);
        // with silu: the activations in shared memory (k bf16)
        let shared = if self.silu { (k * 2) as u32 } else { 0 };
        let cfg =
            LaunchConfig { grid_dim: (n.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: shared };
        // SAFETY: the arguments match the kernel's signature; the shapes were checked above.
        unsafe { launch.launch(cfg) }.w()?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev), Shape::from((1, n))))
    }
}

/// Whether [`gemv_norm`] takes these: `x`, `y` [1, k] and the norm's weight `g` [k] as
/// [`add_rms_norm`] takes them with k < 1024 (one warp's order of the sum of squares), and `w`
/// [n, k] as [`gemv`] takes it.
pub fn gemv_norm_fits(x: &Tensor, y: &Tensor, g: &Tensor, w: &Tensor) -> bool {
    let k = x.dims().last().copied().unwrap_or(0);
    k < 1024 && g.device().is_cuda() && g.dtype() == w.dtype() && add_rms_norm_fits(x, y, g) && gemv_fits(x, w, false)
}

/// The residual add, the norm after it and the matrix-vector product that reads the norm, in
/// one kernel: for `x`, `y` [1, k] (see [`gemv_norm_fits`]), (x + y, (rms-normed x + y, times
/// `g`) w^T) as [1, k] and [1, n]: the same bits as [`add_rms_norm`] then [`gemv`].
pub fn gemv_norm(x: &Tensor, y: &Tensor, g: &Tensor, eps: f64, w: &Tensor) -> Result<(Tensor, Tensor)> {
    let k = x.dim(1)?;
    let n = w.dim(0)?;
    let both = x.apply_op3_no_bwd(y, w, &GemvNorm { g, eps: eps as f32 })?;
    Ok((both.narrow(0, 0, k)?.reshape((1, k))?, both.narrow(0, k, n)?.reshape((1, n))?))
}

struct GemvNorm<'a> {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    g: &'a Tensor,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    eps: f32,
}

impl CustomOp3 for GemvNorm<'_> {
    fn name(&self) -> &'static str {
        "refrag-gemv-norm"
    }

    cuda_only!(op3, "the fused norm and gemv kernel");

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

        let (rows, k) = xl.shape().dims2()?;
        let (n, wk) = wl.shape().dims2()?;
        let aligned = |l: &Layout| l.is_contiguous() && l.start_offset().is_multiple_of(8);
        let g_ok = self.g.dims() == [k] && self.g.is_contiguous() && self.g.layout().start_offset().is_multiple_of(8);
        if rows != 1 || yl.shape() != xl.shape() || wk != k || k >= 1024 || !k.is_multiple_of(8) || !g_ok {
            bail!(
                "gemv-norm: x, y [1, k < 1024], g [k], w [n, k]; got {:?}, {:?}, {:?}",
                xl.shape(),
                self.g.shape(),
                wl.shape()
            );
        }
        if !(aligned(xl) && aligned(yl) && aligned(wl)) {
            bail!("gemv-norm: contiguous, 16-byte aligned rows");
        }
        let dev = x.device().clone();
        let func = dev.get_or_load_custom_func("refrag_gemv_norm_bf16", "refrag_elementwise", PTX)?;
        let stream = dev.cuda_stream();
        let (xs, ys, ws) = (
            x.as_cuda_slice::<bf16>()?.slice(xl.start_offset()..),
            y.as_cuda_slice::<bf16>()?.slice(yl.start_offset()..),
            w.as_cuda_slice::<bf16>()?.slice(wl.start_offset()..),
        );
        let g = super::device_ptr::<bf16>(self.g, &stream)?;
        // SAFETY: block 0 writes the k sums, one warp each of the n products.
        let out = unsafe { dev.alloc::<bf16>(k + n)? };
        {
            let (sum, prod) = (out.slice(..k), out.slice(k..));
            let (n_, k_) = (n as i32, k as i32);
            let mut launch = func.builder();
            launch.arg(&xs).arg(&ys).arg(&g).arg(&self.eps).arg(&ws).arg(&prod).arg(&sum).arg(&n_).arg(&k_);
            // the k sums (f32) and the normed row (bf16)
            let shared = (k * 6) as u32;
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(8) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: shared,
            };
            // SAFETY: the arguments match the kernel's signature; the shapes were checked above.
            unsafe { launch.launch(cfg) }.w()?;
        }
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev), Shape::from(k + n)))
    }
}

/// The index of each row's largest value over the last dimension, equal ones chosen as
/// candle's argmax chooses (what greedy sampling called): u32 [..]. On CUDA with these kernels
/// on, for f32 rows of a multiple of 4 values and at least 1,024 of them: two small launches
/// (candle's kernel walks a 49,152-value row with one block, ~38 us on an H200, ~3% of a
/// decoding step). Elsewhere candle's argmax.
pub fn argmax(x: &Tensor) -> Result<Tensor> {
    let n = x.dims().last().copied().unwrap_or(0);
    let fits = enabled()
        && x.device().is_cuda()
        && x.dtype() == candle_core::DType::F32
        && n >= 1024
        && n.is_multiple_of(4)
        && x.is_contiguous()
        && x.layout().start_offset().is_multiple_of(4);
    if !fits {
        return x.argmax(candle_core::D::Minus1);
    }
    let rows = x.elem_count() / n;
    let out = x.reshape((rows, n))?.apply_op1_no_bwd(&ArgmaxRows)?;
    out.reshape(&x.dims()[..x.rank() - 1])
}

struct ArgmaxRows;

impl CustomOp1 for ArgmaxRows {
    fn name(&self) -> &'static str {
        "refrag-argmax"
    }

    cuda_only!(op1, "the argmax kernels");

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, x: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        use candle_core::{backend::BackendStorage, bail};

        let (rows, n) = l.shape().dims2()?;
        if !l.is_contiguous() || !n.is_multiple_of(4) || !l.start_offset().is_multiple_of(4) {
            bail!("argmax: contiguous f32 rows of a multiple of 4 values, got {:?}", l.shape());
        }
        /// Values per block of the first kernel (elementwise.cu's ARGMAX_SPAN).
        const SPAN: usize = 4096;
        let parts = n.div_ceil(SPAN);
        let dev = x.device().clone();
        let part = dev.get_or_load_custom_func("refrag_argmax_part_f32", "refrag_elementwise", PTX)?;
        let best = dev.get_or_load_custom_func("refrag_argmax_rows", "refrag_elementwise", PTX)?;
        let src = x.as_cuda_slice::<f32>()?.slice(l.start_offset()..);
        // SAFETY: every block writes its part; the second kernel writes every row.
        let part_v = unsafe { dev.alloc::<f32>(rows * parts)? };
        let part_i = unsafe { dev.alloc::<u32>(rows * parts)? };
        let out = unsafe { dev.alloc::<u32>(rows)? };
        let (n_, parts_) = (n as i32, parts as i32);
        let mut launch = part.builder();
        launch.arg(&src).arg(&part_v).arg(&part_i).arg(&n_).arg(&parts_);
        let cfg =
            LaunchConfig { grid_dim: (parts as u32, rows as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments match the kernel's signature; the shape was checked above.
        unsafe { launch.launch(cfg) }.w()?;
        let mut launch = best.builder();
        launch.arg(&part_v).arg(&part_i).arg(&out).arg(&parts_);
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: as above.
        unsafe { launch.launch(cfg) }.w()?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev), Shape::from(rows)))
    }
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

/// 16-byte pieces of a row each thread of the add-norm kernel holds (elementwise.cu's
/// ADD_NORM_PIECES).
const ADD_NORM_PIECES: usize = 3;

/// The add-norm kernel's block: candle's rms-norm kernel's (one warp below 1024 columns), for
/// the same order of the sum of squares, so the same rounding of the norm.
fn add_norm_block(hidden: usize) -> usize {
    if hidden < 1024 {
        32
    } else {
        1024
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
        let aligned = [xl, yl, wl].iter().all(|l| l.is_contiguous() && l.start_offset().is_multiple_of(8));
        let block = add_norm_block(hidden);
        if !(aligned && hidden.is_multiple_of(8) && hidden <= 12_288 && hidden / 8 <= ADD_NORM_PIECES * block) {
            bail!(
                "fused add-norm: contiguous, 16-byte aligned rows of a multiple of 8 values (<= 12288), got {:?}",
                xl.shape()
            );
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
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (block as u32, 1, 1),
            shared_mem_bytes: (hidden * std::mem::size_of::<f32>()) as u32,
        };
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
    for (b, t, hidden, ffn) in [(1, 1, 576, 1536), (2, 1, 576, 1536), (1, 517, 576, 1536), (1, 3, 2048, 40)] {
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
    // gemv: against candle's matmul (sums in another order: bf16 rounding of ~1-30-sized
    // outputs, so compared relative to the output's scale)
    if gemv_enabled() && device.is_cuda() {
        for (n, k) in [(960usize, 576usize), (576, 1536), (49_152, 576), (13, 8)] {
            let x = bf(Tensor::randn(0f32, 1.0, (1, k), device)?)?;
            let w = bf(Tensor::randn(0f32, 1.0, (n, k), device)?)?;
            let want = x.matmul(&w.t()?)?;
            let scale: f32 = want.to_dtype(DType::F32)?.abs()?.flatten_all()?.max(0)?.to_scalar()?;
            worst = worst.max(diff(&gemv(&x, &w)?, &want)? / scale.max(1.0));
            // the norm inside: the same bits as add-norm, then gemv
            if k < 1024 && gemv_norm_fits(&x, &x, &Tensor::ones(k, DType::BF16, device)?, &w) {
                let (xr, yr) =
                    (bf(Tensor::randn(0f32, 1.0, (1, k), device)?)?, bf(Tensor::randn(0f32, 1.0, (1, k), device)?)?);
                let g = bf((Tensor::rand(0f32, 1.0, k, device)? + 0.5)?)?;
                let (sum, prod) = gemv_norm(&xr, &yr, &g, 1e-5, &w)?;
                let (want_sum, normed) = add_rms_norm(&xr, &yr, &g, 1e-5)?;
                // the same bits, or a failure
                if diff(&sum, &want_sum)? > 0.0 || diff(&prod, &gemv(&normed, &w)?)? > 0.0 {
                    worst = worst.max(1.0);
                }
            }
            // the activation inside: the same as silu-mul, then gemv
            let gu = bf(Tensor::randn(0f32, 2.0, (1, 2 * k), device)?)?;
            worst = worst.max(diff(&gemv_silu(&gu, &w)?, &gemv(&silu_mul(&gu)?, &w)?)?);
        }
    }
    // argmax: candle's indices (what greedy sampling picked; a mismatch counts as an error of
    // 1), for a vocabulary's row, rows not a multiple of the kernel's span, and rows whose
    // maximum comes twice (candle's picks: 300 over 1030, 900 over 5)
    for (rows, n) in [(1usize, 49_152usize), (3, 2000), (2, 4100)] {
        let x = Tensor::randn(0f32, 1.0, (rows, n), device)?;
        let x = if rows == 3 {
            let top = Tensor::full(10f32, (1, 1), device)?;
            let x = x.slice_assign(&[0..1, 300..301], &top)?.slice_assign(&[0..1, 1030..1031], &top)?;
            x.slice_assign(&[1..2, 5..6], &top)?.slice_assign(&[1..2, 900..901], &top)?
        } else {
            x
        };
        let got: Vec<u32> = argmax(&x)?.to_vec1()?;
        let want: Vec<u32> = x.argmax(candle_core::D::Minus1)?.to_vec1()?;
        if got != want {
            worst = worst.max(1.0);
        }
    }
    Ok(worst)
}
