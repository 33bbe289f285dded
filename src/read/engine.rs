//! Question answering over an index: retrieve, load the cached chunk vectors, pick chunks to
//! expand, assemble the decoder input (through [`crate::read::prompt`]) and decode. Shared by
//! `ask`, `eval` and `bench`.

use crate::index::schema::Hit;
use crate::index::store::Store;
use crate::model::compressor::{ChunkEncoder, Compressor};
use crate::model::decoder::Decoder;
use crate::model::encoder::Encoder;
use crate::model::load::{Loader, Reading};
use crate::model::policy::PolicyNet;
use crate::model::weights::Purpose;
pub use crate::options::{Mode, Policy, QuestionAt, SearchKind};
use crate::read::generate::{generate, Generation, SamplingOptions};
use crate::read::prompt::{self, DecoderInput, Segment};
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
    /// Where in the document: `file.pdf#p12` (a PDF page) or `notes.md#Heading` (the heading
    /// of an HTML or Markdown section); the document id when it has neither.
    pub cite: String,
}

impl From<&Hit> for Source {
    fn from(h: &Hit) -> Self {
        Source {
            passage_id: h.passage.passage_id.clone(),
            doc_id: h.passage.doc_id.clone(),
            title: h.passage.title.clone(),
            score: h.score,
            cite: cite(&h.passage.doc_id, &h.passage.meta),
        }
    }
}

impl Source {
    /// How a source is shown: its citation, or the passage id where it has no page or heading.
    pub fn label(&self) -> &str {
        if self.cite == self.doc_id {
            &self.passage_id
        } else {
            &self.cite
        }
    }
}

/// A passage's citation from its metadata's `page` or `section`.
fn cite(doc_id: &str, meta: &str) -> String {
    let m: serde_json::Value = serde_json::from_str(meta).unwrap_or_default();
    if let Some(p) = m.get("page").and_then(|p| p.as_u64()) {
        format!("{doc_id}#p{p}")
    } else if let Some(s) = m.get("section").and_then(|s| s.as_str()) {
        format!("{doc_id}#{s}")
    } else {
        doc_id.to_string()
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

impl Answer {
    /// Time to the whole answer: retrieval, the input, the first token and every later one.
    pub fn total_ms(&self) -> f64 {
        self.retrieval_ms + self.generation.ttft_ms() + self.generation.decode_time.as_secs_f64() * 1e3
    }
}

/// Loaded models and index.
pub struct Engine {
    pub decoder: Decoder,
    pub encoder: Encoder,
    pub store: Store,
    /// The mode the engine was opened for: only an engine opened in refrag mode reads
    /// compressed (it has the trained chunk encoder, projector and policy at hand).
    pub mode: Mode,
    /// How the answers read: the trained weights, adapters, question layout, and the index's k.
    pub reading: Reading,
    /// Why a default reading fell back to full context (the index's chunk vectors are not the
    /// answer weights'), to tell the user.
    pub fallback: Option<String>,
}

/// What [`Engine::open`] opens.
pub struct EngineOptions<'a> {
    /// The index (a folder, or an object-store URI) and its object-store options.
    pub db: &'a str,
    pub storage_options: &'a [(String, String)],
    /// None: refrag when the index's chunk vectors were made by the answer weights' chunk
    /// encoder (the measured best reading), else full context.
    pub mode: Option<Mode>,
    /// Full/none mode read with the trained weights' adapters folded in (LLaMA-FT).
    pub adapted: bool,
    /// The chunk size asked for (checked against the index's).
    pub k: Option<usize>,
}

impl Engine {
    /// Load the models, the index and the trained weights for answers, and settle how the
    /// answers read. Refrag mode needs trained weights and an index built with their chunk
    /// encoder; an index built with other models is refused with the fix. Without a mode, it
    /// reads refrag when it can and full context otherwise (saying why in `fallback`).
    pub fn open(loader: &Loader, o: &EngineOptions) -> Result<Engine> {
        let decoder = loader.decoder()?;
        let encoder = loader.encoder()?;
        let (store, info) = Store::open_index(o.db, o.storage_options)?;
        let trained = loader.trained(&encoder, &decoder, Purpose::Answers)?;
        // before the index checks (as `reading` would say it after them): missing weights are
        // the first thing to fix
        if o.mode == Some(Mode::Refrag) && trained.is_none() {
            return Err(crate::model::weights::missing(&loader.weights_dirs(Purpose::Answers)));
        }
        let minilm = ChunkEncoder::MiniLm(encoder.clone());
        let chunk_encoder = trained.as_ref().map(|t| &t.chunk_encoder).unwrap_or(&minilm);
        let now =
            crate::index::indexer::index_info(&encoder, chunk_encoder, &decoder.tokenizer_id, o.k.unwrap_or(info.k));
        info.check(&now, o.db)?;
        let (mode, fallback) = match (o.mode, trained.is_some(), info.check_chunks(&now, o.db)) {
            (Some(Mode::Refrag), _, Err(e)) => return Err(e),
            (Some(mode), _, _) => (mode, None),
            (None, true, Ok(())) => (Mode::Refrag, None),
            (None, true, Err(e)) => (Mode::Full, Some(format!("reading the passages in full: {e:#}"))),
            (None, false, _) => (Mode::Full, None),
        };
        let reading = loader.reading(trained, Purpose::Answers, mode, o.adapted, Some(info.k))?;
        let mut decoder = decoder;
        reading.adapt(&mut decoder)?;
        Ok(Engine { decoder, encoder, store, mode, reading, fallback })
    }

    /// Where a question with passages puts the question.
    pub fn question_at(&self) -> QuestionAt {
        self.reading.question_at
    }

    /// The chunk encoder, projector and chunk size, when the engine reads compressed.
    pub fn compressor(&self) -> Option<Compressor<'_>> {
        self.reading.compressor().filter(|_| self.mode == Mode::Refrag)
    }

    /// The trained expansion policy, when the engine reads compressed and the weights have one.
    pub fn policy(&self) -> Option<&PolicyNet> {
        self.reading.trained.as_ref().and_then(|t| t.policy.as_deref()).filter(|_| self.mode == Mode::Refrag)
    }

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
        let input = prompt::assemble(&self.decoder, &prompt::rag(question, passages, self.question_at()))?;
        Ok((input, n_chunks, n_expanded))
    }

    /// What the decoder reads of each hit in this mode (tokens, or projected cached chunk
    /// vectors with the policy's expanded chunks as tokens), and the chunk counts.
    pub fn passage_segments(
        &self,
        qvec: &[f32],
        hits: &[Hit],
        opts: &AskOptions,
    ) -> Result<(Vec<Vec<Segment>>, usize, usize)> {
        let passages: Vec<Vec<Segment>>;
        let mut n_chunks = 0;
        let mut n_expanded = 0;
        match opts.mode {
            Mode::None => passages = vec![],
            Mode::Full => {
                passages = hits.iter().map(|h| vec![Segment::Tokens(h.passage.tokens.clone())]).collect();
            }
            Mode::Refrag => {
                let Some(comp) = self.compressor() else {
                    bail!("--mode refrag needs a trained projector (see `refrag train`); use --mode full");
                };
                let dim = comp.encoder.dim();
                let all: Vec<f32> = hits.iter().flat_map(|h| h.passage.chunks.iter().copied()).collect();
                n_chunks = all.len() / dim;
                // the cached chunk vectors, read once: the policy and the projector share them
                let vectors = if n_chunks > 0 {
                    Some(Tensor::from_vec(all, (n_chunks, dim), &self.decoder.device)?)
                } else {
                    None
                };
                // the index's MiniLM vectors of the chunks' texts, when it stores them and the
                // policy compares them with the question
                let sdim = self.encoder.dim;
                let similarity = matches!(opts.policy, crate::options::Policy::Sim | crate::options::Policy::SimSpan);
                let stored: Vec<f32> = if similarity {
                    hits.iter().flat_map(|h| h.passage.sims.iter().copied()).collect()
                } else {
                    vec![]
                };
                let sims = if n_chunks > 0 && stored.len() == n_chunks * sdim {
                    Some(Tensor::from_vec(stored, (n_chunks, sdim), &self.decoder.device)?)
                } else {
                    None
                };
                let tokens: Vec<&[u32]> = hits.iter().map(|h| h.passage.tokens.as_slice()).collect();
                let sel = crate::read::policy::Selection {
                    policy: opts.policy,
                    expand: opts.expand,
                    budget: opts.budget,
                    net: self.policy(),
                    seed: opts.sampling.seed,
                };
                let expand =
                    sel.choose(&self.decoder, comp.k, &tokens, vectors.as_ref(), sims.as_ref(), qvec, &self.encoder)?;
                if expand.len() != n_chunks {
                    bail!(
                        "index inconsistency: {n_chunks} chunk vectors for {} chunks (was it built with k = {}?)",
                        expand.len(),
                        comp.k
                    );
                }
                n_expanded = expand.iter().filter(|&&e| e).count();
                let projected = vectors.as_ref().map(|c| comp.project(c)).transpose()?;
                passages = crate::read::policy::mixed_segments(&tokens, comp.k, &expand, projected.as_ref())?;
            }
        }
        Ok((passages, n_chunks, n_expanded))
    }

    /// How a piece of text (an earlier turn) is read in this mode: compressed into projected
    /// chunk vectors in refrag mode, as tokens otherwise.
    pub fn read_text(&self, text: &str, mode: Mode) -> Result<Vec<Segment>> {
        let compress = self.compressor();
        let reader = crate::read::reader::Reader {
            decoder: &self.decoder,
            compress,
            select: None,
            question_at: self.question_at(),
        };
        let mode = if compress.is_none() && mode == Mode::Refrag { Mode::Full } else { mode };
        reader.read(text, mode)
    }

    /// Retrieve, build and decode, streaming text through `on_text`.
    pub fn answer(&self, question: &str, opts: &AskOptions, on_text: impl FnMut(&str) -> Result<()>) -> Result<Answer> {
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
