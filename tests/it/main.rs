//! Integration tests with the real models (pulled into the model cache on first need) and, for
//! the CLI, the real binary. One test crate: each test binary links all of lancedb and candle.

mod common;
mod chat;
mod cli;
mod crash;
mod decoder;
mod encoder;
mod hub;
mod pipeline;
mod robust;
mod s3;
mod tokenizer;
mod train;
