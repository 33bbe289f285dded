//! Checkpoints and weights: the run's trainable variables (projector, chunk-encoder layers,
//! decoder adapters) seeded, saved and resumed, started from earlier weights, and written as
//! the shipped files.

use super::config::{TrainConfig, DEC_PREFIX, ENC_PREFIX, GROWN_PREFIX};
use crate::model::compressor::ChunkEncoder;
use crate::model::decoder::Decoder;
use crate::model::encoder::Encoder;
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use std::collections::HashMap;
use std::path::Path;

/// Saved between runs (a training may span many short GPU sessions).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct Checkpoint {
    pub(super) step: usize,
    pub(super) rng: Rng,
    pub(super) config: TrainConfig,
    pub(super) tokens_seen: u64,
}

/// The config of the checkpoint in `out`, when there is a readable one (older checkpoints read
/// with the serde defaults: no bag-of-words term, input factor 1).
pub fn checkpoint_config(out: &Path) -> Option<TrainConfig> {
    read_checkpoint(out).map(|ck| ck.config)
}

/// The checkpoint in `out`, when there is a readable one.
pub(super) fn read_checkpoint(out: &Path) -> Option<Checkpoint> {
    serde_json::from_slice(&std::fs::read(out.join("checkpoint.json")).ok()?).ok()
}

/// Draw the randomly initialised tensors (projector `fc*`, LoRA `lora_a`) from `seed`, in name
/// order, on every device: candle 0.11 cannot seed its CPU generator, and a run must be
/// repeatable. Weights ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's Linear default), biases 0.
pub(super) fn seeded_init(varmap: &VarMap, seed: u64) -> Result<()> {
    let vars = varmap.data().lock().map_err(|_| anyhow::anyhow!("poisoned varmap"))?;
    let mut names: Vec<&String> = vars.keys().filter(|n| n.starts_with("fc") || n.ends_with(".lora_a")).collect();
    names.sort();
    let mut rng = Rng(seed ^ 0x5eed_1217);
    for n in names {
        let v = &vars[n];
        let dims = v.dims().to_vec();
        let vals: Vec<f32> = if n.ends_with(".bias") {
            vec![0.0; v.elem_count()]
        } else {
            let bound = 1.0 / (*dims.last().unwrap_or(&1) as f64).sqrt();
            (0..v.elem_count()).map(|_| ((rng.unit() * 2.0 - 1.0) * bound) as f32).collect()
        };
        v.set(&Tensor::from_vec(vals, dims, v.device())?.to_dtype(v.dtype())?)?;
    }
    Ok(())
}

/// Drop log lines past the checkpoint's step (written before a crash), so that a resumed run
/// logs every step once.
pub(super) fn truncate_log(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let keep: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, keep)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Set the variables from a weights folder (projector.safetensors, encoder.safetensors if the
/// run trains encoder layers); encoder layers absent there keep the base model's values.
pub(super) fn init_from_weights(varmap: &VarMap, dir: &Path) -> Result<()> {
    let vars = varmap.data().lock().map_err(|_| anyhow::anyhow!("poisoned varmap"))?;
    let mut loaded = HashMap::new();
    for (file, prefix) in [
        (crate::model::projector::FILE, ""),
        (crate::model::encoder::OVERRIDES_FILE, ENC_PREFIX),
        (crate::model::decoder::LORA_FILE, DEC_PREFIX),
        (crate::model::grown::FILE, GROWN_PREFIX),
    ] {
        let p = dir.join(file);
        if p.exists() {
            for (n, t) in candle_core::safetensors::load(&p, &Device::Cpu)
                .with_context(|| format!("{}: cannot load the starting weights", p.display()))?
            {
                loaded.insert(format!("{prefix}{n}"), t);
            }
        }
    }
    if !loaded.contains_key("fc1.weight") {
        bail!("{}: no {} to start from", dir.display(), crate::model::projector::FILE);
    }
    for (n, v) in vars.iter() {
        if let Some(t) = loaded.get(n) {
            let t = t.to_dtype(v.dtype())?.to_device(v.device())?;
            let t = grown_adapter(n, &t, v.as_tensor()).with_context(|| format!("{}: tensor {n}", dir.display()))?;
            v.set(&t).with_context(|| format!("{}: tensor {n} does not fit", dir.display()))?;
        }
    }
    Ok(())
}

/// A starting adapter of lower rank than the run's (`--decoder-lora`), grown to it: the stored
/// rows of A and columns of B first, the run's fresh A rows and zero B columns after, so that
/// B·A, and with it the starting model, is unchanged. Any other tensor is returned as it is.
pub(super) fn grown_adapter(name: &str, stored: &Tensor, fresh: &Tensor) -> Result<Tensor> {
    let (rank_dim, is_b) = match name {
        n if n.ends_with(".lora_a") => (0, false),
        n if n.ends_with(".lora_b") => (1, true),
        _ => return Ok(stored.clone()),
    };
    let (have, want) = (stored.dim(rank_dim)?, fresh.dim(rank_dim)?);
    if have == want {
        return Ok(stored.clone());
    }
    if have > want {
        bail!("the starting adapters have rank {have}, more than --decoder-lora {want}");
    }
    let rest = fresh.narrow(rank_dim, have, want - have)?;
    let rest = if is_b { rest.zeros_like()? } else { rest };
    Ok(Tensor::cat(&[stored, &rest], rank_dim)?)
}

/// The run's variables under `prefix`, by their name without it (tensors share the variables'
/// storage, so gradients reach them).
pub(super) fn vars_with_prefix(varmap: &VarMap, prefix: &str) -> Result<HashMap<String, Tensor>> {
    let vars = varmap.data().lock().map_err(|_| anyhow::anyhow!("poisoned varmap"))?;
    Ok(vars
        .iter()
        .filter_map(|(n, v)| n.strip_prefix(prefix).map(|n| (n.to_string(), v.as_tensor().clone())))
        .collect())
}

/// The chunk encoder with the run's trainable variables: grown from `decoder`'s first
/// `cfg.chunk_layers` layers with the run's adapters, else MiniLM (`base`) with them in place of
/// its top layers.
pub(super) fn trainable_encoder(
    varmap: &VarMap,
    cfg: &TrainConfig,
    base: &Encoder,
    decoder: &Decoder,
) -> Result<ChunkEncoder> {
    if cfg.chunk_layers > 0 {
        let adapters = vars_with_prefix(varmap, GROWN_PREFIX)?;
        return Ok(ChunkEncoder::Grown(crate::model::grown::GrownEncoder::trainable(
            decoder, cfg.chunk_layers, &adapters,
        )?));
    }
    let e = base.with_tensors(vars_with_prefix(varmap, ENC_PREFIX)?, "", crate::model::decoder::Ops::Differentiable)?;
    Ok(ChunkEncoder::MiniLm(e))
}

/// The decoder with the run's adapters attached (itself when it has none).
pub(super) fn trainable_decoder(varmap: &VarMap, base: &Decoder) -> Result<Decoder> {
    let mut d = base.clone();
    d.attach_lora(&vars_with_prefix(varmap, DEC_PREFIX)?)?;
    Ok(d)
}

/// The size limit of one shipped weights file.
pub(super) const MAX_SHIPPED_BYTES: usize = 16_000_000;

/// Adapters as shipped: f32 while that fits the shipped files' size limit, else f16.
fn shipped_adapters(lora: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let bytes: usize = lora.values().map(|t| t.elem_count() * 4).sum();
    if bytes <= MAX_SHIPPED_BYTES {
        return Ok(lora);
    }
    lora.into_iter().map(|(n, t)| Ok((n, t.to_dtype(DType::F16)?))).collect()
}

/// Write the shipped files: projector (f32), trained encoder tensors (f16), decoder and grown
/// chunk-encoder adapters (f32, or f16 where f32 would pass `MAX_SHIPPED_BYTES`).
pub(super) fn save_weights(varmap: &VarMap, out: &Path, input_scale: f64) -> Result<()> {
    let vars = varmap.data().lock().map_err(|_| anyhow::anyhow!("poisoned varmap"))?;
    let mut proj = HashMap::new();
    let mut enc = HashMap::new();
    let mut lora: HashMap<String, Tensor> = HashMap::new();
    let mut grown: HashMap<String, Tensor> = HashMap::new();
    for (n, v) in vars.iter() {
        if let Some(e) = n.strip_prefix(ENC_PREFIX) {
            enc.insert(e.to_string(), v.as_tensor().to_dtype(DType::F16)?);
        } else if let Some(d) = n.strip_prefix(DEC_PREFIX) {
            lora.insert(d.to_string(), v.as_tensor().clone());
        } else if let Some(c) = n.strip_prefix(GROWN_PREFIX) {
            grown.insert(c.to_string(), v.as_tensor().clone());
        } else {
            proj.insert(n.clone(), v.as_tensor().clone());
        }
    }
    if input_scale != 1.0 {
        proj.insert(crate::model::projector::IN_SCALE.to_string(), Tensor::new(&[input_scale as f32], &Device::Cpu)?);
    }
    candle_core::safetensors::save(&proj, out.join(crate::model::projector::FILE))?;
    for (map, file) in [
        (enc, crate::model::encoder::OVERRIDES_FILE),
        (shipped_adapters(lora)?, crate::model::decoder::LORA_FILE),
        (shipped_adapters(grown)?, crate::model::grown::FILE),
    ] {
        let p = out.join(file);
        if map.is_empty() {
            if p.exists() {
                std::fs::remove_file(&p)?;
            }
        } else {
            candle_core::safetensors::save(&map, p)?;
        }
    }
    Ok(())
}
