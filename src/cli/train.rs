//! `refrag train reconstruct|cpt|sft|policy`.

use super::Global;
use crate::train::data::TextPool;
use crate::train::{self, Stage, TrainConfig, TrainRun};
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Stage: reconstruct (chunk vectors -> the same tokens), cpt (-> the next tokens), sft
    /// (answers from compressed passages; --qa) or policy (which chunks to expand; needs
    /// trained weights, see --weights).
    #[arg(value_enum)]
    pub stage: Stage,
    /// Training text files (UTF-8). Never the text you report results on.
    #[arg(long, required_unless_present = "qa", num_args = 1.., env = "REFRAG_TRAIN_TEXT")]
    pub text: Vec<PathBuf>,
    /// sft: training tasks (`eval --conversations` format, e.g. from `refrag dataset squad
    /// --split train --tasks`). policy: learn from these tasks instead of --text (reward: the
    /// reference answer's perplexity; on the weights that answer questions, `qa/`). Never the
    /// questions you report results on.
    #[arg(long, num_args = 1.., env = "REFRAG_TRAIN_QA")]
    pub qa: Vec<PathBuf>,
    /// sft: held-out tasks scored at the end (answer NLL, written to the card).
    #[arg(long, num_args = 1.., env = "REFRAG_TRAIN_HELDOUT_QA")]
    pub heldout_qa: Vec<PathBuf>,
    /// sft: weight of distillation from full-context reading (0 = answers only).
    #[arg(long, default_value_t = 1.0, env = "REFRAG_TRAIN_DISTILL")]
    pub distill: f64,
    /// sft: distil from the decoder with this folder's adapters folded in (its
    /// decoder_lora.safetensors, e.g. weights/qa: the fine-tuned decoder reading the passages as
    /// tokens) instead of the base decoder.
    #[arg(long, env = "REFRAG_TRAIN_TEACHER_WEIGHTS")]
    pub teacher_weights: Option<PathBuf>,
    /// sft: tasks per optimizer step.
    #[arg(long, default_value_t = 16, env = "REFRAG_TRAIN_BATCH")]
    pub batch: usize,
    /// Held-out text files scored at the end (written to the card).
    #[arg(long, num_args = 1.., env = "REFRAG_TRAIN_HELDOUT")]
    pub heldout: Vec<PathBuf>,
    /// Options given by flag, environment or config file (not left at their default): a
    /// resumed run takes the others from its checkpoint.
    #[arg(skip)]
    pub given: std::collections::BTreeSet<String>,
    /// Output folder: checkpoints, train.jsonl, projector.safetensors, card.json.
    #[arg(long, default_value = "weights", env = "REFRAG_TRAIN_OUT")]
    pub out: PathBuf,
    /// Chunk size in tokens.
    #[arg(long, default_value_t = 16, env = "REFRAG_TRAIN_K")]
    pub k: usize,
    #[arg(long, default_value_t = 1000, env = "REFRAG_TRAIN_STEPS")]
    pub steps: usize,
    /// Target tokens per optimizer step.
    #[arg(long, default_value_t = 8192, env = "REFRAG_TRAIN_TOKENS_PER_STEP")]
    pub tokens_per_step: usize,
    /// Tokens per forward and backward pass. A step's batch is split into passes of at most
    /// this many tokens (at least one sample; sft: a task's passages, earlier turns and answer)
    /// and their gradients summed: the same update with a lower memory peak. 0 = the whole
    /// batch in one pass.
    #[arg(long, default_value_t = 8192, env = "REFRAG_TRAIN_MICRO_TOKENS")]
    pub micro_tokens: usize,
    /// Chunks per sample at the end of the curriculum.
    #[arg(long, default_value_t = 16, env = "REFRAG_TRAIN_MAX_CHUNKS")]
    pub max_chunks: usize,
    /// cpt: tokens predicted after the compressed context.
    #[arg(long, default_value_t = 128, env = "REFRAG_TRAIN_PREDICT_TOKENS")]
    pub predict_tokens: usize,
    /// cpt, sft: weight of an auxiliary reconstruction loss each step on --text (keeps the
    /// chunk vectors' content while the decoder learns to continue text or to answer; 0 = off).
    #[arg(long, default_value_t = 0.0, env = "REFRAG_TRAIN_RECON_WEIGHT")]
    pub recon_weight: f64,
    /// reconstruct/cpt: weight of a bag-of-words loss on each chunk vector (its projection,
    /// read through the decoder's LM head, should point at the chunk's own tokens; 0 = off).
    /// Default 0.1 (the shipped weights' recipe).
    #[arg(long, env = "REFRAG_TRAIN_BOW_WEIGHT")]
    pub bow_weight: Option<f64>,
    /// Factor on the (unit-length) chunk vectors before the projector. Default: the --init
    /// weights' factor, else sqrt(encoder dimension) (19.6 for MiniLM).
    #[arg(long, env = "REFRAG_TRAIN_INPUT_SCALE")]
    pub input_scale: Option<f64>,
    /// cpt: fraction of chunks left as tokens (mixed input).
    #[arg(long, default_value_t = 0.0, env = "REFRAG_TRAIN_MIXED")]
    pub mixed: f64,
    /// Peak learning rate (paper: 2e-4 reconstruction, 5e-5 CPT).
    #[arg(long, default_value_t = 2e-4, env = "REFRAG_TRAIN_LR")]
    pub lr: f64,
    /// Warm-up fraction of the steps.
    #[arg(long, default_value_t = 0.04, env = "REFRAG_TRAIN_WARMUP")]
    pub warmup: f64,
    #[arg(long, default_value_t = 0.01, env = "REFRAG_TRAIN_WEIGHT_DECAY")]
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 = off).
    #[arg(long, default_value_t = 1.0, env = "REFRAG_TRAIN_CLIP")]
    pub clip: f64,
    #[arg(long, default_value_t = 17, env = "REFRAG_TRAIN_SEED")]
    pub seed: u64,
    #[arg(long, default_value_t = 100, env = "REFRAG_TRAIN_CHECKPOINT_EVERY")]
    pub checkpoint_every: usize,
    /// Continue from the checkpoint in --out, with the settings the run started with; options
    /// given again (flag, environment or config file) override them, and the changes are named.
    #[arg(long, env = "REFRAG_TRAIN_RESUME")]
    pub resume: bool,
    /// Reconstruction (the reconstruct stage, --recon-weight's term) reads a marker token after
    /// the chunk vectors, so that the decoder can tell repeating them from continuing after
    /// them. Without it the reconstruction term of cpt makes the adapted decoder read chunk
    /// vectors worse than no context (measured, docs/research/2026-12-03-cpt-reconstruction.md).
    /// Default: --init's (its card's "recon_marker"), else off.
    #[arg(long, env = "REFRAG_TRAIN_RECON_MARKER")]
    pub recon_marker: bool,
    /// Checkpoint and stop after this many seconds of training steps (go on later with --resume;
    /// --resume --steps N, N the step reached, writes the weights as they are). Loading the
    /// models and tokenizing the text come before the clock starts.
    #[arg(long, env = "REFRAG_TRAIN_MAX_SECONDS")]
    pub max_seconds: Option<f64>,
    /// Top layers of the MiniLM chunk encoder to train with the projector (0 = projector only;
    /// 0 with --chunk-layers). Trained layers ship as encoder.safetensors (f16, ~3.5 MB per layer).
    #[arg(long, default_value_t = 4, env = "REFRAG_TRAIN_ENCODER_LAYERS")]
    pub encoder_layers: usize,
    /// Rank of LoRA adapters trained on every decoder matrix (0 = decoder frozen). They ship
    /// as decoder_lora.safetensors (f16 where f32 would pass 16 MB) and are folded into the
    /// decoder in --mode refrag. --init's adapters of a lower rank are grown to this one,
    /// leaving the starting model unchanged.
    #[arg(long, default_value_t = 0, env = "REFRAG_TRAIN_DECODER_LORA")]
    pub decoder_lora: usize,
    /// Grow the chunk encoder from the decoder's first N layers (its own cased tokens, each
    /// chunk's states mean-pooled) instead of MiniLM; 0 = MiniLM. Default: --init's, else 0.
    /// Its adapters ship as chunk_encoder.safetensors.
    #[arg(long, env = "REFRAG_TRAIN_CHUNK_LAYERS")]
    pub chunk_layers: Option<usize>,
    /// Rank of the grown chunk encoder's LoRA adapters on every matrix of its layers.
    #[arg(long, default_value_t = 32, env = "REFRAG_TRAIN_CHUNK_LORA")]
    pub chunk_lora: usize,
    /// Start from these weights (a folder, e.g. the reconstruction stage's --out).
    #[arg(long, env = "REFRAG_TRAIN_INIT")]
    pub init: Option<PathBuf>,
    /// policy: context tokens per sample (compressed, s/k chunks).
    #[arg(long, default_value_t = 1024, env = "REFRAG_TRAIN_S")]
    pub s: usize,
    /// policy: fraction of chunks expanded.
    #[arg(long, default_value_t = 0.25, env = "REFRAG_TRAIN_EXPAND")]
    pub expand: f64,
    /// policy: selections sampled per context (GRPO group).
    #[arg(long, default_value_t = 8, env = "REFRAG_TRAIN_GROUP")]
    pub group: usize,
    /// policy: PPO epochs per group.
    #[arg(long, default_value_t = 2, env = "REFRAG_TRAIN_EPOCHS")]
    pub epochs: usize,
    /// policy: learning rate.
    #[arg(long, default_value_t = 1e-3, env = "REFRAG_TRAIN_POLICY_LR")]
    pub policy_lr: f64,
    /// policy: also read a query vector (the question at ask time; in training, the task's
    /// question with --qa, else the first --query-tokens of the text to predict).
    #[arg(long, env = "REFRAG_TRAIN_CONDITION")]
    pub condition: bool,
    /// policy (with --condition): start from `sim-span` instead of `sim` (the question
    /// similarity added to each chunk's logit is the best within one chunk of it in its passage).
    #[arg(long, requires = "condition", env = "REFRAG_TRAIN_SPAN")]
    pub span: bool,
    #[arg(long, default_value_t = 32, env = "REFRAG_TRAIN_QUERY_TOKENS")]
    pub query_tokens: usize,
}

fn train_policy(g: &Global, a: &TrainArgs) -> Result<ExitCode> {
    if !(0.0..=1.0).contains(&a.expand) || a.s == 0 || !a.s.is_multiple_of(a.k) {
        bail!("--expand must be in [0, 1] and --s a positive multiple of --k");
    }
    let ld = g.loader()?;
    let mut decoder = ld.decoder_with(crate::model::decoder::Ops::Differentiable, false)?;
    let encoder = ld.encoder()?;
    // with --qa the policy learns on the weights that answer questions (weights/qa)
    let purpose =
        if a.qa.is_empty() { crate::model::weights::Purpose::Text } else { crate::model::weights::Purpose::Answers };
    let Some(trained) = ld.trained(&encoder, &decoder, purpose)? else {
        return Err(crate::model::weights::missing(&ld.weights_dirs(purpose)));
    };
    if let Some(k) = trained.k.filter(|&k| k != a.k) {
        bail!("--k {}: the weights in {} were trained with k = {k}", a.k, trained.dir.display());
    }
    let question_at = ld.question_at(Some(&trained));
    trained.adapt(&mut decoder)?;
    let (text, tasks);
    let episodes = if a.qa.is_empty() {
        text = TextPool::load(&a.text, &decoder)?;
        crate::train::policy::Episodes::Text(&text)
    } else {
        tasks = crate::train::sft::QaPool::load(&a.qa, &decoder)?;
        if !g.quiet {
            eprintln!("training tasks: {} in {} files", tasks.examples.len(), a.qa.len());
        }
        crate::train::policy::Episodes::Tasks(&tasks)
    };
    let files = if a.qa.is_empty() { &a.text } else { &a.qa };
    let names: Vec<String> =
        files.iter().map(|p| p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()).collect();
    let run = crate::train::policy::PolicyTrain {
        decoder: &decoder,
        compressor: crate::model::compressor::Compressor::new(&trained.chunk_encoder, &trained.projector, a.k),
        query_encoder: &encoder,
        episodes,
        question_at,
        out: &a.out,
        quiet: g.quiet,
        data_note: format!("train: {names:?}; weights: {}", trained.dir.display()),
    };
    let in_dim = trained.chunk_encoder.dim();
    if a.condition && in_dim != encoder.dim {
        bail!(
            "--condition compares the question's MiniLM vector with the chunk vectors; the chunk encoder of {} ({}) makes {in_dim}-d vectors",
            trained.dir.display(),
            trained.chunk_encoder.kind()
        );
    }
    let net = crate::model::policy::PolicyConfig {
        in_dim,
        width: 128,
        heads: 4,
        layers: 2,
        condition: a.condition,
        interact: a.condition,
        span: a.span,
    };
    let cfg = crate::train::policy::PolicyTrainConfig {
        steps: a.steps,
        s: a.s,
        o: a.predict_tokens,
        expand: a.expand,
        group: a.group,
        epochs: a.epochs,
        clip_eps: 0.2,
        lr: a.policy_lr,
        seed: a.seed,
        query_tokens: a.query_tokens,
    };
    let card = crate::train::policy::train(&run, net, &cfg)?;
    outln!("{}", serde_json::to_string_pretty(&card)?);
    Ok(ExitCode::SUCCESS)
}

/// The ids of the options in `m` that were given (flag, environment or config file).
pub fn given(m: &clap::ArgMatches) -> std::collections::BTreeSet<String> {
    use clap::parser::ValueSource;
    m.ids()
        .filter(|id| matches!(m.value_source(id.as_str()), Some(ValueSource::CommandLine | ValueSource::EnvVariable)))
        .map(|id| id.to_string())
        .collect()
}

/// A resumed run's settings: the checkpoint's, except those given now (`given`, as option
/// ids); returns them and the given ones that differ from the checkpoint, as `--flag new (was old)`.
fn resumed_config(
    now: &TrainConfig,
    ck: &TrainConfig,
    given: &std::collections::BTreeSet<String>,
) -> Result<(TrainConfig, Vec<String>)> {
    let now_v = serde_json::to_value(now)?;
    let mut out = serde_json::to_value(ck)?;
    let mut changed = Vec::new();
    for (key, v) in now_v.as_object().into_iter().flatten() {
        // the stage is the command's (train.rs refuses a checkpoint of another stage)
        if key != "stage" && !given.contains(key) {
            continue;
        }
        if out[key.as_str()] != *v && key != "stage" {
            changed.push(format!("--{} {v} (was {})", key.replace('_', "-"), out[key.as_str()]));
        }
        out[key.as_str()] = v.clone();
    }
    Ok((serde_json::from_value(out)?, changed))
}

pub fn run(g: &Global, a: TrainArgs) -> Result<ExitCode> {
    if a.k == 0 || a.max_chunks == 0 || a.steps == 0 {
        bail!("--k, --max-chunks and --steps must be positive");
    }
    if a.stage == Stage::Policy {
        return train_policy(g, &a);
    }
    let bow_weight = check_stage_args(&a)?;
    let init_card = match &a.init {
        Some(d) => crate::model::weights::Card::read(d)?,
        None => crate::model::weights::Card::default(),
    };
    // answers are trained with the question where --question-at says (auto: as --init's card)
    let question_at = g.question_at.resolve(init_card.question_at);
    let chunk_layers = a.chunk_layers.or(init_card.chunk_layers).unwrap_or(0);
    let recon_marker = a.recon_marker || init_card.recon_marker;
    let init_scale = match &a.init {
        Some(d) if d.join(crate::model::projector::FILE).exists() => {
            Some(crate::model::projector::stored_in_scale(&d.join(crate::model::projector::FILE))?)
        }
        _ => None,
    };
    if let (Some(x), Some(y)) = (a.input_scale, init_scale) {
        if x != y {
            bail!("--input-scale {x}: the --init weights were trained with {y}");
        }
    }
    let ld = g.loader()?;
    let decoder = ld.decoder_with(crate::model::decoder::Ops::Differentiable, false)?;
    let encoder = ld.encoder()?;
    // MiniLM's vectors have unit length, the grown encoder's unit root-mean-square
    let unit = if chunk_layers > 0 { 1.0 } else { (encoder.dim as f64).sqrt() };
    let input_scale = a.input_scale.or(init_scale).unwrap_or(unit);
    if a.stage == Stage::Sft && a.qa.is_empty() {
        bail!("train sft needs --qa FILE (tasks: `refrag dataset squad FILE --split train --tasks OUT.jsonl`)");
    }
    let pool = if a.text.is_empty() { TextPool::empty() } else { TextPool::load(&a.text, &decoder)? };
    let held = if a.heldout.is_empty() { None } else { Some(TextPool::load(&a.heldout, &decoder)?) };
    let qa = if a.stage == Stage::Sft { Some(crate::train::sft::QaPool::load(&a.qa, &decoder)?) } else { None };
    let qa_held = if a.stage == Stage::Sft && !a.heldout_qa.is_empty() {
        Some(crate::train::sft::QaPool::load(&a.heldout_qa, &decoder)?)
    } else {
        None
    };
    if !g.quiet {
        match &qa {
            Some(q) => eprintln!("training tasks: {} in {} files", q.examples.len(), a.qa.len()),
            None => eprintln!("training text: {} tokens in {} files", pool.tokens(), a.text.len()),
        }
    }
    let names = |v: &[PathBuf]| {
        v.iter().map(|p| p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()).collect::<Vec<_>>()
    };
    let mut cfg = config(&a, bow_weight, input_scale, chunk_layers, recon_marker);
    // --resume continues with the checkpoint's settings, except options given now
    if let Some(ck) = a.resume.then(|| train::checkpoint::checkpoint_config(&a.out)).flatten() {
        let (c, changed) = resumed_config(&cfg, &ck, &a.given)?;
        cfg = c;
        if !changed.is_empty() && !g.quiet {
            eprintln!("resuming {} with {}", a.out.display(), changed.join(", "));
        }
    }
    let teacher = match &cfg.teacher_weights {
        Some(dir) => {
            // a copy of the loaded decoder (folding replaces the copy's matrices, not the base's)
            let mut t = decoder.clone();
            t.merge_lora(&dir.join(crate::model::decoder::LORA_FILE))?;
            Some(t)
        }
        None => None,
    };
    let run = TrainRun {
        decoder: &decoder,
        encoder: &encoder,
        train: &pool,
        heldout: held.as_ref(),
        out: &a.out,
        resume: a.resume,
        quiet: g.quiet,
        max_seconds: a.max_seconds,
        micro_tokens: a.micro_tokens,
        init_from: a.init.clone(),
        data_note: if a.stage == Stage::Sft {
            let teacher = cfg
                .teacher_weights
                .as_ref()
                .map(|d| format!("; teacher: base decoder + {}", d.join(crate::model::decoder::LORA_FILE).display()))
                .unwrap_or_default();
            let recon = if a.recon_weight > 0.0 {
                format!("; reconstruction text: {:?}", names(&a.text))
            } else {
                String::new()
            };
            format!("train tasks: {:?}; held-out tasks: {:?}{teacher}{recon}", names(&a.qa), names(&a.heldout_qa))
        } else {
            format!("train: {:?}; held out: {:?}", names(&a.text), names(&a.heldout))
        },
        qa: qa.as_ref(),
        qa_heldout: qa_held.as_ref(),
        teacher: teacher.as_ref(),
        question_at,
    };
    let card = train::train(&run, &cfg).map_err(|e| train::oom::out_of_memory_hint(e, &a.out))?;
    outln!("{}", serde_json::to_string_pretty(&card)?);
    Ok(ExitCode::SUCCESS)
}

/// The run's settings from the flags (a resumed run then takes its checkpoint's, except those
/// given again).
fn config(a: &TrainArgs, bow_weight: f64, input_scale: f64, chunk_layers: usize, recon_marker: bool) -> TrainConfig {
    // the MiniLM layers do not train beside a grown chunk encoder unless asked (then refused)
    let minilm_default = chunk_layers > 0 && !a.given.contains("encoder_layers");
    TrainConfig {
        stage: a.stage,
        k: a.k,
        steps: a.steps,
        tokens_per_step: a.tokens_per_step,
        max_chunks: a.max_chunks,
        predict_tokens: a.predict_tokens,
        mixed: a.mixed,
        lr: a.lr,
        warmup: a.warmup,
        weight_decay: a.weight_decay,
        clip: a.clip,
        seed: a.seed,
        checkpoint_every: a.checkpoint_every,
        encoder_layers: if minilm_default { 0 } else { a.encoder_layers },
        decoder_lora: a.decoder_lora,
        chunk_layers,
        chunk_lora: if chunk_layers > 0 { a.chunk_lora } else { 0 },
        distill: a.distill,
        batch: a.batch,
        recon_weight: a.recon_weight,
        recon_marker,
        bow_weight,
        input_scale,
        teacher_weights: a.teacher_weights.clone(),
    }
}

/// The reconstruct/cpt/sft flags checked before anything loads; returns the bag-of-words weight
/// (default 0.1, 0 for sft).
fn check_stage_args(a: &TrainArgs) -> Result<f64> {
    if !(a.recon_weight.is_finite() && a.recon_weight >= 0.0) {
        bail!("--recon-weight {}: must be 0 or more", a.recon_weight);
    }
    if a.recon_weight > 0.0 && !matches!(a.stage, Stage::Cpt | Stage::Sft) {
        bail!("--recon-weight is for `refrag train cpt` and `refrag train sft`");
    }
    if a.recon_weight > 0.0 && a.stage == Stage::Sft && a.text.is_empty() {
        bail!("--recon-weight in `train sft` reconstructs --text FILE...: give the text");
    }
    let bow_weight = a.bow_weight.unwrap_or(if a.stage == Stage::Sft { 0.0 } else { 0.1 });
    if !(bow_weight.is_finite() && bow_weight >= 0.0) || (bow_weight > 0.0 && a.stage == Stage::Sft) {
        bail!("--bow-weight {bow_weight}: must be 0 or more, for reconstruct or cpt");
    }
    if a.input_scale.is_some_and(|x| !(x.is_finite() && x > 0.0)) {
        bail!("--input-scale must be positive");
    }
    if !(0.0..1.0).contains(&a.mixed) {
        bail!("--mixed {}: must be in [0, 1)", a.mixed);
    }
    if let Some(dir) = &a.teacher_weights {
        if a.stage != Stage::Sft || a.distill <= 0.0 {
            bail!("--teacher-weights is for `refrag train sft` with --distill above 0");
        }
        if !dir.join(crate::model::decoder::LORA_FILE).is_file() {
            bail!("--teacher-weights {}: no {} in it", dir.display(), crate::model::decoder::LORA_FILE);
        }
    }
    Ok(bow_weight)
}
