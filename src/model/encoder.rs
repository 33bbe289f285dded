//! The chunk and passage encoder: all-MiniLM-L6-v2 (BERT, Devlin et al. 2019; 6 layers, 384-d),
//! mean-pooled over the attention mask and L2-normalised (sentence-transformers' recipe). The
//! same vectors serve retrieval (one per passage) and REFRAG (one per k-token chunk, the paper's
//! `c_i`, projected later into the decoder).
//!
//! The forward is our own, over a name -> tensor map in the checkpoint's layout, so that
//! - trained weights can replace some of the tensors ([`Encoder::with_overrides`]): REFRAG trains
//!   the chunk encoder, and the shipped `encoder.safetensors` holds the layers it changed;
//! - training can put variables in place of tensors and differentiate through it
//!   ([`Ops::Differentiable`]: candle's fused layer-norm and softmax have no backward pass).

use crate::model::decoder::Ops;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

/// Longest input the encoder reads, in its own word pieces.
pub const MAX_TOKENS: usize = 256;
/// Texts per forward pass: at most this many characters (longest text x rows; texts go in
/// order of length, so 64 passages of ~1000 characters or ~900 chunk texts of 16 tokens) ...
const BATCH_CHARS: usize = 65_536;
/// ... and at most this many rows.
const BATCH_ROWS: usize = 1024;
/// File name of trained encoder tensors inside a weights folder.
pub const OVERRIDES_FILE: &str = "encoder.safetensors";

#[derive(Clone)]
pub struct Encoder {
    w: HashMap<String, Tensor>,
    tokenizer: Tokenizer,
    pub device: Device,
    pub dim: usize,
    pub layers: usize,
    heads: usize,
    eps: f64,
    pub ops: Ops,
    /// Identity recorded in indexes: model name and a digest of its weights' header, plus the
    /// digest of any trained tensors that replace some of them.
    pub id: String,
}

#[derive(serde::Deserialize)]
struct BertConfig {
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
}

fn default_eps() -> f64 {
    1e-12
}

impl Encoder {
    /// Load from a folder with config.json, tokenizer.json and model.safetensors.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read(&p).with_context(|| format!("{}: cannot read the encoder file", p.display()))
        };
        let cfg_path = dir.join("config.json");
        let config: BertConfig = serde_json::from_slice(&read("config.json")?)
            .with_context(|| format!("{}: not a BERT config", cfg_path.display()))?;
        if config.num_attention_heads == 0 || !config.hidden_size.is_multiple_of(config.num_attention_heads) {
            bail!("{}: hidden_size is not a multiple of num_attention_heads", cfg_path.display());
        }
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_bytes(read("tokenizer.json")?)
            .map_err(|e| anyhow!("{}: not a tokenizer.json: {e}", tok_path.display()))?;
        // The shipped tokenizer.json pads every input to 128; pad to the longest in the batch.
        tokenizer.with_padding(Some(PaddingParams { strategy: PaddingStrategy::BatchLongest, ..Default::default() }));
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: MAX_TOKENS, ..Default::default() }))
            .map_err(|e| anyhow!("tokenizer truncation: {e}"))?;
        let weights = dir.join("model.safetensors");
        let header = safetensors_header_digest(&weights)?;
        let raw = candle_core::safetensors::load(&weights, device)
            .with_context(|| format!("{}: not a safetensors file", weights.display()))?;
        let mut w = HashMap::new();
        for (name, t) in raw {
            // Some exports prefix every name with the architecture.
            let name = name.strip_prefix("bert.").unwrap_or(&name).to_string();
            if t.dtype().is_float() {
                w.insert(name, t.to_dtype(DType::F32)?);
            }
        }
        let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "encoder".into());
        let enc = Self {
            w,
            tokenizer,
            device: device.clone(),
            dim: config.hidden_size,
            layers: config.num_hidden_layers,
            heads: config.num_attention_heads,
            eps: config.layer_norm_eps,
            ops: Ops::Fused,
            id: format!("{name}@{header}"),
        };
        enc.check_tensors()
            .with_context(|| format!("{}: not a BERT checkpoint matching config.json", weights.display()))?;
        Ok(enc)
    }

    fn check_tensors(&self) -> Result<()> {
        let d = self.dim;
        let mut want = vec![
            ("embeddings.word_embeddings.weight".to_string(), None),
            ("embeddings.position_embeddings.weight".into(), None),
            ("embeddings.token_type_embeddings.weight".into(), None),
            ("embeddings.LayerNorm.weight".into(), Some(vec![d])),
            ("embeddings.LayerNorm.bias".into(), Some(vec![d])),
        ];
        for n in self.layer_tensor_names(..self.layers) {
            want.push((n, None));
        }
        for (n, shape) in want {
            let t = self.w.get(&n).ok_or_else(|| anyhow!("tensor {n} is missing"))?;
            if let Some(s) = shape {
                if t.dims() != s.as_slice() {
                    bail!("tensor {n} has shape {:?}, expected {s:?}", t.dims());
                }
            }
        }
        Ok(())
    }

    /// Names of the tensors of the given transformer layers.
    pub fn layer_tensor_names(&self, layers: impl std::ops::RangeBounds<usize>) -> Vec<String> {
        const PARTS: [&str; 16] = [
            "attention.self.query.weight", "attention.self.query.bias", "attention.self.key.weight",
            "attention.self.key.bias", "attention.self.value.weight", "attention.self.value.bias",
            "attention.output.dense.weight", "attention.output.dense.bias", "attention.output.LayerNorm.weight",
            "attention.output.LayerNorm.bias", "intermediate.dense.weight", "intermediate.dense.bias",
            "output.dense.weight", "output.dense.bias", "output.LayerNorm.weight", "output.LayerNorm.bias",
        ];
        (0..self.layers)
            .filter(|i| layers.contains(i))
            .flat_map(|i| PARTS.iter().map(move |p| format!("encoder.layer.{i}.{p}")))
            .collect()
    }

    /// A tensor of the checkpoint by name.
    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.w.get(name).ok_or_else(|| anyhow!("encoder tensor {name} is missing"))
    }

    /// This encoder with some tensors replaced (e.g. by training variables). Shapes must match.
    pub fn with_tensors(&self, replace: HashMap<String, Tensor>, id_suffix: &str, ops: Ops) -> Result<Self> {
        let mut e = self.clone();
        for (n, t) in replace {
            let old = self.tensor(&n)?;
            if old.dims() != t.dims() {
                bail!("tensor {n}: shape {:?} does not fit the encoder's {:?}", t.dims(), old.dims());
            }
            e.w.insert(n, t.to_device(&self.device)?);
        }
        e.ops = ops;
        if !id_suffix.is_empty() {
            e.id = format!("{}+{id_suffix}", self.id);
        }
        Ok(e)
    }

    /// This encoder with the trained tensors of a weights file (`encoder.safetensors`) in place.
    pub fn with_overrides(&self, path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let digest = crate::model::cache::short_digest(&bytes);
        let raw = candle_core::safetensors::load_buffer(&bytes, &self.device)
            .with_context(|| format!("{}: not a safetensors file", path.display()))?;
        let mut map = HashMap::new();
        for (n, t) in raw {
            map.insert(n, t.to_dtype(DType::F32)?);
        }
        self.with_tensors(map, &format!("trained@{digest}"), self.ops)
            .with_context(|| format!("{}: trained for another encoder", path.display()))
    }

    /// Encode texts into unit vectors: [texts.len(), dim] (f32). Texts are sorted by length
    /// and batched so that padding stays small; the output keeps the input order.
    pub fn encode(&self, texts: &[&str]) -> Result<Tensor> {
        if texts.is_empty() {
            return Ok(Tensor::zeros((0, self.dim), DType::F32, &self.device)?);
        }
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| texts[i].len());
        let mut batches: Vec<&[usize]> = Vec::new();
        let mut from = 0;
        for (at, &i) in order.iter().enumerate() {
            let rows = at + 1 - from;
            if rows > BATCH_ROWS || (rows > 1 && rows * texts[i].len().max(1) > BATCH_CHARS) {
                batches.push(&order[from..at]);
                from = at;
            }
        }
        batches.push(&order[from..]);
        let parts = batches
            .into_iter()
            .map(|batch| self.encode_batch(&batch.iter().map(|&i| texts[i]).collect::<Vec<_>>()))
            .collect::<Result<Vec<_>>>()?;
        // back to the input order with one gather (differentiable in one op, where a row-by-row
        // stack costs one op per text forward and backward)
        let mut at = vec![0u32; texts.len()];
        for (pos, &i) in order.iter().enumerate() {
            at[i] = pos as u32;
        }
        let at = Tensor::from_vec(at, texts.len(), &self.device)?;
        Ok(Tensor::cat(&parts, 0)?.index_select(&at, 0)?)
    }

    fn encode_batch(&self, texts: &[&str]) -> Result<Tensor> {
        let enc = self.tokenizer.encode_batch(texts.to_vec(), true).map_err(|e| anyhow!("encoder tokenizer: {e}"))?;
        let n = enc.len();
        let len = enc[0].get_ids().len();
        let ids: Vec<u32> = enc.iter().flat_map(|e| e.get_ids().to_vec()).collect();
        let mask: Vec<f32> = enc.iter().flat_map(|e| e.get_attention_mask().iter().map(|&m| m as f32)).collect();
        let ids = Tensor::from_vec(ids, (n, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
        let hidden = self.forward(&ids, &mask)?;
        let m = mask.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&m)?.sum(1)?;
        let counts = m.sum(1)?.clamp(1e-9, f64::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        Ok(mean.broadcast_div(&norm)?)
    }

    /// BERT: embeddings + layer-norm, then post-norm transformer layers. `mask` is [n, len] of
    /// 0/1; returns the last hidden states [n, len, dim].
    fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (n, len) = ids.dims2()?;
        let d = self.dim;
        let word = self.tensor("embeddings.word_embeddings.weight")?.embedding(&ids.flatten_all()?)?;
        let pos = self.tensor("embeddings.position_embeddings.weight")?.narrow(0, 0, len)?;
        let typ = self.tensor("embeddings.token_type_embeddings.weight")?.narrow(0, 0, 1)?;
        let x = word.reshape((n, len, d))?.broadcast_add(&pos)?.broadcast_add(&typ)?;
        let mut x = self.layer_norm(&x, "embeddings.LayerNorm")?;
        // Additive attention bias: 0 where the key is a token, very negative on padding.
        let bias = ((mask - 1.0)? * 1e9)?.reshape((n, 1, 1, len))?;
        let (h, hd) = (self.heads, d / self.heads);
        let scale = 1.0 / (hd as f64).sqrt();
        for i in 0..self.layers {
            let p = format!("encoder.layer.{i}.");
            let split =
                |t: Tensor| -> Result<Tensor> { Ok(t.reshape((n, len, h, hd))?.transpose(1, 2)?.contiguous()?) };
            let q = split(self.linear(&x, &format!("{p}attention.self.query"))?)?;
            let k = split(self.linear(&x, &format!("{p}attention.self.key"))?)?;
            let v = split(self.linear(&x, &format!("{p}attention.self.value"))?)?;
            let att = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&bias)?;
            let att = match self.ops {
                Ops::Fused => candle_nn::ops::softmax_last_dim(&att)?,
                Ops::Differentiable => candle_nn::ops::softmax(&att, D::Minus1)?,
            };
            let y = att.matmul(&v)?.transpose(1, 2)?.reshape((n, len, d))?;
            let a = self.linear(&y, &format!("{p}attention.output.dense"))?;
            x = self.layer_norm(&(a + &x)?, &format!("{p}attention.output.LayerNorm"))?;
            let f = self.linear(&x, &format!("{p}intermediate.dense"))?.gelu_erf()?;
            let f = self.linear(&f, &format!("{p}output.dense"))?;
            x = self.layer_norm(&(f + &x)?, &format!("{p}output.LayerNorm"))?;
        }
        Ok(x)
    }

    fn linear(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        let w = self.tensor(&format!("{name}.weight"))?;
        let b = self.tensor(&format!("{name}.bias"))?;
        let (n, len, din) = x.dims3()?;
        let y = x.reshape((n * len, din))?.matmul(&w.t()?)?.broadcast_add(b)?;
        Ok(y.reshape((n, len, w.dim(0)?))?)
    }

    fn layer_norm(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        let w = self.tensor(&format!("{name}.weight"))?;
        let b = self.tensor(&format!("{name}.bias"))?;
        let eps = self.eps as f32;
        Ok(match self.ops {
            Ops::Fused => candle_nn::ops::layer_norm(&x.contiguous()?, w, b, eps)?,
            Ops::Differentiable => candle_nn::ops::layer_norm_slow(x, w, b, eps)?,
        })
    }
}

/// Digest of a safetensors header (names, shapes, offsets): cheap and enough to tell two
/// encoders apart without hashing 90 MB on every start.
fn safetensors_header_digest(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open the encoder weights", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        anyhow::bail!("{}: not a safetensors file (header of {n} bytes)", path.display());
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).with_context(|| format!("{}: truncated safetensors header", path.display()))?;
    Ok(crate::model::cache::short_digest(&header))
}
