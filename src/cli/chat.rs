//! `refrag chat` (and `refrag ask -i`): an interactive multi-turn session over the index.
//!
//! On a terminal: line editing and a history file (rustyline), Ctrl-C cancels the answer being
//! written (or clears the line), Ctrl-D leaves. Otherwise stdin is read as one question (or
//! slash command) per line, so sessions can be scripted.

use super::args::{mode_name, RagArgs, SamplingArgs, SessionArgs};
use super::Global;
use crate::read::chat::Session;
use crate::read::engine::{AskOptions, Engine, Mode};
use anyhow::{anyhow, Result};
use clap::Args;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub rag: RagArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub session: SessionArgs,
}

const HELP: &str = "\
/help            this text
/sources         sources of the last answer
/reset           forget the conversation
/k N             passages retrieved per question (top-k)
/expand P        fraction of chunks expanded to tokens (refrag mode)
/budget N        instead: expand while the passages fit in N positions (refrag mode)
/mode M          refrag, full or none (refrag needs the session started with --mode refrag)
/save FILE       write the conversation as JSON
/quit            leave (also Ctrl-D)";

pub fn run(g: &Global, a: ChatArgs) -> Result<ExitCode> {
    run_session(g, &a.rag, &a.sampling, &a.session)
}

pub fn run_session(g: &Global, rag: &RagArgs, sampling: &SamplingArgs, sargs: &SessionArgs) -> Result<ExitCode> {
    let (engine, mode, rag) = rag.engine(g, true)?;
    let mut opts = rag.options(mode, sampling.options()?);
    let window = sargs.window.unwrap_or(engine.decoder.cfg.max_positions).min(engine.decoder.cfg.max_positions);
    let window = window.saturating_sub(opts.sampling.max_tokens);
    let mut session = Session::new(window);
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let c = cancel.clone();
        // Ctrl-C while an answer is written cancels it; at the prompt the line editor reads it.
        let _ = ctrlc::set_handler(move || c.store(true, Ordering::SeqCst));
    }
    let tty = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    if tty {
        let mut rl = rustyline::DefaultEditor::new().map_err(|e| anyhow!("line editor: {e}"))?;
        let hist = sargs.history.clone().unwrap_or_else(|| g.home().join("chat_history"));
        let _ = rl.load_history(&hist);
        eprintln!("refrag chat: mode {}, {} — /help for commands, Ctrl-D to leave", mode_name(opts.mode), rag.db);
        loop {
            match rl.readline("> ") {
                Ok(line) => {
                    let _ = rl.add_history_entry(line.as_str());
                    if !handle(&engine, &mut session, &mut opts, &line, &cancel)? {
                        break;
                    }
                }
                Err(rustyline::error::ReadlineError::Interrupted) => continue,
                Err(rustyline::error::ReadlineError::Eof) => break,
                Err(e) => return Err(anyhow!("line editor: {e}")),
            }
        }
        if let Some(dir) = hist.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = rl.save_history(&hist);
    } else {
        for line in std::io::stdin().lock().lines() {
            let line = line.map_err(|e| anyhow!("stdin: {e}"))?;
            if !handle(&engine, &mut session, &mut opts, &line, &cancel)? {
                break;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One input line; false = leave.
fn handle(
    engine: &Engine,
    session: &mut Session,
    opts: &mut AskOptions,
    line: &str,
    cancel: &AtomicBool,
) -> Result<bool> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(true);
    }
    let mut out = std::io::stdout().lock();
    if let Some(cmd) = line.strip_prefix('/') {
        let (name, arg) = cmd.split_once(' ').map(|(n, a)| (n, a.trim())).unwrap_or((cmd, ""));
        match name {
            "quit" | "exit" | "q" => return Ok(false),
            "help" | "?" => writeln!(out, "{HELP}")?,
            "reset" => {
                session.reset();
                writeln!(out, "(conversation forgotten)")?;
            }
            "sources" => match session.turns.last() {
                Some(t) if !t.sources.is_empty() => {
                    for s in &t.sources {
                        writeln!(out, "  {:.3}  {}  {}", s.score, s.label(), s.title)?;
                    }
                }
                _ => writeln!(out, "(no sources yet)")?,
            },
            "k" => match arg.parse::<usize>() {
                Ok(k) if k <= 100 => {
                    opts.top_k = k;
                    writeln!(out, "(top-k = {k})")?;
                }
                _ => writeln!(out, "/k N: N between 0 and 100")?,
            },
            "expand" => match arg.parse::<f64>() {
                Ok(p) if (0.0..=1.0).contains(&p) => {
                    opts.expand = p;
                    opts.budget = None;
                    writeln!(out, "(expand = {p})")?;
                }
                _ => writeln!(out, "/expand P: P between 0 and 1")?,
            },
            "budget" => match arg.parse::<usize>() {
                Ok(n) => {
                    opts.budget = Some(n);
                    writeln!(out, "(budget = {n} positions)")?;
                }
                _ => writeln!(out, "/budget N: N decoder positions for the passages")?,
            },
            "mode" => match arg {
                "refrag" if engine.compressor().is_none() => {
                    writeln!(out, "refrag mode needs the session started with --mode refrag")?
                }
                "refrag" | "full" | "none" => {
                    opts.mode = match arg {
                        "refrag" => Mode::Refrag,
                        "full" => Mode::Full,
                        _ => Mode::None,
                    };
                    writeln!(out, "(mode = {arg}; earlier turns of other modes are left out)")?;
                }
                _ => writeln!(out, "/mode refrag|full|none")?,
            },
            "save" if !arg.is_empty() => {
                let turns: Vec<serde_json::Value> = session
                    .turns
                    .iter()
                    .map(|t| serde_json::json!({"question": t.question, "answer": t.answer, "sources": t.sources}))
                    .collect();
                let path = PathBuf::from(arg);
                match std::fs::write(&path, serde_json::to_vec_pretty(&turns)?) {
                    Ok(()) => writeln!(out, "(saved {} turns to {})", turns.len(), path.display())?,
                    Err(e) => writeln!(out, "{}: {e}", path.display())?,
                }
            }
            _ => writeln!(out, "unknown command /{name}; /help lists them")?,
        }
        return Ok(true);
    }
    cancel.store(false, Ordering::SeqCst);
    let res = session.ask(engine, line, opts, |piece| {
        if cancel.load(Ordering::SeqCst) {
            return Err(anyhow!(Cancelled));
        }
        out.write_all(piece.as_bytes())?;
        out.flush()?;
        Ok(())
    });
    match res {
        Ok(r) => {
            writeln!(out)?;
            if r.dropped_turns > 0 {
                eprintln!("(left out the {} oldest turn(s): the window is full)", r.dropped_turns);
            }
        }
        Err(e) if e.is::<Cancelled>() => writeln!(out, "\n(cancelled)")?,
        Err(e) => writeln!(out, "\nrefrag: {}", super::one_line(&e))?,
    }
    writeln!(out)?;
    out.flush()?;
    Ok(true)
}

#[derive(Debug)]
struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cancelled")
    }
}

impl std::error::Error for Cancelled {}
