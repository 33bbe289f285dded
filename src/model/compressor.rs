//! The one way passages become chunk vectors (REFRAG, arXiv 2509.01092, section 2): decoder
//! tokens cut into k-token chunks ([`chunks`]), each chunk encoded into one vector by the chunk
//! encoder ([`ChunkEncoder`], [`chunk_vectors`]: what an index stores), then projected into the
//! decoder's input space ([`Compressor`]: what the decoder reads). The indexer, ask, chat, eval,
//! perplexity, bench and every training stage go through here.

use crate::model::decoder::Decoder;
use crate::model::encoder::Encoder;
use crate::model::grown::GrownEncoder;
use crate::model::projector::Projector;
use anyhow::{anyhow, Result};
use candle_core::Tensor;
use tokenizers::Tokenizer;

/// What turns one k-token chunk into one vector.
#[derive(Clone)]
pub enum ChunkEncoder {
    /// MiniLM (the retrieval encoder, with any trained top layers in place) over each chunk's
    /// text: 384-d.
    MiniLm(Encoder),
    /// The decoder's first layers, with trained adapters, over each chunk's tokens
    /// ([`GrownEncoder`]): the decoder's hidden size.
    Grown(GrownEncoder),
}

impl ChunkEncoder {
    /// Identity recorded in indexes and policy cards (`NAME@DIGEST[+trained@DIGEST]`).
    pub fn id(&self) -> &str {
        match self {
            ChunkEncoder::MiniLm(e) => &e.id,
            ChunkEncoder::Grown(g) => &g.id,
        }
    }

    /// The size of a chunk vector.
    pub fn dim(&self) -> usize {
        match self {
            ChunkEncoder::MiniLm(e) => e.dim,
            ChunkEncoder::Grown(g) => g.dim(),
        }
    }

    /// What it is, for people: `MiniLM` or `decoder layers 1-N`.
    pub fn kind(&self) -> String {
        match self {
            ChunkEncoder::MiniLm(_) => "MiniLM".into(),
            ChunkEncoder::Grown(g) => format!("decoder layers 1-{}", g.layers),
        }
    }
}

/// The k-token chunks of a passage's decoder tokens (the last one may be shorter).
pub fn chunks(ids: &[u32], k: usize) -> std::slice::Chunks<'_, u32> {
    ids.chunks(k.max(1))
}

/// How many chunks a passage of `tokens` decoder tokens has.
pub fn chunk_count(tokens: usize, k: usize) -> usize {
    tokens.div_ceil(k.max(1))
}

/// A chunk's text (its decoder tokens decoded): what the MiniLM chunk encoder reads.
fn chunk_text(tokenizer: &Tokenizer, chunk: &[u32]) -> Result<String> {
    tokenizer.decode(chunk, false).map_err(|e| anyhow!("decode: {e}"))
}

/// Each chunk's text.
pub fn chunk_texts(tokenizer: &Tokenizer, ids: &[u32], k: usize) -> Result<Vec<String>> {
    chunks(ids, k).map(|c| chunk_text(tokenizer, c)).collect()
}

/// The vectors of chunks given as decoder tokens: [n, encoder dim], one row per chunk, on the
/// encoder's device; `None` when there are none. The one place the chunk encoder reads chunks.
pub fn encode_chunks(encoder: &ChunkEncoder, tokenizer: &Tokenizer, chunks: &[&[u32]]) -> Result<Option<Tensor>> {
    if chunks.is_empty() {
        return Ok(None);
    }
    match encoder {
        ChunkEncoder::MiniLm(e) => Ok(Some(minilm_vectors(e, tokenizer, chunks)?)),
        ChunkEncoder::Grown(g) => Ok(Some(g.encode(chunks)?)),
    }
}

/// MiniLM's vectors of chunks' texts: [n, 384]. The chunk vectors of the MiniLM chunk encoder,
/// and what the question-similarity policies compare the question with under any chunk encoder.
pub fn minilm_vectors(encoder: &Encoder, tokenizer: &Tokenizer, chunks: &[&[u32]]) -> Result<Tensor> {
    let texts = chunks.iter().map(|c| chunk_text(tokenizer, c)).collect::<Result<Vec<_>>>()?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    encoder.encode(&refs)
}

/// The chunk vectors of passages given as decoder tokens ([`encode_chunks`] of their
/// [`chunks`], chunk after chunk and passage after passage). Unprojected: what an index stores.
pub fn chunk_vectors(
    encoder: &ChunkEncoder,
    tokenizer: &Tokenizer,
    passages: &[&[u32]],
    k: usize,
) -> Result<Option<Tensor>> {
    let all: Vec<&[u32]> = passages.iter().flat_map(|p| chunks(p, k)).collect();
    encode_chunks(encoder, tokenizer, &all)
}

/// A chunk encoder, the projector trained with it, and the chunk size: turns decoder tokens
/// into projected chunk vectors, one decoder position per k tokens.
#[derive(Clone, Copy)]
pub struct Compressor<'a> {
    pub encoder: &'a ChunkEncoder,
    pub projector: &'a Projector,
    pub k: usize,
}

impl<'a> Compressor<'a> {
    pub fn new(encoder: &'a ChunkEncoder, projector: &'a Projector, k: usize) -> Self {
        Self { encoder, projector, k }
    }

    /// The unprojected vectors of `chunks` ([`encode_chunks`]), on `dec`'s device.
    pub fn encode(&self, dec: &Decoder, chunks: &[&[u32]]) -> Result<Option<Tensor>> {
        encode_chunks(self.encoder, &dec.tokenizer, chunks)?.map(|v| Ok(v.to_device(&dec.device)?)).transpose()
    }

    /// The unprojected chunk vectors of `passages` ([`chunk_vectors`]), on `dec`'s device.
    pub fn vectors(&self, dec: &Decoder, passages: &[&[u32]]) -> Result<Option<Tensor>> {
        chunk_vectors(self.encoder, &dec.tokenizer, passages, self.k)?
            .map(|v| Ok(v.to_device(&dec.device)?))
            .transpose()
    }

    /// Chunk vectors (from [`Compressor::vectors`] or an index) into the decoder's input space:
    /// [n, dim] -> [n, hidden] (f32).
    pub fn project(&self, vectors: &Tensor) -> Result<Tensor> {
        self.projector.forward(vectors)
    }

    /// The projected chunk vectors of `passages`: [n, hidden], `None` when there are no chunks.
    pub fn compress(&self, dec: &Decoder, passages: &[&[u32]]) -> Result<Option<Tensor>> {
        self.vectors(dec, passages)?.map(|v| self.project(&v)).transpose()
    }

    /// Text read compressed: tokenized with the decoder's tokenizer, then [`Compressor::compress`].
    pub fn compress_text(&self, dec: &Decoder, text: &str) -> Result<Option<Tensor>> {
        let ids = dec.tokenizer.encode(text, false).map_err(|e| anyhow!("tokenizer: {e}"))?.get_ids().to_vec();
        self.compress(dec, &[&ids])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_tokens_in_order() {
        let ids: Vec<u32> = (0..37).collect();
        let c: Vec<&[u32]> = chunks(&ids, 16).collect();
        assert_eq!(c.len(), chunk_count(ids.len(), 16));
        assert_eq!((c[0].len(), c[2].len()), (16, 5));
        assert_eq!(c.concat(), ids);
        assert_eq!(chunk_count(32, 16), 2);
        assert_eq!(chunk_count(0, 16), 0);
    }
}
