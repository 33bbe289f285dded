//! The networks and where their weights come from: the decoder (SmolLM2, GGUF) and its
//! tokenizer, the MiniLM encoder, the projector, the ops with a written-out backward, and the
//! pinned base models' cache.

pub mod cache;
pub mod compressor;
pub mod decoder;
pub mod diffops;
pub mod encoder;
pub mod gguf_tokenizer;
pub mod hub;
pub mod load;
pub mod policy;
pub mod projector;
pub mod weights;
