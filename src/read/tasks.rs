//! Tasks in the MTRAG format that `eval --conversations` reads, `train sft --qa` learns from
//! and `dataset --tasks` writes: a conversation ending with the user's question, its passages,
//! the reference answers and whether it is answerable.

use crate::read::reader::GivenTurn;
use anyhow::{anyhow, bail, Result};

/// One MTRAG-style task (`eval --conversations`, `train sft --qa`, `dataset --tasks`): the conversation so far (ending with the user's question), the
/// passages, the reference answer and whether it is answerable.
pub struct GivenTask {
    pub id: String,
    pub turn: GivenTurn,
    pub targets: Vec<String>,
    pub unanswerable: bool,
}

/// A one-turn task in the format [`parse_task`] reads: the question, its passages as
/// (document id, text), the reference answers. What `dataset --tasks` and `eval --tasks` write.
pub fn one_turn_task(
    id: &serde_json::Value,
    question: &serde_json::Value,
    passages: impl IntoIterator<Item = (serde_json::Value, serde_json::Value)>,
    answers: &[serde_json::Value],
    answerable: bool,
) -> serde_json::Value {
    let contexts: Vec<_> =
        passages.into_iter().map(|(id, text)| serde_json::json!({"document_id": id, "text": text})).collect();
    let targets: Vec<_> = answers.iter().map(|a| serde_json::json!({"text": a})).collect();
    serde_json::json!({"task_id": id, "input": [{"speaker": "user", "text": question}], "contexts": contexts,
        "targets": targets, "answerability": if answerable { "ANSWERABLE" } else { "UNANSWERABLE" }})
}

pub fn parse_task(line: &str, at: &str) -> Result<GivenTask> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| anyhow!("{at}: malformed JSON: {e}"))?;
    let turns = v["input"].as_array().ok_or_else(|| anyhow!("{at}: missing \"input\" (the conversation)"))?;
    let mut history = Vec::new();
    let mut pending: Option<String> = None;
    for t in turns {
        let text = t["text"].as_str().unwrap_or_default().to_string();
        match t["speaker"].as_str() {
            Some("user") => {
                if let Some(u) = pending.replace(text) {
                    history.push((u, String::new()));
                }
            }
            Some("agent") => history.push((pending.take().unwrap_or_default(), text)),
            other => bail!("{at}: speaker {other:?}, expected user or agent"),
        }
    }
    let question = pending
        .filter(|q| !q.trim().is_empty())
        .ok_or_else(|| anyhow!("{at}: the conversation does not end with a user turn"))?;
    let texts = |x: &serde_json::Value| -> Vec<String> {
        x.as_array().into_iter().flatten().filter_map(|c| c["text"].as_str().map(String::from)).collect()
    };
    let id = v["task_id"].as_str().or(v["id"].as_str()).unwrap_or(at).to_string();
    let unanswerable = v["answerability"].to_string().contains("UNANSWERABLE");
    Ok(GivenTask {
        id,
        turn: GivenTurn { history, passages: texts(&v["contexts"]), question },
        targets: texts(&v["targets"]),
        unanswerable,
    })
}
