//! `refrag ask`: answer one question.

use super::args::{mode_name, policy_named, RagArgs, SamplingArgs};
use super::Global;
use crate::model::weights::Purpose;
use crate::options::{Mode, QuestionAt};
use crate::read::generate::{Generation, SamplingOptions};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

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
    pub session: super::args::SessionArgs,
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
        Some(e) => ld.trained(e, &decoder, Purpose::Answers)?,
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
    let (engine, mode, rag) = args.rag.engine(g, true)?;
    let opts = rag.options(mode, sampling);
    let stream = !args.json;
    // --mode none reads no passages: none found is what it asked for
    let retrieves = opts.top_k > 0 && mode != Mode::None;
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
        if ans.sources.is_empty() && retrieves && !g.quiet {
            eprintln!("refrag: no passages found in {}", args.rag.db);
        }
        if !ans.sources.is_empty() {
            writeln!(out, "\nsources:")?;
            for s in &ans.sources {
                writeln!(out, "  {:.3}  {}  {}", s.score, s.label(), s.title)?;
            }
        }
    }
    // 1 = no answer: nothing retrieved (where retrieval was asked for) or nothing generated.
    let nothing = (ans.sources.is_empty() && retrieves) || ans.generation.text.trim().is_empty();
    Ok(if nothing { ExitCode::from(1) } else { ExitCode::SUCCESS })
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
