//! The command line: argument definitions (clap) and dispatch. Each subcommand lives in its
//! own file and calls into the library; this module only parses, resolves and reports.

/// `println!` that returns the write error (a closed pipe ends the command quietly, see
/// [`main`]) instead of panicking.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($t)*)?
    }};
}

mod args;
mod ask;
mod bench;
#[cfg(feature = "store")]
mod chat;
pub mod config;
mod dataset;
pub mod docs;
mod doctor;
#[cfg(feature = "store")]
mod documents;
mod eval;
#[cfg(feature = "store")]
mod index;
mod models;
mod top1;
mod train;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "refrag",
    version,
    about = "Offline retrieval-augmented generation with REFRAG chunk compression",
    long_about = "refrag answers questions from your documents with a small local model. Passages are \
                  cut into k-token chunks, each encoded once at index time; at question time the decoder \
                  reads one projected vector per chunk instead of k tokens (REFRAG, arXiv 2509.01092)."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Options every subcommand takes.
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Device: auto, cpu, cuda or cuda:N.
    #[arg(long, global = true, env = "REFRAG_DEVICE", default_value = "auto")]
    pub device: String,
    /// refrag's data folder (model cache). Default: ~/.cache/refrag.
    #[arg(long, global = true, env = "REFRAG_HOME")]
    pub home: Option<PathBuf>,
    /// Decoder GGUF file to use instead of the pinned SmolLM2-135M-Instruct.
    #[arg(long, global = true, env = "REFRAG_DECODER")]
    pub decoder: Option<PathBuf>,
    /// Encoder folder (config.json, tokenizer.json, model.safetensors) instead of all-MiniLM-L6-v2.
    #[arg(long, global = true, env = "REFRAG_ENCODER")]
    pub encoder: Option<PathBuf>,
    /// Decoder compute dtype: auto (f32 on CPU, bf16 on CUDA), f32, bf16 or f16.
    #[arg(long, global = true, env = "REFRAG_DTYPE", default_value = "auto")]
    pub dtype: String,
    /// Folder with trained REFRAG weights (projector.safetensors, encoder.safetensors).
    /// Default: $REFRAG_HOME/weights, else the weights/ shipped with refrag; for answers (index,
    /// ask, chat, eval of questions) their qa/ subfolder first (fine-tuned for answers).
    #[arg(long, global = true, env = "REFRAG_WEIGHTS")]
    pub weights: Option<PathBuf>,
    /// Object-store option for --db s3://, gs://, az:// (repeatable KEY=VALUE, e.g.
    /// aws_endpoint=http://127.0.0.1:9000, aws_region=eu-west-1, allow_http=true); credentials
    /// also come from the standard environment variables (AWS_ACCESS_KEY_ID, ...).
    #[arg(
        long = "storage-option",
        value_name = "KEY=VALUE",
        global = true,
        env = "REFRAG_STORAGE_OPTIONS",
        value_delimiter = ','
    )]
    pub storage_options: Vec<String>,
    /// Where a question with passages puts the question: `after` the passages, `before` them (the
    /// paper's order), or `both` before and after them (the copy after keeps it next to the
    /// answer). `auto`: as the trained weights that the answers read were trained (their
    /// card.json's question_at; the shipped weights/qa: both), `after` for the base decoder.
    #[arg(long, global = true, env = "REFRAG_QUESTION_AT", value_enum, default_value = "auto")]
    pub question_at: crate::options::QuestionAt,
    /// No progress bars or notes on stderr.
    #[arg(short, long, global = true, env = "REFRAG_QUIET")]
    pub quiet: bool,
    /// Log what happens to stderr: -v steps and timings, -vv details, -vvv also libraries.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, env = "REFRAG_VERBOSE")]
    pub verbose: u8,
}

impl Global {
    pub fn home(&self) -> PathBuf {
        self.home.clone().unwrap_or_else(crate::model::cache::home_dir)
    }
    pub fn device(&self) -> Result<candle_core::Device> {
        crate::device::parse(&self.device)
    }
    /// The library's loader, with --device and --dtype checked.
    pub fn loader(&self) -> Result<crate::model::load::Loader> {
        self.loader_on(self.device()?)
    }
    /// The library's loader on a device already made (with --dtype checked).
    pub fn loader_on(&self, device: candle_core::Device) -> Result<crate::model::load::Loader> {
        use candle_core::DType;
        let dtype = match self.dtype.as_str() {
            "auto" => None,
            "f32" => Some(DType::F32),
            "bf16" => Some(DType::BF16),
            "f16" => Some(DType::F16),
            d => anyhow::bail!("--dtype {d}: expected auto, f32, bf16 or f16"),
        };
        Ok(crate::model::load::Loader {
            device,
            dtype,
            home: self.home(),
            decoder: self.decoder.clone(),
            encoder: self.encoder.clone(),
            weights: self.weights.clone(),
            question_at: self.question_at,
            quiet: self.quiet,
        })
    }
    /// --storage-option pairs, checked.
    pub fn storage_options(&self) -> Result<Vec<(String, String)>> {
        self.storage_options
            .iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
                _ => anyhow::bail!("--storage-option {kv}: expected KEY=VALUE"),
            })
            .collect()
    }
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Time to first token and more: full context against REFRAG.
    Bench(bench::BenchArgs),
    /// Train REFRAG weights (projector, chunk-encoder layers, decoder adapters) on text.
    Train(train::TrainArgs),
    /// Convert SQuAD / NQ-open oracle / HotpotQA / MTRAG files into refrag corpus, question
    /// and task JSONL.
    Dataset(dataset::DatasetArgs),
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    Completions(docs::CompletionsArgs),
    /// Write the man pages (generated from these definitions).
    #[command(hide = true)]
    Man(docs::ManArgs),
    /// Teacher-forced top-1 ids over a text (to compare devices).
    #[command(hide = true)]
    Top1(top1::Top1Args),
    /// Check models, devices, trained weights, config and an index; exit 1 if something is wrong.
    Doctor(doctor::DoctorArgs),
    /// Fetch, verify and list the base models.
    #[command(subcommand)]
    Models(models::ModelsCmd),
    /// Index documents: passages, decoder tokens, chunk vectors, into LanceDB.
    #[cfg(feature = "store")]
    Index(index::IndexArgs),
    /// The documents of an index: list, remove, count.
    #[cfg(feature = "store")]
    #[command(subcommand)]
    Docs(documents::DocsCmd),
    /// Answer a question from the index (or from --context files).
    Ask(ask::AskArgs),
    /// Talk with your documents: an interactive multi-turn session (history compressed in
    /// --mode refrag).
    #[cfg(feature = "store")]
    Chat(chat::ChatArgs),
    /// Answer a JSONL file of questions and score the answers; `eval perplexity` scores
    /// compressed reading of text.
    Eval(eval::EvalArgs),
}

/// Parse arguments, run, and turn the outcome into an exit code: 0 ok, 2 error.
pub fn main() -> ExitCode {
    use clap::CommandFactory;
    if let Err(e) = config::apply(&Cli::command()) {
        let _ = writeln!(std::io::stderr(), "refrag: {}", one_line(&e));
        return ExitCode::from(2);
    }
    let parsed = Cli::command().try_get_matches().and_then(|m| {
        use clap::FromArgMatches;
        Cli::from_arg_matches(&m).map(|c| (c, m))
    });
    let (cli, matches) = match parsed {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(cli, &matches) {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "refrag: {}", one_line(&e));
            ExitCode::from(2)
        }
    }
}

/// Logs on stderr at the level -v asks for (refrag's own events; -vvv adds the libraries').
fn init_logging(g: &Global) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let level = match (g.quiet, g.verbose) {
        (true, _) => LevelFilter::ERROR,
        (_, 0) => LevelFilter::WARN,
        (_, 1) => LevelFilter::INFO,
        (_, 2) => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    };
    let others = if g.verbose >= 3 { LevelFilter::DEBUG } else { LevelFilter::WARN };
    let filter = Targets::new().with_target("refrag", level).with_default(others);
    let ansi = crate::progress::color_ok();
    let _ = tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi).with_target(false))
        .with(filter)
        .try_init();
}

fn run(cli: Cli, matches: &clap::ArgMatches) -> Result<ExitCode> {
    init_logging(&cli.global);
    match cli.cmd {
        Cmd::Bench(args) => bench::run(&cli.global, args),
        Cmd::Train(mut args) => {
            args.given = matches.subcommand_matches("train").map(train::given).unwrap_or_default();
            train::run(&cli.global, args)
        }
        Cmd::Dataset(a) => dataset::run(&cli.global, a),
        Cmd::Completions(a) => docs::completions(a),
        Cmd::Man(a) => docs::man(a),
        Cmd::Top1(args) => top1::run(&cli.global, args),
        Cmd::Models(cmd) => models::run(&cli.global, cmd),
        Cmd::Doctor(a) => doctor::run(&cli.global, a),
        #[cfg(feature = "store")]
        Cmd::Index(args) => index::run(&cli.global, args),
        #[cfg(feature = "store")]
        Cmd::Docs(cmd) => documents::run(&cli.global, cmd),
        Cmd::Ask(args) => ask::run(&cli.global, args),
        #[cfg(feature = "store")]
        Cmd::Chat(a) => chat::run(&cli.global, a),
        Cmd::Eval(args) => eval::run(&cli.global, args),
    }
}

/// An error and its causes on one line (as `{:#}` joins them), without the backtraces candle
/// attaches to its errors when RUST_BACKTRACE is set.
pub fn one_line(e: &anyhow::Error) -> String {
    fn candle(e: &candle_core::Error) -> String {
        use candle_core::Error as E;
        match e {
            E::WithBacktrace { inner, .. } => candle(inner),
            E::Context { inner, context } => format!("{context}: {}", candle(inner)),
            E::WithPath { inner, path } => format!("{}: {}", path.display(), candle(inner)),
            other => other.to_string(),
        }
    }
    let parts: Vec<String> =
        e.chain().map(|c| c.downcast_ref::<candle_core::Error>().map_or_else(|| c.to_string(), candle)).collect();
    parts.join(": ").split_whitespace().collect::<Vec<_>>().join(" ")
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_line_drops_candle_backtraces() {
        let inner = candle_core::Error::Msg("boom\nsecond line".into());
        let e = candle_core::Error::WithBacktrace {
            inner: Box::new(inner.context("reading x")),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        let e = anyhow::Error::from(e).context("loading the decoder");
        assert_eq!(super::one_line(&e), "loading the decoder: reading x: boom second line");
    }
}
