//! The one place that knows the LanceDB layout.
//!
//! Table `passages`, one row per passage:
//!
//! | column      | type                                   | what                                   |
//! |-------------|----------------------------------------|----------------------------------------|
//! | passage_id  | Utf8                                   | `{doc_id}#{seq}`                       |
//! | doc_id      | Utf8                                   | document id (file path or JSONL id)    |
//! | seq         | Int32                                  | passage number inside the document     |
//! | title       | Utf8                                   | document title                         |
//! | text        | Utf8                                   | passage text (full-text index)         |
//! | doc_hash    | Utf8                                   | sha256 of the document, for re-index   |
//! | meta        | Utf8                                   | other JSONL fields, as JSON            |
//! | vector      | FixedSizeList<Float32, dim>            | retrieval vector of the passage        |
//! | tokens      | List<UInt32>                           | the passage's decoder token ids        |
//! | chunks      | List<FixedSizeList<Float16, dim>>      | one encoder vector per k-token chunk   |
//!
//! Table `refrag_meta` (key, value) records the encoder and tokenizer identities, k, the vector
//! size and the schema version; opening an index with other models or another k is an error.
//! All of one document's passages are written in the same `add`, which LanceDB commits
//! atomically: a document is either wholly visible or not at all.

use anyhow::{anyhow, bail, Context, Result};
use arrow_array::builder::{FixedSizeListBuilder, Float16Builder, ListBuilder};
use arrow_array::types::{Float32Type, UInt32Type};
use arrow_array::{
    Array, FixedSizeListArray, Float16Array, Float32Array, Int32Array, ListArray, RecordBatch,
    StringArray, UInt32Array,
};
use arrow_schema::{DataType, Field, Schema};
use futures::TryStreamExt;
use lancedb::index::scalar::{FtsIndexBuilder, FullTextSearchQuery};
use lancedb::index::Index;
use lancedb::query::{ExecutableQuery, QueryBase};
use lancedb::table::OptimizeAction;
use lancedb::{Connection, DistanceType, Table};
pub use crate::options::SearchKind;
use std::collections::HashMap;
use std::sync::Arc;

pub const SCHEMA_VERSION: u32 = 2;
const PASSAGES: &str = "passages";
const META: &str = "refrag_meta";
/// Lock file of the process that writes a local index.
const LOCK_FILE: &str = ".refrag-write.lock";
/// Rows above which an ANN index pays for itself (below, exact search is fast).
const ANN_MIN_ROWS: usize = 5000;
/// Rows above which the vector index is IVF_PQ (~32 bytes a vector in memory: 24 PQ codes and
/// a row id) rather than IVF_HNSW_SQ (~550 bytes a vector with its graph): see docs/scale.md.
const PQ_MIN_ROWS: usize = 10_000_000;

/// What an index was built with.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IndexInfo {
    /// The retrieval encoder (passage and question vectors).
    pub encoder: String,
    /// The chunk encoder (chunk vectors): the retrieval encoder, plus trained tensors if any.
    pub chunk_encoder: String,
    pub tokenizer: String,
    pub k: usize,
    pub dim: usize,
    pub schema_version: u32,
}

impl IndexInfo {
    fn to_pairs(&self) -> Vec<(String, String)> {
        vec![
            ("encoder".into(), self.encoder.clone()),
            ("chunk_encoder".into(), self.chunk_encoder.clone()),
            ("tokenizer".into(), self.tokenizer.clone()),
            ("k".into(), self.k.to_string()),
            ("dim".into(), self.dim.to_string()),
            ("schema_version".into(), self.schema_version.to_string()),
        ]
    }

    fn from_pairs(m: &HashMap<String, String>) -> Result<Self> {
        let get = |k: &str| m.get(k).cloned().ok_or_else(|| anyhow!("index metadata lacks {k}"));
        Ok(Self {
            encoder: get("encoder")?,
            // absent before schema v2: the schema check below reports that
            chunk_encoder: get("chunk_encoder").unwrap_or_default(),
            tokenizer: get("tokenizer")?,
            k: get("k")?.parse()?,
            dim: get("dim")?.parse()?,
            schema_version: get("schema_version")?.parse()?,
        })
    }

    /// Error unless the chunk vectors come from the chunk encoder in use now (REFRAG mode, and
    /// any write: one index never mixes chunk vectors of two encoders).
    pub fn check_chunks(&self, now: &IndexInfo, db: &str) -> Result<()> {
        if weights_of(&self.chunk_encoder) != weights_of(&now.chunk_encoder) {
            bail!(
                "{db}: chunk vectors were made by {} but the trained weights in use need {}; \
                 re-index into a new --db with these weights, pass the --weights the index was built with, or use --mode full",
                self.chunk_encoder, now.chunk_encoder
            );
        }
        Ok(())
    }

    /// Error unless `other` (the models in use now) can read this index.
    pub fn check(&self, now: &IndexInfo, db: &str) -> Result<()> {
        if self.schema_version != now.schema_version {
            bail!("{db}: index schema v{} but this refrag reads v{}; re-index into a new --db", self.schema_version, now.schema_version);
        }
        if weights_of(&self.encoder) != weights_of(&now.encoder) {
            bail!("{db}: index built with encoder {} but {} is loaded; use the same --encoder or re-index into a new --db", self.encoder, now.encoder);
        }
        if self.tokenizer != now.tokenizer {
            bail!("{db}: index built with decoder tokenizer {} but {} is loaded; use the same --decoder or re-index", self.tokenizer, now.tokenizer);
        }
        if self.k != now.k {
            bail!("{db}: index built with k = {} but k = {} was asked for; pass --k {} or re-index into a new --db", self.k, now.k, self.k);
        }
        Ok(())
    }
}

/// An encoder identity without its folder name (`NAME@DIGEST[+trained@DIGEST]`): the same
/// weights fetched into another folder (a Hugging Face snapshot, a copy) are the same encoder.
fn weights_of(id: &str) -> &str {
    id.split_once('@').map_or(id, |(_, w)| w)
}

/// One passage as stored.
#[derive(Debug, Clone)]
pub struct Passage {
    pub passage_id: String,
    pub doc_id: String,
    pub seq: i32,
    pub title: String,
    pub text: String,
    pub doc_hash: String,
    pub meta: String,
    pub vector: Vec<f32>,
    pub tokens: Vec<u32>,
    /// Chunk vectors, row-major [n_chunks, dim].
    pub chunks: Vec<f32>,
}

/// A retrieved passage and its score (higher is better).
#[derive(Debug, Clone)]
pub struct Hit {
    pub passage: Passage,
    pub score: f32,
}

/// A refrag index in a LanceDB database.
pub struct Store {
    rt: tokio::runtime::Runtime,
    db: Connection,
    table: Option<Table>,
    pub uri: String,
    pub info: Option<IndexInfo>,

}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Options for object stores (`--storage-option KEY=VALUE`: endpoint, region, credentials...);
/// the standard environment variables (AWS_*, GOOGLE_*, AZURE_*) are read as well.
pub type StorageOptions = Vec<(String, String)>;

/// Whether `uri` names an object store (s3://, gs://, az://, ...) rather than a local folder.
pub fn is_remote(uri: &str) -> bool {
    uri.contains("://") && !uri.starts_with("file://")
}

/// How a writer shares a local index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteLock {
    /// The only writer (plain indexing, --delete, --finalize).
    Exclusive,
    /// One of several shard workers appending side by side (`--shard I/N`).
    Shared,
}

/// Take the write lock of a local index: a lock on `.refrag-write.lock` in its folder, held
/// while the returned file lives (the OS releases it if the process dies). Take it before
/// opening the store. Shard workers share it; a plain writer needs it alone. Refuses a folder
/// that holds files (other than a README or dotfiles) but no LanceDB tables (not an index:
/// nothing in it is touched). Object stores take no lock (None): their commits are conditional
/// puts, safe for concurrent writers.
pub fn lock_for_writing(uri: &str, mode: WriteLock) -> Result<Option<std::fs::File>> {
    if is_remote(uri) {
        return Ok(None);
    }
    let dir = std::path::Path::new(uri.strip_prefix("file://").unwrap_or(uri));
    if dir.exists() && !dir.is_dir() {
        bail!("{uri}: not a directory (a refrag index is a LanceDB folder)");
    }
    if dir.is_dir() {
        let names: Vec<String> = std::fs::read_dir(dir)
            .with_context(|| format!("{uri}: cannot read the folder"))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().to_string())
            // a folder kept in version control with a README (the repository's own `index/`)
            // or dotfiles is still empty as far as indexes go
            .filter(|n| n != LOCK_FILE && !n.starts_with('.') && !n.starts_with("README"))
            .collect();
        if !names.is_empty() && !names.iter().any(|n| n.ends_with(".lance")) {
            bail!("{uri}: holds {} and no LanceDB tables; give an empty or new folder to --db", names[0]);
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("{uri}: cannot create the index folder"))?;
    let path = dir.join(LOCK_FILE);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("{}: cannot write here (read-only?)", path.display()))?;
    let r = match mode {
        WriteLock::Exclusive => f.try_lock(),
        WriteLock::Shared => f.try_lock_shared(),
    };
    match r {
        Ok(()) => Ok(Some(f)),
        Err(std::fs::TryLockError::WouldBlock) if mode == WriteLock::Shared => bail!(
            "{uri}: a plain `refrag index` (or --finalize) is writing to this index; shard workers wait for it to finish (lock {})",
            path.display()
        ),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "{uri}: another `refrag index` is writing to this index (or shard workers are); wait for it to finish (lock {})",
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => Err(anyhow!("{}: cannot lock: {e}", path.display())),
    }
}

impl Store {
    /// Open a database (creating nothing). `info` is None when no index exists there yet.
    pub fn open(uri: &str) -> Result<Self> {
        Self::open_with(uri, &[])
    }

    /// [`Store::open`] with object-store options.
    pub fn open_with(uri: &str, options: &[(String, String)]) -> Result<Self> {
        let rt = runtime()?;
        let local = uri.strip_prefix("file://").unwrap_or(uri);
        let path = std::path::Path::new(local);
        if !is_remote(uri) && path.exists() && !path.is_dir() {
            bail!("{uri}: not a directory (a refrag index is a LanceDB folder)");
        }
        // Local paths go to LanceDB absolute: a bare relative name is not always read as a path.
        let target = if is_remote(uri) {
            uri.to_string()
        } else {
            std::path::absolute(path).map(|p| p.to_string_lossy().to_string()).unwrap_or_else(|_| local.to_string())
        };
        let (db, table, info) = rt.block_on(async {
            let db = lancedb::connect(&target)
                .storage_options(options.iter().map(|(k, v)| (k.clone(), v.clone())))
                .execute()
                .await
                .with_context(|| format!("{uri}: cannot open as a LanceDB database"))?;
            let names = db.table_names().execute().await
                .with_context(|| format!("{uri}: cannot list tables"))?;
            if !names.iter().any(|n| n == PASSAGES) {
                return Ok::<_, anyhow::Error>((db, None, None));
            }
            let meta = db.open_table(META).execute().await
                .with_context(|| format!("{uri}: not a refrag index (no {META} table)"))?;
            let info = read_meta(&meta).await.with_context(|| format!("{uri}: unreadable index metadata"))?;
            let table = db.open_table(PASSAGES).execute().await?;
            Ok((db, Some(table), Some(info)))
        })?;
        Ok(Self { rt, db, table, uri: uri.to_string(), info })
    }

    /// Open for reading: an index must exist and match `now`.
    pub fn open_existing(uri: &str, now: &IndexInfo) -> Result<Self> {
        if !is_remote(uri) && !std::path::Path::new(uri.strip_prefix("file://").unwrap_or(uri)).exists() {
            bail!("{uri}: no index here; build one with `refrag index PATH --db {uri}`");
        }
        let s = Self::open(uri)?;
        match &s.info {
            None => bail!("{uri}: no refrag index in this database; build one with `refrag index`"),
            Some(i) => i.check(now, uri)?,
        }
        Ok(s)
    }

    /// Check or record the index identity before writing.
    pub fn prepare_write(&self, now: &IndexInfo) -> Result<()> {
        if let Some(i) = &self.info {
            i.check(now, &self.uri)?;
            return i.check_chunks(now, &self.uri);
        }
        Ok(())
    }

    pub fn rows(&self) -> Result<usize> {
        match &self.table {
            None => Ok(0),
            Some(t) => Ok(self.rt.block_on(t.count_rows(None))?),
        }
    }

    /// doc_id -> doc_hash for every stored document.
    pub fn doc_hashes(&self) -> Result<HashMap<String, String>> {
        Ok(self.doc_summary()?.into_iter().map(|(id, (hash, _))| (id, hash)).collect())
    }

    /// doc_id -> number of stored passages (all of a document's passages are committed together).
    pub fn doc_passage_counts(&self) -> Result<HashMap<String, usize>> {
        Ok(self.doc_summary()?.into_iter().map(|(id, (_, n))| (id, n)).collect())
    }

    /// doc_id -> (doc_hash, passages).
    fn doc_summary(&self) -> Result<HashMap<String, (String, usize)>> {
        let Some(t) = &self.table else { return Ok(HashMap::new()) };
        self.rt.block_on(async {
            let batches: Vec<RecordBatch> = t
                .query()
                .select(lancedb::query::Select::columns(&["doc_id", "doc_hash"]))
                .execute()
                .await?
                .try_collect()
                .await?;
            let mut m: HashMap<String, (String, usize)> = HashMap::new();
            for b in &batches {
                let ids = str_col(b, "doc_id")?;
                let hs = str_col(b, "doc_hash")?;
                for i in 0..b.num_rows() {
                    let e = m.entry(ids.value(i).to_string()).or_insert_with(|| (hs.value(i).to_string(), 0));
                    e.1 += 1;
                }
            }
            Ok(m)
        })
    }

    /// Append passages in one commit (creating the tables on first write).
    pub fn add(&mut self, rows: &[Passage], info: &IndexInfo) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let batch = to_batch(rows, info.dim)?;
        let table = self.rt.block_on(async {
            match &self.table {
                Some(t) => {
                    t.add(batch).execute().await?;
                    Ok::<_, anyhow::Error>(None)
                }
                None => {
                    // The metadata table first: a passages table never exists without it.
                    write_meta(&self.db, info).await?;
                    let t = self.db.create_table(PASSAGES, batch).execute().await?;
                    Ok(Some(t))
                }
            }
        })?;
        if let Some(t) = table {
            self.table = Some(t);
            self.info = Some(info.clone());
        }
        Ok(())
    }

    /// Make sure both tables exist before shard workers append. Creating a LanceDB table is
    /// not safe to race (a losing create can commit as an overwrite of the winner's table), so
    /// exactly one worker creates them (`create`: shard 0), the passages table empty; the
    /// others wait up to `wait` for them to appear. Then the recorded identity is checked
    /// against `info`. After this every writer only appends.
    pub fn ensure_tables(&mut self, info: &IndexInfo, create: bool, wait: std::time::Duration) -> Result<()> {
        if self.table.is_some() {
            return Ok(());
        }
        let (meta, table) = if create {
            let schema = to_batch(&[], info.dim)?.schema();
            self.rt.block_on(async {
                let meta = create_meta(&self.db, info, lancedb::database::CreateTableMode::Overwrite).await?;
                let table = self.db.create_empty_table(PASSAGES, schema).execute().await?;
                Ok::<_, anyhow::Error>((meta, table))
            })
            .with_context(|| format!("{}: cannot create the index tables", self.uri))?
        } else {
            let start = std::time::Instant::now();
            loop {
                let found = self.rt.block_on(async {
                    let names = self.db.table_names().execute().await?;
                    if !names.iter().any(|n| n == PASSAGES) {
                        return Ok::<_, anyhow::Error>(None);
                    }
                    Ok(Some((self.db.open_table(META).execute().await?, self.db.open_table(PASSAGES).execute().await?)))
                })?;
                if let Some(t) = found {
                    break t;
                }
                if start.elapsed() > wait {
                    bail!(
                        "{}: no index tables after {} s; shard 0 creates them: start the worker with --shard 0/N too",
                        self.uri,
                        wait.as_secs()
                    );
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        };
        let stored = self.rt.block_on(read_meta(&meta)).with_context(|| format!("{}: unreadable index metadata", self.uri))?;
        stored.check(info, &self.uri)?;
        stored.check_chunks(info, &self.uri)?;
        self.table = Some(table);
        self.info = Some(stored);
        Ok(())
    }

    /// Remove every passage of these documents (one commit).
    pub fn delete_docs(&self, ids: &[String]) -> Result<u64> {
        let Some(t) = &self.table else { return Ok(0) };
        if ids.is_empty() {
            return Ok(0);
        }
        let list = ids.iter().map(|i| sql_str(i)).collect::<Vec<_>>().join(", ");
        let r = self.rt.block_on(t.delete(format!("doc_id IN ({list})").as_str()))?;
        Ok(r.num_deleted_rows)
    }

    /// Compact, drop old versions, and (re)build the search indexes.
    pub fn finish(&self) -> Result<()> {
        let Some(t) = &self.table else { return Ok(()) };
        self.rt.block_on(async {
            t.optimize(OptimizeAction::All).await?;
            t.optimize(OptimizeAction::Prune {
                older_than: Some(chrono_zero()),
                delete_unverified: Some(false),
                error_if_tagged_old_versions: None,
            })
            .await?;
            let rows = t.count_rows(None).await?;
            t.create_index(&["text"], Index::FTS(FtsIndexBuilder::default())).replace(true).execute().await
                .context("building the full-text index")?;
            if rows >= ANN_MIN_ROWS {
                let index = if rows >= PQ_MIN_ROWS { Index::IvfPq(Default::default()) } else { Index::IvfHnswSq(Default::default()) };
                t.create_index(&["vector"], index)
                    .replace(true)
                    .execute()
                    .await
                    .context("building the vector index")?;
            }
            Ok(())
        })
    }

    /// The `limit` best passages for a query vector (and its text, for hybrid search).
    pub fn search(&self, vector: &[f32], text: &str, limit: usize, kind: SearchKind) -> Result<Vec<Hit>> {
        let Some(t) = &self.table else { return Ok(vec![]) };
        self.rt.block_on(async {
            let mut q = t
                .vector_search(vector.to_vec())?
                .column("vector")
                .distance_type(DistanceType::Cosine)
                .limit(limit);
            if kind == SearchKind::Hybrid {
                q = q.full_text_search(FullTextSearchQuery::new(text.to_string()));
            }
            let batches: Vec<RecordBatch> = q.execute().await?.try_collect().await?;
            let mut hits = Vec::new();
            for b in &batches {
                let scores = score_col(b)?;
                for (i, p) in from_batch(b)?.into_iter().enumerate() {
                    hits.push(Hit { passage: p, score: scores[i] });
                }
            }
            hits.sort_by(|a, b| b.score.total_cmp(&a.score));
            hits.truncate(limit);
            Ok(hits)
        })
    }

    /// Bytes the index takes: the folder's files for a local index; for an object store, the
    /// data and index files the table manifests record.
    pub fn disk_bytes(&self) -> u64 {
        if !is_remote(&self.uri) {
            return dir_size(std::path::Path::new(self.uri.strip_prefix("file://").unwrap_or(&self.uri)));
        }
        let Some(t) = &self.table else { return 0 };
        self.rt.block_on(t.stats()).map(|s| s.total_bytes as u64).unwrap_or(0)
    }
}

fn chrono_zero() -> lancedb::table::Duration {
    lancedb::table::Duration::zero()
}

fn dir_size(p: &std::path::Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else { return 0 };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn sql_str(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

async fn write_meta(db: &Connection, info: &IndexInfo) -> Result<()> {
    create_meta(db, info, lancedb::database::CreateTableMode::Overwrite).await?;
    Ok(())
}

async fn create_meta(db: &Connection, info: &IndexInfo, mode: lancedb::database::CreateTableMode) -> Result<Table> {
    let pairs = info.to_pairs();
    let keys = StringArray::from_iter_values(pairs.iter().map(|p| p.0.as_str()));
    let vals = StringArray::from_iter_values(pairs.iter().map(|p| p.1.as_str()));
    let schema = Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("value", DataType::Utf8, false),
    ]));
    let batch = RecordBatch::try_new(schema, vec![Arc::new(keys), Arc::new(vals)])?;
    Ok(db.create_table(META, batch).mode(mode).execute().await?)
}

async fn read_meta(t: &Table) -> Result<IndexInfo> {
    let batches: Vec<RecordBatch> = t.query().execute().await?.try_collect().await?;
    let mut m = HashMap::new();
    for b in &batches {
        let k = str_col(b, "key")?;
        let v = str_col(b, "value")?;
        for i in 0..b.num_rows() {
            m.insert(k.value(i).to_string(), v.value(i).to_string());
        }
    }
    IndexInfo::from_pairs(&m)
}

fn to_batch(rows: &[Passage], dim: usize) -> Result<RecordBatch> {
    let s = |f: fn(&Passage) -> &str| Arc::new(StringArray::from_iter_values(rows.iter().map(f)));
    let vector = FixedSizeListArray::from_iter_primitive::<Float32Type, _, _>(
        rows.iter().map(|r| Some(r.vector.iter().map(|&x| Some(x)).collect::<Vec<_>>())),
        dim as i32,
    );
    let tokens = ListArray::from_iter_primitive::<UInt32Type, _, _>(
        rows.iter().map(|r| Some(r.tokens.iter().map(|&x| Some(x)).collect::<Vec<_>>())),
    );
    let mut cb = ListBuilder::new(FixedSizeListBuilder::new(Float16Builder::new(), dim as i32));
    for r in rows {
        if r.chunks.len() % dim != 0 {
            bail!("passage {}: chunk vectors are not a multiple of {dim}", r.passage_id);
        }
        for c in r.chunks.chunks(dim) {
            let inner = cb.values();
            for &x in c {
                inner.values().append_value(half::f16::from_f32(x));
            }
            inner.append(true);
        }
        cb.append(true);
    }
    let chunks = cb.finish();
    let cols: Vec<(&str, Arc<dyn Array>)> = vec![
        ("passage_id", s(|r| &r.passage_id)),
        ("doc_id", s(|r| &r.doc_id)),
        ("seq", Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.seq)))),
        ("title", s(|r| &r.title)),
        ("text", s(|r| &r.text)),
        ("doc_hash", s(|r| &r.doc_hash)),
        ("meta", s(|r| &r.meta)),
        ("vector", Arc::new(vector)),
        ("tokens", Arc::new(tokens)),
        ("chunks", Arc::new(chunks)),
    ];
    let schema = Arc::new(Schema::new(
        cols.iter()
            .map(|(n, a)| Field::new(*n, a.data_type().clone(), false))
            .collect::<Vec<_>>(),
    ));
    Ok(RecordBatch::try_new(schema, cols.into_iter().map(|c| c.1).collect())?)
}

fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> Result<&'a T> {
    b.column_by_name(name)
        .ok_or_else(|| anyhow!("index column {name} missing"))?
        .as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| anyhow!("index column {name} has an unexpected type"))
}

fn str_col<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a StringArray> {
    col::<StringArray>(b, name)
}

fn score_col(b: &RecordBatch) -> Result<Vec<f32>> {
    if let Ok(r) = col::<Float32Array>(b, "_relevance_score") {
        return Ok(r.values().to_vec());
    }
    let d = col::<Float32Array>(b, "_distance")?;
    Ok(d.values().iter().map(|d| 1.0 - d).collect())
}

fn from_batch(b: &RecordBatch) -> Result<Vec<Passage>> {
    let vector = col::<FixedSizeListArray>(b, "vector")?;
    let tokens = col::<ListArray>(b, "tokens")?;
    let chunks = col::<ListArray>(b, "chunks")?;
    let seq = col::<Int32Array>(b, "seq")?;
    let mut out = Vec::with_capacity(b.num_rows());
    for i in 0..b.num_rows() {
        let v = vector.value(i);
        let v = v.as_any().downcast_ref::<Float32Array>().context("vector type")?;
        let t = tokens.value(i);
        let t = t.as_any().downcast_ref::<UInt32Array>().context("tokens type")?;
        let c = chunks.value(i);
        let c = c.as_any().downcast_ref::<FixedSizeListArray>().context("chunks type")?;
        let cv = c.values();
        let cv = cv.as_any().downcast_ref::<Float16Array>().context("chunk values type")?;
        out.push(Passage {
            passage_id: str_col(b, "passage_id")?.value(i).to_string(),
            doc_id: str_col(b, "doc_id")?.value(i).to_string(),
            seq: seq.value(i),
            title: str_col(b, "title")?.value(i).to_string(),
            text: str_col(b, "text")?.value(i).to_string(),
            doc_hash: str_col(b, "doc_hash")?.value(i).to_string(),
            meta: str_col(b, "meta")?.value(i).to_string(),
            vector: v.values().to_vec(),
            tokens: t.values().to_vec(),
            chunks: cv.values().iter().map(|x| x.to_f32()).collect(),
        });
    }
    Ok(out)
}
