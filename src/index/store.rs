//! A refrag index in a LanceDB database (a folder, or an object-store URI): opening it, writing
//! documents, searching, optimising. The passage layout is [`crate::index::schema`]'s; what the
//! index was built with is [`crate::index::info`]'s, kept in table `refrag_meta` (key, value):
//! opening an index with other models or another k is an error. All of one document's passages
//! are written in the same `add`, which LanceDB commits atomically: a document is either wholly
//! visible or not at all.

use crate::index::info::IndexInfo;
use crate::index::schema::{from_batch, score_col, str_col, to_batch, Hit, Passage};
pub use crate::options::SearchKind;
use anyhow::{bail, Context, Result};
use arrow_array::{RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use futures::TryStreamExt;
use lancedb::index::scalar::{FtsIndexBuilder, FullTextSearchQuery};
use lancedb::index::Index;
use lancedb::query::{ExecutableQuery, QueryBase};
use lancedb::table::OptimizeAction;
use lancedb::{Connection, DistanceType, Table};
use std::collections::HashMap;
use std::sync::Arc;

const PASSAGES: &str = "passages";
const META: &str = "refrag_meta";
/// Rows above which an ANN index pays for itself (below, exact search is fast).
const ANN_MIN_ROWS: usize = 5000;
/// Rows above which the vector index is IVF_PQ (~32 bytes a vector in memory: 24 PQ codes and
/// a row id) rather than IVF_HNSW_SQ (~550 bytes a vector with its graph): see docs/scale.md.
const PQ_MIN_ROWS: usize = 10_000_000;

/// One stored document (`refrag docs list`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DocEntry {
    pub id: String,
    pub title: String,
    pub passages: usize,
    pub chunks: usize,
    pub tokens: usize,
    /// When its passages were written (UTC; empty for an index made before this was recorded).
    pub indexed: String,
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
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

/// Options for object stores (`--storage-option KEY=VALUE`: endpoint, region, credentials...);
/// the standard environment variables (AWS_*, GOOGLE_*, AZURE_*) are read as well.
pub type StorageOptions = Vec<(String, String)>;

/// Whether `uri` names an object store (s3://, gs://, az://, ...) rather than a local folder.
pub fn is_remote(uri: &str) -> bool {
    uri.contains("://") && !uri.starts_with("file://")
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
            let names = db.table_names().execute().await.with_context(|| format!("{uri}: cannot list tables"))?;
            if !names.iter().any(|n| n == PASSAGES) {
                return Ok::<_, anyhow::Error>((db, None, None));
            }
            let meta = db
                .open_table(META)
                .execute()
                .await
                .with_context(|| format!("{uri}: not a refrag index (no {META} table)"))?;
            let info = read_meta(&meta).await.with_context(|| format!("{uri}: unreadable index metadata"))?;
            let table = db.open_table(PASSAGES).execute().await?;
            Ok((db, Some(table), Some(info)))
        })?;
        Ok(Self { rt, db, table, uri: uri.to_string(), info })
    }

    /// Open for reading: an index must exist there (what it was built with comes back beside it).
    pub fn open_index(uri: &str, options: &[(String, String)]) -> Result<(Self, IndexInfo)> {
        let none = || anyhow::anyhow!("{uri}: no index here; build one with `refrag index PATH --db {uri}`");
        if !is_remote(uri) && !std::path::Path::new(uri.strip_prefix("file://").unwrap_or(uri)).exists() {
            return Err(none());
        }
        let s = Self::open_with(uri, options)?;
        let info = s.info.clone().ok_or_else(none)?;
        Ok((s, info))
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

    /// Every stored document, sorted by id: its title, passages, chunks and decoder tokens.
    pub fn documents(&self) -> Result<Vec<DocEntry>> {
        let (Some(t), Some(info)) = (&self.table, &self.info) else { return Ok(vec![]) };
        let k = info.k;
        self.rt.block_on(async {
            let batches: Vec<RecordBatch> = t
                .query()
                .select(lancedb::query::Select::columns(&["doc_id", "title", "tokens", "meta"]))
                .execute()
                .await?
                .try_collect()
                .await?;
            let mut m: std::collections::BTreeMap<String, DocEntry> = std::collections::BTreeMap::new();
            for b in &batches {
                let (ids, titles, metas) = (str_col(b, "doc_id")?, str_col(b, "title")?, str_col(b, "meta")?);
                let tokens = b
                    .column_by_name("tokens")
                    .and_then(|c| c.as_any().downcast_ref::<arrow_array::ListArray>())
                    .context("index: no tokens column")?;
                for i in 0..b.num_rows() {
                    let id = ids.value(i);
                    let e = m.entry(id.to_string()).or_insert_with(|| DocEntry {
                        id: id.to_string(),
                        title: titles.value(i).to_string(),
                        ..Default::default()
                    });
                    let n = tokens.value_length(i) as usize;
                    e.passages += 1;
                    e.tokens += n;
                    e.chunks += crate::model::compressor::chunk_count(n, k);
                    if e.indexed.is_empty() {
                        let m: serde_json::Value = serde_json::from_str(metas.value(i)).unwrap_or_default();
                        e.indexed = m.get("indexed").and_then(|x| x.as_str()).unwrap_or("").to_string();
                    }
                }
            }
            Ok(m.into_values().collect())
        })
    }

    /// Append passages in one commit (creating the tables on first write).
    pub fn add(&mut self, rows: &[Passage], info: &IndexInfo) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let batch = to_batch(rows, info.dim, info.chunk_dim, info.chunk_sims)?;
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
            let schema = to_batch(&[], info.dim, info.chunk_dim, info.chunk_sims)?.schema();
            self.rt
                .block_on(async {
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
        let stored =
            self.rt.block_on(read_meta(&meta)).with_context(|| format!("{}: unreadable index metadata", self.uri))?;
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
            t.create_index(&["text"], Index::FTS(FtsIndexBuilder::default()))
                .replace(true)
                .execute()
                .await
                .context("building the full-text index")?;
            if rows >= ANN_MIN_ROWS {
                let index = if rows >= PQ_MIN_ROWS {
                    Index::IvfPq(Default::default())
                } else {
                    Index::IvfHnswSq(Default::default())
                };
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
            let mut q =
                t.vector_search(vector.to_vec())?.column("vector").distance_type(DistanceType::Cosine).limit(limit);
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
