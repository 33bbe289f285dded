//! What an index was built with ([`IndexInfo`], kept in the `refrag_meta` table), and the checks
//! that refuse an index built with other models, another chunk encoder or another k.

use anyhow::{anyhow, bail, Result};
use std::collections::HashMap;

/// The layout version of the passages table; another one is refused with the fix.
pub const SCHEMA_VERSION: u32 = 2;

/// What an index was built with.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IndexInfo {
    /// The retrieval encoder (passage and question vectors).
    pub encoder: String,
    /// The chunk encoder (chunk vectors): the retrieval encoder, plus trained tensors if any.
    pub chunk_encoder: String,
    pub tokenizer: String,
    pub k: usize,
    /// The retrieval vectors' size.
    pub dim: usize,
    /// The chunk vectors' size (the retrieval vectors' in indexes that do not record it: they
    /// were MiniLM's).
    pub chunk_dim: usize,
    /// Whether the passages table stores the retrieval encoder's vector of each chunk's text
    /// (`chunk_sims`; not in indexes that do not record it). An index keeps its layout when
    /// documents are added.
    pub chunk_sims: bool,
    pub schema_version: u32,
}

// the store reads and writes the pairs (absent from the lean GPU build)
#[cfg_attr(not(feature = "store"), allow(dead_code))]
impl IndexInfo {
    pub(super) fn to_pairs(&self) -> Vec<(String, String)> {
        vec![
            ("encoder".into(), self.encoder.clone()),
            ("chunk_encoder".into(), self.chunk_encoder.clone()),
            ("tokenizer".into(), self.tokenizer.clone()),
            ("k".into(), self.k.to_string()),
            ("dim".into(), self.dim.to_string()),
            ("chunk_dim".into(), self.chunk_dim.to_string()),
            ("chunk_sims".into(), self.chunk_sims.to_string()),
            ("schema_version".into(), self.schema_version.to_string()),
        ]
    }

    pub(super) fn from_pairs(m: &HashMap<String, String>) -> Result<Self> {
        let get = |k: &str| m.get(k).cloned().ok_or_else(|| anyhow!("index metadata lacks {k}"));
        Ok(Self {
            encoder: get("encoder")?,
            // absent before schema v2: the schema check below reports that
            chunk_encoder: get("chunk_encoder").unwrap_or_default(),
            tokenizer: get("tokenizer")?,
            k: get("k")?.parse()?,
            dim: get("dim")?.parse()?,
            chunk_dim: match m.get("chunk_dim") {
                Some(d) => d.parse()?,
                None => get("dim")?.parse()?,
            },
            chunk_sims: match m.get("chunk_sims") {
                Some(v) => v.parse().map_err(|_| anyhow!("index metadata: chunk_sims is {v:?}, not true or false"))?,
                None => false,
            },
            schema_version: get("schema_version")?.parse()?,
        })
    }

    /// Error unless the chunk vectors come from the chunk encoder in use now (REFRAG mode, and
    /// any write: one index never mixes chunk vectors of two encoders).
    pub fn check_chunks(&self, now: &IndexInfo, db: &str) -> Result<()> {
        if weights_of(&self.chunk_encoder) != weights_of(&now.chunk_encoder) {
            bail!(
                "{db}: chunk vectors were made by {} but the trained weights in use need {}; \
                 re-index into a new --db with these weights, pass the --weights the index was built with, or use --mode full",
                self.chunk_encoder, now.chunk_encoder
            );
        }
        Ok(())
    }

    /// Error unless `other` (the models in use now) can read this index.
    pub fn check(&self, now: &IndexInfo, db: &str) -> Result<()> {
        if self.schema_version != now.schema_version {
            bail!(
                "{db}: index schema v{} but this refrag reads v{}; re-index into a new --db",
                self.schema_version,
                now.schema_version
            );
        }
        if weights_of(&self.encoder) != weights_of(&now.encoder) {
            bail!("{db}: index built with encoder {} but {} is loaded; use the same --encoder or re-index into a new --db", self.encoder, now.encoder);
        }
        if self.tokenizer != now.tokenizer {
            bail!(
                "{db}: index built with decoder tokenizer {} but {} is loaded; use the same --decoder or re-index",
                self.tokenizer,
                now.tokenizer
            );
        }
        if self.k != now.k {
            bail!(
                "{db}: index built with k = {} but k = {} was asked for; pass --k {} or re-index into a new --db",
                self.k,
                now.k,
                self.k
            );
        }
        Ok(())
    }
}

/// An encoder identity without its folder name (`NAME@DIGEST[+trained@DIGEST]`): the same
/// weights fetched into another folder (a Hugging Face snapshot, a copy) are the same encoder.
fn weights_of(id: &str) -> &str {
    id.split_once('@').map_or(id, |(_, w)| w)
}
