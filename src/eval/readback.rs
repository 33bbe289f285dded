//! `eval readback`: is the answer in its chunk's vector at all? The chunk of a task's passage
//! that holds the reference answer is read back alone from its vector, against the vector of
//! the chunk at the same place in another task's passage.

use crate::model::compressor::{chunk_texts, chunks, Compressor};
use crate::model::decoder::Decoder;
use crate::read::prompt;
use crate::train::sft::QaExample;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::Tensor;

/// One task of `eval readback`: the k-token chunk of its first passage that holds the
/// reference answer, read back alone from its chunk vector, and the control.
pub struct Readback {
    pub answer: String,
    /// The chunk's text.
    pub chunk: String,
    /// What the decoder writes reading that chunk's vector alone.
    pub own: String,
    /// What it writes reading the vector of the chunk at the same place in another task's first
    /// passage (the next task whose first passage differs).
    pub other: String,
    /// Mean NLL of the answer's tokens when the chunk's tokens are read back teacher-forced
    /// from its own vector, and from the control's (None where the answer's characters could
    /// not be placed on the chunk's tokens).
    pub answer_nll: Option<(f64, f64)>,
}

/// Which of a chunk's tokens carry part of `answer` (the first case-insensitive match of it in
/// the chunk's text); None when the text does not hold it as written.
fn answer_token_mask(dec: &Decoder, ids: &[u32], answer: &str) -> Result<Option<Vec<bool>>> {
    let decode = |ids: &[u32]| dec.tokenizer.decode(ids, false).map_err(|e| anyhow!("decode: {e}"));
    let text = decode(ids)?.to_lowercase();
    let Some(start) = text.find(&answer.to_lowercase()) else { return Ok(None) };
    let end = start + answer.len();
    let mut mask = Vec::with_capacity(ids.len());
    let mut from = 0;
    for j in 0..ids.len() {
        let to = decode(&ids[..=j])?.len();
        mask.push(from < end && to > start);
        from = to;
    }
    Ok(mask.iter().any(|m| *m).then_some(mask))
}

/// For each task whose reference answer lies within one k-token chunk of its first passage, the
/// decoder that reads chunk vectors (`dec`, adapters folded in) writes what it reads in that
/// chunk's vector alone (greedy, up to k + 4 tokens), and in the control's (see [`Readback`]):
/// is the answer in the vector at all? None for tasks whose answer crosses a chunk boundary;
/// `tick` after each task.
pub fn readback(
    dec: &Decoder,
    comp: &Compressor,
    tasks: &[QaExample],
    marker: bool,
    mut tick: impl FnMut(),
) -> Result<Vec<Option<Readback>>> {
    let k = comp.k;
    let decode = |ids: &[u32]| dec.tokenizer.decode(ids, true).map_err(|e| anyhow!("decode: {e}"));
    let opts = crate::read::generate::SamplingOptions { max_tokens: k + 4, ..Default::default() };
    let vector = |ids: &[u32]| -> Result<Tensor> { comp.compress(dec, &[ids])?.context("an empty chunk") };
    let read = |v: &Tensor| -> Result<String> {
        let prefix = dec.recon_prefix(v, marker)?;
        let positions = 1 + prefix.dim(0)?;
        let input = prompt::DecoderInput {
            embeds: dec.behind_start(&prefix)?.unsqueeze(0)?,
            positions,
            compressed_positions: 1,
        };
        Ok(crate::read::generate::generate(dec, &input, &opts, |_| Ok(()))?.text)
    };
    let first = |ex: &QaExample| -> Result<Vec<String>> { chunk_texts(&dec.tokenizer, &ex.passages[0], k) };
    let mut out = Vec::with_capacity(tasks.len());
    for (i, ex) in tasks.iter().enumerate() {
        let answer = decode(&ex.answer)?.trim().to_string();
        let texts = first(ex)?;
        let golds = [answer.clone()];
        let Some(at) = texts.iter().position(|c| crate::eval::metrics::contains_any(c, &golds)) else {
            out.push(None);
            tick();
            continue;
        };
        let other = (1..tasks.len()).map(|d| &tasks[(i + d) % tasks.len()]).find(|o| o.passages[0] != ex.passages[0]);
        let Some(other) = other else {
            bail!("another task's passage is needed: every task has the same first passage")
        };
        let theirs: Vec<&[u32]> = chunks(&other.passages[0], k).collect();
        let control = theirs[at.min(theirs.len() - 1)];
        let ids = chunks(&ex.passages[0], k).nth(at).unwrap_or_default();
        let (v_own, v_other) = (vector(ids)?, vector(control)?);
        let answer_nll = match answer_token_mask(dec, ids, &answer)? {
            Some(mask) => {
                let nll = |v: &Tensor| -> Result<f64> {
                    let per = crate::read::score::token_nll_after(dec, &dec.recon_prefix(v, marker)?, ids)?;
                    let on: Vec<f64> = per.iter().zip(&mask).filter(|(_, m)| **m).map(|(x, _)| *x).collect();
                    Ok(crate::eval::metrics::mean(&on))
                };
                Some((nll(&v_own)?, nll(&v_other)?))
            }
            None => None,
        };
        out.push(Some(Readback {
            own: read(&v_own)?,
            other: read(&v_other)?,
            chunk: texts[at].clone(),
            answer,
            answer_nll,
        }));
        tick();
    }
    Ok(out)
}
