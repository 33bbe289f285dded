//! The decoder: a LLaMA forward (SmolLM2-135M-Instruct) whose input is an embeddings tensor.
//!
//! LLaMA: Touvron et al., 2023 (arXiv 2302.13971). REFRAG (arXiv 2509.01092, section 2) needs
//! the decoder to read any mix of token embeddings and projected chunk embeddings, one per
//! position, so the forward starts from embeddings rather than token ids.
//!
//! Weights come from a GGUF file and keep llama.cpp's layout: Q/K rows are permuted for
//! interleaved RoPE, so rotary embeddings use `rope_i`. Each matrix is dequantized once to a
//! dense tensor (f32 on CPU, bf16 on CUDA) for prefill and training; the quantized original is
//! kept for decoding steps of a few rows, where it is faster (see README, "Measured").

use crate::model::attention;
use crate::model::elementwise::DecodeQkv;
use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::Tokenizer;

/// `<|endoftext|>`: the position every text reading starts from (see [`Decoder::behind_start`]).
pub const TEXT_START: u32 = 0;

/// The token read after chunk vectors when the decoder is to repeat them (reconstruction) in
/// weights trained with `recon_marker`, so that repeating and continuing have different inputs.
/// A special token of SmolLM2's vocabulary that prose never holds.
pub const RECON_MARKER: &str = "<jupyter_output>";

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DecoderConfig {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub hidden: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub rms_eps: f64,
    pub rope_base: f32,
    pub max_positions: usize,
}

/// Which kernels the forward uses. candle's fused kernels (softmax, rms-norm, rope) have no
/// backward pass; training runs them through [`crate::model::diffops`], which adds one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ops {
    Fused,
    Differentiable,
}

/// Rows at or below which a matmul uses the quantized weights (decoding steps).
const QUANT_MAX_ROWS: usize = 8;
/// Query rows per prefill block: bounds the attention matrix on long prompts.
const PREFILL_BLOCK: usize = 2048;

/// File name of trained decoder adapters inside a weights folder.
pub const LORA_FILE: &str = "decoder_lora.safetensors";

/// Positions times layers run by differentiable forwards (training's decoder and grown chunk
/// encoder): `refrag train` divides the step's share by the decoder's depth and the step's
/// time for its positions per second (the training-speed figure of issue #36).
pub static TRAIN_LAYER_POSITIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// The matrices of each layer that take LoRA adapters.
pub const LORA_TARGETS: [&str; 7] = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];

/// A low-rank update `W + B·A` (Hu et al. 2021, arXiv 2106.09685), kept apart while training;
/// `scale` is folded into B when saved.
#[derive(Clone)]
struct Lora {
    /// [r, in], f32
    a: Tensor,
    /// [out, r], f32
    b: Tensor,
}

#[derive(Clone)]
struct Linear {
    dense: Tensor,
    quant: Option<Quant>,
    lora: Option<Lora>,
}

/// The quantized copy of a matrix that CPU decoding steps read.
#[derive(Clone)]
enum Quant {
    /// candle's quantized matmul.
    Candle(QMatMul),
    /// Q4_1 on an AVX2 CPU ([`crate::model::q4cpu`]): candle's outputs, bit for bit, sooner.
    Q41(std::sync::Arc<crate::model::q4cpu::Q41>),
}

impl Quant {
    fn new(qt: QTensor) -> Result<Self> {
        Ok(match crate::model::q4cpu::Q41::new(&qt) {
            Some(q) => Self::Q41(std::sync::Arc::new(q)),
            None => Self::Candle(QMatMul::from_qtensor(qt)?),
        })
    }

    /// `x w^T` for f32 rows `x` [.., in] (contiguous): [.., out].
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(q) => Ok(q.forward(x)?),
            Self::Q41(q) => {
                let k = x.dim(D::Minus1)?;
                let out = q.matmul(&x.flatten_all()?.to_vec1::<f32>()?, x.elem_count() / k);
                let mut shape = x.dims().to_vec();
                *shape.last_mut().context("a last dim")? = q.rows();
                Ok(Tensor::from_vec(out, shape, x.device())?)
            }
        }
    }
}

impl Linear {
    fn load(qt: QTensor, device: &Device, dtype: DType, keep_quant: bool) -> Result<Self> {
        let dense = qt.dequantize(device)?.to_dtype(dtype)?;
        let quant = if keep_quant { Some(Quant::new(qt)?) } else { None };
        Ok(Self { dense, quant, lora: None })
    }

    /// `x + y`, its norm with `g` and this matrix over the norm, in one kernel
    /// ([`crate::model::elementwise::gemv_norm`]) where it applies (one dense row on CUDA, no
    /// adapters): (the sum, the product) shaped as `x` and [.., out]; None elsewhere.
    fn gemv_norm(&self, x: &Tensor, y: &Tensor, g: &Tensor, eps: f64) -> Result<Option<(Tensor, Tensor)>> {
        let k = x.dim(D::Minus1)?;
        if self.lora.is_some() || self.quant.is_some() || x.elem_count() != k || y.elem_count() != k {
            return Ok(None);
        }
        let (xr, yr) = (x.reshape((1, k))?, y.reshape((1, k))?);
        if !crate::model::elementwise::gemv_norm_fits(&xr, &yr, g, &self.dense) {
            return Ok(None);
        }
        let (sum, prod) = crate::model::elementwise::gemv_norm(&xr, &yr, g, eps, &self.dense)?;
        let mut shape = x.dims().to_vec();
        *shape.last_mut().context("a last dim")? = self.dense.dim(0)?;
        Ok(Some((sum.reshape(x.dims())?, prod.reshape(shape)?)))
    }

    /// `silu(gate) * up` of the stacked gate/up row `gu` [b, 1, 2k] through this matrix in one
    /// kernel ([`crate::model::elementwise::gemv_silu`]) where it applies (one dense row on
    /// CUDA, no adapters): [b, 1, out]; None elsewhere.
    fn gemv_silu(&self, gu: &Tensor) -> Result<Option<Tensor>> {
        let two_k = gu.dim(D::Minus1)?;
        if self.lora.is_some() || self.quant.is_some() || gu.elem_count() != two_k {
            return Ok(None);
        }
        let row = gu.reshape((1, two_k))?;
        if !crate::model::elementwise::gemv_fits(&row, &self.dense, true) {
            return Ok(None);
        }
        let mut shape = gu.dims().to_vec();
        *shape.last_mut().context("a last dim")? = self.dense.dim(0)?;
        Ok(Some(crate::model::elementwise::gemv_silu(&row, &self.dense)?.reshape(shape)?))
    }

    fn forward(&self, x: &Tensor, quant_rows: usize) -> Result<Tensor> {
        let rows = x.elem_count() / x.dim(D::Minus1)?;
        if let (Some(q), true, None) = (&self.quant, rows <= quant_rows, &self.lora) {
            let dt = x.dtype();
            return Ok(q.forward(&x.to_dtype(DType::F32)?.contiguous()?)?.to_dtype(dt)?);
        }
        // Fold leading dims into rows: a broadcast weight would be copied once per batch row.
        let dims = x.dims().to_vec();
        let inner = dims[dims.len() - 1];
        let x2 = x.reshape((rows, inner))?;
        // training: the gradient flows to the input only (the dense weight is frozen)
        let mut y = if crate::model::elementwise::gemv_fits(&x2, &self.dense, false) {
            // one row on CUDA (a decoding step at batch 1): a kernel of its own, not cuBLAS's
            crate::model::elementwise::gemv(&x2, &self.dense)?
        } else {
            crate::model::diffops::frozen_linear(&x2, &self.dense)?
        };
        if let Some(l) = &self.lora {
            // in the activations' dtype (bf16 on CUDA; the adapters stay f32 for the optimizer):
            // f32 copies of every adapted layer's input and output gradient cost more than
            // the rank-r matmuls themselves
            let dt = x2.dtype();
            let u = x2.matmul(&l.a.to_dtype(dt)?.t()?)?.matmul(&l.b.to_dtype(dt)?.t()?)?;
            y = (y + u)?;
        }
        let mut out = dims;
        let last = out.len() - 1;
        out[last] = self.dense.dim(0)?;
        Ok(y.reshape(out)?)
    }
}

#[derive(Clone)]
struct Layer {
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    w_gate: Linear,
    w_up: Linear,
    w_down: Linear,
    attn_norm: Tensor,
    ffn_norm: Tensor,
    /// On CUDA: Q/K/V and gate/up stacked into one matrix each ([`Decoder::fuse`]).
    fused: Option<Fused>,
}

/// A layer's projections that read the same input, as one matmul each: fewer kernel launches
/// per layer (5 of ~21 in a decoding step).
#[derive(Clone)]
struct Fused {
    /// [q + k + v rows, hidden]
    qkv: Linear,
    /// [2 x ffn, hidden]
    gate_up: Linear,
}

/// One layer's keys and values: [batch, kv heads, capacity, head_dim] buffers, allocated at
/// the first write and written in place.
#[derive(Default)]
struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

/// Per-sequence state: one preallocated KV buffer per layer and the next position.
pub struct KvState {
    layers: Vec<LayerKv>,
    capacity: usize,
    pub pos: usize,
    /// Inputs and outputs of the fixed-shape decoding step, made at its first use.
    fixed: Option<FixedStep>,
    /// Held while the keys and values are a captured prefill's buffers ([`Decoder::prefill`]):
    /// that prefill is not replayed into them until this state is dropped, when the decoding
    /// step made over them goes back to the shape for the next prompt's state.
    lease: Option<std::sync::Arc<StepSlot>>,
}

/// A prefill shape's decoding step between the states that read its buffers: its graph
/// reads and writes those buffers, so the next state of the shape replays it instead of
/// capturing its own (~7 ms on an H200, once per answer).
#[derive(Default)]
struct StepSlot(std::sync::Mutex<Option<FixedStep>>);

impl Drop for KvState {
    fn drop(&mut self) {
        if let (Some(slot), Some(fixed)) = (&self.lease, self.fixed.take()) {
            if let Ok(mut kept) = slot.0.lock() {
                *kept = Some(fixed);
            }
        }
    }
}

impl KvState {
    /// Number of positions held.
    pub fn len(&self) -> usize {
        self.pos
    }
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }
    /// Positions it can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Bytes held by keys and values (whole preallocated buffers).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| [&l.k, &l.v])
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// Whether the state has its fixed-shape decoding step (made at its first fixed step, or
    /// handed on from the last state of its prefill shape).
    pub fn has_decoding_step(&self) -> bool {
        self.fixed.is_some()
    }

    /// Sequences held (None before the first write).
    fn batch(&self) -> Option<usize> {
        Some(self.layers.first()?.k.as_ref()?.dims()[0])
    }

    /// Write `k`, `v` ([b, kv heads, t, d]) of layer `li` at position `pos`; the keys and
    /// values of positions 0..pos + t, as views of the buffers.
    fn append(&mut self, li: usize, pos: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        if pos + t > self.capacity {
            bail!("the KV cache holds {} positions; {} were asked for", self.capacity, pos + t);
        }
        let layer = &mut self.layers[li];
        let buffer = |x: &Tensor| -> Result<Tensor> {
            let mut shape = x.dims().to_vec();
            shape[2] = self.capacity;
            Ok(Tensor::zeros(shape, x.dtype(), x.device())?)
        };
        if layer.k.is_none() {
            layer.k = Some(buffer(k)?);
            layer.v = Some(buffer(v)?);
        }
        let (kb, vb) = (layer.k.as_ref().context("keys")?, layer.v.as_ref().context("values")?);
        kb.slice_set(k, 2, pos)?;
        vb.slice_set(v, 2, pos)?;
        Ok((kb.narrow(2, 0, pos + t)?, vb.narrow(2, 0, pos + t)?))
    }
}

/// The fixed-shape decoding step's device buffers: every step reads and writes the same
/// memory, so on CUDA the step is captured once as a graph and replayed (see [`Decoder::step`]).
struct FixedStep {
    batch: usize,
    /// u32 [batch + 1]: the step's tokens, then its position (written before each step).
    io: Tensor,
    /// u32 [capacity]: 0, 1, ... (key positions, for the mask).
    cols: Tensor,
    /// f32 [batch, vocab]: the step's logits.
    logits: Tensor,
    /// The step's graph ([`Decoder::replay`]).
    replay: Replay,
}

/// How [`Decoder::step_by`] runs a decoding step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepPath {
    /// A forward of one position per sequence, shapes growing with the cache.
    Eager,
    /// Fixed shapes: the position lives on the device, keys and values are written at it, and
    /// attention reads the whole capacity with later positions masked. On CUDA the step is
    /// captured as a graph at its first use and replayed (~650 kernel launches become one).
    Fixed,
}

/// A CUDA graph (cudarc's holds raw driver handles, so it is neither `Send` nor `Sync`).
#[cfg(feature = "cuda")]
struct Graph(candle_core::cuda_backend::cudarc::driver::CudaGraph);
// SAFETY: a graph executable may be launched from any thread of its context (cudarc binds the
// context on launch), one launch at a time: a graph is reached only through `&mut` (a KV
// state's decoding step, or a prefill shape under the `Mutex` of [`PrefillGraphs`]).
#[cfg(feature = "cuda")]
unsafe impl Send for Graph {}

/// Device work captured as a CUDA graph at its first run and replayed after; where the capture
/// failed (logged once) or the device is not CUDA, the work runs eagerly each time.
#[derive(Default)]
struct Replay {
    #[cfg(feature = "cuda")]
    graph: Option<Graph>,
    #[cfg(feature = "cuda")]
    uncaptured: bool,
}

/// One prefill shape's device buffers (and, on CUDA, its captured graph): every replay reads
/// `input` and `last` and writes the keys, values and `logits` in place.
struct PrefillGraph {
    batch: usize,
    /// Rows run: the prompt's positions rounded up to [`PREFILL_ROWS`].
    rows: usize,
    /// Positions the keys and values hold (rows, then room to decode).
    capacity: usize,
    /// [batch, rows, hidden]: the prompt's embeddings, then whatever the last prompt left
    /// (rows after the prompt are never seen by it: attention is causal).
    input: Tensor,
    /// u32 [1]: the prompt's last row, whose logits come out.
    last: Tensor,
    /// f32 [batch, vocab].
    logits: Tensor,
    /// Per layer: keys and values, [batch, kv heads, capacity, head_dim].
    kv: Vec<(Tensor, Tensor)>,
    /// Cloned into the state that reads the buffers (see [`KvState::lease`]); holds the
    /// decoding step over them while no state does.
    lease: std::sync::Arc<StepSlot>,
    /// The prefill's graph ([`Decoder::replay`]).
    replay: Replay,
}

/// Prefills of fixed shapes, kept per decoder across prompts (see [`Decoder::prefill`]). A
/// clone of the decoder starts with none (its weights may change).
#[derive(Default)]
struct PrefillGraphs(std::sync::Mutex<Vec<PrefillGraph>>);

impl Clone for PrefillGraphs {
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// A fixed-shape prefill pads the prompt to a multiple of this many rows: prompts of nearby
/// lengths share one graph.
const PREFILL_ROWS: usize = 64;
/// Shapes kept at once (each holds its keys and values: ~23 KB per position at batch 1).
const PREFILL_SHAPES: usize = 16;

/// Which keys the query rows of a forward see.
#[derive(Clone, Copy)]
enum Visible<'a> {
    /// Row i (at position pos + i) sees keys 0..=pos + i.
    Causal { pos: usize },
    /// The fixed step's one row per sequence sees keys 0..=pos, pos being the u32 on the
    /// device in `pos` ([1]); `cols`: 0..capacity (u32), to mask the keys past it.
    UpTo { pos: &'a Tensor, cols: &'a Tensor },
}

/// How a forward's attention runs ([`Decoder::run_layers`]).
enum Attend<'a> {
    /// Scores, mask, softmax and values written out (CPU, training, other head sizes).
    Materialised { mask: Option<Tensor> },
    /// The fused prefill kernel ([`crate::model::attention::CausalAttention`]).
    Prefill { pos: usize },
    /// The fused decoding kernel ([`crate::model::attention::DecodeAttention`]).
    Decode { pos: usize, at: Option<&'a Tensor> },
    /// The fused prefill kernel from position 0 with its backward kernel (training:
    /// [`crate::model::attention::TrainAttention`]).
    Train,
}

/// Rotary rows for the positions a forward reads: keys' and (scaled) queries'.
struct RopeRows {
    cos: Tensor,
    sin: Tensor,
    cos_q: Tensor,
    sin_q: Tensor,
}

/// SmolLM2 (LLaMA) decoder reading embeddings.
#[derive(Clone)]
pub struct Decoder {
    pub cfg: DecoderConfig,
    pub tokenizer: Tokenizer,
    /// Token embedding table, [vocab, hidden], in the compute dtype.
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    /// Rotary tables [max_positions, head_dim / 2] for keys.
    cos: Tensor,
    sin: Tensor,
    /// The same for queries, times the attention scale 1/sqrt(head_dim): rotation is linear in
    /// the tables, so scaled queries come out of it and the scores need no pass of their own
    /// (at head_dim 64 the scale is 1/8, exact in floating point: the same bits).
    cos_q: Tensor,
    sin_q: Tensor,
    pub dtype: DType,
    pub device: Device,
    pub ops: Ops,
    /// sha256 prefix of the GGUF file's tokenizer, to tag indexes built with it.
    pub tokenizer_id: String,
    /// Matmuls over at most this many rows use the quantized weights (when kept); set it to
    /// `usize::MAX` to run everything as llama.cpp-style quantized arithmetic.
    pub quant_rows: usize,
    /// See [`Decoder::set_fused`].
    fuse_projections: bool,
    /// Captured prefills, emptied whenever the weights change.
    prefills: PrefillGraphs,
    /// See [`Decoder::set_layer_grad`].
    layer_grad: bool,
}

fn md_u32(ct: &gguf_file::Content, key: &str) -> Result<usize> {
    Ok(ct.metadata.get(key).with_context(|| format!("GGUF metadata has no {key}"))?.to_u32()? as usize)
}

impl Decoder {
    /// Load a LLaMA-architecture GGUF. `keep_quant` keeps the quantized matrices for decoding.
    pub fn load(path: &Path, device: &Device, ops: Ops, keep_quant: bool) -> Result<Self> {
        Self::load_as(path, device, None, ops, keep_quant)
    }

    /// As [`Decoder::load`], with the compute dtype chosen (default: f32 on CPU, bf16 on CUDA).
    pub fn load_as(path: &Path, device: &Device, dtype: Option<DType>, ops: Ops, keep_quant: bool) -> Result<Self> {
        let bad = |e: anyhow::Error| {
            e.context(format!("{}: not a usable LLaMA GGUF (truncated or wrong file?)", path.display()))
        };
        let mut file =
            std::fs::File::open(path).with_context(|| format!("{}: cannot open the decoder", path.display()))?;
        let ct = gguf_file::Content::read(&mut file).map_err(|e| bad(e.into()))?;
        Self::from_content(ct, &mut file, device, dtype, ops, keep_quant).map_err(bad)
    }

    fn from_content(
        ct: gguf_file::Content,
        file: &mut std::fs::File,
        device: &Device,
        dtype: Option<DType>,
        ops: Ops,
        keep_quant: bool,
    ) -> Result<Self> {
        let arch =
            ct.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
        if arch != "llama" {
            bail!("architecture {arch:?}, expected llama");
        }
        let n_head = md_u32(&ct, "llama.attention.head_count")?;
        let hidden = md_u32(&ct, "llama.embedding_length")?;
        let cfg = DecoderConfig {
            n_layer: md_u32(&ct, "llama.block_count")?,
            n_head,
            n_kv_head: md_u32(&ct, "llama.attention.head_count_kv")?,
            hidden,
            head_dim: hidden / n_head,
            vocab: 0,
            rms_eps: ct.metadata.get("llama.attention.layer_norm_rms_epsilon").context("no rms epsilon")?.to_f32()?
                as f64,
            rope_base: ct.metadata.get("llama.rope.freq_base").and_then(|v| v.to_f32().ok()).unwrap_or(10000.0),
            max_positions: md_u32(&ct, "llama.context_length")?,
        };
        let tokenizer = crate::model::gguf_tokenizer::from_gguf(&ct)?;
        let tokenizer_id = crate::model::gguf_tokenizer::digest(&ct);
        let dtype = dtype.unwrap_or(if device.is_cuda() { DType::BF16 } else { DType::F32 });
        let mut tensor =
            |name: &str| -> Result<QTensor> { ct.tensor(file, name, device).with_context(|| format!("tensor {name}")) };
        let embed_q = tensor("token_embd.weight")?;
        let embed = embed_q.dequantize(device)?.to_dtype(dtype)?;
        let mut cfg = cfg;
        cfg.vocab = embed.dim(0)?;
        let norm = tensor("output_norm.weight")?.dequantize(device)?.to_dtype(dtype)?;
        let lm_head = match tensor("output.weight") {
            Ok(t) => Linear::load(t, device, dtype, keep_quant)?,
            Err(_) => Linear {
                dense: embed.clone(),
                quant: if keep_quant { Some(Quant::new(embed_q)?) } else { None },
                lora: None,
            },
        };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let mut lin = |n: &str| -> Result<Linear> {
                Linear::load(tensor(&format!("blk.{i}.{n}.weight"))?, device, dtype, keep_quant)
            };
            layers.push(Layer {
                wq: lin("attn_q")?,
                wk: lin("attn_k")?,
                wv: lin("attn_v")?,
                wo: lin("attn_output")?,
                w_gate: lin("ffn_gate")?,
                w_up: lin("ffn_up")?,
                w_down: lin("ffn_down")?,
                attn_norm: tensor(&format!("blk.{i}.attn_norm.weight"))?.dequantize(device)?.to_dtype(dtype)?,
                ffn_norm: tensor(&format!("blk.{i}.ffn_norm.weight"))?.dequantize(device)?.to_dtype(dtype)?,
                fused: None,
            });
        }
        let (cos, sin) = rope_tables(&cfg, device, DType::F32)?;
        let scale = 1.0 / (cfg.head_dim as f64).sqrt();
        let (cos_q, sin_q) = ((&cos * scale)?.to_dtype(dtype)?, (&sin * scale)?.to_dtype(dtype)?);
        let (cos, sin) = (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?);
        let mut decoder = Self {
            cfg,
            tokenizer,
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            cos_q,
            sin_q,
            dtype,
            device: device.clone(),
            ops,
            tokenizer_id,
            quant_rows: QUANT_MAX_ROWS,
            fuse_projections: device.is_cuda() && std::env::var("REFRAG_FUSED").map_or(true, |v| v != "0"),
            layer_grad: crate::model::layer_grad::enabled(),
            prefills: PrefillGraphs::default(),
        };
        decoder.fuse()?;
        Ok(decoder)
    }

    /// Whether each layer's Q/K/V and gate/up matrices run as one matmul each. On by default
    /// on CUDA (`REFRAG_FUSED=0`: off), where the weights are dense and a decoding step is
    /// bound by kernel launches; on the CPU the matrices stay apart (decoding reads the
    /// quantized copies, and a stacked copy would double the f32 weights' memory).
    pub fn set_fused(&mut self, on: bool) -> Result<()> {
        self.fuse_projections = on;
        self.fuse()
    }

    /// Whether differentiable forwards run each layer as one op with its backward written out
    /// ([`crate::model::layer_grad`]; default on unless `REFRAG_LAYER_GRAD=0`) or through
    /// autograd op by op (the reference it is tested against).
    pub fn set_layer_grad(&mut self, on: bool) {
        self.layer_grad = on;
    }

    /// Training's layer op ([`crate::model::layer_grad`]) against autograd op by op on this
    /// decoder (differentiable; its adapters are replaced by random ones, rank 8, and dropped
    /// after): the loss's and every
    /// gradient's relative L2 error (the adapters' and the input's), the largest of them. Two
    /// cases: adapters on layers 0 and 1 with a tracked input, and on layer 1 alone with an
    /// untracked one (layer 0 then stays out of the graph, and layer 1 computes no input
    /// gradient). f32 on CPU: ~1e-6; bf16 on CUDA: rounding, ~1e-2.
    pub fn layer_grad_parity(&mut self) -> Result<f32> {
        let dec = self;
        use anyhow::Context;
        use candle_core::Var;
        let dev = dec.device.clone();
        let (t, hidden) = (70, dec.cfg.hidden);
        let ids: Vec<u32> = (0..t as u32).map(|i| 1000 + (i * 37) % 5000).collect();
        let one = dec.embed_tokens(&ids)?.reshape((1, t, hidden))?;
        let embeds = Tensor::cat(&[&one, &(&one * 0.5)?], 0)?;
        let targets = Tensor::new(&ids[1..], &dev)?;
        let rel = |a: &Tensor, b: &Tensor| -> anyhow::Result<f32> {
            let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
            let num = (&a - &b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
            Ok(num / b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?.max(1e-12))
        };
        let mut worst = 0f32;
        for (adapted, tracked) in [(&[0usize, 1][..], true), (&[1usize][..], false)] {
            let mut vars = Vec::new();
            let mut adapters = std::collections::HashMap::new();
            for (name, o, i) in dec.lora_shapes() {
                let layer: usize = name.split('.').nth(1).and_then(|l| l.parse().ok()).context("a layer name")?;
                if adapted.contains(&layer) {
                    let a = Var::randn(0f32, 0.05, (8, i), &dev)?;
                    let b = Var::randn(0f32, 0.05, (o, 8), &dev)?;
                    adapters.insert(format!("{name}.lora_a"), a.as_tensor().clone());
                    adapters.insert(format!("{name}.lora_b"), b.as_tensor().clone());
                    vars.extend([a, b]);
                }
            }
            dec.clear_lora()?;
            dec.attach_lora(&adapters)?;
            let input = Var::from_tensor(&embeds)?;
            let run = |dec: &Decoder| -> anyhow::Result<(Tensor, candle_core::backprop::GradStore)> {
                let x = if tracked { input.as_tensor().clone() } else { embeds.clone() };
                let h = dec.forward_train(&x)?;
                // the next tokens of the first row, and the second row's states under fixed weights
                let logits = dec.head(&h.get(0)?.narrow(0, 0, t - 1)?)?.to_dtype(DType::F32)?;
                let ce = candle_nn::loss::cross_entropy(&logits, &targets)?;
                let w = Tensor::arange(0f32, hidden as f32, &dev)?.affine(1e-3, -0.2)?;
                let loss = (ce + h.get(1)?.to_dtype(DType::F32)?.broadcast_mul(&w)?.sum_all()?)?;
                let g = loss.backward()?;
                Ok((loss, g))
            };
            dec.set_layer_grad(false);
            let (loss_ref, g_ref) = run(dec)?;
            dec.set_layer_grad(true);
            let (loss, g) = run(dec)?;
            worst = worst.max(rel(&loss, &loss_ref)?);
            let mut checked: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
            if tracked {
                checked.push(input.as_tensor());
            } else if g.get(input.as_tensor()).is_some() {
                anyhow::bail!("an untracked input got a gradient");
            }
            for v in checked {
                let (a, b) = (g.get(v).context("a gradient missing")?, g_ref.get(v).context("no reference gradient")?);
                worst = worst.max(rel(a, b)?);
            }
        }
        dec.clear_lora()?;
        dec.set_layer_grad(crate::model::layer_grad::enabled());
        Ok(worst)
    }

    /// Layers whose projections run stacked.
    pub fn fused_layers(&self) -> usize {
        self.layers.iter().filter(|l| l.fused.is_some()).count()
    }

    /// Stack the matrices of [`Decoder::set_fused`] (layers with adapters kept apart or
    /// quantized copies are left apart). Called again after any change to the weights.
    fn fuse(&mut self) -> Result<()> {
        // a captured prefill read the old weights
        self.prefills = PrefillGraphs::default();
        let on = self.fuse_projections;
        for l in &mut self.layers {
            let parts = [&l.wq, &l.wk, &l.wv, &l.w_gate, &l.w_up];
            l.fused = None;
            if !on || parts.iter().any(|lin| lin.lora.is_some() || lin.quant.is_some()) {
                continue;
            }
            let stack = |m: &[&Linear]| -> Result<Linear> {
                let dense = Tensor::cat(&m.iter().map(|lin| &lin.dense).collect::<Vec<_>>(), 0)?;
                Ok(Linear { dense, quant: None, lora: None })
            };
            l.fused = Some(Fused { qkv: stack(&[&l.wq, &l.wk, &l.wv])?, gate_up: stack(&[&l.w_gate, &l.w_up])? });
        }
        Ok(())
    }

    fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        let rest = name.strip_prefix("blk.")?;
        let (i, part) = rest.split_once('.')?;
        let layer = self.layers.get_mut(i.parse::<usize>().ok()?)?;
        Some(match part {
            "attn_q" => &mut layer.wq,
            "attn_k" => &mut layer.wk,
            "attn_v" => &mut layer.wv,
            "attn_output" => &mut layer.wo,
            "ffn_gate" => &mut layer.w_gate,
            "ffn_up" => &mut layer.w_up,
            "ffn_down" => &mut layer.w_down,
            _ => return None,
        })
    }

    /// Every adaptable matrix: (name, out, in).
    pub fn lora_shapes(&self) -> Vec<(String, usize, usize)> {
        let mut v = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            for (n, lin) in LORA_TARGETS.iter().zip([&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]) {
                let (o, inp) = lin.dense.dims2().unwrap_or((0, 0));
                v.push((format!("blk.{i}.{n}"), o, inp));
            }
        }
        v
    }

    /// Attach adapters (`{name}.lora_a` [r, in], `{name}.lora_b` [out, r]) kept apart from the
    /// weights, so that gradients reach them (training).
    pub fn attach_lora(&mut self, t: &HashMap<String, Tensor>) -> Result<()> {
        for (name, o, i) in self.lora_shapes() {
            let (Some(a), Some(b)) = (t.get(&format!("{name}.lora_a")), t.get(&format!("{name}.lora_b"))) else {
                continue;
            };
            if a.dim(1)? != i || b.dim(0)? != o || a.dim(0)? != b.dim(1)? {
                bail!("adapter {name}: shapes {:?}/{:?} do not fit [{o}, {i}]", a.dims(), b.dims());
            }
            let lin = self.linear_mut(&name).context("adapter target")?;
            lin.lora = Some(Lora { a: a.to_dtype(DType::F32)?, b: b.to_dtype(DType::F32)? });
        }
        self.fuse()
    }

    /// Drop every adapter attached with [`Decoder::attach_lora`].
    pub fn clear_lora(&mut self) -> Result<()> {
        for l in &mut self.layers {
            for lin in [&mut l.wq, &mut l.wk, &mut l.wv, &mut l.wo, &mut l.w_gate, &mut l.w_up, &mut l.w_down] {
                lin.lora = None;
            }
        }
        self.fuse()
    }

    /// Fold trained adapters from a file into the dense weights (W += B·A). The quantized
    /// copies no longer match, so the adapted matrices decode densely.
    pub fn merge_lora(&mut self, path: &Path) -> Result<()> {
        let t = candle_core::safetensors::load(path, &self.device)
            .with_context(|| format!("{}: not a safetensors file", path.display()))?;
        self.merge_lora_tensors(&t).with_context(|| format!("{}", path.display()))
    }

    /// Fold adapters (`{name}.lora_a`, `{name}.lora_b`) into the dense weights; an error when
    /// none fits or one has the wrong shape.
    pub fn merge_lora_tensors(&mut self, t: &HashMap<String, Tensor>) -> Result<()> {
        let mut n = 0;
        for (name, o, i) in self.lora_shapes() {
            let (Some(a), Some(b)) = (t.get(&format!("{name}.lora_a")), t.get(&format!("{name}.lora_b"))) else {
                continue;
            };
            let delta = b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)?;
            if delta.dims() != [o, i] {
                bail!(
                    "adapter {name} has shape {:?}, the decoder [{o}, {i}] (trained for another decoder?)",
                    delta.dims()
                );
            }
            let dtype = self.dtype;
            let lin = self.linear_mut(&name).context("adapter target")?;
            lin.dense = (lin.dense.to_dtype(DType::F32)? + delta)?.to_dtype(dtype)?;
            lin.quant = None;
            n += 1;
        }
        if n == 0 {
            bail!("no decoder adapters in it");
        }
        self.fuse()
    }

    /// A fresh KV state able to hold `capacity` positions without reallocating.
    pub fn new_state(&self, capacity: usize) -> KvState {
        let layers = (0..self.cfg.n_layer).map(|_| LayerKv::default()).collect();
        KvState { layers, capacity: capacity.max(1), pos: 0, fixed: None, lease: None }
    }

    /// Token embeddings for `ids`: [len, hidden].
    pub fn embed_tokens(&self, ids: &[u32]) -> Result<Tensor> {
        let ids = Tensor::new(ids, &self.device)?;
        Ok(self.embed.index_select(&ids, 0)?)
    }

    /// A prefix of no positions (for [`Decoder::behind_start`]: the no-context reading).
    pub fn no_prefix(&self) -> Result<Tensor> {
        Ok(Tensor::zeros((0, self.cfg.hidden), self.dtype, &self.device)?)
    }

    /// `prefix` ([p, hidden]) behind one `<|endoftext|>` start position ([1 + p, hidden], the
    /// decoder's dtype). Text readings (training, perplexity) start this way: the decoder treats
    /// its first position as an attention sink and reads almost nothing from it, so a chunk
    /// vector placed first is lost. Measured on a 4-sentence probe (same settings, 80 steps on
    /// CPU): with the start position the projector reconstructs its 16-token chunks at 80%
    /// token accuracy, without it at 32%.
    pub fn behind_start(&self, prefix: &Tensor) -> Result<Tensor> {
        let start = self.embed_tokens(&[TEXT_START])?;
        if prefix.dim(0)? == 0 {
            return Ok(start);
        }
        Ok(Tensor::cat(&[&start, &prefix.to_dtype(self.dtype)?], 0)?)
    }

    /// The embedding of [`RECON_MARKER`]: [1, hidden].
    pub fn recon_marker(&self) -> Result<Tensor> {
        let id = self
            .tokenizer
            .token_to_id(RECON_MARKER)
            .with_context(|| format!("the decoder's vocabulary has no {RECON_MARKER} (the reconstruction marker)"))?;
        self.embed_tokens(&[id])
    }

    /// The prefix a reconstruction reads: `vectors` ([p, hidden]), then the marker when the
    /// weights were trained with one.
    pub fn recon_prefix(&self, vectors: &Tensor, marker: bool) -> Result<Tensor> {
        if !marker {
            return Ok(vectors.clone());
        }
        Ok(Tensor::cat(&[&vectors.to_dtype(self.dtype)?, &self.recon_marker()?], 0)?)
    }

    /// Run `embeds` ([batch, len, hidden]) through the decoder, appending to `state`.
    /// Returns the final-norm hidden states [batch, len, hidden].
    pub fn forward(&self, embeds: &Tensor, state: &mut KvState) -> Result<Tensor> {
        let (_, len, _) = embeds.dims3()?;
        if state.pos + len > self.cfg.max_positions {
            bail!(
                "the input needs {} decoder positions but the decoder has {}",
                state.pos + len,
                self.cfg.max_positions
            );
        }
        // the fused kernel holds no [rows, keys] matrix: one block
        let block = if self.fused_attention() { usize::MAX } else { PREFILL_BLOCK };
        if len <= block {
            return self.forward_block(embeds, state);
        }
        let mut outs = Vec::new();
        let mut start = 0;
        while start < len {
            let n = block.min(len - start);
            // a block of a batch > 1 is strided; the fused kernels need contiguous input
            outs.push(self.forward_block(&embeds.narrow(1, start, n)?.contiguous()?, state)?);
            start += n;
        }
        Ok(Tensor::cat(&outs, 1)?)
    }

    fn forward_block(&self, embeds: &Tensor, state: &mut KvState) -> Result<Tensor> {
        let (pos, t) = (state.pos, embeds.dim(1)?);
        let out = self.run_layers(
            embeds,
            || self.rope_rows(pos, t),
            Visible::Causal { pos },
            |li, new| {
                let (k, v) = new.context("the keys and values of a prefill")?;
                state.append(li, pos, &k, &v)
            },
            true,
        )?;
        state.pos += t;
        Ok(out)
    }

    /// One decoding step: each sequence of `state` reads its next token (`tokens`, one per
    /// sequence). Returns the logits [batch, vocab] (f32). On CUDA the step runs the fixed
    /// path, captured as a CUDA graph (`REFRAG_CUDA_GRAPH=0`: eager), for states of up to
    /// [`graph_max_positions`] and when not profiling; otherwise and on the CPU eagerly.
    pub fn step(&self, state: &mut KvState, tokens: &[u32]) -> Result<Tensor> {
        // a profile mark waits for the device, which a stream being captured may not do
        let graphs = self.device.is_cuda() && state.capacity <= graph_max_positions() && !crate::profile::enabled();
        self.step_by(state, tokens, if graphs { StepPath::Fixed } else { StepPath::Eager })
    }

    /// [`Decoder::step`] along a chosen path. The fixed path needs a prefilled state (its
    /// buffers exist); before that it steps eagerly.
    pub fn step_by(&self, state: &mut KvState, tokens: &[u32], path: StepPath) -> Result<Tensor> {
        let Some(batch) = state.batch().filter(|_| path == StepPath::Fixed) else {
            let h = self.forward(&self.embed_tokens(tokens)?.unsqueeze(1)?, state)?;
            return Ok(self.logits(&h)?.squeeze(1)?);
        };
        if tokens.len() != batch {
            bail!("a step of {} tokens for {batch} sequences", tokens.len());
        }
        if state.pos >= state.capacity.min(self.cfg.max_positions) {
            bail!("the KV cache is full ({} positions)", state.pos);
        }
        if state.fixed.as_ref().is_none_or(|f| f.batch != batch) {
            state.fixed = Some(FixedStep {
                batch,
                io: Tensor::zeros(batch + 1, DType::U32, &self.device)?,
                cols: Tensor::arange(0u32, state.capacity as u32, &self.device)?,
                logits: Tensor::zeros((batch, self.cfg.vocab), DType::F32, &self.device)?,
                replay: Replay::default(),
            });
        }
        let fixed = state.fixed.as_ref().context("fixed step")?;
        let io: Vec<u32> = tokens.iter().copied().chain([state.pos as u32]).collect();
        fixed.io.slice_set(&Tensor::new(io.as_slice(), &self.device)?, 0, 0)?;
        self.run_fixed(state)?;
        state.pos += 1;
        // a copy: the buffer is the next step's output
        Ok(state.fixed.as_ref().context("fixed step")?.logits.copy()?)
    }

    /// The fixed-shape step over `state`'s buffers: reads `io`, writes the keys and values at
    /// the position and the logits. Only device work, the same kernels and addresses at every
    /// position: what a CUDA graph can replay.
    fn fixed_step(&self, state: &KvState) -> Result<()> {
        let f = state.fixed.as_ref().context("fixed step")?;
        let c = &self.cfg;
        let b = f.batch;
        let pos = f.io.narrow(0, b, 1)?;
        let x = self.embed.index_select(&f.io.narrow(0, 0, b)?, 0)?.reshape((b, 1, c.hidden))?;
        // the rotary rows and the scatter index only where the fused Q/K/V kernel does not
        // rotate and write at the device's position itself (a gather each: launches)
        let at = |table: &Tensor| -> Result<Tensor> { Ok(table.index_select(&pos, 0)?) };
        let rows = || -> Result<RopeRows> {
            Ok(RopeRows { cos: at(&self.cos)?, sin: at(&self.sin)?, cos_q: at(&self.cos_q)?, sin_q: at(&self.sin_q)? })
        };
        let mut at_pos: Option<Tensor> = None;
        let h = self.run_layers(
            &x,
            rows,
            Visible::UpTo { pos: &pos, cols: &f.cols },
            |li, new| {
                let layer = &state.layers[li];
                let (kb, vb) = (layer.k.as_ref().context("keys")?, layer.v.as_ref().context("values")?);
                // None: the fused kernel writes them
                if let Some((k, v)) = new {
                    if at_pos.is_none() {
                        let shape = (b, c.n_kv_head, 1, c.head_dim);
                        at_pos = Some(pos.reshape((1, 1, 1, 1))?.broadcast_as(shape)?.contiguous()?);
                    }
                    let at_pos = at_pos.as_ref().context("scatter index")?;
                    kb.scatter_set(at_pos, &k, 2)?;
                    vb.scatter_set(at_pos, &v, 2)?;
                }
                Ok((kb.clone(), vb.clone()))
            },
            true,
        )?;
        f.logits.slice_set(&self.logits(&h)?.reshape((b, c.vocab))?, 0, 0)?;
        Ok(())
    }

    /// The fixed step through its graph ([`Decoder::replay`]).
    fn run_fixed(&self, state: &mut KvState) -> Result<()> {
        // out of the state while `fixed_step` reads it
        let mut replay = std::mem::take(&mut state.fixed.as_mut().context("fixed step")?.replay);
        let done = self.replay(&mut replay, || self.fixed_step(state));
        state.fixed.as_mut().context("fixed step")?.replay = replay;
        done
    }

    /// Run `work` (device work only, the same kernels and addresses every time) through
    /// `replay`: its graph when there is one; else, unless a capture failed before, run it and
    /// capture it ([`Decoder::capture`]); else eagerly.
    fn replay(&self, replay: &mut Replay, work: impl Fn() -> Result<()>) -> Result<()> {
        #[cfg(feature = "cuda")]
        {
            if let Some(g) = &replay.graph {
                return Ok(g.0.launch().map_err(candle_core::Error::wrap)?);
            }
            if !replay.uncaptured {
                replay.graph = self.capture(work)?;
                replay.uncaptured = replay.graph.is_none();
                return Ok(());
            }
        }
        #[cfg(not(feature = "cuda"))]
        let _ = replay;
        work()
    }

    /// Run `work` (device work only, the same kernels and addresses every time) eagerly, then
    /// capture it as a CUDA graph: the eager run fills candle's cache of kernel parameters, which
    /// a capture may not upload, and leaves its outputs in place. None (logged) where the
    /// capture fails or the device is not CUDA; `work`'s outputs stand either way.
    #[cfg(feature = "cuda")]
    fn capture(&self, work: impl Fn() -> Result<()>) -> Result<Option<Graph>> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let Device::Cuda(cuda) = &self.device else {
            work()?;
            return Ok(None);
        };
        let start = std::time::Instant::now();
        let _params = cuda.enable_cuda_graph_htod_cache();
        work()?;
        let stream = cuda.cuda_stream();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(candle_core::Error::wrap)?;
        let recorded = work();
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
        match (recorded, graph) {
            (Ok(()), Ok(Some(g))) => {
                g.upload().map_err(candle_core::Error::wrap)?;
                tracing::info!("ran and captured a CUDA graph in {:.1} ms", start.elapsed().as_secs_f64() * 1e3);
                Ok(Some(Graph(g)))
            }
            (recorded, graph) => {
                let why = recorded.err().map(|e| e.to_string()).or_else(|| graph.err().map(|e| e.to_string()));
                tracing::warn!("CUDA graph capture failed ({}); running eagerly", why.unwrap_or("no graph".into()));
                Ok(None)
            }
        }
    }

    /// Prefill `embeds` ([batch, len, hidden]) into `state`; the logits (f32, [batch, vocab])
    /// of its last position. On CUDA a prompt into a fresh state of up to
    /// [`graph_max_prefill`] positions runs the fixed-shape prefill, captured as a graph the
    /// first time its shape comes and replayed after (`REFRAG_CUDA_GRAPH=0`: never); otherwise,
    /// and on the CPU, [`Decoder::forward`].
    pub fn prefill(&self, embeds: &Tensor, state: &mut KvState) -> Result<Tensor> {
        let graphs = self.device.is_cuda() && embeds.dim(1)? <= graph_max_prefill() && !crate::profile::enabled();
        self.prefill_by(embeds, state, if graphs { StepPath::Fixed } else { StepPath::Eager })
    }

    /// [`Decoder::prefill`] along a chosen path. The fixed path pads the prompt to a multiple
    /// of [`PREFILL_ROWS`] rows and runs it on buffers kept for that shape (the state then
    /// reads their keys and values; the padding's keys lie past its position, where decoding
    /// masks them and then overwrites them). It needs a fresh state and inference ops, and
    /// falls back to the eager path where the shape's buffers are still read by a live state
    /// and [`PREFILL_SHAPES`] shapes are kept.
    pub fn prefill_by(&self, embeds: &Tensor, state: &mut KvState, path: StepPath) -> Result<Tensor> {
        let (batch, t, _) = embeds.dims3()?;
        if t == 0 {
            bail!("an empty prompt");
        }
        let fixed_ok = path == StepPath::Fixed && state.pos == 0 && state.batch().is_none() && self.ops == Ops::Fused;
        if fixed_ok {
            if let Some(logits) = self.prefill_fixed(embeds, state)? {
                return Ok(logits);
            }
        }
        let h = self.forward(embeds, state)?;
        Ok(self.logits(&h.narrow(1, t - 1, 1)?)?.reshape((batch, self.cfg.vocab))?)
    }

    /// The fixed-shape prefill (see [`Decoder::prefill_by`]); None where no buffers are free.
    fn prefill_fixed(&self, embeds: &Tensor, state: &mut KvState) -> Result<Option<Tensor>> {
        let (batch, t, _) = embeds.dims3()?;
        let rows = t.div_ceil(PREFILL_ROWS) * PREFILL_ROWS;
        let capacity = state.capacity.max(rows).div_ceil(PREFILL_ROWS) * PREFILL_ROWS;
        if rows > self.cfg.max_positions {
            return Ok(None);
        }
        let mut shapes = self.prefills.0.lock().map_err(|_| anyhow::anyhow!("prefill graphs poisoned"))?;
        let free = |g: &PrefillGraph| std::sync::Arc::strong_count(&g.lease) == 1;
        let found = shapes.iter().position(|g| (g.batch, g.rows, g.capacity) == (batch, rows, capacity) && free(g));
        let i = match found {
            Some(i) => i,
            None => {
                if shapes.len() >= PREFILL_SHAPES {
                    let Some(old) = shapes.iter().position(free) else { return Ok(None) };
                    shapes.swap_remove(old);
                }
                shapes.push(self.prefill_buffers(batch, rows, capacity)?);
                shapes.len() - 1
            }
        };
        let g = &mut shapes[i];
        g.input.slice_set(&embeds.to_dtype(self.dtype)?.contiguous()?, 1, 0)?;
        g.last.slice_set(&Tensor::new(&[t as u32 - 1], &self.device)?, 0, 0)?;
        self.run_prefill(g)?;
        for (layer, (k, v)) in state.layers.iter_mut().zip(&g.kv) {
            (layer.k, layer.v) = (Some(k.clone()), Some(v.clone()));
        }
        state.capacity = capacity;
        state.pos = t;
        state.fixed = g.lease.0.lock().ok().and_then(|mut kept| kept.take());
        state.lease = Some(g.lease.clone());
        // a copy: the buffer is the next prompt's output
        Ok(Some(g.logits.copy()?))
    }

    fn prefill_buffers(&self, batch: usize, rows: usize, capacity: usize) -> Result<PrefillGraph> {
        let c = &self.cfg;
        let zeros = |shape: &[usize], dtype| Tensor::zeros(shape, dtype, &self.device);
        let kv = (0..c.n_layer)
            .map(|_| {
                let shape = [batch, c.n_kv_head, capacity, c.head_dim];
                Ok((zeros(&shape, self.dtype)?, zeros(&shape, self.dtype)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PrefillGraph {
            batch,
            rows,
            capacity,
            input: zeros(&[batch, rows, c.hidden], self.dtype)?,
            last: zeros(&[1], DType::U32)?,
            logits: zeros(&[batch, c.vocab], DType::F32)?,
            kv,
            lease: std::sync::Arc::default(),
            replay: Replay::default(),
        })
    }

    /// The fixed-shape prefill over `g`'s buffers: only device work, the same kernels and
    /// addresses every time.
    fn prefill_step(&self, g: &PrefillGraph) -> Result<()> {
        let h = self.run_layers(
            &g.input,
            || self.rope_rows(0, g.rows),
            Visible::Causal { pos: 0 },
            |li, new| {
                let (k, v) = new.context("the keys and values of a prefill")?;
                let (kb, vb) = &g.kv[li];
                kb.slice_set(&k, 2, 0)?;
                vb.slice_set(&v, 2, 0)?;
                Ok((kb.narrow(2, 0, g.rows)?, vb.narrow(2, 0, g.rows)?))
            },
            true,
        )?;
        let last = h.index_select(&g.last, 1)?;
        g.logits.slice_set(&self.logits(&last)?.reshape((g.batch, self.cfg.vocab))?, 0, 0)?;
        Ok(())
    }

    /// The shape's prefill through its graph ([`Decoder::replay`]).
    fn run_prefill(&self, g: &mut PrefillGraph) -> Result<()> {
        // out of the shape while `prefill_step` reads it
        let mut replay = std::mem::take(&mut g.replay);
        let done = self.replay(&mut replay, || self.prefill_step(g));
        g.replay = replay;
        done
    }

    /// Forward over a whole sequence from position 0 without a KV cache: the path training
    /// differentiates through (the cache's in-place writes are not tracked by autograd).
    pub fn forward_train(&self, embeds: &Tensor) -> Result<Tensor> {
        let (_, len, _) = embeds.dims3()?;
        if len > self.cfg.max_positions {
            bail!("{len} positions exceed the decoder's {}", self.cfg.max_positions);
        }
        self.run_from_start(embeds, true)
    }

    /// The residual stream after the last layer, before the final norm, over whole sequences
    /// from position 0 ([batch, len, hidden]): what a chunk encoder grown from the decoder's
    /// first layers ([`Decoder::first_layers`]) pools. Differentiable with [`Ops::Differentiable`].
    pub fn states(&self, embeds: &Tensor) -> Result<Tensor> {
        self.run_from_start(embeds, false)
    }

    /// The layers over whole sequences from position 0, without a KV cache.
    fn run_from_start(&self, embeds: &Tensor, final_norm: bool) -> Result<Tensor> {
        let t = embeds.dim(1)?;
        if self.ops == Ops::Differentiable {
            let n = (embeds.dim(0)? * t * self.layers.len()) as u64;
            TRAIN_LAYER_POSITIONS.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
        if self.ops == Ops::Differentiable && self.layer_grad {
            return self.run_layers_grad(embeds, final_norm);
        }
        let same = |_, new: Option<_>| new.context("the keys and values of a forward");
        self.run_layers(embeds, || self.rope_rows(0, t), Visible::Causal { pos: 0 }, same, final_norm)
    }

    /// [`Decoder::run_from_start`] with each layer one op whose backward is written out
    /// ([`crate::model::layer_grad`]): the adapters' tensors are the op's inputs, so their
    /// gradients come out of it.
    fn run_layers_grad(&self, embeds: &Tensor, final_norm: bool) -> Result<Tensor> {
        use crate::model::layer_grad::{self, Attend, LayerParts, Mat};
        let t = embeds.dim(1)?;
        let c = &self.cfg;
        let attend = if t > 1 && self.fused_attention_with_backward() {
            Attend::Kernel
        } else {
            match self.causal_mask(t, 0)? {
                Some(mask) => Attend::Masked(mask),
                None => Attend::Masked(Tensor::zeros((1, 1), self.dtype, &self.device)?),
            }
        };
        let rope = self.rope_rows(0, t)?;
        let mut x = embeds.to_dtype(self.dtype)?;
        for layer in &self.layers {
            let mut vars = Vec::new();
            let mut mat = |lin: &Linear| -> Result<Mat> {
                let lora = match &lin.lora {
                    Some(l) => {
                        vars.extend([l.a.clone(), l.b.clone()]);
                        let own = |v: &Tensor| v.detach().to_dtype(self.dtype);
                        Some((own(&l.a)?, own(&l.b)?))
                    }
                    None => None,
                };
                Ok(Mat { w: lin.dense.clone(), lora })
            };
            let mats = [
                mat(&layer.wq)?,
                mat(&layer.wk)?,
                mat(&layer.wv)?,
                mat(&layer.wo)?,
                mat(&layer.w_gate)?,
                mat(&layer.w_up)?,
                mat(&layer.w_down)?,
            ];
            let parts = LayerParts {
                mats,
                attn_norm: layer.attn_norm.clone(),
                ffn_norm: layer.ffn_norm.clone(),
                eps: c.rms_eps,
                heads: c.n_head,
                kv_heads: c.n_kv_head,
                head_dim: c.head_dim,
                cos: rope.cos.clone(),
                sin: rope.sin.clone(),
                cos_q: rope.cos_q.clone(),
                sin_q: rope.sin_q.clone(),
                attend: attend.clone(),
            };
            x = layer_grad::forward(&x, parts, &vars)?;
        }
        if !final_norm {
            return Ok(x);
        }
        self.rms_norm(&x, &self.norm)
    }

    /// Rotary rows of positions pos..pos + t.
    fn rope_rows(&self, pos: usize, t: usize) -> Result<RopeRows> {
        let rows = |table: &Tensor| table.narrow(0, pos, t);
        Ok(RopeRows {
            cos: rows(&self.cos)?,
            sin: rows(&self.sin)?,
            cos_q: rows(&self.cos_q)?,
            sin_q: rows(&self.sin_q)?,
        })
    }

    /// A decoder of this one's first `n` layers (the same tensors, shared; no adapters of its
    /// own until [`Decoder::attach_lora`] or [`Decoder::merge_lora_tensors`]).
    pub fn first_layers(&self, n: usize) -> Result<Decoder> {
        if n == 0 || n > self.cfg.n_layer {
            bail!("a chunk encoder of {n} decoder layers: the decoder has {}", self.cfg.n_layer);
        }
        let mut d = self.clone();
        d.layers.truncate(n);
        d.cfg.n_layer = n;
        d.clear_lora()?;
        Ok(d)
    }

    /// The layers over `embeds` ([b, t, hidden]) at the positions whose rotary rows `rope`
    /// gives (called once, where the rows are needed), each query row seeing the keys `visible`
    /// says. `kv(layer, k, v)` stores the new keys and values ([b, kv heads, t, d]) and gives
    /// back all the keys and values to attend to.
    fn run_layers(
        &self,
        embeds: &Tensor,
        rope: impl Fn() -> Result<RopeRows>,
        visible: Visible,
        mut kv: impl FnMut(usize, Option<(Tensor, Tensor)>) -> Result<(Tensor, Tensor)>,
        final_norm: bool,
    ) -> Result<Tensor> {
        let (b, t, _) = embeds.dims3()?;
        let c = &self.cfg;
        let n_rep = c.n_head / c.n_kv_head;
        let attend = match visible {
            Visible::Causal { pos: 0 } if t > 1 && self.fused_attention_with_backward() => Attend::Train,
            _ if !self.fused_attention() => Attend::Materialised { mask: self.mask(visible, t)? },
            Visible::Causal { pos } if t > 1 => Attend::Prefill { pos },
            Visible::Causal { pos } => Attend::Decode { pos, at: None },
            Visible::UpTo { pos, .. } => Attend::Decode { pos: 0, at: Some(pos) },
        };
        let fuse = self.fused_elementwise();
        // a captured decoding step's position: one kernel rotates and writes into the caches
        let decode_at = match attend {
            Attend::Decode { at: Some(at), .. } if fuse && crate::model::elementwise::decode_qkv_enabled() => Some(at),
            _ => None,
        };
        let mut rope_rows: Option<RopeRows> = None;
        let mut x = embeds.to_dtype(self.dtype)?;
        // the residual stream is x + pending: each layer's last output is added by the next norm
        let mut pending: Option<Tensor> = None;
        for (li, layer) in self.layers.iter().enumerate() {
            // a captured decoding step: the add, the norm and the Q/K/V product in one kernel
            let last = pending.take();
            let fused_qkv = match (&layer.fused, decode_at, &last) {
                (Some(f), Some(_), Some(p)) if fuse => f.qkv.gemv_norm(&x, p, &layer.attn_norm, self.cfg.rms_eps)?,
                _ => None,
            };
            let h;
            (x, h) = match &fused_qkv {
                Some((sum, _)) => (sum.clone(), None),
                None => {
                    let (x, h) = self.add_norm(&x, last, &layer.attn_norm, fuse)?;
                    (x, Some(h))
                }
            };
            let heads = |lin: &Linear, n: usize| -> Result<Tensor> {
                let h = h.as_ref().context("the normed input")?;
                Ok(lin.forward(h, self.quant_rows)?.reshape((b, t, n, c.head_dim))?.transpose(1, 2)?)
            };
            let (q, k, v) = if let (Some(f), Some(pos)) = (&layer.fused, decode_at) {
                let (k_cache, v_cache) = kv(li, None)?;
                let qkv = match (&fused_qkv, &h) {
                    (Some((_, qkv)), _) => qkv.clone(),
                    (None, Some(h)) => f.qkv.forward(h, self.quant_rows)?,
                    (None, None) => bail!("no normed input"),
                };
                let parts = DecodeQkv {
                    pos,
                    cos_q: &self.cos_q,
                    sin_q: &self.sin_q,
                    cos: &self.cos,
                    sin: &self.sin,
                    k_cache: &k_cache,
                    v_cache: &v_cache,
                    n_q: c.n_head,
                    n_kv: c.n_kv_head,
                };
                (crate::model::elementwise::decode_qkv(&qkv, parts)?, k_cache, v_cache)
            } else {
                let (q, k, v) = match &layer.fused {
                    Some(f) => {
                        // [b, q + k + v heads, t, d] in one copy; each part is a run of heads
                        let qkv = heads(&f.qkv, c.n_head + 2 * c.n_kv_head)?.contiguous()?;
                        let (nq, nk) = (c.n_head, c.n_kv_head);
                        (qkv.narrow(1, 0, nq)?, qkv.narrow(1, nq, nk)?, qkv.narrow(1, nq + nk, nk)?)
                    }
                    None => {
                        (heads(&layer.wq, c.n_head)?, heads(&layer.wk, c.n_kv_head)?, heads(&layer.wv, c.n_kv_head)?)
                    }
                };
                if rope_rows.is_none() {
                    rope_rows = Some(rope()?);
                }
                let r = rope_rows.as_ref().context("rotary rows")?;
                let q = self.rope(&q.contiguous()?, &r.cos_q, &r.sin_q)?; // scaled by 1/sqrt(head_dim)
                let k = self.rope(&k.contiguous()?, &r.cos, &r.sin)?;
                let (k, v) = kv(li, Some((k, v.contiguous()?)))?;
                (q, k, v)
            };
            crate::profile::mark(&self.device, "fwd_qkv");
            let y = match &attend {
                Attend::Materialised { mask } => self.attention(&q, &k, &v, mask.as_ref())?,
                &Attend::Prefill { pos } => q.apply_op3_no_bwd(&k, &v, &attention::CausalAttention { pos, n_rep })?,
                Attend::Train => attention::TrainAttention::apply(&q, &k, &v, n_rep)?,
                &Attend::Decode { pos, at } => {
                    q.apply_op3_no_bwd(&k, &v, &attention::DecodeAttention { pos, at, n_rep })?
                }
            };
            let out = layer.wo.forward(&y.reshape((b, t, c.hidden))?, self.quant_rows)?;
            crate::profile::mark(&self.device, "fwd_attention");
            // silu(gate) * up through the down projection (one row on CUDA: in its kernel)
            let down_silu = |gu: &Tensor| -> Result<Tensor> {
                Ok(match layer.w_down.gemv_silu(gu)? {
                    Some(y) => y,
                    None => layer.w_down.forward(&crate::model::elementwise::silu_mul(gu)?, self.quant_rows)?,
                })
            };
            let down = |act: &Tensor| layer.w_down.forward(act, self.quant_rows);
            pending = Some(match &layer.fused {
                // one row: the add, the norm and the gate/up product in one kernel
                Some(f) if fuse => match f.gate_up.gemv_norm(&x, &out, &layer.ffn_norm, self.cfg.rms_eps)? {
                    Some((sum, gu)) => {
                        x = sum;
                        down_silu(&gu)?
                    }
                    None => {
                        let h;
                        (x, h) = self.add_norm(&x, Some(out), &layer.ffn_norm, fuse)?;
                        down_silu(&f.gate_up.forward(&h, self.quant_rows)?)?
                    }
                },
                fused => {
                    let h;
                    (x, h) = self.add_norm(&x, Some(out), &layer.ffn_norm, fuse)?;
                    match fused {
                        Some(f) => {
                            let gu = f.gate_up.forward(&h, self.quant_rows)?;
                            let n = gu.dim(D::Minus1)? / 2;
                            down(&(candle_nn::ops::silu(&gu.narrow(D::Minus1, 0, n)?)? * gu.narrow(D::Minus1, n, n)?)?)?
                        }
                        None => {
                            let gate = layer.w_gate.forward(&h, self.quant_rows)?;
                            down(&(candle_nn::ops::silu(&gate)? * layer.w_up.forward(&h, self.quant_rows)?)?)?
                        }
                    }
                }
            });
            crate::profile::mark(&self.device, "fwd_mlp");
        }
        if !final_norm {
            return Ok(match pending {
                Some(p) => (x + p)?,
                None => x,
            });
        }
        Ok(self.add_norm(&x, pending, &self.norm, fuse)?.1)
    }

    /// `x + y` (when there is a `y`) and its norm with `w`: one kernel when `fuse`
    /// ([`crate::model::elementwise`]), else the add and [`Decoder::rms_norm`].
    fn add_norm(&self, x: &Tensor, y: Option<Tensor>, w: &Tensor, fuse: bool) -> Result<(Tensor, Tensor)> {
        let x = match y {
            Some(y) if fuse => return Ok(crate::model::elementwise::add_norm(x, &y, w, self.cfg.rms_eps)?),
            Some(y) => (x + y)?,
            None => x.clone(),
        };
        let h = self.rms_norm(&x, w)?;
        Ok((x, h))
    }

    /// Whether [`Decoder::run_layers`] uses the fused elementwise kernels: on CUDA in bf16
    /// inference unless `REFRAG_FUSED_ELEMENTWISE=0`.
    fn fused_elementwise(&self) -> bool {
        self.ops == Ops::Fused
            && self.dtype == DType::BF16
            && self.device.is_cuda()
            && crate::model::elementwise::enabled()
    }

    /// [`attention::written_out`] with the softmax of this decoder's ops: [b, t, heads, d].
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let softmax = |s: &Tensor| match self.ops {
            Ops::Fused => candle_nn::ops::softmax_last_dim(s),
            Ops::Differentiable => crate::model::diffops::softmax_last_dim(s),
        };
        Ok(attention::written_out(q, k, v, mask, softmax)?.0)
    }

    /// The additive mask of `visible` for `t` query rows (None: every key is visible).
    fn mask(&self, visible: Visible, t: usize) -> Result<Option<Tensor>> {
        match visible {
            Visible::Causal { pos } => self.causal_mask(t, pos),
            // later positions (still zeros in the buffers) are masked out: [1, capacity]
            Visible::UpTo { pos, cols } => Ok(Some(self.additive_mask(&cols.broadcast_gt(pos)?)?.unsqueeze(0)?)),
        }
    }

    /// Vocabulary logits (f32) of input embeddings read as if they were final hidden states
    /// (the final norm, then the LM head; SmolLM2 ties the head to the token embeddings): the
    /// tokens an embedding points at.
    pub fn readout(&self, embeds: &Tensor) -> Result<Tensor> {
        self.logits(&self.rms_norm(&embeds.to_dtype(self.dtype)?, &self.norm)?)
    }

    /// Vocabulary logits (f32) for hidden states [.., hidden].
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.head(hidden)?.to_dtype(DType::F32)?)
    }

    /// Vocabulary logits in the decoder's dtype (bf16 on CUDA): what training's cross-entropy
    /// reads, without an f32 copy of its largest tensor.
    pub fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden, self.quant_rows)
    }

    /// Whether attention goes through the fused kernels ([`crate::model::attention`]): on
    /// CUDA, in bf16, at head size 64, for inference (the kernels have no backward pass).
    fn fused_attention(&self) -> bool {
        self.device.is_cuda()
            && self.dtype == DType::BF16
            && self.ops == Ops::Fused
            && self.cfg.head_dim == attention::HEAD
            && self.cfg.n_head <= self.cfg.n_kv_head * attention::MAX_REP
            && attention::enabled()
    }

    /// Whether training's causal attention goes through the fused kernels with a backward
    /// pass: on CUDA, in bf16, at head size 64.
    fn fused_attention_with_backward(&self) -> bool {
        self.device.is_cuda()
            && self.dtype == DType::BF16
            && self.ops == Ops::Differentiable
            && self.cfg.head_dim == attention::HEAD
            && attention::enabled()
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let eps = self.cfg.rms_eps as f32;
        Ok(match self.ops {
            Ops::Fused => candle_nn::ops::rms_norm(x, w, eps)?,
            Ops::Differentiable => crate::model::diffops::rms_norm(x, w, eps)?,
        })
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        Ok(match self.ops {
            Ops::Fused => candle_nn::rotary_emb::rope_i(x, cos, sin)?,
            Ops::Differentiable => crate::model::diffops::rope_i(x, cos, sin)?,
        })
    }

    /// Additive causal mask [t, pos + t] for t > 1 rows (one row sees every key: None): query
    /// i sees keys up to pos + i. Built on the device: a host-built mask is t x (pos + t)
    /// floats to fill and copy per block (64 MiB at 2048 x 8192).
    fn causal_mask(&self, t: usize, pos: usize) -> Result<Option<Tensor>> {
        if t <= 1 {
            return Ok(None);
        }
        let rows = Tensor::arange(pos as u32, (pos + t) as u32, &self.device)?.reshape((t, 1))?;
        let cols = Tensor::arange(0u32, (pos + t) as u32, &self.device)?.reshape((1, pos + t))?;
        Ok(Some(self.additive_mask(&cols.broadcast_gt(&rows)?)?))
    }

    /// 0 where `hidden` is 0, -1e30 where it is 1 (u8), in the compute dtype. -1e30 rather
    /// than -inf: 0 x -inf would be NaN; exp underflows to 0 all the same.
    fn additive_mask(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(hidden.to_dtype(DType::F32)?.affine(-1e30, 0.0)?.to_dtype(self.dtype)?)
    }
}

/// The largest KV capacity decoded through a CUDA graph (`REFRAG_CUDA_GRAPH_MAX`). Default:
/// every capacity with the fused attention kernels (their decoding kernel reads the position
/// from the device and skips the keys past it), else 1536 positions. Measured on an H200 (bf16,
/// batch 1, ms per token, graph / eager): with the kernels, full context at 2049 positions
/// 2.60 / 3.34, at 4097 2.67 / 4.16, at 8193 2.81 / 3.23; without them the fixed step attends
/// over the whole capacity: 4.4 / 4.2 at 2049, 12.5 / 9.4 at 8193.
/// `REFRAG_CUDA_GRAPH=0` makes it 0 (no graphs). Read once.
pub fn graph_max_positions() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        if std::env::var("REFRAG_CUDA_GRAPH").is_ok_and(|v| v == "0") {
            return 0;
        }
        let default = if attention::enabled() { usize::MAX } else { 1536 };
        std::env::var("REFRAG_CUDA_GRAPH_MAX").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
    })
}

/// The longest prompt prefilled through a CUDA graph ([`Decoder::prefill`];
/// `REFRAG_PREFILL_GRAPH_MAX`, default 2048 positions: REFRAG's compressed prompts, where a
/// prefill is bound by kernel launches; longer prompts are bound by arithmetic). 0 with
/// `REFRAG_CUDA_GRAPH=0`. Read once.
pub fn graph_max_prefill() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        if graph_max_positions() == 0 {
            return 0;
        }
        std::env::var("REFRAG_PREFILL_GRAPH_MAX").ok().and_then(|v| v.parse().ok()).unwrap_or(2048)
    })
}

fn rope_tables(cfg: &DecoderConfig, device: &Device, dtype: DType) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let inv: Vec<f32> = (0..half).map(|i| 1.0 / cfg.rope_base.powf(2.0 * i as f32 / cfg.head_dim as f32)).collect();
    let inv = Tensor::from_vec(inv, (1, half), device)?;
    let t = Tensor::arange(0u32, cfg.max_positions as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((cfg.max_positions, 1))?;
    let freqs = t.matmul(&inv)?;
    Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
}
