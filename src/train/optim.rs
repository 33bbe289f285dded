//! AdamW with one flat update over all trainable variables, gradient sums over passes,
//! global-norm clipping, and the warm-up + cosine learning-rate schedule.

use super::config::TrainConfig;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use std::collections::HashMap;
use std::path::Path;

/// Learning rate at `step`: linear warm-up, then cosine decay to 10% of the peak.
pub fn lr_at(cfg: &TrainConfig, step: usize) -> f64 {
    let warm = ((cfg.warmup * cfg.steps as f64) as usize).max(1);
    if step < warm {
        return cfg.lr * (step + 1) as f64 / warm as f64;
    }
    let p = (step - warm) as f64 / (cfg.steps - warm).max(1) as f64;
    cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p.min(1.0)).cos()))
}

/// Gradients of an optimizer's variables summed over the passes of one step (in its variable
/// order; None: no gradient reached that variable).
#[derive(Default)]
pub struct GradSum(pub(super) Vec<Option<Tensor>>);

/// AdamW whose moments can be saved and restored.
///
/// The moments live in two flat f32 buffers over all variables (in `vars` order), and one
/// update runs each of its ~15 element-wise ops once over all of them: a decoder with LoRA on
/// every matrix has ~500 variables, and per-variable updates were ~7500 kernel launches a step
/// (13% of a cpt step on the H200).
pub struct AdamW {
    vars: Vec<(String, Var)>,
    /// each variable's start in the flat buffers; the last entry is their length
    offsets: Vec<usize>,
    m: Tensor,
    v: Tensor,
    pub step: usize,
    beta1: f64,
    beta2: f64,
    eps: f64,
    wd: f64,
}

impl AdamW {
    pub fn new(varmap: &VarMap, wd: f64) -> Result<Self> {
        let data = varmap.data().lock().map_err(|_| anyhow::anyhow!("varmap lock"))?;
        let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let mut offsets = vec![0];
        for (_, v) in &vars {
            offsets.push(offsets[offsets.len() - 1] + v.elem_count());
        }
        let device = vars.first().map(|(_, v)| v.device().clone()).unwrap_or(Device::Cpu);
        let n = offsets[offsets.len() - 1];
        // two buffers, not one shared: nothing may ever update one in place through the other
        let m = Tensor::zeros(n, DType::F32, &device)?;
        let v = Tensor::zeros(n, DType::F32, &device)?;
        Ok(Self { vars, offsets, m, v, step: 0, beta1: 0.9, beta2: 0.999, eps: 1e-8, wd })
    }

    /// Variable `i`'s slice of a flat buffer, in the variable's shape.
    fn slice(&self, flat: &Tensor, i: usize) -> Result<Tensor> {
        let (a, b) = (self.offsets[i], self.offsets[i + 1]);
        Ok(flat.narrow(0, a, b - a)?.reshape(self.vars[i].1.shape())?)
    }

    /// One update with global-norm clipping; returns the gradient norm before clipping.
    pub fn step(&mut self, grads: &candle_core::backprop::GradStore, lr: f64, clip: f64) -> Result<f64> {
        let mut sum = GradSum::default();
        self.accumulate(&mut sum, grads)?;
        self.step_sum(&sum, lr, clip)
    }

    /// Add one backward pass's gradients of this optimizer's variables to `sum` (detached:
    /// the pass's graph can go).
    ///
    /// All or nothing: if an addition fails (out of memory), `sum` is left as it was, so the
    /// pass can run again ([`with_oom_retry`]).
    pub fn accumulate(&self, sum: &mut GradSum, grads: &candle_core::backprop::GradStore) -> Result<()> {
        let mut next = sum.0.clone();
        next.resize(self.vars.len(), None);
        for (slot, (_, var)) in next.iter_mut().zip(&self.vars) {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            let g = g.detach();
            *slot = Some(match slot.take() {
                Some(s) => (s + g)?,
                None => g,
            });
        }
        sum.0 = next;
        Ok(())
    }

    /// One update from summed gradients (see `step`). A variable that no gradient reached is
    /// left as it was, moments included.
    pub fn step_sum(&mut self, grads: &GradSum, lr: f64, clip: f64) -> Result<f64> {
        if self.vars.is_empty() {
            return Ok(0.0);
        }
        let present: Vec<bool> = (0..self.vars.len()).map(|i| matches!(grads.0.get(i), Some(Some(_)))).collect();
        if !present.iter().any(|&p| p) {
            self.step += 1;
            return Ok(0.0);
        }
        // the gradients and the weights as flat f32 vectors (zeros where no gradient came).
        // The gradients were detached in `accumulate`: a variable's gradient carries autograd
        // history (candle detaches only the interior ones), and moments built from it would
        // hold this step's graph, and the next step's the one before.
        let mut gs = Vec::with_capacity(self.vars.len());
        let mut ws = Vec::with_capacity(self.vars.len());
        for (i, (_, var)) in self.vars.iter().enumerate() {
            gs.push(match grads.0.get(i) {
                Some(Some(g)) => g.to_dtype(DType::F32)?.flatten_all()?,
                _ => Tensor::zeros(var.elem_count(), DType::F32, var.device())?,
            });
            ws.push(var.as_tensor().detach().to_dtype(DType::F32)?.flatten_all()?);
        }
        let g = Tensor::cat(&gs, 0)?;
        let w = Tensor::cat(&ws, 0)?;
        let norm = norm(&g)?;
        let scale = if clip > 0.0 && norm > clip { clip / norm } else { 1.0 };
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        let g = (g * scale)?;
        let m = ((&self.m * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
        let v = ((&self.v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
        let upd = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + self.eps)?)?;
        let new = ((w * (1.0 - lr * self.wd))? - (upd * lr)?)?;
        for (i, (_, var)) in self.vars.iter().enumerate() {
            if present[i] {
                var.set(&self.slice(&new, i)?.to_dtype(var.dtype())?)?;
            } else {
                // no gradient: its moments stay as they were
                let (a, b) = (self.offsets[i], self.offsets[i + 1]);
                m.slice_set(&self.m.narrow(0, a, b - a)?, 0, a)?;
                v.slice_set(&self.v.narrow(0, a, b - a)?, 0, a)?;
            }
        }
        (self.m, self.v) = (m, v);
        Ok(norm)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            map.insert(format!("m.{name}"), self.slice(&self.m, i)?.contiguous()?);
            map.insert(format!("v.{name}"), self.slice(&self.v, i)?.contiguous()?);
        }
        candle_core::safetensors::save(&map, path)?;
        Ok(())
    }

    pub fn load(&mut self, path: &Path, device: &Device) -> Result<()> {
        let map = candle_core::safetensors::load(path, device)?;
        let flat = |kind: &str| -> Result<Tensor> {
            let mut parts = Vec::with_capacity(self.vars.len());
            for (name, var) in &self.vars {
                let t = map.get(&format!("{kind}.{name}")).context("optimizer state lacks a moment")?;
                if t.elem_count() != var.elem_count() {
                    bail!(
                        "optimizer state: {kind}.{name} has {} values, the variable {}",
                        t.elem_count(),
                        var.elem_count()
                    );
                }
                parts.push(t.to_dtype(DType::F32)?.flatten_all()?);
            }
            if parts.is_empty() {
                return Ok(self.m.clone());
            }
            Ok(Tensor::cat(&parts, 0)?)
        };
        let (m, v) = (flat("m")?, flat("v")?);
        (self.m, self.v) = (m, v);
        Ok(())
    }
}

/// The L2 norm of a flat f32 vector, with one device sync: squares summed in f32 over rows of
/// 4096, the rows' sums in f64 (millions of squares in one f32 sum lose digits on the CPU, which
/// adds them in order; one f64 sum of them all took ~4 ms of one GPU block a step).
fn norm(g: &Tensor) -> Result<f64> {
    const ROW: usize = 4096;
    let len = g.elem_count();
    let full = len / ROW * ROW;
    let sq = g.sqr()?;
    let mut parts = Vec::with_capacity(2);
    if full > 0 {
        parts.push(sq.narrow(0, 0, full)?.reshape((full / ROW, ROW))?.sum(1)?);
    }
    if len > full {
        parts.push(sq.narrow(0, full, len - full)?.sum_keepdim(0)?);
    }
    let sums = Tensor::cat(&parts, 0)?.to_dtype(DType::F64)?;
    Ok(sums.sum_all()?.to_scalar::<f64>()?.sqrt())
}
