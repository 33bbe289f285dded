//! The argument groups that ask, chat and eval share (retrieval and compression, sampling, a
//! session's window), resolved into the library's settings, and how their choices are named in
//! reports.

#[cfg(feature = "store")]
use super::Global;
use crate::options::{Mode, Policy, SearchKind};
#[cfg(feature = "store")]
use crate::read::engine::{AskOptions, Engine, EngineOptions};
use crate::read::generate::SamplingOptions;
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

/// Sampling flags shared by ask, eval and chat.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64, env = "REFRAG_MAX_TOKENS")]
    pub max_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0, env = "REFRAG_TEMPERATURE")]
    pub temperature: f64,
    /// Nucleus sampling mass (with --temperature > 0).
    #[arg(long, env = "REFRAG_TOP_P")]
    pub top_p: Option<f64>,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 299792458, env = "REFRAG_SEED")]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn options(&self) -> Result<SamplingOptions> {
        if self.max_tokens == 0 {
            bail!("--max-tokens must be at least 1");
        }
        if let Some(p) = self.top_p {
            if !(0.0..=1.0).contains(&p) || p == 0.0 {
                bail!("--top-p {p}: must be in (0, 1]");
            }
        }
        if self.temperature < 0.0 {
            bail!("--temperature {}: must be >= 0", self.temperature);
        }
        Ok(SamplingOptions {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
        })
    }
}

/// Retrieval and compression flags shared by ask and eval.
#[derive(Args, Debug, Clone)]
pub struct RagArgs {
    /// Index database (a folder, or an object-store URI).
    #[arg(long, env = "REFRAG_DB", default_value = "index")]
    pub db: String,
    /// Passages to retrieve.
    #[arg(long, default_value_t = 3, env = "REFRAG_TOP_K")]
    pub top_k: usize,
    /// What the decoder reads: refrag (chunk vectors), full (passage tokens), none.
    /// Default for `ask` and `chat` over an index: refrag when the index was built with the
    /// answer weights (--weights, else the shipped weights/qa), else full; `eval` and
    /// `ask --context`: full.
    #[arg(long, value_enum, env = "REFRAG_MODE")]
    pub mode: Option<Mode>,
    /// Chunk size in tokens; must match the index (default: the index's).
    #[arg(long, env = "REFRAG_K")]
    pub k: Option<usize>,
    /// Fraction of chunks to expand back to tokens (refrag mode). Default: the share the
    /// weights' card recommends (its "expand"; the shipped weights/qa: 0.25), else 0. --expand 0
    /// reads every chunk compressed.
    #[arg(long, env = "REFRAG_EXPAND")]
    pub expand: Option<f64>,
    /// Refrag mode, instead of --expand: expand chunks, in the policy's order, while the
    /// passages fit in N decoder positions (a chunk vector takes 1, an expanded chunk up to k):
    /// a latency budget. Below the number of chunks, nothing is expanded.
    #[arg(long, value_name = "N", env = "REFRAG_BUDGET", conflicts_with = "expand")]
    pub budget: Option<usize>,
    /// Which chunks to expand.
    #[arg(long, value_enum, default_value = "sim-span", env = "REFRAG_POLICY")]
    pub policy: Policy,
    /// Retrieval: vector, or hybrid (vector + BM25).
    #[arg(long, value_enum, default_value = "vector", env = "REFRAG_SEARCH")]
    pub search: SearchKind,
    /// In --mode full or none: read with the trained weights' decoder adapters folded in (the
    /// paper's LLaMA-FT baseline: the fine-tuned decoder reading the passages' tokens).
    /// Refrag mode always does.
    #[arg(long, env = "REFRAG_ADAPTED")]
    pub adapted: bool,
}

impl RagArgs {
    /// The share of chunks to expand (0 until [`RagArgs::settled`] has read the card).
    pub fn share(&self) -> f64 {
        self.expand.unwrap_or(0.0)
    }

    /// The share as reported (`"expand"` in JSON): none under a budget.
    pub fn reported_share(&self) -> Option<f64> {
        self.budget.is_none().then(|| self.share())
    }

    /// Whether chunks can go back to tokens (a share, or a budget), policy aside.
    pub fn expands(&self) -> bool {
        self.share() > 0.0 || self.budget.is_some()
    }

    /// How these options choose chunks to expand, with the trained policy `net` (for `rl`).
    pub fn selection<'a>(
        &self,
        net: Option<&'a crate::model::policy::PolicyNet>,
        seed: u64,
    ) -> crate::read::policy::Selection<'a> {
        crate::read::policy::Selection { policy: self.policy, expand: self.share(), budget: self.budget, net, seed }
    }

    /// These options with the share to expand settled: --expand as given (checked), else in
    /// refrag mode without --budget or `--policy none` the share the weights' card recommends,
    /// else 0.
    pub fn settled(&self, mode: Mode, trained: Option<&crate::model::weights::Trained>) -> Result<RagArgs> {
        let expand = match self.expand {
            Some(p) if !(0.0..=1.0).contains(&p) => bail!("--expand {p}: must be between 0 and 1"),
            Some(p) => p,
            None if mode == Mode::Refrag && self.budget.is_none() && self.policy != Policy::None => {
                trained.and_then(|t| t.expand).unwrap_or(0.0)
            }
            None => 0.0,
        };
        Ok(RagArgs { expand: Some(expand), ..self.clone() })
    }
}

#[cfg(feature = "store")]
impl RagArgs {
    /// Load models, index and (when present) trained weights; resolve the mode, and the share
    /// to expand (the options returned, settled). Without --mode, `answers` (ask, chat) read
    /// refrag when the index was built with the answer weights: with its card's share expanded
    /// it answers better than the passages read in full (weights/qa/card.json); `eval` reads
    /// full context unless told, so that every reading it scores is named.
    pub fn engine(&self, g: &Global, answers: bool) -> Result<(Engine, Mode, RagArgs)> {
        self.settled(Mode::Full, None)?; // a bad --expand fails before the models load
        let mode = if answers { self.mode } else { Some(self.mode.unwrap_or(Mode::Full)) };
        let storage_options = g.storage_options()?;
        let o =
            EngineOptions { db: &self.db, storage_options: &storage_options, mode, adapted: self.adapted, k: self.k };
        let engine = Engine::open(&g.loader()?, &o)?;
        if let Some(why) = engine.fallback.as_deref().filter(|_| !g.quiet) {
            eprintln!("refrag: note: {why}");
        }
        let mode = engine.mode;
        let trained = engine.reading.trained.as_ref();
        let rag = self.settled(mode, trained)?;
        crate::read::policy::require(mode == Mode::Refrag && rag.policy == Policy::Rl && rag.expands(), trained)?;
        Ok((engine, mode, rag))
    }

    pub fn options(&self, mode: Mode, sampling: SamplingOptions) -> AskOptions {
        AskOptions {
            mode,
            top_k: self.top_k,
            search: self.search,
            expand: self.share(),
            budget: self.budget,
            policy: self.policy,
            sampling,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct SessionArgs {
    /// Most decoder positions per turn (history + passages + question); default: the
    /// decoder's window. The oldest turns are left out when it is full.
    #[arg(long, env = "REFRAG_CHAT_WINDOW")]
    pub window: Option<usize>,
    /// Line-editor history file. Default: chat_history in the data folder.
    #[arg(long, env = "REFRAG_CHAT_HISTORY")]
    pub history: Option<PathBuf>,
}

pub fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Refrag => "refrag",
        Mode::Full => "full",
        Mode::None => "none",
    }
}

/// The expansion policy a summary names: only a compressed reading with chunks to expand has
/// one (null otherwise).
pub fn policy_named(m: Mode, expands: bool, policy: Policy) -> Option<Policy> {
    (m == Mode::Refrag && expands).then_some(policy)
}
