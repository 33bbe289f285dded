//! The projector `phi` (REFRAG, arXiv 2509.01092, section 2): a two-layer MLP that maps an
//! encoder chunk vector `c_i` (384-d) into the decoder's token-embedding space (576-d):
//! `e_i = W2 · gelu(W1 · c_i + b1) + b2`, hidden size = output size = decoder hidden size.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{linear, Linear, VarBuilder, VarMap};
use std::path::{Path, PathBuf};

/// File name of the projector weights inside a weights folder.
pub const FILE: &str = "projector.safetensors";

pub struct Projector {
    l1: Linear,
    l2: Linear,
    pub in_dim: usize,
    pub out_dim: usize,
}

impl Projector {
    /// Build from a VarBuilder (`fc1`, `fc2`): loads weights, or creates trainable ones when
    /// the builder is backed by a VarMap.
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            l1: linear(in_dim, out_dim, vb.pp("fc1"))?,
            l2: linear(out_dim, out_dim, vb.pp("fc2"))?,
            in_dim,
            out_dim,
        })
    }

    /// Load trained weights from a safetensors file.
    pub fn load(path: &Path, device: &Device, in_dim: usize, out_dim: usize) -> Result<Self> {
        // SAFETY: read-only memory map of a file we do not modify.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, device) }
            .with_context(|| format!("{}: not a safetensors file", path.display()))?;
        Self::new(vb, in_dim, out_dim).with_context(|| {
            format!("{}: not a {in_dim}->{out_dim} projector (trained for other models?)", path.display())
        })
    }

    /// A freshly initialised projector in `varmap` (for training, or plumbing tests).
    pub fn init(varmap: &VarMap, device: &Device, in_dim: usize, out_dim: usize) -> Result<Self> {
        Self::new(VarBuilder::from_varmap(varmap, DType::F32, device), in_dim, out_dim)
    }

    /// [n, in_dim] -> [n, out_dim]
    pub fn forward(&self, c: &Tensor) -> Result<Tensor> {
        let h = self.l1.forward(&c.to_dtype(DType::F32)?)?.gelu_erf()?;
        Ok(self.l2.forward(&h)?)
    }
}

/// Where trained weights are looked for: `--weights DIR`, else `$REFRAG_HOME/weights`, else the
/// `weights/` folder shipped in the source tree.
pub fn weights_dirs(explicit: Option<&Path>, home: &Path) -> Vec<PathBuf> {
    match explicit {
        Some(d) => vec![d.to_path_buf()],
        None => vec![
            home.join("weights"),
            Path::new(env!("CARGO_MANIFEST_DIR")).join("weights"),
        ],
    }
}

/// Find and load the projector, or explain that none is trained.
pub fn find(dirs: &[PathBuf], device: &Device, in_dim: usize, out_dim: usize) -> Result<Projector> {
    for d in dirs {
        let p = d.join(FILE);
        if p.exists() {
            return Projector::load(&p, device, in_dim, out_dim);
        }
    }
    let looked = dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ");
    bail!(
        "--mode refrag needs a trained projector ({FILE}) and none was found (looked in {looked}); \
         train one with `refrag train reconstruct`, point --weights at one, or use --mode full"
    )
}
