//! `refrag train policy`: the expansion policy learns with a GRPO-style group baseline and PPO
//! clipping, the reward being the negative log-perplexity of the tokens that follow the context
//! (the paper's recipe) or of a question's reference answer.

use crate::model::compressor::Compressor;
use crate::model::decoder::Decoder;
use crate::model::encoder::Encoder;
use crate::model::policy::{start_from_sim, top_mask, PolicyConfig, PolicyNet, POLICY_CARD, POLICY_FILE};
use crate::options::QuestionAt;
use crate::read::policy::mixed_prefix;
use crate::rng::Rng;
use crate::train::data::TextPool;
use crate::train::optim::AdamW;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use candle_nn::{VarBuilder, VarMap};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

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

/// What the policy learns from.
pub enum Episodes<'a> {
    /// Windows of text: s tokens compressed, reward = -log-perplexity of the o tokens after them
    /// (the paper's recipe; a conditioned policy reads the first target tokens as its query).
    Text(&'a TextPool),
    /// Question tasks (`refrag dataset ... --tasks`): the passages compressed, reward =
    /// -log-perplexity of the reference answer read after the question, exactly as `ask` builds
    /// the input; a conditioned policy reads the question's retrieval vector, as at ask time.
    Tasks(&'a crate::train::sft::QaPool),
}

pub struct PolicyTrain<'a> {
    /// The decoder that reads compressed input (adapters folded in).
    pub decoder: &'a Decoder,
    /// The trained chunk encoder and projector whose vectors the policy reads.
    pub compressor: Compressor<'a>,
    /// The retrieval encoder: makes the query vector as `ask` does for a question.
    pub query_encoder: &'a Encoder,
    pub episodes: Episodes<'a>,
    /// Where a task's question goes (as the weights were trained).
    pub question_at: QuestionAt,
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

/// `group` sequences of `want` chunks sampled from the logits, and their masks over the chunks.
fn sample_group(logits: &[f64], want: usize, group: usize, rng: &mut Rng) -> (Vec<Vec<usize>>, Vec<Vec<bool>>) {
    let mut seqs = Vec::with_capacity(group);
    let mut masks = Vec::with_capacity(group + 1);
    for _ in 0..group {
        let seq = sample_sequence(logits, want, rng);
        let mut mask = vec![false; logits.len()];
        for &i in &seq {
            mask[i] = true;
        }
        seqs.push(seq);
        masks.push(mask);
    }
    (seqs, masks)
}

/// The PPO loss of a group: minus the mean over its sequences of min(ratio x advantage,
/// clip(ratio) x advantage), the ratio against the sequences' log-probabilities when sampled.
fn clipped_objective(logits: &Tensor, seqs: &[Vec<usize>], adv: &[f64], old: &[f64], clip_eps: f64) -> Result<Tensor> {
    let mut terms = Vec::new();
    for ((s, &a), &o) in seqs.iter().zip(adv).zip(old) {
        let ratio = (sequence_logprob(logits, s)? - o)?.exp()?;
        let clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)?;
        terms.push((ratio * a)?.minimum(&(clipped * a)?)?);
    }
    Ok((Tensor::stack(&terms, 0)?.mean_all()? * -1.0)?)
}

/// One context to learn from: its chunk vectors, the query, chunks per passage, and the reward
/// of any expansion mask.
struct Episode<'a> {
    vecs: Tensor,
    query: Option<Tensor>,
    sizes: Vec<usize>,
    reward: RewardFn<'a>,
}

/// The next episode: a window of text (reward: the next tokens' log-perplexity) or a question
/// task (reward: the reference answer's); with `condition`, the query the policy reads.
fn episode<'a>(run: &'a PolicyTrain, cfg: &PolicyTrainConfig, condition: bool, rng: &mut Rng) -> Result<Episode<'a>> {
    let (dec, comp) = (run.decoder, run.compressor);
    let encode_query = |text: &str| -> Result<Option<Tensor>> {
        if !condition {
            return Ok(None);
        }
        Ok(Some(run.query_encoder.encode(&[text])?.to_device(&dec.device)?.squeeze(0)?))
    };
    match run.episodes {
        Episodes::Text(pool) => {
            let window = pool.window(cfg.s + cfg.o, rng);
            let (ctx, tgt) = (&window[..cfg.s], &window[cfg.s..]);
            let vecs = comp.vectors(dec, &[ctx])?.context("a window without chunks")?;
            let projected = comp.project(&vecs)?;
            let q = dec
                .tokenizer
                .decode(&tgt[..cfg.query_tokens.min(tgt.len())], false)
                .map_err(|e| anyhow::anyhow!("decode: {e}"))?;
            let reward = move |masks: &[Vec<bool>]| -> Result<Vec<f64>> {
                let prefix = |m: &Vec<bool>| mixed_prefix(dec, ctx, comp.k, &projected, m);
                masks.iter().map(|m| Ok(-crate::read::score::nll_after(dec, &prefix(m)?, tgt)?)).collect()
            };
            let n = vecs.dim(0)?;
            Ok(Episode { query: encode_query(&q)?, vecs, sizes: vec![n], reward: Box::new(reward) })
        }
        Episodes::Tasks(pool) => {
            let ex = pool.sample(1, rng)[0];
            let task = crate::train::sft::EncodedTask::new(dec, &comp, run.question_at, ex)?;
            let (vecs, sizes) = (task.raw.clone(), task.sizes.clone());
            let reward = move |masks: &[Vec<bool>]| -> Result<Vec<f64>> {
                let items = masks
                    .iter()
                    .map(|m| Ok((task.prompt(comp.k, m)?, task.ex.answer.as_slice())))
                    .collect::<Result<Vec<_>>>()?;
                Ok(crate::read::score::answer_nll(dec, &items)?.into_iter().map(|x| -x).collect())
            };
            Ok(Episode { vecs, query: encode_query(&ex.question)?, sizes, reward: Box::new(reward) })
        }
    }
}

/// Train the policy (GRPO group baseline + PPO clipping); writes policy.safetensors/json.
/// The reward of each expansion mask of a group (one context).
type RewardFn<'a> = Box<dyn Fn(&[Vec<bool>]) -> Result<Vec<f64>> + 'a>;

pub fn train(run: &PolicyTrain, net_cfg: PolicyConfig, cfg: &PolicyTrainConfig) -> Result<serde_json::Value> {
    let dec = run.decoder;
    let comp = run.compressor;
    let device = &dec.device;
    if (matches!(run.episodes, Episodes::Text(_)) && !cfg.s.is_multiple_of(comp.k)) || cfg.group < 2 {
        bail!("--s must be a multiple of k and --group at least 2");
    }
    std::fs::create_dir_all(run.out).with_context(|| format!("{}: cannot create", run.out.display()))?;
    let varmap = VarMap::new();
    let net = PolicyNet::new(net_cfg.clone(), VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    if net.interacts() {
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
            "k": comp.k,
            "chunk_encoder": comp.encoder.id(),
            "query_encoder": run.query_encoder.id,
            "decoder_tokenizer": dec.tokenizer_id,
            "data": run.data_note,
            "question_at": matches!(run.episodes, Episodes::Tasks(_)).then_some(run.question_at),
            "greedy_minus_group_mean_reward_last50": r.iter().sum::<f64>() / r.len().max(1) as f64,
            "seconds": t0.elapsed().as_secs_f64(),
        });
        let tmp = run.out.join(format!("{POLICY_CARD}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(&card)?)?;
        std::fs::rename(&tmp, run.out.join(POLICY_CARD))?;
        Ok(card)
    };
    for step in 0..cfg.steps {
        let Episode { vecs, query, sizes, reward } = episode(run, cfg, net_cfg.condition, &mut rng)?;
        let n = vecs.dim(0)?;
        let want = ((cfg.expand * n as f64).round() as usize).clamp(1, n);
        let logits = net.logits(&vecs, query.as_ref(), &sizes)?;
        let lv: Vec<f64> = logits.to_vec1::<f32>()?.iter().map(|&x| x as f64).collect();
        let (seqs, mut masks) = sample_group(&lv, want, cfg.group, &mut rng);
        // the policy's own greedy pick is scored with the group (against the group's mean: a
        // random-like baseline), but does not enter the update
        masks.push(top_mask(&lv, want));
        let mut rewards = reward(&masks)?;
        let g = rewards.pop().expect("the greedy pick's reward");
        let mean = rewards.iter().sum::<f64>() / rewards.len() as f64;
        let sd = (rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / rewards.len() as f64).sqrt();
        let adv: Vec<f64> = rewards.iter().map(|r| (r - mean) / (sd + 1e-4)).collect();
        let old: Vec<f64> =
            seqs.iter().map(|s| Ok(sequence_logprob(&logits, s)?.to_scalar::<f32>()? as f64)).collect::<Result<_>>()?;
        for _ in 0..cfg.epochs {
            let logits = net.logits(&vecs, query.as_ref(), &sizes)?;
            let grads = clipped_objective(&logits, &seqs, &adv, &old, cfg.clip_eps)?.backward()?;
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
        writeln!(
            log,
            "{}",
            serde_json::json!({"step": step + 1, "reward_mean": mean, "reward_sd": sd, "greedy_minus_mean": g - mean})
        )?;
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
    use candle_core::Device;

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
}
