//! Evaluation: answer metrics ([`metrics`]); questions over an index ([`questions`]) and
//! conversations with given passages ([`conversations`]); compressed reading of text
//! ([`perplexity`]); how much of a compressed passage reaches the answer ([`answers`]) and
//! whether the answer is in its chunk's vector at all ([`readback`]).

pub mod answers;
pub mod conversations;
pub mod metrics;
pub mod perplexity;
#[cfg(feature = "store")]
pub mod questions;
pub mod readback;
