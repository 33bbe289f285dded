//! Autoregressive generation from a prepared decoder input, streaming text as it is decoded.

use crate::model::decoder::Decoder;
use crate::read::prompt::DecoderInput;
use anyhow::Result;
use candle_transformers::generation::LogitsProcessor;
use std::time::{Duration, Instant};

/// How to pick tokens and when to stop.
#[derive(Debug, Clone)]
pub struct SamplingOptions {
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self { max_tokens: 64, temperature: 0.0, top_p: None, seed: 299792458 }
    }
}

/// The answer and how long it took.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    pub text: String,
    pub generated_tokens: usize,
    pub prompt_positions: usize,
    /// Prefill plus the first sampled token.
    #[serde(skip)]
    pub ttft: Duration,
    /// Everything after the first token.
    #[serde(skip)]
    pub decode_time: Duration,
    /// Bytes held by the KV cache at the end.
    pub kv_cache_bytes: usize,
}

impl Generation {
    pub fn ttft_ms(&self) -> f64 {
        self.ttft.as_secs_f64() * 1e3
    }
    /// Decoding rate after the first token (tokens per second).
    pub fn tokens_per_s(&self) -> f64 {
        let n = self.generated_tokens.saturating_sub(1);
        if n == 0 || self.decode_time.is_zero() {
            return 0.0;
        }
        n as f64 / self.decode_time.as_secs_f64()
    }
}

/// Token ids that end an answer.
pub fn stop_ids(decoder: &Decoder) -> Vec<u32> {
    ["<|im_end|>", "<|endoftext|>"].iter().filter_map(|t| decoder.tokenizer.token_to_id(t)).collect()
}

/// Decode from `input`, calling `on_text` with each new piece of text.
pub fn generate(
    decoder: &Decoder,
    input: &DecoderInput,
    opts: &SamplingOptions,
    mut on_text: impl FnMut(&str) -> Result<()>,
) -> Result<Generation> {
    let start = Instant::now();
    let stops = stop_ids(decoder);
    let temperature = (opts.temperature > 0.0).then_some(opts.temperature);
    let mut sampler = LogitsProcessor::new(opts.seed, temperature, opts.top_p);
    let mut state = decoder.new_state(input.positions + opts.max_tokens);
    let mut logits = decoder.prefill(&input.embeds, &mut state)?.flatten_all()?;
    let mut ids: Vec<u32> = Vec::new();
    let mut emitted = 0usize;
    let mut ttft = None;
    let mut stopped = false;
    let mut first_at = start;
    while ids.len() < opts.max_tokens {
        // greedy: the argmax on the device, one index back (the sampler's pick: candle's argmax)
        let next = match temperature {
            None => crate::model::elementwise::argmax(&logits)?.to_scalar::<u32>()?,
            Some(_) => sampler.sample(&logits)?,
        };
        if ttft.is_none() {
            ttft = Some(start.elapsed());
            first_at = Instant::now();
            tracing::info!(
                "first token after {:.1} ms ({} prompt positions)",
                start.elapsed().as_secs_f64() * 1e3,
                input.positions
            );
        }
        if stops.contains(&next) {
            stopped = true;
            break;
        }
        ids.push(next);
        let text = decoder.tokenizer.decode(&ids, true).map_err(|e| anyhow::anyhow!("decode: {e}"))?;
        // Hold back an incomplete UTF-8 sequence until its last byte arrives.
        if text.len() > emitted && !text.ends_with('\u{FFFD}') {
            on_text(&text[emitted..])?;
            emitted = text.len();
        }
        if ids.len() >= opts.max_tokens || state.pos >= decoder.cfg.max_positions {
            break;
        }
        logits = decoder.step(&mut state, &[next])?.flatten_all()?;
    }
    let text = decoder.tokenizer.decode(&ids, true).map_err(|e| anyhow::anyhow!("decode: {e}"))?;
    if text.len() > emitted {
        on_text(&text[emitted..])?;
    }
    let ttft = ttft.unwrap_or_else(|| start.elapsed());
    Ok(Generation {
        text: text.trim().to_string(),
        // the end-of-turn token counts: it was generated too
        generated_tokens: ids.len() + usize::from(stopped),
        prompt_positions: input.positions,
        ttft,
        decode_time: first_at.elapsed(),
        kv_cache_bytes: state.bytes(),
    })
}
