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

use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::kv_cache::KvCache;
use std::collections::HashMap;
use std::path::Path;
use tokenizers::Tokenizer;

/// `<|endoftext|>`: the position every text reading starts from (see [`Decoder::behind_start`]).
pub const TEXT_START: u32 = 0;

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
    quant: Option<QMatMul>,
    lora: Option<Lora>,
}

impl Linear {
    fn load(qt: QTensor, device: &Device, dtype: DType, keep_quant: bool) -> Result<Self> {
        let dense = qt.dequantize(device)?.to_dtype(dtype)?;
        let quant = if keep_quant { Some(QMatMul::from_qtensor(qt)?) } else { None };
        Ok(Self { dense, quant, lora: None })
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
        let mut y = crate::model::diffops::frozen_linear(&x2, &self.dense)?;
        if let Some(l) = &self.lora {
            let u = x2.to_dtype(DType::F32)?.matmul(&l.a.t()?)?.matmul(&l.b.t()?)?;
            let dt = y.dtype();
            y = (y + u.to_dtype(dt)?)?;
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
}

/// Per-sequence state: one preallocated KV cache per layer and the next position.
pub struct KvState {
    caches: Vec<KvCache>,
    pub pos: usize,
}

impl KvState {
    /// Number of positions held.
    pub fn len(&self) -> usize {
        self.pos
    }
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }
    /// Bytes held by keys and values (whole preallocated buffers).
    pub fn bytes(&self) -> usize {
        self.caches
            .iter()
            .flat_map(|c| [c.k_cache().all_data(), c.v_cache().all_data()])
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
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
                quant: if keep_quant { Some(QMatMul::from_qtensor(embed_q)?) } else { None },
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
            });
        }
        let (cos, sin) = rope_tables(&cfg, device, DType::F32)?;
        let scale = 1.0 / (cfg.head_dim as f64).sqrt();
        let (cos_q, sin_q) = ((&cos * scale)?.to_dtype(dtype)?, (&sin * scale)?.to_dtype(dtype)?);
        let (cos, sin) = (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?);
        Ok(Self {
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
        })
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
        Ok(())
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
        Ok(())
    }

    /// A fresh KV state able to hold `capacity` positions without reallocating.
    pub fn new_state(&self, capacity: usize) -> KvState {
        KvState { caches: (0..self.cfg.n_layer).map(|_| KvCache::new(2, capacity.max(1))).collect(), pos: 0 }
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
        if len <= PREFILL_BLOCK {
            return self.forward_block(embeds, state);
        }
        let mut outs = Vec::new();
        let mut start = 0;
        while start < len {
            let n = PREFILL_BLOCK.min(len - start);
            // a block of a batch > 1 is strided; the fused kernels need contiguous input
            outs.push(self.forward_block(&embeds.narrow(1, start, n)?.contiguous()?, state)?);
            start += n;
        }
        Ok(Tensor::cat(&outs, 1)?)
    }

    fn forward_block(&self, embeds: &Tensor, state: &mut KvState) -> Result<Tensor> {
        let pos = state.pos;
        let out = self.run_layers(embeds, pos, Some(&mut state.caches), true)?;
        state.pos += embeds.dim(1)?;
        Ok(out)
    }

    /// Forward over a whole sequence from position 0 without a KV cache: the path training
    /// differentiates through (the cache's in-place writes are not tracked by autograd).
    pub fn forward_train(&self, embeds: &Tensor) -> Result<Tensor> {
        let (_, len, _) = embeds.dims3()?;
        if len > self.cfg.max_positions {
            bail!("{len} positions exceed the decoder's {}", self.cfg.max_positions);
        }
        self.run_layers(embeds, 0, None, true)
    }

    /// The residual stream after the last layer, before the final norm, over whole sequences
    /// from position 0 ([batch, len, hidden]): what a chunk encoder grown from the decoder's
    /// first layers ([`Decoder::first_layers`]) pools. Differentiable with [`Ops::Differentiable`].
    pub fn states(&self, embeds: &Tensor) -> Result<Tensor> {
        self.run_layers(embeds, 0, None, false)
    }

    /// A decoder of this one's first `n` layers (the same tensors, shared; no adapters of its
    /// own until [`Decoder::attach_lora`] or [`Decoder::merge_lora_tensors`]).
    pub fn first_layers(&self, n: usize) -> Result<Decoder> {
        if n == 0 || n > self.cfg.n_layer {
            bail!("a chunk encoder of {n} decoder layers: the decoder has {}", self.cfg.n_layer);
        }
        let mut d = self.clone();
        d.layers.truncate(n);
        for l in &mut d.layers {
            for lin in [&mut l.wq, &mut l.wk, &mut l.wv, &mut l.wo, &mut l.w_gate, &mut l.w_up, &mut l.w_down] {
                lin.lora = None;
            }
        }
        d.cfg.n_layer = n;
        Ok(d)
    }

    fn run_layers(
        &self,
        embeds: &Tensor,
        pos: usize,
        mut caches: Option<&mut Vec<KvCache>>,
        final_norm: bool,
    ) -> Result<Tensor> {
        let (b, t, _) = embeds.dims3()?;
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        let (cos_q, sin_q) = (self.cos_q.narrow(0, pos, t)?, self.sin_q.narrow(0, pos, t)?);
        let c = &self.cfg;
        let n_rep = c.n_head / c.n_kv_head;
        let mask = if t > 1 { Some(self.causal_mask(t, pos)?) } else { None };
        let mut x = embeds.to_dtype(self.dtype)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = self.rms_norm(&x, &layer.attn_norm)?;
            let q = layer.wq.forward(&h, self.quant_rows)?.reshape((b, t, c.n_head, c.head_dim))?.transpose(1, 2)?;
            let k = layer.wk.forward(&h, self.quant_rows)?.reshape((b, t, c.n_kv_head, c.head_dim))?.transpose(1, 2)?;
            let v = layer.wv.forward(&h, self.quant_rows)?.reshape((b, t, c.n_kv_head, c.head_dim))?.transpose(1, 2)?;
            let q = self.rope(&q.contiguous()?, &cos_q, &sin_q)?; // scaled by 1/sqrt(head_dim)
            let k = self.rope(&k.contiguous()?, &cos, &sin)?;
            let v = v.contiguous()?;
            let (k, v) = match caches.as_deref_mut() {
                Some(cs) => cs[li].append(&k, &v)?,
                None => (k, v),
            };
            // grouped-query attention: the n_rep query heads of one KV head are read as
            // n_rep * t rows against its keys, straight from the cache (no copy of K/V per
            // query head): [b, kv heads, n_rep * t, d]; query head h reads KV head h / n_rep
            let qg = q.reshape((b, c.n_kv_head, n_rep * t, c.head_dim))?;
            let mut att = qg.matmul(&k.t()?)?;
            if let Some(m) = &mask {
                let kv_len = att.dim(3)?;
                att = att.reshape((b, c.n_kv_head, n_rep, t, kv_len))?.broadcast_add(m)?.reshape((
                    b,
                    c.n_kv_head,
                    n_rep * t,
                    kv_len,
                ))?;
            }
            let att = match self.ops {
                Ops::Fused => candle_nn::ops::softmax_last_dim(&att)?,
                Ops::Differentiable => crate::model::diffops::softmax_last_dim(&att)?,
            };
            let y = att.matmul(&v)?.reshape((b, c.n_head, t, c.head_dim))?;
            let y = y.transpose(1, 2)?.reshape((b, t, c.hidden))?;
            x = (x + layer.wo.forward(&y, self.quant_rows)?)?;
            crate::profile::mark(&self.device, "fwd_attention");
            let h = self.rms_norm(&x, &layer.ffn_norm)?;
            let gate = candle_nn::ops::silu(&layer.w_gate.forward(&h, self.quant_rows)?)?;
            let up = layer.w_up.forward(&h, self.quant_rows)?;
            x = (x + layer.w_down.forward(&(gate * up)?, self.quant_rows)?)?;
            crate::profile::mark(&self.device, "fwd_mlp");
        }
        if !final_norm {
            return Ok(x);
        }
        self.rms_norm(&x, &self.norm)
    }

    /// Vocabulary logits (f32) of input embeddings read as if they were final hidden states
    /// (the final norm, then the LM head; SmolLM2 ties the head to the token embeddings): the
    /// tokens an embedding points at.
    pub fn readout(&self, embeds: &Tensor) -> Result<Tensor> {
        self.logits(&self.rms_norm(&embeds.to_dtype(self.dtype)?, &self.norm)?)
    }

    /// Vocabulary logits (f32) for hidden states [.., hidden].
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden, self.quant_rows)?.to_dtype(DType::F32)?)
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

    /// Additive causal mask [t, pos + t]: query i sees keys up to pos + i. Built on the
    /// device: a host-built mask is t x (pos + t) floats to fill and copy per block (64 MiB at
    /// 2048 x 8192).
    fn causal_mask(&self, t: usize, pos: usize) -> Result<Tensor> {
        let rows = Tensor::arange(pos as u32, (pos + t) as u32, &self.device)?.reshape((t, 1))?;
        let cols = Tensor::arange(0u32, (pos + t) as u32, &self.device)?.reshape((1, pos + t))?;
        // -1e30 rather than -inf: 0 x -inf would be NaN; exp underflows to 0 all the same
        let future = cols.broadcast_gt(&rows)?.to_dtype(DType::F32)?.affine(-1e30, 0.0)?;
        Ok(future.to_dtype(self.dtype)?)
    }
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
