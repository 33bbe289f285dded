//! Selective expansion: which compressed chunks go back to tokens (REFRAG paper, section 2.1
//! and appendix A.1).
//!
//! Selection only: the learned policy's network is `crate::model::policy`, its training
//! `crate::train::policy`. Heuristics behind the same interface: random, question similarity, and the decoder's own
//! per-chunk perplexity, highest first (`ppl-desc`) or lowest first (`ppl-asc`).

use crate::model::compressor::{chunks, minilm_vectors};
use crate::model::decoder::Decoder;
use crate::model::encoder::Encoder;
use crate::model::policy::{span_scores, top_mask};
use crate::model::policy::{PolicyNet, POLICY_FILE};
use crate::rng::Rng;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};

/// The error for `--policy rl` without a usable policy (`stale`: why the folder's one is not).
pub fn missing(stale: Option<&str>) -> anyhow::Error {
    match stale {
        Some(why) => anyhow::anyhow!("--policy rl: {why}"),
        None => anyhow::anyhow!(
            "--policy rl needs a trained policy ({POLICY_FILE} in the weights folder; `refrag train policy`)"
        ),
    }
}

/// When a reading `wants` the trained policy, the weights must carry a usable one.
pub fn require(wants: bool, trained: Option<&crate::model::weights::Trained>) -> Result<()> {
    match trained {
        Some(t) if t.policy.is_some() => Ok(()),
        _ if !wants => Ok(()),
        t => Err(missing(t.and_then(|t| t.stale_policy.as_deref()))),
    }
}

/// How chunks are chosen for expansion: the policy, the share expanded, the trained network
/// (for `rl`) and a seed (for `random`).
#[derive(Clone, Copy)]
pub struct Selection<'a> {
    pub policy: crate::options::Policy,
    pub expand: f64,
    /// Instead of the share `expand`: as many chunks as keep the passages within this many
    /// decoder positions (a chunk vector takes one; an expanded chunk up to k).
    pub budget: Option<usize>,
    pub net: Option<&'a PolicyNet>,
    pub seed: u64,
}

impl Selection<'_> {
    /// Whether any chunk can go back to tokens.
    pub fn expands(&self) -> bool {
        self.policy != crate::options::Policy::None && (self.expand > 0.0 || self.budget.is_some())
    }

    /// How many of `n` chunks of `k` tokens go back to tokens: the share `expand`, or with a
    /// budget as many as fit (each adds at most k - 1 positions to the n chunk vectors).
    pub fn count(&self, n: usize, k: usize) -> usize {
        match self.budget {
            Some(b) => (b.saturating_sub(n) / k.saturating_sub(1).max(1)).min(n),
            None => ((self.expand.clamp(0.0, 1.0) * n as f64).round() as usize).min(n),
        }
    }

    /// Which chunks (in order over all passages; k-token chunks of each passage's tokens) go
    /// back to tokens. `vectors`: the chunks' raw encoder vectors [n, dim]; `qvec`: the
    /// question's retrieval vector, made by `retrieval` (MiniLM): the similarity policies
    /// compare it with MiniLM vectors of the chunks' texts: `vectors` when they are MiniLM's,
    /// else `sims` when given (an index stores them), else made here.
    #[allow(clippy::too_many_arguments)]
    pub fn choose(
        &self,
        decoder: &Decoder,
        k: usize,
        passages: &[&[u32]],
        vectors: Option<&Tensor>,
        sims: Option<&Tensor>,
        qvec: &[f32],
        retrieval: &Encoder,
    ) -> Result<Vec<bool>> {
        use crate::options::Policy;
        let n: usize = passages.iter().map(|p| p.len().div_ceil(k)).sum();
        let want = self.count(n, k);
        if want == 0 || self.policy == Policy::None {
            return Ok(vec![false; n]);
        }
        let sizes: Vec<usize> = passages.iter().map(|p| p.len().div_ceil(k)).collect();
        let scores: Vec<f64> = match self.policy {
            Policy::None => unreachable!(),
            Policy::Random => {
                let mut rng = Rng(self.seed ^ 0x9e37_79b9_7f4a_7c15);
                (0..n).map(|_| rng.unit()).collect()
            }
            Policy::Sim | Policy::SimSpan => {
                let Some(c) = vectors else { return Ok(vec![false; n]) };
                let minilm;
                let c = if c.dim(1)? == qvec.len() {
                    c
                } else if let Some(s) = sims {
                    s
                } else {
                    let all: Vec<&[u32]> = passages.iter().flat_map(|p| chunks(p, k)).collect();
                    minilm = minilm_vectors(retrieval, &decoder.tokenizer, &all)?;
                    &minilm
                };
                let q = Tensor::new(qvec, c.device())?.to_dtype(c.dtype())?.unsqueeze(1)?;
                let sim: Vec<f64> = c.matmul(&q)?.squeeze(1)?.to_dtype(DType::F64)?.to_vec1()?;
                if self.policy == Policy::SimSpan {
                    span_scores(&sim, &sizes)
                } else {
                    sim
                }
            }
            Policy::PplDesc | Policy::PplAsc => {
                let sign = if self.policy == Policy::PplDesc { 1.0 } else { -1.0 };
                let mut v = Vec::with_capacity(n);
                for t in passages {
                    if t.len() < 2 {
                        v.extend(std::iter::repeat_n(0.0, t.len().div_ceil(k)));
                        continue;
                    }
                    v.extend(chunk_nll(decoder, t, k)?.into_iter().map(|x| sign * x));
                }
                v
            }
            Policy::Rl => {
                let Some(net) = self.net else {
                    return Err(missing(None));
                };
                let Some(c) = vectors else { return Ok(vec![false; n]) };
                let q = Tensor::new(qvec, &decoder.device)?;
                return net.choose(c, Some(&q), &sizes, want);
            }
        };
        Ok(top_mask(&scores, want))
    }
}

/// Each passage as runs of projected chunks (`projected` [n, hidden], rows in chunk order) with
/// the expanded chunks as tokens.
pub fn mixed_segments(
    passages: &[&[u32]],
    k: usize,
    expand: &[bool],
    projected: Option<&Tensor>,
) -> Result<Vec<Vec<crate::read::prompt::Segment>>> {
    use crate::read::prompt::Segment;
    let mut idx = 0;
    let mut out = Vec::new();
    for tokens in passages {
        let mut segs = Vec::new();
        let mut run_start: Option<usize> = None;
        for c in crate::model::compressor::chunks(tokens, k) {
            if expand.get(idx).copied().unwrap_or(false) {
                if let (Some(s), Some(p)) = (run_start.take(), projected) {
                    segs.push(Segment::Embeds(p.narrow(0, s, idx - s)?));
                }
                segs.push(Segment::Tokens(c.to_vec()));
            } else if run_start.is_none() {
                run_start = Some(idx);
            }
            idx += 1;
        }
        if let (Some(s), Some(p)) = (run_start, projected) {
            segs.push(Segment::Embeds(p.narrow(0, s, idx - s)?));
        }
        out.push(segs);
    }
    if idx != expand.len() {
        bail!("{} chunk vectors for {idx} chunks (an index built with another k?)", expand.len());
    }
    Ok(out)
}

/// The decoder input for a context whose chunks are each either a projected vector or, when
/// expanded, its k tokens: [positions, hidden].
pub fn mixed_prefix(dec: &Decoder, ctx: &[u32], k: usize, projected: &Tensor, expanded: &[bool]) -> Result<Tensor> {
    let mut parts = Vec::new();
    for (i, c) in ctx.chunks(k).enumerate() {
        if expanded[i] {
            parts.push(dec.embed_tokens(c)?);
        } else {
            parts.push(projected.narrow(0, i, 1)?.to_dtype(dec.dtype)?);
        }
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Mean NLL of each chunk's own tokens when the decoder reads the whole context as tokens
/// (the perplexity heuristics' score; it costs a full-context pass).
pub fn chunk_nll(dec: &Decoder, ctx: &[u32], k: usize) -> Result<Vec<f64>> {
    let x = dec.embed_tokens(ctx)?.unsqueeze(0)?;
    let h = dec.forward_train(&x)?.squeeze(0)?;
    let logits = dec.logits(&h.narrow(0, 0, ctx.len() - 1)?)?;
    let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let tgt = Tensor::new(&ctx[1..], &dec.device)?.unsqueeze(1)?;
    let nll: Vec<f32> = lsm.gather(&tgt, 1)?.squeeze(1)?.neg()?.to_vec1()?;
    // token j (j >= 1) is predicted at row j - 1; chunk 0's first token has no prediction
    Ok(ctx
        .chunks(k)
        .enumerate()
        .map(|(i, c)| {
            let from = (i * k).max(1);
            let to = i * k + c.len();
            let v = &nll[from - 1..to - 1];
            v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A share rounds; a budget takes as many chunks as fit at k - 1 extra positions each,
    /// none when the chunk vectors alone overflow it, at most all of them.
    #[test]
    fn a_budget_expands_as_many_chunks_as_fit() {
        let sel =
            |expand, budget| Selection { policy: crate::options::Policy::Sim, expand, budget, net: None, seed: 0 };
        assert_eq!(sel(0.25, None).count(30, 16), 8);
        assert_eq!(sel(0.0, Some(30 + 4 * 15)).count(30, 16), 4);
        assert_eq!(sel(0.0, Some(30 + 4 * 15 + 14)).count(30, 16), 4);
        assert_eq!(sel(0.0, Some(12)).count(30, 16), 0);
        assert_eq!(sel(0.0, Some(100_000)).count(30, 16), 30);
        assert!(sel(0.0, Some(0)).expands() && !sel(0.0, None).expands());
        assert!(!Selection { policy: crate::options::Policy::None, ..sel(0.5, None) }.expands());
    }

    /// sim-span expands the best chunk with its neighbours in its own passage before any other
    /// window, and a window never reaches across a passage boundary.
    #[test]
    fn sim_span_expands_windows_around_the_closest_chunks() {
        // two passages of 4 and 3 chunks; the best chunk is the first passage's third
        let sim = [0.1, 0.2, 0.9, 0.3, 0.5, 0.15, 0.05];
        let s = span_scores(&sim, &[4, 3]);
        let picked = |want| (0..7).filter(|&i| top_mask(&s, want)[i]).collect::<Vec<_>>();
        assert_eq!(picked(1), vec![2]);
        assert_eq!(picked(3), vec![1, 2, 3]);
        // then the second passage's window, not the first passage's last chunk's neighbour
        // across the boundary (chunk 4 scores its own 0.5, not chunk 3's neighbour 0.9)
        assert_eq!(picked(5), vec![1, 2, 3, 4, 5]);
        assert_eq!(picked(6), vec![0, 1, 2, 3, 4, 5]);
        // plain question similarity picks scattered chunks
        assert_eq!((0..7).filter(|&i| top_mask(&sim, 3)[i]).collect::<Vec<_>>(), vec![2, 3, 4]);
    }
}
