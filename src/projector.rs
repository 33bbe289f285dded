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

/// What the weights are read for when `--weights` is not given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Answering questions (index, ask, chat, eval of questions): a folder's `qa/` weights
    /// (fine-tuned for answers) come before the folder's own.
    Answers,
    /// Reading text (perplexity, bench, train): the folder's own weights.
    Text,
}

/// Where trained weights are looked for: `--weights DIR`, else `$REFRAG_HOME/weights`, else the
/// `weights/` folder shipped in the source tree; for answers each folder's `qa/` first.
pub fn weights_dirs(explicit: Option<&Path>, home: &Path, purpose: Purpose) -> Vec<PathBuf> {
    if let Some(d) = explicit {
        return vec![d.to_path_buf()];
    }
    let mut dirs = Vec::new();
    for base in [home.join("weights"), Path::new(env!("CARGO_MANIFEST_DIR")).join("weights")] {
        if purpose == Purpose::Answers {
            dirs.push(base.join("qa"));
        }
        dirs.push(base);
    }
    dirs
}

/// Trained REFRAG weights: the projector, and the chunk-encoder tensors trained with it.
pub struct Trained {
    pub projector: Projector,
    /// The chunk encoder: the retrieval encoder with the trained tensors in place (or the
    /// retrieval encoder itself when only the projector was trained).
    pub chunk_encoder: crate::encoder::Encoder,
    pub dir: PathBuf,
    /// Decoder adapters trained with the projector (fold them in with
    /// [`crate::decoder::Decoder::merge_lora`] before reading chunk vectors).
    pub decoder_lora: Option<PathBuf>,
    /// The chunk size the weights were trained for (from card.json), when known.
    pub k: Option<usize>,
    /// The trained expansion policy (`refrag train policy`), when the folder has one that reads
    /// these weights' chunk vectors.
    pub policy: Option<std::sync::Arc<crate::policy::PolicyNet>>,
    /// Why the folder's policy was not loaded (trained on other chunk vectors).
    pub stale_policy: Option<String>,
    /// Where the weights were trained to find the question (card.json's `question_at`).
    pub question_at: Option<crate::prompt::QuestionAt>,
    /// The share of chunks to expand when --expand is not given (card.json's `expand`).
    pub expand: Option<f64>,
}

/// Find and load trained weights from the first folder that has a projector.
pub fn find(dirs: &[PathBuf], encoder: &crate::encoder::Encoder, out_dim: usize) -> Result<Option<Trained>> {
    for d in dirs {
        let p = d.join(FILE);
        if p.exists() {
            let projector = Projector::load(&p, &encoder.device, encoder.dim, out_dim)?;
            let e = d.join(crate::encoder::OVERRIDES_FILE);
            let chunk_encoder = if e.exists() { encoder.with_overrides(&e)? } else { encoder.clone() };
            let card_path = d.join("card.json");
            let card = std::fs::read(&card_path).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
            let k = card.as_ref().and_then(|v| v["k"].as_u64()).map(|k| k as usize);
            let question_at = match &card {
                Some(v) => crate::prompt::question_at_in(v, &card_path)?,
                None => None,
            };
            let expand = match card.as_ref().and_then(|v| v.get("expand")) {
                None | Some(serde_json::Value::Null) => None,
                Some(x) => match x.as_f64() {
                    Some(p) if (0.0..=1.0).contains(&p) => Some(p),
                    _ => bail!("{}: \"expand\": {x} is not a share between 0 and 1", card_path.display()),
                },
            };
            let lora = d.join(crate::decoder::LORA_FILE);
            let decoder_lora = lora.exists().then_some(lora);
            let (mut policy, mut stale_policy) = (None, None);
            if d.join(crate::policy::POLICY_FILE).exists() {
                stale_policy = crate::policy::stale_policy(d, &chunk_encoder.id)?;
                if stale_policy.is_none() {
                    policy = Some(std::sync::Arc::new(crate::policy::PolicyNet::load(d, &encoder.device)?));
                }
            }
            return Ok(Some(Trained { projector, chunk_encoder, dir: d.clone(), decoder_lora, k, policy, stale_policy, question_at, expand }));
        }
    }
    Ok(None)
}

/// The error for "REFRAG mode without trained weights".
impl Trained {
    /// The decoder REFRAG reads chunk vectors with: `base` with the adapters folded in.
    pub fn adapt(&self, base: &mut crate::decoder::Decoder) -> Result<()> {
        if let Some(p) = &self.decoder_lora {
            base.merge_lora(p)?;
        }
        Ok(())
    }
}

pub fn missing(dirs: &[PathBuf]) -> anyhow::Error {
    let looked = dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ");
    anyhow::anyhow!(
        "--mode refrag needs a trained projector ({FILE}) and none was found (looked in {looked}); \
         train one with `refrag train reconstruct`, point --weights at one, or use --mode full"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_look_in_qa_first_and_an_explicit_folder_alone() {
        let home = Path::new("/h");
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("weights");
        assert_eq!(weights_dirs(None, home, Purpose::Text), vec![home.join("weights"), shipped.clone()]);
        assert_eq!(
            weights_dirs(None, home, Purpose::Answers),
            vec![home.join("weights/qa"), home.join("weights"), shipped.join("qa"), shipped]
        );
        let mine = Path::new("/w");
        for p in [Purpose::Text, Purpose::Answers] {
            assert_eq!(weights_dirs(Some(mine), home, p), vec![mine.to_path_buf()]);
        }
    }

    /// The shipped cards describe the files beside them: every listed file has the listed size
    /// and sha256 and is under 16 MB, every safetensors file is listed, and the policy card names
    /// the encoder layers it was trained on (`trained@` + the start of encoder.safetensors' sha256).
    #[test]
    fn shipped_cards_match_their_files() {
        for dir in ["weights", "weights/qa"] {
            let d = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
            let card: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("card.json")).unwrap()).unwrap();
            let files = card["files"].as_object().unwrap_or_else(|| panic!("{dir}/card.json lists no files"));
            for (name, want) in files {
                let path = d.join(name);
                let bytes = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).len();
                assert_eq!(Some(bytes), want["bytes"].as_u64(), "{dir}/{name}: size");
                assert!(bytes < 16 << 20, "{dir}/{name}: {bytes} bytes");
                assert_eq!(crate::models::sha256_file(&path).unwrap(), want["sha256"].as_str().unwrap_or_default(), "{dir}/{name}: sha256");
            }
            for entry in std::fs::read_dir(&d).unwrap() {
                let name = entry.unwrap().file_name().to_string_lossy().to_string();
                assert!(!name.ends_with(".safetensors") || files.contains_key(&name), "{dir}/{name} is not in its card");
            }
            let encoder = files["encoder.safetensors"]["sha256"].as_str().unwrap();
            let policy: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join(crate::policy::POLICY_CARD)).unwrap()).unwrap();
            let trained = policy["chunk_encoder"].as_str().and_then(|id| id.split_once("+trained@")).map(|(_, t)| t.to_string()).unwrap_or_default();
            assert!(!trained.is_empty() && encoder.starts_with(&trained), "{dir}: the policy was trained on {trained}, the encoder is {encoder}");
        }
    }
}
