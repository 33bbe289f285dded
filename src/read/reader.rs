//! Reading given text: how a piece of text is read in each mode ([`Reader`]: tokens, or
//! projected chunk vectors with some chunks expanded), and answering a turn whose passages are
//! given (`ask --context`, `eval --conversations`), fitted into the decoder's window ([`fit`]).

use crate::model::compressor::Compressor;
use crate::model::decoder::Decoder;
use crate::model::encoder::Encoder;
use crate::options::{Mode, Policy, QuestionAt};
use crate::read::generate::{generate, Generation, SamplingOptions};
use crate::read::prompt::{self, Segment};
use anyhow::{bail, Result};

/// How text is read in a mode: compressed into projected chunk vectors (refrag), or tokens.
pub struct Reader<'a> {
    pub decoder: &'a Decoder,
    /// The chunk encoder and projector (refrag mode).
    pub compress: Option<Compressor<'a>>,
    /// Selective expansion of given passages' chunks (refrag mode), with the question encoder.
    pub select: Option<(crate::read::policy::Selection<'a>, &'a Encoder)>,
    /// Where a question with passages puts the question.
    pub question_at: QuestionAt,
}

impl Reader<'_> {
    pub fn read(&self, text: &str, mode: Mode) -> Result<Vec<Segment>> {
        match (mode, self.compress) {
            (Mode::Refrag, Some(c)) => Ok(vec![compress_text(self.decoder, &c, text)?]),
            (Mode::Refrag, None) => bail!("refrag mode needs trained weights"),
            _ => Ok(vec![Segment::Text(text.to_string())]),
        }
    }
}

/// Text as projected chunk vectors (one decoder position per k-token chunk).
pub fn compress_text(decoder: &Decoder, compressor: &Compressor, text: &str) -> Result<Segment> {
    Ok(match compressor.compress_text(decoder, text)? {
        Some(e) => Segment::Embeds(e),
        None => Segment::Tokens(vec![]),
    })
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
pub fn answer_given(
    reader: &Reader,
    mode: Mode,
    turn: &GivenTurn,
    window: usize,
    sampling: &SamplingOptions,
) -> Result<GivenReport> {
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
        (Mode::Refrag, Some(comp), Some((sel, qenc))) if sel.expands() => {
            // Chunk vectors of all passages at once, the policy's choice, then the mix.
            let dec = reader.decoder;
            let tokens = turn.passages.iter().map(|p| prompt::tokenize(dec, p.trim())).collect::<Result<Vec<_>>>()?;
            let refs: Vec<&[u32]> = tokens.iter().map(Vec::as_slice).collect();
            let vectors = comp.vectors(dec, &refs)?;
            // Only the policies that read the question pay for its vector.
            let qvec = match sel.policy {
                Policy::Sim | Policy::SimSpan | Policy::Rl => {
                    qenc.encode(&[turn.question.as_str()])?.to_vec2::<f32>()?.remove(0)
                }
                _ => Vec::new(),
            };
            let expand = sel.choose(dec, comp.k, &refs, vectors.as_ref(), None, &qvec, qenc)?;
            expanded = expand.iter().filter(|&&e| e).count();
            let projected = vectors.as_ref().map(|v| comp.project(v)).transpose()?;
            passages = crate::read::policy::mixed_segments(&refs, comp.k, &expand, projected.as_ref())?;
        }
        _ => {
            for p in &turn.passages {
                passages.push(reader.read(p.trim(), mode)?);
            }
        }
    }
    loop {
        let system = prompt::system_for(!passages.is_empty() || !history.is_empty());
        let user = prompt::rag_user(&turn.question, passages.clone(), reader.question_at);
        match fit(reader.decoder, system, history.clone(), user, window) {
            Ok((segs, kept)) => {
                let input = prompt::assemble(reader.decoder, &segs)?;
                let generation = generate(reader.decoder, &input, sampling, &mut on_piece)?;
                return Ok(GivenReport {
                    generation,
                    history_kept: kept,
                    passages_kept: passages.len(),
                    chunks_expanded: expanded,
                });
            }
            Err(e) if passages.is_empty() => return Err(e),
            Err(_) => {
                passages.pop();
            }
        }
    }
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
