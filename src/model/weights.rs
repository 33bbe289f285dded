//! Trained REFRAG weights: where they are looked for ([`weights_dirs`]), what their card says
//! ([`Card`]) and loading them ([`find`]): the projector, the chunk-encoder layers, the decoder
//! adapters and the expansion policy trained with them.

use crate::model::compressor::ChunkEncoder;
use crate::model::decoder::Decoder;
use crate::model::encoder::Encoder;
use crate::model::grown::GrownEncoder;
use crate::model::projector::{Projector, FILE};
use crate::options::QuestionAt;
use anyhow::{anyhow, bail, Result};
use std::path::{Path, PathBuf};

/// The card's file name inside a weights folder.
pub const CARD_FILE: &str = "card.json";

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
    /// The chunk encoder: the decoder's first layers with their trained adapters (when the card
    /// says `chunk_encoder.layers`), else the retrieval encoder with any trained tensors in place.
    pub chunk_encoder: ChunkEncoder,
    pub dir: PathBuf,
    /// Decoder adapters trained with the projector (fold them in with [`Trained::adapt`]
    /// before reading chunk vectors).
    pub decoder_lora: Option<PathBuf>,
    /// The chunk size the weights were trained for (from card.json), when known.
    pub k: Option<usize>,
    /// The trained expansion policy (`refrag train policy`), when the folder has one that reads
    /// these weights' chunk vectors.
    pub policy: Option<std::sync::Arc<crate::model::policy::PolicyNet>>,
    /// Why the folder's policy was not loaded (trained on other chunk vectors).
    pub stale_policy: Option<String>,
    /// Where the weights were trained to find the question (card.json's `question_at`).
    pub question_at: Option<QuestionAt>,
    /// The share of chunks to expand when --expand is not given (card.json's `expand`).
    pub expand: Option<f64>,
    /// Reconstruction reads the marker token after the chunk vectors (card.json's
    /// `recon_marker`; see [`crate::model::decoder::RECON_MARKER`]).
    pub recon_marker: bool,
}

/// What a weights folder's card.json says that changes how the weights are read. Other fields
/// (scores, data, settings) are for people and stay in the file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Card {
    /// The chunk size the weights were trained for.
    pub k: Option<usize>,
    /// Where the weights were trained to find the question.
    pub question_at: Option<QuestionAt>,
    /// The share of chunks to expand when --expand is not given.
    pub expand: Option<f64>,
    /// The chunk encoder is grown from the decoder's first this many layers
    /// (`"chunk_encoder": {"from": "decoder", "layers": N}`); None: MiniLM.
    pub chunk_layers: Option<usize>,
    /// The weights were trained to repeat chunk vectors after the reconstruction marker.
    pub recon_marker: bool,
}

impl Card {
    /// The card in `dir`; the empty card when there is none or it is not JSON. A field that
    /// is there but cannot be read as what it names is an error naming the card (read another
    /// way, the weights would answer worse).
    pub fn read(dir: &Path) -> Result<Card> {
        let path = dir.join(CARD_FILE);
        let Ok(bytes) = std::fs::read(&path) else { return Ok(Card::default()) };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else { return Ok(Card::default()) };
        Card::parse(&v, &path)
    }

    /// The card's fields from its parsed JSON (read from `path`).
    pub fn parse(v: &serde_json::Value, path: &Path) -> Result<Card> {
        let question_at = match v.get("question_at") {
            None | Some(serde_json::Value::Null) => None,
            Some(x) => Some(serde_json::from_value(x.clone()).map_err(|_| {
                anyhow!("{}: \"question_at\": {x} is not a layout (after, before or both)", path.display())
            })?),
        };
        let expand = match v.get("expand") {
            None | Some(serde_json::Value::Null) => None,
            Some(x) => match x.as_f64() {
                Some(p) if (0.0..=1.0).contains(&p) => Some(p),
                _ => bail!("{}: \"expand\": {x} is not a share between 0 and 1", path.display()),
            },
        };
        let chunk_layers = match v.get("chunk_encoder") {
            None | Some(serde_json::Value::Null) => None,
            Some(x) => match x["layers"].as_u64() {
                Some(n) if n > 0 => Some(n as usize),
                _ => bail!("{}: \"chunk_encoder\": {x} does not say its decoder layers", path.display()),
            },
        };
        let recon_marker = match v.get("recon_marker") {
            None | Some(serde_json::Value::Null) => false,
            Some(x) => {
                x.as_bool().ok_or_else(|| anyhow!("{}: \"recon_marker\": {x} is not true or false", path.display()))?
            }
        };
        Ok(Card { k: v["k"].as_u64().map(|k| k as usize), question_at, expand, chunk_layers, recon_marker })
    }
}

/// The chunk encoder of a weights folder whose card is `card`: grown from `decoder` (not yet
/// adapted) or MiniLM (`encoder`, with the folder's trained layers).
fn chunk_encoder(d: &Path, card: &Card, encoder: &Encoder, decoder: &Decoder) -> Result<ChunkEncoder> {
    let grown = d.join(crate::model::grown::FILE);
    Ok(match card.chunk_layers {
        Some(n) if grown.exists() => ChunkEncoder::Grown(GrownEncoder::load(decoder, n, &grown)?),
        Some(n) => ChunkEncoder::Grown(GrownEncoder::new(decoder, n)?),
        None if grown.exists() => bail!(
            "{}: its card does not say how many decoder layers the chunk encoder has (\"chunk_encoder\": {{\"layers\": N}})",
            grown.display()
        ),
        None => {
            let e = d.join(crate::model::encoder::OVERRIDES_FILE);
            ChunkEncoder::MiniLm(if e.exists() { encoder.with_overrides(&e)? } else { encoder.clone() })
        }
    })
}

/// Find and load trained weights from the first folder that has a projector. `decoder` is the
/// base decoder (before any adapters are folded in): a grown chunk encoder is its first layers.
pub fn find(dirs: &[PathBuf], encoder: &Encoder, decoder: &Decoder) -> Result<Option<Trained>> {
    for d in dirs {
        let p = d.join(FILE);
        if p.exists() {
            let card = Card::read(d)?;
            let chunk_encoder = chunk_encoder(d, &card, encoder, decoder)?;
            let projector = Projector::load(&p, &encoder.device, chunk_encoder.dim(), decoder.cfg.hidden)?;
            let lora = d.join(crate::model::decoder::LORA_FILE);
            let decoder_lora = lora.exists().then_some(lora);
            let (mut policy, mut stale_policy) = (None, None);
            if d.join(crate::model::policy::POLICY_FILE).exists() {
                stale_policy = crate::model::policy::stale_policy(d, chunk_encoder.id())?;
                if stale_policy.is_none() {
                    policy = Some(std::sync::Arc::new(crate::model::policy::PolicyNet::load(d, &encoder.device)?));
                }
            }
            return Ok(Some(Trained {
                projector,
                chunk_encoder,
                dir: d.clone(),
                decoder_lora,
                k: card.k,
                policy,
                stale_policy,
                question_at: card.question_at,
                expand: card.expand,
                recon_marker: card.recon_marker,
            }));
        }
    }
    Ok(None)
}

impl Trained {
    /// The decoder REFRAG reads chunk vectors with: `base` with the adapters folded in.
    pub fn adapt(&self, base: &mut crate::model::decoder::Decoder) -> Result<()> {
        if let Some(p) = &self.decoder_lora {
            base.merge_lora(p)?;
        }
        Ok(())
    }
}

/// The error for "REFRAG mode without trained weights".
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
    /// and sha256 and is under 16 MB, every safetensors file is listed, and a policy card names
    /// the encoder layers it was trained on (`trained@` + the start of encoder.safetensors' sha256).
    #[test]
    fn shipped_cards_match_their_files() {
        for dir in ["weights", "weights/qa", "weights/qa-minilm", "weights/grown"] {
            let d = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
            let card: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("card.json")).unwrap()).unwrap();
            let files = card["files"].as_object().unwrap_or_else(|| panic!("{dir}/card.json lists no files"));
            for (name, want) in files {
                let path = d.join(name);
                let bytes = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).len();
                assert_eq!(Some(bytes), want["bytes"].as_u64(), "{dir}/{name}: size");
                assert!(bytes < 16 << 20, "{dir}/{name}: {bytes} bytes");
                assert_eq!(
                    crate::model::cache::sha256_file(&path).unwrap(),
                    want["sha256"].as_str().unwrap_or_default(),
                    "{dir}/{name}: sha256"
                );
            }
            for entry in std::fs::read_dir(&d).unwrap() {
                let name = entry.unwrap().file_name().to_string_lossy().to_string();
                assert!(
                    !name.ends_with(".safetensors") || files.contains_key(&name),
                    "{dir}/{name} is not in its card"
                );
            }
            if !d.join(crate::model::policy::POLICY_CARD).exists() {
                continue;
            }
            let encoder = files["encoder.safetensors"]["sha256"].as_str().unwrap();
            let policy: serde_json::Value =
                serde_json::from_slice(&std::fs::read(d.join(crate::model::policy::POLICY_CARD)).unwrap()).unwrap();
            let trained = policy["chunk_encoder"]
                .as_str()
                .and_then(|id| id.split_once("+trained@"))
                .map(|(_, t)| t.to_string())
                .unwrap_or_default();
            assert!(
                !trained.is_empty() && encoder.starts_with(&trained),
                "{dir}: the policy was trained on {trained}, the encoder is {encoder}"
            );
        }
    }
}
