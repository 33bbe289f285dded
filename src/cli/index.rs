//! `refrag index`: build or update an index.

use super::Global;
use crate::index::indexer::{self, IndexOptions};
use crate::index::lock::WriteLock;
use crate::index::store::Store;
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct IndexArgs {
    /// Files and folders: text (.txt, .rst, .adoc, .org), Markdown, HTML and PDF (one document
    /// each; PDF through poppler's pdftotext) and .jsonl ({"id","title","text"} per line).
    /// Folders are walked as ripgrep walks them (.gitignore respected, hidden entries skipped);
    /// every other file found is counted as skipped, by reason (`-v` names them).
    #[arg(required_unless_present_any = ["delete", "finalize"])]
    pub paths: Vec<PathBuf>,
    /// Index database (a folder, or an object-store URI).
    #[arg(long, env = "REFRAG_DB", default_value = "index")]
    pub db: String,
    /// Chunk size: decoder tokens per chunk vector.
    #[arg(long, default_value_t = 16, env = "REFRAG_K")]
    pub k: usize,
    /// Passages hold at least this many words (when the text allows).
    #[arg(long, default_value_t = 100, env = "REFRAG_INDEX_MIN_WORDS")]
    pub min_words: usize,
    /// Passages hold at most this many words.
    #[arg(long, default_value_t = 200, env = "REFRAG_INDEX_MAX_WORDS")]
    pub max_words: usize,
    /// Documents per commit.
    #[arg(long, default_value_t = 64, env = "REFRAG_INDEX_BATCH_DOCS")]
    pub batch_docs: usize,
    /// Remove these document ids (repeatable).
    #[arg(long, value_name = "ID", env = "REFRAG_INDEX_DELETE", conflicts_with = "shard")]
    pub delete: Vec<String>,
    /// Index only part I of N of the inputs (0-based; a stable hash of each document id), beside
    /// N-1 other workers writing to the same --db. Workers only append; run `--finalize` once
    /// all are done.
    #[arg(long, value_name = "I/N", value_parser = parse_shard, env = "REFRAG_INDEX_SHARD")]
    pub shard: Option<(usize, usize)>,
    /// With --shard on a new index: seconds the other workers wait for shard 0 to create
    /// the tables.
    #[arg(long, default_value_t = 600, env = "REFRAG_INDEX_SHARD_WAIT")]
    pub shard_wait: u64,
    /// A new index whose chunk vectors are not MiniLM's (a chunk encoder grown from the
    /// decoder) stores MiniLM vectors of the chunks' texts too, so that `sim`/`sim-span` need
    /// no encoder pass at question time; this leaves them out (a smaller index, faster
    /// indexing, a slower first token with those policies). An existing index keeps its layout.
    #[arg(long, env = "REFRAG_INDEX_NO_CHUNK_SIMS")]
    pub no_chunk_sims: bool,
    /// Compact the index and build its vector and full-text indexes (after shard workers;
    /// a plain `refrag index` does this itself).
    #[arg(long, conflicts_with = "shard", env = "REFRAG_INDEX_FINALIZE")]
    pub finalize: bool,
    /// Print the summary as JSON.
    #[arg(long, env = "REFRAG_JSON")]
    pub json: bool,
    /// Folders: also walk hidden files and folders (names starting with a dot).
    #[arg(long, env = "REFRAG_INDEX_HIDDEN")]
    pub hidden: bool,
    /// Folders: do not respect .gitignore, .ignore and git's exclude files.
    #[arg(long, env = "REFRAG_INDEX_NO_IGNORE")]
    pub no_ignore: bool,
    /// Folders: include files matching GLOB, or exclude them with `!GLOB` (gitignore syntax, as
    /// `rg --glob`; repeatable).
    #[arg(long, short = 'g', value_name = "GLOB", env = "REFRAG_INDEX_GLOB")]
    pub glob: Vec<String>,
    /// Folders: follow symbolic links.
    #[arg(long, short = 'L', env = "REFRAG_INDEX_FOLLOW")]
    pub follow: bool,
    /// Folders: skip files larger than this many MiB.
    #[arg(long, default_value_t = 64, value_name = "MIB", env = "REFRAG_INDEX_MAX_FILE_MIB")]
    pub max_file_mib: u64,
    /// Folders: also index source code files (.rs, .py, .js, .go, .c, ... as text).
    #[arg(long, env = "REFRAG_INDEX_CODE")]
    pub code: bool,
    /// Folders: only files of this type (ripgrep's types: md, html, pdf, txt, py, rust, ...;
    /// repeatable; a source type is taken as text without --code).
    #[arg(long = "type", short = 't', value_name = "TYPE", env = "REFRAG_INDEX_TYPE")]
    pub types: Vec<String>,
    /// Folders: not files of this type (repeatable).
    #[arg(long = "type-not", short = 'T', value_name = "TYPE", env = "REFRAG_INDEX_TYPE_NOT")]
    pub types_not: Vec<String>,
}

fn parse_shard(s: &str) -> std::result::Result<(usize, usize), String> {
    let bad = || format!("{s}: expected I/N with 0 <= I < N, e.g. 0/4");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

pub fn run(g: &Global, args: IndexArgs) -> Result<ExitCode> {
    g.storage_options()?;
    if args.finalize && args.paths.is_empty() && args.delete.is_empty() {
        return finalize(g, &args);
    }
    if args.k == 0 || args.k > 256 {
        bail!("--k {}: must be between 1 and 256", args.k);
    }
    if args.min_words == 0 || args.min_words > args.max_words {
        bail!("--min-words {} / --max-words {}: need 0 < min <= max", args.min_words, args.max_words);
    }
    // Read and check every input before touching the index.
    let mut warnings = Vec::new();
    let walk = crate::index::corpus::WalkOptions {
        hidden: args.hidden,
        no_ignore: args.no_ignore,
        follow: args.follow,
        globs: args.glob.clone(),
        max_bytes: args.max_file_mib.saturating_mul(1 << 20),
        code: args.code,
        types: args.types.clone(),
        types_not: args.types_not.clone(),
    };
    let mut skipped = Vec::new();
    let files = crate::index::corpus::collect_files(&args.paths, &walk, &mut skipped)?;
    let docs = crate::index::corpus::load(&files, &mut warnings, &mut skipped)?;
    for w in &warnings {
        if !g.quiet {
            eprintln!("refrag: warning: {w}");
        }
    }
    if g.verbose > 0 && !g.quiet {
        for s in &skipped {
            let detail = if s.detail.is_empty() { String::new() } else { format!(" ({})", s.detail) };
            eprintln!("refrag: skipped {}: {}{detail}", s.path.display(), s.reason.name());
        }
    }
    let skipped_by_reason = skip_counts(&skipped);
    let ld = g.loader()?;
    // the decoder's tokenizer cuts the chunks; its first layers are a grown chunk encoder's
    let decoder = ld.decoder_with(crate::model::decoder::Ops::Fused, false)?;
    let (tokenizer, tokenizer_id) = (&decoder.tokenizer, decoder.tokenizer_id.clone());
    let encoder = ld.encoder()?;
    let lock = if args.shard.is_some() { WriteLock::Shared } else { WriteLock::Exclusive };
    let _lock = crate::index::lock::lock_for_writing(&args.db, lock)?;
    let mut store = Store::open_with(&args.db, &g.storage_options()?)?;
    // Chunk vectors come from the trained chunk encoder when trained weights are in use.
    let trained = ld.trained(&encoder, &decoder, crate::model::weights::Purpose::Answers)?;
    let chunk_encoder = trained
        .map(|t| t.chunk_encoder)
        .unwrap_or_else(|| crate::model::compressor::ChunkEncoder::MiniLm(encoder.clone()));
    let info = indexer::index_info(&encoder, &chunk_encoder, &tokenizer_id, args.k);
    store.prepare_write(&info)?;
    if !args.delete.is_empty() {
        let n = store.delete_docs(&args.delete)?;
        if !g.quiet {
            eprintln!("deleted {n} passages of {} document id(s)", args.delete.len());
        }
    }
    let opts = IndexOptions {
        k: args.k,
        min_words: args.min_words,
        max_words: args.max_words,
        batch_docs: args.batch_docs,
        quiet: g.quiet,
        shard: args.shard,
        shard_wait: std::time::Duration::from_secs(args.shard_wait),
        indexed_at: indexer::utc_now(),
        chunk_sims: !args.no_chunk_sims,
    };
    let sum = indexer::index(&mut store, &docs, tokenizer, &tokenizer_id, &encoder, &chunk_encoder, &opts)?;
    if args.json {
        let mut v = serde_json::to_value(&sum)?;
        v["skipped"] = skipped.len().into();
        v["skipped_by_reason"] = serde_json::to_value(&skipped_by_reason)?;
        outln!("{v}");
    } else {
        if let Some((i, n)) = args.shard {
            outln!(
                "shard {i}/{n}: {} of {} documents (the others belong to other shards); \
                 run `refrag index --finalize --db {}` once every shard is done",
                sum.documents,
                sum.documents + sum.other_shards,
                args.db
            );
        }
        outln!(
            "{} documents ({} added, {} replaced, {} unchanged), {} passages, {} chunks in {:.1} s; \
             index: {} passages, {:.1} MiB on disk",
            sum.documents,
            sum.added,
            sum.replaced,
            sum.unchanged,
            sum.passages,
            sum.chunks,
            sum.seconds,
            sum.rows_total,
            sum.bytes_on_disk as f64 / (1 << 20) as f64
        );
        if !skipped.is_empty() {
            let parts: Vec<String> = skipped_by_reason.iter().map(|(r, n)| format!("{n} {r}")).collect();
            outln!(
                "{} skipped: {}{}",
                skipped.len(),
                parts.join(", "),
                if g.verbose > 0 { "" } else { " (-v names them)" }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Skipped files counted by reason (sorted by its name).
fn skip_counts(skipped: &[crate::index::corpus::Skipped]) -> std::collections::BTreeMap<&'static str, usize> {
    let mut by = std::collections::BTreeMap::new();
    for s in skipped {
        *by.entry(s.reason.name()).or_default() += 1;
    }
    by
}

/// `refrag index --finalize`: compact and build the search indexes of an existing index.
fn finalize(g: &Global, args: &IndexArgs) -> Result<ExitCode> {
    let start = std::time::Instant::now();
    let _lock = crate::index::lock::lock_for_writing(&args.db, WriteLock::Exclusive)?;
    let store = Store::open_with(&args.db, &g.storage_options()?)?;
    if store.info.is_none() {
        bail!("{}: no refrag index to finalize; build one with `refrag index PATH --db {}`", args.db, args.db);
    }
    let sp = crate::progress::spinner(g.quiet, "compacting and building search indexes".into());
    store.finish()?;
    sp.finish_and_clear();
    let rows = store.rows()?;
    let bytes = store.disk_bytes();
    let seconds = start.elapsed().as_secs_f64();
    if args.json {
        outln!(
            "{}",
            serde_json::json!({"finalized": true, "rows_total": rows, "bytes_on_disk": bytes, "seconds": seconds})
        );
    } else {
        outln!("finalized: {rows} passages, {:.1} MiB, in {seconds:.1} s", bytes as f64 / (1 << 20) as f64);
    }
    Ok(ExitCode::SUCCESS)
}
