//! The projector `phi` (REFRAG, arXiv 2509.01092, section 2): a two-layer MLP that maps an
//! encoder chunk vector `c_i` (384-d) into the decoder's token-embedding space (576-d):
//! `e_i = W2 · gelu(W1 · c_i + b1) + b2`, hidden size = output size = decoder hidden size.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{linear, Linear, VarBuilder, VarMap};
use std::path::Path;

/// File name of the projector weights inside a weights folder.
pub const FILE: &str = "projector.safetensors";

pub struct Projector {
    l1: Linear,
    l2: Linear,
    pub in_dim: usize,
    pub out_dim: usize,
    /// Factor applied to the chunk vector before `fc1` (stored as the scalar tensor
    /// `in_scale`; 1 when the file has none). The encoder's vectors are L2-normalised, so their
    /// components are ~1/sqrt(in_dim): a factor of sqrt(in_dim) gives `fc1` unit-scale inputs.
    pub in_scale: f64,
}

/// Name of the input factor's tensor in `projector.safetensors`.
pub const IN_SCALE: &str = "in_scale";

impl Projector {
    /// Build from a VarBuilder (`fc1`, `fc2`): loads weights, or creates trainable ones when
    /// the builder is backed by a VarMap.
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            l1: linear(in_dim, out_dim, vb.pp("fc1"))?,
            l2: linear(out_dim, out_dim, vb.pp("fc2"))?,
            in_dim,
            out_dim,
            in_scale: 1.0,
        })
    }

    /// Load trained weights from a safetensors file.
    pub fn load(path: &Path, device: &Device, in_dim: usize, out_dim: usize) -> Result<Self> {
        // SAFETY: read-only memory map of a file we do not modify.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, device) }
            .with_context(|| format!("{}: not a safetensors file", path.display()))?;
        let mut p = Self::new(vb, in_dim, out_dim).with_context(|| {
            format!("{}: not a {in_dim}->{out_dim} projector (trained for other models?)", path.display())
        })?;
        p.in_scale = stored_in_scale(path)?;
        Ok(p)
    }

    /// A freshly initialised projector in `varmap` (for training, or plumbing tests).
    pub fn init(varmap: &VarMap, device: &Device, in_dim: usize, out_dim: usize) -> Result<Self> {
        Self::new(VarBuilder::from_varmap(varmap, DType::F32, device), in_dim, out_dim)
    }

    /// [n, in_dim] -> [n, out_dim]
    pub fn forward(&self, c: &Tensor) -> Result<Tensor> {
        let mut c = c.to_dtype(DType::F32)?;
        if self.in_scale != 1.0 {
            c = (c * self.in_scale)?;
        }
        let h = self.l1.forward(&c)?.gelu_erf()?;
        Ok(self.l2.forward(&h)?)
    }
}

/// The input factor stored in a projector file (1 when it has none).
pub fn stored_in_scale(path: &Path) -> Result<f64> {
    // SAFETY: read-only memory map of a file we do not modify; only the one scalar is read.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    if st.get(IN_SCALE).is_err() {
        return Ok(1.0);
    }
    Ok(st.load(IN_SCALE, &Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?[0] as f64)
}
