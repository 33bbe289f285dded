//! # refrag: REFRAG retrieval-augmented generation, offline, in Rust
//!
//! REFRAG (Lin et al., arXiv 2509.01092) feeds a decoder one projected vector per k-token chunk
//! of retrieved context instead of the chunk's k tokens. The chunk vectors are computed once at
//! index time, so at question time the prompt is ~k times shorter.
//!
//! ## Architecture (data flows one way)
//!
//! ```text
//! corpus ─► chunker ─► encoder ─► store (LanceDB)          [index]
//! question ─► encoder ─► store.search ─► policy ─► prompt::assemble ─► decoder ─► generate  [ask]
//! ```
//!
//! The folders name REFRAG's stages; each imports only the ones above it in this list:
//!
//! - [`rng`], [`options`], [`device`], [`progress`], [`profile`]: small shared pieces.
//! - [`model`]: the networks (decoder, encoder, projector) and the pinned base models.
//! - [`index`]: documents, passages and chunks; the LanceDB store and the indexer.
//! - [`read`]: decoder inputs, expansion policies, generation, the question-answering engine,
//!   multi-turn sessions.
//! - [`eval`]: metrics and perplexity.
//! - [`train`]: the REFRAG training stages (reconstruction, CPT, SFT, the policy).
//! - [`bench`]: latency of full context against REFRAG.
//! - [`cli`]: the `refrag` command line (argument definitions and printing).

pub mod bench;
pub mod cli;
pub mod device;
pub mod eval;
pub mod index;
pub mod model;
pub mod options;
pub mod profile;
pub mod progress;
pub mod read;
pub mod rng;
pub mod train;
