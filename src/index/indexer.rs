//! `refrag index`: documents → passages → decoder tokens → k-token chunks → encoder vectors →
//! LanceDB, in batches of whole documents (one atomic commit per batch).

use crate::index::corpus::Document;
use crate::index::formats::Locator;
use crate::index::info::{IndexInfo, SCHEMA_VERSION};
use crate::index::schema::Passage;
use crate::index::store::Store;
use crate::model::compressor::{self, ChunkEncoder};
use crate::model::encoder::Encoder;
use anyhow::{anyhow, Result};
use std::time::Instant;
use tokenizers::Tokenizer;

/// Indexing settings.
#[derive(Debug, Clone)]
pub struct IndexOptions {
    pub k: usize,
    pub min_words: usize,
    pub max_words: usize,
    /// Documents per commit.
    pub batch_docs: usize,
    pub quiet: bool,
    /// `Some((i, n))`: index only shard i of n (a worker beside others; appends only, no
    /// compaction or search indexes: `--finalize` builds them once every shard is in).
    pub shard: Option<(usize, usize)>,
    /// With --shard: how long workers other than shard 0 wait for it to create the tables.
    pub shard_wait: std::time::Duration,
    /// When this run started (UTC, [`utc_now`]), recorded in each new passage's metadata.
    pub indexed_at: String,
    /// A new index stores the retrieval encoder's vectors of the chunks' texts when its chunk
    /// vectors are another encoder's (see [`crate::index::schema`]); an existing index keeps
    /// its layout.
    pub chunk_sims: bool,
}

impl IndexOptions {
    /// Settings that change the stored rows (part of each document's hash).
    fn fingerprint(&self) -> String {
        format!("k={};words={}-{}", self.k, self.min_words, self.max_words)
    }
}

/// What an index run did.
#[derive(Debug, Default, serde::Serialize)]
pub struct IndexSummary {
    /// Documents this run was given (its shard's, with --shard).
    pub documents: usize,
    /// Documents left to the other shards.
    pub other_shards: usize,
    pub added: usize,
    pub replaced: usize,
    pub unchanged: usize,
    pub passages: usize,
    pub chunks: usize,
    pub seconds: f64,
    pub rows_total: usize,
    pub bytes_on_disk: u64,
}

/// What an index built now records; `chunk_encoder` makes the chunk vectors (MiniLM, with
/// trained tensors in place when trained weights are in use, or one grown from the decoder).
/// `chunk_sims` is left off: [`index`] sets it from its options and the index found.
pub fn index_info(encoder: &Encoder, chunk_encoder: &ChunkEncoder, tokenizer_id: &str, k: usize) -> IndexInfo {
    IndexInfo {
        encoder: encoder.id.clone(),
        chunk_encoder: chunk_encoder.id().to_string(),
        tokenizer: tokenizer_id.to_string(),
        k,
        dim: encoder.dim,
        chunk_dim: chunk_encoder.dim(),
        chunk_sims: false,
        schema_version: SCHEMA_VERSION,
    }
}

/// Index `docs` into `store`: unchanged documents are skipped, changed ones replaced.
pub fn index(
    store: &mut Store,
    docs: &[Document],
    tokenizer: &Tokenizer,
    tokenizer_id: &str,
    encoder: &Encoder,
    chunk_encoder: &ChunkEncoder,
    opts: &IndexOptions,
) -> Result<IndexSummary> {
    let start = Instant::now();
    let mut info = index_info(encoder, chunk_encoder, tokenizer_id, opts.k);
    info.chunk_sims = opts.chunk_sims && !matches!(chunk_encoder, ChunkEncoder::MiniLm(_));
    store.prepare_write(&info)?;
    if let Some((i, _)) = opts.shard {
        store.ensure_tables(&info, i == 0, opts.shard_wait)?;
    }
    if let Some(found) = &store.info {
        info.chunk_sims = found.chunk_sims;
    }
    let existing = store.doc_hashes()?;
    let fp = opts.fingerprint();
    let mine: Vec<&Document> = match opts.shard {
        Some((i, n)) => docs.iter().filter(|d| d.shard(n) == i).collect(),
        None => docs.iter().collect(),
    };
    let mut sum = IndexSummary { documents: mine.len(), other_shards: docs.len() - mine.len(), ..Default::default() };
    let todo: Vec<(&Document, String)> = mine
        .into_iter()
        .map(|d| (d, d.hash(&fp)))
        .filter(|(d, h)| {
            let same = existing.get(&d.id) == Some(h);
            if same {
                sum.unchanged += 1;
            }
            !same
        })
        .collect();
    let pb = crate::progress::bar(opts.quiet, todo.len() as u64, "docs");
    pb.set_message("indexing");
    for batch in todo.chunks(opts.batch_docs.max(1)) {
        let rows = encode_batch(batch, tokenizer, encoder, chunk_encoder, opts, info.chunk_sims)?;
        let replace: Vec<String> =
            batch.iter().filter(|(d, _)| existing.contains_key(&d.id)).map(|(d, _)| d.id.clone()).collect();
        sum.replaced += replace.len();
        sum.added += batch.len() - replace.len();
        sum.passages += rows.len();
        sum.chunks += rows.iter().map(|r| r.chunks.len() / info.chunk_dim).sum::<usize>();
        store.delete_docs(&replace)?;
        store.add(&rows, &info)?;
        tracing::debug!("committed {} documents, {} passages", batch.len(), rows.len());
        pb.inc(batch.len() as u64);
        pb.set_message(format!("{} passages", sum.passages));
    }
    pb.finish_and_clear();
    if sum.added + sum.replaced > 0 && opts.shard.is_none() {
        let sp = crate::progress::spinner(opts.quiet, "compacting and building search indexes".into());
        store.finish()?;
        sp.finish_and_clear();
    }
    sum.rows_total = store.rows()?;
    sum.bytes_on_disk = store.disk_bytes();
    sum.seconds = start.elapsed().as_secs_f64();
    Ok(sum)
}

/// Passages, tokens and all vectors for a batch of documents.
fn encode_batch(
    batch: &[(&Document, String)],
    tokenizer: &Tokenizer,
    encoder: &Encoder,
    chunk_encoder: &ChunkEncoder,
    opts: &IndexOptions,
    sims: bool,
) -> Result<Vec<Passage>> {
    let mut rows = Vec::new();
    let mut retrieval_texts = Vec::new();
    for (doc, hash) in batch {
        for (seq, (text, at)) in doc.passages(opts.min_words, opts.max_words).into_iter().enumerate() {
            let ids = tokenizer
                .encode(text.as_str(), false)
                .map_err(|e| anyhow!("{}: tokenizer: {e}", doc.source))?
                .get_ids()
                .to_vec();
            retrieval_texts.push(if doc.title.is_empty() { text.clone() } else { format!("{}: {}", doc.title, text) });
            rows.push(Passage {
                passage_id: format!("{}#{seq}", doc.id),
                doc_id: doc.id.clone(),
                seq: seq as i32,
                title: doc.title.clone(),
                text,
                doc_hash: hash.clone(),
                meta: passage_meta(&doc.meta, at, &opts.indexed_at),
                vector: vec![],
                tokens: ids,
                chunks: vec![],
                sims: vec![],
            });
        }
    }
    let rt: Vec<&str> = retrieval_texts.iter().map(String::as_str).collect();
    let pv = encoder.encode(&rt)?.to_vec2::<f32>()?;
    let ids: Vec<&[u32]> = rows.iter().map(|r| r.tokens.as_slice()).collect();
    let cv = compressor::chunk_vectors(chunk_encoder, tokenizer, &ids, opts.k)?;
    let sv = if sims {
        let all: Vec<&[u32]> = ids.iter().flat_map(|p| compressor::chunks(p, opts.k)).collect();
        (!all.is_empty()).then(|| compressor::minilm_vectors(encoder, tokenizer, &all)).transpose()?
    } else {
        None
    };
    for (row, v) in rows.iter_mut().zip(pv) {
        row.vector = v;
    }
    let per_row = |v: Option<candle_core::Tensor>| -> Result<Vec<Vec<f32>>> {
        Ok(match v {
            Some(v) => v.to_vec2::<f32>()?,
            None => vec![],
        })
    };
    let (mut cv, mut sv) = (per_row(cv)?.into_iter(), per_row(sv)?.into_iter());
    for row in rows.iter_mut() {
        let n = compressor::chunk_count(row.tokens.len(), opts.k);
        row.chunks = cv.by_ref().take(n).flatten().collect();
        row.sims = sv.by_ref().take(n).flatten().collect();
    }
    Ok(rows)
}

/// A passage's metadata: its document's, with the page or heading it sits under and when it was
/// indexed (outside the document's hash: re-indexing an unchanged document keeps its rows).
fn passage_meta(doc_meta: &str, at: Option<&Locator>, indexed_at: &str) -> String {
    let mut m = match serde_json::from_str(doc_meta) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    if let Some(at) = at {
        let (k, v) = at.field();
        m.insert(k.into(), v);
    }
    if !indexed_at.is_empty() {
        m.insert("indexed".into(), indexed_at.into());
    }
    serde_json::Value::Object(m).to_string()
}

/// Now as UTC `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (s.div_euclid(86_400), s.rem_euclid(86_400));
    // civil date from days since 1970-01-01 (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}
