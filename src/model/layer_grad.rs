//! A decoder layer as one differentiable op with its backward pass written out (training).
//!
//! Through candle's autograd a layer is ~40 graph nodes, and the backward pass adds every
//! node's gradient into a fresh zero tensor (`zeros_like`, then `add`: two passes over each
//! activation-sized gradient): half of a training step's GPU time went to those adds
//! (docs/research/2026-12-04-training-kernels.md). Here the forward runs on detached tensors
//! and keeps what its backward reads; the layer enters the graph as one custom op of the
//! residual stream and (when the layer has adapters) of its adapters' parameters, flattened
//! into one vector; the backward computes the input's and the adapters' gradients itself, each
//! once, without zero-filled sums. The frozen weights and norms get no gradient.
//!
//! With `x` [n, in] the layer's rows, a frozen matrix `W` [out, in] with adapter `A` [r, in],
//! `B` [out, r] computes `y = x W^T + (x A^T) B^T`; from `dy`: `dx = dy W + (dy B) A`,
//! `dB = dy^T (x A^T)`, `dA = (dy B)^T x`. Attention's backward is the fused kernel's on CUDA
//! in bf16 ([`crate::model::attention::TrainAttention`]) and written out elsewhere; rms-norm's
//! and rope's are [`crate::model::diffops`]'s.
//!
//! `REFRAG_LAYER_GRAD=0` (or `REFRAG_OP_BY_OP=1`) trains through autograd op by op instead:
//! the reference a test and `refrag doctor` compare this op with.

use crate::model::attention::{written_out, TrainAttention};
use crate::model::diffops::{rms_norm_grad_add, rope_grad, silu_mul_grad, Handed};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use std::sync::{Arc, Mutex};

/// Whether training runs decoder layers through this op: yes unless `REFRAG_LAYER_GRAD=0` or
/// `REFRAG_OP_BY_OP=1`.
pub fn enabled() -> bool {
    static FLAG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FLAG.get_or_init(|| !std::env::var("REFRAG_LAYER_GRAD").is_ok_and(|v| v == "0"))
        && !crate::model::diffops::op_by_op()
}

/// One frozen matrix `w` [out, in] and, when trained, its adapter (`a` [r, in], `b` [out, r]),
/// detached, in the activations' dtype.
pub(crate) struct Mat {
    pub w: Tensor,
    pub lora: Option<(Tensor, Tensor)>,
}

/// How the layer attends: the fused kernels (CUDA, bf16, head size 64) or written out under
/// an additive causal mask [t, t].
#[derive(Clone)]
pub(crate) enum Attend {
    Kernel,
    Masked(Tensor),
}

/// What a layer reads besides its input.
pub(crate) struct LayerParts {
    /// q, k, v, output, gate, up, down ([`crate::model::decoder::LORA_TARGETS`]'s order)
    pub mats: [Mat; 7],
    pub attn_norm: Tensor,
    pub ffn_norm: Tensor,
    pub eps: f64,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Rotary rows of the positions for keys (`cos`, `sin`) and queries (`cos_q`, `sin_q`,
    /// which also scale by 1/sqrt(head_dim)).
    pub cos: Tensor,
    pub sin: Tensor,
    pub cos_q: Tensor,
    pub sin_q: Tensor,
    pub attend: Attend,
}

/// The layer over `x` [b, t, hidden] (rows from position 0, causal): the residual stream after
/// it, differentiable to `x` and to `vars` (the adapters' tensors of `parts` in order, `a` then
/// `b` of each adapted matrix, as the variables the optimizer updates).
pub(crate) fn forward(x: &Tensor, parts: LayerParts, vars: &[Tensor]) -> Result<Tensor> {
    let (y, saved) = run(&x.detach(), &parts)?;
    if !x.track_op() && vars.is_empty() {
        return Ok(y);
    }
    let op = LayerOp { parts, saved: Mutex::new(Some(saved)), y: Handed::new(y)? };
    if vars.is_empty() {
        return x.apply_op1_arc(Arc::new(Box::new(op)));
    }
    let flat = Tensor::cat(&vars.iter().map(|v| v.flatten_all()).collect::<Result<Vec<_>>>()?, 0)?;
    x.apply_op2_arc(&flat, Arc::new(Box::new(op)))
}

/// The forward's tensors that its backward reads.
struct Saved {
    /// input rows [n, hidden]
    x: Tensor,
    h1: Tensor,
    /// rotated queries [b, heads, t, d], keys and values [b, kv heads, t, d]
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// attention's output [b, t, heads, d]
    y: Tensor,
    att: AttnState,
    x2: Tensor,
    h2: Tensor,
    gate: Tensor,
    up: Tensor,
    act: Tensor,
    /// each matrix's `x A^T` (None without an adapter)
    mids: [Option<Tensor>; 7],
}

enum AttnState {
    Kernel(TrainAttention),
    /// the attention weights [b, kv heads, n_rep t, t]
    Probs(Tensor),
}

struct LayerOp {
    parts: LayerParts,
    saved: Mutex<Option<Saved>>,
    y: Handed,
}

/// `x W^T (+ (x A^T) B^T)` and `x A^T`.
fn linear(x: &Tensor, m: &Mat) -> Result<(Tensor, Option<Tensor>)> {
    let y = x.matmul(&m.w.t()?)?;
    match &m.lora {
        None => Ok((y, None)),
        Some((a, b)) => {
            let mid = x.matmul(&a.t()?)?;
            Ok((add_product(y, &mid, b, true)?, Some(mid)))
        }
    }
}

/// `c + a b` (`b_t`: `c + a b^T`) for matrices [m, k] and [k, n] (or [n, k]). On CUDA in bf16
/// the product is added inside cuBLAS's kernel (beta = 1, into `c`, a product's fresh output
/// that nothing else holds) instead of an add over the activation-sized `c`: the adapters'
/// outputs and input gradients, 14 adds a layer.
fn add_product(c: Tensor, a: &Tensor, b: &Tensor, b_t: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if gemm_accumulate(&c, a, b, b_t)? {
        return Ok(c);
    }
    let p = if b_t { a.matmul(&b.t()?)? } else { a.matmul(b)? };
    c + p
}

/// [`add_product`] through cuBLAS when `c`, `a`, `b` are contiguous bf16 matrices on one GPU
/// (true: done in place); false otherwise.
#[cfg(feature = "cuda")]
fn gemm_accumulate(c: &Tensor, a: &Tensor, b: &Tensor, b_t: bool) -> Result<bool> {
    use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys};
    let candle_core::Device::Cuda(dev) = c.device() else { return Ok(false) };
    let all = [c, a, b];
    if all
        .iter()
        .any(|t| t.dtype() != DType::BF16 || !t.is_contiguous() || t.rank() != 2 || !t.device().same_device(c.device()))
    {
        return Ok(false);
    }
    let ((m, k), (n, k2)) = (
        a.dims2()?,
        if b_t {
            b.dims2()?
        } else {
            let (k, n) = b.dims2()?;
            (n, k)
        },
    );
    if k != k2 || c.dims2()? != (m, n) || [m, n, k].iter().any(|&d| d == 0 || d > i32::MAX as usize) {
        return Ok(false);
    }
    let stream = dev.cuda_stream();
    let (pc, pa, pb) = (
        super::device_ptr::<half::bf16>(c, &stream)?,
        super::device_ptr::<half::bf16>(a, &stream)?,
        super::device_ptr::<half::bf16>(b, &stream)?,
    );
    let blas = dev.cublas_handle();
    let (alpha, beta) = (1f32, 1f32);
    // column-major: c^T [n, m] += op(b) [n, k] a^T [k, m]
    let (op_b, ldb) =
        if b_t { (sys::cublasOperation_t::CUBLAS_OP_T, k) } else { (sys::cublasOperation_t::CUBLAS_OP_N, n) };
    let bf16 = sys::cudaDataType_t::CUDA_R_16BF;
    // SAFETY: the three pointers are live tensors' storages on this stream (held by the
    // caller for the call), of the sizes checked above; `c` is written by no one else.
    unsafe {
        gemm_ex(
            *blas.handle(),
            op_b,
            sys::cublasOperation_t::CUBLAS_OP_N,
            n as i32,
            m as i32,
            k as i32,
            &alpha as *const f32 as *const _,
            pb as *const _,
            bf16,
            ldb as i32,
            pa as *const _,
            bf16,
            k as i32,
            &beta as *const f32 as *const _,
            pc as *mut _,
            bf16,
            n as i32,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| candle_core::Error::Msg(format!("cuBLAS accumulate: {e:?}")))?;
    Ok(true)
}

/// An adapter's gradients (dA, dB).
type AdapterGrads = (Tensor, Tensor);

/// The gradients of [`linear`] from `dy`: to `x` (when `need_dx`) and to the adapter (dA, dB).
fn linear_grad(
    dy: &Tensor,
    x: &Tensor,
    m: &Mat,
    mid: Option<&Tensor>,
    need_dx: bool,
) -> Result<(Option<Tensor>, Option<AdapterGrads>)> {
    let dx = if need_dx { Some(dy.matmul(&m.w)?) } else { None };
    let (Some((a, b)), Some(mid)) = (&m.lora, mid) else { return Ok((dx, None)) };
    let gr = dy.matmul(b)?;
    let db = dy.t()?.matmul(mid)?;
    let da = gr.t()?.matmul(x)?;
    let dx = match dx {
        Some(d) => Some(add_product(d, &gr, a, false)?),
        None => None,
    };
    Ok((dx, Some((da, db))))
}

/// [b, t, n heads x d] rows as [b, n, t, d].
fn heads(x: &Tensor, b: usize, t: usize, n: usize, d: usize) -> Result<Tensor> {
    x.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()
}

fn run(x: &Tensor, p: &LayerParts) -> Result<(Tensor, Saved)> {
    let (b, t, hidden) = x.dims3()?;
    let (n, d) = (b * t, p.head_dim);
    let x = x.reshape((n, hidden))?;
    let h1 = candle_nn::ops::rms_norm(&x, &p.attn_norm, p.eps as f32)?;
    let (q, mq) = linear(&h1, &p.mats[0])?;
    let (k, mk) = linear(&h1, &p.mats[1])?;
    let (v, mv) = linear(&h1, &p.mats[2])?;
    let q = candle_nn::rotary_emb::rope_i(&heads(&q, b, t, p.heads, d)?, &p.cos_q, &p.sin_q)?;
    let k = candle_nn::rotary_emb::rope_i(&heads(&k, b, t, p.kv_heads, d)?, &p.cos, &p.sin)?;
    let v = heads(&v, b, t, p.kv_heads, d)?;
    let n_rep = p.heads / p.kv_heads;
    let (y, att) = match &p.attend {
        Attend::Kernel => {
            let (y, op) = TrainAttention::forward(&q, &k, &v, n_rep)?;
            (y, AttnState::Kernel(op))
        }
        Attend::Masked(mask) => {
            let (y, probs) = written_out(&q, &k, &v, Some(mask), candle_nn::ops::softmax_last_dim)?;
            (y.contiguous()?, AttnState::Probs(probs))
        }
    };
    let (o, mo) = linear(&y.reshape((n, p.heads * d))?, &p.mats[3])?;
    let (x2, h2) = crate::model::elementwise::add_norm(&x, &o, &p.ffn_norm, p.eps)?;
    let (gate, mg) = linear(&h2, &p.mats[4])?;
    let (up, mu) = linear(&h2, &p.mats[5])?;
    let act = (candle_nn::ops::silu(&gate)? * &up)?;
    let (down, md) = linear(&act, &p.mats[6])?;
    let out = (&x2 + down)?.reshape((b, t, hidden))?;
    let mids = [mq, mk, mv, mo, mg, mu, md];
    Ok((out, Saved { x, h1, q, k, v, y, att, x2, h2, gate, up, act, mids }))
}

impl LayerOp {
    /// The input's gradient (when `need_dx`) and the adapters' (f32, flat, in `vars`' order).
    fn backward(&self, dout: &Tensor, need_dx: bool) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let s = self.saved.lock().map_err(|_| candle_core::Error::Msg("layer op: poisoned".into()))?.take();
        let Some(s) = s else { candle_core::bail!("layer op: backward ran twice") };
        let p = &self.parts;
        let (b, heads, t, d) = s.q.dims4()?;
        let n = b * t;
        let hidden = s.x.dim(1)?;
        let dout = dout.reshape((n, hidden))?;
        let mut grads: [Option<AdapterGrads>; 7] = Default::default();
        let mut lin = |i: usize, dy: &Tensor, x: &Tensor, need: bool| -> Result<Option<Tensor>> {
            let (dx, g) = linear_grad(dy, x, &p.mats[i], s.mids[i].as_ref(), need)?;
            grads[i] = g;
            Ok(dx)
        };
        let need = |dx: Option<Tensor>| dx.ok_or_else(|| candle_core::Error::Msg("layer op: no gradient".into()));
        // the MLP
        let dact = need(lin(6, &dout, &s.act, true)?)?;
        let (dg, du) = silu_mul_grad(&s.gate, &s.up, &dact)?;
        let dh2 = (need(lin(4, &dg, &s.h2, true)?)? + need(lin(5, &du, &s.h2, true)?)?)?;
        let dx2 = rms_norm_grad_add(&s.x2, &dh2, &p.ffn_norm, p.eps, &dout)?;
        // attention
        let dy = need(lin(3, &dx2, &s.y.reshape((n, heads * d))?, true)?)?.reshape((b, t, heads, d))?;
        let (dq, dk, dv) = match &s.att {
            AttnState::Kernel(op) => op.backward(&s.q, &s.k, &s.v, &s.y, &dy)?,
            AttnState::Probs(probs) => {
                let (kvh, n_rep) = (p.kv_heads, heads / p.kv_heads);
                let dyg = dy.transpose(1, 2)?.contiguous()?.reshape((b, kvh, n_rep * t, d))?;
                let dv = probs.t()?.matmul(&dyg)?;
                let dp = dyg.matmul(&s.v.t()?)?;
                let ds = (probs * dp.broadcast_sub(&(&dp * probs)?.sum_keepdim(D::Minus1)?)?)?;
                let dq = ds.matmul(&s.k)?.reshape((b, heads, t, d))?;
                let dk = ds.t()?.matmul(&s.q.reshape((b, kvh, n_rep * t, d))?)?;
                (dq, dk, dv)
            }
        };
        let rows = |x: Tensor, h: usize| -> Result<Tensor> { x.transpose(1, 2)?.contiguous()?.reshape((n, h * d)) };
        let dq = rows(rope_grad(&dq, &p.cos_q, &p.sin_q)?, heads)?;
        let dk = rows(rope_grad(&dk, &p.cos, &p.sin)?, p.kv_heads)?;
        let dv = rows(dv, p.kv_heads)?;
        let mut dh1: Option<Tensor> = None;
        for (i, dy) in [(0, &dq), (1, &dk), (2, &dv)] {
            if let Some(part) = lin(i, dy, &s.h1, need_dx)? {
                dh1 = Some(match dh1 {
                    Some(sum) => (sum + part)?,
                    None => part,
                });
            }
        }
        let dx = match dh1 {
            Some(dh1) => Some(rms_norm_grad_add(&s.x, &dh1, &p.attn_norm, p.eps, &dx2)?.reshape((b, t, hidden))?),
            None => None,
        };
        let parts = grads
            .into_iter()
            .flatten()
            .flat_map(|(da, db)| [da.flatten_all(), db.flatten_all()])
            .collect::<Result<Vec<_>>>()?;
        let dflat = if parts.is_empty() { None } else { Some(Tensor::cat(&parts, 0)?.to_dtype(DType::F32)?) };
        Ok((dx, dflat))
    }
}

impl CustomOp1 for LayerOp {
    fn name(&self) -> &'static str {
        "refrag-decoder-layer"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.y.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        self.y.cuda()
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(self.backward(g, true)?.0)
    }
}

impl CustomOp2 for LayerOp {
    fn name(&self) -> &'static str {
        "refrag-decoder-layer"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.y.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.y.cuda()
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, _: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.backward(g, x.track_op())
    }
}
