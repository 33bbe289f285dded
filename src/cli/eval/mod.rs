//! `refrag eval`: batch questions from JSONL, with metrics; `refrag eval perplexity`.
#![cfg_attr(not(feature = "store"), allow(dead_code, unused_imports))]

use super::args::{mode_name, policy_named, RagArgs, SamplingArgs};
use super::Global;

mod answers;
mod compare;
mod perplexity;

use crate::eval::metrics;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub cmd: Option<EvalCmd>,
    /// Questions: one {"id","question","answers":[...],"gold_doc"?,"answerable"?} per line.
    #[arg(long, required_unless_present = "conversations", env = "REFRAG_EVAL_QUESTIONS")]
    pub questions: Option<PathBuf>,
    /// Multi-turn tasks (MTRAG format: "input" turns ending with the user's question,
    /// "contexts", "targets", "answerability"): the last turn is answered from the given
    /// passages and the earlier turns; no index is needed.
    #[arg(long, conflicts_with = "questions", env = "REFRAG_EVAL_CONVERSATIONS")]
    pub conversations: Option<PathBuf>,
    /// With --conversations: most decoder positions per answer (default: the decoder's
    /// window); the oldest turns, then the last passages, are left out beyond it.
    #[arg(long, env = "REFRAG_EVAL_WINDOW")]
    pub window: Option<usize>,
    /// Write one JSON line per question here.
    #[arg(long, env = "REFRAG_EVAL_OUT")]
    pub out: Option<PathBuf>,
    /// Score retrieval only (recall@k), without decoding.
    #[arg(long, env = "REFRAG_EVAL_RETRIEVAL_ONLY")]
    pub retrieval_only: bool,
    /// With --retrieval-only: also write each question with its retrieved passages as a task
    /// (the format of --conversations and `train sft --qa`), to replay this retrieval where
    /// there is no index or to fine-tune on it.
    #[arg(long, requires = "retrieval_only", env = "REFRAG_EVAL_TASKS")]
    pub tasks: Option<PathBuf>,
    /// Evaluate only the first N questions.
    #[arg(long, env = "REFRAG_EVAL_LIMIT")]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub rag: RagArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print the summary as JSON.
    #[arg(long, env = "REFRAG_JSON")]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum EvalCmd {
    /// Perplexity of the next --o tokens after --s context tokens: no context, full context,
    /// the last s/k tokens, and REFRAG's s/k chunk vectors (paper Table 1).
    Perplexity(PerplexityArgs),
    /// Paired comparison of two readings' answers (`eval --out` files of the same questions):
    /// per-question differences in F1, EM and contains, joined by id, with bootstrap intervals.
    Compare(CompareArgs),
    /// Reference-answer log-likelihood of held-out tasks (`dataset ... --tasks`) under six
    /// readings: base decoder with no passages / with them as tokens, the adapted decoder with
    /// them as tokens, and REFRAG with no passages / its own / another task's compressed
    /// passages (does the compressed passage's content reach the answer?).
    Answers(AnswersArgs),
    /// Is the answer in the chunk vector at all? For held-out tasks whose reference answer lies
    /// within one k-token chunk of the passage, the decoder writes what it reads in that chunk's
    /// vector alone, and in another task's chunk (the control); share of read-backs holding the
    /// answer, paired.
    Readback(ReadbackArgs),
}

#[derive(Args, Debug)]
pub struct ReadbackArgs {
    /// Task files (`refrag dataset ... --tasks`; answerable tasks with passages are read).
    #[arg(long, required = true, num_args = 1.., env = "REFRAG_READBACK_QA")]
    pub qa: Vec<PathBuf>,
    /// Tasks read per file, from its start.
    #[arg(long, default_value_t = 100, env = "REFRAG_READBACK_LIMIT")]
    pub limit: usize,
    /// Read-backs printed as examples (the first ones).
    #[arg(long, default_value_t = 3, env = "REFRAG_READBACK_SHOW")]
    pub show: usize,
    #[command(flatten)]
    pub bootstrap: BootstrapArgs,
    /// Print one JSON object instead of a table.
    #[arg(long, env = "REFRAG_JSON")]
    pub json: bool,
}

/// The bootstrap of `eval compare`, `eval answers` and `eval readback`.
#[derive(Args, Debug)]
pub struct BootstrapArgs {
    /// Bootstrap resamples of the paired differences (95% percentile interval).
    #[arg(long, default_value_t = 2000, env = "REFRAG_COMPARE_SAMPLES")]
    pub samples: usize,
    /// Seed of the resampling.
    #[arg(long, default_value_t = 1, env = "REFRAG_COMPARE_SEED")]
    pub seed: u64,
}

impl BootstrapArgs {
    /// Mean of paired differences and its 95% interval: (mean, low, high).
    fn interval(&self, diffs: &[f64]) -> (f64, f64, f64) {
        metrics::paired_bootstrap(diffs, self.samples, self.seed)
    }
}

#[derive(Args, Debug)]
pub struct AnswersArgs {
    /// Task files (`refrag dataset ... --tasks`; answerable tasks with passages are read).
    #[arg(long, required = true, num_args = 1.., env = "REFRAG_ANSWERS_QA")]
    pub qa: Vec<PathBuf>,
    /// Tasks read per file, from its start.
    #[arg(long, default_value_t = 100, env = "REFRAG_ANSWERS_LIMIT")]
    pub limit: usize,
    #[command(flatten)]
    pub bootstrap: BootstrapArgs,
    /// Print one JSON object instead of a table.
    #[arg(long, env = "REFRAG_JSON")]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Answers of the baseline reading (`eval --out` files, e.g. one per question set).
    #[arg(long, required = true, num_args = 1.., env = "REFRAG_COMPARE_BASE")]
    pub base: Vec<PathBuf>,
    /// Answers of the reading compared with it: the same sets, in the same order as --base.
    #[arg(long, required = true, num_args = 1.., env = "REFRAG_COMPARE_NEW")]
    pub new: Vec<PathBuf>,
    #[command(flatten)]
    pub bootstrap: BootstrapArgs,
    /// Print one JSON object instead of a table.
    #[arg(long, env = "REFRAG_JSON")]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    /// Text files to score (UTF-8; Gutenberg headers are stripped). Never training text.
    #[arg(long, required = true, num_args = 1.., env = "REFRAG_PERPLEXITY_TEXT")]
    pub text: Vec<PathBuf>,
    /// Context tokens.
    #[arg(long, default_value_t = 2048, env = "REFRAG_PERPLEXITY_S")]
    pub s: usize,
    /// Predicted tokens.
    #[arg(long, default_value_t = 512, env = "REFRAG_PERPLEXITY_O")]
    pub o: usize,
    /// Chunk sizes; REFRAG rows need trained weights for that k (the others print without).
    #[arg(long, value_delimiter = ',', default_value = "16", env = "REFRAG_PERPLEXITY_K")]
    pub k: Vec<usize>,
    /// Windows per text, spread evenly over it.
    #[arg(long, default_value_t = 16, env = "REFRAG_PERPLEXITY_WINDOWS")]
    pub windows: usize,
    /// Fraction of chunks expanded back to tokens in the policy readings.
    #[arg(long, default_value_t = 0.1, env = "REFRAG_PERPLEXITY_EXPAND")]
    pub expand: f64,
    /// Expansion policies read at --expand (random, ppl-desc, ppl-asc, rl; none = no readings).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "random", env = "REFRAG_PERPLEXITY_POLICY")]
    pub policy: Vec<crate::options::Policy>,
    /// Target tokens a conditioned RL policy reads as its query (a stand-in for a question).
    #[arg(long, default_value_t = 32, env = "REFRAG_PERPLEXITY_QUERY_TOKENS")]
    pub query_tokens: usize,
    /// Print JSON lines instead of a table.
    #[arg(long, env = "REFRAG_JSON")]
    pub json: bool,
}

pub fn run(g: &Global, args: EvalArgs) -> Result<ExitCode> {
    match args.cmd {
        Some(EvalCmd::Perplexity(a)) => perplexity::perplexity(g, a),
        Some(EvalCmd::Compare(a)) => compare::compare(a),
        Some(EvalCmd::Answers(a)) => answers::answers(g, a),
        Some(EvalCmd::Readback(a)) => answers::readback(g, a),
        None => match args.conversations.clone() {
            Some(c) => run_conversations(g, &args, &c),
            None => run_questions(g, args),
        },
    }
}

#[cfg(not(feature = "store"))]
fn run_questions(_: &Global, _: EvalArgs) -> Result<ExitCode> {
    bail!("this refrag was built without the `store` feature: only `eval perplexity` works")
}

#[cfg(feature = "store")]
fn run_questions(g: &Global, args: EvalArgs) -> Result<ExitCode> {
    use crate::eval::questions::{evaluate, Outputs};
    let questions = args.questions.clone().context("--questions FILE is required")?;
    let (mut qs, bad) = read_jsonl(&questions, crate::eval::questions::parse)?;
    if let Some(l) = args.limit {
        qs.truncate(l);
    }
    let sampling = args.sampling.options()?;
    let (engine, mode, rag) = args.rag.engine(g, false)?;
    let opts = rag.options(mode, sampling);
    let mut out = out_file(&args.out)?;
    let mut tasks_out = out_file(&args.tasks)?;
    let pb = crate::progress::bar(g.quiet, qs.len() as u64, "questions");
    pb.set_message("eval");
    let outputs = Outputs {
        answers: out.as_mut().map(|o| o as &mut dyn Write),
        tasks: tasks_out.as_mut().map(|o| o as &mut dyn Write),
    };
    let tally = evaluate(&engine, &qs, &opts, args.retrieval_only, outputs, || pb.inc(1))?;
    pb.finish_and_clear();
    for mut o in [out, tasks_out].into_iter().flatten() {
        o.flush()?;
    }
    let mut summary = serde_json::json!({
        "questions": qs.len(),
        "bad_lines": bad,
        "mode": mode_name(mode),
        "adapted": engine.reading.adapted,
        "weights": engine.reading.weights.as_ref().map(|w| w.display().to_string()),
        "question_at": engine.question_at(),
        "top_k": args.rag.top_k,
        "expand": rag.reported_share(),
        "budget": rag.budget,
        "policy": policy_named(mode, rag.expands(), rag.policy),
    });
    tally.report(summary.as_object_mut().expect("a JSON object"));
    print_summary(&summary, args.json)?;
    Ok(if bad > 0 { ExitCode::from(2) } else { ExitCode::SUCCESS })
}

/// The per-item JSONL output file of --out, if any.
fn out_file(path: &Option<PathBuf>) -> Result<Option<std::io::BufWriter<std::fs::File>>> {
    path.as_ref()
        .map(|p| {
            Ok(std::io::BufWriter::new(
                std::fs::File::create(p).with_context(|| format!("{}: cannot create", p.display()))?,
            ))
        })
        .transpose()
}

/// A metrics summary on stdout: one JSON object, or one `key value` line per metric.
fn print_summary(summary: &serde_json::Value, json: bool) -> Result<()> {
    if json {
        outln!("{summary}");
    } else {
        for (k, v) in summary.as_object().into_iter().flatten() {
            if !v.is_null() {
                outln!(
                    "{k:<26} {}",
                    match v.as_f64() {
                        Some(x) if v.is_f64() => format!("{x:.4}"),
                        _ => v.to_string(),
                    }
                );
            }
        }
    }
    Ok(())
}

/// Bad lines are reported (file:line) and skipped; returns the good ones and the bad count.
fn read_jsonl<T>(path: &std::path::Path, parse: impl Fn(&str, &str) -> Result<T>) -> Result<(Vec<T>, usize)> {
    let text = crate::index::corpus::read_text(path)?;
    let name = path.display().to_string();
    let (mut good, mut bad) = (Vec::new(), 0);
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse(line, &format!("{name}:{}", n + 1)) {
            Ok(q) => good.push(q),
            Err(e) => {
                bad += 1;
                eprintln!("refrag: {} (skipped)", super::one_line(&e));
            }
        }
    }
    if good.is_empty() {
        bail!("{name}: no usable lines (empty, or every line malformed)");
    }
    Ok((good, bad))
}

/// `eval --conversations`: the last user turn of each conversation, answered with its given
/// passages and the earlier turns (compressed in refrag mode, truncated to --window in full).
fn run_conversations(g: &Global, args: &EvalArgs, path: &std::path::Path) -> Result<ExitCode> {
    use crate::options::Mode;
    let (mut tasks, bad) = read_jsonl(path, crate::read::tasks::parse_task)?;
    if let Some(l) = args.limit {
        tasks.truncate(l);
    }
    let sampling = args.sampling.options()?;
    let mode = args.rag.mode.unwrap_or(Mode::Full);
    args.rag.settled(Mode::Full, None)?; // a bad --expand fails before the models load
    let ld = g.loader()?;
    let mut decoder = ld.decoder()?;
    let encoder = ld.encoder()?;
    let trained = ld.trained(&encoder, &decoder, crate::model::weights::Purpose::Answers)?;
    // the decoder reads with the trained adapters folded in: refrag mode, or --adapted
    let reading = ld.reading(trained, crate::model::weights::Purpose::Answers, mode, args.rag.adapted, args.rag.k)?;
    reading.adapt(&mut decoder)?;
    let trained = reading.trained.as_ref();
    // the weights that shaped the answers (reported, so a default pick is visible)
    let weights_used = reading.weights.as_ref().map(|w| w.display().to_string());
    let (question_at, adapted) = (reading.question_at, reading.adapted);
    let rag = args.rag.settled(mode, trained)?;
    crate::read::policy::require(
        mode == Mode::Refrag && rag.policy == crate::options::Policy::Rl && rag.expands(),
        trained,
    )?;
    let select = Some((rag.selection(trained.and_then(|t| t.policy.as_deref()), sampling.seed), &encoder));
    let compress = reading.compressor().filter(|_| mode == Mode::Refrag);
    let reader = crate::read::reader::Reader { decoder: &decoder, compress, select, question_at };
    let window = args
        .window
        .unwrap_or(decoder.cfg.max_positions)
        .min(decoder.cfg.max_positions)
        .saturating_sub(sampling.max_tokens);
    let mut out = out_file(&args.out)?;
    let pb = crate::progress::bar(g.quiet, tasks.len() as u64, "conversations");
    let tally = crate::eval::conversations::evaluate(
        &reader,
        mode,
        &tasks,
        window,
        &sampling,
        out.as_mut().map(|o| o as &mut dyn Write),
        || pb.inc(1),
    )?;
    pb.finish_and_clear();
    if let Some(mut o) = out {
        o.flush()?;
    }
    let mut summary = serde_json::json!({
        "conversations": tasks.len(), "bad_lines": bad, "mode": mode_name(mode), "adapted": adapted, "weights": weights_used, "question_at": question_at, "window": window,
    });
    let fields = summary.as_object_mut().expect("a JSON object");
    tally.report(fields);
    fields.insert("expand".into(), rag.reported_share().into());
    fields.insert("budget".into(), rag.budget.into());
    fields.insert("policy".into(), serde_json::to_value(policy_named(mode, rag.expands(), rag.policy))?);
    fields.insert("chunks_expanded".into(), tally.chunks_expanded.into());
    print_summary(&summary, args.json)?;
    Ok(if bad > 0 { ExitCode::from(2) } else { ExitCode::SUCCESS })
}
