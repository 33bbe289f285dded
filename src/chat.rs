//! Multi-turn conversations with compressed history (REFRAG section 2, "compress anywhere").
//!
//! Each turn retrieves for the question (with the previous question appended, so that "where
//! was he born?" still finds the passage about him), reads its passages as the mode says, and
//! sees the earlier turns: in refrag mode their questions, passages and answers are projected
//! chunk vectors (about k times fewer positions), in full mode tokens. The newest question is
//! always tokens. When the window is full, the oldest turns go first, never the question.

use crate::decoder::Decoder;
use crate::encoder::Encoder;
use crate::generate::{generate, Generation, SamplingOptions};
use crate::options::{Mode, Policy};
use crate::projector::Projector;
use crate::prompt::{self, Segment};
#[cfg(feature = "store")]
use crate::rag::{AskOptions, Engine, Source};
use anyhow::{anyhow, bail, Result};

/// How text is read in a mode: compressed into projected chunk vectors (refrag), or tokens.
pub struct Reader<'a> {
    pub decoder: &'a Decoder,
    /// Chunk encoder and projector (refrag mode).
    pub compress: Option<(&'a Encoder, &'a Projector)>,
    pub k: usize,
    /// Selective expansion of given passages' chunks (refrag mode), with the question encoder.
    pub select: Option<(crate::policy::Selection<'a>, &'a Encoder)>,
}

impl Reader<'_> {
    pub fn read(&self, text: &str, mode: Mode) -> Result<Vec<Segment>> {
        match (mode, self.compress) {
            (Mode::Refrag, Some((enc, p))) => Ok(vec![compress_text(self.decoder, enc, p, self.k, text)?]),
            (Mode::Refrag, None) => bail!("refrag mode needs trained weights"),
            _ => Ok(vec![Segment::Text(text.to_string())]),
        }
    }
}

/// Text as projected chunk vectors: decoder tokens cut into k-token chunks, each chunk's text
/// encoded and projected (one decoder position per chunk).
pub fn compress_text(decoder: &Decoder, encoder: &Encoder, projector: &Projector, k: usize, text: &str) -> Result<Segment> {
    let ids = prompt::tokenize(decoder, text)?;
    let texts = crate::corpus::chunk_texts(&decoder.tokenizer, &ids, k)?;
    if texts.is_empty() {
        return Ok(Segment::Tokens(vec![]));
    }
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let c = encoder.encode(&refs)?.to_device(&decoder.device)?;
    Ok(Segment::Embeds(projector.forward(&c)?))
}

/// One conversation turn to answer, with its passages given (e.g. MTRAG): earlier (user,
/// agent) turns, passages, the question.
pub struct GivenTurn {
    pub history: Vec<(String, String)>,
    pub passages: Vec<String>,
    pub question: String,
}

/// What answering a given turn did.
pub struct GivenReport {
    pub generation: Generation,
    pub history_kept: usize,
    pub passages_kept: usize,
    /// Chunks read as tokens by the expansion policy.
    pub chunks_expanded: usize,
}

/// Answer a turn whose passages are given: history and passages read as the mode says, the
/// question as tokens; within `window` positions the oldest turns go first, then the last
/// passages.
pub fn answer_given(reader: &Reader, mode: Mode, turn: &GivenTurn, window: usize, sampling: &SamplingOptions) -> Result<GivenReport> {
    answer_given_streaming(reader, mode, turn, window, sampling, |_| Ok(()))
}

/// [`answer_given`], handing each generated piece of text to `on_piece` as it comes.
pub fn answer_given_streaming(
    reader: &Reader,
    mode: Mode,
    turn: &GivenTurn,
    window: usize,
    sampling: &SamplingOptions,
    mut on_piece: impl FnMut(&str) -> Result<()>,
) -> Result<GivenReport> {
    let mut history = Vec::new();
    for (u, a) in &turn.history {
        history.push((reader.read(u, mode)?, reader.read(a, mode)?));
    }
    let mut passages = Vec::new();
    let mut expanded = 0;
    match (mode, reader.compress, &reader.select) {
        (Mode::None, _, _) => {}
        (Mode::Refrag, Some((enc, proj)), Some((sel, qenc))) if sel.expands() => {
            // Chunk vectors of all passages at once, the policy's choice, then the mix.
            let dec = reader.decoder;
            let tokens = turn.passages.iter().map(|p| prompt::tokenize(dec, p.trim())).collect::<Result<Vec<_>>>()?;
            let refs: Vec<&[u32]> = tokens.iter().map(Vec::as_slice).collect();
            let mut texts = Vec::new();
            for t in &refs {
                texts.extend(crate::corpus::chunk_texts(&dec.tokenizer, t, reader.k)?);
            }
            let vectors = if texts.is_empty() {
                None
            } else {
                Some(enc.encode(&texts.iter().map(String::as_str).collect::<Vec<_>>())?.to_device(&dec.device)?)
            };
            // Only the policies that read the question pay for its vector.
            let qvec = match sel.policy {
                Policy::Sim | Policy::SimSpan | Policy::Rl => qenc.encode(&[turn.question.as_str()])?.to_vec2::<f32>()?.remove(0),
                _ => Vec::new(),
            };
            let expand = sel.choose(dec, reader.k, &refs, vectors.as_ref(), &qvec)?;
            expanded = expand.iter().filter(|&&e| e).count();
            let projected = vectors.as_ref().map(|v| proj.forward(v)).transpose()?;
            passages = crate::policy::mixed_segments(&refs, reader.k, &expand, projected.as_ref())?;
        }
        _ => {
            for p in &turn.passages {
                passages.push(reader.read(p.trim(), mode)?);
            }
        }
    }
    loop {
        let system = prompt::system_for(!passages.is_empty() || !history.is_empty());
        let user = prompt::rag_user(&turn.question, passages.clone());
        match fit(reader.decoder, system, history.clone(), user, window) {
            Ok((segs, kept)) => {
                let input = prompt::assemble(reader.decoder, &segs)?;
                let generation = generate(reader.decoder, &input, sampling, &mut on_piece)?;
                return Ok(GivenReport { generation, history_kept: kept, passages_kept: passages.len(), chunks_expanded: expanded });
            }
            Err(e) if passages.is_empty() => return Err(e),
            Err(_) => {
                passages.pop();
            }
        }
    }
}

/// One finished turn, kept in the form the decoder reads it.
#[cfg(feature = "store")]
pub struct Turn {
    pub question: String,
    pub answer: String,
    pub sources: Vec<Source>,
    /// The turn's user content (passages and question) and the answer, as read later.
    user: Vec<Segment>,
    agent: Vec<Segment>,
    mode: Mode,
}

/// What a turn did.
#[cfg(feature = "store")]
pub struct TurnReport {
    pub generation: Generation,
    pub sources: Vec<Source>,
    pub retrieval_ms: f64,
    /// Earlier turns that no longer fit the window and were left out.
    pub dropped_turns: usize,
    pub history_turns: usize,
}

#[cfg(feature = "store")]
pub struct Session {
    pub turns: Vec<Turn>,
    /// Most decoder positions a turn's input may take (answer tokens come on top).
    pub window: usize,
}

#[cfg(feature = "store")]
impl Session {
    pub fn new(window: usize) -> Self {
        Self { turns: Vec::new(), window }
    }

    pub fn reset(&mut self) {
        self.turns.clear();
    }

    /// Answer `question` in the context of the earlier turns, streaming through `on_text`.
    pub fn ask(
        &mut self,
        engine: &Engine,
        question: &str,
        opts: &AskOptions,
        on_text: impl FnMut(&str) -> Result<()>,
    ) -> Result<TurnReport> {
        let top_k = if opts.mode == Mode::None { 0 } else { opts.top_k };
        let query = match self.turns.last() {
            Some(prev) => format!("{question} {}", prev.question),
            None => question.to_string(),
        };
        let (hits, qv, retrieval_ms) = engine.retrieve(&query, top_k, opts.search)?;
        // TTFT counts building the input, as in `Engine::answer`
        let built = std::time::Instant::now();
        let (passages, _, _) = engine.passage_segments(&qv, &hits, opts)?;
        let user = prompt::rag_user(question, passages);
        let system = prompt::system_for(!hits.is_empty() || !self.turns.is_empty());
        let history: Vec<(Vec<Segment>, Vec<Segment>)> = self
            .turns
            .iter()
            .filter(|t| t.mode == opts.mode)
            .map(|t| (t.user.clone(), t.agent.clone()))
            .collect();
        let (segments, kept) = fit(&engine.decoder, system, history, user.clone(), self.window)?;
        let input = prompt::assemble(&engine.decoder, &segments)?;
        let input_time = built.elapsed();
        let mut generation = generate(&engine.decoder, &input, &opts.sampling, on_text)?;
        generation.ttft += input_time;
        let sources: Vec<Source> = hits.iter().map(Source::from).collect();
        let n_hist = self.turns.iter().filter(|t| t.mode == opts.mode).count();
        // Earlier passages and questions stay as they were read; the answer is read as the
        // mode says (compressed in refrag mode).
        let user_later = match opts.mode {
            Mode::Refrag => compress_segments(engine, &user)?,
            _ => user,
        };
        self.turns.push(Turn {
            question: question.to_string(),
            answer: generation.text.clone(),
            sources: sources.clone(),
            user: user_later,
            agent: engine.read_text(&generation.text, opts.mode)?,
            mode: opts.mode,
        });
        Ok(TurnReport { generation, sources, retrieval_ms, dropped_turns: n_hist - kept, history_turns: kept })
    }
}

#[cfg(feature = "store")]
/// A turn's user content with its text parts compressed (its passages already are, in
/// refrag mode).
fn compress_segments(engine: &Engine, segs: &[Segment]) -> Result<Vec<Segment>> {
    let mut out = Vec::new();
    for s in segs {
        match s {
            Segment::Text(t) if t.trim().len() > 2 => out.extend(engine.read_text(t, Mode::Refrag)?),
            other => out.push(other.clone()),
        }
    }
    Ok(out)
}

/// The conversation that fits `window` positions: the oldest turns are left out first; the
/// new user turn is never cut. Returns the segments and how many earlier turns were kept.
pub fn fit(
    decoder: &Decoder,
    system: &str,
    mut history: Vec<(Vec<Segment>, Vec<Segment>)>,
    user: Vec<Segment>,
    window: usize,
) -> Result<(Vec<Segment>, usize)> {
    let turn_cost = |u: &[Segment], a: &[Segment]| -> Result<usize> {
        Ok(prompt::positions(decoder, u)? + prompt::positions(decoder, a)? + 10)
    };
    let base = prompt::positions(decoder, &prompt::conversation(system, vec![], user.clone()))?;
    if base > window {
        bail!("the question and its passages take {base} positions, more than the window of {window}; use fewer --top-k or a larger window");
    }
    let mut total = base;
    for (u, a) in &history {
        total += turn_cost(u, a)?;
    }
    while total > window && !history.is_empty() {
        let (u, a) = history.remove(0);
        total -= turn_cost(&u, &a)?;
    }
    let kept = history.len();
    Ok((prompt::conversation(system, history, user), kept))
}

/// One MTRAG-style task (`eval --conversations`, `train sft --qa`, `dataset --tasks`): the conversation so far (ending with the user's question), the
/// passages, the reference answer and whether it is answerable.
pub struct GivenTask {
    pub id: String,
    pub turn: GivenTurn,
    pub targets: Vec<String>,
    pub unanswerable: bool,
}

/// A one-turn task in the format [`parse_task`] reads: the question, its passages as
/// (document id, text), the reference answers. What `dataset --tasks` and `eval --tasks` write.
pub fn one_turn_task(
    id: &serde_json::Value,
    question: &serde_json::Value,
    passages: impl IntoIterator<Item = (serde_json::Value, serde_json::Value)>,
    answers: &[serde_json::Value],
    answerable: bool,
) -> serde_json::Value {
    let contexts: Vec<_> = passages.into_iter().map(|(id, text)| serde_json::json!({"document_id": id, "text": text})).collect();
    let targets: Vec<_> = answers.iter().map(|a| serde_json::json!({"text": a})).collect();
    serde_json::json!({"task_id": id, "input": [{"speaker": "user", "text": question}], "contexts": contexts,
        "targets": targets, "answerability": if answerable { "ANSWERABLE" } else { "UNANSWERABLE" }})
}

pub fn parse_task(line: &str, at: &str) -> Result<GivenTask> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| anyhow!("{at}: malformed JSON: {e}"))?;
    let turns = v["input"].as_array().ok_or_else(|| anyhow!("{at}: missing \"input\" (the conversation)"))?;
    let mut history = Vec::new();
    let mut pending: Option<String> = None;
    for t in turns {
        let text = t["text"].as_str().unwrap_or_default().to_string();
        match t["speaker"].as_str() {
            Some("user") => {
                if let Some(u) = pending.replace(text) {
                    history.push((u, String::new()));
                }
            }
            Some("agent") => history.push((pending.take().unwrap_or_default(), text)),
            other => bail!("{at}: speaker {other:?}, expected user or agent"),
        }
    }
    let question = pending.filter(|q| !q.trim().is_empty()).ok_or_else(|| anyhow!("{at}: the conversation does not end with a user turn"))?;
    let texts = |x: &serde_json::Value| -> Vec<String> {
        x.as_array().into_iter().flatten().filter_map(|c| c["text"].as_str().map(String::from)).collect()
    };
    let id = v["task_id"].as_str().or(v["id"].as_str()).unwrap_or(at).to_string();
    let unanswerable = v["answerability"].to_string().contains("UNANSWERABLE");
    Ok(GivenTask {
        id,
        turn: GivenTurn { history, passages: texts(&v["contexts"]), question },
        targets: texts(&v["targets"]),
        unanswerable,
    })
}
