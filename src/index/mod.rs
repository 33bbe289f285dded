//! Indexing: documents become passages and k-token chunks ([`corpus`]); the [`indexer`] encodes
//! them in batches and commits them to the LanceDB [`store`] (passage layout: [`schema`]; what
//! the index was built with: [`info`]; one writer at a time: [`lock`]).

pub mod corpus;
pub mod formats;
#[cfg(feature = "store")]
pub mod indexer;
pub mod info;
#[cfg(feature = "store")]
pub mod lock;
#[cfg(feature = "store")]
pub mod schema;
#[cfg(feature = "store")]
pub mod store;
