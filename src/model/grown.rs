//! A chunk encoder grown from the decoder: its token embeddings and first N layers (a copy
//! sharing the decoder's tensors, with LoRA adapters of its own) read each k-token chunk in the
//! decoder's own cased tokens, and the chunk's states are mean-pooled into one vector.
//!
//! Why: MiniLM is uncased and trained for topic similarity, so its chunk vectors lose names and
//! numbers. Compressors built from the reader itself keep them (OSCAR, COCOM, PISCO,
//! ARC-Encoder; see docs/research/2026-12-02-grown-encoder.md). Each chunk is read on its own,
//! behind the `<|endoftext|>` start position the decoder uses as its attention sink (the
//! start's state is not pooled), so a chunk's vector depends on its tokens alone, as with
//! MiniLM: expansion, the policy and the index layout keep their meaning.
//!
//! The pooled vector is scaled to unit root-mean-square before the projector: the residual
//! stream's scale grows with depth, the projector's input should not.

use crate::model::decoder::{Decoder, TEXT_START};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use std::collections::HashMap;
use std::path::Path;

/// File name of the grown chunk encoder's adapters inside a weights folder.
pub const FILE: &str = "chunk_encoder.safetensors";

/// Chunks encoded per forward pass (bounds memory; a chunk is k + 1 positions).
const BATCH_CHUNKS: usize = 256;

/// The decoder's first `layers` layers as a chunk encoder.
#[derive(Clone)]
pub struct GrownEncoder {
    body: Decoder,
    /// How many of the decoder's layers it reads with.
    pub layers: usize,
    /// Identity recorded in indexes and policy cards: the base decoder and depth, plus the
    /// digest of the trained adapters.
    pub id: String,
}

impl GrownEncoder {
    /// The untrained encoder: `base`'s first `layers` layers as they are.
    pub fn new(base: &Decoder, layers: usize) -> Result<Self> {
        let mut body = base.first_layers(layers)?;
        // dense arithmetic at every batch size: a chunk's vector must not depend on its batch
        body.quant_rows = 0;
        let id = format!("decoder-first{layers}@{}/{}", base.tokenizer_id, base.cfg.hidden);
        Ok(Self { body, layers, id })
    }

    /// With adapters attached and kept apart (training: gradients reach them). `adapters`
    /// holds `blk.{i}.{matrix}.lora_a/b` for layers below `layers`.
    pub fn trainable(base: &Decoder, layers: usize, adapters: &HashMap<String, Tensor>) -> Result<Self> {
        let mut e = Self::new(base, layers)?;
        e.body.attach_lora(adapters)?;
        Ok(e)
    }

    /// With the adapters of a weights file folded in (reading).
    pub fn load(base: &Decoder, layers: usize, path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let digest = crate::model::cache::short_digest(&bytes);
        let t = candle_core::safetensors::load_buffer(&bytes, &base.device)
            .with_context(|| format!("{}: not a safetensors file", path.display()))?;
        let mut e = Self::new(base, layers)?;
        e.body
            .merge_lora_tensors(&t)
            .with_context(|| format!("{}: not this chunk encoder's adapters", path.display()))?;
        e.id = format!("{}+trained@{digest}", e.id);
        Ok(e)
    }

    /// The vector size (the decoder's hidden size).
    pub fn dim(&self) -> usize {
        self.body.cfg.hidden
    }

    pub fn device(&self) -> &Device {
        &self.body.device
    }

    /// One vector per chunk of decoder tokens: [n, hidden] (f32), in the input order.
    pub fn encode(&self, chunks: &[&[u32]]) -> Result<Tensor> {
        if chunks.is_empty() {
            return Ok(Tensor::zeros((0, self.dim()), DType::F32, self.device())?);
        }
        let parts = chunks.chunks(BATCH_CHUNKS).map(|b| self.encode_batch(b)).collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    fn encode_batch(&self, chunks: &[&[u32]]) -> Result<Tensor> {
        let n = chunks.len();
        let width = chunks.iter().map(|c| c.len()).max().unwrap_or(0);
        if width == 0 {
            bail!("an empty chunk");
        }
        let t = width + 1;
        // [start, chunk tokens, padding]: causal attention, so padding after a chunk changes
        // nothing before it, and it is not pooled
        let mut ids = Vec::with_capacity(n * t);
        let mut mask = Vec::with_capacity(n * t);
        for c in chunks {
            ids.push(TEXT_START);
            mask.push(0f32);
            ids.extend_from_slice(c);
            mask.extend(std::iter::repeat_n(1.0 / c.len().max(1) as f32, c.len()));
            ids.extend(std::iter::repeat_n(TEXT_START, width - c.len()));
            mask.extend(std::iter::repeat_n(0f32, width - c.len()));
        }
        let hid = self.dim();
        let x = self.body.embed_tokens(&ids)?.reshape((n, t, hid))?;
        let h = self.body.states(&x)?.to_dtype(DType::F32)?;
        let w = Tensor::from_vec(mask, (n, t, 1), self.device())?;
        let pooled = h.broadcast_mul(&w)?.sum(1)?;
        let rms = (pooled.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?;
        Ok(pooled.broadcast_div(&rms)?)
    }
}
