//! The one place that builds decoder inputs: the chat template, question tokens, passage
//! tokens and projected chunk embeddings, in order, as one embeddings tensor.
//!
//! ask, eval, bench and training all go through [`assemble`], so "what the decoder reads" is
//! defined once.

use crate::decoder::Decoder;
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

/// Where the user turn of a RAG question puts the question (`--question-at`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuestionAt {
    /// As the trained weights that the answers read were trained (their card's
    /// `question_at`); `after` when no weights are read or their card does not say.
    #[default]
    Auto,
    /// After the passages.
    After,
    /// Before the passages only (the paper's order: question, then chunk vectors).
    Before,
    /// Before the passages and again after them.
    Both,
}

static REQUESTED: std::sync::OnceLock<QuestionAt> = std::sync::OnceLock::new();
static USED: std::sync::OnceLock<QuestionAt> = std::sync::OnceLock::new();

/// The command line's choice; set once per process, before any prompt is built.
pub fn request_question_at(at: QuestionAt) {
    let _ = REQUESTED.set(at);
}

/// Fix the layout for this process: the command line's choice, or with `auto` the one the
/// weights that the answers read were trained with (`trained`: their card's; `None` when no
/// weights are read or the card does not say). The first call decides.
pub fn use_question_at(trained: Option<QuestionAt>) -> QuestionAt {
    *USED.get_or_init(|| resolve_question_at(REQUESTED.get().copied().unwrap_or_default(), trained))
}

/// The command line's choice, or with `auto` the trained one, else `after`.
pub fn resolve_question_at(requested: QuestionAt, trained: Option<QuestionAt>) -> QuestionAt {
    match requested {
        QuestionAt::Auto => trained.filter(|t| *t != QuestionAt::Auto).unwrap_or(QuestionAt::After),
        chosen => chosen,
    }
}

/// The layout prompts are built with (`after` until [`use_question_at`] decides otherwise).
pub fn question_at() -> QuestionAt {
    USED.get().copied().unwrap_or_else(|| resolve_question_at(REQUESTED.get().copied().unwrap_or_default(), None))
}

/// The layout a weights folder's card.json names (`question_at`), if any; a value that is not
/// a layout is an error naming the card (read another way, the weights would answer worse).
pub fn card_question_at(dir: &std::path::Path) -> Result<Option<QuestionAt>> {
    let path = dir.join("card.json");
    let Ok(bytes) = std::fs::read(&path) else { return Ok(None) };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else { return Ok(None) };
    question_at_in(&v, &path)
}

/// The layout a parsed card (read from `path`) names, if any.
pub fn question_at_in(card: &serde_json::Value, path: &std::path::Path) -> Result<Option<QuestionAt>> {
    match card.get("question_at") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(x) => serde_json::from_value(x.clone())
            .map(Some)
            .map_err(|_| anyhow!("{}: \"question_at\": {x} is not a layout (after, before or both)", path.display())),
    }
}

/// The user turn of a RAG question: each passage's segments (tokens, chunk embeddings or a
/// mix), then the question (with `--question-at before`, the question comes first instead; with
/// `both`, it comes first and last). With no passages, a plain question.
pub fn rag_user(question: &str, passages: Vec<Vec<Segment>>) -> Vec<Segment> {
    rag_user_at(question, passages, question_at())
}

fn rag_user_at(question: &str, passages: Vec<Vec<Segment>>, at: QuestionAt) -> Vec<Segment> {
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
pub fn rag(question: &str, passages: Vec<Vec<Segment>>) -> Vec<Segment> {
    let system = system_for(!passages.is_empty());
    chat(system, rag_user(question, passages))
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
    Ok(decoder
        .tokenizer
        .encode(text, false)
        .map_err(|e| anyhow!("tokenizer: {e}"))?
        .get_ids()
        .to_vec())
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
        let after = text(&rag_user_at(q, passages(), QuestionAt::After));
        let both = text(&rag_user_at(q, passages(), QuestionAt::Both));
        let before = text(&rag_user_at(q, passages(), QuestionAt::Before));
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
        assert_eq!(text(&rag_user_at(q, vec![], QuestionAt::Both)), format!("Question: {q}"));
        // auto follows the weights' card, else after; a choice on the command line wins
        assert_eq!(resolve_question_at(QuestionAt::Auto, Some(QuestionAt::Both)), QuestionAt::Both);
        assert_eq!(resolve_question_at(QuestionAt::Auto, None), QuestionAt::After);
        assert_eq!(resolve_question_at(QuestionAt::After, Some(QuestionAt::Both)), QuestionAt::After);
        assert_eq!(resolve_question_at(QuestionAt::Both, None), QuestionAt::Both);
        assert_eq!(resolve_question_at(QuestionAt::Auto, Some(QuestionAt::Before)), QuestionAt::Before);
    }
}
