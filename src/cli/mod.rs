//! The command line: argument definitions (clap) and dispatch. Each subcommand lives in its
//! own file and calls into the library; this module only parses, resolves and reports.

mod ask;
mod bench;
mod dataset;
pub mod docs;
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
    /// Default: $REFRAG_HOME/weights, else the weights/ shipped with refrag.
    #[arg(long, global = true, env = "REFRAG_WEIGHTS")]
    pub weights: Option<PathBuf>,
    /// No progress bars or notes on stderr.
    #[arg(short, long, global = true, env = "REFRAG_QUIET")]
    pub quiet: bool,
}

impl Global {
    pub fn home(&self) -> PathBuf {
        self.home.clone().unwrap_or_else(crate::models::home_dir)
    }
    pub fn device(&self) -> Result<candle_core::Device> {
        crate::device::parse(&self.device)
    }
    /// Load the decoder (pulling the pinned model on first need).
    pub fn load_decoder(&self, device: &candle_core::Device) -> Result<crate::decoder::Decoder> {
        self.load_decoder_with(device, crate::decoder::Ops::Fused, true)
    }
    pub fn load_decoder_with(
        &self,
        device: &candle_core::Device,
        ops: crate::decoder::Ops,
        keep_quant: bool,
    ) -> Result<crate::decoder::Decoder> {
        use candle_core::DType;
        let dtype = match self.dtype.as_str() {
            "auto" => None,
            "f32" => Some(DType::F32),
            "bf16" => Some(DType::BF16),
            "f16" => Some(DType::F16),
            d => anyhow::bail!("--dtype {d}: expected auto, f32, bf16 or f16"),
        };
        let path = crate::models::resolve_decoder(self.decoder.as_deref(), &self.home(), self.quiet)?;
        crate::decoder::Decoder::load_as(&path, device, dtype, ops, keep_quant)
    }
    /// Trained weights from --weights or the default folders; None when there are none (an
    /// explicit --weights folder without them is an error).
    pub fn trained(&self, encoder: &crate::encoder::Encoder, hidden: usize) -> Result<Option<crate::projector::Trained>> {
        let dirs = crate::projector::weights_dirs(self.weights.as_deref(), &self.home());
        match crate::projector::find(&dirs, encoder, hidden)? {
            Some(t) => Ok(Some(t)),
            None if self.weights.is_some() => Err(crate::projector::missing(&dirs)),
            None => Ok(None),
        }
    }
    /// Load the encoder (pulling the pinned model on first need).
    pub fn load_encoder(&self, device: &candle_core::Device) -> Result<crate::encoder::Encoder> {
        let dir = crate::models::resolve_encoder(self.encoder.as_deref(), &self.home(), self.quiet)?;
        crate::encoder::Encoder::load(&dir, device)
    }
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Time to first token and more: full context against REFRAG.
    Bench(bench::BenchArgs),
    /// Train REFRAG weights (projector) on text.
    Train(train::TrainArgs),
    /// Convert SQuAD / NQ-open oracle files into refrag corpus and question JSONL.
    Dataset(dataset::DatasetArgs),
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    Completions(docs::CompletionsArgs),
    /// Write the man pages (generated from these definitions).
    #[command(hide = true)]
    Man(docs::ManArgs),
    /// Teacher-forced top-1 ids over a text (to compare devices).
    #[command(hide = true)]
    Top1(top1::Top1Args),
    /// Fetch, verify and list the base models.
    #[command(subcommand)]
    Models(models::ModelsCmd),
    /// Index documents: passages, decoder tokens, chunk vectors, into LanceDB.
    #[cfg(feature = "store")]
    Index(index::IndexArgs),
    /// Answer a question from the index (or from --context files).
    Ask(ask::AskArgs),
    /// Answer a JSONL file of questions and score the answers; `eval perplexity` scores
    /// compressed reading of text.
    Eval(eval::EvalArgs),
}

/// Parse arguments, run, and turn the outcome into an exit code: 0 ok, 2 error.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            let _ = writeln!(std::io::stderr(), "refrag: {msg}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Bench(args) => bench::run(&cli.global, args),
        Cmd::Train(args) => train::run(&cli.global, args),
        Cmd::Dataset(a) => dataset::run(&cli.global, a),
        Cmd::Completions(a) => docs::completions(a),
        Cmd::Man(a) => docs::man(a),
        Cmd::Top1(args) => top1::run(&cli.global, args),
        Cmd::Models(cmd) => models::run(&cli.global, cmd),
        #[cfg(feature = "store")]
        Cmd::Index(args) => index::run(&cli.global, args),
        Cmd::Ask(args) => ask::run(&cli.global, args),
        Cmd::Eval(args) => eval::run(&cli.global, args),
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
