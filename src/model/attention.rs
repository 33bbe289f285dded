//! Fused causal attention on CUDA (src/model/attention.cu): one kernel per layer for prefill
//! instead of the materialised scores, mask, softmax and values matmuls, one (plus a combine)
//! per decoding step, and a backward kernel for training; bf16, head size 64, grouped-query
//! heads read from the KV cache in place. `REFRAG_FUSED_ATTENTION=0` turns them off (read once).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};

/// Attention written out: scores, `mask` (additive, [t, keys]), `softmax` over the keys,
/// values, for queries [b, heads, t, d] (scaled) over keys and values [b, kv heads, keys, d].
/// Grouped-query: the n_rep query heads of one KV head are read as n_rep * t rows against its
/// keys, straight from the cache (no copy of K/V per query head). Returns the output [b, t,
/// heads, d] (a transposed view) and the weights [b, kv heads, n_rep * t, keys].
pub fn written_out(
    q: &candle_core::Tensor,
    k: &candle_core::Tensor,
    v: &candle_core::Tensor,
    mask: Option<&candle_core::Tensor>,
    softmax: impl Fn(&candle_core::Tensor) -> Result<candle_core::Tensor>,
) -> Result<(candle_core::Tensor, candle_core::Tensor)> {
    let (b, heads, t, d) = q.dims4()?;
    let kv_heads = k.dim(1)?;
    let rows = heads / kv_heads * t;
    let mut att = q.reshape((b, kv_heads, rows, d))?.matmul(&k.t()?)?;
    if let Some(m) = mask {
        let keys = att.dim(3)?;
        att = att
            .reshape((b, kv_heads, heads / kv_heads, t, keys))?
            .broadcast_add(m)?
            .reshape((b, kv_heads, rows, keys))?;
    }
    crate::profile::mark(q.device(), "fwd_scores");
    let att = softmax(&att)?;
    crate::profile::mark(q.device(), "fwd_softmax");
    let out = att.matmul(v)?.reshape((b, heads, t, d))?.transpose(1, 2)?;
    Ok((out, att))
}

/// Whether the decoder may use the fused attention kernel (`REFRAG_FUSED_ATTENTION=0`: no).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| cfg!(feature = "cuda") && !matches!(std::env::var("REFRAG_FUSED_ATTENTION").as_deref(), Ok("0")))
}

/// Causal attention of queries `q` [b, heads, t, 64] (already scaled) over keys and values
/// [b, kv heads, pos + t, 64]: query row i sits at position `pos + i` and sees keys up to it;
/// query head h reads KV head h / `n_rep`. Output [b, t, heads, 64] (bf16).
pub struct CausalAttention {
    pub pos: usize,
    pub n_rep: usize,
}

/// Head size the kernel is written for.
pub const HEAD: usize = 64;

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "refrag-causal-attention"
    }

    cuda_only!(op3, "the fused attention kernel");

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        prefill((q, ql), (k, kl), (v, vl), self.pos, self.n_rep, None)
    }
}

/// The prefill kernel over `q`, `k`, `v` (see [`CausalAttention`]); `lse`: where to write each
/// row's log-sum-exp ([b, heads, t] f32), for the backward pass.
#[cfg(feature = "cuda")]
fn prefill(
    (q, ql): (&candle_core::CudaStorage, &Layout),
    (k, kl): (&candle_core::CudaStorage, &Layout),
    (v, vl): (&candle_core::CudaStorage, &Layout),
    pos: usize,
    n_rep: usize,
    lse: Option<&candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>>,
) -> Result<(candle_core::CudaStorage, Shape)> {
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{backend::BackendStorage, bail};
    use half::bf16;

    let (b, heads, t, d) = ql.shape().dims4()?;
    let (kb, kv_heads, kv_len, kd) = kl.shape().dims4()?;
    if d != HEAD || kd != HEAD || vl.shape() != kl.shape() || kb != b {
        bail!("fused attention: shapes q {:?}, k {:?}, v {:?}", ql.shape(), kl.shape(), vl.shape());
    }
    if heads != kv_heads * n_rep || kv_len != pos + t {
        bail!("fused attention: {heads} heads over {kv_heads} KV heads x {n_rep}, {kv_len} keys");
    }
    let (qs, ks, vs) = (strides(ql)?, strides(kl)?, strides(vl)?);
    let dev = q.device().clone();
    let func = dev.get_or_load_custom_func("refrag_attention_bf16", "refrag_attention", PTX)?;
    let qv = q.as_cuda_slice::<bf16>()?.slice(ql.start_offset()..);
    let kv = k.as_cuda_slice::<bf16>()?.slice(kl.start_offset()..);
    let vv = v.as_cuda_slice::<bf16>()?.slice(vl.start_offset()..);
    // SAFETY: every element is written by the kernel (rows < t of every head).
    let out = unsafe { dev.alloc::<bf16>(b * t * heads * d)? };
    let cfg = LaunchConfig {
        grid_dim: (t.div_ceil(64) as u32, heads as u32, b as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let (t_, kv_len_, pos_, heads_, n_rep_) = (t as i32, kv_len as i32, pos as i32, heads as i32, n_rep as i32);
    // queries come scaled by 1/sqrt(d) (the decoder's rotary tables): only log2(e) is left
    let scale_log2 = std::f32::consts::LOG2_E;
    let null = 0u64;
    let mut launch = func.builder();
    launch.arg(&qv).arg(&kv).arg(&vv).arg(&out);
    match lse {
        Some(l) => launch.arg(l),
        None => launch.arg(&null),
    };
    launch.arg(&t_).arg(&kv_len_).arg(&pos_).arg(&heads_).arg(&n_rep_).arg(&scale_log2);
    for s in qs.iter().chain(&ks).chain(&vs) {
        launch.arg(s);
    }
    // SAFETY: the arguments match the kernel's signature; the bounds were checked above.
    unsafe { launch.launch(cfg) }.w()?;
    Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev), Shape::from((b, t, heads, d))))
}

/// [`CausalAttention`] from position 0 with a backward pass (training): the forward keeps each
/// row's log-sum-exp for the backward kernel, which recomputes the probabilities from it.
/// Use one per forward, through [`TrainAttention::apply`].
pub struct TrainAttention {
    n_rep: usize,
    lse: std::sync::Mutex<Option<Lse>>,
}

#[cfg(feature = "cuda")]
type Lse = candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>;
#[cfg(not(feature = "cuda"))]
type Lse = ();

impl TrainAttention {
    /// Causal attention of `q` [b, heads, t, 64] over `k`, `v` [b, kv heads, t, 64] (bf16):
    /// [b, t, heads, 64], differentiable.
    pub fn apply(
        q: &candle_core::Tensor,
        k: &candle_core::Tensor,
        v: &candle_core::Tensor,
        n_rep: usize,
    ) -> Result<candle_core::Tensor> {
        let op = TrainAttention { n_rep, lse: std::sync::Mutex::new(None) };
        q.apply_op3_arc(k, v, std::sync::Arc::new(Box::new(op)))
    }

    /// The forward alone (inputs as [`TrainAttention::apply`], not tracked): the output and
    /// what [`TrainAttention::backward`] needs of it.
    pub fn forward(
        q: &candle_core::Tensor,
        k: &candle_core::Tensor,
        v: &candle_core::Tensor,
        n_rep: usize,
    ) -> Result<(candle_core::Tensor, Self)> {
        let op = TrainAttention { n_rep, lse: std::sync::Mutex::new(None) };
        let out = q.apply_op3_no_bwd(k, v, &op)?;
        Ok((out, op))
    }

    /// Gradients of q, k and v (in their dtypes) from the output `out` of this op's forward
    /// and its gradient `grad` ([b, t, heads, 64]). Once: the forward's state is taken.
    pub fn backward(
        &self,
        q: &candle_core::Tensor,
        k: &candle_core::Tensor,
        v: &candle_core::Tensor,
        out: &candle_core::Tensor,
        grad: &candle_core::Tensor,
    ) -> Result<(candle_core::Tensor, candle_core::Tensor, candle_core::Tensor)> {
        use candle_core::DType;
        let lse = self.lse.lock().map_err(|_| candle_core::Error::Msg("attention state poisoned".into()))?.take();
        let Some(lse) = lse else { candle_core::bail!("attention backward without its forward") };
        let grad = grad.to_dtype(DType::BF16)?.contiguous()?;
        // delta: rowsum(dO * O), [b, heads, t] f32
        let delta = (grad.to_dtype(DType::F32)? * out.to_dtype(DType::F32)?)?.sum(3)?.transpose(1, 2)?.contiguous()?;
        let op = AttentionBackward { n_rep: self.n_rep, lse, grad, delta };
        let flat = q.apply_op3_no_bwd(k, v, &op)?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let part = |at: usize, n: usize, like: &candle_core::Tensor| -> Result<candle_core::Tensor> {
            flat.narrow(0, at, n)?.reshape(like.shape())?.to_dtype(like.dtype())
        };
        Ok((part(0, nq, q)?, part(nq, nk, k)?, part(nq + nk, nk, v)?))
    }
}

impl CustomOp3 for TrainAttention {
    fn name(&self) -> &'static str {
        "refrag-train-attention"
    }

    cuda_only!(op3, "the fused attention kernel");

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (b, heads, t, _) = ql.shape().dims4()?;
        // SAFETY: the kernel writes every row's value.
        let lse = unsafe { q.device().alloc::<f32>(b * heads * t)? };
        let out = prefill((q, ql), (k, kl), (v, vl), 0, self.n_rep, Some(&lse))?;
        *self.lse.lock().map_err(|_| candle_core::Error::Msg("attention state poisoned".into()))? = Some(lse);
        Ok(out)
    }

    fn bwd(
        &self,
        q: &candle_core::Tensor,
        k: &candle_core::Tensor,
        v: &candle_core::Tensor,
        out: &candle_core::Tensor,
        grad: &candle_core::Tensor,
    ) -> Result<(Option<candle_core::Tensor>, Option<candle_core::Tensor>, Option<candle_core::Tensor>)> {
        let (dq, dk, dv) = self.backward(q, k, v, out, grad)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The backward kernel of [`TrainAttention`]: dq, dk, dv (f32) one after the other in one
/// flat output.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct AttentionBackward {
    n_rep: usize,
    lse: Lse,
    /// The output's gradient [b, t, heads, 64], bf16, contiguous.
    grad: candle_core::Tensor,
    /// [b, heads, t] f32, contiguous.
    delta: candle_core::Tensor,
}

impl CustomOp3 for AttentionBackward {
    fn name(&self) -> &'static str {
        "refrag-attention-backward"
    }

    cuda_only!(op3, "the fused attention kernel");

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        use candle_core::{backend::BackendStorage, bail, Storage};
        use half::bf16;

        let (b, heads, t, d) = ql.shape().dims4()?;
        let (_, kv_heads, kt, _) = kl.shape().dims4()?;
        if d != HEAD || kt != t || vl.shape() != kl.shape() || heads != kv_heads * self.n_rep {
            bail!("attention backward: shapes q {:?}, k {:?}, v {:?}", ql.shape(), kl.shape(), vl.shape());
        }
        let (qs, ks, vs) = (strides(ql)?, strides(kl)?, strides(vl)?);
        let dev = q.device().clone();
        let func = dev.get_or_load_custom_func("refrag_attention_bwd_bf16", "refrag_attention", PTX)?;
        let qv = q.as_cuda_slice::<bf16>()?.slice(ql.start_offset()..);
        let kv = k.as_cuda_slice::<bf16>()?.slice(kl.start_offset()..);
        let vv = v.as_cuda_slice::<bf16>()?.slice(vl.start_offset()..);
        let (gs, gl) = self.grad.storage_and_layout();
        let (ds, dl) = self.delta.storage_and_layout();
        let (Storage::Cuda(gs), Storage::Cuda(ds)) = (&*gs, &*ds) else {
            bail!("attention backward: the gradient is not on the GPU")
        };
        let gv = gs.as_cuda_slice::<bf16>()?.slice(gl.start_offset()..);
        let dv_ = ds.as_cuda_slice::<f32>()?.slice(dl.start_offset()..);
        let (nq, nk) = (b * heads * t * d, b * kv_heads * t * d);
        let mut grads = dev.alloc_zeros::<f32>(nq + 2 * nk)?;
        let (mut dq, mut rest) = grads.split_at_mut(nq);
        let (mut dk, mut dv) = rest.split_at_mut(nk);
        let (t_, heads_, n_rep_) = (t as i32, heads as i32, self.n_rep as i32);
        let scale_log2 = std::f32::consts::LOG2_E;
        let mut launch = func.builder();
        launch.arg(&qv).arg(&kv).arg(&vv).arg(&gv).arg(&self.lse).arg(&dv_);
        launch.arg(&mut dq).arg(&mut dk).arg(&mut dv).arg(&t_).arg(&heads_).arg(&n_rep_).arg(&scale_log2);
        for s in qs.iter().chain(&ks).chain(&vs) {
            launch.arg(s);
        }
        let cfg = LaunchConfig {
            grid_dim: (t.div_ceil(64) as u32, kv_heads as u32, b as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the kernel's signature; the bounds were checked above.
        unsafe { launch.launch(cfg) }.w()?;
        drop(launch);
        Ok((candle_core::CudaStorage::wrap_cuda_slice(grads, dev), Shape::from(nq + 2 * nk)))
    }
}

/// One query row per sequence (a decoding step): queries [b, heads, 1, 64] (scaled) over
/// keys and values [b, kv heads, n, 64] holding positions 0..=pos (n >= pos + 1; the rest is
/// not read). `at`: a u32 tensor on the device whose first element is pos (the fixed step's
/// position buffer, so that a captured graph replays at every position; the work is split for
/// all n keys); None: `pos`. Query head h reads KV head h / `n_rep` (n_rep <= 4). Output
/// [b, 1, heads, 64] (bf16).
pub struct DecodeAttention<'a> {
    pub pos: usize,
    pub at: Option<&'a candle_core::Tensor>,
    pub n_rep: usize,
}

/// Keys per block of the decoding kernel (attention.cu's SPLIT_KEYS).
#[cfg(feature = "cuda")]
const SPLIT_KEYS: usize = 128;
/// Query heads per KV head the decoding kernel holds (attention.cu's MAX_REP).
pub const MAX_REP: usize = 4;

impl CustomOp3 for DecodeAttention<'_> {
    fn name(&self) -> &'static str {
        "refrag-decode-attention"
    }

    cuda_only!(op3, "the fused attention kernel");

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        use candle_core::{backend::BackendStorage, bail};
        use half::bf16;

        let (b, heads, t, d) = ql.shape().dims4()?;
        let (kb, kv_heads, n, kd) = kl.shape().dims4()?;
        if t != 1 || d != HEAD || kd != HEAD || vl.shape() != kl.shape() || kb != b {
            bail!("decoding attention: shapes q {:?}, k {:?}, v {:?}", ql.shape(), kl.shape(), vl.shape());
        }
        if self.n_rep == 0
            || heads != kv_heads * self.n_rep
            || self.n_rep > MAX_REP
            || (self.at.is_none() && n <= self.pos)
        {
            bail!("decoding attention: {heads} heads over {kv_heads} KV heads x {}, {n} keys", self.n_rep);
        }
        let (qs, ks, vs) = (strides(ql)?, strides(kl)?, strides(vl)?);
        let dev = q.device().clone();
        let name = format!("refrag_decode_attention_bf16_r{}", self.n_rep);
        let attend = dev.get_or_load_custom_func(&name, "refrag_attention", PTX)?;
        let combine = dev.get_or_load_custom_func("refrag_decode_combine_bf16", "refrag_attention", PTX)?;
        let qv = q.as_cuda_slice::<bf16>()?.slice(ql.start_offset()..);
        let kv = k.as_cuda_slice::<bf16>()?.slice(kl.start_offset()..);
        let vv = v.as_cuda_slice::<bf16>()?.slice(vl.start_offset()..);
        let keys = if self.at.is_some() { n } else { self.pos + 1 };
        let splits = keys.div_ceil(SPLIT_KEYS);
        // SAFETY: every block writes its partials; the combine kernel writes every output.
        let part_o = unsafe { dev.alloc::<f32>(b * heads * splits * HEAD)? };
        let part_ml = unsafe { dev.alloc::<f32>(b * heads * splits * 2)? };
        let out = unsafe { dev.alloc::<bf16>(b * heads * HEAD)? };
        let stream = dev.cuda_stream();
        let pos_arg: u64 = match self.at {
            Some(t) => super::device_ptr::<u32>(t, &stream)?,
            None => 0,
        };
        let (pos_, heads_, splits_) = (self.pos as i32, heads as i32, splits as i32);
        let scale_log2 = std::f32::consts::LOG2_E;
        let mut launch = attend.builder();
        launch.arg(&qv).arg(&kv).arg(&vv).arg(&part_o).arg(&part_ml).arg(&pos_arg);
        launch.arg(&pos_).arg(&heads_).arg(&splits_).arg(&scale_log2);
        launch.arg(&qs[0]).arg(&qs[1]);
        for s in ks.iter().chain(&vs) {
            launch.arg(s);
        }
        let grid = (splits as u32, kv_heads as u32, b as u32);
        // SAFETY: the arguments match the kernel's signature; the bounds were checked above.
        unsafe { launch.launch(LaunchConfig { grid_dim: grid, block_dim: (128, 1, 1), shared_mem_bytes: 0 }) }.w()?;
        let mut launch = combine.builder();
        launch.arg(&part_o).arg(&part_ml).arg(&out).arg(&heads_).arg(&splits_).arg(&scale_log2);
        let cfg =
            LaunchConfig { grid_dim: (heads as u32, b as u32, 1), block_dim: (HEAD as u32, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: as above.
        unsafe { launch.launch(cfg) }.w()?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev), Shape::from((b, 1, heads, d))))
    }
}

/// The PTX of attention.cu.
#[cfg(feature = "cuda")]
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));

/// Strides of a [b, heads, n, 64] layout whose rows are contiguous and 16-byte aligned (the
/// kernels load 8 elements at a time): batch, head, row.
#[cfg(feature = "cuda")]
fn strides(l: &Layout) -> Result<[i64; 3]> {
    let s = l.stride();
    if s[3] != 1 || !l.start_offset().is_multiple_of(8) || s[..3].iter().any(|x| x % 8 != 0) {
        candle_core::bail!("fused attention: rows must be contiguous and 16-byte aligned ({:?})", s);
    }
    Ok([s[0] as i64, s[1] as i64, s[2] as i64])
}

/// The largest difference between the fused kernels and attention written out in f32 (scores,
/// causal mask, softmax, values) over random bf16 inputs of several shapes: prefill from
/// position 0 and from inside a cache, a partial last tile, grouped and plain heads, batch 2,
/// and decoding steps with the position given and read from the device (keys and values past
/// it NaN: they must not be read). Outputs are ~N(0, 1/keys)-sized; bf16 rounding of the
/// output alone is ~4e-3 at 1.
pub fn parity(device: &candle_core::Device) -> anyhow::Result<f32> {
    use candle_core::{DType, Tensor, D};
    let mut worst = 0f32;
    // (batch, heads, n_rep, pos, rows, keys held: >= pos + rows, decoding position on the device)
    let cases = [
        (1, 9, 3, 0, 130, 130, false),
        (2, 9, 3, 70, 64, 134, false),
        (1, 4, 1, 0, 1000, 1000, false),
        (1, 9, 3, 5, 2, 7, false),
        (2, 9, 3, 300, 1, 301, false),
        (1, 9, 3, 4000, 1, 4001, false),
        (2, 9, 3, 700, 1, 1024, true),
        (1, 4, 1, 57, 1, 64, true),
        (2, 8, 2, 130, 1, 131, false),
        (1, 8, 4, 200, 1, 260, true),
        (1, 9, 3, 40, 1, 448, true),
    ];
    for (b, heads, n_rep, pos, t, n, on_device) in cases {
        let kv_heads = heads / n_rep;
        let q = (Tensor::randn(0f32, 1.0, (b, heads, t, HEAD), device)? / 8.0)?.to_dtype(DType::BF16)?;
        // rows past pos + t hold NaN: a kernel that reads them (even times a weight of 0) fails
        let past = |x: Tensor| -> candle_core::Result<Tensor> {
            if n == pos + t {
                return Ok(x);
            }
            let nan = Tensor::full(f32::NAN, (b, kv_heads, n - pos - t, HEAD), device)?;
            x.slice_assign(&[0..b, 0..kv_heads, pos + t..n, 0..HEAD], &nan)
        };
        let k = past(Tensor::randn(0f32, 1.0, (b, kv_heads, n, HEAD), device)?)?.to_dtype(DType::BF16)?;
        let v = past(Tensor::randn(0f32, 1.0, (b, kv_heads, n, HEAD), device)?)?.to_dtype(DType::BF16)?;
        let at = Tensor::new(&[pos as u32], device)?;
        let got = match (t, on_device) {
            (1, true) => q.apply_op3_no_bwd(&k, &v, &DecodeAttention { pos: 0, at: Some(&at), n_rep })?,
            (1, false) => q.apply_op3_no_bwd(&k, &v, &DecodeAttention { pos, at: None, n_rep })?,
            _ => q.apply_op3_no_bwd(&k, &v, &CausalAttention { pos, n_rep })?,
        };
        let f = |x: &Tensor| -> candle_core::Result<Tensor> { x.narrow(2, 0, pos + t)?.to_dtype(DType::F32) };
        let (qf, kf, vf) = (q.to_dtype(DType::F32)?, repeat_heads(&f(&k)?, n_rep)?, repeat_heads(&f(&v)?, n_rep)?);
        let rows = Tensor::arange(pos as u32, (pos + t) as u32, device)?.reshape((t, 1))?;
        let cols = Tensor::arange(0u32, (pos + t) as u32, device)?.reshape((1, pos + t))?;
        let mask = cols.broadcast_gt(&rows)?.to_dtype(DType::F32)?.affine(-1e30, 0.0)?;
        let scores = qf.matmul(&kf.t()?.contiguous()?)?.broadcast_add(&mask)?;
        let want = candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&vf)?.transpose(1, 2)?;
        let diff = (got.to_dtype(DType::F32)? - want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        tracing::debug!(
            "fused attention b {b} heads {heads}/{n_rep} pos {pos} rows {t} keys {n}: max error {diff:.2e}"
        );
        worst = worst.max(diff);
        // (a max over NaN need not be NaN)
        if got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.iter().any(|x| !x.is_finite()) {
            worst = f32::INFINITY;
        }
    }
    Ok(worst)
}

/// The largest relative difference (max |difference| / max |reference| per tensor) between
/// the gradients of [`TrainAttention`] and those of attention written out in f32, for a random
/// linear loss over random bf16 inputs (grouped and plain heads, a partial last tile, batch 2).
/// P and dS are rounded to bf16 inside the kernel (as in FlashAttention-2): ~1e-2.
pub fn grad_parity(device: &candle_core::Device) -> anyhow::Result<f32> {
    use candle_core::{DType, Tensor, Var, D};
    let mut worst = 0f32;
    for (b, heads, n_rep, t) in [(1, 9, 3, 130), (2, 9, 3, 64), (1, 4, 1, 300)] {
        let kv_heads = heads / n_rep;
        let q = (Tensor::randn(0f32, 1.0, (b, heads, t, HEAD), device)? / 8.0)?.to_dtype(DType::BF16)?;
        let k = Tensor::randn(0f32, 1.0, (b, kv_heads, t, HEAD), device)?.to_dtype(DType::BF16)?;
        let v = Tensor::randn(0f32, 1.0, (b, kv_heads, t, HEAD), device)?.to_dtype(DType::BF16)?;
        let w = Tensor::randn(0f32, 1.0, (b, t, heads, HEAD), device)?;
        let grads_of = |fused: bool| -> anyhow::Result<Vec<Tensor>> {
            let dtype = if fused { DType::BF16 } else { DType::F32 };
            let var = |x: &Tensor| -> candle_core::Result<Tensor> {
                Ok(Var::from_tensor(&x.to_dtype(dtype)?)?.as_tensor().clone())
            };
            let (qv, kv, vv) = (var(&q)?, var(&k)?, var(&v)?);
            let out = if fused {
                TrainAttention::apply(&qv, &kv, &vv, n_rep)?.to_dtype(DType::F32)?
            } else {
                let rows = Tensor::arange(0u32, t as u32, device)?.reshape((t, 1))?;
                let cols = Tensor::arange(0u32, t as u32, device)?.reshape((1, t))?;
                let mask = cols.broadcast_gt(&rows)?.to_dtype(DType::F32)?.affine(-1e30, 0.0)?;
                let (kr, vr) = (repeat_heads(&kv, n_rep)?, repeat_heads(&vv, n_rep)?);
                let scores = qv.matmul(&kr.t()?)?.broadcast_add(&mask)?;
                candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&vr)?.transpose(1, 2)?
            };
            let grads = (out * &w)?.sum_all()?.backward()?;
            [&qv, &kv, &vv]
                .iter()
                .map(|x| Ok(grads.get(x).ok_or_else(|| anyhow::anyhow!("no gradient"))?.to_dtype(DType::F32)?))
                .collect()
        };
        let (got, want) = (grads_of(true)?, grads_of(false)?);
        for (name, (g, r)) in ["q", "k", "v"].iter().zip(got.iter().zip(&want)) {
            let scale = r.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            let diff = (g - r)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? / scale.max(1e-12);
            tracing::debug!(
                "attention backward b {b} heads {heads}/{n_rep} rows {t}: d{name} relative error {diff:.2e}"
            );
            worst = worst.max(diff);
        }
    }
    Ok(worst)
}

/// KV heads [b, kv, n, d] repeated for the query heads that read them: [b, kv * n_rep, n, d].
fn repeat_heads(x: &candle_core::Tensor, n_rep: usize) -> candle_core::Result<candle_core::Tensor> {
    let (b, kv, n, d) = x.dims4()?;
    x.unsqueeze(2)?.broadcast_as((b, kv, n_rep, n, d))?.contiguous()?.reshape((b, kv * n_rep, n, d))
}
