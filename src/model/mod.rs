//! The networks and where their weights come from: the decoder (SmolLM2, GGUF) and its
//! tokenizer, the MiniLM encoder, the chunk encoder grown from the decoder ([`grown`]), the
//! projector, the expansion policy's network, the ops with a written-out backward; [`compressor`], the one way decoder tokens become chunk vectors;
//! [`weights`], trained weights and their card; [`load`], everything a command reads, settled
//! once; [`cache`] and [`hub`], the pinned base models.

pub mod attention;
pub mod cache;
pub mod compressor;
pub mod decoder;
pub mod diffops;
pub mod elementwise;
pub mod encoder;
pub mod gguf_tokenizer;
pub mod grown;
pub mod hub;
pub mod load;
pub mod policy;
pub mod projector;
pub mod weights;
