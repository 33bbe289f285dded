//! Training data: pools of decoder tokens drawn from text files, the curriculum over the number
//! of chunks, and batches of windows split into passes that fit the device.

use super::config::{Stage, TrainConfig};
use crate::model::compressor::Compressor;
use crate::model::decoder::Decoder;
use crate::rng::Rng;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::Tensor;
use std::path::PathBuf;

/// Curriculum stages: 1, 2, 4, … up to `max_chunks`.
pub fn stages(max_chunks: usize) -> Vec<usize> {
    let mut v = vec![1];
    while v.last().unwrap() * 2 <= max_chunks {
        let n = v.last().unwrap() * 2;
        v.push(n);
    }
    v
}

/// Chunks per sample at training progress `f` in [0, 1]: stages up to the current one, each
/// earlier stage half as likely as the next (a geometric mixture that drifts to long inputs).
pub fn curriculum_chunks(max_chunks: usize, f: f64, rng: &mut Rng) -> usize {
    let st = stages(max_chunks);
    let cur = ((f * st.len() as f64) as usize).min(st.len() - 1);
    let weights: Vec<f64> = (0..=cur).map(|j| 0.5f64.powi((cur - j) as i32)).collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.unit() * total;
    for (j, w) in weights.iter().enumerate() {
        if u < *w {
            return st[j];
        }
        u -= w;
    }
    st[cur]
}

/// Token ids of the training text, one stream per document.
pub struct TextPool {
    docs: Vec<Vec<u32>>,
}

impl TextPool {
    /// Text files (one document each; a Project Gutenberg book's header and footer dropped) or
    /// JSONL files of `{"text": ...}` records (one document a line), either gzip'd (`.gz`).
    /// Documents are tokenized in parallel; those under 64 tokens are left out.
    pub fn load(files: &[PathBuf], decoder: &Decoder) -> Result<Self> {
        let mut docs = Vec::new();
        for f in files {
            let text = crate::index::corpus::read_text_gz(f)?;
            let name = f.to_string_lossy();
            let texts: Vec<String> = if name.ends_with(".jsonl") || name.ends_with(".jsonl.gz") {
                jsonl_texts(f, &text)?
            } else {
                vec![strip_gutenberg(&text).to_string()]
            };
            let enc =
                decoder.tokenizer.encode_batch(texts, false).map_err(|e| anyhow!("{}: tokenizer: {e}", f.display()))?;
            docs.extend(enc.into_iter().map(|e| e.get_ids().to_vec()).filter(|ids| ids.len() >= 64));
        }
        if docs.is_empty() {
            bail!("no training text (give --text FILE… with at least 64 tokens each)");
        }
        Ok(Self { docs })
    }

    /// A pool of these token streams (tests).
    #[cfg(test)]
    pub(super) fn from_docs(docs: Vec<Vec<u32>>) -> Self {
        Self { docs }
    }

    /// No text (stages that read tasks instead).
    pub fn empty() -> Self {
        Self { docs: Vec::new() }
    }

    pub fn tokens(&self) -> usize {
        self.docs.iter().map(Vec::len).sum()
    }

    /// A random window of `n` tokens (from a document long enough, else the longest).
    pub fn window(&self, n: usize, rng: &mut Rng) -> &[u32] {
        for _ in 0..16 {
            let d = &self.docs[rng.below(self.docs.len())];
            if d.len() >= n {
                let s = rng.below(d.len() - n + 1);
                return &d[s..s + n];
            }
        }
        let d = self.docs.iter().max_by_key(|d| d.len()).unwrap();
        &d[..n.min(d.len())]
    }
}

/// The `text` of each record of a JSONL file (blank lines skipped); a line that is not such a
/// record is an error naming it.
fn jsonl_texts(path: &std::path::Path, text: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = || anyhow!("{}:{}: not a JSON record with a \"text\" string", path.display(), i + 1);
        let v: serde_json::Value = serde_json::from_str(line).map_err(|_| bad())?;
        let Some(t) = v.get("text").and_then(|t| t.as_str()) else { return Err(bad()) };
        out.push(t.to_string());
    }
    Ok(out)
}

/// The body of a Project Gutenberg file (between its START and END markers), else all of it.
pub fn strip_gutenberg(text: &str) -> &str {
    let start = text.find("*** START OF").and_then(|i| text[i..].find('\n').map(|j| i + j + 1)).unwrap_or(0);
    let end = text[start..].find("*** END OF").map(|i| start + i).unwrap_or(text.len());
    &text[start..end]
}

/// One batch's parts: the context tokens (compressed chunk by chunk, or read as tokens where
/// kept) and target tokens. Every row has the same layout (one keep pattern per batch).
pub(super) struct Batch {
    /// per chunk slot: true when the slot stays uncompressed in every row (mixed input)
    pub(super) keep: Vec<bool>,
    /// per row: the s context tokens (read for kept slots)
    pub(super) contexts: Vec<Vec<u32>>,
    pub(super) targets: Vec<Vec<u32>>,
    pub(super) l: usize,
    /// a reconstruction batch of a run with `recon_marker`: the marker token is read after the
    /// chunks, before the targets
    pub(super) marker: bool,
}

impl Batch {
    /// Rows `r` of this batch (same chunk-slot pattern).
    pub(super) fn rows(&self, r: std::ops::Range<usize>) -> Batch {
        Batch {
            keep: self.keep.clone(),
            contexts: self.contexts[r.clone()].to_vec(),
            targets: self.targets[r].to_vec(),
            l: self.l,
            marker: self.marker,
        }
    }

    /// The chunk vectors of every row's context, [B * L, dim], row after row.
    pub(super) fn vectors(&self, dec: &Decoder, comp: &Compressor) -> Result<Tensor> {
        let rows: Vec<&[u32]> = self.contexts.iter().map(Vec::as_slice).collect();
        comp.vectors(dec, &rows)?.context("a batch without chunks")
    }

    /// Row ranges of at most `max_tokens` context and target tokens each ([`passes`]).
    pub(super) fn passes(&self, max_tokens: usize) -> Vec<std::ops::Range<usize>> {
        let sizes: Vec<usize> = self.contexts.iter().zip(&self.targets).map(|(c, t)| c.len() + t.len()).collect();
        passes(&sizes, max_tokens)
    }
}

/// Consecutive ranges of items whose sizes (tokens) add up to at most `max_tokens`, each with
/// at least one item; 0 = all items in one range. The forward/backward passes of one step.
pub fn passes(sizes: &[usize], max_tokens: usize) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    let mut used = 0;
    for (i, &s) in sizes.iter().enumerate() {
        match out.last_mut() {
            Some(r) if max_tokens == 0 || used + s <= max_tokens => {
                r.end = i + 1;
                used += s;
            }
            _ => {
                out.push(i..i + 1);
                used = s;
            }
        }
    }
    out
}

/// The auxiliary reconstruction batch of a cpt or sft step (`--recon-weight`): 1 to 16 chunks
/// of the training text, on the curriculum at `f` of the run.
pub(super) fn recon_batch(pool: &TextPool, cfg: &TrainConfig, f: f64, rng: &mut Rng) -> Result<Batch> {
    let rc = TrainConfig { stage: Stage::Reconstruct, mixed: 0.0, ..cfg.clone() };
    let l = curriculum_chunks(cfg.max_chunks.min(16), f, rng);
    make_batch(pool, &rc, l, rng)
}

pub(super) fn make_batch(pool: &TextPool, cfg: &TrainConfig, l: usize, rng: &mut Rng) -> Result<Batch> {
    let s = l * cfg.k;
    let o = match cfg.stage {
        Stage::Reconstruct => s,
        Stage::Cpt | Stage::Policy | Stage::Sft => cfg.predict_tokens,
    };
    let per = (s + o).max(1);
    let bsz = (cfg.tokens_per_step / per).max(1);
    // Which chunk slots stay as tokens: one pattern per batch, so all rows have one length.
    let keep: Vec<bool> =
        (0..l).map(|_| cfg.stage == Stage::Cpt && cfg.mixed > 0.0 && rng.unit() < cfg.mixed).collect();
    let marker = cfg.stage == Stage::Reconstruct && cfg.recon_marker;
    let mut b = Batch { keep, contexts: vec![], targets: vec![], l, marker };
    for _ in 0..bsz {
        let (ctx, tgt): (Vec<u32>, Vec<u32>) = match cfg.stage {
            Stage::Reconstruct => {
                let w = pool.window(s, rng).to_vec();
                (w.clone(), w)
            }
            Stage::Cpt | Stage::Policy | Stage::Sft => {
                let w = pool.window(s + o, rng);
                (w[..s].to_vec(), w[s..].to_vec())
            }
        };
        if ctx.len() < s {
            bail!("training text too short for {l} chunks of {} tokens", cfg.k);
        }
        b.contexts.push(ctx);
        b.targets.push(tgt);
    }
    Ok(b)
}
