//! Question answering over an index: retrieve, load the cached chunk vectors, pick chunks to
//! expand, assemble the decoder input (through [`crate::prompt`]) and decode. Shared by
//! `ask`, `eval` and `bench`.

use crate::decoder::Decoder;
use crate::encoder::Encoder;
use crate::generate::{generate, Generation, SamplingOptions};
use crate::projector::Projector;
use crate::prompt::{self, DecoderInput, Segment};
pub use crate::options::{Mode, Policy, SearchKind};
use crate::store::{Hit, Store};
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct AskOptions {
    pub mode: Mode,
    pub top_k: usize,
    pub search: SearchKind,
    /// Fraction of chunks to expand (0..=1).
    pub expand: f64,
    /// Instead of `expand`: expand while the passages fit in this many decoder positions.
    pub budget: Option<usize>,
    pub policy: Policy,
    pub sampling: SamplingOptions,
}

/// A retrieved source, as reported.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Source {
    pub passage_id: String,
    pub doc_id: String,
    pub title: String,
    pub score: f32,
}

impl From<&Hit> for Source {
    fn from(h: &Hit) -> Self {
        Source {
            passage_id: h.passage.passage_id.clone(),
            doc_id: h.passage.doc_id.clone(),
            title: h.passage.title.clone(),
            score: h.score,
        }
    }
}

/// An answer with everything measured about it.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Its `ttft` counts building the decoder input (the policy's choice, the projection) as
    /// well as the prefill: everything after retrieval up to the first token.
    pub generation: Generation,
    pub sources: Vec<Source>,
    pub retrieval_ms: f64,
    /// Tokens of the retrieved passages.
    pub context_tokens: usize,
    pub chunks: usize,
    pub expanded_chunks: usize,
    /// Milliseconds spent building the decoder input (part of the TTFT).
    pub input_ms: f64,
}

/// Loaded models and index.
pub struct Engine {
    pub decoder: Decoder,
    pub encoder: Encoder,
    pub store: Store,
    pub projector: Option<Projector>,
    /// The chunk encoder that goes with the projector (compresses text read at question
    /// time, e.g. earlier turns of a chat).
    pub chunk_encoder: Option<Encoder>,
    /// Chunk size of the index.
    pub k: usize,
    /// The trained expansion policy, when the weights have one.
    pub policy: Option<std::sync::Arc<crate::policy::PolicyNet>>,
    /// Whether the decoder reads with the trained adapters folded in.
    pub adapted: bool,
    /// The trained weights' folder, when the answers use them (refrag mode, or adapters).
    pub weights: Option<std::path::PathBuf>,
}

impl Engine {
    /// Retrieve passages for a question; returns hits, the question vector and milliseconds.
    pub fn retrieve(&self, question: &str, top_k: usize, kind: SearchKind) -> Result<(Vec<Hit>, Vec<f32>, f64)> {
        let t = Instant::now();
        if top_k == 0 {
            return Ok((vec![], vec![], 0.0));
        }
        let qv = self.encoder.encode(&[question])?.squeeze(0)?.to_vec1::<f32>()?;
        let hits = self.store.search(&qv, question, top_k, kind)?;
        tracing::debug!("retrieved {} passages ({kind:?}) in {:.1} ms", hits.len(), t.elapsed().as_secs_f64() * 1e3);
        Ok((hits, qv, t.elapsed().as_secs_f64() * 1e3))
    }

    /// The decoder input for a question and its passages.
    pub fn build_input(
        &self,
        question: &str,
        qvec: &[f32],
        hits: &[Hit],
        opts: &AskOptions,
    ) -> Result<(DecoderInput, usize, usize)> {
        let (passages, n_chunks, n_expanded) = self.passage_segments(qvec, hits, opts)?;
        let input = prompt::assemble(&self.decoder, &prompt::rag(question, passages))?;
        Ok((input, n_chunks, n_expanded))
    }

    /// What the decoder reads of each hit in this mode (tokens, or projected cached chunk
    /// vectors with the policy's expanded chunks as tokens), and the chunk counts.
    pub fn passage_segments(&self, qvec: &[f32], hits: &[Hit], opts: &AskOptions) -> Result<(Vec<Vec<Segment>>, usize, usize)> {
        let passages: Vec<Vec<Segment>>;
        let mut n_chunks = 0;
        let mut n_expanded = 0;
        match opts.mode {
            Mode::None => passages = vec![],
            Mode::Full => {
                passages = hits.iter().map(|h| vec![Segment::Tokens(h.passage.tokens.clone())]).collect();
            }
            Mode::Refrag => {
                let Some(proj) = &self.projector else {
                    bail!("--mode refrag needs a trained projector (see `refrag train`); use --mode full");
                };
                let dim = self.encoder.dim;
                let all: Vec<f32> = hits.iter().flat_map(|h| h.passage.chunks.iter().copied()).collect();
                n_chunks = all.len() / dim;
                // the cached chunk vectors, read once: the policy and the projector share them
                let vectors = if n_chunks > 0 { Some(Tensor::from_vec(all, (n_chunks, dim), &self.decoder.device)?) } else { None };
                let tokens: Vec<&[u32]> = hits.iter().map(|h| h.passage.tokens.as_slice()).collect();
                let sel = crate::policy::Selection { policy: opts.policy, expand: opts.expand, budget: opts.budget, net: self.policy.as_deref(), seed: opts.sampling.seed };
                let expand = sel.choose(&self.decoder, self.k, &tokens, vectors.as_ref(), qvec)?;
                if expand.len() != n_chunks {
                    bail!("index inconsistency: {n_chunks} chunk vectors for {} chunks (was it built with k = {}?)", expand.len(), self.k);
                }
                n_expanded = expand.iter().filter(|&&e| e).count();
                let projected = match &vectors {
                    Some(c) => Some(proj.forward(c)?),
                    None => None,
                };
                let out = crate::policy::mixed_segments(&tokens, self.k, &expand, projected.as_ref())?;
                passages = out;
            }
        }
        Ok((passages, n_chunks, n_expanded))
    }

    /// How a piece of text (an earlier turn) is read in this mode: compressed into projected
    /// chunk vectors in refrag mode, as tokens otherwise.
    pub fn read_text(&self, text: &str, mode: Mode) -> Result<Vec<Segment>> {
        let compress = match (&self.chunk_encoder, &self.projector) {
            (Some(e), Some(p)) => Some((e, p)),
            _ => None,
        };
        let reader = crate::chat::Reader { decoder: &self.decoder, compress, k: self.k, select: None };
        let mode = if compress.is_none() && mode == Mode::Refrag { Mode::Full } else { mode };
        reader.read(text, mode)
    }

    /// Retrieve, build and decode, streaming text through `on_text`.
    pub fn answer(
        &self,
        question: &str,
        opts: &AskOptions,
        on_text: impl FnMut(&str) -> Result<()>,
    ) -> Result<Answer> {
        let top_k = if opts.mode == Mode::None { 0 } else { opts.top_k };
        let (hits, qv, retrieval_ms) = self.retrieve(question, top_k, opts.search)?;
        let built = Instant::now();
        let (input, chunks, expanded_chunks) = self.build_input(question, &qv, &hits, opts)?;
        let input_time = built.elapsed();
        let mut generation = generate(&self.decoder, &input, &opts.sampling, on_text)?;
        generation.ttft += input_time;
        Ok(Answer {
            generation,
            context_tokens: hits.iter().map(|h| h.passage.tokens.len()).sum(),
            sources: hits.iter().map(Source::from).collect(),
            retrieval_ms,
            chunks,
            expanded_chunks,
            input_ms: input_time.as_secs_f64() * 1e3,
        })
    }
}

