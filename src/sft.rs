//! `refrag train sft`: teach the REFRAG reader to answer from compressed passages (the paper's
//! RAG fine-tuning), with two signals on the same answer positions:
//!
//! - supervised: cross-entropy of the reference answer (then `<|im_end|>`), read after the
//!   question and its passages as projected chunk vectors, exactly as `ask`/`eval` build the
//!   input ([`crate::prompt::rag`]);
//! - distillation: KL(teacher ‖ student), where the teacher is the same base decoder reading the
//!   passages as tokens (full context, no adapters: the product's `--mode full`). The student
//!   learns to read chunk vectors the way the decoder reads the text.
//!
//! With `--mixed P` a fraction P of the chunks is read as tokens (expanded), so answers hold
//! up when the policy expands some chunks. Tasks come in the `eval --conversations` format
//! (`refrag dataset squad|nq-oracle|mtrag --tasks`); a task's earlier turns are read as
//! `eval --conversations` reads them: each turn compressed into chunk vectors for the student,
//! as tokens for the teacher (the last [`MAX_HISTORY_TURNS`]).

use crate::decoder::Decoder;
use crate::encoder::Encoder;
use crate::projector::Projector;
use crate::prompt::{self, Segment};
use crate::train::Rng;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor, D};
use std::path::PathBuf;

/// Most passage tokens read per task (longer passages are cut).
const MAX_PASSAGE_TOKENS: usize = 512;
/// Earlier turns read per task (the most recent ones), and most tokens of each turn's text.
pub const MAX_HISTORY_TURNS: usize = 2;
const MAX_TURN_TOKENS: usize = 96;
/// Most passage tokens read per task, over all its passages (the last ones are cut first):
/// keeps a batch's attention within one GPU's memory.
const MAX_TASK_PASSAGE_TOKENS: usize = 1024;
/// Most answer tokens trained on (long-form answers are cut; then no end-of-turn token).
const MAX_ANSWER_TOKENS: usize = 192;

/// One question with its passages (decoder tokens) and reference answer tokens.
pub struct QaExample {
    /// Earlier (user, agent) turns as decoder tokens, oldest first.
    pub history: Vec<(Vec<u32>, Vec<u32>)>,
    pub question: String,
    pub passages: Vec<Vec<u32>>,
    /// Answer tokens, ending with `<|im_end|>` unless cut at [`MAX_ANSWER_TOKENS`].
    pub answer: Vec<u32>,
}

impl QaExample {
    /// Tokens the teacher reads for it (passages, earlier turns and answer; the question and the
    /// chat template add a few dozen): its size when a step is split into passes.
    pub fn tokens(&self) -> usize {
        let turns: usize = self.history.iter().map(|(u, a)| u.len() + a.len()).sum();
        self.passages.iter().map(Vec::len).sum::<usize>() + turns + self.answer.len()
    }
}

/// Answerable one-turn tasks with their first reference answer.
pub struct QaPool {
    pub examples: Vec<QaExample>,
}

impl QaPool {
    pub fn load(files: &[PathBuf], dec: &Decoder) -> Result<Self> {
        let mut examples = Vec::new();
        for f in files {
            let text = crate::corpus::read_text(f)?;
            for (n, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let at = format!("{}:{}", f.display(), n + 1);
                let t = crate::chat::parse_task(line, &at)?;
                let Some(answer) = t.targets.iter().find(|a| !a.trim().is_empty()) else { continue };
                if t.unanswerable || t.turn.passages.is_empty() {
                    continue;
                }
                let mut passages = Vec::new();
                let mut budget = MAX_TASK_PASSAGE_TOKENS;
                for p in &t.turn.passages {
                    let mut ids = prompt::tokenize(dec, p.trim()).with_context(|| at.clone())?;
                    ids.truncate(MAX_PASSAGE_TOKENS.min(budget));
                    budget -= ids.len();
                    if !ids.is_empty() {
                        passages.push(ids);
                    }
                }
                let mut answer = prompt::tokenize(dec, &format!("{}<|im_end|>", answer.trim())).with_context(|| at.clone())?;
                answer.truncate(MAX_ANSWER_TOKENS);
                let turn = |text: &str| -> Result<Vec<u32>> {
                    let mut ids = prompt::tokenize(dec, text.trim()).with_context(|| at.clone())?;
                    ids.truncate(MAX_TURN_TOKENS);
                    Ok(ids)
                };
                let skip = t.turn.history.len().saturating_sub(MAX_HISTORY_TURNS);
                let history = t.turn.history[skip..].iter().map(|(u, a)| Ok((turn(u)?, turn(a)?))).collect::<Result<Vec<_>>>()?;
                examples.push(QaExample { history, question: t.turn.question.clone(), passages, answer });
            }
        }
        if examples.is_empty() {
            bail!("{files:?}: no answerable tasks with passages (make them with `refrag dataset ... --tasks`)");
        }
        Ok(Self { examples })
    }

    /// `n` examples drawn with replacement.
    pub fn sample(&self, n: usize, rng: &mut Rng) -> Vec<&QaExample> {
        (0..n).map(|_| &self.examples[rng.below(self.examples.len())]).collect()
    }
}

/// Loss terms of a batch, each a mean over answer tokens.
pub struct SftLoss {
    /// ce + distill * kl: what is optimised.
    pub total: Tensor,
    pub ce: f64,
    pub kl: f64,
    pub answer_tokens: usize,
}

/// The batch loss. `student` carries the adapters; `teacher` is the base decoder (None: no
/// distillation term). `mixed`: probability that a chunk is read as tokens.
#[allow(clippy::too_many_arguments)]
pub fn loss(
    student: &Decoder,
    teacher: Option<&Decoder>,
    enc: &Encoder,
    proj: &Projector,
    k: usize,
    batch: &[&QaExample],
    distill: f64,
    mixed: f64,
    rng: &mut Rng,
) -> Result<SftLoss> {
    // Which chunks stay tokens (per task, per passage, per chunk: expanded?, its tokens), and
    // all compressed chunk texts of the batch, in order.
    type Plan<'a> = Vec<Vec<(bool, &'a [u32])>>;
    let mut plans: Vec<Plan> = Vec::new();
    let mut texts = Vec::new();
    for ex in batch {
        for (u, a) in &ex.history {
            texts.extend(crate::corpus::chunk_texts(&student.tokenizer, u, k)?);
            texts.extend(crate::corpus::chunk_texts(&student.tokenizer, a, k)?);
        }
        let mut per = Vec::new();
        for p in &ex.passages {
            let mut chunks = Vec::new();
            for c in crate::corpus::chunks(p, k) {
                let expand = mixed > 0.0 && rng.unit() < mixed;
                if !expand {
                    texts.push(student.tokenizer.decode(c, false).map_err(|e| anyhow!("decode: {e}"))?);
                }
                chunks.push((expand, c));
            }
            per.push(chunks);
        }
        plans.push(per);
    }
    let projected = if texts.is_empty() {
        None
    } else {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        Some(proj.forward(&enc.encode(&refs)?.to_device(&student.device)?)?)
    };
    crate::profile::mark(&student.device, "encode");
    let mut row = 0;
    let mut student_prompts = Vec::with_capacity(batch.len());
    for (ex, plan) in batch.iter().zip(&plans) {
        // Student: earlier turns compressed whole (as `eval --conversations` reads them),
        // passages as runs of projected chunks and expanded tokens.
        let mut history = Vec::new();
        for (u, a) in &ex.history {
            let mut turn = |ids: &[u32]| -> Result<Vec<Segment>> {
                let n = crate::corpus::chunks(ids, k).count();
                if n == 0 {
                    return Ok(vec![Segment::Tokens(vec![])]);
                }
                let e = projected.as_ref().expect("history chunks were encoded").narrow(0, row, n)?;
                row += n;
                Ok(vec![Segment::Embeds(e)])
            };
            let u = turn(u)?;
            history.push((u, turn(a)?));
        }
        let mut passages = Vec::new();
        for chunks in plan {
            let mut segs: Vec<Segment> = Vec::new();
            for (expand, c) in chunks {
                if *expand {
                    segs.push(Segment::Tokens(c.to_vec()));
                } else {
                    let e = projected.as_ref().expect("compressed chunks were encoded").narrow(0, row, 1)?;
                    row += 1;
                    segs.push(Segment::Embeds(e));
                }
            }
            passages.push(segs);
        }
        student_prompts.push((task_prompt(ex, history, passages), ex.answer.as_slice()));
    }
    // One batched forward for the students, one for the teachers.
    crate::profile::mark(&student.device, "assemble");
    let s_logits = answer_logits(student, &student_prompts)?;
    crate::profile::mark(&student.device, "student");
    let t_logits = match (teacher, distill > 0.0) {
        (Some(t), true) => {
            let prompts: Vec<_> = batch.iter().map(|ex| (full_context_prompt(ex), ex.answer.as_slice())).collect();
            Some(answer_logits(t, &prompts)?)
        }
        _ => None,
    };
    crate::profile::mark(&student.device, "teacher");
    let (mut terms, mut ce_sum, mut kl_sum, mut ntok) = (Vec::new(), 0f64, 0f64, 0usize);
    for (i, ex) in batch.iter().enumerate() {
        let n = ex.answer.len();
        let tgt = Tensor::from_vec(ex.answer.clone(), n, &student.device)?;
        let ce = crate::diffops::cross_entropy(&s_logits[i], &tgt)?;
        let mut term = ce.clone();
        ce_sum += ce.to_scalar::<f32>()? as f64 * n as f64;
        if let Some(tl) = &t_logits {
            let lt = candle_nn::ops::log_softmax(&tl[i].detach(), D::Minus1)?;
            let ls = candle_nn::ops::log_softmax(&s_logits[i], D::Minus1)?;
            let kl = (lt.exp()? * (lt - ls)?)?.sum(D::Minus1)?.mean_all()?;
            kl_sum += kl.to_scalar::<f32>()? as f64 * n as f64;
            term = (term + (kl * distill)?)?;
        }
        // Weighted by answer length: the batch mean is per answer token.
        terms.push((term * n as f64)?);
        ntok += n;
    }
    let total = (Tensor::stack(&terms, 0)?.sum_all()? / ntok.max(1) as f64)?;
    crate::profile::mark(&student.device, "loss");
    Ok(SftLoss { total, ce: ce_sum / ntok.max(1) as f64, kl: kl_sum / ntok.max(1) as f64, answer_tokens: ntok })
}

/// A task's chunks encoded once, so that it can be read with any choice of expanded chunks
/// (the expansion policy's training): the passages' chunk vectors as the index would hold them
/// (`raw`, before projection) and projected, and the earlier turns compressed whole.
pub struct EncodedTask<'a> {
    pub ex: &'a QaExample,
    /// Encoder vectors of the passage chunks [n, dim], in order over all passages.
    pub raw: Tensor,
    /// Chunks per passage, in order.
    pub sizes: Vec<usize>,
    projected: Tensor,
    history: Vec<(Vec<Segment>, Vec<Segment>)>,
}

impl<'a> EncodedTask<'a> {
    pub fn new(dec: &Decoder, enc: &Encoder, proj: &Projector, k: usize, ex: &'a QaExample) -> Result<Self> {
        let mut texts = Vec::new();
        let mut turn_sizes = Vec::new();
        for (u, a) in &ex.history {
            for t in [u, a] {
                let before = texts.len();
                texts.extend(crate::corpus::chunk_texts(&dec.tokenizer, t, k)?);
                turn_sizes.push(texts.len() - before);
            }
        }
        let first_passage = texts.len();
        let mut sizes = Vec::with_capacity(ex.passages.len());
        for p in &ex.passages {
            let before = texts.len();
            texts.extend(crate::corpus::chunk_texts(&dec.tokenizer, p, k)?);
            sizes.push(texts.len() - before);
        }
        if texts.len() == first_passage {
            bail!("a task with no passage chunks");
        }
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let vecs = enc.encode(&refs)?.to_device(&dec.device)?;
        let projected_all = proj.forward(&vecs)?;
        let mut row = 0;
        let mut turns = Vec::new();
        for n in turn_sizes {
            turns.push(if n == 0 { vec![Segment::Tokens(vec![])] } else { vec![Segment::Embeds(projected_all.narrow(0, row, n)?)] });
            row += n;
        }
        let mut it = turns.into_iter();
        let history = std::iter::from_fn(|| Some((it.next()?, it.next()?))).collect();
        let n = texts.len() - first_passage;
        Ok(Self { ex, raw: vecs.narrow(0, first_passage, n)?, sizes, projected: projected_all.narrow(0, first_passage, n)?, history })
    }

    /// The reader's prompt with the passage chunks marked in `expand` read as tokens.
    pub fn prompt(&self, k: usize, expand: &[bool]) -> Result<Vec<Segment>> {
        let tokens: Vec<&[u32]> = self.ex.passages.iter().map(Vec::as_slice).collect();
        let passages = crate::policy::mixed_segments(&tokens, k, expand, Some(&self.projected))?;
        Ok(task_prompt(self.ex, self.history.clone(), passages))
    }
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

/// The readings of [`answer_readings`], in its order.
pub const ANSWER_READINGS: [&str; 6] = [
    "none, base decoder",
    "full, base decoder",
    "full, adapted decoder",
    "refrag, no passages",
    "refrag, own passages",
    "refrag, another task's passages",
];

/// Each task's reference-answer cross-entropy (nats per answer token) under six readings
/// ([`ANSWER_READINGS`]): the base decoder with no passages and with the passages as tokens;
/// the adapted decoder (`student`, adapters folded in) with them as tokens; and REFRAG (the
/// student reading compressed passages, nothing expanded) with no passages, with the task's
/// own, and with another task's (the next one in `tasks` whose passages differ: the control
/// that says whether the compressed passage's content reaches the answer at all). Returns one
/// row per reading, one value per task; `tick` after each task.
pub fn answer_readings(
    base: &Decoder,
    student: &Decoder,
    enc: &Encoder,
    proj: &Projector,
    k: usize,
    tasks: &[QaExample],
    mut tick: impl FnMut(),
) -> Result<Vec<Vec<f64>>> {
    let mut rows = vec![Vec::with_capacity(tasks.len()); ANSWER_READINGS.len()];
    let mut rng = Rng(0);
    for (i, ex) in tasks.iter().enumerate() {
        let other = (1..tasks.len()).map(|d| &tasks[(i + d) % tasks.len()]).find(|o| o.passages != ex.passages);
        let Some(other) = other else { bail!("another task's passages are needed: every task has the same passages") };
        let with = |passages: &[Vec<u32>]| QaExample {
            history: ex.history.clone(),
            question: ex.question.clone(),
            passages: passages.to_vec(),
            answer: ex.answer.clone(),
        };
        let answer = ex.answer.as_slice();
        let none = with(&[]);
        let compressed = |e: &QaExample, rng: &mut Rng| -> Result<f64> { Ok(loss(student, None, enc, proj, k, &[e], 0.0, 0.0, rng)?.ce) };
        let values = [
            answer_nll(base, &[(full_context_prompt(&none), answer)])?[0],
            answer_nll(base, &[(full_context_prompt(ex), answer)])?[0],
            answer_nll(student, &[(full_context_prompt(ex), answer)])?[0],
            compressed(&none, &mut rng)?,
            compressed(ex, &mut rng)?,
            compressed(&with(&other.passages), &mut rng)?,
        ];
        for (row, v) in rows.iter_mut().zip(values) {
            row.push(v);
        }
        tick();
    }
    Ok(rows)
}

/// One task of `eval readback`: the k-token chunk of its first passage that holds the
/// reference answer, read back alone from its chunk vector, and the control.
pub struct Readback {
    pub answer: String,
    /// The chunk's text.
    pub chunk: String,
    /// What the decoder writes reading that chunk's vector alone.
    pub own: String,
    /// What it writes reading the vector of the chunk at the same place in another task's first
    /// passage (the next task whose first passage differs).
    pub other: String,
    /// Mean NLL of the answer's tokens when the chunk's tokens are read back teacher-forced
    /// from its own vector, and from the control's (None where the answer's characters could
    /// not be placed on the chunk's tokens).
    pub answer_nll: Option<(f64, f64)>,
}

/// Which of a chunk's tokens carry part of `answer` (the first case-insensitive match of it in
/// the chunk's text); None when the text does not hold it as written.
fn answer_token_mask(dec: &Decoder, ids: &[u32], answer: &str) -> Result<Option<Vec<bool>>> {
    let decode = |ids: &[u32]| dec.tokenizer.decode(ids, false).map_err(|e| anyhow!("decode: {e}"));
    let text = decode(ids)?.to_lowercase();
    let Some(start) = text.find(&answer.to_lowercase()) else { return Ok(None) };
    let end = start + answer.len();
    let mut mask = Vec::with_capacity(ids.len());
    let mut from = 0;
    for j in 0..ids.len() {
        let to = decode(&ids[..=j])?.len();
        mask.push(from < end && to > start);
        from = to;
    }
    Ok(mask.iter().any(|m| *m).then_some(mask))
}

/// For each task whose reference answer lies within one k-token chunk of its first passage, the
/// decoder that reads chunk vectors (`dec`, adapters folded in) writes what it reads in that
/// chunk's vector alone (greedy, up to k + 4 tokens), and in the control's (see [`Readback`]):
/// is the answer in the vector at all? None for tasks whose answer crosses a chunk boundary;
/// `tick` after each task.
pub fn readback(dec: &Decoder, enc: &Encoder, proj: &Projector, k: usize, tasks: &[QaExample], mut tick: impl FnMut()) -> Result<Vec<Option<Readback>>> {
    let decode = |ids: &[u32]| dec.tokenizer.decode(ids, true).map_err(|e| anyhow!("decode: {e}"));
    let opts = crate::generate::SamplingOptions { max_tokens: k + 4, ..Default::default() };
    let vector = |text: &str| -> Result<Tensor> { proj.forward(&enc.encode(&[text])?.to_device(&dec.device)?) };
    let read = |v: &Tensor| -> Result<String> {
        let input = prompt::DecoderInput { embeds: dec.behind_start(v)?.unsqueeze(0)?, positions: 2, compressed_positions: 1 };
        Ok(crate::generate::generate(dec, &input, &opts, |_| Ok(()))?.text)
    };
    let first = |ex: &QaExample| -> Result<Vec<String>> { crate::corpus::chunk_texts(&dec.tokenizer, &ex.passages[0], k) };
    let mut out = Vec::with_capacity(tasks.len());
    for (i, ex) in tasks.iter().enumerate() {
        let answer = decode(&ex.answer)?.trim().to_string();
        let chunks = first(ex)?;
        let golds = [answer.clone()];
        let Some(at) = chunks.iter().position(|c| crate::metrics::contains_any(c, &golds)) else {
            out.push(None);
            tick();
            continue;
        };
        let other = (1..tasks.len()).map(|d| &tasks[(i + d) % tasks.len()]).find(|o| o.passages[0] != ex.passages[0]);
        let Some(other) = other else { bail!("another task's passage is needed: every task has the same first passage") };
        let theirs = first(other)?;
        let control = &theirs[at.min(theirs.len() - 1)];
        let (v_own, v_other) = (vector(&chunks[at])?, vector(control)?);
        let ids = crate::corpus::chunks(&ex.passages[0], k).nth(at).unwrap_or_default();
        let answer_nll = match answer_token_mask(dec, ids, &answer)? {
            Some(mask) => {
                let nll = |v: &Tensor| -> Result<f64> {
                    let per = crate::perplexity::token_nll_after(dec, v, ids)?;
                    let on: Vec<f64> = per.iter().zip(&mask).filter(|(_, m)| **m).map(|(x, _)| *x).collect();
                    Ok(crate::metrics::mean(&on))
                };
                Some((nll(&v_own)?, nll(&v_other)?))
            }
            None => None,
        };
        out.push(Some(Readback { own: read(&v_own)?, other: read(&v_other)?, chunk: chunks[at].clone(), answer, answer_nll }));
        tick();
    }
    Ok(out)
}

/// The teacher's prompt: earlier turns and passages read as tokens.
pub fn full_context_prompt(ex: &QaExample) -> Vec<Segment> {
    let full: Vec<Vec<Segment>> = ex.passages.iter().map(|p| vec![Segment::Tokens(p.clone())]).collect();
    let history = ex.history.iter().map(|(u, a)| (vec![Segment::Tokens(u.clone())], vec![Segment::Tokens(a.clone())])).collect();
    task_prompt(ex, history, full)
}

/// A task's prompt as `eval --conversations` builds it: system, earlier turns, then the
/// passages and the question (a plain RAG chat when there are no earlier turns).
fn task_prompt(ex: &QaExample, history: Vec<(Vec<Segment>, Vec<Segment>)>, passages: Vec<Vec<Segment>>) -> Vec<Segment> {
    let system = prompt::system_for(!passages.is_empty() || !history.is_empty());
    prompt::conversation(system, history, prompt::rag_user(&ex.question, passages))
}

/// Held-out answer NLL (nats/token, no expansion) read compressed by the student and, for
/// reference, as full tokens by the teacher; over the first `n` tasks.
pub fn heldout_nll(student: &Decoder, teacher: &Decoder, enc: &Encoder, proj: &Projector, k: usize, pool: &QaPool, n: usize) -> Result<serde_json::Value> {
    let mut rng = Rng(0);
    let (mut s_sum, mut t_sum, mut tok) = (0f64, 0f64, 0usize);
    for ex in pool.examples.iter().take(n) {
        let l = loss(student, None, enc, proj, k, &[ex], 0.0, 0.0, &mut rng)?;
        let t_ce = answer_nll(teacher, &[(full_context_prompt(ex), ex.answer.as_slice())])?[0];
        s_sum += l.ce * l.answer_tokens as f64;
        t_sum += t_ce * ex.answer.len() as f64;
        tok += l.answer_tokens;
    }
    Ok(serde_json::json!({
        "tasks": pool.examples.len().min(n),
        "answer_nll_refrag": s_sum / tok.max(1) as f64,
        "answer_nll_full_base": t_sum / tok.max(1) as f64,
    }))
}
