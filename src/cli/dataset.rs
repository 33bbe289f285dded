//! `refrag dataset squad|nq-oracle FILE --corpus OUT.jsonl --questions OUT.jsonl`: turn the
//! public benchmark files into refrag's corpus and question formats (gold passage ids kept), so
//! anyone can reproduce the figures.

use super::Global;
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Kind {
    /// SQuAD v1.1/v2.0 JSON: one document per paragraph ("{title}-{n}").
    Squad,
    /// NQ-open oracle JSONL(.gz): one document per gold passage ("nq-{line}").
    NqOracle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Split {
    All,
    Train,
    Test,
}

/// Which part a group (article title, question) falls in: a stable hash, not the file order.
fn in_split(group: &str, split: Split, test_share: f64) -> bool {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(group.as_bytes());
    let u = u64::from_le_bytes(d[..8].try_into().unwrap()) as f64 / u64::MAX as f64;
    match split {
        Split::All => true,
        Split::Test => u < test_share,
        Split::Train => u >= test_share,
    }
}

#[derive(Args, Debug)]
pub struct DatasetArgs {
    #[arg(value_enum)]
    pub kind: Kind,
    /// Input file (.json, .jsonl or .jsonl.gz).
    pub file: PathBuf,
    #[arg(long, env = "REFRAG_DATASET_CORPUS")]
    pub corpus: Option<PathBuf>,
    #[arg(long, env = "REFRAG_DATASET_QUESTIONS")]
    pub questions: Option<PathBuf>,
    /// Also write each question with its gold passage as a one-turn task (the format of
    /// `eval --conversations` and `train sft --qa`): answering from given passages, no index.
    #[arg(long, value_name = "OUT.jsonl")]
    pub tasks: Option<PathBuf>,
    /// Keep only one part: `train` or `test`, cut by a stable hash of the SQuAD article title
    /// (whole articles) or of the NQ question, so training never sees a test article.
    #[arg(long, value_enum, default_value = "all")]
    pub split: Split,
    /// Share of articles/questions that go to the test part.
    #[arg(long, default_value_t = 0.3)]
    pub test_share: f64,
    /// In --tasks, add this many other passages (same article for SQuAD, random for NQ) around
    /// the gold one, at a random place: reading with distractors, like top-(N+1) retrieval.
    #[arg(long, default_value_t = 0)]
    pub distractors: usize,
    /// Print the summary as JSON.
    #[arg(long, env = "REFRAG_JSON")]
    pub json: bool,
}

fn read_all(p: &PathBuf) -> Result<String> {
    let f = std::fs::File::open(p).with_context(|| format!("{}", p.display()))?;
    let mut s = String::new();
    if p.extension().is_some_and(|e| e == "gz") {
        flate2::read::GzDecoder::new(f).read_to_string(&mut s)
    } else {
        std::io::BufReader::new(f).read_to_string(&mut s)
    }
    .with_context(|| format!("{}: not UTF-8 text (or a broken gzip stream)", p.display()))?;
    Ok(s)
}

pub fn run(_g: &Global, a: DatasetArgs) -> Result<ExitCode> {
    if a.corpus.is_none() && a.questions.is_none() && a.tasks.is_none() {
        bail!("give at least one of --corpus, --questions, --tasks");
    }
    if !(0.0..=1.0).contains(&a.test_share) {
        bail!("--test-share {}: must be between 0 and 1", a.test_share);
    }
    let text = read_all(&a.file)?;
    let name = a.file.display().to_string();
    let mut docs = Vec::new();
    let mut qs = Vec::new();
    match a.kind {
        Kind::Squad => {
            let v: Value = serde_json::from_str(&text).map_err(|e| anyhow!("{name}: not SQuAD JSON: {e}"))?;
            let arts = v["data"].as_array().ok_or_else(|| anyhow!("{name}: no \"data\" array"))?;
            for art in arts {
                let title = art["title"].as_str().unwrap_or("").replace('_', " ");
                if !in_split(&title, a.split, a.test_share) {
                    continue;
                }
                for (i, p) in art["paragraphs"].as_array().into_iter().flatten().enumerate() {
                    let id = format!("{}-{}", title.replace(' ', "_"), i + 1);
                    docs.push(json!({"id": id, "title": title, "text": p["context"]}));
                    for q in p["qas"].as_array().into_iter().flatten() {
                        let answers: Vec<&str> = q["answers"].as_array().into_iter().flatten()
                            .filter_map(|a| a["text"].as_str()).collect();
                        let mut uniq: Vec<&str> = Vec::new();
                        for x in answers { if !uniq.contains(&x) { uniq.push(x); } }
                        let impossible = q["is_impossible"].as_bool().unwrap_or(false);
                        qs.push(json!({"id": q["id"], "question": q["question"], "answers": uniq,
                                       "gold_doc": id, "answerable": !impossible}));
                    }
                }
            }
        }
        Kind::NqOracle => {
            for (n, line) in text.lines().enumerate() {
                if line.trim().is_empty() { continue; }
                let v: Value = serde_json::from_str(line).map_err(|e| anyhow!("{name}:{}: malformed JSON: {e}", n + 1))?;
                let id = format!("nq-{}", n + 1);
                if !in_split(v["question"].as_str().unwrap_or(&id), a.split, a.test_share) {
                    continue;
                }
                let ctx = v["ctxs"].as_array().and_then(|c| c.iter().find(|x| x["isgold"].as_bool() == Some(true)).or(c.first()))
                    .ok_or_else(|| anyhow!("{name}:{}: no ctxs", n + 1))?;
                docs.push(json!({"id": id, "title": ctx["title"], "text": ctx["text"]}));
                qs.push(json!({"id": id, "question": v["question"], "answers": v["answers"], "gold_doc": id}));
            }
        }
    }
    if docs.is_empty() && a.split != Split::All {
        let part = if a.split == Split::Train { "train" } else { "test" };
        bail!("{name}: no documents in the {part} part (--test-share {})", a.test_share);
    }
    if docs.is_empty() {
        bail!("{name}: no documents found");
    }
    let write = |p: &PathBuf, rows: &[Value]| -> Result<()> {
        let mut w = std::io::BufWriter::new(std::fs::File::create(p).with_context(|| format!("{}: cannot create", p.display()))?);
        for r in rows { writeln!(w, "{r}")?; }
        w.flush()?;
        Ok(())
    };
    let tasks = a.tasks.as_ref().map(|_| tasks_of(&docs, &qs, a.distractors));
    for (p, rows) in [(&a.corpus, &docs), (&a.questions, &qs)] {
        if let Some(p) = p {
            write(p, rows)?;
        }
    }
    if let (Some(p), Some(t)) = (&a.tasks, &tasks) {
        write(p, t)?;
    }
    if a.json {
        outln!("{}", serde_json::json!({"documents": docs.len(), "corpus": a.corpus, "questions": qs.len(),
            "questions_file": a.questions, "tasks_file": a.tasks}));
    } else {
        let to = |p: &Option<PathBuf>| p.as_ref().map(|p| format!(" -> {}", p.display())).unwrap_or_default();
        outln!("{} documents{}, {} questions{}{}", docs.len(), to(&a.corpus), qs.len(), to(&a.questions),
            a.tasks.as_ref().map(|p| format!(", tasks -> {}", p.display())).unwrap_or_default());
    }
    Ok(ExitCode::SUCCESS)
}

/// One-turn tasks (`eval --conversations`, `train sft --qa`): the question, its gold passage and
/// `distractors` others (for SQuAD from the same article: ids share the title prefix), in an
/// order fixed by the question id.
fn tasks_of(docs: &[Value], qs: &[Value], distractors: usize) -> Vec<Value> {
    use sha2::{Digest, Sha256};
    let text: std::collections::HashMap<&str, &Value> = docs.iter().filter_map(|d| Some((d["id"].as_str()?, &d["text"]))).collect();
    let ids: Vec<&str> = docs.iter().filter_map(|d| d["id"].as_str()).collect();
    let group = |id: &str| id.rsplit_once('-').map_or(id, |(g, _)| g).to_string();
    qs.iter()
        .filter_map(|q| {
            let gold = q["gold_doc"].as_str()?;
            let seed = Sha256::digest(q["id"].to_string().as_bytes());
            let mut r = crate::train::Rng(u64::from_le_bytes(seed[..8].try_into().unwrap()));
            // Same-group passages first (SQuAD article), else any.
            let same: Vec<&str> = ids.iter().copied().filter(|i| *i != gold && group(i) == group(gold) && !gold.starts_with("nq-")).collect();
            let pool: Vec<&str> = if same.len() >= distractors { same } else { ids.iter().copied().filter(|i| *i != gold).collect() };
            let mut pool = pool;
            let mut picked = Vec::new();
            while picked.len() < distractors && !pool.is_empty() {
                picked.push(pool.swap_remove(r.below(pool.len())));
            }
            picked.insert(r.below(picked.len() + 1), gold);
            let contexts: Vec<Value> = picked.iter().map(|i| json!({"document_id": i, "text": text.get(i).copied().cloned().unwrap_or(Value::Null)})).collect();
            let targets: Vec<Value> = q["answers"].as_array().into_iter().flatten().map(|a| json!({"text": a})).collect();
            Some(json!({"task_id": q["id"], "input": [{"speaker": "user", "text": q["question"]}],
                        "contexts": contexts, "targets": targets,
                        "answerability": if q["answerable"].as_bool() == Some(false) { "UNANSWERABLE" } else { "ANSWERABLE" }}))
        })
        .collect()
}
