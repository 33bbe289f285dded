//! `refrag bench`: TTFT / TTIT / KV-cache size, full context against REFRAG.

use super::Global;
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

/// Public-domain text used as context when --text is not given (Alice, chapters 1-3).
const DEFAULT_TEXT: &str = include_str!("../../fixtures/alice_ch1-3.txt");

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Context lengths in tokens (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "2048,4096,8192,16384", env = "REFRAG_BENCH_CONTEXTS")]
    pub contexts: Vec<usize>,
    /// Chunk sizes (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "8,16,32", env = "REFRAG_BENCH_K")]
    pub k: Vec<usize>,
    /// Timed repeats per variant (after one warm-up).
    #[arg(long, default_value_t = 3, env = "REFRAG_BENCH_REPEATS")]
    pub repeats: usize,
    /// Greedy steps after the first token, for the time per later token.
    #[arg(long, default_value_t = 16, env = "REFRAG_BENCH_DECODE_TOKENS")]
    pub decode_tokens: usize,
    /// Also time decoding with dense weights only (no quantized matrices).
    #[arg(long, env = "REFRAG_BENCH_DENSE_DECODE")]
    pub dense_decode: bool,
    /// Skip the "not cached" variant (encoder in the timed path).
    #[arg(long, env = "REFRAG_BENCH_NO_ENCODER")]
    pub no_encoder: bool,
    /// Text to draw the context from (default: a bundled public-domain text).
    #[arg(long, env = "REFRAG_BENCH_TEXT")]
    pub text: Option<PathBuf>,
    /// Sequences decoded together (throughput at batch > 1).
    #[arg(long, default_value_t = 1, env = "REFRAG_BENCH_BATCH")]
    pub batch: usize,
    /// An outside engine timed on the same full-context prompt: "python3
    /// scripts/llama_cpp_peer.py MODEL.gguf" (llama.cpp, CPU) or "python3 scripts/torch_peer.py
    /// MODEL.gguf" (PyTorch + transformers, GPU).
    #[arg(long, env = "REFRAG_BENCH_PEER")]
    pub peer: Option<String>,
    /// Write a PNG plot of the accelerations (TTFT and throughput vs context length per k).
    #[arg(long, value_name = "FILE.png", env = "REFRAG_BENCH_PLOT")]
    pub plot: Option<PathBuf>,
    /// Print rows as JSON lines.
    #[arg(long, env = "REFRAG_JSON")]
    pub json: bool,
}

pub fn run(g: &Global, args: BenchArgs) -> Result<ExitCode> {
    if args.repeats == 0 || args.batch == 0 || args.contexts.is_empty() || args.k.contains(&0) {
        bail!("--repeats, --batch, --contexts and --k must be positive");
    }
    let text = match &args.text {
        Some(p) => crate::index::corpus::read_text(p)?,
        None => DEFAULT_TEXT.to_string(),
    };
    let ld = g.loader()?;
    let device = ld.device.clone();
    let decoder = ld.decoder()?;
    let dense = if args.dense_decode { Some(ld.decoder_with(crate::model::decoder::Ops::Fused, false)?) } else { None };
    // Timing does not depend on the weights' values: untrained ones do when none are found.
    let base = ld.encoder()?;
    let in_dim = base.dim;
    let (projector, chunk_encoder) = match ld.trained(&base, &decoder, crate::model::weights::Purpose::Text)? {
        // Adapters are not folded in: timing does not depend on the weights' values.
        Some(t) => (t.projector, t.chunk_encoder),
        None => {
            let vm = candle_nn::VarMap::new();
            let p = crate::model::projector::Projector::init(&vm, &device, in_dim, decoder.cfg.hidden)?;
            (p, crate::model::compressor::ChunkEncoder::MiniLm(base))
        }
    };
    let encoder = if args.no_encoder { None } else { Some(chunk_encoder) };
    let peer = match &args.peer {
        Some(cmd) => Some(std::cell::RefCell::new(crate::bench::Peer::start(cmd)?)),
        None => None,
    };
    let setup = crate::bench::BenchSetup {
        decoder: &decoder,
        dense_decoder: dense.as_ref(),
        encoder: encoder.as_ref(),
        projector: &projector,
        text: &text,
        repeats: args.repeats,
        decode_tokens: args.decode_tokens,
        batch: args.batch,
        peer: peer.as_ref(),
    };
    let pb = crate::progress::spinner(g.quiet, "bench".into());
    let rows = crate::bench::run(&setup, &args.contexts, &args.k, |m| pb.set_message(m.to_string()))?;
    pb.finish_and_clear();
    let dev = crate::device::name(&device);
    if let Some(p) = &args.plot {
        crate::bench::plot::speedups(&rows, &dev, p)?;
        if !g.quiet {
            eprintln!("plot written to {}", p.display());
        }
    }
    if args.json {
        for r in &rows {
            let mut v = serde_json::to_value(r)?;
            v["device"] = dev.clone().into();
            outln!("{v}");
        }
    } else {
        outln!("device: {dev}; batch {}; median of {} runs after a warm-up", args.batch, args.repeats);
        outln!(
            "{:>8} {:<30} {:>9} {:>10} {:>10} {:>10} {:>9} {:>10} {:>9} {:>10} {:>9}",
            "context",
            "variant",
            "positions",
            "ttft_ms",
            "ttit_ms",
            "answer_ms",
            "speedup",
            "tok/s",
            "tput_x",
            "kv_MiB",
            "mem_MiB"
        );
        for r in &rows {
            let f = |x: Option<f64>, p: usize| x.map(|v| format!("{v:.p$}")).unwrap_or_else(|| "-".into());
            outln!(
                "{:>8} {:<30} {:>9} {:>10} {:>10} {:>10} {:>9} {:>10} {:>9} {:>10} {:>9}",
                r.context_tokens,
                r.variant,
                r.positions,
                r.ttft_ms_median.map(|v| format!("{v:.1}")).unwrap_or_else(|| "over window".into()),
                f(r.ttit_ms_median, 2),
                f(r.answer_ms_median, 1),
                f(r.speedup, 2),
                f(r.throughput_tok_s, 1),
                f(r.throughput_speedup, 2),
                f(r.kv_cache_bytes.map(|b| b as f64 / (1 << 20) as f64), 1),
                f(r.peak_mem_mib, 0),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
