//! What a training run is told: the stage and its settings ([`TrainConfig`], kept in every
//! checkpoint and card).

use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Reconstruct,
    Cpt,
    /// The selective-expansion policy (see `policy`); trains on top of existing weights.
    Policy,
    /// Answering from compressed passages: supervised answers + distillation from full-context
    /// reading (see `sft`).
    Sft,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub stage: Stage,
    pub k: usize,
    pub steps: usize,
    /// Target tokens per optimizer step (the batch size adapts to the curriculum's L).
    pub tokens_per_step: usize,
    /// Largest number of chunks per sample (the last curriculum stage).
    pub max_chunks: usize,
    /// cpt: tokens to predict after the compressed context.
    pub predict_tokens: usize,
    /// cpt: fraction of chunks left uncompressed (mixed input).
    pub mixed: f64,
    pub lr: f64,
    pub warmup: f64,
    pub weight_decay: f64,
    pub clip: f64,
    pub seed: u64,
    pub checkpoint_every: usize,
    /// Top layers of the chunk encoder that train (0 = projector only).
    #[serde(default)]
    pub encoder_layers: usize,
    /// Rank of the LoRA adapters on every decoder matrix (0 = decoder frozen).
    #[serde(default)]
    pub decoder_lora: usize,
    /// The chunk encoder is grown from the decoder's first this many layers (0 = MiniLM).
    #[serde(default)]
    pub chunk_layers: usize,
    /// Rank of the grown chunk encoder's LoRA adapters (on every matrix of its layers).
    #[serde(default)]
    pub chunk_lora: usize,
    /// sft: weight of the distillation term (KL to full-context reading).
    #[serde(default)]
    pub distill: f64,
    /// sft: tasks per optimizer step.
    #[serde(default)]
    pub batch: usize,
    /// cpt: weight of an auxiliary reconstruction loss (the window's first chunks read back
    /// from their vectors, up to 16 chunks, on its own batch each step), so that continual
    /// pre-training keeps the vectors' content instead of only their style. 0 = off.
    #[serde(default)]
    pub recon_weight: f64,
    /// Reconstruction batches (the reconstruct stage, the cpt/sft reconstruction term, their
    /// held-out scores) read a marker token after the chunk vectors
    /// ([`crate::model::decoder::RECON_MARKER`]), so that the decoder can tell "repeat the
    /// chunks" from "continue after them". Without it the two tasks share one input layout and
    /// the reconstruction term pulls continuation toward repeating (measured: the adapted
    /// decoder then reads chunk vectors worse than no context).
    #[serde(default)]
    pub recon_marker: bool,
    /// reconstruct/cpt: weight of a bag-of-words loss on each chunk vector of a batch: its projected
    /// vector, read through the decoder's final norm and (tied) LM head, should point at the
    /// chunk's k tokens. A direct content signal for the encoder and projector. 0 = off.
    #[serde(default)]
    pub bow_weight: f64,
    /// Factor on the chunk vector before the projector (see `Projector::in_scale`); 1 for
    /// weights trained before it existed.
    #[serde(default = "one")]
    pub input_scale: f64,
    /// sft: distil from the base decoder with this folder's adapters folded in (None: the
    /// base decoder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_weights: Option<PathBuf>,
}

fn one() -> f64 {
    1.0
}

/// VarMap prefix of the chunk encoder's trainable tensors.
pub const ENC_PREFIX: &str = "enc.";
/// VarMap prefix of the decoder's adapters.
pub const DEC_PREFIX: &str = "dec.";
/// VarMap prefix of the grown chunk encoder's adapters.
pub const GROWN_PREFIX: &str = "chunk.";
