//! Latency measurements: full-context prefill against REFRAG's compressed prefill, in one
//! process, interleaved, after a warm-up (REFRAG paper, Figure 2 and Appendix B.4).
//!
//! For each context length L: (a) full: L context tokens; (b) refrag-k cached: L/k chunk vectors
//! already computed (as at question time with an index), projected and prefilled; (c) refrag-k
//! not cached: the encoder runs over the L/k chunk texts inside the timed path.
//! Time to first token (TTFT) = prefill + first sampled token; time per later token (TTIT)
//! from `decode_tokens` greedy steps.

use crate::decoder::Decoder;
use crate::encoder::Encoder;
use crate::projector::Projector;
use crate::prompt::{self, Segment};
use anyhow::Result;
use candle_core::{IndexOp, Tensor};
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
    pub kv_cache_bytes: Option<usize>,
    /// TTFT of full context divided by this row's TTFT (same L).
    pub speedup: Option<f64>,
}

pub struct BenchSetup<'a> {
    pub decoder: &'a Decoder,
    /// The same decoder without quantized weights: adds a "full-dense" row whose later tokens
    /// run through the dense matrices (to show which decode path is faster).
    pub dense_decoder: Option<&'a Decoder>,
    pub encoder: Option<&'a Encoder>,
    pub projector: &'a Projector,
    /// Text to draw context tokens from (repeated as needed).
    pub text: &'a str,
    pub repeats: usize,
    pub decode_tokens: usize,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Time one prefill + `decode` greedy steps; returns (ttft ms, ms per later token, kv bytes).
fn time_decode(d: &Decoder, segs: &[Segment], decode: usize, pre: impl Fn() -> Result<Vec<Segment>>) -> Result<(f64, f64, usize)> {
    let t0 = Instant::now();
    let extra = pre()?;
    let mut all = extra;
    all.extend_from_slice(segs);
    let input = prompt::assemble(d, &all)?;
    let mut st = d.new_state(input.positions + decode + 1);
    let h = d.forward(&input.embeds, &mut st)?;
    let logits = d.logits(&h.i((.., input.positions - 1..input.positions, ..))?)?;
    let mut next = logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
    let ttft = t0.elapsed().as_secs_f64() * 1e3;
    let t1 = Instant::now();
    for _ in 0..decode {
        let e = d.embed_tokens(&[next])?.unsqueeze(0)?;
        let h = d.forward(&e, &mut st)?;
        next = d.logits(&h)?.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
    }
    let ttit = if decode > 0 { t1.elapsed().as_secs_f64() * 1e3 / decode as f64 } else { 0.0 };
    Ok((ttft, ttit, st.bytes()))
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
        // Variants for this length; each is timed `repeats` times, interleaved.
        struct Variant {
            name: String,
            k: usize,
            positions: usize,
            segs: Option<Vec<Segment>>,
            chunk_texts: Vec<String>,
            samples: Vec<(f64, f64, usize)>,
            dense: bool,
        }
        let mut vars = vec![Variant {
            name: "full".into(),
            k: 1,
            positions: len + question.len(),
            segs: (len + question.len() + s.decode_tokens <= d.cfg.max_positions)
                .then(|| vec![Segment::Tokens(ctx.to_vec()), Segment::Tokens(question.clone())]),
            chunk_texts: vec![],
            samples: vec![],
            dense: false,
        }];
        if s.dense_decoder.is_some() {
            vars.push(Variant {
                name: "full-dense".into(),
                k: 1,
                positions: vars[0].positions,
                segs: vars[0].segs.clone(),
                chunk_texts: vec![],
                samples: vec![],
                dense: true,
            });
        }
        for &k in ks {
            let chunks: Vec<&[u32]> = crate::corpus::chunks(ctx, k).collect();
            let texts: Vec<String> = chunks
                .iter()
                .map(|c| d.tokenizer.decode(c, false).unwrap_or_default())
                .collect();
            let n = chunks.len();
            let fits = n + question.len() <= d.cfg.max_positions;
            // Cached: chunk vectors computed before timing (as stored in the index).
            let cached = match (fits, s.encoder) {
                (true, Some(enc)) => {
                    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                    Some(enc.encode(&refs)?)
                }
                (true, None) => Some(Tensor::randn(0f32, 0.05, (n, s.projector.in_dim), &d.device)?),
                _ => None,
            };
            vars.push(Variant {
                name: format!("refrag-{k}-cached"),
                k,
                positions: n + question.len(),
                segs: match &cached {
                    Some(c) => Some(vec![Segment::Embeds(c.clone()), Segment::Tokens(question.clone())]),
                    None => None,
                },
                chunk_texts: vec![],
                samples: vec![],
                dense: false,
            });
            if s.encoder.is_some() {
                vars.push(Variant {
                    name: format!("refrag-{k}-encode"),
                    k,
                    positions: n + question.len(),
                    segs: fits.then(|| vec![Segment::Tokens(question.clone())]),
                    chunk_texts: texts,
                    samples: vec![],
                    dense: false,
                });
            }
        }
        for rep in 0..=s.repeats {
            for v in vars.iter_mut() {
                let Some(segs) = &v.segs else { continue };
                progress(&format!("L={len} {} rep {rep}/{}", v.name, s.repeats));
                let sample = if v.dense {
                    time_decode(s.dense_decoder.expect("dense decoder"), segs, s.decode_tokens, || Ok(vec![]))?
                } else if v.name == "full" {
                    time_decode(d, segs, s.decode_tokens, || Ok(vec![]))?
                } else if v.chunk_texts.is_empty() {
                    // cached vectors: projection is inside the timed path
                    let Segment::Embeds(c) = &segs[0] else { unreachable!() };
                    let c = c.clone();
                    time_decode(d, &segs[1..], s.decode_tokens, || {
                        Ok(vec![Segment::Embeds(s.projector.forward(&c)?)])
                    })?
                } else {
                    let enc = s.encoder.expect("encoder");
                    let texts = &v.chunk_texts;
                    time_decode(d, segs, s.decode_tokens, || {
                        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                        Ok(vec![Segment::Embeds(s.projector.forward(&enc.encode(&refs)?)?)])
                    })?
                };
                if rep > 0 {
                    v.samples.push(sample); // rep 0 is the warm-up
                }
            }
        }
        let mut full_ttft = None;
        for mut v in vars {
            let row = if v.samples.is_empty() {
                Row {
                    context_tokens: len + question.len() + s.decode_tokens, variant: v.name, k: v.k, positions: v.positions,
                    ttft_ms_median: None, ttft_ms_min: None, ttft_ms_max: None,
                    ttit_ms_median: None, kv_cache_bytes: None, speedup: None,
                }
            } else {
                let mut t: Vec<f64> = v.samples.iter().map(|x| x.0).collect();
                let mut i: Vec<f64> = v.samples.iter().map(|x| x.1).collect();
                let med = median(&mut t);
                if v.name == "full" {
                    full_ttft = Some(med);
                }
                Row {
                    context_tokens: len + question.len() + s.decode_tokens,
                    variant: std::mem::take(&mut v.name),
                    k: v.k,
                    positions: v.positions,
                    ttft_ms_median: Some(med),
                    ttft_ms_min: t.first().copied(),
                    ttft_ms_max: t.last().copied(),
                    ttit_ms_median: Some(median(&mut i)),
                    kv_cache_bytes: Some(v.samples[0].2),
                    speedup: full_ttft.map(|f| f / med),
                }
            };
            rows.push(row);
        }
    }
    Ok(rows)
}
