//! Multi-turn conversations with compressed history (REFRAG section 2, "compress anywhere").
//!
//! Each turn retrieves for the question (with the previous question appended, so that "where
//! was he born?" still finds the passage about him), reads its passages as the mode says, and
//! sees the earlier turns: in refrag mode their questions, passages and answers are projected
//! chunk vectors (about k times fewer positions), in full mode tokens. The newest question is
//! always tokens. When the window is full, the oldest turns go first, never the question.

use crate::options::Mode;
use crate::read::engine::{AskOptions, Engine, Source};
use crate::read::generate::Generation;
use crate::read::prompt::{self, Segment};
use crate::read::reader::fit;
use anyhow::Result;

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
        // TTFT counts building the input, as in `Engine::answer`
        let built = std::time::Instant::now();
        let (passages, _, _) = engine.passage_segments(&qv, &hits, opts)?;
        let user = prompt::rag_user(question, passages, engine.question_at());
        let system = prompt::system_for(!hits.is_empty() || !self.turns.is_empty());
        let history: Vec<(Vec<Segment>, Vec<Segment>)> =
            self.turns.iter().filter(|t| t.mode == opts.mode).map(|t| (t.user.clone(), t.agent.clone())).collect();
        let (segments, kept) = fit(&engine.decoder, system, history, user.clone(), self.window)?;
        let input = prompt::assemble(&engine.decoder, &segments)?;
        let input_time = built.elapsed();
        let mut generation = crate::read::generate::generate(&engine.decoder, &input, &opts.sampling, on_text)?;
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
