//! Reading: what the decoder reads and how it answers. [`prompt`] assembles decoder inputs,
//! [`policy`] chooses the chunks to expand, [`generate`] decodes, [`score`] scores given tokens,
//! [`reader`] reads given text and answers from given passages ([`tasks`]: their format),
//! [`engine`] answers a question over an index, [`chat`] holds multi-turn sessions over it.

#[cfg(feature = "store")]
pub mod chat;
#[cfg(feature = "store")]
pub mod engine;
pub mod generate;
pub mod policy;
pub mod prompt;
pub mod reader;
pub mod score;
pub mod tasks;
