//! Choices shared by ask, eval, bench and chat (no dependency on the store).

/// What the decoder reads of the retrieved passages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One projected vector per k-token chunk (expanded chunks as tokens).
    Refrag,
    /// The passages' tokens (plain RAG, the baseline).
    Full,
    /// No context at all.
    None,
}

/// Which chunks go back to tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Expand nothing.
    None,
    /// Chunks chosen at random (seeded).
    Random,
    /// Chunks whose encoder vector is closest to the question's.
    Sim,
    /// Question similarity over spans: a chunk scores the best similarity of itself and its
    /// neighbours in the same passage, so the closest chunks are expanded with the text around
    /// them (a sentence rather than a 16-token fragment of it).
    #[value(name = "sim-span")]
    #[serde(rename = "sim-span")]
    SimSpan,
    /// Chunks the decoder finds hardest (highest perplexity of their own tokens; costs a
    /// full-context pass over the passages).
    #[value(name = "ppl-desc")]
    #[serde(rename = "ppl-desc")]
    PplDesc,
    /// Chunks the decoder finds easiest (lowest perplexity first).
    #[value(name = "ppl-asc")]
    #[serde(rename = "ppl-asc")]
    PplAsc,
    /// The trained policy (`refrag train policy`, policy.safetensors in the weights folder).
    Rl,
}

/// How to search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SearchKind {
    /// Nearest retrieval vectors (cosine).
    Vector,
    /// Vector and BM25 full-text results fused by reciprocal rank.
    Hybrid,
}

