//! The chunk and passage encoder: all-MiniLM-L6-v2 (BERT, 6 layers, 384-d) via
//! candle-transformers, mean-pooled over the attention mask and L2-normalised
//! (sentence-transformers' recipe). The same vectors serve retrieval (one per passage) and
//! REFRAG (one per k-token chunk, the paper's `c_i`, projected later into the decoder).

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use std::path::Path;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

/// Longest input the encoder reads, in its own word pieces.
pub const MAX_TOKENS: usize = 256;
/// Texts per forward pass.
const BATCH: usize = 64;

pub struct Encoder {
    model: BertModel,
    tokenizer: Tokenizer,
    pub device: Device,
    pub dim: usize,
    /// Identity recorded in indexes: model name and a digest of its weights' header.
    pub id: String,
}

impl Encoder {
    /// Load from a folder with config.json, tokenizer.json and model.safetensors.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read(&p).with_context(|| format!("{}: cannot read the encoder file", p.display()))
        };
        let cfg_path = dir.join("config.json");
        let config: Config = serde_json::from_slice(&read("config.json")?)
            .with_context(|| format!("{}: not a BERT config", cfg_path.display()))?;
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_bytes(read("tokenizer.json")?)
            .map_err(|e| anyhow!("{}: not a tokenizer.json: {e}", tok_path.display()))?;
        // The shipped tokenizer.json pads every input to 128; pad to the longest in the batch.
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..Default::default()
        }));
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: MAX_TOKENS, ..Default::default() }))
            .map_err(|e| anyhow!("tokenizer truncation: {e}"))?;
        let weights = dir.join("model.safetensors");
        let header = safetensors_header_digest(&weights)?;
        // SAFETY: the file is memory-mapped read-only and not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
            .with_context(|| format!("{}: not a safetensors file", weights.display()))?;
        let model = BertModel::load(vb, &config)
            .with_context(|| format!("{}: not a BERT checkpoint matching config.json", weights.display()))?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "encoder".into());
        Ok(Self {
            model,
            tokenizer,
            device: device.clone(),
            dim: config_hidden(&read("config.json")?)?,
            id: format!("{name}@{header}"),
        })
    }

    /// Encode texts into unit vectors: [texts.len(), dim] (f32). Texts are sorted by length
    /// and batched so that padding stays small; the output keeps the input order.
    pub fn encode(&self, texts: &[&str]) -> Result<Tensor> {
        if texts.is_empty() {
            return Ok(Tensor::zeros((0, self.dim), DType::F32, &self.device)?);
        }
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| texts[i].len());
        let mut out: Vec<Option<Tensor>> = vec![None; texts.len()];
        for batch in order.chunks(BATCH) {
            let items: Vec<&str> = batch.iter().map(|&i| texts[i]).collect();
            let v = self.encode_batch(&items)?;
            for (row, &i) in batch.iter().enumerate() {
                out[i] = Some(v.get(row)?);
            }
        }
        let rows: Vec<Tensor> = out.into_iter().flatten().collect();
        Ok(Tensor::stack(&rows, 0)?)
    }

    fn encode_batch(&self, texts: &[&str]) -> Result<Tensor> {
        let enc = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| anyhow!("encoder tokenizer: {e}"))?;
        let n = enc.len();
        let len = enc[0].get_ids().len();
        let ids: Vec<u32> = enc.iter().flat_map(|e| e.get_ids().to_vec()).collect();
        let mask: Vec<u32> = enc.iter().flat_map(|e| e.get_attention_mask().to_vec()).collect();
        let ids = Tensor::from_vec(ids, (n, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
        let types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?;
        let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&m)?.sum(1)?;
        let counts = m.sum(1)?.clamp(1e-9, f64::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        Ok(mean.broadcast_div(&norm)?)
    }
}

fn config_hidden(bytes: &[u8]) -> Result<usize> {
    let v: serde_json::Value = serde_json::from_slice(bytes)?;
    v["hidden_size"]
        .as_u64()
        .map(|h| h as usize)
        .context("config.json has no hidden_size")
}

/// Digest of a safetensors header (names, shapes, offsets): cheap and enough to tell two
/// encoders apart without hashing 90 MB on every start.
fn safetensors_header_digest(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path)
        .with_context(|| format!("{}: cannot open the encoder weights", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        anyhow::bail!("{}: not a safetensors file (header of {n} bytes)", path.display());
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .with_context(|| format!("{}: truncated safetensors header", path.display()))?;
    Ok(crate::models::hex(&Sha256::digest(&header)[..8]))
}
