//! Fused kernels with a gradient, for training.
//!
//! candle's fused rms-norm, interleaved rope and last-dim softmax have no backward, so training
//! used to run their op-by-op versions: ~10 kernels and as many saved activations for each
//! norm, rope and softmax in every layer, forward and backward. Here the fused kernel computes
//! the forward, a custom op hands its result to autograd (one copy), and the gradient is written
//! out in a few ops:
//! - rms-norm, y = x w / sqrt(mean(x^2) + eps): dx = r (g w) - x r^3 mean(g w x), r = 1/sqrt(..)
//!   (the norm weight is frozen in training, so it gets no gradient);
//! - interleaved rope (a rotation per pair): dx = rope(g, cos, -sin), the inverse rotation;
//! - softmax: dx = y (g - sum(g y));
//! - cross-entropy of logits x against targets t, per row lse(x) - x_t: dx = g (softmax(x) -
//!   onehot(t)). Autograd keeps the logits and the row's log-sum-exp only, not log-softmax's
//!   full-size intermediates (the largest tensors of a training step: target tokens x the
//!   49152-token vocabulary).
//!
//! On CUDA in bf16 the cross-entropy (forward and backward) and the rms-norm's backward are
//! one kernel each (src/model/diffops.cu) that reads the bf16 tensors and computes in f32:
//! candle's ops cast the logits and the norms' inputs to f32 and ran ~10 launches over them.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D};

enum Grad {
    Rms {
        w: Tensor,
        eps: f64,
    },
    Rope {
        cos: Tensor,
        sin: Tensor,
    },
    Softmax,
    /// `tgt` [n, 1] u32, `lse` [n, 1] f32 (the kernels' path: both [n])
    CrossEntropy {
        tgt: Tensor,
        lse: Tensor,
    },
    /// `w` [out, in]: the frozen weight of `x w^T`
    Frozen {
        w: Tensor,
    },
}

/// Returns the precomputed fused result; its backward is `grad`'s formula. The forward copies
/// the result into the op's output and lets go of it: the graph keeps the op until the backward
/// pass, and holding the result too would keep every fused output twice (a softmax's attention
/// weights, a linear's activations) for the whole pass.
struct WithGrad {
    y: Handed,
    grad: Grad,
}

impl CustomOp1 for WithGrad {
    fn name(&self) -> &'static str {
        "refrag-fused-with-grad"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.y.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        self.y.cuda()
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let dx = match &self.grad {
            Grad::Softmax => {
                let s = (g * y)?.sum_keepdim(D::Minus1)?;
                (g.broadcast_sub(&s)? * y)?
            }
            Grad::CrossEntropy { tgt, lse } if kernels(x) => {
                let stats = Tensor::cat(&[lse, &g.to_dtype(DType::F32)?], 0)?;
                x.contiguous()?.apply_op3_no_bwd(tgt, &stats, &CeBackward)?
            }
            Grad::CrossEntropy { tgt, lse } => {
                let x32 = x.to_dtype(DType::F32)?;
                let g = g.to_dtype(DType::F32)?.unsqueeze(1)?;
                let p = x32.broadcast_sub(lse)?.exp()?.broadcast_mul(&g)?;
                p.scatter_add(tgt, &g.neg()?, 1)?.to_dtype(x.dtype())?
            }
            Grad::Frozen { w } => g.matmul(w)?,
            Grad::Rope { cos, sin } => rope_grad(g, cos, sin)?,
            Grad::Rms { w, eps } => rms_norm_grad(x, g, w, *eps)?,
        };
        Ok(Some(dx))
    }
}

/// The gradient to `x` of `rms_norm(x, w)` from the output's gradient `g` (the weight is
/// frozen): one kernel on CUDA in bf16, written out in f32 elsewhere.
pub(crate) fn rms_norm_grad(x: &Tensor, g: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if kernels(x) {
        return x.contiguous()?.apply_op3_no_bwd(&g.contiguous()?, w, &RmsBackward { eps: eps as f32, res: None });
    }
    let x32 = x.to_dtype(DType::F32)?;
    let gw = g.to_dtype(DType::F32)?.broadcast_mul(&w.to_dtype(DType::F32)?)?;
    let r = (x32.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let m = (&gw * &x32)?.mean_keepdim(D::Minus1)?;
    let dx = (gw.broadcast_mul(&r)? - x32.broadcast_mul(&(r.powf(3.0)? * m)?)?)?;
    dx.to_dtype(x.dtype())
}

/// `res` plus [`rms_norm_grad`]: on CUDA in bf16 one kernel (the sum in f32, rounded once).
pub(crate) fn rms_norm_grad_add(x: &Tensor, g: &Tensor, w: &Tensor, eps: f64, res: &Tensor) -> Result<Tensor> {
    if kernels(x) && res.dtype() == DType::BF16 && res.shape() == x.shape() {
        let op = RmsBackward { eps: eps as f32, res: Some(res.contiguous()?) };
        return x.contiguous()?.apply_op3_no_bwd(&g.contiguous()?, w, &op);
    }
    res + rms_norm_grad(x, g, w, eps)?
}

/// The gradients of `silu(g) * u` to `g` and `u` from its gradient `da`: one kernel on CUDA
/// in bf16 (f32 arithmetic), candle's ops elsewhere.
pub(crate) fn silu_mul_grad(g: &Tensor, u: &Tensor, da: &Tensor) -> Result<(Tensor, Tensor)> {
    if kernels(g) && u.dtype() == DType::BF16 && da.dtype() == DType::BF16 {
        let both = g.contiguous()?.apply_op3_no_bwd(&u.contiguous()?, &da.contiguous()?, &SiluMulBackward)?;
        return Ok((both.get(0)?, both.get(1)?));
    }
    let sg = candle_nn::ops::sigmoid(g)?;
    let silu = (g * &sg)?;
    let du = (da * &silu)?;
    // silu'(g) = sg + silu (1 - sg)
    let dsilu = ((&sg + &silu)? - (&silu * &sg)?)?;
    let dg = ((da * u)? * dsilu)?;
    Ok((dg, du))
}

/// The gradient to `x` of the interleaved `rope_i(x, cos, sin)` from the output's gradient
/// `g`: the inverse rotation.
pub(crate) fn rope_grad(g: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    candle_nn::rotary_emb::rope_i(&g.contiguous()?, cos, &sin.neg()?)
}

/// A result computed before its custom op runs, handed to the op's output by one copy: the
/// forward of ops whose gradient is written out ([`WithGrad`],
/// [`crate::model::layer_grad`]). Taken once, so the graph does not keep it twice.
pub(crate) struct Handed(std::sync::Mutex<Option<Tensor>>);

impl Handed {
    /// `y` as the op's future output: a view into a larger storage (a narrowed tensor) is
    /// copied into one of its own first, since the output takes the storage from its start.
    pub(crate) fn new(y: Tensor) -> Result<Self> {
        let y = if y.is_contiguous() && y.layout().start_offset() == 0 { y } else { y.force_contiguous()? };
        Ok(Self(std::sync::Mutex::new(Some(y))))
    }

    fn take(&self) -> Result<Tensor> {
        let y = self.0.lock().map_err(|_| candle_core::Error::Msg("fused-with-grad: poisoned".into()))?.take();
        y.ok_or_else(|| candle_core::Error::Msg("fused-with-grad: forward ran twice".into()))
    }

    pub(crate) fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let y = self.take()?;
        let (s, l) = y.storage_and_layout();
        match &*s {
            Storage::Cpu(c) => Ok((c.try_clone(l)?, l.shape().clone())),
            _ => candle_core::bail!("fused-with-grad: result and input on different devices"),
        }
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = self.take()?;
        let (s, l) = y.storage_and_layout();
        match &*s {
            Storage::Cuda(c) => Ok((c.try_clone(l)?, l.shape().clone())),
            _ => candle_core::bail!("fused-with-grad: result and input on different devices"),
        }
    }
}

/// `REFRAG_OP_BY_OP=1`: train with candle's op-by-op versions instead (for side-by-side speed
/// and numerics checks on a new device).
pub fn op_by_op() -> bool {
    static FLAG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FLAG.get_or_init(|| std::env::var("REFRAG_OP_BY_OP").is_ok_and(|v| v == "1"))
}

/// Whether `x`'s gradients go through diffops.cu's kernels: CUDA and bf16 (the training dtype
/// there), unless `REFRAG_OP_BY_OP=1`.
fn kernels(x: &Tensor) -> bool {
    cfg!(feature = "cuda") && x.device().is_cuda() && x.dtype() == DType::BF16 && !op_by_op()
}

/// The op's forward hands on `y`'s storage from its start: a view into a larger storage (a
/// narrowed tensor) is copied into one of its own first.
fn attach(x: &Tensor, y: Tensor, grad: Grad) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(y);
    }
    x.apply_op1(WithGrad { y: Handed::new(y)?, grad })
}

/// `x` [rows, in] times the transpose of a frozen weight `w` [out, in], with a gradient to `x`
/// only. candle's matmul backward computes a gradient for both operands, so every frozen
/// decoder matrix cost a second matmul as large as the forward's, and a weight-sized buffer,
/// for a gradient no optimizer reads.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if op_by_op() || !x.track_op() {
        return x.matmul(&w.t()?);
    }
    let y = x.detach().matmul(&w.t()?)?;
    attach(x, y, Grad::Frozen { w: w.clone() })
}

/// RMS norm over the last dimension (fused forward; gradient to `x` only).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    if op_by_op() {
        return candle_nn::ops::rms_norm_slow(x, w, eps);
    }
    let y = candle_nn::ops::rms_norm(&x.contiguous()?, w, eps)?;
    attach(x, y, Grad::Rms { w: w.clone(), eps: eps as f64 })
}

/// Interleaved rotary embedding of `x` [b, h, t, d] (fused forward; gradient to `x` only).
pub fn rope_i(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if op_by_op() {
        return candle_nn::rotary_emb::rope_i_slow(x, cos, sin);
    }
    let y = candle_nn::rotary_emb::rope_i(x, cos, sin)?;
    attach(x, y, Grad::Rope { cos: cos.clone(), sin: sin.clone() })
}

/// Softmax over the last dimension (fused forward).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if op_by_op() {
        return candle_nn::ops::softmax(x, D::Minus1);
    }
    let y = candle_nn::ops::softmax_last_dim(&x.contiguous()?)?;
    attach(x, y, Grad::Softmax)
}

/// Mean cross-entropy of `logits` [n, v] against `targets` [n] (u32), as
/// `candle_nn::loss::cross_entropy`, with a written-out gradient (module doc).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if op_by_op() {
        // in f32, as the kernels' loss: a bf16 loss cannot be added to the other (f32) terms
        return candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, targets);
    }
    if kernels(logits) {
        let n = logits.dim(0)?;
        let tgt = targets.to_dtype(DType::U32)?.contiguous()?;
        // [lse; loss], f32
        let out = logits.detach().contiguous()?.apply_op2_no_bwd(&tgt, &CeForward)?;
        return attach(logits, out.narrow(0, n, n)?, Grad::CrossEntropy { tgt, lse: out.narrow(0, 0, n)? })?.mean_all();
    }
    let x = logits.detach().to_dtype(DType::F32)?;
    let m = x.max_keepdim(1)?;
    let lse = (x.broadcast_sub(&m)?.exp()?.sum_keepdim(1)?.log()? + &m)?;
    let tgt = targets.to_dtype(DType::U32)?.unsqueeze(1)?.contiguous()?;
    let rows = (&lse - x.gather(&tgt, 1)?)?.squeeze(1)?.to_dtype(logits.dtype())?.contiguous()?;
    attach(logits, rows, Grad::CrossEntropy { tgt, lse })?.mean_all()
}

/// Per row of bf16 logits [n, v] and u32 targets [n]: log-sum-exp and loss, as f32 [2n]
/// (`lse` then `lse - x[t]`).
struct CeForward;

/// The cross-entropy's gradient to bf16 logits [n, v], from targets [n] and f32 [2n] (`lse`,
/// then the rows' incoming gradient).
struct CeBackward;

/// The rms-norm's gradient to its bf16 input from (x, g, w), plus `res` when given.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct RmsBackward {
    eps: f32,
    res: Option<Tensor>,
}

/// The gradients of `silu(g) * u` from (g, u, da), bf16, same shapes: [2, ..] (dg, du).
struct SiluMulBackward;

impl CustomOp2 for CeForward {
    fn name(&self) -> &'static str {
        "refrag-ce-forward"
    }

    cuda_only!(op2, "the fused cross-entropy kernel");

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        t: &candle_core::CudaStorage,
        tl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let (n, v) = xl.shape().dims2()?;
        if !xl.is_contiguous() || !tl.is_contiguous() || tl.shape().dims() != [n] {
            candle_core::bail!(
                "fused cross-entropy: contiguous [n, v] logits and [n] targets, got {:?}, {:?}",
                xl.shape(),
                tl.shape()
            );
        }
        let dev = x.device().clone();
        let func = dev.get_or_load_custom_func("refrag_ce_fwd_bf16", "refrag_diffops", PTX)?;
        let xs = x.as_cuda_slice::<half::bf16>()?.slice(xl.start_offset()..);
        let ts = t.as_cuda_slice::<u32>()?.slice(tl.start_offset()..);
        // SAFETY: each row's block writes its lse and loss.
        let out = unsafe { dev.alloc::<f32>(2 * n)? };
        let cfg = LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        let (n_, v_) = (n as i32, v as i32);
        let mut launch = func.builder();
        launch.arg(&xs).arg(&ts).arg(&out).arg(&n_).arg(&v_);
        // SAFETY: the arguments match the kernel's signature; the shapes were checked above.
        unsafe { launch.launch(cfg) }.w()?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev), Shape::from(2 * n)))
    }
}

impl CustomOp3 for CeBackward {
    fn name(&self) -> &'static str {
        "refrag-ce-backward"
    }

    cuda_only!(op3, "the fused cross-entropy kernel");

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        t: &candle_core::CudaStorage,
        tl: &Layout,
        s: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let (n, v) = xl.shape().dims2()?;
        if !(xl.is_contiguous() && tl.is_contiguous() && sl.is_contiguous())
            || tl.shape().dims() != [n]
            || sl.shape().dims() != [2 * n]
        {
            candle_core::bail!(
                "fused cross-entropy backward: shapes {:?}, {:?}, {:?}",
                xl.shape(),
                tl.shape(),
                sl.shape()
            );
        }
        let dev = x.device().clone();
        let func = dev.get_or_load_custom_func("refrag_ce_bwd_bf16", "refrag_diffops", PTX)?;
        let xs = x.as_cuda_slice::<half::bf16>()?.slice(xl.start_offset()..);
        let ts = t.as_cuda_slice::<u32>()?.slice(tl.start_offset()..);
        let lse = s.as_cuda_slice::<f32>()?.slice(sl.start_offset()..sl.start_offset() + n);
        let g = s.as_cuda_slice::<f32>()?.slice(sl.start_offset() + n..);
        // SAFETY: every element gets one thread.
        let dx = unsafe { dev.alloc::<half::bf16>(n * v)? };
        let block = 256u32;
        let cfg = LaunchConfig {
            grid_dim: (n as u32, (v as u32).div_ceil(block), 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n_, v_) = (n as i32, v as i32);
        let mut launch = func.builder();
        launch.arg(&xs).arg(&ts).arg(&lse).arg(&g).arg(&dx).arg(&n_).arg(&v_);
        // SAFETY: the arguments match the kernel's signature; the shapes were checked above.
        unsafe { launch.launch(cfg) }.w()?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(dx, dev), xl.shape().clone()))
    }
}

impl CustomOp3 for RmsBackward {
    fn name(&self) -> &'static str {
        "refrag-rms-norm-backward"
    }

    cuda_only!(op3, "the fused rms-norm backward kernel");

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        use half::bf16;
        let hidden = *xl.shape().dims().last().unwrap_or(&0);
        if xl.shape() != gl.shape() || wl.shape().dims() != [hidden] || hidden == 0 {
            candle_core::bail!("fused rms-norm backward: shapes {:?}, {:?}, {:?}", xl.shape(), gl.shape(), wl.shape());
        }
        if !(xl.is_contiguous() && gl.is_contiguous() && wl.is_contiguous()) {
            candle_core::bail!("fused rms-norm backward: inputs must be contiguous");
        }
        let rows = xl.shape().elem_count() / hidden;
        let dev = x.device().clone();
        let name = if self.res.is_some() { "refrag_rms_norm_bwd_add_bf16" } else { "refrag_rms_norm_bwd_bf16" };
        let func = dev.get_or_load_custom_func(name, "refrag_diffops", PTX)?;
        let (xs, gs, ws) = (
            x.as_cuda_slice::<bf16>()?.slice(xl.start_offset()..),
            g.as_cuda_slice::<bf16>()?.slice(gl.start_offset()..),
            w.as_cuda_slice::<bf16>()?.slice(wl.start_offset()..),
        );
        // SAFETY: every row is written by its block.
        let dx = unsafe { dev.alloc::<bf16>(rows * hidden)? };
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        let (rows_, hidden_) = (rows as i32, hidden as i32);
        let mut launch = func.builder();
        let stream = dev.cuda_stream();
        let res = match &self.res {
            Some(r) if r.shape() == xl.shape() && r.is_contiguous() => Some(super::device_ptr::<bf16>(r, &stream)?),
            Some(_) => candle_core::bail!("fused rms-norm backward: the residual gradient's shape"),
            None => None,
        };
        launch.arg(&xs).arg(&gs).arg(&ws);
        if let Some(r) = &res {
            launch.arg(r);
        }
        launch.arg(&dx).arg(&rows_).arg(&hidden_).arg(&self.eps);
        // SAFETY: the arguments match the kernel's signature; the shapes were checked above.
        unsafe { launch.launch(cfg) }.w()?;
        drop(launch);
        Ok((candle_core::CudaStorage::wrap_cuda_slice(dx, dev), xl.shape().clone()))
    }
}

impl CustomOp3 for SiluMulBackward {
    fn name(&self) -> &'static str {
        "refrag-silu-mul-backward"
    }

    cuda_only!(op3, "the fused silu-mul backward kernel");

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        u: &candle_core::CudaStorage,
        ul: &Layout,
        da: &candle_core::CudaStorage,
        dl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        use half::bf16;
        if gl.shape() != ul.shape() || gl.shape() != dl.shape() {
            candle_core::bail!("fused silu-mul backward: shapes {:?}, {:?}, {:?}", gl.shape(), ul.shape(), dl.shape());
        }
        if !(gl.is_contiguous() && ul.is_contiguous() && dl.is_contiguous()) {
            candle_core::bail!("fused silu-mul backward: inputs must be contiguous");
        }
        let n = gl.shape().elem_count();
        let dev = g.device().clone();
        let func = dev.get_or_load_custom_func("refrag_silu_mul_bwd_bf16", "refrag_diffops", PTX)?;
        let (gs, us, ds) = (
            g.as_cuda_slice::<bf16>()?.slice(gl.start_offset()..),
            u.as_cuda_slice::<bf16>()?.slice(ul.start_offset()..),
            da.as_cuda_slice::<bf16>()?.slice(dl.start_offset()..),
        );
        // SAFETY: every element of both halves is written.
        let out = unsafe { dev.alloc::<bf16>(2 * n)? };
        let block = 256u32;
        let grid = (n as u32).div_ceil(block).clamp(1, 132 * 16);
        let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 };
        let n_ = n as i64;
        let mut launch = func.builder();
        launch.arg(&gs).arg(&us).arg(&ds).arg(&out).arg(&n_);
        // SAFETY: the arguments match the kernel's signature; the shapes were checked above.
        unsafe { launch.launch(cfg) }.w()?;
        let mut dims = vec![2];
        dims.extend_from_slice(gl.shape().dims());
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev), Shape::from(dims)))
    }
}

/// The PTX of diffops.cu.
#[cfg(feature = "cuda")]
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/diffops.ptx"));

/// The training kernels (cross-entropy forward and backward, rms-norm backward) against the
/// same ops in f32 on `device`, on random bf16 inputs: the largest relative error of a loss
/// or a whole gradient (bf16 rounding: ~1e-2; a wrong index: ~1). Where the kernels do not
/// run (the CPU, f32), both sides are the same ops.
pub fn parity(device: &candle_core::Device) -> anyhow::Result<f32> {
    use candle_core::Var;
    let rel = |a: &Tensor, b: &Tensor| -> anyhow::Result<f32> {
        let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
        let num = (&a - &b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        Ok(num / b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?.max(1e-12))
    };
    // gradient of sum(f(x) * c) with respect to x, for x of the given dtype
    let grad_of = |x: &Tensor, c: &Tensor, f: &dyn Fn(&Tensor) -> Result<Tensor>| -> anyhow::Result<(Tensor, Tensor)> {
        let v = Var::from_tensor(x)?;
        let y = f(v.as_tensor())?;
        let g = (y.to_dtype(DType::F32)? * c)?.sum_all()?.backward()?;
        let dx = g.get(v.as_tensor()).ok_or_else(|| anyhow::anyhow!("no gradient"))?.clone();
        Ok((y, dx))
    };
    let mut worst = 0f32;
    let (n, v) = (37, 1000);
    let tgt = Tensor::rand(0f32, v as f32, n, device)?.to_dtype(DType::U32)?;
    // the targets' logits raised well above the rest, so that a loss far below the log-sum-exp
    // tells a wrong half of the kernel's [lse; loss] apart
    let hit = Tensor::zeros((n, v), DType::F32, device)?.scatter_add(
        &tgt.unsqueeze(1)?,
        &Tensor::full(8f32, (n, 1), device)?,
        1,
    )?;
    let logits = (Tensor::randn(0f32, 3.0, (n, v), device)? + hit)?.to_dtype(DType::BF16)?;
    let one = Tensor::ones((), DType::F32, device)?;
    let (l1, d1) = grad_of(&logits, &one, &|t| cross_entropy(t, &tgt))?;
    let (l2, d2) = grad_of(&logits.to_dtype(DType::F32)?, &one, &|t| cross_entropy(t, &tgt))?;
    worst = worst.max(rel(&l1, &l2)?).max(rel(&d1, &d2)?);
    let x = Tensor::randn(0f32, 2.0, (3, 5, 576), device)?.to_dtype(DType::BF16)?;
    let w = (Tensor::rand(0f32, 1.0, 576, device)? + 0.5)?;
    let c = Tensor::randn(0f32, 1.0, (3, 5, 576), device)?;
    let w16 = w.to_dtype(DType::BF16)?;
    let (_, d1) = grad_of(&x, &c, &|t| rms_norm(t, &w16, 1e-5))?;
    let (_, d2) = grad_of(&x.to_dtype(DType::F32)?, &c, &|t| rms_norm(t, &w, 1e-5))?;
    worst = worst.max(rel(&d1, &d2)?);
    // the layer op's kernels: the norm's gradient plus a residual one, silu-mul's gradients
    let (g16, r) = (c.to_dtype(DType::BF16)?, Tensor::randn(0f32, 1.0, (3, 5, 576), device)?);
    let a1 = rms_norm_grad_add(&x, &g16, &w16, 1e-5, &r.to_dtype(DType::BF16)?)?;
    let a2 = rms_norm_grad_add(&x.to_dtype(DType::F32)?, &c, &w, 1e-5, &r)?;
    worst = worst.max(rel(&a1, &a2)?);
    let (g, u) = (&x, (&x * 0.7)?.sin()?);
    let (dg1, du1) = silu_mul_grad(g, &u, &g16)?;
    let (dg2, du2) = silu_mul_grad(&g.to_dtype(DType::F32)?, &u.to_dtype(DType::F32)?, &c)?;
    Ok(worst.max(rel(&dg1, &dg2)?).max(rel(&du1, &du2)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Gradient of sum(f(x) * c) for a fixed random c, through `f`.
    fn grad(x: &Var, c: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> (Tensor, Tensor) {
        let y = f(x.as_tensor()).unwrap();
        let g = (&y * c).unwrap().sum_all().unwrap().backward().unwrap();
        (y, g.get(x.as_tensor()).unwrap().clone())
    }

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < tol, "max difference {d}");
    }

    #[test]
    fn fused_ops_match_the_op_by_op_versions_and_their_gradients() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap();
        let c = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap();
        // rms-norm
        let w = Tensor::randn(1f32, 0.2, 8, &dev).unwrap();
        let (y1, g1) = grad(&x, &c, |t| rms_norm(t, &w, 1e-5));
        let (y2, g2) = grad(&x, &c, |t| candle_nn::ops::rms_norm_slow(t, &w, 1e-5));
        close(&y1, &y2, 1e-5);
        close(&g1, &g2, 1e-4);
        // interleaved rope
        let cos = Tensor::randn(0f32, 1.0, (5, 4), &dev).unwrap();
        let sin = Tensor::randn(0f32, 1.0, (5, 4), &dev).unwrap();
        let (y1, g1) = grad(&x, &c, |t| rope_i(t, &cos, &sin));
        let (y2, g2) = grad(&x, &c, |t| candle_nn::rotary_emb::rope_i_slow(t, &cos, &sin));
        close(&y1, &y2, 1e-5);
        close(&g1, &g2, 1e-4);
        // softmax
        let (y1, g1) = grad(&x, &c, softmax_last_dim);
        let (y2, g2) = grad(&x, &c, |t| candle_nn::ops::softmax(t, D::Minus1));
        close(&y1, &y2, 1e-5);
        close(&g1, &g2, 1e-5);
        // cross-entropy: value and gradient to the logits
        let logits = Var::randn(0f32, 3.0, (7, 11), &dev).unwrap();
        let tgt = Tensor::new(&[0u32, 10, 3, 3, 7, 1, 5], &dev).unwrap();
        let one = Tensor::ones((), DType::F32, &dev).unwrap();
        let (l1, d1) = grad(&logits, &one, |t| cross_entropy(t, &tgt));
        let (l2, d2) = grad(&logits, &one, |t| candle_nn::loss::cross_entropy(t, &tgt));
        close(&l1, &l2, 1e-5);
        close(&d1, &d2, 1e-6);
        assert!(d1.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.1);
        // a frozen linear: the matmul's value and gradient to x, none to the weight
        let x2 = Var::randn(0f32, 1.0, (6, 8), &dev).unwrap();
        let w2 = Var::randn(0f32, 1.0, (5, 8), &dev).unwrap();
        let c2 = Tensor::randn(0f32, 1.0, (6, 5), &dev).unwrap();
        let y1 = frozen_linear(x2.as_tensor(), w2.as_tensor()).unwrap();
        let y2 = x2.as_tensor().matmul(&w2.as_tensor().t().unwrap()).unwrap();
        let g1 = (&y1 * &c2).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&y2 * &c2).unwrap().sum_all().unwrap().backward().unwrap();
        close(&y1, &y2, 1e-5);
        close(g1.get(x2.as_tensor()).unwrap(), g2.get(x2.as_tensor()).unwrap(), 1e-5);
        assert!(g1.get(w2.as_tensor()).is_none() && g2.get(w2.as_tensor()).is_some());
        // untracked input: the plain fused result
        let plain = rms_norm(&c, &w, 1e-5).unwrap();
        assert!(!plain.track_op());
        // a result that is a view into a larger storage (the cross-entropy kernel's loss half of
        // [lse; loss]) is handed on as the view, not as the storage's start
        let both = Tensor::new(&[1f32, 2., 3., 10., 20., 30.], &dev).unwrap();
        let x3 = Var::randn(0f32, 1.0, 3, &dev).unwrap();
        let y3 = attach(x3.as_tensor(), both.narrow(0, 3, 3).unwrap(), Grad::Softmax).unwrap();
        assert_eq!(y3.to_vec1::<f32>().unwrap(), [10., 20., 30.]);
    }

    /// The parity check that `refrag doctor` runs on the GPU runs here too (the op-by-op path
    /// in bf16 against f32): small, and not zero-by-construction.
    #[test]
    fn parity_of_bf16_training_ops_with_f32() {
        let e = parity(&Device::Cpu).unwrap();
        assert!(e > 0.0 && e < 3e-2, "relative error {e}");
    }

    /// In bf16 (the decoder's dtype on CUDA) the fused versions' gradients stay as close to the
    /// f32 gradient as candle's op-by-op versions do (relative error of the whole gradient).
    #[test]
    fn fused_gradients_in_bf16_are_as_close_to_f32_as_op_by_op() {
        let dev = Device::Cpu;
        let x32 = (Tensor::randn(0f32, 1.0, (2, 9, 48, 64), &dev).unwrap() * 4.0).unwrap();
        let c = Tensor::randn(0f32, 1.0, (2, 9, 48, 64), &dev).unwrap();
        let rel = |f: &dyn Fn(&Tensor) -> Result<Tensor>, g: &dyn Fn(&Tensor) -> Result<Tensor>| -> (f32, f32) {
            let reference = grad(&Var::from_tensor(&x32).unwrap(), &c, |t| g(t)).1;
            let x16 = Var::from_tensor(&x32.to_dtype(DType::BF16).unwrap()).unwrap();
            let c16 = c.to_dtype(DType::BF16).unwrap();
            let err = |d: Tensor| {
                let d = d.to_dtype(DType::F32).unwrap();
                let num = (&d - &reference)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .sqrt()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                num / reference.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap()
            };
            (err(grad(&x16, &c16, |t| f(t)).1), err(grad(&x16, &c16, |t| g(t)).1))
        };
        let w = Tensor::randn(1f32, 0.2, 64, &dev).unwrap();
        let w16 = w.to_dtype(DType::BF16).unwrap();
        let cos = Tensor::randn(0f32, 1.0, (48, 32), &dev).unwrap();
        let sin = Tensor::randn(0f32, 1.0, (48, 32), &dev).unwrap();
        let (cos16, sin16) = (cos.to_dtype(DType::BF16).unwrap(), sin.to_dtype(DType::BF16).unwrap());
        let pick = |t: &Tensor, a: &Tensor, b: &Tensor| if t.dtype() == DType::BF16 { a.clone() } else { b.clone() };
        let cases: Vec<(&str, (f32, f32))> = vec![
            ("softmax", rel(&softmax_last_dim, &|t| candle_nn::ops::softmax(t, D::Minus1))),
            (
                "rms-norm",
                rel(&|t| rms_norm(t, &pick(t, &w16, &w), 1e-5), &|t| {
                    candle_nn::ops::rms_norm_slow(t, &pick(t, &w16, &w), 1e-5)
                }),
            ),
            (
                "rope",
                rel(&|t| rope_i(t, &pick(t, &cos16, &cos), &pick(t, &sin16, &sin)), &|t| {
                    candle_nn::rotary_emb::rope_i_slow(t, &pick(t, &cos16, &cos), &pick(t, &sin16, &sin))
                }),
            ),
        ];
        for (name, (fused, slow)) in cases {
            eprintln!("{name}: bf16 gradient relative error fused {fused:.4} op-by-op {slow:.4}");
            assert!(fused < 0.05 && fused < 2.0 * slow + 0.01, "{name}: fused {fused} op-by-op {slow}");
        }
    }
}
