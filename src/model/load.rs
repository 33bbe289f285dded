//! Loading what a command reads, resolved once (as ripgrep resolves its arguments into
//! validated settings before any work starts): the base models, the trained weights for a
//! purpose, and how the answers read them ([`Reading`]: adapters, question layout, chunk size).
//! The command line fills a [`Loader`] from its flags; the library does the rest.

use crate::model::compressor::Compressor;
use crate::model::decoder::{Decoder, Ops};
use crate::model::encoder::Encoder;
use crate::model::weights::{self, Purpose, Trained};
use crate::options::{Mode, QuestionAt};
use anyhow::{bail, Result};
use candle_core::{DType, Device};
use std::path::PathBuf;

/// The chunk size when neither the command line nor the weights' card says.
pub const DEFAULT_K: usize = 16;

/// Where the models and weights come from, and the choices that shape how they are read.
#[derive(Debug, Clone)]
pub struct Loader {
    pub device: Device,
    /// The decoder's compute dtype (None: f32 on CPU, bf16 on CUDA).
    pub dtype: Option<DType>,
    /// refrag's data folder (model cache, `weights/`).
    pub home: PathBuf,
    /// A decoder GGUF file instead of the pinned one.
    pub decoder: Option<PathBuf>,
    /// An encoder folder instead of the pinned one.
    pub encoder: Option<PathBuf>,
    /// A trained-weights folder instead of the default ones.
    pub weights: Option<PathBuf>,
    /// The question layout asked for (`auto`: as the weights that the answers read).
    pub question_at: QuestionAt,
    /// No progress notes while pulling models.
    pub quiet: bool,
}

/// How the answers read, settled once from the trained weights, the mode and the flags.
pub struct Reading {
    /// The trained weights found (None where there are none and none are needed).
    pub trained: Option<Trained>,
    /// Whether the decoder reads with the trained adapters folded in.
    pub adapted: bool,
    /// The trained weights' folder when the answers use them (refrag mode, or adapters).
    pub weights: Option<PathBuf>,
    /// Where a question with passages puts the question.
    pub question_at: QuestionAt,
    /// The chunk size.
    pub k: usize,
}

impl Reading {
    /// Fold the trained adapters into `decoder` when this reading is adapted.
    pub fn adapt(&self, decoder: &mut Decoder) -> Result<()> {
        match (&self.trained, self.adapted) {
            (Some(t), true) => t.adapt(decoder),
            _ => Ok(()),
        }
    }

    /// The trained chunk encoder and projector at this reading's k (when there are weights).
    pub fn compressor(&self) -> Option<Compressor<'_>> {
        self.trained.as_ref().map(|t| Compressor::new(&t.chunk_encoder, &t.projector, self.k))
    }
}

impl Loader {
    /// The decoder for inference (fused ops; on CPU the quantized copy kept for decoding, on
    /// CUDA not: dense bf16 matrices decode faster there, one kernel where a quantized matmul
    /// takes four), pulling the pinned model on first need.
    pub fn decoder(&self) -> Result<Decoder> {
        self.decoder_with(Ops::Fused, !self.device.is_cuda())
    }

    /// The decoder with the given ops (differentiable for training) and with or without its
    /// quantized copy.
    pub fn decoder_with(&self, ops: Ops, keep_quant: bool) -> Result<Decoder> {
        let path = crate::model::cache::resolve_decoder(self.decoder.as_deref(), &self.home, self.quiet)?;
        let t = std::time::Instant::now();
        let d = Decoder::load_as(&path, &self.device, self.dtype, ops, keep_quant)?;
        let on = crate::device::name(&self.device);
        tracing::info!(
            "decoder {} loaded on {on} as {:?} in {:.2} s",
            path.display(),
            d.dtype,
            t.elapsed().as_secs_f64()
        );
        Ok(d)
    }

    /// The encoder (retrieval vectors, and the base of the chunk encoder), pulling the pinned
    /// model on first need.
    pub fn encoder(&self) -> Result<Encoder> {
        let dir = crate::model::cache::resolve_encoder(self.encoder.as_deref(), &self.home, self.quiet)?;
        let e = Encoder::load(&dir, &self.device)?;
        tracing::info!("encoder {} ({})", dir.display(), e.id);
        Ok(e)
    }

    /// The folders searched for trained weights for `purpose`.
    pub fn weights_dirs(&self, purpose: Purpose) -> Vec<PathBuf> {
        weights::weights_dirs(self.weights.as_deref(), &self.home, purpose)
    }

    /// Trained weights from --weights or the default folders for `purpose`; None when there are
    /// none (an explicit --weights folder without them is an error). `decoder` is the base
    /// decoder, not yet adapted (a grown chunk encoder shares its first layers).
    pub fn trained(&self, encoder: &Encoder, decoder: &Decoder, purpose: Purpose) -> Result<Option<Trained>> {
        let dirs = self.weights_dirs(purpose);
        match weights::find(&dirs, encoder, decoder)? {
            Some(t) => {
                tracing::info!("trained weights from {} (chunk encoder {})", t.dir.display(), t.chunk_encoder.id());
                Ok(Some(t))
            }
            None if self.weights.is_some() => Err(weights::missing(&dirs)),
            None => Ok(None),
        }
    }

    /// Trained weights for `purpose`, or the error that says where they were looked for.
    pub fn require_trained(&self, encoder: &Encoder, decoder: &Decoder, purpose: Purpose) -> Result<Trained> {
        self.trained(encoder, decoder, purpose)?.ok_or_else(|| weights::missing(&self.weights_dirs(purpose)))
    }

    /// The question layout asked for, or with `auto` the one `trained` weights were trained
    /// with (`after` without one).
    pub fn question_at(&self, trained: Option<&Trained>) -> QuestionAt {
        self.question_at.resolve(trained.and_then(|t| t.question_at))
    }

    /// How answers read in `mode` (`adapted`: --adapted; `k`: --k): refrag mode needs trained
    /// weights, --adapted needs their adapters; the question layout and k follow the weights
    /// when the answers use them.
    pub fn reading(
        &self,
        trained: Option<Trained>,
        purpose: Purpose,
        mode: Mode,
        adapted: bool,
        k: Option<usize>,
    ) -> Result<Reading> {
        if mode == Mode::Refrag && trained.is_none() {
            return Err(weights::missing(&self.weights_dirs(purpose)));
        }
        let has = trained.as_ref().is_some_and(|t| t.decoder_lora.is_some());
        if adapted && mode != Mode::Refrag && !has {
            let file = crate::model::decoder::LORA_FILE;
            bail!("--adapted: no trained decoder adapters ({file}) found; point --weights at a folder that has them");
        }
        let adapted = (mode == Mode::Refrag || adapted) && has;
        let used = trained.as_ref().filter(|_| mode == Mode::Refrag || adapted);
        let weights = used.map(|t| t.dir.clone());
        let question_at = self.question_at(used);
        let k = k.or(trained.as_ref().and_then(|t| t.k)).unwrap_or(DEFAULT_K);
        Ok(Reading { trained, adapted, weights, question_at, k })
    }
}
