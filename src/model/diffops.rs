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

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor, D};

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
    /// `tgt` [n, 1] u32, `lse` [n, 1] f32
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
    y: std::sync::Mutex<Option<Tensor>>,
    grad: Grad,
}

impl WithGrad {
    fn result(&self) -> Result<Tensor> {
        let y = self.y.lock().map_err(|_| candle_core::Error::Msg("fused-with-grad: poisoned".into()))?.take();
        y.ok_or_else(|| candle_core::Error::Msg("fused-with-grad: forward ran twice".into()))
    }
}

impl CustomOp1 for WithGrad {
    fn name(&self) -> &'static str {
        "refrag-fused-with-grad"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = self.result()?;
        let (s, l) = y.storage_and_layout();
        match &*s {
            Storage::Cpu(c) => Ok((c.try_clone(l)?, l.shape().clone())),
            _ => candle_core::bail!("fused-with-grad: result and input on different devices"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = self.result()?;
        let (s, l) = y.storage_and_layout();
        match &*s {
            Storage::Cuda(c) => Ok((c.try_clone(l)?, l.shape().clone())),
            _ => candle_core::bail!("fused-with-grad: result and input on different devices"),
        }
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let dx = match &self.grad {
            Grad::Softmax => {
                let s = (g * y)?.sum_keepdim(D::Minus1)?;
                (g.broadcast_sub(&s)? * y)?
            }
            Grad::CrossEntropy { tgt, lse } => {
                let x32 = x.to_dtype(DType::F32)?;
                let g = g.to_dtype(DType::F32)?.unsqueeze(1)?;
                let p = x32.broadcast_sub(lse)?.exp()?.broadcast_mul(&g)?;
                p.scatter_add(tgt, &g.neg()?, 1)?.to_dtype(x.dtype())?
            }
            Grad::Frozen { w } => g.matmul(w)?,
            Grad::Rope { cos, sin } => candle_nn::rotary_emb::rope_i(&g.contiguous()?, cos, &sin.neg()?)?,
            Grad::Rms { w, eps } => {
                let x32 = x.to_dtype(DType::F32)?;
                let gw = g.to_dtype(DType::F32)?.broadcast_mul(&w.to_dtype(DType::F32)?)?;
                let r = (x32.sqr()?.mean_keepdim(D::Minus1)? + *eps)?.sqrt()?.recip()?;
                let m = (&gw * &x32)?.mean_keepdim(D::Minus1)?;
                let dx = (gw.broadcast_mul(&r)? - x32.broadcast_mul(&(r.powf(3.0)? * m)?)?)?;
                dx.to_dtype(x.dtype())?
            }
        };
        Ok(Some(dx))
    }
}

/// `REFRAG_OP_BY_OP=1`: train with candle's op-by-op versions instead (for side-by-side speed
/// and numerics checks on a new device).
pub fn op_by_op() -> bool {
    static FLAG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FLAG.get_or_init(|| std::env::var("REFRAG_OP_BY_OP").is_ok_and(|v| v == "1"))
}

/// `y` must own its storage exactly (a fresh kernel result, as here): the forward copies it whole.
fn attach(x: &Tensor, y: Tensor, grad: Grad) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(y);
    }
    x.apply_op1(WithGrad { y: std::sync::Mutex::new(Some(y)), grad })
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
        return candle_nn::loss::cross_entropy(logits, targets);
    }
    let x = logits.detach().to_dtype(DType::F32)?;
    let m = x.max_keepdim(1)?;
    let lse = (x.broadcast_sub(&m)?.exp()?.sum_keepdim(1)?.log()? + &m)?;
    let tgt = targets.to_dtype(DType::U32)?.unsqueeze(1)?.contiguous()?;
    let rows = (&lse - x.gather(&tgt, 1)?)?.squeeze(1)?.to_dtype(logits.dtype())?.contiguous()?;
    attach(logits, rows, Grad::CrossEntropy { tgt, lse })?.mean_all()
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
