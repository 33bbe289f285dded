//! `refrag train`: the REFRAG training stages that fit our models (paper sections 3, B.2, B.3).
//!
//! - `reconstruct`: decoder frozen; the projector learns to map the encoder's chunk vectors into
//!   the decoder's embedding space so that the decoder reproduces the s = L·k tokens from the L
//!   chunk vectors alone. Input `[e_1..e_L, x_1..x_{s-1}]`, targets `x_1..x_s`.
//! - `cpt`: next-paragraph prediction: s context tokens compressed into L vectors, predict the
//!   next o tokens. Input `[e_1..e_L, y_1..y_{o-1}]`, targets `y_1..y_o`. With `--mixed P`, a
//!   fraction P of the chunks is left as tokens (the paper's mixed-input phase).
//!
//! Curriculum (paper Table 8): L is drawn from stages 1, 2, 4, … chunks; as training advances
//! the mixture moves geometrically from few to many chunks. The projector and the top
//! `--encoder-layers` layers of the chunk encoder train; the decoder stays frozen (see the
//! README's limits). The encoder layers ship as `encoder.safetensors` (f16), the projector as
//! `projector.safetensors`; indexes built with them store the trained encoder's chunk vectors.
//!
//! Plumbing: AdamW with warm-up + cosine schedule, global-norm gradient clipping, a JSONL log,
//! checkpoints (weights, optimizer moments, step, RNG) every N steps, `--resume`, fixed seed.

use crate::decoder::Decoder;
use crate::encoder::Encoder;
use crate::projector::Projector;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Reconstruct,
    Cpt,
    /// The selective-expansion policy (see `policy`); trains on top of existing weights.
    Policy,
    /// Answering from compressed passages: supervised answers + distillation from full-context
    /// reading (see `sft`).
    Sft,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub stage: Stage,
    pub k: usize,
    pub steps: usize,
    /// Target tokens per optimizer step (the batch size adapts to the curriculum's L).
    pub tokens_per_step: usize,
    /// Largest number of chunks per sample (the last curriculum stage).
    pub max_chunks: usize,
    /// cpt: tokens to predict after the compressed context.
    pub predict_tokens: usize,
    /// cpt: fraction of chunks left uncompressed (mixed input).
    pub mixed: f64,
    pub lr: f64,
    pub warmup: f64,
    pub weight_decay: f64,
    pub clip: f64,
    pub seed: u64,
    pub checkpoint_every: usize,
    /// Top layers of the chunk encoder that train (0 = projector only).
    #[serde(default)]
    pub encoder_layers: usize,
    /// Rank of the LoRA adapters on every decoder matrix (0 = decoder frozen).
    #[serde(default)]
    pub decoder_lora: usize,
    /// sft: weight of the distillation term (KL to full-context reading).
    #[serde(default)]
    pub distill: f64,
    /// sft: tasks per optimizer step.
    #[serde(default)]
    pub batch: usize,
    /// cpt: weight of an auxiliary reconstruction loss (the window's first chunks read back
    /// from their vectors, up to 16 chunks, on its own batch each step), so that continual
    /// pre-training keeps the vectors' content instead of only their style. 0 = off.
    #[serde(default)]
    pub recon_weight: f64,
    /// reconstruct/cpt: weight of a bag-of-words loss on each chunk vector of a batch: its projected
    /// vector, read through the decoder's final norm and (tied) LM head, should point at the
    /// chunk's k tokens. A direct content signal for the encoder and projector. 0 = off.
    #[serde(default)]
    pub bow_weight: f64,
    /// Factor on the chunk vector before the projector (see `Projector::in_scale`); 1 for
    /// weights trained before it existed.
    #[serde(default = "one")]
    pub input_scale: f64,
    /// sft: distil from the base decoder with this folder's adapters folded in (None: the
    /// base decoder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_weights: Option<PathBuf>,
}

fn one() -> f64 {
    1.0
}

/// VarMap prefix of the chunk encoder's trainable tensors.
const ENC_PREFIX: &str = "enc.";
/// VarMap prefix of the decoder's adapters.
const DEC_PREFIX: &str = "dec.";

/// A small deterministic RNG (splitmix64) whose state is one number, so it checkpoints.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

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

/// Learning rate at `step`: linear warm-up, then cosine decay to 10% of the peak.
pub fn lr_at(cfg: &TrainConfig, step: usize) -> f64 {
    let warm = ((cfg.warmup * cfg.steps as f64) as usize).max(1);
    if step < warm {
        return cfg.lr * (step + 1) as f64 / warm as f64;
    }
    let p = (step - warm) as f64 / (cfg.steps - warm).max(1) as f64;
    cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p.min(1.0)).cos()))
}

/// Token ids of the training text, one stream per document.
pub struct TextPool {
    docs: Vec<Vec<u32>>,
}

impl TextPool {
    pub fn load(files: &[PathBuf], decoder: &Decoder) -> Result<Self> {
        let mut docs = Vec::new();
        for f in files {
            let text = std::fs::read_to_string(f).with_context(|| format!("{}: cannot read as UTF-8 text", f.display()))?;
            let ids = crate::prompt::tokenize(decoder, strip_gutenberg(&text))?;
            if ids.len() >= 64 {
                docs.push(ids);
            }
        }
        if docs.is_empty() {
            bail!("no training text (give --text FILE… with at least 64 tokens each)");
        }
        Ok(Self { docs })
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

/// The body of a Project Gutenberg file (between its START and END markers), else all of it.
pub fn strip_gutenberg(text: &str) -> &str {
    let start = text
        .find("*** START OF")
        .and_then(|i| text[i..].find('\n').map(|j| i + j + 1))
        .unwrap_or(0);
    let end = text[start..].find("*** END OF").map(|i| start + i).unwrap_or(text.len());
    &text[start..end]
}

/// Gradients of an optimizer's variables summed over the passes of one step (in its variable
/// order; None: no gradient reached that variable).
#[derive(Default)]
pub struct GradSum(Vec<Option<Tensor>>);

/// AdamW whose moments can be saved and restored.
///
/// The moments live in two flat f32 buffers over all variables (in `vars` order), and one
/// update runs each of its ~15 element-wise ops once over all of them: a decoder with LoRA on
/// every matrix has ~500 variables, and per-variable updates were ~7500 kernel launches a step
/// (13% of a cpt step on the H200).
pub struct AdamW {
    vars: Vec<(String, Var)>,
    /// each variable's start in the flat buffers; the last entry is their length
    offsets: Vec<usize>,
    m: Tensor,
    v: Tensor,
    pub step: usize,
    beta1: f64,
    beta2: f64,
    eps: f64,
    wd: f64,
}

impl AdamW {
    pub fn new(varmap: &VarMap, wd: f64) -> Result<Self> {
        let data = varmap.data().lock().map_err(|_| anyhow::anyhow!("varmap lock"))?;
        let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let mut offsets = vec![0];
        for (_, v) in &vars {
            offsets.push(offsets[offsets.len() - 1] + v.elem_count());
        }
        let device = vars.first().map(|(_, v)| v.device().clone()).unwrap_or(Device::Cpu);
        let n = offsets[offsets.len() - 1];
        // two buffers, not one shared: nothing may ever update one in place through the other
        let m = Tensor::zeros(n, DType::F32, &device)?;
        let v = Tensor::zeros(n, DType::F32, &device)?;
        Ok(Self { vars, offsets, m, v, step: 0, beta1: 0.9, beta2: 0.999, eps: 1e-8, wd })
    }

    /// Variable `i`'s slice of a flat buffer, in the variable's shape.
    fn slice(&self, flat: &Tensor, i: usize) -> Result<Tensor> {
        let (a, b) = (self.offsets[i], self.offsets[i + 1]);
        Ok(flat.narrow(0, a, b - a)?.reshape(self.vars[i].1.shape())?)
    }

    /// One update with global-norm clipping; returns the gradient norm before clipping.
    pub fn step(&mut self, grads: &candle_core::backprop::GradStore, lr: f64, clip: f64) -> Result<f64> {
        let mut sum = GradSum::default();
        self.accumulate(&mut sum, grads)?;
        self.step_sum(&sum, lr, clip)
    }

    /// Add one backward pass's gradients of this optimizer's variables to `sum` (detached:
    /// the pass's graph can go).
    ///
    /// All or nothing: if an addition fails (out of memory), `sum` is left as it was, so the
    /// pass can run again ([`with_oom_retry`]).
    pub fn accumulate(&self, sum: &mut GradSum, grads: &candle_core::backprop::GradStore) -> Result<()> {
        let mut next = sum.0.clone();
        next.resize(self.vars.len(), None);
        for (slot, (_, var)) in next.iter_mut().zip(&self.vars) {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            let g = g.detach();
            *slot = Some(match slot.take() {
                Some(s) => (s + g)?,
                None => g,
            });
        }
        sum.0 = next;
        Ok(())
    }

    /// One update from summed gradients (see `step`). A variable that no gradient reached is
    /// left as it was, moments included.
    pub fn step_sum(&mut self, grads: &GradSum, lr: f64, clip: f64) -> Result<f64> {
        if self.vars.is_empty() {
            return Ok(0.0);
        }
        let present: Vec<bool> = (0..self.vars.len()).map(|i| matches!(grads.0.get(i), Some(Some(_)))).collect();
        if !present.iter().any(|&p| p) {
            self.step += 1;
            return Ok(0.0);
        }
        // the gradients and the weights as flat f32 vectors (zeros where no gradient came).
        // The gradients were detached in `accumulate`: a variable's gradient carries autograd
        // history (candle detaches only the interior ones), and moments built from it would
        // hold this step's graph, and the next step's the one before.
        let mut gs = Vec::with_capacity(self.vars.len());
        let mut ws = Vec::with_capacity(self.vars.len());
        for (i, (_, var)) in self.vars.iter().enumerate() {
            gs.push(match grads.0.get(i) {
                Some(Some(g)) => g.to_dtype(DType::F32)?.flatten_all()?,
                _ => Tensor::zeros(var.elem_count(), DType::F32, var.device())?,
            });
            ws.push(var.as_tensor().detach().to_dtype(DType::F32)?.flatten_all()?);
        }
        let g = Tensor::cat(&gs, 0)?;
        let w = Tensor::cat(&ws, 0)?;
        // one device sync for the norm, summed in f64 (millions of squares in one f32 sum lose
        // digits on the CPU, which adds them in order)
        let norm = g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
        let scale = if clip > 0.0 && norm > clip { clip / norm } else { 1.0 };
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        let g = (g * scale)?;
        let m = ((&self.m * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
        let v = ((&self.v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
        let upd = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + self.eps)?)?;
        let new = ((w * (1.0 - lr * self.wd))? - (upd * lr)?)?;
        for (i, (_, var)) in self.vars.iter().enumerate() {
            if present[i] {
                var.set(&self.slice(&new, i)?.to_dtype(var.dtype())?)?;
            } else {
                // no gradient: its moments stay as they were
                let (a, b) = (self.offsets[i], self.offsets[i + 1]);
                m.slice_set(&self.m.narrow(0, a, b - a)?, 0, a)?;
                v.slice_set(&self.v.narrow(0, a, b - a)?, 0, a)?;
            }
        }
        (self.m, self.v) = (m, v);
        Ok(norm)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            map.insert(format!("m.{name}"), self.slice(&self.m, i)?.contiguous()?);
            map.insert(format!("v.{name}"), self.slice(&self.v, i)?.contiguous()?);
        }
        candle_core::safetensors::save(&map, path)?;
        Ok(())
    }

    pub fn load(&mut self, path: &Path, device: &Device) -> Result<()> {
        let map = candle_core::safetensors::load(path, device)?;
        let flat = |kind: &str| -> Result<Tensor> {
            let mut parts = Vec::with_capacity(self.vars.len());
            for (name, var) in &self.vars {
                let t = map.get(&format!("{kind}.{name}")).context("optimizer state lacks a moment")?;
                if t.elem_count() != var.elem_count() {
                    bail!("optimizer state: {kind}.{name} has {} values, the variable {}", t.elem_count(), var.elem_count());
                }
                parts.push(t.to_dtype(DType::F32)?.flatten_all()?);
            }
            if parts.is_empty() {
                return Ok(self.m.clone());
            }
            Ok(Tensor::cat(&parts, 0)?)
        };
        let (m, v) = (flat("m")?, flat("v")?);
        (self.m, self.v) = (m, v);
        Ok(())
    }
}

/// Saved between runs (a training may span many short GPU sessions).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Checkpoint {
    step: usize,
    rng: Rng,
    config: TrainConfig,
    tokens_seen: u64,
}

/// The config of the checkpoint in `out`, when there is a readable one (older checkpoints read
/// with the serde defaults: no bag-of-words term, input factor 1).
pub fn checkpoint_config(out: &Path) -> Option<TrainConfig> {
    read_checkpoint(out).map(|ck| ck.config)
}

/// The checkpoint in `out`, when there is a readable one.
fn read_checkpoint(out: &Path) -> Option<Checkpoint> {
    serde_json::from_slice(&std::fs::read(out.join("checkpoint.json")).ok()?).ok()
}

/// One batch's parts: chunk texts to compress, the context tokens of chunks left as tokens, and
/// target tokens. Every row has the same layout (one keep pattern per batch).
struct Batch {
    /// [B * L] chunk texts
    chunk_texts: Vec<String>,
    /// per chunk slot: true when the slot stays uncompressed in every row (mixed input)
    keep: Vec<bool>,
    /// per row: the s context tokens (read for kept slots)
    contexts: Vec<Vec<u32>>,
    targets: Vec<Vec<u32>>,
    l: usize,
}

impl Batch {
    /// Rows `r` of this batch (same chunk-slot pattern).
    fn rows(&self, r: std::ops::Range<usize>) -> Batch {
        Batch {
            chunk_texts: self.chunk_texts[r.start * self.l..r.end * self.l].to_vec(),
            keep: self.keep.clone(),
            contexts: self.contexts[r.clone()].to_vec(),
            targets: self.targets[r].to_vec(),
            l: self.l,
        }
    }

    /// Row ranges of at most `max_tokens` context and target tokens each ([`passes`]).
    fn passes(&self, max_tokens: usize) -> Vec<std::ops::Range<usize>> {
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

/// Loss terms of a reconstruct/cpt step, summed over passes ([`Batch::passes`]) weighted by
/// their share of rows; each pass's gradients go into `grads` as soon as it is done, so only
/// one pass's graph is alive at a time. `scale` weights the whole batch (the auxiliary
/// reconstruction batch of cpt). Returns the weighted loss and the terms' (unweighted by
/// `scale`) means: main, bag of words.
#[allow(clippy::too_many_arguments)]
fn batch_backward(
    dec: &Decoder,
    enc: &Encoder,
    proj: &Projector,
    opt: &AdamW,
    grads: &mut GradSum,
    b: &Batch,
    scale: f64,
    bow_weight: f64,
    micro_tokens: usize,
) -> Result<(f64, f64, Option<f64>)> {
    let n = b.targets.len() as f64;
    let (mut total, mut main_sum, mut bow_sum) = (0.0, 0.0, None::<f64>);
    for r in b.passes(micro_tokens) {
        let w = r.len() as f64 / n;
        let rows = b.rows(r);
        let (m, bow) = with_oom_retry(&dec.device, || {
            let (main, bow) = batch_loss(dec, enc, proj, &rows, bow_weight > 0.0)?;
            let m = scalar(&main)?;
            let mut t = (main * (scale * w))?;
            let mut bv = None;
            if let Some(bw) = bow {
                bv = Some(scalar(&bw)?);
                t = (t + (bw * (scale * bow_weight * w))?)?;
            }
            let g = t.backward()?;
            crate::profile::mark(&dec.device, "backward");
            opt.accumulate(grads, &g)?;
            crate::profile::mark(&dec.device, "accumulate");
            Ok((m, bv))
        })?;
        main_sum += m * w;
        total += m * scale * w;
        if let Some(v) = bow {
            *bow_sum.get_or_insert(0.0) += v * w;
            total += v * scale * bow_weight * w;
        }
    }
    Ok((total, main_sum, bow_sum))
}

/// The auxiliary reconstruction batch of a cpt or sft step (`--recon-weight`): 1 to 16 chunks
/// of the training text, on the curriculum at `f` of the run.
fn recon_batch(pool: &TextPool, dec: &Decoder, cfg: &TrainConfig, f: f64, rng: &mut Rng) -> Result<Batch> {
    let rc = TrainConfig { stage: Stage::Reconstruct, mixed: 0.0, ..cfg.clone() };
    let l = curriculum_chunks(cfg.max_chunks.min(16), f, rng);
    make_batch(pool, dec, &rc, l, rng)
}

fn make_batch(pool: &TextPool, dec: &Decoder, cfg: &TrainConfig, l: usize, rng: &mut Rng) -> Result<Batch> {
    let s = l * cfg.k;
    let o = match cfg.stage {
        Stage::Reconstruct => s,
        Stage::Cpt | Stage::Policy | Stage::Sft => cfg.predict_tokens,
    };
    let per = (s + o).max(1);
    let bsz = (cfg.tokens_per_step / per).max(1);
    // Which chunk slots stay as tokens: one pattern per batch, so all rows have one length.
    let keep: Vec<bool> = (0..l)
        .map(|_| cfg.stage == Stage::Cpt && cfg.mixed > 0.0 && rng.unit() < cfg.mixed)
        .collect();
    let mut b = Batch { chunk_texts: vec![], keep, contexts: vec![], targets: vec![], l };
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
        b.chunk_texts.extend(crate::corpus::chunk_texts(&dec.tokenizer, &ctx, cfg.k)?);
        b.contexts.push(ctx);
        b.targets.push(tgt);
    }
    Ok(b)
}

/// Mean cross-entropy (nats/token) of the targets given the compressed chunks; differentiable
/// with respect to the projector. The whole batch is assembled slot by slot ([B, .., H] pieces),
/// so the number of tensor ops does not grow with the batch. With `bow`, also the bag-of-words
/// loss of the chunk vectors (see `TrainConfig::bow_weight`).
fn batch_loss(dec: &Decoder, enc: &Encoder, proj: &Projector, b: &Batch, bow: bool) -> Result<(Tensor, Option<Tensor>)> {
    let refs: Vec<&str> = b.chunk_texts.iter().map(String::as_str).collect();
    let c = enc.encode(&refs)?.to_device(&dec.device)?;
    crate::profile::mark(&dec.device, "encode");
    let (n, hid) = (b.targets.len(), dec.cfg.hidden);
    let flat = proj.forward(&c)?.to_dtype(dec.dtype)?;
    let bow = if bow { Some(bow_loss(dec, &flat, b)?) } else { None };
    let e = flat.reshape((n, b.l, hid))?;
    // rows of token ids -> [n, len, H]
    let embed_rows = |rows: Vec<&[u32]>| -> Result<Tensor> {
        let len = rows[0].len();
        Ok(dec.embed_tokens(&rows.concat())?.reshape((n, len, hid))?)
    };
    let start = dec.behind_start(&dec.no_prefix()?)?.unsqueeze(0)?.broadcast_as((n, 1, hid))?.contiguous()?;
    let mut parts = vec![start];
    let mut j = 0;
    while j < b.l {
        let run = b.keep[j..].iter().take_while(|&&k| k == b.keep[j]).count();
        if b.keep[j] {
            let k = b.contexts[0].len() / b.l;
            parts.push(embed_rows(b.contexts.iter().map(|c| &c[j * k..(j + run) * k]).collect())?);
        } else {
            parts.push(e.narrow(1, j, run)?);
        }
        j += run;
    }
    let plen: usize = parts.iter().map(|p| p.dim(1)).sum::<candle_core::Result<usize>>()?;
    let tlen = b.targets[0].len();
    parts.push(embed_rows(b.targets.iter().map(|t| &t[..tlen - 1]).collect())?);
    let x = Tensor::cat(&parts, 1)?;
    crate::profile::mark(&dec.device, "assemble");
    let h = dec.forward_train(&x)?;
    let h = h.narrow(1, plen - 1, tlen)?.reshape((n * tlen, hid))?;
    let logits = dec.logits(&h)?;
    let tgt = Tensor::from_vec(b.targets.concat(), n * tlen, &dec.device)?;
    let ce = crate::diffops::cross_entropy(&logits, &tgt)?;
    crate::profile::mark(&dec.device, "logits+ce");
    Ok((ce, bow))
}

/// Bag-of-words loss: mean over chunks and their k tokens of -log p(token | chunk vector), with
/// p the decoder's readout of the projected vector ([n * L, H], row order = chunk order).
fn bow_loss(dec: &Decoder, flat: &Tensor, b: &Batch) -> Result<Tensor> {
    let k = b.contexts[0].len() / b.l;
    let ids: Vec<u32> = b.contexts.iter().flat_map(|c| c[..b.l * k].iter().copied()).collect();
    let rows = ids.len() / k;
    let idx = Tensor::from_vec(ids, (rows, k), &dec.device)?;
    let lp = candle_nn::ops::log_softmax(&dec.readout(flat)?, 1)?;
    Ok(lp.gather(&idx, 1)?.mean_all()?.neg()?)
}

/// Token accuracy of greedy reconstruction/prediction (teacher forced) on a batch; with `other`,
/// each row reads the next row's chunk vectors instead of its own (the control: what the
/// vectors add beyond their style).
fn batch_accuracy(dec: &Decoder, enc: &Encoder, proj: &Projector, b: &Batch, other: bool) -> Result<f64> {
    let refs: Vec<&str> = b.chunk_texts.iter().map(String::as_str).collect();
    let c = enc.encode(&refs)?.to_device(&dec.device)?;
    let e = proj.forward(&c)?;
    let (mut right, mut total) = (0.0, 0usize);
    for (i, t) in b.targets.iter().enumerate() {
        let src = if other { (i + 1) % b.targets.len() } else { i };
        right += crate::perplexity::accuracy_after(dec, &e.narrow(0, src * b.l, b.l)?, t)? * t.len() as f64;
        total += t.len();
    }
    Ok(right / total.max(1) as f64)
}

pub struct TrainRun<'a> {
    pub decoder: &'a Decoder,
    pub encoder: &'a Encoder,
    pub train: &'a TextPool,
    pub heldout: Option<&'a TextPool>,
    pub out: &'a Path,
    pub resume: bool,
    pub quiet: bool,
    /// Stop (after a checkpoint) once this much wall time has passed.
    pub max_seconds: Option<f64>,
    /// Tokens per forward/backward pass (0 = the whole batch in one pass; [`passes`]);
    /// not part of the checkpoint: a run resumed after running out of memory may lower it.
    pub micro_tokens: usize,
    /// Start from these weights (a folder: the reconstruction stage's output) when not resuming.
    pub init_from: Option<PathBuf>,
    pub data_note: String,
    /// sft: training and held-out tasks.
    pub qa: Option<&'a crate::sft::QaPool>,
    pub qa_heldout: Option<&'a crate::sft::QaPool>,
    /// sft: the distillation teacher (None: the base decoder, `decoder`).
    pub teacher: Option<&'a Decoder>,
}

/// Train, checkpointing into `out`; writes `projector.safetensors` and `card.json` at the end.
pub fn train(run: &TrainRun, cfg: &TrainConfig) -> Result<serde_json::Value> {
    let dec = run.decoder;
    let device = &dec.device;
    std::fs::create_dir_all(run.out).with_context(|| format!("{}: cannot create", run.out.display()))?;
    let ck_path = run.out.join("checkpoint.json");
    let mut varmap = VarMap::new();
    Projector::init(&varmap, device, run.encoder.dim, dec.cfg.hidden)?; // creates the variables
    if cfg.encoder_layers > run.encoder.layers {
        bail!("--encoder-layers {}: the encoder has {} layers", cfg.encoder_layers, run.encoder.layers);
    }
    {
        let mut vars = varmap.data().lock().map_err(|_| anyhow::anyhow!("poisoned varmap"))?;
        for n in run.encoder.layer_tensor_names(run.encoder.layers - cfg.encoder_layers..) {
            let t = run.encoder.tensor(&n)?.to_device(device)?;
            vars.insert(format!("{ENC_PREFIX}{n}"), Var::from_tensor(&t)?);
        }
        let r = cfg.decoder_lora;
        if r > 0 {
            for (n, o, i) in dec.lora_shapes() {
                let a = Var::randn(0f32, (1.0 / (i as f64).sqrt()) as f32, (r, i), device)?;
                vars.insert(format!("{DEC_PREFIX}{n}.lora_a"), a);
                vars.insert(format!("{DEC_PREFIX}{n}.lora_b"), Var::zeros((o, r), DType::F32, device)?);
            }
        }
    }
    seeded_init(&varmap, cfg.seed)?;
    let (mut rng, mut start_step, mut tokens_seen) = (Rng(cfg.seed), 0, 0u64);
    let resume = run.resume && ck_path.exists();
    if resume {
        let ck: Checkpoint = serde_json::from_slice(&std::fs::read(&ck_path)?)
            .with_context(|| format!("{}: unreadable checkpoint", ck_path.display()))?;
        if ck.config.stage != cfg.stage || ck.config.k != cfg.k || ck.config.encoder_layers != cfg.encoder_layers
            || ck.config.decoder_lora != cfg.decoder_lora || ck.config.input_scale != cfg.input_scale
        {
            bail!("{}: checkpoint is for another stage, k, --encoder-layers, --decoder-lora or --input-scale; use a new --out", ck_path.display());
        }
        varmap.load(run.out.join("checkpoint.safetensors"))?;
        (rng, start_step, tokens_seen) = (ck.rng, ck.step, ck.tokens_seen);
        truncate_log(&run.out.join("train.jsonl"), start_step)?;
    } else if let Some(init) = &run.init_from {
        init_from_weights(&varmap, init)?;
    }
    let mut opt = AdamW::new(&varmap, cfg.weight_decay)?;
    if resume {
        opt.load(&run.out.join("optimizer.safetensors"), device)?;
        opt.step = start_step;
    }
    train_loop(run, cfg, varmap, opt, rng, start_step, tokens_seen)
}

/// Passes run again after running out of memory, since the start (train.jsonl logs each
/// step's share as `oom_retries`).
static OOM_RETRIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn is_out_of_memory(e: &anyhow::Error) -> bool {
    format!("{e:#}").contains("OUT_OF_MEMORY")
}

/// Seconds waited before each retry of a pass that ran out of GPU memory: the first retry at
/// once (after trimming this process's pool), the later ones after a wait, for memory that
/// other processes on a shared device give back.
const OOM_RETRY_WAITS: [u64; 3] = [0, 3, 15];

/// Run one forward/backward pass; if the GPU runs out of memory, wait for the queued work,
/// give the memory pool's unused blocks back, and run the pass again, up to
/// `OOM_RETRY_WAITS.len()` more times (a pass changes nothing until it succeeds: same rows,
/// same random state, gradients added all or nothing). CUDA's stream-ordered allocator can
/// fail where the same allocation succeeds after the stream is synchronised: TensorFlow's and
/// XLA's allocators retry the same way. On the H200, long LoRA runs failed with half the device
/// free (README "GPU memory in training"); on a device shared with other runs, a retry at once
/// fails again while another process holds the memory.
fn with_oom_retry<T>(dev: &candle_core::Device, pass: impl FnMut() -> Result<T>) -> Result<T> {
    oom_retry_waiting(dev, &OOM_RETRY_WAITS, pass)
}

fn oom_retry_waiting<T>(dev: &candle_core::Device, waits: &[u64], mut pass: impl FnMut() -> Result<T>) -> Result<T> {
    let mut r = pass();
    for &wait in waits {
        match &r {
            Err(e) if is_out_of_memory(e) => {
                OOM_RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_secs(wait));
                let trimmed = crate::device::release_unused(dev);
                tracing::warn!("out of GPU memory in a pass ({e:#}); pool trimmed: {trimmed}; retrying the pass after {wait} s");
                r = pass();
            }
            _ => break,
        }
    }
    r
}

/// A CUDA out-of-memory error says where to go on from: the step of the last checkpoint in
/// `out` and the `--resume` that continues there (on the GPU, memory use grows over a long run
/// and can end it; a restarted process starts from a clean memory pool).
pub fn out_of_memory_hint(e: anyhow::Error, out: &Path) -> anyhow::Error {
    if !is_out_of_memory(&e) {
        return e;
    }
    let at = match read_checkpoint(out).map(|c| c.step) {
        Some(s) => format!("the last checkpoint in {} is step {s}: run the same command again with --resume to go on from there", out.display()),
        None => "no checkpoint was written yet (a smaller --micro-tokens, or --batch for sft, lowers the peak)".to_string(),
    };
    e.context(format!("the GPU ran out of memory; {at}"))
}

/// Draw the randomly initialised tensors (projector `fc*`, LoRA `lora_a`) from `seed`, in name
/// order, on every device: candle 0.11 cannot seed its CPU generator, and a run must be
/// repeatable. Weights ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's Linear default), biases 0.
fn seeded_init(varmap: &VarMap, seed: u64) -> Result<()> {
    let vars = varmap.data().lock().map_err(|_| anyhow::anyhow!("poisoned varmap"))?;
    let mut names: Vec<&String> = vars.keys().filter(|n| n.starts_with("fc") || n.ends_with(".lora_a")).collect();
    names.sort();
    let mut rng = Rng(seed ^ 0x5eed_1217);
    for n in names {
        let v = &vars[n];
        let dims = v.dims().to_vec();
        let vals: Vec<f32> = if n.ends_with(".bias") {
            vec![0.0; v.elem_count()]
        } else {
            let bound = 1.0 / (*dims.last().unwrap_or(&1) as f64).sqrt();
            (0..v.elem_count()).map(|_| ((rng.unit() * 2.0 - 1.0) * bound) as f32).collect()
        };
        v.set(&Tensor::from_vec(vals, dims, v.device())?.to_dtype(v.dtype())?)?;
    }
    Ok(())
}

/// Drop log lines past the checkpoint's step (written before a crash), so that a resumed run
/// logs every step once.
fn truncate_log(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let keep: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, keep)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Set the variables from a weights folder (projector.safetensors, encoder.safetensors if the
/// run trains encoder layers); encoder layers absent there keep the base model's values.
fn init_from_weights(varmap: &VarMap, dir: &Path) -> Result<()> {
    let vars = varmap.data().lock().map_err(|_| anyhow::anyhow!("poisoned varmap"))?;
    let mut loaded = HashMap::new();
    for (file, prefix) in [
        (crate::projector::FILE, ""),
        (crate::encoder::OVERRIDES_FILE, ENC_PREFIX),
        (crate::decoder::LORA_FILE, DEC_PREFIX),
    ] {
        let p = dir.join(file);
        if p.exists() {
            for (n, t) in candle_core::safetensors::load(&p, &Device::Cpu)
                .with_context(|| format!("{}: cannot load the starting weights", p.display()))?
            {
                loaded.insert(format!("{prefix}{n}"), t);
            }
        }
    }
    if !loaded.contains_key("fc1.weight") {
        bail!("{}: no {} to start from", dir.display(), crate::projector::FILE);
    }
    for (n, v) in vars.iter() {
        if let Some(t) = loaded.get(n) {
            let t = t.to_dtype(v.dtype())?.to_device(v.device())?;
            let t = grown_adapter(n, &t, v.as_tensor()).with_context(|| format!("{}: tensor {n}", dir.display()))?;
            v.set(&t).with_context(|| format!("{}: tensor {n} does not fit", dir.display()))?;
        }
    }
    Ok(())
}

/// A starting adapter of lower rank than the run's (`--decoder-lora`), grown to it: the stored
/// rows of A and columns of B first, the run's fresh A rows and zero B columns after, so that
/// B·A, and with it the starting model, is unchanged. Any other tensor is returned as it is.
fn grown_adapter(name: &str, stored: &Tensor, fresh: &Tensor) -> Result<Tensor> {
    let (rank_dim, is_b) = match name {
        n if n.ends_with(".lora_a") => (0, false),
        n if n.ends_with(".lora_b") => (1, true),
        _ => return Ok(stored.clone()),
    };
    let (have, want) = (stored.dim(rank_dim)?, fresh.dim(rank_dim)?);
    if have == want {
        return Ok(stored.clone());
    }
    if have > want {
        bail!("the starting adapters have rank {have}, more than --decoder-lora {want}");
    }
    let rest = fresh.narrow(rank_dim, have, want - have)?;
    let rest = if is_b { rest.zeros_like()? } else { rest };
    Ok(Tensor::cat(&[stored, &rest], rank_dim)?)
}

/// The run's variables under `prefix`, by their name without it (tensors share the variables'
/// storage, so gradients reach them).
fn vars_with_prefix(varmap: &VarMap, prefix: &str) -> Result<HashMap<String, Tensor>> {
    let vars = varmap.data().lock().map_err(|_| anyhow::anyhow!("poisoned varmap"))?;
    Ok(vars
        .iter()
        .filter_map(|(n, v)| n.strip_prefix(prefix).map(|n| (n.to_string(), v.as_tensor().clone())))
        .collect())
}

/// The chunk encoder with the run's trainable variables in place of its top layers.
fn trainable_encoder(varmap: &VarMap, base: &Encoder) -> Result<Encoder> {
    base.with_tensors(vars_with_prefix(varmap, ENC_PREFIX)?, "", crate::decoder::Ops::Differentiable)
}

/// The decoder with the run's adapters attached (itself when it has none).
fn trainable_decoder(varmap: &VarMap, base: &Decoder) -> Result<Decoder> {
    let mut d = base.clone();
    d.attach_lora(&vars_with_prefix(varmap, DEC_PREFIX)?)?;
    Ok(d)
}

/// The size limit of one shipped weights file.
const MAX_SHIPPED_BYTES: usize = 16_000_000;

/// Write the shipped files: projector (f32), trained encoder tensors (f16), decoder adapters
/// (f32, or f16 where f32 would pass `MAX_SHIPPED_BYTES`).
fn save_weights(varmap: &VarMap, out: &Path, input_scale: f64) -> Result<()> {
    let vars = varmap.data().lock().map_err(|_| anyhow::anyhow!("poisoned varmap"))?;
    let mut proj = HashMap::new();
    let mut enc = HashMap::new();
    let mut lora: HashMap<String, Tensor> = HashMap::new();
    for (n, v) in vars.iter() {
        if let Some(e) = n.strip_prefix(ENC_PREFIX) {
            enc.insert(e.to_string(), v.as_tensor().to_dtype(DType::F16)?);
        } else if let Some(d) = n.strip_prefix(DEC_PREFIX) {
            lora.insert(d.to_string(), v.as_tensor().clone());
        } else {
            proj.insert(n.clone(), v.as_tensor().clone());
        }
    }
    if input_scale != 1.0 {
        proj.insert(crate::projector::IN_SCALE.to_string(), Tensor::new(&[input_scale as f32], &Device::Cpu)?);
    }
    candle_core::safetensors::save(&proj, out.join(crate::projector::FILE))?;
    // adapters stay f32 while that fits the shipped files' size limit, else f16 (rank 16 and up)
    let lora_bytes: usize = lora.values().map(|t| t.elem_count() * 4).sum();
    if lora_bytes > MAX_SHIPPED_BYTES {
        lora = lora.into_iter().map(|(n, t)| Ok((n, t.to_dtype(DType::F16)?))).collect::<Result<_>>()?;
    }
    for (map, file) in [(enc, crate::encoder::OVERRIDES_FILE), (lora, crate::decoder::LORA_FILE)] {
        let p = out.join(file);
        if map.is_empty() {
            if p.exists() {
                std::fs::remove_file(&p)?;
            }
        } else {
            candle_core::safetensors::save(&map, p)?;
        }
    }
    Ok(())
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64)
}

fn projector_of(varmap: &VarMap, run: &TrainRun, cfg: &TrainConfig) -> Result<Projector> {
    let mut p = Projector::new(
        candle_nn::VarBuilder::from_varmap(varmap, DType::F32, &run.decoder.device),
        run.encoder.dim,
        run.decoder.cfg.hidden,
    )?;
    p.in_scale = cfg.input_scale;
    Ok(p)
}

fn train_loop(
    run: &TrainRun,
    cfg: &TrainConfig,
    varmap: VarMap,
    mut opt: AdamW,
    mut rng: Rng,
    start_step: usize,
    mut tokens_seen: u64,
) -> Result<serde_json::Value> {
    let dec = &trainable_decoder(&varmap, run.decoder)?;
    let proj = projector_of(&varmap, run, cfg)?;
    let enc = trainable_encoder(&varmap, run.encoder)?;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run.out.join("train.jsonl"))?;
    let pb = crate::progress::bar(run.quiet, cfg.steps as u64, "steps");
    pb.set_position(start_step as u64);
    let t0 = Instant::now();
    let mut step = start_step;
    let save = |step: usize, rng: Rng, tokens_seen: u64, opt: &AdamW| -> Result<()> {
        // weights and moments first, the JSON that points at them last (rename = atomic)
        varmap.save(run.out.join("checkpoint.safetensors"))?;
        opt.save(&run.out.join("optimizer.safetensors"))?;
        let ck = Checkpoint { step, rng, config: cfg.clone(), tokens_seen };
        let tmp = run.out.join("checkpoint.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&ck)?)?;
        std::fs::rename(&tmp, run.out.join("checkpoint.json"))?;
        Ok(())
    };
    while step < cfg.steps {
        let f = step as f64 / cfg.steps as f64;
        let ts = Instant::now();
        crate::profile::start(&dec.device);
        let retries_before = OOM_RETRIES.load(std::sync::atomic::Ordering::Relaxed);
        let mut grads = GradSum::default();
        let (lv, ntok, l, bsz, parts) = if let (Stage::Sft, Some(qa)) = (cfg.stage, run.qa) {
            let batch = qa.sample(cfg.batch.max(1), &mut rng);
            // the auxiliary reconstruction batch (--recon-weight), drawn before any pass runs
            let recon = (cfg.recon_weight > 0.0).then(|| recon_batch(run.train, dec, cfg, f, &mut rng)).transpose()?;
            let teacher = (cfg.distill > 0.0).then_some(run.teacher.unwrap_or(run.decoder));
            crate::profile::mark(&dec.device, "batch");
            // passes of tasks; each pass's loss is a mean over its answer tokens, weighted by
            // their share of the batch's (the step's loss is the mean over all answer tokens)
            let ntok: usize = batch.iter().map(|ex| ex.answer.len()).sum();
            let sizes: Vec<usize> = batch.iter().map(|ex| ex.tokens()).collect();
            let (mut lv, mut ce, mut kl) = (0.0, 0.0, 0.0);
            for r in passes(&sizes, run.micro_tokens) {
                let rng0 = rng;
                let (w, sce, skl) = with_oom_retry(&dec.device, || {
                    rng = rng0;
                    let sl = crate::sft::loss(dec, teacher, &enc, &proj, cfg.k, &batch[r.clone()], cfg.distill, cfg.mixed, &mut rng)?;
                    let w = sl.answer_tokens as f64 / ntok.max(1) as f64;
                    let g = (sl.total * w)?.backward()?;
                    crate::profile::mark(&dec.device, "backward");
                    opt.accumulate(&mut grads, &g)?;
                    crate::profile::mark(&dec.device, "accumulate");
                    Ok((w, sl.ce, sl.kl))
                })?;
                // a pass's total is ce + distill * kl (kl = 0 without a teacher)
                lv += (sce + cfg.distill * skl) * w;
                (ce, kl) = (ce + sce * w, kl + skl * w);
            }
            let mut parts = vec![("ce", ce), ("kl", kl)];
            if let Some(rb) = &recon {
                let (rl, r, _) = batch_backward(dec, &enc, &proj, &opt, &mut grads, rb, cfg.recon_weight, 0.0, run.micro_tokens)?;
                lv += rl;
                parts.push(("recon", r));
            }
            (lv, ntok, 0, batch.len(), parts)
        } else {
            let l = curriculum_chunks(cfg.max_chunks, f, &mut rng);
            let batch = make_batch(run.train, dec, cfg, l, &mut rng)?;
            let ntok: usize = batch.targets.iter().map(Vec::len).sum();
            // the auxiliary reconstruction batch is drawn before any pass runs (the draws'
            // order is the checkpointed random stream's)
            let recon = (cfg.stage == Stage::Cpt && cfg.recon_weight > 0.0).then(|| recon_batch(run.train, dec, cfg, f, &mut rng)).transpose()?;
            crate::profile::mark(&dec.device, "batch");
            let (mut lv, main, bow) =
                batch_backward(dec, &enc, &proj, &opt, &mut grads, &batch, 1.0, cfg.bow_weight, run.micro_tokens)?;
            let mut parts = vec![(if recon.is_some() { "cpt" } else { "main" }, main)];
            if let Some(rb) = &recon {
                let (rl, r, _) = batch_backward(dec, &enc, &proj, &opt, &mut grads, rb, cfg.recon_weight, 0.0, run.micro_tokens)?;
                lv += rl;
                parts.push(("recon", r));
            }
            match bow {
                Some(bw) => parts.push(("bow", bw)),
                None if recon.is_none() => parts.clear(),
                None => {}
            }
            (lv, ntok, l, batch.targets.len(), parts)
        };
        let lr = lr_at(cfg, step);
        let gnorm = opt.step_sum(&grads, lr, cfg.clip)?;
        drop(grads);
        crate::profile::mark(&dec.device, "optimizer");
        if !lv.is_finite() {
            bail!("loss became {lv} at step {step}; lower --lr");
        }
        tokens_seen += ntok as u64;
        step += 1;
        let tps = ntok as f64 / ts.elapsed().as_secs_f64();
        let mut rec = serde_json::json!({"step": step, "loss": lv, "lr": lr, "grad_norm": gnorm, "chunks": l,
            "batch": bsz, "tokens_per_s": tps, "tokens_seen": tokens_seen});
        for (name, v) in parts {
            rec[name] = v.into();
        }
        let retries = OOM_RETRIES.load(std::sync::atomic::Ordering::Relaxed) - retries_before;
        if retries > 0 {
            rec["oom_retries"] = retries.into();
        }
        if let Some(m) = crate::device::memory(&run.decoder.device) {
            rec["gpu_used_mb"] = m.used.round().into();
            rec["gpu_reserved_mb"] = m.reserved.round().into();
            rec["gpu_free_mb"] = m.free.round().into();
            rec["gpu_peak_used_mb"] = m.peak_used.round().into();
            rec["gpu_peak_reserved_mb"] = m.peak_reserved.round().into();
            if crate::device::trim_if_large(&run.decoder.device, &m) {
                rec["gpu_trimmed"] = true.into();
            }
        }
        crate::profile::mark(&dec.device, "log");
        if let Some(p) = crate::profile::take() {
            rec["profile_s"] = p;
        }
        writeln!(log, "{rec}")?;
        pb.set_position(step as u64);
        pb.set_message(format!("loss {lv:.3} L={l}"));
        let out_of_time = run.max_seconds.is_some_and(|m| t0.elapsed().as_secs_f64() > m);
        if step.is_multiple_of(cfg.checkpoint_every.max(1)) || step == cfg.steps || out_of_time {
            save(step, rng, tokens_seen, &opt)?;
            tracing::info!("checkpoint at step {step} (loss {lv:.3})");
        }
        if out_of_time && step < cfg.steps {
            pb.finish_and_clear();
            return Ok(serde_json::json!({"status": "paused", "step": step, "resume": "run again with --resume",
                "keep": format!("to write the weights as they are (no more steps): run again with --resume --steps {step}")}));
        }
    }
    pb.finish_and_clear();
    // Held-out scores at the largest L, for the card.
    let mut scores = serde_json::Map::new();
    if let (Stage::Sft, Some(h)) = (cfg.stage, run.qa_heldout) {
        scores.insert("qa".into(), crate::sft::heldout_nll(dec, run.decoder, &enc, &proj, cfg.k, h, 200)?);
    } else if let Some(h) = run.heldout {
        let mut r = Rng(cfg.seed ^ 0xabcdef);
        for l in stages(cfg.max_chunks) {
            let mut c = cfg.clone();
            c.tokens_per_step = c.tokens_per_step.min(4096);
            c.mixed = 0.0;
            let b = make_batch(h, dec, &c, l, &mut r)?;
            let loss = batch_loss(dec, &enc, &proj, &b, false)?.0.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            let (acc, other) = if cfg.stage == Stage::Reconstruct {
                (Some(batch_accuracy(dec, &enc, &proj, &b, false)?), Some(batch_accuracy(dec, &enc, &proj, &b, true)?))
            } else {
                (None, None)
            };
            scores.insert(format!("chunks_{l}"), serde_json::json!({"nll": loss, "token_accuracy": acc, "token_accuracy_other_vectors": other}));
        }
    }
    save_weights(&varmap, run.out, cfg.input_scale)?;
    let card = serde_json::json!({
        "what": format!(
            "REFRAG projector (chunk vector -> decoder embedding){}",
            if cfg.encoder_layers > 0 { format!(" and the top {} chunk-encoder layers", cfg.encoder_layers) } else { String::new() }
        ) + &if cfg.decoder_lora > 0 { format!(", with rank-{} LoRA adapters on the decoder", cfg.decoder_lora) } else { "; decoder frozen".into() },
        "stage": cfg.stage,
        "k": cfg.k,
        "config": cfg,
        "steps": step,
        "tokens_seen": tokens_seen,
        "decoder_tokenizer": dec.tokenizer_id,
        "encoder": run.encoder.id,
        "data": run.data_note,
        "question_at": (cfg.stage == Stage::Sft).then(crate::prompt::question_at),
        "heldout": scores,
        "seconds_this_run": t0.elapsed().as_secs_f64(),
    });
    std::fs::write(run.out.join("card.json"), serde_json::to_vec_pretty(&card)?)?;
    Ok(card)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_rank_adapters_grow_without_changing_the_model() {
        let dev = Device::Cpu;
        let a8 = Tensor::randn(0f32, 1.0, (8, 6), &dev).unwrap();
        let b8 = Tensor::randn(0f32, 1.0, (5, 8), &dev).unwrap();
        let (a16, b16) = (Tensor::randn(0f32, 1.0, (16, 6), &dev).unwrap(), Tensor::ones((5, 16), DType::F32, &dev).unwrap());
        let a = grown_adapter("blk.0.attn_q.lora_a", &a8, &a16).unwrap();
        let b = grown_adapter("blk.0.attn_q.lora_b", &b8, &b16).unwrap();
        assert_eq!((a.dims(), b.dims()), (&[16, 6][..], &[5, 16][..]));
        let diff = (b.matmul(&a).unwrap() - b8.matmul(&a8).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        // the new rows of A are the run's own (trainable from the start), not zeros
        assert!(a.narrow(0, 8, 8).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
        assert!(grown_adapter("blk.0.attn_q.lora_a", &a16, &a8).is_err(), "a rank cannot shrink");
        let w = Tensor::ones((3, 3), DType::F32, &dev).unwrap();
        assert_eq!(grown_adapter("fc1.weight", &w, &w).unwrap().dims(), &[3, 3]);
    }

    #[test]
    fn an_out_of_memory_pass_runs_again_and_other_errors_do_not() {
        let dev = candle_core::Device::Cpu;
        let oom = || anyhow::anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")");
        let retries = OOM_RETRIES.load(std::sync::atomic::Ordering::Relaxed);
        let mut calls = 0;
        let r = with_oom_retry(&dev, || {
            calls += 1;
            if calls == 1 { Err(oom()) } else { Ok(7) }
        });
        assert_eq!((r.unwrap(), calls), (7, 2));
        // (no waits here: the real ones are seconds long)
        let mut calls = 0;
        let r = oom_retry_waiting(&dev, &[0, 0, 0], || {
            calls += 1;
            if calls < 3 { Err(oom()) } else { Ok(8) }
        });
        assert_eq!((r.unwrap(), calls), (8, 3));
        let mut calls = 0;
        let r: Result<()> = oom_retry_waiting(&dev, &[0, 0, 0], || {
            calls += 1;
            Err(oom())
        });
        assert!(is_out_of_memory(&r.unwrap_err()) && calls == 4);
        let mut calls = 0;
        let r: Result<()> = with_oom_retry(&dev, || {
            calls += 1;
            bail!("shape mismatch")
        });
        assert!(r.is_err() && calls == 1);
        // counted for train.jsonl: the 1 + 2 + 3 out-of-memory retries above (no other test
        // runs out)
        assert_eq!(OOM_RETRIES.load(std::sync::atomic::Ordering::Relaxed) - retries, 6);
    }

    /// The flat update is AdamW per variable, written out here one variable at a time; a
    /// variable without a gradient keeps its value and moments; the moments survive save/load.
    #[test]
    fn flat_adamw_matches_a_per_variable_update_and_resumes() {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let shapes: [&[usize]; 3] = [&[3, 4], &[5], &[2, 2, 2]];
        for (i, sh) in shapes.iter().enumerate() {
            varmap.get(*sh, &format!("v{i}"), candle_nn::Init::Randn { mean: 0.0, stdev: 1.0 }, DType::F32, &dev).unwrap();
        }
        let vars: Vec<Var> = (0..3).map(|i| varmap.data().lock().unwrap()[&format!("v{i}")].clone()).collect();
        let mut opt = AdamW::new(&varmap, 0.01).unwrap();
        // reference state: weights and moments per variable
        let mut w: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().copy().unwrap()).collect();
        let mut m: Vec<Tensor> = w.iter().map(|t| t.zeros_like().unwrap()).collect();
        let mut vv = m.clone();
        let (b1, b2, eps, wd, lr, clip) = (0.9f64, 0.999f64, 1e-8, 0.01, 0.1, 1.0);
        let dir = std::env::temp_dir().join(format!("refrag-adamw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for step in 1..=4 {
            let grads: Vec<Option<Tensor>> = shapes
                .iter()
                .enumerate()
                .map(|(i, sh)| (step != 2 || i != 1).then(|| Tensor::randn(0f32, 2.0, *sh, &dev).unwrap()))
                .collect();
            let norm = opt.step_sum(&GradSum(grads.clone()), lr, clip).unwrap();
            let sq: f32 = grads.iter().flatten().map(|g| g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()).sum();
            assert!((norm - (sq as f64).sqrt()).abs() < 1e-4 * norm);
            let scale = if norm > clip { clip / norm } else { 1.0 };
            let (bc1, bc2) = (1.0 - b1.powi(step), 1.0 - b2.powi(step));
            for i in 0..3 {
                let Some(g) = &grads[i] else { continue };
                let g = (g * scale).unwrap();
                m[i] = ((&m[i] * b1).unwrap() + (&g * (1.0 - b1)).unwrap()).unwrap();
                vv[i] = ((&vv[i] * b2).unwrap() + (g.sqr().unwrap() * (1.0 - b2)).unwrap()).unwrap();
                let upd = ((&m[i] / bc1).unwrap() / ((&vv[i] / bc2).unwrap().sqrt().unwrap() + eps).unwrap()).unwrap();
                w[i] = ((&w[i] * (1.0 - lr * wd)).unwrap() - (upd * lr).unwrap()).unwrap();
            }
            for i in 0..3 {
                let d = (vars[i].as_tensor() - &w[i]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(d < 1e-5, "step {step} variable {i}: {d}");
            }
            if step == 2 {
                // a fresh optimizer from the saved moments carries on identically
                opt.save(&dir.join("opt.safetensors")).unwrap();
                let mut again = AdamW::new(&varmap, 0.01).unwrap();
                again.load(&dir.join("opt.safetensors"), &dev).unwrap();
                again.step = opt.step;
                opt = again;
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn curriculum_moves_from_one_chunk_to_many() {
        assert_eq!(stages(16), vec![1, 2, 4, 8, 16]);
        let mut r = Rng(7);
        let early: Vec<usize> = (0..200).map(|_| curriculum_chunks(16, 0.0, &mut r)).collect();
        assert!(early.iter().all(|&l| l == 1));
        let late: Vec<usize> = (0..2000).map(|_| curriculum_chunks(16, 0.99, &mut r)).collect();
        let share16 = late.iter().filter(|&&l| l == 16).count() as f64 / late.len() as f64;
        assert!((share16 - 16.0 / 31.0).abs() < 0.05, "{share16}");
        assert!(late.contains(&1));
    }

    fn small_config() -> TrainConfig {
        TrainConfig {
            stage: Stage::Reconstruct, k: 16, steps: 100, tokens_per_step: 1, max_chunks: 1,
            predict_tokens: 1, mixed: 0.0, lr: 1e-3, warmup: 0.04, weight_decay: 0.0, clip: 1.0,
            seed: 1, checkpoint_every: 10, encoder_layers: 0, decoder_lora: 0, distill: 0.0, batch: 0,
            recon_weight: 0.0, bow_weight: 0.0, input_scale: 1.0, teacher_weights: None,
        }
    }

    #[test]
    fn out_of_memory_names_the_checkpoint_to_resume() {
        let dir = std::env::temp_dir().join(format!("refrag-oom-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let oom = || anyhow::anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")");
        let msg = format!("{:#}", out_of_memory_hint(oom(), &dir));
        assert!(msg.contains("no checkpoint") && msg.contains("OUT_OF_MEMORY"), "{msg}");
        let ck = Checkpoint { step: 140, rng: Rng(3), config: small_config(), tokens_seen: 9 };
        std::fs::write(dir.join("checkpoint.json"), serde_json::to_vec(&ck).unwrap()).unwrap();
        let msg = format!("{:#}", out_of_memory_hint(oom(), &dir));
        assert!(msg.contains("step 140") && msg.contains("--resume"), "{msg}");
        // other errors pass unchanged
        assert_eq!(format!("{:#}", out_of_memory_hint(anyhow::anyhow!("bad file"), &dir)), "bad file");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn passes_cover_every_row_once_within_the_token_budget() {
        let row = |i: u32| vec![i; 48];
        let b = Batch {
            chunk_texts: (0..10).map(|i| format!("c{i}")).collect(),
            keep: vec![false, true],
            contexts: (0..5).map(|i| row(i)[..32].to_vec()).collect(),
            targets: (0..5).map(|i| row(i)[..16].to_vec()).collect(),
            l: 2,
        };
        assert_eq!(b.passes(0), vec![0..5]);
        assert_eq!(b.passes(100), vec![0..2, 2..4, 4..5]);
        assert_eq!(b.passes(10), (0..5).map(|i| i..i + 1).collect::<Vec<_>>(), "at least one row each");
        assert_eq!(passes(&[3, 9, 2, 2, 5], 10), vec![0..1, 1..2, 2..5]);
        assert!(passes(&[], 10).is_empty());
        let p = b.rows(2..4);
        assert_eq!(p.chunk_texts, ["c4", "c5", "c6", "c7"]);
        assert_eq!((p.contexts[0][0], p.targets[1][0], p.keep.clone(), p.l), (2, 3, vec![false, true], 2));
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let cfg = small_config();
        assert!(lr_at(&cfg, 0) < lr_at(&cfg, 3));
        assert!((lr_at(&cfg, 4) - 1e-3).abs() < 1e-9);
        assert!(lr_at(&cfg, 99) < 2e-4 && lr_at(&cfg, 99) >= 1e-4 - 1e-12);
    }
}
