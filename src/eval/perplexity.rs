//! `refrag eval perplexity`: how well the decoder predicts the next `o` tokens of a text given
//! its previous `s` tokens, read four ways (paper Table 1):
//!
//! - `none`: no context (only the `<|endoftext|>` position every reading starts from);
//! - `full`: the s context tokens;
//! - `last-L`: only the last L = s/k context tokens, i.e. as many positions as REFRAG uses;
//! - `refrag-k`: the s tokens compressed into s/k projected chunk vectors.
//!
//! The same o target tokens are scored in every reading. "Gap closed" is the share of the
//! no-context -> full-context drop in log-perplexity that a reading recovers.

use crate::model::compressor::Compressor;
use crate::model::decoder::Decoder;
use crate::model::encoder::Encoder;
use crate::read::score::{accuracy_after, nll_after};
use anyhow::{bail, Result};
use candle_core::Tensor;

#[derive(Debug, Clone)]
pub struct PplOptions {
    pub s: usize,
    pub o: usize,
    pub k: usize,
    /// Windows scored per text (spread evenly over it).
    pub windows: usize,
    /// REFRAG readings with this fraction of chunks expanded back to tokens, one per policy.
    pub expand: f64,
    pub policies: Vec<crate::options::Policy>,
    /// Tokens of the target's start encoded as the query of a conditioned RL policy (a
    /// stand-in for a question; the decoder never sees them before it scores them).
    pub query_tokens: usize,
    /// The weights repeat chunk vectors after the reconstruction marker (their card's
    /// `recon_marker`): the reconstruction rows read it.
    pub recon_marker: bool,
}

/// Mean negative log-likelihood per target token, per reading.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PplScores {
    pub text: String,
    pub windows: usize,
    pub target_tokens: usize,
    pub nll_none: f64,
    pub nll_full: f64,
    pub nll_last: f64,
    /// None when no trained weights for this k were given.
    pub nll_refrag: Option<f64>,
    /// The adapted decoder (trained adapters folded in) with no context: how much of REFRAG's
    /// gain is the adapters' own fit to the text rather than read from the chunk vectors.
    pub nll_none_adapted: Option<f64>,
    /// The adapted decoder reading the full context tokens (the fine-tuned full-context baseline).
    pub nll_full_adapted: Option<f64>,
    /// REFRAG reading the chunk vectors of another window of the same text (the next one): what
    /// chunk vectors give without this context's content. REFRAG minus this is what the
    /// vectors carry of the context itself.
    pub nll_refrag_other: Option<f64>,
    /// REFRAG with `expand` of the chunks expanded, per policy name.
    pub nll_expanded: std::collections::BTreeMap<String, f64>,
    /// Reconstruction: greedy (teacher-forced) token accuracy of the window's first L chunks'
    /// own tokens read back from their L chunk vectors (`chunks_L`), and from the first L
    /// vectors of another window (`chunks_L_other`: what the decoder guesses from the text
    /// so far alone). The difference is the content the vectors carry.
    pub recon_accuracy: std::collections::BTreeMap<String, f64>,
}

impl PplScores {
    pub fn ppl(nll: f64) -> f64 {
        nll.exp()
    }
    /// Share of the none -> full gap that a reading closes.
    pub fn gap_closed(&self, nll: f64) -> f64 {
        let gap = self.nll_none - self.nll_full;
        if gap.abs() < 1e-12 {
            return f64::NAN;
        }
        (self.nll_none - nll) / gap
    }
    /// Share of the adapted decoder's own none -> full gap that REFRAG closes (adapters'
    /// fit to the text counted on both ends).
    pub fn gap_closed_adapted(&self) -> Option<f64> {
        let (n, f, r) = (self.nll_none_adapted?, self.nll_full_adapted?, self.nll_refrag?);
        ((n - f).abs() > 1e-12).then(|| (n - r) / (n - f))
    }
    /// Token-weighted mean of several texts' scores.
    pub fn pooled(all: &[PplScores]) -> PplScores {
        let n: usize = all.iter().map(|s| s.target_tokens).sum();
        let w = |f: &dyn Fn(&PplScores) -> f64| {
            all.iter().map(|s| f(s) * s.target_tokens as f64).sum::<f64>() / n.max(1) as f64
        };
        PplScores {
            text: "all".into(),
            windows: all.iter().map(|s| s.windows).sum(),
            target_tokens: n,
            nll_none: w(&|s| s.nll_none),
            nll_full: w(&|s| s.nll_full),
            nll_last: w(&|s| s.nll_last),
            nll_refrag: all.iter().all(|s| s.nll_refrag.is_some()).then(|| w(&|s| s.nll_refrag.unwrap_or(0.0))),
            nll_none_adapted: all
                .iter()
                .all(|s| s.nll_none_adapted.is_some())
                .then(|| w(&|s| s.nll_none_adapted.unwrap_or(0.0))),
            nll_full_adapted: all
                .iter()
                .all(|s| s.nll_full_adapted.is_some())
                .then(|| w(&|s| s.nll_full_adapted.unwrap_or(0.0))),
            nll_refrag_other: all
                .iter()
                .all(|s| s.nll_refrag_other.is_some())
                .then(|| w(&|s| s.nll_refrag_other.unwrap_or(0.0))),
            nll_expanded: pooled_map(all, |s| &s.nll_expanded, &w),
            recon_accuracy: pooled_map(all, |s| &s.recon_accuracy, &w),
        }
    }
}

/// Pools one score over the texts: called with the score's accessor.
type Pool<'a> = &'a dyn Fn(&dyn Fn(&PplScores) -> f64) -> f64;

/// The keys every text has, each pooled with `w`.
fn pooled_map(
    all: &[PplScores],
    map: impl Fn(&PplScores) -> &std::collections::BTreeMap<String, f64>,
    w: Pool,
) -> std::collections::BTreeMap<String, f64> {
    let Some(first) = all.first() else { return Default::default() };
    map(first)
        .keys()
        .filter(|k| all.iter().all(|s| map(s).contains_key(*k)))
        .map(|k| (k.clone(), w(&|s| map(s)[k])))
        .collect()
}

/// Start offsets of `n` windows of `len` tokens spread evenly over `total` tokens.
pub fn window_starts(total: usize, len: usize, n: usize) -> Vec<usize> {
    if total < len || n == 0 {
        return vec![];
    }
    let room = total - len;
    let n = n.min(room / len + 1).max(1);
    (0..n).map(|i| if n == 1 { 0 } else { i * room / (n - 1) }).collect()
}

/// Chunk counts whose reconstruction `eval perplexity` reports (those that fit in s / k).
pub const RECON_CHUNKS: [usize; 2] = [1, 16];

/// Score one text (already tokenised). `refrag_dec` reads the chunk vectors (the decoder with
/// trained adapters folded in), `dec` everything else; None = `dec` for both.
#[allow(clippy::too_many_arguments)]
pub fn score(
    dec: &Decoder,
    refrag_dec: Option<&Decoder>,
    compress: Option<Compressor>,
    policy: Option<(&crate::model::policy::PolicyNet, &Encoder)>,
    name: &str,
    ids: &[u32],
    opts: &PplOptions,
    mut tick: impl FnMut(),
) -> Result<PplScores> {
    let (s, o, k) = (opts.s, opts.o, opts.k);
    if compress.is_some_and(|c| c.k != k) {
        bail!("chunk size {k} for a compressor of k = {}", compress.map_or(0, |c| c.k));
    }
    if s % k != 0 {
        bail!("--s {s} is not a multiple of k = {k}");
    }
    let l = s / k;
    let starts = window_starts(ids.len(), s + o, opts.windows);
    if starts.is_empty() {
        bail!("{name}: {} tokens, fewer than s + o = {}", ids.len(), s + o);
    }
    let mut sc = PplScores { text: name.to_string(), ..Default::default() };
    let (mut refrag, mut refrag_other) = (0.0, 0.0);
    let (mut none_adapted, mut full_adapted) = (0.0, 0.0);
    // Each window's chunk vectors and their projections, encoded once: a window reads its own,
    // and the next window's as the other-window control.
    let compressed = match compress {
        Some(comp) => starts
            .iter()
            .map(|&st| {
                let vecs = comp
                    .vectors(dec, &[&ids[st..st + s]])?
                    .ok_or_else(|| anyhow::anyhow!("{name}: a window without chunks"))?;
                let e = comp.project(&vecs)?;
                Ok((vecs, e))
            })
            .collect::<Result<Vec<_>>>()?,
        None => vec![],
    };
    for (wi, &st) in starts.iter().enumerate() {
        let ctx = &ids[st..st + s];
        let tgt = &ids[st + s..st + s + o];
        sc.nll_none += nll_after(dec, &dec.no_prefix()?, tgt)?;
        sc.nll_full += nll_after(dec, &dec.embed_tokens(ctx)?, tgt)?;
        sc.nll_last += nll_after(dec, &dec.embed_tokens(&ctx[s - l..])?, tgt)?;
        if let Some((vecs, e)) = compressed.get(wi) {
            let rd = refrag_dec.unwrap_or(dec);
            refrag += nll_after(rd, e, tgt)?;
            if starts.len() > 1 {
                let (_, oe) = &compressed[(wi + 1) % starts.len()];
                refrag_other += nll_after(rd, oe, tgt)?;
                for n in RECON_CHUNKS.into_iter().filter(|&n| n <= l) {
                    let recon = |v: &Tensor| rd.recon_prefix(&v.narrow(0, 0, n)?, opts.recon_marker);
                    let own = accuracy_after(rd, &recon(e)?, &ctx[..n * k])?;
                    let other = accuracy_after(rd, &recon(oe)?, &ctx[..n * k])?;
                    *sc.recon_accuracy.entry(format!("chunks_{n}")).or_insert(0.0) += own;
                    *sc.recon_accuracy.entry(format!("chunks_{n}_other")).or_insert(0.0) += other;
                }
            }
            let n = l;
            let want = ((opts.expand * n as f64).round() as usize).min(n);
            let mut chunk_nll = None;
            for (pi, &p) in opts.policies.iter().enumerate() {
                let scores =
                    policy_scores(p, pi, &Window { start: st, ctx, tgt, vecs }, dec, policy, opts, &mut chunk_nll)?;
                let mask = if p == crate::options::Policy::None {
                    vec![false; n]
                } else {
                    crate::model::policy::top_mask(&scores, want)
                };
                let prefix = crate::read::policy::mixed_prefix(rd, ctx, k, e, &mask)?;
                let key = format!("{}@{}", serde_json::to_value(p)?.as_str().unwrap_or("?"), opts.expand);
                *sc.nll_expanded.entry(key).or_insert(0.0) += nll_after(rd, &prefix, tgt)?;
            }
        }
        if let Some(ad) = refrag_dec {
            none_adapted += nll_after(ad, &ad.no_prefix()?, tgt)?;
            full_adapted += nll_after(ad, &ad.embed_tokens(ctx)?, tgt)?;
        }
        sc.windows += 1;
        sc.target_tokens += o;
        tick();
    }
    let n = sc.windows as f64;
    sc.nll_none /= n;
    sc.nll_full /= n;
    sc.nll_last /= n;
    sc.nll_refrag = compress.map(|_| refrag / n);
    sc.nll_refrag_other = compress.filter(|_| starts.len() > 1).map(|_| refrag_other / n);
    sc.nll_none_adapted = refrag_dec.map(|_| none_adapted / n);
    sc.nll_full_adapted = refrag_dec.map(|_| full_adapted / n);
    for v in sc.nll_expanded.values_mut().chain(sc.recon_accuracy.values_mut()) {
        *v /= n;
    }
    Ok(sc)
}

/// A window of `eval perplexity`: where it starts, its context and target tokens, its chunk
/// vectors.
struct Window<'w> {
    start: usize,
    ctx: &'w [u32],
    tgt: &'w [u32],
    vecs: &'w Tensor,
}

/// Each chunk's score under an expansion policy (the highest are expanded); the decoder's
/// per-chunk NLL is computed once per window (`chunk_nll`) for the perplexity policies.
fn policy_scores(
    p: crate::options::Policy,
    pi: usize,
    w: &Window,
    dec: &Decoder,
    policy: Option<(&crate::model::policy::PolicyNet, &Encoder)>,
    opts: &PplOptions,
    chunk_nll: &mut Option<Vec<f64>>,
) -> Result<Vec<f64>> {
    use crate::options::Policy;
    let (n, k, o) = (w.vecs.dim(0)?, opts.k, opts.o);
    let (ctx, tgt) = (w.ctx, w.tgt);
    Ok(match p {
        Policy::None => vec![0.0; n],
        Policy::Random => {
            let mut rng = crate::rng::Rng(0x5eed ^ (w.start as u64) << 8 ^ pi as u64);
            (0..n).map(|_| rng.unit()).collect()
        }
        Policy::PplDesc | Policy::PplAsc => {
            if chunk_nll.is_none() {
                *chunk_nll = Some(crate::read::policy::chunk_nll(dec, ctx, k)?);
            }
            let sign = if p == Policy::PplDesc { 1.0 } else { -1.0 };
            chunk_nll.as_ref().map(|v| v.iter().map(|x| sign * x).collect()).unwrap_or_default()
        }
        Policy::Sim | Policy::SimSpan => {
            bail!("--policy sim and sim-span need a question; perplexity readings take random, ppl-desc, ppl-asc, rl")
        }
        Policy::Rl => {
            let Some((net, qenc)) = policy else { return Err(crate::read::policy::missing(None)) };
            let q = if net.cfg.condition {
                let qt = dec
                    .tokenizer
                    .decode(&tgt[..opts.query_tokens.min(o)], false)
                    .map_err(|e| anyhow::anyhow!("decode: {e}"))?;
                Some(qenc.encode(&[qt.as_str()])?.to_device(&dec.device)?.squeeze(0)?)
            } else {
                None
            };
            net.logits(w.vecs, q.as_ref(), &[n])?.to_vec1::<f32>()?.iter().map(|&x| x as f64).collect()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_spread_and_fit() {
        assert_eq!(window_starts(100, 10, 3), vec![0, 45, 90]);
        assert_eq!(window_starts(10, 10, 5), vec![0]);
        assert!(window_starts(9, 10, 5).is_empty());
        for st in window_starts(1000, 300, 8) {
            assert!(st + 300 <= 1000);
        }
        // never more windows than fit without overlap
        assert_eq!(window_starts(25, 10, 8).len(), 2);
    }

    #[test]
    fn gap_closed_is_a_share() {
        let s = PplScores { nll_none: 4.0, nll_full: 3.0, nll_last: 3.5, ..Default::default() };
        assert!((s.gap_closed(3.5) - 0.5).abs() < 1e-12);
        assert!((s.gap_closed(3.0) - 1.0).abs() < 1e-12);
    }
}
