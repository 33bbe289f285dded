//! Multi-turn conversations with compressed history (REFRAG section 2, "compress anywhere").
//!
//! Each turn retrieves for the question (with the previous question appended, so that "where
//! was he born?" still finds the passage about him), reads its passages as the mode says, and
//! sees the earlier turns: in refrag mode their questions, passages and answers are projected
//! chunk vectors (about k times fewer positions), in full mode tokens. The newest question is
//! always tokens. When the window is full, the oldest turns go first, never the question.

use crate::decoder::Decoder;
use crate::generate::{generate, Generation};
use crate::prompt::{self, Segment};
use crate::rag::{AskOptions, Engine, Mode, Source};
use anyhow::{bail, Result};

/// One finished turn, kept in the form the decoder reads it.
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
pub struct TurnReport {
    pub generation: Generation,
    pub sources: Vec<Source>,
    pub retrieval_ms: f64,
    /// Earlier turns that no longer fit the window and were left out.
    pub dropped_turns: usize,
    pub history_turns: usize,
}

pub struct Session {
    pub turns: Vec<Turn>,
    /// Most decoder positions a turn's input may take (answer tokens come on top).
    pub window: usize,
}

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
        let generation = generate(&engine.decoder, &input, &opts.sampling, on_text)?;
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
