//! Teacher-forced scoring: how well the decoder predicts given tokens after a prefix (chunk
//! vectors, tokens or both). Perplexity, the answer readings, the training stages' held-out
//! figures and the expansion policy's reward all score through here.

use crate::model::decoder::Decoder;
use crate::read::prompt::{self, Segment};
use anyhow::Result;
use candle_core::{DType, Tensor, D};

/// Logits [targets, vocab] of `targets` when the decoder reads the start position, `prefix`
/// (embeddings, [p, hidden]; may be empty) and then the targets themselves (teacher forced).
pub fn target_logits(dec: &Decoder, prefix: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let prefix = dec.behind_start(prefix)?;
    let p = prefix.dim(0)?;
    let tin = dec.embed_tokens(&targets[..targets.len() - 1])?;
    let x = Tensor::cat(&[&prefix, &tin], 0)?.unsqueeze(0)?;
    let h = dec.forward_train(&x)?.squeeze(0)?.narrow(0, p - 1, targets.len())?;
    dec.logits(&h)
}

/// Mean NLL of `targets` after `prefix` (see [`target_logits`]).
pub fn nll_after(dec: &Decoder, prefix: &Tensor, targets: &[u32]) -> Result<f64> {
    let logits = target_logits(dec, prefix, targets)?;
    let tgt = Tensor::new(targets, &dec.device)?;
    Ok(candle_nn::loss::cross_entropy(&logits, &tgt)?.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64)
}

/// NLL of each of `targets` after `prefix` (see [`target_logits`]), in order.
pub fn token_nll_after(dec: &Decoder, prefix: &Tensor, targets: &[u32]) -> Result<Vec<f64>> {
    let logp = candle_nn::ops::log_softmax(&target_logits(dec, prefix, targets)?.to_dtype(DType::F32)?, D::Minus1)?;
    let idx = Tensor::new(targets, &dec.device)?.unsqueeze(1)?;
    let picked = logp.gather(&idx, 1)?.squeeze(1)?.to_vec1::<f32>()?;
    Ok(picked.into_iter().map(|x| -(x as f64)).collect())
}

/// Share of `targets` that are the decoder's top-1 prediction after `prefix` (teacher forced).
pub fn accuracy_after(dec: &Decoder, prefix: &Tensor, targets: &[u32]) -> Result<f64> {
    let pred = target_logits(dec, prefix, targets)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
    Ok(pred.iter().zip(targets).filter(|(a, b)| a == b).count() as f64 / targets.len().max(1) as f64)
}

/// Mean answer cross-entropy (nats/token) of each prompt, all in one forward pass.
pub fn answer_nll(dec: &Decoder, items: &[(Vec<Segment>, &[u32])]) -> Result<Vec<f64>> {
    let logits = answer_logits(dec, items)?;
    logits
        .iter()
        .zip(items)
        .map(|(l, (_, answer))| {
            let tgt = Tensor::new(*answer, &dec.device)?;
            Ok(candle_nn::loss::cross_entropy(l, &tgt)?.to_scalar::<f32>()? as f64)
        })
        .collect()
}

/// F32 logits [answer_len, vocab] of each prompt's answer tokens, teacher-forced after the
/// prompt, for all prompts in one forward pass: rows are right-padded to one length, which the
/// causal mask keeps from reaching any real position.
pub fn answer_logits(dec: &Decoder, items: &[(Vec<Segment>, &[u32])]) -> Result<Vec<Tensor>> {
    let mut rows = Vec::with_capacity(items.len());
    let mut spans = Vec::with_capacity(items.len());
    for (segments, answer) in items {
        let input = prompt::assemble(dec, segments)?;
        let n = answer.len();
        let x = if n > 1 {
            Tensor::cat(&[&input.embeds.squeeze(0)?, &dec.embed_tokens(&answer[..n - 1])?], 0)?
        } else {
            input.embeds.squeeze(0)?
        };
        spans.push((input.positions - 1, n));
        rows.push(x);
    }
    let len = rows.iter().map(|r| r.dim(0)).collect::<candle_core::Result<Vec<_>>>()?.into_iter().max().unwrap_or(0);
    let padded = rows
        .iter()
        .map(|r| {
            let pad = len - r.dim(0)?;
            Ok(if pad == 0 { r.clone() } else { r.pad_with_zeros(0, 0, pad)? })
        })
        .collect::<Result<Vec<_>>>()?;
    let h = dec.forward_train(&Tensor::stack(&padded, 0)?)?;
    spans
        .iter()
        .enumerate()
        .map(|(i, &(from, n))| Ok(dec.logits(&h.get(i)?.narrow(0, from, n)?)?.to_dtype(DType::F32)?))
        .collect()
}
