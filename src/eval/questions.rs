//! `eval --questions`: questions answered over an index and scored (EM, F1, whether the answer
//! contains a gold answer, recall@k of the gold documents, abstention on unanswerable ones,
//! latency), one JSON line per question where asked.

use crate::eval::metrics;
use crate::read::engine::{AskOptions, Engine};
use anyhow::{anyhow, Result};
use std::io::Write;

/// One question of `eval --questions`: `{"id","question","answers":[...],"gold_doc"?,"answerable"?}`.
pub struct Question {
    pub id: String,
    pub question: String,
    pub answers: Vec<String>,
    /// Ids of the documents that hold the answer (for recall@k).
    pub gold_docs: Vec<String>,
    pub answerable: bool,
}

/// One line of a questions file (`at`: file:line, named in errors).
pub fn parse(line: &str, at: &str) -> Result<Question> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| anyhow!("{at}: malformed JSON: {e}"))?;
    let question = v["question"]
        .as_str()
        .filter(|q| !q.trim().is_empty())
        .ok_or_else(|| anyhow!("{at}: missing \"question\""))?
        .to_string();
    let id = match &v["id"] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => at.to_string(),
    };
    let strings = |x: &serde_json::Value| -> Vec<String> {
        match x {
            serde_json::Value::String(s) => vec![s.clone()],
            serde_json::Value::Array(a) => a.iter().filter_map(|s| s.as_str().map(String::from)).collect(),
            _ => vec![],
        }
    };
    let answers = strings(&v["answers"]);
    let mut gold_docs = strings(&v["gold_doc"]);
    gold_docs.extend(strings(&v["gold_docs"]));
    let answerable = v["answerable"].as_bool().unwrap_or(true);
    Ok(Question { id, question, answers, gold_docs, answerable })
}

/// Where the per-question lines go.
#[derive(Default)]
pub struct Outputs<'a> {
    /// One JSON line per question (`--out`).
    pub answers: Option<&'a mut dyn Write>,
    /// With `retrieval_only`: each question with its retrieved passages as a task (`--tasks`).
    pub tasks: Option<&'a mut dyn Write>,
}

/// What the questions scored, summed as they are answered.
#[derive(Default)]
pub struct Tally {
    ems: Vec<f64>,
    f1s: Vec<f64>,
    contains: Vec<f64>,
    ttfts: Vec<f64>,
    tokens_per_s: Vec<f64>,
    retrieval_ms: Vec<f64>,
    positions: Vec<f64>,
    input_ms: Vec<f64>,
    /// Retrieval + TTFT + the later tokens: the time to the whole answer.
    answer_ms: Vec<f64>,
    generated: Vec<f64>,
    /// recall[r]: questions whose first gold document ranks within the top r.
    recall: Vec<usize>,
    with_gold: usize,
    unanswerable: usize,
    abstained_right: usize,
    top_k: usize,
    retrieval_only: bool,
}

/// Answer (or with `retrieval_only`, only retrieve for) each question; `tick` after each.
pub fn evaluate(
    engine: &Engine,
    questions: &[Question],
    opts: &AskOptions,
    retrieval_only: bool,
    out: Outputs,
    mut tick: impl FnMut(),
) -> Result<Tally> {
    let Outputs { answers: mut out, tasks: mut tasks_out } = out;
    let mut t = Tally { recall: vec![0; opts.top_k + 1], top_k: opts.top_k, retrieval_only, ..Default::default() };
    for q in questions {
        let (hits_ids, line) = if retrieval_only {
            let (hits, _, ms) = engine.retrieve(&q.question, opts.top_k, opts.search)?;
            t.retrieval_ms.push(ms);
            if let Some(w) = tasks_out.as_mut() {
                let passages =
                    hits.iter().map(|h| (h.passage.passage_id.clone().into(), h.passage.text.clone().into()));
                let answers: Vec<serde_json::Value> = q.answers.iter().map(|a| a.as_str().into()).collect();
                let task = crate::read::tasks::one_turn_task(
                    &q.id.as_str().into(),
                    &q.question.as_str().into(),
                    passages,
                    &answers,
                    q.answerable,
                );
                writeln!(w, "{task}")?;
            }
            let ids: Vec<String> = hits.iter().map(|h| h.passage.doc_id.clone()).collect();
            (ids.clone(), serde_json::json!({"id": q.id, "sources": ids, "retrieval_ms": ms}))
        } else {
            answer(engine, q, opts, &mut t)?
        };
        if !q.gold_docs.is_empty() {
            t.with_gold += 1;
            // A gold id matches a document id, or a file document's id without its extension.
            let is_gold = |d: &String| {
                let stem = std::path::Path::new(d).with_extension("");
                q.gold_docs.iter().any(|g| g == d || std::path::Path::new(g) == stem)
            };
            if let Some(rank) = hits_ids.iter().position(is_gold) {
                for r in t.recall.iter_mut().skip(rank + 1) {
                    *r += 1;
                }
            }
        }
        if let Some(o) = out.as_mut() {
            writeln!(o, "{line}")?;
        }
        tick();
    }
    Ok(t)
}

/// Answer one question and score it: its sources' document ids and its JSON line.
fn answer(engine: &Engine, q: &Question, opts: &AskOptions, t: &mut Tally) -> Result<(Vec<String>, serde_json::Value)> {
    let ans = engine.answer(&q.question, opts, |_| Ok(()))?;
    let gen = &ans.generation;
    let (em, f1) = metrics::best(&gen.text, &q.answers);
    let contains_gold = metrics::contains_any(&gen.text, &q.answers);
    if q.answerable && !q.answers.is_empty() {
        t.ems.push(em);
        t.f1s.push(f1);
        t.contains.push(contains_gold as u8 as f64);
    }
    if !q.answerable {
        t.unanswerable += 1;
        t.abstained_right += metrics::abstains(&gen.text) as usize;
    }
    t.ttfts.push(gen.ttft_ms());
    t.tokens_per_s.push(gen.tokens_per_s());
    t.retrieval_ms.push(ans.retrieval_ms);
    t.input_ms.push(ans.input_ms);
    let answer_ms = ans.total_ms();
    t.answer_ms.push(answer_ms);
    t.generated.push(gen.generated_tokens as f64);
    t.positions.push(gen.prompt_positions as f64);
    let ids: Vec<String> = ans.sources.iter().map(|s| s.doc_id.clone()).collect();
    let line = serde_json::json!({
        "id": q.id, "question": q.question, "answer": gen.text, "gold": q.answers,
        "em": em, "f1": f1, "contains_gold": contains_gold, "sources": ans.sources, "ttft_ms": gen.ttft_ms(),
        "tokens_per_s": gen.tokens_per_s(), "retrieval_ms": ans.retrieval_ms,
        "input_ms": ans.input_ms, "answer_ms": answer_ms, "generated_tokens": gen.generated_tokens,
        "decoder_positions": gen.prompt_positions, "context_tokens": ans.context_tokens,
        "chunks": ans.chunks, "expanded_chunks": ans.expanded_chunks,
    });
    Ok((ids, line))
}

impl Tally {
    /// The metrics, in the order the summary lists them, appended to `summary`.
    pub fn report(&self, summary: &mut serde_json::Map<String, serde_json::Value>) {
        let mean = metrics::mean;
        let answers = !self.retrieval_only;
        let recall_at =
            |k: usize| (self.with_gold > 0).then(|| self.recall[k.min(self.top_k)] as f64 / self.with_gold as f64);
        let share = (self.unanswerable > 0).then(|| self.abstained_right as f64 / self.unanswerable as f64);
        let mut fields: Vec<(&str, serde_json::Value)> = vec![
            ("exact_match", answers.then(|| mean(&self.ems)).into()),
            ("f1", answers.then(|| mean(&self.f1s)).into()),
            ("answer_contains_gold", answers.then(|| mean(&self.contains)).into()),
            ("scored", self.ems.len().into()),
            ("recall_at_1", recall_at(1).into()),
            ("recall_at_k", recall_at(self.top_k).into()),
            ("abstention_accuracy", share.into()),
            ("retrieval_ms_mean", mean(&self.retrieval_ms).into()),
        ];
        if answers {
            let (ttft_mean, ttft_median, ttft_p95) = metrics::summary(&self.ttfts);
            fields.extend([
                ("ttft_ms_mean", ttft_mean.into()),
                ("ttft_ms_median", ttft_median.into()),
                ("ttft_ms_p95", ttft_p95.into()),
                ("tokens_per_s_mean", mean(&self.tokens_per_s).into()),
                ("input_ms_mean", mean(&self.input_ms).into()),
                ("answer_ms_median", metrics::summary(&self.answer_ms).1.into()),
                ("generated_tokens_mean", mean(&self.generated).into()),
                ("decoder_positions_mean", mean(&self.positions).into()),
            ]);
        }
        for (k, v) in fields {
            summary.insert(k.to_string(), v);
        }
    }
}
