//! `refrag train sft`: teach the REFRAG reader to answer from compressed passages (the paper's
//! RAG fine-tuning), with two signals on the same answer positions:
//!
//! - supervised: cross-entropy of the reference answer (then `<|im_end|>`), read after the
//!   question and its passages as projected chunk vectors, exactly as `ask`/`eval` build the
//!   input ([`crate::read::prompt::rag`]);
//! - distillation: KL(teacher ‖ student), where the teacher is the same base decoder reading the
//!   passages as tokens (full context, no adapters: the product's `--mode full`). The student
//!   learns to read chunk vectors the way the decoder reads the text.
//!
//! With `--mixed P` a fraction P of the chunks is read as tokens (expanded), so answers hold
//! up when the policy expands some chunks. Tasks come in the `eval --conversations` format
//! (`refrag dataset squad|nq-oracle|mtrag --tasks`); a task's earlier turns are read as
//! `eval --conversations` reads them: each turn compressed into chunk vectors for the student,
//! as tokens for the teacher (the last [`MAX_HISTORY_TURNS`]).

use crate::model::compressor::{chunks, Compressor};
use crate::model::decoder::Decoder;
use crate::options::QuestionAt;
use crate::read::prompt::{self, Segment};
use crate::read::score::{answer_logits, answer_nll};
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use candle_core::{Tensor, D};
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
            let text = crate::index::corpus::read_text(f)?;
            for (n, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let at = format!("{}:{}", f.display(), n + 1);
                let t = crate::read::tasks::parse_task(line, &at)?;
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
                let mut answer =
                    prompt::tokenize(dec, &format!("{}<|im_end|>", answer.trim())).with_context(|| at.clone())?;
                answer.truncate(MAX_ANSWER_TOKENS);
                let turn = |text: &str| -> Result<Vec<u32>> {
                    let mut ids = prompt::tokenize(dec, text.trim()).with_context(|| at.clone())?;
                    ids.truncate(MAX_TURN_TOKENS);
                    Ok(ids)
                };
                let skip = t.turn.history.len().saturating_sub(MAX_HISTORY_TURNS);
                let history =
                    t.turn.history[skip..].iter().map(|(u, a)| Ok((turn(u)?, turn(a)?))).collect::<Result<Vec<_>>>()?;
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
    comp: &Compressor,
    at: QuestionAt,
    batch: &[&QaExample],
    distill: f64,
    mixed: f64,
    rng: &mut Rng,
) -> Result<SftLoss> {
    // Which chunks stay tokens (per task, per passage, per chunk: expanded?, its tokens), and
    // all compressed chunks of the batch, in order.
    type Plan<'a> = Vec<Vec<(bool, &'a [u32])>>;
    let k = comp.k;
    let mut plans: Vec<Plan> = Vec::new();
    let mut compressed: Vec<&[u32]> = Vec::new();
    for ex in batch {
        for (u, a) in &ex.history {
            compressed.extend(chunks(u, k));
            compressed.extend(chunks(a, k));
        }
        let mut per = Vec::new();
        for p in &ex.passages {
            let mut plan = Vec::new();
            for c in chunks(p, k) {
                let expand = mixed > 0.0 && rng.unit() < mixed;
                if !expand {
                    compressed.push(c);
                }
                plan.push((expand, c));
            }
            per.push(plan);
        }
        plans.push(per);
    }
    let projected = comp.encode(student, &compressed)?.map(|v| comp.project(&v)).transpose()?;
    crate::profile::mark(&student.device, "encode");
    let mut row = 0;
    let mut student_prompts = Vec::with_capacity(batch.len());
    for (ex, plan) in batch.iter().zip(&plans) {
        // Student: earlier turns compressed whole (as `eval --conversations` reads them),
        // passages as runs of projected chunks and expanded tokens.
        let mut history = Vec::new();
        for (u, a) in &ex.history {
            let mut turn = |ids: &[u32]| -> Result<Vec<Segment>> {
                let n = chunks(ids, k).count();
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
        student_prompts.push((task_prompt(ex, history, passages, at), ex.answer.as_slice()));
    }
    // One batched forward for the students, one for the teachers.
    crate::profile::mark(&student.device, "assemble");
    let s_logits = answer_logits(student, &student_prompts)?;
    crate::profile::mark(&student.device, "student");
    let t_logits = match (teacher, distill > 0.0) {
        (Some(t), true) => {
            let prompts: Vec<_> = batch.iter().map(|ex| (full_context_prompt(ex, at), ex.answer.as_slice())).collect();
            Some(answer_logits(t, &prompts)?)
        }
        _ => None,
    };
    crate::profile::mark(&student.device, "teacher");
    let (mut terms, mut ce_sum, mut kl_sum, mut ntok) = (Vec::new(), 0f64, 0f64, 0usize);
    for (i, ex) in batch.iter().enumerate() {
        let n = ex.answer.len();
        let tgt = Tensor::from_vec(ex.answer.clone(), n, &student.device)?;
        let ce = crate::model::diffops::cross_entropy(&s_logits[i], &tgt)?;
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
    question_at: QuestionAt,
}

impl<'a> EncodedTask<'a> {
    pub fn new(dec: &Decoder, comp: &Compressor, at: QuestionAt, ex: &'a QaExample) -> Result<Self> {
        let k = comp.k;
        let mut all: Vec<&[u32]> = Vec::new();
        let mut turn_sizes = Vec::new();
        for (u, a) in &ex.history {
            for t in [u, a] {
                let before = all.len();
                all.extend(chunks(t, k));
                turn_sizes.push(all.len() - before);
            }
        }
        let first_passage = all.len();
        let mut sizes = Vec::with_capacity(ex.passages.len());
        for p in &ex.passages {
            let before = all.len();
            all.extend(chunks(p, k));
            sizes.push(all.len() - before);
        }
        if all.len() == first_passage {
            bail!("a task with no passage chunks");
        }
        let vecs = comp.encode(dec, &all)?.context("a task with no chunks")?;
        let projected_all = comp.project(&vecs)?;
        let mut row = 0;
        let mut turns = Vec::new();
        for n in turn_sizes {
            turns.push(if n == 0 {
                vec![Segment::Tokens(vec![])]
            } else {
                vec![Segment::Embeds(projected_all.narrow(0, row, n)?)]
            });
            row += n;
        }
        let mut it = turns.into_iter();
        let history = std::iter::from_fn(|| Some((it.next()?, it.next()?))).collect();
        let n = all.len() - first_passage;
        Ok(Self {
            ex,
            raw: vecs.narrow(0, first_passage, n)?,
            sizes,
            projected: projected_all.narrow(0, first_passage, n)?,
            history,
            question_at: at,
        })
    }

    /// The reader's prompt with the passage chunks marked in `expand` read as tokens.
    pub fn prompt(&self, k: usize, expand: &[bool]) -> Result<Vec<Segment>> {
        let tokens: Vec<&[u32]> = self.ex.passages.iter().map(Vec::as_slice).collect();
        let passages = crate::read::policy::mixed_segments(&tokens, k, expand, Some(&self.projected))?;
        Ok(task_prompt(self.ex, self.history.clone(), passages, self.question_at))
    }
}

/// The teacher's prompt: earlier turns and passages read as tokens.
pub fn full_context_prompt(ex: &QaExample, at: QuestionAt) -> Vec<Segment> {
    let full: Vec<Vec<Segment>> = ex.passages.iter().map(|p| vec![Segment::Tokens(p.clone())]).collect();
    let history =
        ex.history.iter().map(|(u, a)| (vec![Segment::Tokens(u.clone())], vec![Segment::Tokens(a.clone())])).collect();
    task_prompt(ex, history, full, at)
}

/// A task's prompt as `eval --conversations` builds it: system, earlier turns, then the
/// passages and the question (a plain RAG chat when there are no earlier turns).
fn task_prompt(
    ex: &QaExample,
    history: Vec<(Vec<Segment>, Vec<Segment>)>,
    passages: Vec<Vec<Segment>>,
    at: QuestionAt,
) -> Vec<Segment> {
    let system = prompt::system_for(!passages.is_empty() || !history.is_empty());
    prompt::conversation(system, history, prompt::rag_user(&ex.question, passages, at))
}

/// Held-out answer NLL (nats/token, no expansion) read compressed by the student and, for
/// reference, as full tokens by the teacher; over the first `n` tasks.
pub fn heldout_nll(
    student: &Decoder,
    teacher: &Decoder,
    comp: &Compressor,
    at: QuestionAt,
    pool: &QaPool,
    n: usize,
) -> Result<serde_json::Value> {
    let mut rng = Rng(0);
    let (mut s_sum, mut t_sum, mut tok) = (0f64, 0f64, 0usize);
    for ex in pool.examples.iter().take(n) {
        let l = loss(student, None, comp, at, &[ex], 0.0, 0.0, &mut rng)?;
        let t_ce = answer_nll(teacher, &[(full_context_prompt(ex, at), ex.answer.as_slice())])?[0];
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
