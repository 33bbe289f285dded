//! Latency measurements: full-context prefill against REFRAG's compressed prefill, in one
//! process, interleaved, after a warm-up (REFRAG paper, Figure 2 and Appendix B.4).
//!
//! For each context length L: (a) full: L context tokens; (b) refrag-k cached: L/k chunk vectors
//! already computed (as at question time with an index), projected and prefilled; (c) refrag-k
//! not cached: the encoder runs over the L/k chunk texts inside the timed path.
//! Time to first token (TTFT) = prefill + first sampled token; time per later token (TTIT)
//! from `decode_tokens` greedy steps.

pub mod plot;

use crate::model::compressor::{self, ChunkEncoder, Compressor};
use crate::model::decoder::Decoder;
use crate::model::projector::Projector;
use crate::read::prompt::{self, Segment};
use anyhow::Result;
use candle_core::Tensor;
use std::time::Instant;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub context_tokens: usize,
    pub variant: String,
    pub k: usize,
    pub positions: usize,
    /// None: impossible (longer than the decoder's window).
    pub ttft_ms_median: Option<f64>,
    pub ttft_ms_min: Option<f64>,
    pub ttft_ms_max: Option<f64>,
    pub ttit_ms_median: Option<f64>,
    /// Time to the whole answer: prefill, the first token and `decode_tokens` more.
    pub answer_ms_median: Option<f64>,
    pub kv_cache_bytes: Option<usize>,
    /// TTFT of full context divided by this row's TTFT (same L).
    pub speedup: Option<f64>,
    /// Sequences decoded together.
    pub batch: usize,
    /// Generated tokens per second over prefill + decoding, all sequences of the batch.
    pub throughput_tok_s: Option<f64>,
    /// Full context's throughput divided into this row's (same L).
    pub throughput_speedup: Option<f64>,
    /// Peak resident memory of the process during the variant's run (CPU; the peak is reset
    /// before each run). None on CUDA (pooled allocator) and for a peer.
    pub peak_mem_mib: Option<f64>,
}

pub struct BenchSetup<'a> {
    pub decoder: &'a Decoder,
    /// The same decoder without quantized weights: adds a "full-dense" row whose later tokens
    /// run through the dense matrices (to show which decode path is faster).
    pub dense_decoder: Option<&'a Decoder>,
    /// The chunk encoder (None: the cached rows only).
    pub encoder: Option<&'a ChunkEncoder>,
    pub projector: &'a Projector,
    /// Text to draw context tokens from (repeated as needed).
    pub text: &'a str,
    pub repeats: usize,
    pub decode_tokens: usize,
    /// Sequences per run (batch > 1 for throughput).
    pub batch: usize,
    /// An outside engine timed on the same full-context prompt (see `Peer`).
    pub peer: Option<&'a std::cell::RefCell<Peer>>,
}

/// An outside engine (llama.cpp through scripts/llama_cpp_peer.py, PyTorch through
/// scripts/torch_peer.py) run as a child process: it gets the full-context prompt's token ids,
/// the batch and the greedy steps as one JSON line and answers with its own times, so pipe
/// costs are not counted.
pub struct Peer {
    pub name: String,
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Peer {
    /// Start `command` through `sh -c` and wait for its `{"ready": true, "name": ...}` line.
    pub fn start(command: &str) -> Result<Self> {
        use std::io::BufRead;
        let mut child = std::process::Command::new("sh")
            .args(["-c", command])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| anyhow::anyhow!("--peer {command:?}: cannot start: {e}"))?;
        let mut out = std::io::BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        out.read_line(&mut line)?;
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .map_err(|_| anyhow::anyhow!("--peer {command:?}: did not start (no ready line; see its stderr above)"))?;
        let name = v["name"].as_str().unwrap_or("peer").to_string();
        Ok(Self { name, child, out })
    }

    /// The peer's times for `batch` copies of `tokens` and `decode` greedy steps: prefill ms
    /// and, when the peer decodes (llama_cpp_peer.py does not), ms per later token.
    fn time(&mut self, tokens: &[u32], batch: usize, decode: usize) -> Result<(f64, Option<f64>)> {
        use std::io::{BufRead, Write};
        let stdin = self.child.stdin.as_mut().expect("piped stdin");
        writeln!(stdin, "{}", serde_json::json!({ "tokens": tokens, "batch": batch, "decode": decode }))?;
        stdin.flush()?;
        let mut line = String::new();
        if self.out.read_line(&mut line)? == 0 {
            anyhow::bail!("peer {} exited", self.name);
        }
        let v: serde_json::Value = serde_json::from_str(line.trim())?;
        let prefill =
            v["prefill_ms"].as_f64().ok_or_else(|| anyhow::anyhow!("peer {}: no prefill_ms in {line}", self.name))?;
        Ok((prefill, v["decode_ms"].as_f64()))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Reset the process's peak resident set (Linux), so the next reading is this run's peak.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident set since the last reset, MiB (Linux; None elsewhere).
fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// One timed run.
#[derive(Debug, Clone, Copy)]
struct Sample {
    ttft: f64,
    ttit: f64,
    kv: usize,
    total_s: f64,
    mem: Option<f64>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Time one prefill of `batch` copies of the input + `decode` greedy steps.
fn time_decode(
    d: &Decoder,
    segs: &[Segment],
    decode: usize,
    batch: usize,
    pre: impl Fn() -> Result<Vec<Segment>>,
) -> Result<Sample> {
    reset_peak_rss();
    let t0 = Instant::now();
    let extra = pre()?;
    let mut all = extra;
    all.extend_from_slice(segs);
    let input = prompt::assemble(d, &all)?;
    let embeds = if batch > 1 { input.embeds.repeat((batch, 1, 1))? } else { input.embeds.clone() };
    let mut st = d.new_state(input.positions + decode + 1);
    crate::profile::start(&d.device);
    let logits = d.prefill(&embeds, &mut st)?;
    if let Some(phases) = crate::profile::take() {
        eprintln!("profile: prefill of {} x {} positions: {phases}", batch, input.positions);
    }
    // one host copy per step for the whole batch
    let greedy =
        |logits: &Tensor| -> Result<Vec<u32>> { Ok(crate::model::elementwise::argmax(logits)?.to_vec1::<u32>()?) };
    let mut next = greedy(&logits)?;
    let ttft = t0.elapsed().as_secs_f64() * 1e3;
    let t1 = Instant::now();
    for _ in 0..decode {
        next = greedy(&d.step(&mut st, &next)?)?;
    }
    let ttit = if decode > 0 { t1.elapsed().as_secs_f64() * 1e3 / decode as f64 } else { 0.0 };
    let total_s = t0.elapsed().as_secs_f64();
    // CUDA memory comes from a pool that keeps what earlier runs freed: no per-run peak there
    let mem = if d.device.is_cpu() { peak_rss_mib() } else { None };
    Ok(Sample { ttft, ttit, kv: st.bytes(), total_s, mem })
}

/// What one variant reads and how its input is made.
enum Input {
    /// Context and question tokens (full context).
    Tokens,
    /// Chunk vectors computed before timing (as an index holds them), projected in the timed
    /// path.
    Cached(Tensor),
    /// The chunks' tokens, encoded and projected in the timed path.
    Encode(usize),
    /// Timed by the outside peer.
    Peer,
}

/// One variant of a context length, timed `repeats` times interleaved with the others.
struct Variant {
    name: String,
    k: usize,
    positions: usize,
    /// The decoder input that does not depend on timing (None: longer than the window).
    segs: Option<Vec<Segment>>,
    input: Input,
    dense: bool,
    samples: Vec<Sample>,
}

/// The variants timed at one context length: full (and full-dense, the peer), then per k
/// cached and (with an encoder) not cached.
fn variants(s: &BenchSetup, ctx: &[u32], question: &[u32], ks: &[usize]) -> Result<Vec<Variant>> {
    let d = s.decoder;
    let variant = |name: String, k, positions, segs, input, dense| Variant {
        name,
        k,
        positions,
        segs,
        input,
        dense,
        samples: vec![],
    };
    let positions = ctx.len() + question.len();
    let full_segs = (positions + s.decode_tokens <= d.cfg.max_positions)
        .then(|| vec![Segment::Tokens(ctx.to_vec()), Segment::Tokens(question.to_vec())]);
    let mut vars = vec![variant("full".into(), 1, positions, full_segs.clone(), Input::Tokens, false)];
    if let Some(peer) = s.peer {
        vars.push(variant(peer.borrow().name.clone(), 1, positions, full_segs.clone(), Input::Peer, false));
    }
    if s.dense_decoder.is_some() {
        vars.push(variant("full-dense".into(), 1, positions, full_segs, Input::Tokens, true));
    }
    for &k in ks {
        let n = compressor::chunk_count(ctx.len(), k);
        let fits = n + question.len() <= d.cfg.max_positions;
        let q = || vec![Segment::Tokens(question.to_vec())];
        // cached: chunk vectors computed before timing (as stored in the index)
        let cached = match (fits, s.encoder) {
            (true, Some(enc)) => compressor::chunk_vectors(enc, &d.tokenizer, &[ctx], k)?,
            (true, None) => Some(Tensor::randn(0f32, 0.05, (n, s.projector.in_dim), &d.device)?),
            _ => None,
        };
        let segs = cached.as_ref().map(|_| q());
        let input = cached.map_or(Input::Tokens, Input::Cached);
        vars.push(variant(format!("refrag-{k}-cached"), k, n + question.len(), segs, input, false));
        if s.encoder.is_some() {
            vars.push(variant(
                format!("refrag-{k}-encode"),
                k,
                n + question.len(),
                fits.then(q),
                Input::Encode(k),
                false,
            ));
        }
    }
    Ok(vars)
}

/// Time one run of a variant: its input made (inside the timed path where REFRAG makes it at
/// question time), prefilled and decoded.
fn time_variant(s: &BenchSetup, v: &Variant, segs: &[Segment], ctx: &[u32], full_prompt: &[u32]) -> Result<Sample> {
    let d = s.decoder;
    match &v.input {
        Input::Peer => {
            let (ms, per) = s.peer.expect("peer").borrow_mut().time(full_prompt, s.batch, s.decode_tokens)?;
            let per = per.unwrap_or(f64::NAN);
            let total_s = (ms + per * s.decode_tokens as f64) / 1e3;
            Ok(Sample { ttft: ms, ttit: per, kv: 0, total_s, mem: None })
        }
        Input::Tokens if v.dense => {
            time_decode(s.dense_decoder.expect("dense decoder"), segs, s.decode_tokens, s.batch, || Ok(vec![]))
        }
        Input::Tokens => time_decode(d, segs, s.decode_tokens, s.batch, || Ok(vec![])),
        // cached vectors: the projection is inside the timed path
        Input::Cached(c) => {
            time_decode(d, segs, s.decode_tokens, s.batch, || Ok(vec![Segment::Embeds(s.projector.forward(c)?)]))
        }
        Input::Encode(k) => {
            let comp = Compressor::new(s.encoder.expect("encoder"), s.projector, *k);
            time_decode(d, segs, s.decode_tokens, s.batch, || {
                Ok(comp.compress(d, &[ctx])?.map(Segment::Embeds).into_iter().collect())
            })
        }
    }
}

/// A variant's row from its samples; `full`: full context's (TTFT, throughput) at this length,
/// set by the full variant (which comes first).
fn summarize(s: &BenchSetup, v: Variant, context_tokens: usize, full: &mut Option<(f64, f64)>) -> Row {
    let generated = (s.batch * (s.decode_tokens + 1)) as f64;
    let mut row = Row {
        context_tokens,
        variant: v.name,
        k: v.k,
        positions: v.positions,
        ttft_ms_median: None,
        ttft_ms_min: None,
        ttft_ms_max: None,
        ttit_ms_median: None,
        answer_ms_median: None,
        kv_cache_bytes: None,
        speedup: None,
        batch: s.batch,
        throughput_tok_s: None,
        throughput_speedup: None,
        peak_mem_mib: None,
    };
    if v.samples.is_empty() {
        return row;
    }
    let mut t: Vec<f64> = v.samples.iter().map(|x| x.ttft).collect();
    let mut i: Vec<f64> = v.samples.iter().map(|x| x.ttit).collect();
    let mut tp: Vec<f64> = v.samples.iter().map(|x| generated / x.total_s).collect();
    let med = median(&mut t);
    let thr = median(&mut tp);
    if row.variant == "full" {
        *full = Some((med, thr));
    }
    row.ttft_ms_median = Some(med);
    row.ttft_ms_min = t.first().copied();
    row.ttft_ms_max = t.last().copied();
    row.speedup = full.map(|f| f.0 / med);
    // a peer that only prefills (llama.cpp's) has no later tokens, answer time or throughput
    if !v.samples[0].ttit.is_nan() {
        let mut a: Vec<f64> = v.samples.iter().map(|x| x.total_s * 1e3).collect();
        row.ttit_ms_median = Some(median(&mut i));
        row.answer_ms_median = Some(median(&mut a));
        row.throughput_tok_s = Some(thr);
        row.throughput_speedup = full.map(|f| thr / f.1);
    }
    if !matches!(v.input, Input::Peer) {
        row.kv_cache_bytes = Some(v.samples[0].kv);
        let mut m: Vec<f64> = v.samples.iter().filter_map(|x| x.mem).collect();
        row.peak_mem_mib = (!m.is_empty()).then(|| median(&mut m));
    }
    row
}

/// Run the benchmark over context lengths and chunk sizes.
pub fn run(s: &BenchSetup, contexts: &[usize], ks: &[usize], mut progress: impl FnMut(&str)) -> Result<Vec<Row>> {
    let d = s.decoder;
    let mut pool = prompt::tokenize(d, s.text)?;
    let max_ctx = contexts.iter().copied().max().unwrap_or(0);
    while pool.len() < max_ctx {
        pool.extend_from_within(..);
    }
    let question = prompt::tokenize(d, "\n\nQuestion: What happened next?")?;
    let mut rows = Vec::new();
    for &len in contexts {
        // L counts the question and the decoded tokens too, so full context at L = the
        // decoder's window just fits.
        let len = len.saturating_sub(question.len() + s.decode_tokens).max(1);
        let ctx = &pool[..len];
        let mut vars = variants(s, ctx, &question, ks)?;
        let full_prompt: Vec<u32> = ctx.iter().chain(&question).copied().collect();
        for rep in 0..=s.repeats {
            for v in vars.iter_mut() {
                let Some(segs) = &v.segs else { continue };
                progress(&format!("L={len} {} rep {rep}/{}", v.name, s.repeats));
                let sample = time_variant(s, v, segs, ctx, &full_prompt)?;
                if rep > 0 {
                    v.samples.push(sample); // rep 0 is the warm-up
                }
            }
        }
        let context_tokens = len + question.len() + s.decode_tokens;
        let mut full = None;
        rows.extend(vars.into_iter().map(|v| summarize(s, v, context_tokens, &mut full)));
    }
    Ok(rows)
}
