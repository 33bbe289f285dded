//! `eval answers`: how much of a compressed passage reaches the answer. Each task's reference
//! answer is scored (teacher forced) under six readings, from no passages to the passages as
//! tokens, with REFRAG reading its own passages, none and another task's as the controls.

use crate::model::compressor::Compressor;
use crate::model::decoder::Decoder;
use crate::options::QuestionAt;
use crate::read::score::answer_nll;
use crate::rng::Rng;
use crate::train::sft::{full_context_prompt, loss, QaExample};
use anyhow::{bail, Result};

/// The readings of [`answer_readings`], in its order.
pub const ANSWER_READINGS: [&str; 6] = [
    "none, base decoder", "full, base decoder", "full, adapted decoder", "refrag, no passages", "refrag, own passages",
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
    comp: &Compressor,
    at: QuestionAt,
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
        let compressed = |e: &QaExample, rng: &mut Rng| -> Result<f64> {
            Ok(loss(student, None, comp, at, &[e], 0.0, 0.0, rng)?.ce)
        };
        let values = [
            answer_nll(base, &[(full_context_prompt(&none, at), answer)])?[0],
            answer_nll(base, &[(full_context_prompt(ex, at), answer)])?[0],
            answer_nll(student, &[(full_context_prompt(ex, at), answer)])?[0],
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
