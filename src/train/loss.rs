//! The reconstruction and continual pre-training losses: the decoder reads a batch's chunk
//! vectors (and kept chunks as tokens) and predicts the targets; the bag-of-words term; the
//! held-out token accuracy.

use super::data::Batch;
use super::oom::with_oom_retry;
use super::optim::{AdamW, GradSum};
use crate::model::compressor::Compressor;
use crate::model::decoder::Decoder;
use anyhow::Result;
use candle_core::{DType, Tensor};

/// Loss terms of a reconstruct/cpt step, summed over passes ([`Batch::passes`]) weighted by
/// their share of rows; each pass's gradients go into `grads` as soon as it is done, so only
/// one pass's graph is alive at a time. `scale` weights the whole batch (the auxiliary
/// reconstruction batch of cpt). Returns the weighted loss and the terms' (unweighted by
/// `scale`) means: main, bag of words.
#[allow(clippy::too_many_arguments)]
pub(super) fn batch_backward(
    dec: &Decoder,
    comp: &Compressor,
    opt: &AdamW,
    grads: &mut GradSum,
    b: &Batch,
    scale: f64,
    bow_weight: f64,
    micro_tokens: usize,
) -> Result<(f64, f64, Option<f64>)> {
    let n = b.targets.len() as f64;
    let (mut total, mut main_sum, mut bow_sum) = (0.0, 0.0, None::<f64>);
    for r in b.passes(micro_tokens) {
        let w = r.len() as f64 / n;
        let rows = b.rows(r);
        let (m, bow) = with_oom_retry(&dec.device, || {
            let (main, bow) = batch_loss(dec, comp, &rows, bow_weight > 0.0)?;
            let m = scalar(&main)?;
            let mut t = (main * (scale * w))?;
            let mut bv = None;
            if let Some(bw) = bow {
                bv = Some(scalar(&bw)?);
                t = (t + (bw * (scale * bow_weight * w))?)?;
            }
            let g = t.backward()?;
            crate::profile::mark(&dec.device, "backward");
            opt.accumulate(grads, &g)?;
            crate::profile::mark(&dec.device, "accumulate");
            Ok((m, bv))
        })?;
        main_sum += m * w;
        total += m * scale * w;
        if let Some(v) = bow {
            *bow_sum.get_or_insert(0.0) += v * w;
            total += v * scale * bow_weight * w;
        }
    }
    Ok((total, main_sum, bow_sum))
}

/// Mean cross-entropy (nats/token) of the targets given the compressed chunks (and the
/// reconstruction marker after them in a marked batch); differentiable with respect to the
/// projector. The whole batch is assembled slot by slot ([B, .., H] pieces),
/// so the number of tensor ops does not grow with the batch. With `bow`, also the bag-of-words
/// loss of the chunk vectors (see `TrainConfig::bow_weight`).
pub(super) fn batch_loss(dec: &Decoder, comp: &Compressor, b: &Batch, bow: bool) -> Result<(Tensor, Option<Tensor>)> {
    let c = b.vectors(dec, comp)?;
    crate::profile::mark(&dec.device, "encode");
    let (n, hid) = (b.targets.len(), dec.cfg.hidden);
    let flat = comp.project(&c)?.to_dtype(dec.dtype)?;
    let bow = if bow { Some(bow_loss(dec, &flat, b)?) } else { None };
    let e = flat.reshape((n, b.l, hid))?;
    // rows of token ids -> [n, len, H]
    let embed_rows = |rows: Vec<&[u32]>| -> Result<Tensor> {
        let len = rows[0].len();
        Ok(dec.embed_tokens(&rows.concat())?.reshape((n, len, hid))?)
    };
    let start = dec.behind_start(&dec.no_prefix()?)?.unsqueeze(0)?.broadcast_as((n, 1, hid))?.contiguous()?;
    let mut parts = vec![start];
    let mut j = 0;
    while j < b.l {
        let run = b.keep[j..].iter().take_while(|&&k| k == b.keep[j]).count();
        if b.keep[j] {
            let k = b.contexts[0].len() / b.l;
            parts.push(embed_rows(b.contexts.iter().map(|c| &c[j * k..(j + run) * k]).collect())?);
        } else {
            parts.push(e.narrow(1, j, run)?);
        }
        j += run;
    }
    if b.marker {
        parts.push(dec.recon_marker()?.unsqueeze(0)?.broadcast_as((n, 1, hid))?.contiguous()?);
    }
    let plen: usize = parts.iter().map(|p| p.dim(1)).sum::<candle_core::Result<usize>>()?;
    let tlen = b.targets[0].len();
    parts.push(embed_rows(b.targets.iter().map(|t| &t[..tlen - 1]).collect())?);
    let x = Tensor::cat(&parts, 1)?;
    crate::profile::mark(&dec.device, "assemble");
    let h = dec.forward_train(&x)?;
    let h = h.narrow(1, plen - 1, tlen)?.reshape((n * tlen, hid))?;
    let logits = dec.head(&h)?;
    let tgt = Tensor::from_vec(b.targets.concat(), n * tlen, &dec.device)?;
    let ce = crate::model::diffops::cross_entropy(&logits, &tgt)?;
    crate::profile::mark(&dec.device, "logits+ce");
    Ok((ce, bow))
}

/// Bag-of-words loss: mean over chunks and their k tokens of -log p(token | chunk vector), with
/// p the decoder's readout of the projected vector ([n * L, H], row order = chunk order).
pub(super) fn bow_loss(dec: &Decoder, flat: &Tensor, b: &Batch) -> Result<Tensor> {
    let k = b.contexts[0].len() / b.l;
    let ids: Vec<u32> = b.contexts.iter().flat_map(|c| c[..b.l * k].iter().copied()).collect();
    let rows = ids.len() / k;
    let idx = Tensor::from_vec(ids, (rows, k), &dec.device)?;
    let lp = candle_nn::ops::log_softmax(&dec.readout(flat)?, 1)?;
    Ok(lp.gather(&idx, 1)?.mean_all()?.neg()?)
}

/// Token accuracy of greedy reconstruction/prediction (teacher forced) on a batch; with `other`,
/// each row reads the next row's chunk vectors instead of its own (the control: what the
/// vectors add beyond their style).
pub(super) fn batch_accuracy(dec: &Decoder, comp: &Compressor, b: &Batch, other: bool) -> Result<f64> {
    let e = comp.project(&b.vectors(dec, comp)?)?;
    let (mut right, mut total) = (0.0, 0usize);
    for (i, t) in b.targets.iter().enumerate() {
        let src = if other { (i + 1) % b.targets.len() } else { i };
        let prefix = dec.recon_prefix(&e.narrow(0, src * b.l, b.l)?, b.marker)?;
        right += crate::read::score::accuracy_after(dec, &prefix, t)? * t.len() as f64;
        total += t.len();
    }
    Ok(right / total.max(1) as f64)
}

pub(super) fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64)
}
