//! The learned expansion policy (REFRAG, arXiv 2509.01092, section 2.1 and appendix A.1): a
//! small two-layer transformer over the chunk vectors that gives one logit per chunk; chunks are
//! picked one after another without replacement (pointer-network masking). Beyond the paper, it
//! may also read a query vector (the question at ask time) next to every chunk (`--condition`),
//! so that it can expand what the question is about. Trained by `crate::train::policy`; used
//! through `crate::read::policy::Selection`.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{layer_norm, linear, LayerNorm, Linear, Module, VarBuilder, VarMap};
use std::path::Path;

/// File names inside a weights folder.
pub const POLICY_FILE: &str = "policy.safetensors";
pub const POLICY_CARD: &str = "policy.json";

/// Why a folder's policy cannot read these weights' chunk vectors: its card names other trained
/// encoder tensors (`+trained@DIGEST` in the id) than the folder's, e.g. new weights copied
/// beside an old policy. None when they agree or the card does not say.
pub fn stale_policy(dir: &Path, chunk_encoder_id: &str) -> Result<Option<String>> {
    let path = dir.join(POLICY_CARD);
    let Ok(bytes) = std::fs::read(&path) else { return Ok(None) };
    let card: serde_json::Value =
        serde_json::from_slice(&bytes).with_context(|| format!("{}: not JSON", path.display()))?;
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
        let feat =
            cfg.in_dim * (1 + usize::from(cfg.condition) + usize::from(cfg.condition && cfg.interact)) + POS_DIMS;
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
            sim_scale: if cfg.condition && cfg.interact {
                Some(vb.get_with_hints(1, "sim_scale", candle_nn::Init::Const(SIM_SCALE_INIT))?)
            } else {
                None
            },
            cfg,
        })
    }

    /// Load trained weights (`policy.safetensors` + `policy.json`) from a folder.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let card: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join(POLICY_CARD))
                .with_context(|| format!("{}: no policy card", dir.join(POLICY_CARD).display()))?,
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

    /// Whether the policy adds a learned factor times the question similarity to its logits
    /// (`interact`).
    pub fn interacts(&self) -> bool {
        self.sim_scale.is_some()
    }

    /// The `want` chunks a greedy pointer decoding picks (with fixed logits: the top `want`).
    pub fn choose(&self, chunks: &Tensor, query: Option<&Tensor>, sizes: &[usize], want: usize) -> Result<Vec<bool>> {
        let l = self.logits(chunks, query, sizes)?.to_vec1::<f32>()?;
        Ok(top_mask(&l.iter().map(|&x| x as f64).collect::<Vec<_>>(), want))
    }
}

/// Zero the network's own output in an `interact` policy: it then ranks chunks as `sim` does.
pub fn start_from_sim(varmap: &VarMap) -> Result<()> {
    let vars = varmap.data().lock().map_err(|_| anyhow::anyhow!("policy variables poisoned"))?;
    for name in ["head.weight", "head.bias"] {
        if let Some(v) = vars.get(name) {
            v.set(&v.zeros_like()?)?;
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_gives_one_logit_per_chunk() {
        let vm = VarMap::new();
        let cfg =
            PolicyConfig { in_dim: 6, width: 16, heads: 4, layers: 2, condition: true, interact: true, span: false };
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
        let unit =
            |t: Tensor| t.broadcast_div(&t.sqr().unwrap().sum_keepdim(D::Minus1).unwrap().sqrt().unwrap()).unwrap();
        // fixed vectors (not random draws), so that the two rankings always differ
        let xs: Vec<f32> = (0..12 * 8).map(|v| ((v * 7 + v / 8 * 3) % 11) as f32 - 5.0).collect();
        let x = unit(Tensor::from_vec(xs, (12, 8), &Device::Cpu).unwrap());
        let q = unit(
            Tensor::from_vec((0..8).map(|j| (j % 3) as f32 - 1.0).collect::<Vec<_>>(), (1, 8), &Device::Cpu).unwrap(),
        )
        .squeeze(0)
        .unwrap();
        let sims: Vec<f64> = x
            .matmul(&q.unsqueeze(1).unwrap())
            .unwrap()
            .squeeze(1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|&v| v as f64)
            .collect();
        let sizes = [5, 4, 3];
        for span in [false, true] {
            let vm = VarMap::new();
            let cfg = PolicyConfig { in_dim: 8, width: 16, heads: 4, layers: 2, condition: true, interact: true, span };
            let net = PolicyNet::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
            start_from_sim(&vm).unwrap();
            let heuristic = if span { span_scores(&sims, &sizes) } else { sims.clone() };
            for want in [1, 3, 6] {
                assert_eq!(
                    net.choose(&x, Some(&q), &sizes, want).unwrap(),
                    top_mask(&heuristic, want),
                    "span {span}, want {want}"
                );
            }
        }
        assert_ne!(
            top_mask(&span_scores(&sims, &sizes), 6),
            top_mask(&sims, 6),
            "these vectors cannot tell the two apart"
        );
    }

    /// The shipped policies load and read: `weights/`'s from before `interact`, `weights/qa-minilm`'s with
    /// `interact` and `span`.
    #[test]
    fn shipped_policies_load() {
        for dir in ["weights", "weights/qa-minilm"] {
            let d = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
            let net = PolicyNet::load(&d, &Device::Cpu).unwrap();
            let x = Tensor::randn(0f32, 1.0, (7, net.cfg.in_dim), &Device::Cpu).unwrap();
            let q = Tensor::randn(0f32, 1.0, net.cfg.in_dim, &Device::Cpu).unwrap();
            assert_eq!(net.logits(&x, Some(&q), &[7]).unwrap().dims(), &[7], "{dir}");
        }
    }
}
