//! `eval --conversations`: the last user turn of each MTRAG-format task, answered with its given
//! passages and the earlier turns (compressed in refrag mode, cut to the window in full), and
//! scored (F1, EM, contains on answerable turns; abstention on unanswerable ones; what fit the
//! window), one JSON line per task where asked.

use crate::eval::metrics;
use crate::options::Mode;
use crate::read::generate::SamplingOptions;
use crate::read::reader::{answer_given, Reader};
use crate::read::tasks::GivenTask;
use anyhow::Result;
use std::io::Write;

/// What the tasks scored, summed as they are answered.
#[derive(Default)]
pub struct Tally {
    f1s: Vec<f64>,
    ems: Vec<f64>,
    contains: Vec<f64>,
    ttfts: Vec<f64>,
    positions: Vec<f64>,
    history_kept: usize,
    history_total: usize,
    passages_kept: usize,
    passages_total: usize,
    unanswerable: usize,
    abstained_right: usize,
    false_abstentions: usize,
    /// Chunks read as tokens by the expansion policy, over all tasks.
    pub chunks_expanded: usize,
}

/// Answer each task's last turn as `reader` reads in `mode`, within `window` positions; one JSON
/// line per task to `out`; `tick` after each.
pub fn evaluate(
    reader: &Reader,
    mode: Mode,
    tasks: &[GivenTask],
    window: usize,
    sampling: &SamplingOptions,
    mut out: Option<&mut dyn Write>,
    mut tick: impl FnMut(),
) -> Result<Tally> {
    let mut t = Tally::default();
    for task in tasks {
        let r = answer_given(reader, mode, &task.turn, window, sampling)?;
        let answer = &r.generation.text;
        let (em, f1) = metrics::best(answer, &task.targets);
        let contains = metrics::contains_any(answer, &task.targets);
        let abstained = metrics::abstains(answer);
        if task.unanswerable {
            t.unanswerable += 1;
            t.abstained_right += usize::from(abstained);
        } else {
            t.f1s.push(f1);
            t.ems.push(em);
            t.contains.push(f64::from(u8::from(contains)));
            t.false_abstentions += usize::from(abstained);
        }
        t.ttfts.push(r.generation.ttft_ms());
        t.positions.push(r.generation.prompt_positions as f64);
        t.history_kept += r.history_kept;
        t.history_total += task.turn.history.len();
        t.passages_kept += r.passages_kept;
        t.chunks_expanded += r.chunks_expanded;
        t.passages_total += if mode == Mode::None { 0 } else { task.turn.passages.len() };
        if let Some(o) = out.as_mut() {
            let line = serde_json::json!({"id": task.id, "answer": answer, "f1": f1, "em": em, "contains_gold": contains,
                "unanswerable": task.unanswerable, "abstained": abstained, "ttft_ms": r.generation.ttft_ms(),
                "decoder_positions": r.generation.prompt_positions, "history_turns_kept": r.history_kept,
                "history_turns": task.turn.history.len(), "passages_kept": r.passages_kept,
                "expanded_chunks": r.chunks_expanded});
            writeln!(o, "{line}")?;
        }
        tick();
    }
    Ok(t)
}

impl Tally {
    /// The metrics, in the order the summary lists them, appended to `summary`.
    pub fn report(&self, summary: &mut serde_json::Map<String, serde_json::Value>) {
        let mean = metrics::mean;
        let (ttft_mean, ttft_median, ttft_p95) = metrics::summary(&self.ttfts);
        let share = |a: usize, b: usize| (b > 0).then(|| a as f64 / b as f64);
        let fields: [(&str, serde_json::Value); 13] = [
            ("f1_answerable", mean(&self.f1s).into()),
            ("em_answerable", mean(&self.ems).into()),
            ("contains_gold_answerable", mean(&self.contains).into()),
            ("answerable", self.f1s.len().into()),
            ("abstention_unanswerable", share(self.abstained_right, self.unanswerable).into()),
            ("unanswerable", self.unanswerable.into()),
            ("false_abstention", share(self.false_abstentions, self.f1s.len()).into()),
            ("history_turns_kept", share(self.history_kept, self.history_total).into()),
            ("passages_kept", share(self.passages_kept, self.passages_total).into()),
            ("ttft_ms_mean", ttft_mean.into()),
            ("ttft_ms_median", ttft_median.into()),
            ("ttft_ms_p95", ttft_p95.into()),
            ("decoder_positions_mean", mean(&self.positions).into()),
        ];
        for (k, v) in fields {
            summary.insert(k.to_string(), v);
        }
    }
}
