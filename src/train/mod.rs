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

pub mod policy;
pub mod sft;

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod loss;
pub mod oom;
pub mod optim;
#[cfg(test)]
mod tests;

use crate::model::decoder::TRAIN_LAYER_POSITIONS;
use checkpoint::{
    init_from_weights, save_weights, seeded_init, trainable_decoder, trainable_encoder, truncate_log, Checkpoint,
};
pub use config::{Stage, TrainConfig};
use config::{DEC_PREFIX, ENC_PREFIX, GROWN_PREFIX};
use data::{curriculum_chunks, make_batch, passes, recon_batch, stages, TextPool};
use loss::{batch_accuracy, batch_backward, batch_loss};
use oom::{with_oom_retry, OOM_RETRIES};
use optim::{lr_at, AdamW, GradSum};

use crate::model::compressor::Compressor;
use crate::model::decoder::Decoder;
use crate::model::encoder::Encoder;
use crate::model::projector::Projector;
use crate::options::QuestionAt;
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Var};
use candle_nn::VarMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

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
    pub qa: Option<&'a crate::train::sft::QaPool>,
    pub qa_heldout: Option<&'a crate::train::sft::QaPool>,
    /// sft: the distillation teacher (None: the base decoder, `decoder`).
    pub teacher: Option<&'a Decoder>,
    /// sft: where a task's question goes (written into the card).
    pub question_at: QuestionAt,
}

/// Train, checkpointing into `out`; writes `projector.safetensors` and `card.json` at the end.
pub fn train(run: &TrainRun, cfg: &TrainConfig) -> Result<serde_json::Value> {
    let dec = run.decoder;
    let device = &dec.device;
    std::fs::create_dir_all(run.out).with_context(|| format!("{}: cannot create", run.out.display()))?;
    let ck_path = run.out.join("checkpoint.json");
    let mut varmap = VarMap::new();
    Projector::init(&varmap, device, chunk_dim(run, cfg), dec.cfg.hidden)?; // creates the variables
    if cfg.encoder_layers > run.encoder.layers {
        bail!("--encoder-layers {}: the encoder has {} layers", cfg.encoder_layers, run.encoder.layers);
    }
    if cfg.chunk_layers > dec.cfg.n_layer {
        bail!("--chunk-layers {}: the decoder has {} layers", cfg.chunk_layers, dec.cfg.n_layer);
    }
    if cfg.chunk_layers > 0 && cfg.encoder_layers > 0 {
        bail!("--encoder-layers trains MiniLM layers: give 0 with --chunk-layers (the chunk encoder grown from the decoder)");
    }
    {
        let mut vars = varmap.data().lock().map_err(|_| anyhow::anyhow!("poisoned varmap"))?;
        for n in run.encoder.layer_tensor_names(run.encoder.layers - cfg.encoder_layers..) {
            let t = run.encoder.tensor(&n)?.to_device(device)?;
            vars.insert(format!("{ENC_PREFIX}{n}"), Var::from_tensor(&t)?);
        }
        let mut adapters = |prefix: &str, r: usize, layers: usize| -> Result<()> {
            if r == 0 {
                return Ok(());
            }
            for (n, o, i) in dec.lora_shapes() {
                let layer = n.strip_prefix("blk.").and_then(|x| x.split_once('.')).and_then(|(l, _)| l.parse().ok());
                if layer.is_some_and(|l: usize| l >= layers) {
                    continue;
                }
                let a = Var::randn(0f32, (1.0 / (i as f64).sqrt()) as f32, (r, i), device)?;
                vars.insert(format!("{prefix}{n}.lora_a"), a);
                vars.insert(format!("{prefix}{n}.lora_b"), Var::zeros((o, r), DType::F32, device)?);
            }
            Ok(())
        };
        adapters(DEC_PREFIX, cfg.decoder_lora, dec.cfg.n_layer)?;
        if cfg.chunk_layers > 0 {
            adapters(GROWN_PREFIX, cfg.chunk_lora, cfg.chunk_layers)?;
        }
    }
    seeded_init(&varmap, cfg.seed)?;
    let (mut rng, mut start_step, mut tokens_seen) = (Rng(cfg.seed), 0, 0u64);
    let resume = run.resume && ck_path.exists();
    if resume {
        let ck: Checkpoint = serde_json::from_slice(&std::fs::read(&ck_path)?)
            .with_context(|| format!("{}: unreadable checkpoint", ck_path.display()))?;
        if ck.config.stage != cfg.stage
            || ck.config.k != cfg.k
            || ck.config.encoder_layers != cfg.encoder_layers
            || ck.config.decoder_lora != cfg.decoder_lora
            || ck.config.chunk_layers != cfg.chunk_layers
            || ck.config.chunk_lora != cfg.chunk_lora
            || ck.config.input_scale != cfg.input_scale
        {
            bail!("{}: checkpoint is for another stage, k, --encoder-layers, --decoder-lora, --chunk-layers, --chunk-lora or --input-scale; use a new --out", ck_path.display());
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

/// One optimizer step's share of the work: the run, the trainable decoder and compressor, and
/// how far the run is (`f`, for the curriculum).
struct Step<'s, 'a> {
    run: &'s TrainRun<'a>,
    cfg: &'s TrainConfig,
    dec: &'s Decoder,
    comp: &'s Compressor<'s>,
    f: f64,
}

/// What a step did, for the log: the loss, target tokens, chunks per sample (0 for sft), rows,
/// and the loss terms.
struct StepOut {
    loss: f64,
    tokens: usize,
    chunks: usize,
    batch: usize,
    parts: Vec<(&'static str, f64)>,
}

impl Step<'_, '_> {
    /// An sft step: a batch of tasks in passes (each pass's loss a mean over its answer tokens,
    /// weighted by their share of the batch's), plus the reconstruction term with --recon-weight.
    fn sft(&self, qa: &sft::QaPool, opt: &AdamW, grads: &mut GradSum, rng: &mut Rng) -> Result<StepOut> {
        let (run, cfg, dec, comp) = (self.run, self.cfg, self.dec, self.comp);
        let batch = qa.sample(cfg.batch.max(1), rng);
        // the auxiliary reconstruction batch (--recon-weight), drawn before any pass runs
        let recon = (cfg.recon_weight > 0.0).then(|| recon_batch(run.train, cfg, self.f, rng)).transpose()?;
        let teacher = (cfg.distill > 0.0).then_some(run.teacher.unwrap_or(run.decoder));
        crate::profile::mark(&dec.device, "batch");
        let ntok: usize = batch.iter().map(|ex| ex.answer.len()).sum();
        let sizes: Vec<usize> = batch.iter().map(|ex| ex.tokens()).collect();
        let (mut lv, mut ce, mut kl) = (0.0, 0.0, 0.0);
        for r in passes(&sizes, run.micro_tokens) {
            let rng0 = *rng;
            let (w, sce, skl) = with_oom_retry(&dec.device, || {
                *rng = rng0;
                let sl =
                    sft::loss(dec, teacher, comp, run.question_at, &batch[r.clone()], cfg.distill, cfg.mixed, rng)?;
                let w = sl.answer_tokens as f64 / ntok.max(1) as f64;
                let g = (sl.total * w)?.backward()?;
                crate::profile::mark(&dec.device, "backward");
                opt.accumulate(grads, &g)?;
                crate::profile::mark(&dec.device, "accumulate");
                Ok((w, sl.ce, sl.kl))
            })?;
            // a pass's total is ce + distill * kl (kl = 0 without a teacher)
            lv += (sce + cfg.distill * skl) * w;
            (ce, kl) = (ce + sce * w, kl + skl * w);
        }
        let mut parts = vec![("ce", ce), ("kl", kl)];
        if let Some(rb) = &recon {
            let (rl, r, _) = batch_backward(dec, comp, opt, grads, rb, cfg.recon_weight, 0.0, run.micro_tokens)?;
            lv += rl;
            parts.push(("recon", r));
        }
        Ok(StepOut { loss: lv, tokens: ntok, chunks: 0, batch: batch.len(), parts })
    }

    /// A reconstruct or cpt step: a batch of windows at the curriculum's number of chunks, plus
    /// in cpt the reconstruction term with --recon-weight.
    fn text(&self, opt: &AdamW, grads: &mut GradSum, rng: &mut Rng) -> Result<StepOut> {
        let (run, cfg, dec, comp) = (self.run, self.cfg, self.dec, self.comp);
        let l = curriculum_chunks(cfg.max_chunks, self.f, rng);
        let batch = make_batch(run.train, cfg, l, rng)?;
        let ntok: usize = batch.targets.iter().map(Vec::len).sum();
        // the auxiliary reconstruction batch is drawn before any pass runs (the draws' order is
        // the checkpointed random stream's)
        let recon = (cfg.stage == Stage::Cpt && cfg.recon_weight > 0.0)
            .then(|| recon_batch(run.train, cfg, self.f, rng))
            .transpose()?;
        crate::profile::mark(&dec.device, "batch");
        let (mut lv, main, bow) = batch_backward(dec, comp, opt, grads, &batch, 1.0, cfg.bow_weight, run.micro_tokens)?;
        let mut parts = vec![(if recon.is_some() { "cpt" } else { "main" }, main)];
        if let Some(rb) = &recon {
            let (rl, r, _) = batch_backward(dec, comp, opt, grads, rb, cfg.recon_weight, 0.0, run.micro_tokens)?;
            lv += rl;
            parts.push(("recon", r));
        }
        match bow {
            Some(bw) => parts.push(("bow", bw)),
            None if recon.is_none() => parts.clear(),
            None => {}
        }
        Ok(StepOut { loss: lv, tokens: ntok, chunks: l, batch: batch.targets.len(), parts })
    }
}

/// Held-out scores for the card: sft's answer NLL, or the text stages' loss (and for
/// reconstruction the token accuracy, own vectors and another row's) at each curriculum stage.
fn heldout_scores(
    run: &TrainRun,
    cfg: &TrainConfig,
    dec: &Decoder,
    comp: &Compressor,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut scores = serde_json::Map::new();
    if let (Stage::Sft, Some(h)) = (cfg.stage, run.qa_heldout) {
        scores.insert("qa".into(), sft::heldout_nll(dec, run.decoder, comp, run.question_at, h, 200)?);
    } else if let Some(h) = run.heldout {
        let mut r = Rng(cfg.seed ^ 0xabcdef);
        for l in stages(cfg.max_chunks) {
            let mut c = cfg.clone();
            c.tokens_per_step = c.tokens_per_step.min(4096);
            c.mixed = 0.0;
            let b = make_batch(h, &c, l, &mut r)?;
            let loss = batch_loss(dec, comp, &b, false)?.0.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            let (acc, other) = if cfg.stage == Stage::Reconstruct {
                (Some(batch_accuracy(dec, comp, &b, false)?), Some(batch_accuracy(dec, comp, &b, true)?))
            } else {
                (None, None)
            };
            scores.insert(
                format!("chunks_{l}"),
                serde_json::json!({"nll": loss, "token_accuracy": acc, "token_accuracy_other_vectors": other}),
            );
        }
    }
    Ok(scores)
}

/// The GPU's memory after a step in the step's log record, trimming the pool when it holds too
/// much (nothing on CPU).
fn log_device_memory(device: &candle_core::Device, rec: &mut serde_json::Value) {
    if let Some(m) = crate::device::memory(device) {
        rec["gpu_used_mb"] = m.used.round().into();
        rec["gpu_reserved_mb"] = m.reserved.round().into();
        rec["gpu_free_mb"] = m.free.round().into();
        rec["gpu_peak_used_mb"] = m.peak_used.round().into();
        rec["gpu_peak_reserved_mb"] = m.peak_reserved.round().into();
        if crate::device::trim_if_large(device, &m) {
            rec["gpu_trimmed"] = true.into();
        }
    }
}

/// The card written beside the trained weights: what they are, how and on what they were
/// trained, and their held-out scores.
fn card(
    run: &TrainRun,
    cfg: &TrainConfig,
    dec: &Decoder,
    steps: usize,
    tokens_seen: u64,
    scores: serde_json::Map<String, serde_json::Value>,
    seconds: f64,
) -> serde_json::Value {
    let encoder_part = match (cfg.chunk_layers, cfg.encoder_layers) {
        (n, _) if n > 0 => format!(
            " and a chunk encoder grown from the decoder's first {n} layers (rank-{} LoRA adapters)",
            cfg.chunk_lora
        ),
        (_, n) if n > 0 => format!(" and the top {n} chunk-encoder layers"),
        _ => String::new(),
    };
    let decoder_part = if cfg.decoder_lora > 0 {
        format!(", with rank-{} LoRA adapters on the decoder", cfg.decoder_lora)
    } else {
        "; decoder frozen".into()
    };
    serde_json::json!({
        "what": format!("REFRAG projector (chunk vector -> decoder embedding){encoder_part}{decoder_part}"),
        "stage": cfg.stage,
        "k": cfg.k,
        "chunk_encoder": (cfg.chunk_layers > 0)
            .then(|| serde_json::json!({"from": "decoder", "layers": cfg.chunk_layers, "lora": cfg.chunk_lora})),
        "config": cfg,
        "steps": steps,
        "tokens_seen": tokens_seen,
        "decoder_tokenizer": dec.tokenizer_id,
        "encoder": run.encoder.id,
        "data": run.data_note,
        "question_at": (cfg.stage == Stage::Sft).then_some(run.question_at),
        "recon_marker": cfg.recon_marker.then_some(true),
        "heldout": scores,
        "seconds_this_run": seconds,
    })
}

/// The size of the run's chunk vectors: the decoder's hidden size for a grown chunk encoder,
/// else MiniLM's.
fn chunk_dim(run: &TrainRun, cfg: &TrainConfig) -> usize {
    if cfg.chunk_layers > 0 {
        run.decoder.cfg.hidden
    } else {
        run.encoder.dim
    }
}

/// The projector over the run's variables, reading chunk vectors at the configured scale.
fn projector_of(varmap: &VarMap, run: &TrainRun, cfg: &TrainConfig) -> Result<Projector> {
    let mut p = Projector::new(
        candle_nn::VarBuilder::from_varmap(varmap, DType::F32, &run.decoder.device),
        chunk_dim(run, cfg),
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
    let enc = trainable_encoder(&varmap, cfg, run.encoder, run.decoder)?;
    let comp = Compressor::new(&enc, &proj, cfg.k);
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(run.out.join("train.jsonl"))?;
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
        let layer_positions_before = TRAIN_LAYER_POSITIONS.load(std::sync::atomic::Ordering::Relaxed);
        let mut grads = GradSum::default();
        let st = Step { run, cfg, dec, comp: &comp, f };
        let StepOut { loss: lv, tokens: ntok, chunks: l, batch: bsz, parts } = match (cfg.stage, run.qa) {
            (Stage::Sft, Some(qa)) => st.sft(qa, &opt, &mut grads, &mut rng)?,
            _ => st.text(&opt, &mut grads, &mut rng)?,
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
        let secs = ts.elapsed().as_secs_f64();
        // whole-decoder equivalents: a chunk encoder's position through 8 layers counts 8/30
        let layer_positions = TRAIN_LAYER_POSITIONS.load(std::sync::atomic::Ordering::Relaxed) - layer_positions_before;
        let positions = layer_positions as f64 / dec.cfg.n_layer.max(1) as f64;
        let mut rec = serde_json::json!({"step": step, "loss": lv, "lr": lr, "grad_norm": gnorm, "chunks": l,
            "batch": bsz, "tokens_per_s": ntok as f64 / secs, "tokens_seen": tokens_seen,
            "positions_per_s": (positions / secs).round()});
        for (name, v) in parts {
            rec[name] = v.into();
        }
        let retries = OOM_RETRIES.load(std::sync::atomic::Ordering::Relaxed) - retries_before;
        if retries > 0 {
            rec["oom_retries"] = retries.into();
        }
        log_device_memory(&run.decoder.device, &mut rec);
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
    let scores = heldout_scores(run, cfg, dec, &comp)?;
    save_weights(&varmap, run.out, cfg.input_scale)?;
    let card = card(run, cfg, dec, step, tokens_seen, scores, t0.elapsed().as_secs_f64());
    std::fs::write(run.out.join("card.json"), serde_json::to_vec_pretty(&card)?)?;
    Ok(card)
}
