//! The LanceDB layout of a passage: the one place that turns passages into Arrow record batches
//! and back.
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
//! | chunks      | List<FixedSizeList<Float16, chunk_dim>> | one chunk vector per k-token chunk     |
//! | chunk_sims  | List<FixedSizeList<Float16, dim>>      | optional: the retrieval encoder's vector of each chunk's text |
//!
//! `chunk_sims` exists when the chunk vectors are not the retrieval encoder's (a chunk encoder
//! grown from the decoder): the question-similarity policies compare the question with them,
//! which would otherwise run the retrieval encoder over every retrieved chunk at question time.

use anyhow::{anyhow, bail, Context, Result};
use arrow_array::builder::{FixedSizeListBuilder, Float16Builder, ListBuilder};
use arrow_array::types::{Float32Type, UInt32Type};
use arrow_array::{
    Array, FixedSizeListArray, Float16Array, Float32Array, Int32Array, ListArray, RecordBatch, StringArray, UInt32Array,
};
use arrow_schema::{Field, Schema};
use std::sync::Arc;

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
    /// Chunk vectors, row-major [n_chunks, chunk_dim].
    pub chunks: Vec<f32>,
    /// The retrieval encoder's vectors of the chunks' texts, row-major [n_chunks, dim]; empty
    /// when the index does not store them.
    pub sims: Vec<f32>,
}

/// A retrieved passage and its score (higher is better).
#[derive(Debug, Clone)]
pub struct Hit {
    pub passage: Passage,
    pub score: f32,
}

/// Rows into a record batch: retrieval vectors of `dim`, chunk vectors of `chunk_dim`, and the
/// `chunk_sims` column when `sims`.
pub(super) fn to_batch(rows: &[Passage], dim: usize, chunk_dim: usize, sims: bool) -> Result<RecordBatch> {
    let s = |f: fn(&Passage) -> &str| Arc::new(StringArray::from_iter_values(rows.iter().map(f)));
    let vector = FixedSizeListArray::from_iter_primitive::<Float32Type, _, _>(
        rows.iter().map(|r| Some(r.vector.iter().map(|&x| Some(x)).collect::<Vec<_>>())),
        dim as i32,
    );
    let tokens = ListArray::from_iter_primitive::<UInt32Type, _, _>(
        rows.iter().map(|r| Some(r.tokens.iter().map(|&x| Some(x)).collect::<Vec<_>>())),
    );
    let chunks = f16_lists(rows, |r| r.chunks.as_slice(), chunk_dim, "chunk vectors")?;
    let mut cols: Vec<(&str, Arc<dyn Array>)> = vec![
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
    if sims {
        cols.push(("chunk_sims", Arc::new(f16_lists(rows, |r| r.sims.as_slice(), dim, "chunk text vectors")?)));
    }
    let schema = Arc::new(Schema::new(
        cols.iter().map(|(n, a)| Field::new(*n, a.data_type().clone(), false)).collect::<Vec<_>>(),
    ));
    Ok(RecordBatch::try_new(schema, cols.into_iter().map(|c| c.1).collect())?)
}

/// One list of `width`-wide f16 vectors per row (`field(row)`, row-major f32).
fn f16_lists(rows: &[Passage], field: fn(&Passage) -> &[f32], width: usize, what: &str) -> Result<ListArray> {
    let mut b = ListBuilder::new(FixedSizeListBuilder::new(Float16Builder::new(), width as i32));
    for r in rows {
        let v = field(r);
        if !v.len().is_multiple_of(width) {
            bail!("passage {}: {what} are not a multiple of {width}", r.passage_id);
        }
        for c in v.chunks(width) {
            let inner = b.values();
            for &x in c {
                inner.values().append_value(half::f16::from_f32(x));
            }
            inner.append(true);
        }
        b.append(true);
    }
    Ok(b.finish())
}

/// Row `i` of a column of [`f16_lists`], flattened to f32.
fn f16_list(col: &ListArray, i: usize, name: &str) -> Result<Vec<f32>> {
    let c = col.value(i);
    let c = c.as_any().downcast_ref::<FixedSizeListArray>().with_context(|| format!("{name} type"))?;
    let v = c.values();
    let v = v.as_any().downcast_ref::<Float16Array>().with_context(|| format!("{name} values type"))?;
    Ok(v.values().iter().map(|x| x.to_f32()).collect())
}

pub(super) fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> Result<&'a T> {
    b.column_by_name(name)
        .ok_or_else(|| anyhow!("index column {name} missing"))?
        .as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| anyhow!("index column {name} has an unexpected type"))
}

pub(super) fn str_col<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a StringArray> {
    col::<StringArray>(b, name)
}

pub(super) fn score_col(b: &RecordBatch) -> Result<Vec<f32>> {
    if let Ok(r) = col::<Float32Array>(b, "_relevance_score") {
        return Ok(r.values().to_vec());
    }
    let d = col::<Float32Array>(b, "_distance")?;
    Ok(d.values().iter().map(|d| 1.0 - d).collect())
}

pub(super) fn from_batch(b: &RecordBatch) -> Result<Vec<Passage>> {
    let vector = col::<FixedSizeListArray>(b, "vector")?;
    let tokens = col::<ListArray>(b, "tokens")?;
    let chunks = col::<ListArray>(b, "chunks")?;
    let sims = match b.column_by_name("chunk_sims") {
        Some(_) => Some(col::<ListArray>(b, "chunk_sims")?),
        None => None,
    };
    let seq = col::<Int32Array>(b, "seq")?;
    let mut out = Vec::with_capacity(b.num_rows());
    for i in 0..b.num_rows() {
        let v = vector.value(i);
        let v = v.as_any().downcast_ref::<Float32Array>().context("vector type")?;
        let t = tokens.value(i);
        let t = t.as_any().downcast_ref::<UInt32Array>().context("tokens type")?;
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
            chunks: f16_list(chunks, i, "chunks")?,
            sims: sims.map(|s| f16_list(s, i, "chunk_sims")).transpose()?.unwrap_or_default(),
        });
    }
    Ok(out)
}
