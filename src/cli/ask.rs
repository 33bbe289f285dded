//! `refrag ask`: answer one question.

use super::Global;
#[cfg(feature = "store")]
use crate::index::store::Store;
use crate::model::weights::Purpose;
use crate::options::{Mode, Policy, QuestionAt, SearchKind};
#[cfg(feature = "store")]
use crate::read::engine::{AskOptions, Engine, EngineOptions};
use crate::read::generate::{Generation, SamplingOptions};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

/// Sampling flags shared by ask, eval and chat.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64, env = "REFRAG_MAX_TOKENS")]
    pub max_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0, env = "REFRAG_TEMPERATURE")]
    pub temperature: f64,
    /// Nucleus sampling mass (with --temperature > 0).
    #[arg(long, env = "REFRAG_TOP_P")]
    pub top_p: Option<f64>,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 299792458, env = "REFRAG_SEED")]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn options(&self) -> Result<SamplingOptions> {
        if self.max_tokens == 0 {
            bail!("--max-tokens must be at least 1");
        }
        if let Some(p) = self.top_p {
            if !(0.0..=1.0).contains(&p) || p == 0.0 {
                bail!("--top-p {p}: must be in (0, 1]");
            }
        }
        if self.temperature < 0.0 {
            bail!("--temperature {}: must be >= 0", self.temperature);
        }
        Ok(SamplingOptions {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
        })
    }
}

/// Retrieval and compression flags shared by ask and eval.
#[derive(Args, Debug, Clone)]
pub struct RagArgs {
    /// Index database (a folder, or an object-store URI).
    #[arg(long, env = "REFRAG_DB", default_value = "index")]
    pub db: String,
    /// Passages to retrieve.
    #[arg(long, default_value_t = 3, env = "REFRAG_TOP_K")]
    pub top_k: usize,
    /// What the decoder reads: refrag (chunk vectors), full (passage tokens), none.
    /// Default: full (refrag uses the trained weights: --weights, else the shipped ones).
    #[arg(long, value_enum, env = "REFRAG_MODE")]
    pub mode: Option<Mode>,
    /// Chunk size in tokens; must match the index (default: the index's).
    #[arg(long, env = "REFRAG_K")]
    pub k: Option<usize>,
    /// Fraction of chunks to expand back to tokens (refrag mode). Default: the share the
    /// weights' card recommends (its "expand"; the shipped weights/qa: 0.25), else 0. --expand 0
    /// reads every chunk compressed.
    #[arg(long, env = "REFRAG_EXPAND")]
    pub expand: Option<f64>,
    /// Refrag mode, instead of --expand: expand chunks, in the policy's order, while the
    /// passages fit in N decoder positions (a chunk vector takes 1, an expanded chunk up to k):
    /// a latency budget. Below the number of chunks, nothing is expanded.
    #[arg(long, value_name = "N", env = "REFRAG_BUDGET", conflicts_with = "expand")]
    pub budget: Option<usize>,
    /// Which chunks to expand.
    #[arg(long, value_enum, default_value = "sim-span", env = "REFRAG_POLICY")]
    pub policy: Policy,
    /// Retrieval: vector, or hybrid (vector + BM25).
    #[arg(long, value_enum, default_value = "vector", env = "REFRAG_SEARCH")]
    pub search: SearchKind,
    /// In --mode full or none: read with the trained weights' decoder adapters folded in (the
    /// paper's LLaMA-FT baseline: the fine-tuned decoder reading the passages' tokens).
    /// Refrag mode always does.
    #[arg(long, env = "REFRAG_ADAPTED")]
    pub adapted: bool,
}

impl RagArgs {
    /// The share of chunks to expand (0 until [`RagArgs::settled`] has read the card).
    pub fn share(&self) -> f64 {
        self.expand.unwrap_or(0.0)
    }

    /// The share as reported (`"expand"` in JSON): none under a budget.
    pub fn reported_share(&self) -> Option<f64> {
        self.budget.is_none().then(|| self.share())
    }

    /// Whether chunks can go back to tokens (a share, or a budget), policy aside.
    pub fn expands(&self) -> bool {
        self.share() > 0.0 || self.budget.is_some()
    }

    /// How these options choose chunks to expand, with the trained policy `net` (for `rl`).
    pub fn selection<'a>(
        &self,
        net: Option<&'a crate::model::policy::PolicyNet>,
        seed: u64,
    ) -> crate::read::policy::Selection<'a> {
        crate::read::policy::Selection { policy: self.policy, expand: self.share(), budget: self.budget, net, seed }
    }

    /// These options with the share to expand settled: --expand as given (checked), else in
    /// refrag mode without --budget or `--policy none` the share the weights' card recommends,
    /// else 0.
    pub fn settled(&self, mode: Mode, trained: Option<&crate::model::weights::Trained>) -> Result<RagArgs> {
        let expand = match self.expand {
            Some(p) if !(0.0..=1.0).contains(&p) => bail!("--expand {p}: must be between 0 and 1"),
            Some(p) => p,
            None if mode == Mode::Refrag && self.budget.is_none() && self.policy != Policy::None => {
                trained.and_then(|t| t.expand).unwrap_or(0.0)
            }
            None => 0.0,
        };
        Ok(RagArgs { expand: Some(expand), ..self.clone() })
    }
}

#[cfg(feature = "store")]
impl RagArgs {
    /// Load models, index and (when present) trained weights; resolve the mode, and the share
    /// to expand (the options returned, settled).
    pub fn engine(&self, g: &Global) -> Result<(Engine, Mode, RagArgs)> {
        self.settled(Mode::Full, None)?; // a bad --expand fails before the models load
                                         // Full context unless asked: it still answers best from what the passages say (see
                                         // weights/qa/card.json: compressed chunks alone carry few of their facts).
        let mode = self.mode.unwrap_or(Mode::Full);
        let storage_options = g.storage_options()?;
        let o =
            EngineOptions { db: &self.db, storage_options: &storage_options, mode, adapted: self.adapted, k: self.k };
        let engine = Engine::open(&g.loader()?, &o)?;
        let trained = engine.reading.trained.as_ref();
        let rag = self.settled(mode, trained)?;
        crate::read::policy::require(mode == Mode::Refrag && rag.policy == Policy::Rl && rag.expands(), trained)?;
        Ok((engine, mode, rag))
    }

    pub fn options(&self, mode: Mode, sampling: SamplingOptions) -> AskOptions {
        AskOptions {
            mode,
            top_k: self.top_k,
            search: self.search,
            expand: self.share(),
            budget: self.budget,
            policy: self.policy,
            sampling,
        }
    }
}

#[derive(Args, Debug)]
pub struct AskArgs {
    /// The question; `-` (or nothing, with a pipe on stdin) reads it from stdin.
    pub question: Option<String>,
    /// Answer from these text files instead of the index (read as --mode says: tokens, or
    /// compressed chunks with --expand/--policy in refrag mode).
    #[arg(long, value_name = "FILE", env = "REFRAG_ASK_CONTEXT")]
    pub context: Vec<PathBuf>,
    #[command(flatten)]
    pub rag: RagArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Interactive session (as `refrag chat`).
    #[cfg(feature = "store")]
    #[arg(short, long, env = "REFRAG_ASK_INTERACTIVE")]
    pub interactive: bool,
    #[cfg(feature = "store")]
    #[command(flatten)]
    pub session: super::chat::SessionArgs,
    /// Print one JSON object instead of streaming the answer.
    #[arg(long, env = "REFRAG_JSON")]
    pub json: bool,
}

/// The question from the argument or stdin.
pub fn read_question(arg: Option<&str>) -> Result<String> {
    let q = match arg {
        Some("-") | None => {
            if arg.is_none() && std::io::stdin().is_terminal() {
                bail!("no question given: `refrag ask \"QUESTION\"` or pipe it on stdin");
            }
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).context("stdin: the question is not UTF-8 text")?;
            s
        }
        Some(q) => q.to_string(),
    };
    let q = q.trim().to_string();
    if q.is_empty() {
        bail!("the question is empty");
    }
    Ok(q)
}

pub fn run(g: &Global, args: AskArgs) -> Result<ExitCode> {
    #[cfg(feature = "store")]
    if args.interactive {
        if args.question.is_some() || !args.context.is_empty() {
            bail!("-i starts a session over the index: give no question or --context");
        }
        return super::chat::run_session(g, &args.rag, &args.sampling, &args.session);
    }
    let question = read_question(args.question.as_deref())?;
    let opts = args.sampling.options()?;
    if args.context.is_empty() {
        return run_index(g, &args, &question, opts);
    }
    let contexts = args.context.iter().map(|p| crate::index::corpus::read_text(p)).collect::<Result<Vec<_>>>()?;
    args.rag.settled(Mode::Full, None)?; // a bad --expand fails before the models load
                                         // The files are read as the mode says: tokens (full), projected chunks (refrag, with the
                                         // policy's expanded chunks as tokens), or not at all (none).
    let mode = args.rag.mode.unwrap_or(Mode::Full);
    let ld = g.loader()?;
    let device = ld.device.clone();
    let mut decoder = ld.decoder()?;
    let refrag = mode == Mode::Refrag;
    let encoder = if refrag || args.rag.adapted { Some(ld.encoder()?) } else { None };
    let trained = match &encoder {
        Some(e) => ld.trained(e, decoder.cfg.hidden, Purpose::Answers)?,
        None => None,
    };
    let reading = ld.reading(trained, Purpose::Answers, mode, args.rag.adapted, args.rag.k)?;
    reading.adapt(&mut decoder)?;
    let trained = reading.trained.as_ref();
    let rag = args.rag.settled(mode, trained)?;
    let select = encoder
        .as_ref()
        .filter(|_| refrag)
        .map(|e| (rag.selection(trained.and_then(|t| t.policy.as_deref()), opts.seed), e));
    let compress = reading.compressor().filter(|_| refrag);
    let reader = crate::read::reader::Reader { decoder: &decoder, compress, select, question_at: reading.question_at };
    let turn = crate::read::reader::GivenTurn { history: vec![], passages: contexts, question: question.clone() };
    let window = decoder.cfg.max_positions.saturating_sub(opts.max_tokens);
    let stream = !args.json;
    let mut out = std::io::stdout().lock();
    let r = crate::read::reader::answer_given_streaming(&reader, mode, &turn, window, &opts, |piece| {
        if stream {
            out.write_all(piece.as_bytes())?;
            out.flush()?;
        }
        Ok(())
    })?;
    if r.passages_kept < turn.passages.len() && !g.quiet {
        eprintln!(
            "refrag: note: {} of {} --context files fit the window; the rest were left out",
            r.passages_kept,
            turn.passages.len()
        );
    }
    if args.json {
        let mut v = answer_json(&r.generation, mode_name(mode), reading.question_at, &device);
        v["policy"] = serde_json::to_value(policy_named(mode, rag.expands(), rag.policy))?;
        v["expand"] = rag.reported_share().into();
        v["expanded_chunks"] = r.chunks_expanded.into();
        writeln!(out, "{v}")?;
    } else {
        writeln!(out)?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(feature = "store"))]
fn run_index(_: &Global, _: &AskArgs, _: &str, _: SamplingOptions) -> Result<ExitCode> {
    bail!("this refrag was built without the `store` feature: only `ask --context FILE` works")
}

#[cfg(feature = "store")]
fn run_index(g: &Global, args: &AskArgs, question: &str, sampling: SamplingOptions) -> Result<ExitCode> {
    let (engine, mode, rag) = args.rag.engine(g)?;
    let opts = rag.options(mode, sampling);
    let stream = !args.json;
    let mut out = std::io::stdout().lock();
    let ans = engine.answer(question, &opts, |piece| {
        if stream {
            out.write_all(piece.as_bytes())?;
            out.flush()?;
        }
        Ok(())
    })?;
    if args.json {
        let mut v = answer_json(&ans.generation, mode_name(mode), engine.question_at(), &engine.decoder.device);
        v["sources"] = serde_json::to_value(&ans.sources)?;
        v["retrieval_ms"] = ans.retrieval_ms.into();
        // building the decoder input (policy choice included): part of ttft_ms
        v["input_ms"] = ans.input_ms.into();
        v["context_tokens"] = ans.context_tokens.into();
        v["chunks"] = ans.chunks.into();
        v["policy"] = serde_json::to_value(policy_named(mode, rag.expands(), rag.policy))?;
        v["expand"] = rag.reported_share().into();
        v["expanded_chunks"] = ans.expanded_chunks.into();
        writeln!(out, "{v}")?;
    } else {
        writeln!(out)?;
        if ans.sources.is_empty() && opts.top_k > 0 && !g.quiet {
            eprintln!("refrag: no passages found in {}", args.rag.db);
        }
        if !ans.sources.is_empty() {
            writeln!(out, "\nsources:")?;
            for s in &ans.sources {
                writeln!(out, "  {:.3}  {}  {}", s.score, s.passage_id, s.title)?;
            }
        }
    }
    // 1 = no answer: nothing retrieved (where retrieval was asked for) or nothing generated.
    let nothing = (ans.sources.is_empty() && opts.top_k > 0) || ans.generation.text.trim().is_empty();
    Ok(if nothing { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

pub fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Refrag => "refrag",
        Mode::Full => "full",
        Mode::None => "none",
    }
}

/// The expansion policy a summary names: only a compressed reading with chunks to expand has
/// one (null otherwise).
pub fn policy_named(m: Mode, expands: bool, policy: Policy) -> Option<Policy> {
    (m == Mode::Refrag && expands).then_some(policy)
}

/// The JSON object `ask --json` prints.
pub fn answer_json(
    gen: &Generation,
    mode: &str,
    question_at: QuestionAt,
    device: &candle_core::Device,
) -> serde_json::Value {
    serde_json::json!({
        "answer": gen.text,
        "mode": mode,
        "ttft_ms": gen.ttft_ms(),
        "tokens_per_s": gen.tokens_per_s(),
        "prompt_tokens": gen.prompt_positions,
        "decoder_positions": gen.prompt_positions,
        "question_at": question_at,
        "generated_tokens": gen.generated_tokens,
        "kv_cache_bytes": gen.kv_cache_bytes,
        "device": crate::device::name(device),
    })
}
