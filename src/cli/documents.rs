//! `refrag docs`: list, remove and count the documents of an index.

use super::Global;
use crate::index::lock::WriteLock;
use crate::index::store::Store;
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum DocsCmd {
    /// One line per document: id, passages, chunks, when indexed (UTC), title.
    List(DocsArgs),
    /// Remove documents by id, in one commit (readers see all of them or none gone).
    Rm {
        /// Document ids, as `docs list` prints them.
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        at: DocsArgs,
    },
    /// Documents, passages, chunks, bytes on disk, and what the index was built with.
    Stats(DocsArgs),
}

#[derive(Args, Debug)]
pub struct DocsArgs {
    /// Index database (a folder, or an object-store URI).
    #[arg(long, env = "REFRAG_DB", default_value = "index")]
    pub db: String,
    /// JSON output (one object per document for `list`).
    #[arg(long, env = "REFRAG_JSON")]
    pub json: bool,
}

fn open(g: &Global, db: &str) -> Result<Store> {
    Ok(Store::open_index(db, &g.storage_options()?)?.0)
}

pub fn run(g: &Global, cmd: DocsCmd) -> Result<ExitCode> {
    match cmd {
        DocsCmd::List(a) => {
            let docs = open(g, &a.db)?.documents()?;
            for d in &docs {
                if a.json {
                    outln!("{}", serde_json::to_string(d)?);
                } else {
                    let when = if d.indexed.is_empty() { "-" } else { &d.indexed };
                    outln!("{}\t{} passages\t{} chunks\t{when}\t{}", d.id, d.passages, d.chunks, d.title);
                }
            }
        }
        DocsCmd::Rm { ids, at } => {
            let _lock = crate::index::lock::lock_for_writing(&at.db, WriteLock::Exclusive)?;
            let store = open(g, &at.db)?;
            let have = store.doc_passage_counts()?;
            let missing: Vec<&str> = ids.iter().filter(|id| !have.contains_key(*id)).map(String::as_str).collect();
            if !missing.is_empty() {
                bail!("{}: no document {} (nothing removed; `refrag docs list` names them)", at.db, missing.join(", "));
            }
            let passages = store.delete_docs(&ids)?;
            if at.json {
                outln!("{}", serde_json::json!({"removed": ids.len(), "passages": passages}));
            } else {
                outln!("removed {} document(s), {passages} passages", ids.len());
            }
        }
        DocsCmd::Stats(a) => {
            let (store, info) = Store::open_index(&a.db, &g.storage_options()?)?;
            let docs = store.documents()?;
            let sum = |f: fn(&crate::index::store::DocEntry) -> usize| docs.iter().map(f).sum::<usize>();
            let v = serde_json::json!({
                "documents": docs.len(),
                "passages": sum(|d| d.passages),
                "chunks": sum(|d| d.chunks),
                "tokens": sum(|d| d.tokens),
                "bytes_on_disk": store.disk_bytes(),
                "encoder": info.encoder,
                "chunk_encoder": info.chunk_encoder,
                "tokenizer": info.tokenizer,
                "k": info.k,
                "schema_version": info.schema_version,
            });
            if a.json {
                outln!("{v}");
            } else {
                outln!(
                    "{} documents, {} passages, {} chunks (k = {}), {:.1} MiB on disk\n\
                     retrieval encoder: {}\nchunk vectors: {}",
                    v["documents"],
                    v["passages"],
                    v["chunks"],
                    info.k,
                    v["bytes_on_disk"].as_f64().unwrap_or_default() / (1 << 20) as f64,
                    info.encoder,
                    info.chunk_encoder
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
