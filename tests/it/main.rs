//! Integration tests with the real models (pulled into the model cache on first need) and, for
//! the CLI, the real binary. One test crate: each test binary links all of lancedb and candle.

mod answers;
mod chat;
mod cli;
mod common;
mod crash;
mod decoder;
mod encoder;
mod formats;
mod grown;
mod hub;
mod layers;
mod library;
mod pipeline;
mod robust;
mod s3;
mod tokenizer;
mod train;
