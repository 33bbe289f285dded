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

impl QuestionAt {
    /// The command line's choice, or with `auto` the one the weights that the answers read were
    /// trained with (`trained`: their card's), else `after`.
    pub fn resolve(self, trained: Option<QuestionAt>) -> QuestionAt {
        match self {
            QuestionAt::Auto => trained.filter(|t| *t != QuestionAt::Auto).unwrap_or(QuestionAt::After),
            chosen => chosen,
        }
    }
}
