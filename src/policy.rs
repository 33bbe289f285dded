//! Selective expansion: which compressed chunks go back to tokens (REFRAG paper, section 2.1
//! and appendix A.1).
//!
//! The learned policy is a small two-layer transformer over the chunk vectors that gives one
//! logit per chunk; chunks are picked one after another without replacement (pointer-network
//! masking). It trains with a GRPO-style group baseline and PPO clipping, the reward being the
//! negative log-perplexity of the tokens that follow the context (`refrag train policy`).
//! Beyond the paper, it may also read a query vector (the question at ask time) next to every
//! chunk (`--condition`), so that it can expand what the question is about.
//!
//! Heuristics behind the same interface: random, question similarity, and the decoder's own
//! per-chunk perplexity, highest first (`ppl-desc`) or lowest first (`ppl-asc`).

use crate::decoder::Decoder;
use crate::encoder::Encoder;
use crate::projector::Projector;
use crate::train::{AdamW, Rng, TextPool};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{layer_norm, linear, LayerNorm, Linear, Module, VarBuilder, VarMap};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// File names inside a weights folder.
pub const POLICY_FILE: &str = "policy.safetensors";
pub const POLICY_CARD: &str = "policy.json";

/// Why a folder's policy cannot read these weights' chunk vectors: its card names other trained
/// encoder tensors (`+trained@DIGEST` in the id) than the folder's, e.g. new weights copied
/// beside an old policy. None when they agree or the card does not say.
pub fn stale_policy(dir: &Path, chunk_encoder_id: &str) -> Result<Option<String>> {
    let path = dir.join(POLICY_CARD);
    let Ok(bytes) = std::fs::read(&path) else { return Ok(None) };
    let card: serde_json::Value = serde_json::from_slice(&bytes).with_context(|| format!("{}: not JSON", path.display()))?;
    let Some(trained_on) = card["chunk_encoder"].as_str() else { return Ok(None) };
    let trained = |id: &str| id.split_once('+').map_or_else(|| "the base encoder".to_string(), |(_, t)| t.to_string());
    let (theirs, ours) = (trained(trained_on), trained(chunk_encoder_id));
    Ok((theirs != ours).then(|| {
        format!(
            "{}: the policy was trained on chunk vectors of {theirs}, these weights make them with {ours}: train it again (`refrag train policy`) or remove {POLICY_FILE}",
            path.display()
        )
    }))
}

/// The error for `--policy rl` without a usable policy (`stale`: why the folder's one is not).
pub fn missing(stale: Option<&str>) -> anyhow::Error {
    match stale {
        Some(why) => anyhow::anyhow!("--policy rl: {why}"),
        None => anyhow::anyhow!("--policy rl needs a trained policy ({POLICY_FILE} in the weights folder; `refrag train policy`)"),
    }
}

/// When a reading `wants` the trained policy, the weights must carry a usable one.
pub fn require(wants: bool, trained: Option<&crate::projector::Trained>) -> Result<()> {
    match trained {
        Some(t) if t.policy.is_some() => Ok(()),
        _ if !wants => Ok(()),
        t => Err(missing(t.and_then(|t| t.stale_policy.as_deref()))),
    }
}

/// Starting factor on question similarity in `interact` policies: cosine gaps of 0.05-0.2
/// between chunks become logit gaps of 1-4.
const SIM_SCALE_INIT: f64 = 20.0;

/// Sinusoidal features of a chunk's relative place in the context.
const POS_DIMS: usize = 8;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PolicyConfig {
    /// Chunk-vector size (the encoder's).
    pub in_dim: usize,
    pub width: usize,
    pub heads: usize,
    pub layers: usize,
    /// Reads a query vector beside every chunk.
    pub condition: bool,
    /// Reads the question the way `sim` does, and learns on top of it: the elementwise
    /// product of each chunk vector with the query vector is an input (a concatenation alone
    /// does not let a small network compare them), and a learned scale times the chunk's
    /// question similarity is added to its logit (training starts with the network's own
    /// output at zero: the untrained policy ranks chunks as `sim` does). Off in policies
    /// trained before it existed.
    #[serde(default)]
    pub interact: bool,
    /// With `interact`: the similarity added to the logits is `sim-span`'s (the best within one
    /// chunk in the same passage), so the untrained policy ranks chunks as `sim-span` does.
    #[serde(default)]
    pub span: bool,
}

struct Block {
    ln1: LayerNorm,
    qkv: Linear,
    out: Linear,
    ln2: LayerNorm,
    ff1: Linear,
    ff2: Linear,
}

/// The learned expansion policy.
pub struct PolicyNet {
    pub cfg: PolicyConfig,
    inp: Linear,
    blocks: Vec<Block>,
    ln: LayerNorm,
    head: Linear,
    /// With `interact`: the factor on question similarity added to the logits.
    sim_scale: Option<Tensor>,
}

impl PolicyNet {
    pub fn new(cfg: PolicyConfig, vb: VarBuilder) -> Result<Self> {
        let w = cfg.width;
        let feat = cfg.in_dim * (1 + usize::from(cfg.condition) + usize::from(cfg.condition && cfg.interact)) + POS_DIMS;
        let mut blocks = Vec::new();
        for i in 0..cfg.layers {
            let vb = vb.pp(format!("block{i}"));
            blocks.push(Block {
                ln1: layer_norm(w, 1e-5, vb.pp("ln1"))?,
                qkv: linear(w, 3 * w, vb.pp("qkv"))?,
                out: linear(w, w, vb.pp("out"))?,
                ln2: layer_norm(w, 1e-5, vb.pp("ln2"))?,
                ff1: linear(w, 4 * w, vb.pp("ff1"))?,
                ff2: linear(4 * w, w, vb.pp("ff2"))?,
            });
        }
        Ok(Self {
            inp: linear(feat, w, vb.pp("inp"))?,
            blocks,
            ln: layer_norm(w, 1e-5, vb.pp("ln"))?,
            head: linear(w, 1, vb.pp("head"))?,
            sim_scale: if cfg.condition && cfg.interact { Some(vb.get_with_hints(1, "sim_scale", candle_nn::Init::Const(SIM_SCALE_INIT))?) } else { None },
            cfg,
        })
    }

    /// Load trained weights (`policy.safetensors` + `policy.json`) from a folder.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let card: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join(POLICY_CARD)).with_context(|| format!("{}: no policy card", dir.join(POLICY_CARD).display()))?,
        )
        .with_context(|| format!("{}: not JSON", dir.join(POLICY_CARD).display()))?;
        let cfg: PolicyConfig = serde_json::from_value(card["config"].clone()).context("policy card: no config")?;
        let path = dir.join(POLICY_FILE);
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, device) }
            .with_context(|| format!("{}: not a safetensors file", path.display()))?;
        Self::new(cfg, vb).with_context(|| format!("{}: not a policy for this config", path.display()))
    }

    /// One logit per chunk. `chunks`: [n, in_dim] (encoder vectors, before projection);
    /// `query`: [in_dim] when the policy is conditioned; `sizes`: chunks per passage, in order
    /// (they sum to n; only `span` policies read them).
    pub fn logits(&self, chunks: &Tensor, query: Option<&Tensor>, sizes: &[usize]) -> Result<Tensor> {
        let (n, _) = chunks.dims2()?;
        let device = chunks.device();
        // unit-length vectors have entries ~ 1/sqrt(dim): policies with `interact` read them
        // scaled to entries ~ 1 (their product then sums to dim x cosine)
        let scale = if self.cfg.interact { (self.cfg.in_dim as f64).sqrt() } else { 1.0 };
        let raw = chunks.to_dtype(DType::F32)?;
        let chunks = (&raw * scale)?;
        let mut parts = vec![chunks.clone()];
        if self.cfg.condition {
            let q = match query {
                Some(q) => (q.to_dtype(DType::F32)?.reshape((1, self.cfg.in_dim))? * scale)?,
                None => Tensor::zeros((1, self.cfg.in_dim), DType::F32, device)?,
            };
            let q = q.broadcast_as((n, self.cfg.in_dim))?.contiguous()?;
            if self.cfg.interact {
                parts.push((&chunks * &q)?);
            }
            parts.push(q);
        }
        let pos: Vec<f32> = (0..n)
            .flat_map(|i| {
                let r = (i as f32 + 0.5) / n as f32;
                (0..POS_DIMS / 2).flat_map(move |j| {
                    let f = std::f32::consts::PI * (1 << j) as f32 * r;
                    [f.sin(), f.cos()]
                })
            })
            .collect();
        parts.push(Tensor::from_vec(pos, (n, POS_DIMS), device)?);
        let mut x = self.inp.forward(&Tensor::cat(&parts, 1)?)?; // [n, w]
        let (w, h) = (self.cfg.width, self.cfg.heads);
        let hd = w / h;
        for b in &self.blocks {
            let y = b.ln1.forward(&x)?;
            let qkv = b.qkv.forward(&y)?.reshape((n, 3, h, hd))?.permute((1, 2, 0, 3))?; // [3, h, n, hd]
            let (q, k, v) = (qkv.get(0)?.contiguous()?, qkv.get(1)?.contiguous()?, qkv.get(2)?.contiguous()?);
            let att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
            let att = candle_nn::ops::softmax(&att, D::Minus1)?;
            let y = att.matmul(&v)?.transpose(0, 1)?.reshape((n, w))?;
            x = (x + b.out.forward(&y)?)?;
            let y = b.ff2.forward(&b.ff1.forward(&b.ln2.forward(&x)?)?.gelu()?)?;
            x = (x + y)?;
        }
        let out = self.head.forward(&self.ln.forward(&x)?)?.squeeze(1)?;
        match (&self.sim_scale, query) {
            (Some(a), Some(q)) => {
                let q = q.to_dtype(DType::F32)?.reshape((self.cfg.in_dim, 1))?;
                let mut sim = raw.matmul(&q)?.squeeze(1)?;
                if self.cfg.span {
                    if sizes.iter().sum::<usize>() != n {
                        bail!("{n} chunk vectors for passages of {} chunks", sizes.iter().sum::<usize>());
                    }
                    let v: Vec<f64> = sim.to_dtype(DType::F64)?.to_vec1()?;
                    sim = Tensor::new(span_scores(&v, sizes), device)?.to_dtype(DType::F32)?;
                }
                Ok((out + sim.broadcast_mul(a)?)?)
            }
            _ => Ok(out),
        }
    }

    /// The `want` chunks a greedy pointer decoding picks (with fixed logits: the top `want`).
    pub fn choose(&self, chunks: &Tensor, query: Option<&Tensor>, sizes: &[usize], want: usize) -> Result<Vec<bool>> {
        let l = self.logits(chunks, query, sizes)?.to_vec1::<f32>()?;
        Ok(top_mask(&l.iter().map(|&x| x as f64).collect::<Vec<_>>(), want))
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
    /// question's retrieval vector.
    pub fn choose(&self, decoder: &Decoder, k: usize, passages: &[&[u32]], vectors: Option<&Tensor>, qvec: &[f32]) -> Result<Vec<bool>> {
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
pub fn mixed_segments(passages: &[&[u32]], k: usize, expand: &[bool], projected: Option<&Tensor>) -> Result<Vec<Vec<crate::prompt::Segment>>> {
    use crate::prompt::Segment;
    let mut idx = 0;
    let mut out = Vec::new();
    for tokens in passages {
        let mut segs = Vec::new();
        let mut run_start: Option<usize> = None;
        for c in crate::corpus::chunks(tokens, k) {
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

/// `sim-span`'s scores: each chunk gets the best similarity within one chunk of it in its own
/// passage (`sizes`: chunks per passage, in order), plus a small share of its own, so a window's
/// centre goes first and its neighbours follow it before the next window opens. (One chunk on
/// either side: on training questions this beat two on either side and the next chunk only.)
pub fn span_scores(sim: &[f64], sizes: &[usize]) -> Vec<f64> {
    let mut out = Vec::with_capacity(sim.len());
    let mut start = 0;
    for &len in sizes {
        let p = &sim[start..start + len];
        for i in 0..len {
            let best = p[i.saturating_sub(1)..=(i + 1).min(len - 1)].iter().copied().fold(f64::NEG_INFINITY, f64::max);
            out.push(best + 1e-3 * p[i]);
        }
        start += len;
    }
    out
}

/// Mark the `want` highest scores.
pub fn top_mask(scores: &[f64], want: usize) -> Vec<bool> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut out = vec![false; scores.len()];
    for &i in order.iter().take(want) {
        out[i] = true;
    }
    out
}

/// Sample `want` chunks in sequence without replacement from softmax(logits) over the chunks
/// not yet picked.
fn sample_sequence(logits: &[f64], want: usize, rng: &mut Rng) -> Vec<usize> {
    let mut taken = vec![false; logits.len()];
    let mut seq = Vec::with_capacity(want);
    for _ in 0..want.min(logits.len()) {
        let m = logits.iter().zip(&taken).filter(|(_, &t)| !t).map(|(&l, _)| l).fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = logits.iter().zip(&taken).map(|(&l, &t)| if t { 0.0 } else { (l - m).exp() }).collect();
        let mut u = rng.unit() * w.iter().sum::<f64>();
        let mut pick = w.iter().rposition(|&x| x > 0.0).unwrap_or(0);
        for (i, &x) in w.iter().enumerate() {
            if x > 0.0 && u < x {
                pick = i;
                break;
            }
            u -= x;
        }
        taken[pick] = true;
        seq.push(pick);
    }
    seq
}

/// log π(sequence): Σ_t logit[a_t] - logsumexp(logits over the chunks not yet picked).
fn sequence_logprob(logits: &Tensor, seq: &[usize]) -> Result<Tensor> {
    let n = logits.dim(0)?;
    let t = seq.len();
    let mut mask = vec![0f32; t * n];
    for (step, _) in seq.iter().enumerate() {
        for &prev in &seq[..step] {
            mask[step * n + prev] = f32::NEG_INFINITY;
        }
    }
    let mask = Tensor::from_vec(mask, (t, n), logits.device())?;
    let masked = logits.unsqueeze(0)?.broadcast_add(&mask)?;
    let max = masked.max_keepdim(1)?.detach();
    let lse = (masked.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()? + max)?.squeeze(1)?;
    let idx = Tensor::new(seq.iter().map(|&i| i as u32).collect::<Vec<_>>(), logits.device())?;
    let picked = logits.index_select(&idx, 0)?;
    Ok((picked - lse)?.sum_all()?)
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

/// What the policy learns from.
pub enum Episodes<'a> {
    /// Windows of text: s tokens compressed, reward = -log-perplexity of the o tokens after them
    /// (the paper's recipe; a conditioned policy reads the first target tokens as its query).
    Text(&'a TextPool),
    /// Question tasks (`refrag dataset ... --tasks`): the passages compressed, reward =
    /// -log-perplexity of the reference answer read after the question, exactly as `ask` builds
    /// the input; a conditioned policy reads the question's retrieval vector, as at ask time.
    Tasks(&'a crate::sft::QaPool),
}

pub struct PolicyTrain<'a> {
    /// The decoder that reads compressed input (adapters folded in).
    pub decoder: &'a Decoder,
    pub chunk_encoder: &'a Encoder,
    /// The retrieval encoder: makes the query vector as `ask` does for a question.
    pub query_encoder: &'a Encoder,
    pub projector: &'a Projector,
    pub k: usize,
    pub episodes: Episodes<'a>,
    pub out: &'a Path,
    pub quiet: bool,
    pub data_note: String,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PolicyTrainConfig {
    pub steps: usize,
    /// Context tokens compressed per sample and tokens predicted after them.
    pub s: usize,
    pub o: usize,
    /// Fraction of chunks expanded.
    pub expand: f64,
    /// Selections sampled per context (the group).
    pub group: usize,
    /// Policy-gradient epochs over each group (PPO).
    pub epochs: usize,
    pub clip_eps: f64,
    pub lr: f64,
    pub seed: u64,
    /// Tokens of the target's start that stand in for a question (conditioned policy).
    pub query_tokens: usize,
}

/// The training settings a card lists: text episodes' window sizes (s, o, query tokens) only
/// when the policy learned from text.
fn train_fields(cfg: &PolicyTrainConfig, episodes: &Episodes) -> serde_json::Value {
    let mut v = serde_json::to_value(cfg).unwrap_or_default();
    if let (Episodes::Tasks(_), Some(m)) = (episodes, v.as_object_mut()) {
        for key in ["s", "o", "query_tokens"] {
            m.remove(key);
        }
    }
    v
}

/// Zero the network's own output in an `interact` policy: it then ranks chunks as `sim` does.
fn start_from_sim(varmap: &VarMap) -> Result<()> {
    let vars = varmap.data().lock().map_err(|_| anyhow::anyhow!("policy variables poisoned"))?;
    for name in ["head.weight", "head.bias"] {
        if let Some(v) = vars.get(name) {
            v.set(&v.zeros_like()?)?;
        }
    }
    Ok(())
}

/// Train the policy (GRPO group baseline + PPO clipping); writes policy.safetensors/json.
/// The reward of each expansion mask of a group (one context).
type RewardFn<'a> = Box<dyn Fn(&[Vec<bool>]) -> Result<Vec<f64>> + 'a>;

pub fn train(run: &PolicyTrain, net_cfg: PolicyConfig, cfg: &PolicyTrainConfig) -> Result<serde_json::Value> {
    let dec = run.decoder;
    let device = &dec.device;
    if (matches!(run.episodes, Episodes::Text(_)) && !cfg.s.is_multiple_of(run.k)) || cfg.group < 2 {
        bail!("--s must be a multiple of k and --group at least 2");
    }
    std::fs::create_dir_all(run.out).with_context(|| format!("{}: cannot create", run.out.display()))?;
    let varmap = VarMap::new();
    let net = PolicyNet::new(net_cfg.clone(), VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    if net.sim_scale.is_some() {
        start_from_sim(&varmap)?;
    }
    let mut opt = AdamW::new(&varmap, 0.0)?;
    let mut rng = Rng(cfg.seed);
    let mut log = std::fs::File::create(run.out.join("policy_train.jsonl"))?;
    let pb = crate::progress::bar(run.quiet, cfg.steps as u64, "steps");
    let t0 = Instant::now();
    let recent = std::cell::RefCell::new(Vec::<f64>::new());
    // weights first, then the card that describes them (a stopped run leaves a usable pair)
    let save = |steps: usize| -> Result<serde_json::Value> {
        varmap.save(run.out.join(POLICY_FILE))?;
        let r = recent.borrow();
        let card = serde_json::json!({
            "what": format!("REFRAG selective-expansion policy (2-layer transformer over chunk vectors; GRPO + PPO clip; reward = -log-perplexity of {})", match run.episodes {
                Episodes::Text(_) => "the next tokens",
                Episodes::Tasks(_) => "the reference answer after the question",
            }),
            "config": net_cfg,
            "train": train_fields(cfg, &run.episodes),
            "steps_done": steps,
            "k": run.k,
            "chunk_encoder": run.chunk_encoder.id,
            "query_encoder": run.query_encoder.id,
            "decoder_tokenizer": dec.tokenizer_id,
            "data": run.data_note,
            "question_at": matches!(run.episodes, Episodes::Tasks(_)).then(crate::prompt::question_at),
            "greedy_minus_group_mean_reward_last50": r.iter().sum::<f64>() / r.len().max(1) as f64,
            "seconds": t0.elapsed().as_secs_f64(),
        });
        let tmp = run.out.join(format!("{POLICY_CARD}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(&card)?)?;
        std::fs::rename(&tmp, run.out.join(POLICY_CARD))?;
        Ok(card)
    };
    let encode_query = |text: &str| -> Result<Option<Tensor>> {
        if !net_cfg.condition {
            return Ok(None);
        }
        Ok(Some(run.query_encoder.encode(&[text])?.to_device(device)?.squeeze(0)?))
    };
    for step in 0..cfg.steps {
        // One context: its chunk vectors, the query, and the reward of any expansion mask.
        let task;
        let window;
        let (vecs, query, sizes, reward): (Tensor, Option<Tensor>, Vec<usize>, RewardFn) = match run.episodes {
            Episodes::Text(pool) => {
                window = pool.window(cfg.s + cfg.o, &mut rng);
                let (ctx, tgt) = (&window[..cfg.s], &window[cfg.s..]);
                let texts = crate::corpus::chunk_texts(&dec.tokenizer, ctx, run.k)?;
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                let vecs = run.chunk_encoder.encode(&refs)?.to_device(device)?;
                let projected = run.projector.forward(&vecs)?;
                let q = dec.tokenizer.decode(&tgt[..cfg.query_tokens.min(tgt.len())], false).map_err(|e| anyhow::anyhow!("decode: {e}"))?;
                let reward = move |masks: &[Vec<bool>]| -> Result<Vec<f64>> {
                    masks.iter().map(|m| Ok(-crate::perplexity::nll_after(dec, &mixed_prefix(dec, ctx, run.k, &projected, m)?, tgt)?)).collect()
                };
                let n = vecs.dim(0)?;
                (vecs, encode_query(&q)?, vec![n], Box::new(reward))
            }
            Episodes::Tasks(pool) => {
                let ex = pool.sample(1, &mut rng)[0];
                task = crate::sft::EncodedTask::new(dec, run.chunk_encoder, run.projector, run.k, ex)?;
                let t = &task;
                let reward = move |masks: &[Vec<bool>]| -> Result<Vec<f64>> {
                    let items = masks.iter().map(|m| Ok((t.prompt(run.k, m)?, t.ex.answer.as_slice()))).collect::<Result<Vec<_>>>()?;
                    Ok(crate::sft::answer_nll(dec, &items)?.into_iter().map(|x| -x).collect())
                };
                (task.raw.clone(), encode_query(&ex.question)?, task.sizes.clone(), Box::new(reward))
            }
        };
        let n = vecs.dim(0)?;
        let want = ((cfg.expand * n as f64).round() as usize).clamp(1, n);
        let logits = net.logits(&vecs, query.as_ref(), &sizes)?;
        let lv: Vec<f64> = logits.to_vec1::<f32>()?.iter().map(|&x| x as f64).collect();
        let mut seqs = Vec::new();
        let mut masks = Vec::new();
        for _ in 0..cfg.group {
            let seq = sample_sequence(&lv, want, &mut rng);
            let mut mask = vec![false; n];
            for &i in &seq {
                mask[i] = true;
            }
            seqs.push(seq);
            masks.push(mask);
        }
        // the policy's own greedy pick is scored with the group (against the group's mean: a
        // random-like baseline), but does not enter the update
        masks.push(top_mask(&lv, want));
        let mut rewards = reward(&masks)?;
        let g = rewards.pop().expect("the greedy pick's reward");
        let mean = rewards.iter().sum::<f64>() / rewards.len() as f64;
        let sd = (rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / rewards.len() as f64).sqrt();
        let adv: Vec<f64> = rewards.iter().map(|r| (r - mean) / (sd + 1e-4)).collect();
        let old: Vec<f64> = seqs
            .iter()
            .map(|s| Ok(sequence_logprob(&logits, s)?.to_scalar::<f32>()? as f64))
            .collect::<Result<_>>()?;
        for _ in 0..cfg.epochs {
            let logits = net.logits(&vecs, query.as_ref(), &sizes)?;
            let mut terms = Vec::new();
            for ((s, &a), &o) in seqs.iter().zip(&adv).zip(&old) {
                let ratio = (sequence_logprob(&logits, s)? - o)?.exp()?;
                let clipped = ratio.clamp(1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)?;
                terms.push((ratio * a)?.minimum(&(clipped * a)?)?);
            }
            let loss = (Tensor::stack(&terms, 0)?.mean_all()? * -1.0)?;
            let grads = loss.backward()?;
            opt.step(&grads, cfg.lr, 1.0)?;
        }
        let gain = {
            let mut r = recent.borrow_mut();
            r.push(g - mean);
            if r.len() > 50 {
                r.remove(0);
            }
            r.iter().sum::<f64>() / r.len() as f64
        };
        writeln!(log, "{}", serde_json::json!({"step": step + 1, "reward_mean": mean, "reward_sd": sd, "greedy_minus_mean": g - mean}))?;
        pb.set_position(step as u64 + 1);
        pb.set_message(format!("greedy - sampled nll {:.4} (last 50)", -gain));
        if (step + 1) % 50 == 0 {
            save(step + 1)?;
        }
    }
    pb.finish_and_clear();
    save(cfg.steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A share rounds; a budget takes as many chunks as fit at k - 1 extra positions each,
    /// none when the chunk vectors alone overflow it, at most all of them.
    #[test]
    fn a_budget_expands_as_many_chunks_as_fit() {
        let sel = |expand, budget| Selection { policy: crate::options::Policy::Sim, expand, budget, net: None, seed: 0 };
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

    #[test]
    fn sequences_never_repeat_and_logprob_is_a_probability() {
        let mut rng = Rng(3);
        let l = vec![0.5, -1.0, 2.0, 0.0, 1.0];
        for _ in 0..50 {
            let s = sample_sequence(&l, 3, &mut rng);
            let mut u = s.clone();
            u.sort();
            u.dedup();
            assert_eq!(u.len(), 3);
        }
        // all orderings of 2 picks out of 3 sum to probability 1
        let t = Tensor::new(&[0.3f32, -0.7, 1.1], &Device::Cpu).unwrap();
        let mut total = 0.0;
        for a in 0..3 {
            for b in 0..3 {
                if a != b {
                    total += sequence_logprob(&t, &[a, b]).unwrap().to_scalar::<f32>().unwrap().exp();
                }
            }
        }
        assert!((total - 1.0).abs() < 1e-5, "{total}");
    }

    #[test]
    fn net_gives_one_logit_per_chunk() {
        let vm = VarMap::new();
        let cfg = PolicyConfig { in_dim: 6, width: 16, heads: 4, layers: 2, condition: true, interact: true, span: false };
        let net = PolicyNet::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, 6), &Device::Cpu).unwrap();
        let q = Tensor::randn(0f32, 1.0, 6, &Device::Cpu).unwrap();
        assert_eq!(net.logits(&x, Some(&q), &[5]).unwrap().dims(), &[5]);
        assert_eq!(net.choose(&x, Some(&q), &[5], 2).unwrap().iter().filter(|&&b| b).count(), 2);
    }

    /// An untrained `interact` policy picks what question similarity picks (`sim`, or with
    /// `span` what `sim-span` picks, windows kept inside their passage).
    #[test]
    fn interact_policy_starts_as_sim() {
        let unit = |t: Tensor| t.broadcast_div(&t.sqr().unwrap().sum_keepdim(D::Minus1).unwrap().sqrt().unwrap()).unwrap();
        // fixed vectors (not random draws), so that the two rankings always differ
        let xs: Vec<f32> = (0..12 * 8).map(|v| ((v * 7 + v / 8 * 3) % 11) as f32 - 5.0).collect();
        let x = unit(Tensor::from_vec(xs, (12, 8), &Device::Cpu).unwrap());
        let q = unit(Tensor::from_vec((0..8).map(|j| (j % 3) as f32 - 1.0).collect::<Vec<_>>(), (1, 8), &Device::Cpu).unwrap()).squeeze(0).unwrap();
        let sims: Vec<f64> = x.matmul(&q.unsqueeze(1).unwrap()).unwrap().squeeze(1).unwrap().to_vec1::<f32>().unwrap().iter().map(|&v| v as f64).collect();
        let sizes = [5, 4, 3];
        for span in [false, true] {
            let vm = VarMap::new();
            let cfg = PolicyConfig { in_dim: 8, width: 16, heads: 4, layers: 2, condition: true, interact: true, span };
            let net = PolicyNet::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
            start_from_sim(&vm).unwrap();
            let heuristic = if span { span_scores(&sims, &sizes) } else { sims.clone() };
            for want in [1, 3, 6] {
                assert_eq!(net.choose(&x, Some(&q), &sizes, want).unwrap(), top_mask(&heuristic, want), "span {span}, want {want}");
            }
        }
        assert_ne!(top_mask(&span_scores(&sims, &sizes), 6), top_mask(&sims, 6), "these vectors cannot tell the two apart");
    }

    /// The shipped policies load and read: `weights/`'s from before `interact`, `weights/qa`'s with
    /// `interact` and `span`.
    #[test]
    fn shipped_policies_load() {
        for dir in ["weights", "weights/qa"] {
            let d = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
            let net = PolicyNet::load(&d, &Device::Cpu).unwrap();
            let x = Tensor::randn(0f32, 1.0, (7, net.cfg.in_dim), &Device::Cpu).unwrap();
            let q = Tensor::randn(0f32, 1.0, net.cfg.in_dim, &Device::Cpu).unwrap();
            assert_eq!(net.logits(&x, Some(&q), &[7]).unwrap().dims(), &[7], "{dir}");
        }
    }
}
