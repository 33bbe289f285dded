//! The one place that builds decoder inputs: the chat template, question tokens, passage
//! tokens and projected chunk embeddings, in order, as one embeddings tensor.
//!
//! ask, eval, bench and training all go through [`assemble`], so "what the decoder reads" is
//! defined once.

use crate::model::decoder::Decoder;
use anyhow::{anyhow, Result};
use candle_core::Tensor;

/// System prompt for answering from context.
/// (Chosen among a few phrasings by token F1 on the fixture questions; SmolLM2-135M follows
/// short, plain instructions best.)
pub const RAG_SYSTEM: &str = "You are a helpful assistant.";
/// System prompt when no context is given.
pub const PLAIN_SYSTEM: &str = "You are a helpful assistant. Answer the question with a short phrase.";

/// A piece of decoder input.
#[derive(Clone)]
pub enum Segment {
    /// Text, tokenized with the decoder's tokenizer (template markers are special tokens).
    Text(String),
    /// Decoder token ids, one position each (an expanded chunk, or a passage in full mode).
    Tokens(Vec<u32>),
    /// Embeddings already in the decoder's space, [n, hidden]: one position per row
    /// (projected chunk vectors).
    Embeds(Tensor),
}

/// What the decoder reads: [1, positions, hidden], plus counts for reporting.
pub struct DecoderInput {
    pub embeds: Tensor,
    /// Decoder positions used.
    pub positions: usize,
    /// Positions that hold compressed chunks.
    pub compressed_positions: usize,
}

/// A chat in SmolLM2's ChatML template: system, user turn, then the assistant's prefix.
pub fn chat(system: &str, user: Vec<Segment>) -> Vec<Segment> {
    conversation(system, Vec::new(), user)
}

/// A multi-turn chat: system, earlier (user, assistant) turns, the new user turn, then the
/// assistant's prefix. Turn contents may be tokens or compressed chunk embeddings.
pub fn conversation(system: &str, history: Vec<(Vec<Segment>, Vec<Segment>)>, user: Vec<Segment>) -> Vec<Segment> {
    let mut segs = vec![Segment::Text(format!("<|im_start|>system\n{system}<|im_end|>\n"))];
    for (u, a) in history {
        segs.push(Segment::Text("<|im_start|>user\n".into()));
        segs.extend(u);
        segs.push(Segment::Text("<|im_end|>\n<|im_start|>assistant\n".into()));
        segs.extend(a);
        segs.push(Segment::Text("<|im_end|>\n".into()));
    }
    segs.push(Segment::Text("<|im_start|>user\n".into()));
    segs.extend(user);
    segs.push(Segment::Text("<|im_end|>\n<|im_start|>assistant\n".into()));
    segs
}

/// The system prompt that goes with a user turn built by [`rag_user`].
pub fn system_for(has_passages: bool) -> &'static str {
    if has_passages {
        RAG_SYSTEM
    } else {
        PLAIN_SYSTEM
    }
}

pub use crate::options::QuestionAt;

/// The user turn of a RAG question: each passage's segments (tokens, chunk embeddings or a
/// mix), then the question (with the layout `before`, the question comes first instead; with
/// `both`, it comes first and last). With no passages, a plain question.
pub fn rag_user(question: &str, passages: Vec<Vec<Segment>>, at: QuestionAt) -> Vec<Segment> {
    if passages.is_empty() {
        return vec![Segment::Text(format!("Question: {question}"))];
    }
    let (first, last) = match at {
        QuestionAt::Both => (true, true),
        QuestionAt::Before => (true, false),
        QuestionAt::After | QuestionAt::Auto => (false, true),
    };
    let lead = if first { format!("Question: {question}\n\n") } else { String::new() };
    let mut user = vec![Segment::Text(format!("{lead}Read the text and answer the question.\n\nText:\n"))];
    let n = passages.len();
    for (i, p) in passages.into_iter().enumerate() {
        user.extend(p);
        if last || i + 1 < n {
            user.push(Segment::Text("\n\n".into()));
        }
    }
    if last {
        user.push(Segment::Text(format!("Question: {question}")));
    }
    user
}

/// The RAG question as a one-turn chat.
pub fn rag(question: &str, passages: Vec<Vec<Segment>>, at: QuestionAt) -> Vec<Segment> {
    let system = system_for(!passages.is_empty());
    chat(system, rag_user(question, passages, at))
}

/// Decoder positions the segments take.
pub fn positions(decoder: &Decoder, segments: &[Segment]) -> Result<usize> {
    let mut n = 0;
    for s in segments {
        n += match s {
            Segment::Text(t) => tokenize(decoder, t)?.len(),
            Segment::Tokens(t) => t.len(),
            Segment::Embeds(e) => e.dim(0)?,
        };
    }
    Ok(n)
}

/// Tokenize text with the decoder's tokenizer.
pub fn tokenize(decoder: &Decoder, text: &str) -> Result<Vec<u32>> {
    Ok(decoder.tokenizer.encode(text, false).map_err(|e| anyhow!("tokenizer: {e}"))?.get_ids().to_vec())
}

/// Turn segments into one embeddings tensor. Runs of token segments are embedded together.
pub fn assemble(decoder: &Decoder, segments: &[Segment]) -> Result<DecoderInput> {
    let mut parts: Vec<Tensor> = Vec::new();
    let mut ids: Vec<u32> = Vec::new();
    let mut compressed = 0;
    for seg in segments {
        match seg {
            Segment::Text(t) => ids.extend(tokenize(decoder, t)?),
            Segment::Tokens(t) => ids.extend_from_slice(t),
            Segment::Embeds(e) => {
                if !ids.is_empty() {
                    parts.push(decoder.embed_tokens(&ids)?);
                    ids.clear();
                }
                compressed += e.dim(0)?;
                parts.push(e.to_dtype(decoder.dtype)?);
            }
        }
    }
    if !ids.is_empty() {
        parts.push(decoder.embed_tokens(&ids)?);
    }
    let embeds = Tensor::cat(&parts, 0)?;
    let positions = embeds.dim(0)?;
    Ok(DecoderInput { embeds: embeds.unsqueeze(0)?, positions, compressed_positions: compressed })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(segs: &[Segment]) -> String {
        segs.iter()
            .map(|s| match s {
                Segment::Text(t) => t.clone(),
                Segment::Tokens(t) => format!("<{} tokens>", t.len()),
                Segment::Embeds(_) => "<vectors>".into(),
            })
            .collect()
    }

    #[test]
    fn the_question_goes_where_the_layout_says() {
        let q = "Who built the dam?";
        let passages = || vec![vec![Segment::Tokens(vec![1, 2, 3])], vec![Segment::Tokens(vec![4])]];
        let after = text(&rag_user(q, passages(), QuestionAt::After));
        let both = text(&rag_user(q, passages(), QuestionAt::Both));
        let before = text(&rag_user(q, passages(), QuestionAt::Before));
        assert_eq!(after.matches(q).count(), 1);
        assert_eq!(before.matches(q).count(), 1);
        assert!(before.starts_with(&format!("Question: {q}")) && before.ends_with("<1 tokens>"), "{before}");
        assert_eq!(both, format!("{before}\n\nQuestion: {q}"));
        assert!(after.ends_with(&format!("Question: {q}")), "{after}");
        assert_eq!(both.matches(q).count(), 2);
        assert!(both.starts_with(&format!("Question: {q}")) && both.ends_with(&format!("Question: {q}")), "{both}");
        // the passages sit between the two copies, in order
        let (first, last) = (both.find("<3 tokens>").unwrap(), both.find("<1 tokens>").unwrap());
        assert!(both.find(q).unwrap() < first && first < last && last < both.rfind(q).unwrap(), "{both}");
        // no passages: one plain question whatever the layout
        assert_eq!(text(&rag_user(q, vec![], QuestionAt::Both)), format!("Question: {q}"));
        // auto follows the weights' card, else after; a choice on the command line wins
        assert_eq!(QuestionAt::Auto.resolve(Some(QuestionAt::Both)), QuestionAt::Both);
        assert_eq!(QuestionAt::Auto.resolve(None), QuestionAt::After);
        assert_eq!(QuestionAt::After.resolve(Some(QuestionAt::Both)), QuestionAt::After);
        assert_eq!(QuestionAt::Both.resolve(None), QuestionAt::Both);
        assert_eq!(QuestionAt::Auto.resolve(Some(QuestionAt::Before)), QuestionAt::Before);
    }
}
