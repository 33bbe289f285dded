//! `refrag dataset squad|nq-oracle|hotpot|mtrag FILE --corpus OUT.jsonl --questions OUT.jsonl`: turn the
//! public benchmark files into refrag's corpus and question formats (gold passage ids kept), so
//! anyone can reproduce the figures. `dataset cloze TEXT` makes fill-in-the-blank questions from
//! plain text (unlabelled training data for reading facts out of passages).

use super::Global;
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Kind {
    /// SQuAD v1.1/v2.0 JSON: one document per paragraph ("{title}-{n}").
    Squad,
    /// NQ-open oracle JSONL(.gz): one document per gold passage ("nq-{line}").
    NqOracle,
    /// HotpotQA: the official JSON (context [title, sentences], supporting facts: gold
    /// titles) or the dev300 form ({"id","question","answers","document"} with paragraphs
    /// "Title. text" joined by blank lines); one document per paragraph title.
    Hotpot,
    /// MTRAG generation tasks (JSONL): the pooled reference passages as the corpus, the last
    /// user turn as the question (gold: its passages), the tasks themselves for --tasks.
    Mtrag,
    /// Plain text (blank-line separated paragraphs; a short first line is the title): one
    /// fill-in-the-blank question per paragraph, a sentence of it with a name or number blanked
    /// out ("Fill in the blank: ... ____ ..."), the blanked words as the answer.
    Cloze,
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
    #[arg(long, value_name = "OUT.jsonl", env = "REFRAG_DATASET_TASKS")]
    pub tasks: Option<PathBuf>,
    /// Keep only one part: `train` or `test`, cut by a stable hash of the SQuAD article title
    /// (whole articles) or of the NQ question, so training never sees a test article.
    #[arg(long, value_enum, default_value = "all", env = "REFRAG_DATASET_SPLIT")]
    pub split: Split,
    /// Share of articles/questions that go to the test part.
    #[arg(long, default_value_t = 0.3, env = "REFRAG_DATASET_TEST_SHARE")]
    pub test_share: f64,
    /// In --tasks, add this many other passages (same article for SQuAD, random for NQ) around
    /// the gold one, at a random place: reading with distractors, like top-(N+1) retrieval.
    #[arg(long, default_value_t = 0, env = "REFRAG_DATASET_DISTRACTORS")]
    pub distractors: usize,
    /// Print the summary as JSON.
    #[arg(long, env = "REFRAG_JSON")]
    pub json: bool,
}

pub fn run(_g: &Global, a: DatasetArgs) -> Result<ExitCode> {
    if a.corpus.is_none() && a.questions.is_none() && a.tasks.is_none() {
        bail!("give at least one of --corpus, --questions, --tasks");
    }
    if !(0.0..=1.0).contains(&a.test_share) {
        bail!("--test-share {}: must be between 0 and 1", a.test_share);
    }
    let text = crate::index::corpus::read_text_gz(&a.file)?;
    let name = a.file.display().to_string();
    // Datasets that come as tasks already (MTRAG) keep them as they are.
    let (docs, qs, mut given_tasks): Imported = match a.kind {
        Kind::Hotpot => hotpot(&text, &name, &a)?,
        Kind::Mtrag => mtrag(&text, &name, &a)?,
        Kind::Cloze => {
            let (d, q) = cloze(&text, &a);
            (d, q, None)
        }
        Kind::Squad => squad(&text, &name, &a)?,
        Kind::NqOracle => nq_oracle(&text, &name, &a)?,
    };
    if docs.is_empty() && a.split != Split::All {
        let part = if a.split == Split::Train { "train" } else { "test" };
        bail!("{name}: no documents in the {part} part (--test-share {})", a.test_share);
    }
    if docs.is_empty() {
        bail!("{name}: no documents found");
    }
    let write = |p: &PathBuf, rows: &[Value]| -> Result<()> {
        let mut w = std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("{}: cannot create", p.display()))?,
        );
        for r in rows {
            writeln!(w, "{r}")?;
        }
        w.flush()?;
        Ok(())
    };
    let tasks = a.tasks.as_ref().map(|_| given_tasks.take().unwrap_or_else(|| tasks_of(&docs, &qs, a.distractors)));
    for (p, rows) in [(&a.corpus, &docs), (&a.questions, &qs)] {
        if let Some(p) = p {
            write(p, rows)?;
        }
    }
    if let (Some(p), Some(t)) = (&a.tasks, &tasks) {
        write(p, t)?;
    }
    if a.json {
        outln!(
            "{}",
            serde_json::json!({"documents": docs.len(), "corpus": a.corpus, "questions": qs.len(),
            "questions_file": a.questions, "tasks_file": a.tasks})
        );
    } else {
        let to = |p: &Option<PathBuf>| p.as_ref().map(|p| format!(" -> {}", p.display())).unwrap_or_default();
        outln!(
            "{} documents{}, {} questions{}{}",
            docs.len(),
            to(&a.corpus),
            qs.len(),
            to(&a.questions),
            a.tasks.as_ref().map(|p| format!(", tasks -> {}", p.display())).unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

type Imported = (Vec<Value>, Vec<Value>, Option<Vec<Value>>);

/// SQuAD JSON: each paragraph a document, each question with its paragraph as the gold one
/// (answers deduplicated; SQuAD 2.0's impossible questions marked unanswerable).
fn squad(text: &str, name: &str, a: &DatasetArgs) -> Result<Imported> {
    let (mut docs, mut qs) = (Vec::new(), Vec::new());
    let v: Value = serde_json::from_str(text).map_err(|e| anyhow!("{name}: not SQuAD JSON: {e}"))?;
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
                let answers: Vec<&str> =
                    q["answers"].as_array().into_iter().flatten().filter_map(|a| a["text"].as_str()).collect();
                let mut uniq: Vec<&str> = Vec::new();
                for x in answers {
                    if !uniq.contains(&x) {
                        uniq.push(x);
                    }
                }
                let impossible = q["is_impossible"].as_bool().unwrap_or(false);
                qs.push(json!({"id": q["id"], "question": q["question"], "answers": uniq,
                               "gold_doc": id, "answerable": !impossible}));
            }
        }
    }
    Ok((docs, qs, None))
}

/// NQ-open oracle JSONL: each question with its gold passage (the first one when none is
/// marked) as a document.
fn nq_oracle(text: &str, name: &str, a: &DatasetArgs) -> Result<Imported> {
    let (mut docs, mut qs) = (Vec::new(), Vec::new());
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| anyhow!("{name}:{}: malformed JSON: {e}", n + 1))?;
        let id = format!("nq-{}", n + 1);
        if !in_split(v["question"].as_str().unwrap_or(&id), a.split, a.test_share) {
            continue;
        }
        let ctx = v["ctxs"]
            .as_array()
            .and_then(|c| c.iter().find(|x| x["isgold"].as_bool() == Some(true)).or(c.first()))
            .ok_or_else(|| anyhow!("{name}:{}: no ctxs", n + 1))?;
        docs.push(json!({"id": id, "title": ctx["title"], "text": ctx["text"]}));
        qs.push(json!({"id": id, "question": v["question"], "answers": v["answers"], "gold_doc": id}));
    }
    Ok((docs, qs, None))
}

/// The blank in a cloze question.
pub const BLANK: &str = "____";

/// Fill-in-the-blank questions from plain text: paragraphs of 30-300 words (a block's short
/// first line without a full stop is its title), in each one sentence of 8-40 words, in it a
/// number or a run of up to 4 capitalised words (not the sentence's first word, not found
/// elsewhere in the sentence) blanked. Which sentence and span: fixed by the paragraph's id.
fn cloze(text: &str, a: &DatasetArgs) -> (Vec<Value>, Vec<Value>) {
    use sha2::{Digest, Sha256};
    let stem = a.file.file_stem().map(|s| s.to_string_lossy().replace(['-', ' '], "_")).unwrap_or_default();
    let (mut docs, mut qs) = (Vec::new(), Vec::new());
    for (n, block) in text.replace("\r\n", "\n").split("\n\n").enumerate() {
        let lines: Vec<&str> = block.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        let Some(first) = lines.first() else { continue };
        let titled = lines.len() > 1
            && first.split_whitespace().count() <= 12
            && !first.ends_with(['.', '?', '!', ':', ';', ',']);
        let (title, body) =
            if titled { (first.to_string(), lines[1..].join(" ")) } else { (String::new(), lines.join(" ")) };
        let words = body.split_whitespace().count();
        if !(30..=300).contains(&words) {
            continue;
        }
        let id = format!("{stem}-{}", n + 1);
        if !in_split(&id, a.split, a.test_share) {
            continue;
        }
        let seed = Sha256::digest(id.as_bytes());
        let mut r = crate::rng::Rng(u64::from_le_bytes(seed[..8].try_into().unwrap()));
        let mut picks: Vec<(String, String)> =
            sentences(&body).into_iter().filter_map(|s| blank_one(s, &mut r)).collect();
        if picks.is_empty() {
            continue;
        }
        let (question, answer) = picks.swap_remove(r.below(picks.len()));
        qs.push(json!({"id": format!("cloze-{id}"), "question": format!("Fill in the blank: {question}"), "answers": [answer], "gold_doc": id}));
        docs.push(json!({"id": id, "title": title, "text": body}));
    }
    (docs, qs)
}

/// Sentences: cut after '.', '?' or '!' followed by a space and a capital letter or a digit.
fn sentences(body: &str) -> Vec<&str> {
    let b = body.as_bytes();
    let (mut out, mut start) = (Vec::new(), 0);
    for i in 1..b.len().saturating_sub(1) {
        if matches!(b[i - 1], b'.' | b'?' | b'!')
            && b[i] == b' '
            && (b[i + 1].is_ascii_uppercase() || b[i + 1].is_ascii_digit())
        {
            out.push(body[start..i].trim());
            start = i + 1;
        }
    }
    out.push(body[start..].trim());
    out
}

/// One sentence with one span blanked: (sentence with the blank, the span), or None when it has
/// no eligible span or is too short or too long.
fn blank_one(sentence: &str, r: &mut crate::rng::Rng) -> Option<(String, String)> {
    let words: Vec<&str> = sentence.split_whitespace().collect();
    if !(8..=40).contains(&words.len()) {
        return None;
    }
    let core = |w: &str| w.trim_matches(|c: char| !c.is_alphanumeric()).to_string();
    let capital = |w: &str| core(w).chars().next().is_some_and(char::is_uppercase);
    let number = |w: &str| core(w).chars().any(|c| c.is_ascii_digit());
    let mut spans = Vec::new(); // [i, j) word ranges
    let mut i = 1;
    while i < words.len() {
        if number(words[i]) {
            spans.push((i, i + 1));
            i += 1;
        } else if capital(words[i]) {
            let mut j = i + 1;
            while j < words.len()
                && j - i < 4
                && capital(words[j])
                && !number(words[j])
                && !words[j - 1].ends_with([',', ';', ':', '.'])
            {
                j += 1;
            }
            spans.push((i, j));
            i = j;
        } else {
            i += 1;
        }
    }
    spans.retain(|&(i, j)| {
        let ans: Vec<String> = words[i..j].iter().map(|w| core(w)).collect();
        let ans = ans.join(" ");
        let rest: Vec<String> = words[..i].iter().chain(&words[j..]).map(|w| core(w).to_lowercase()).collect();
        ans.chars().count() >= 2 && !ans.split(' ').any(|a| rest.contains(&a.to_lowercase()))
    });
    if spans.is_empty() {
        return None;
    }
    let (i, j) = spans[r.below(spans.len())];
    // keep the punctuation around the span outside the blank
    let lead: String = words[i].chars().take_while(|c| !c.is_alphanumeric()).collect();
    let trail: String = {
        let t: Vec<char> = words[j - 1].chars().rev().take_while(|c| !c.is_alphanumeric()).collect();
        t.into_iter().rev().collect()
    };
    let span = words[i..j].join(" ");
    let answer = span[lead.len()..span.len() - trail.len()].to_string();
    let mut out: Vec<String> = words[..i].iter().map(|w| w.to_string()).collect();
    out.push(format!("{lead}{BLANK}{trail}"));
    out.extend(words[j..].iter().map(|w| w.to_string()));
    Some((out.join(" "), answer))
}

/// HotpotQA in either form: documents by paragraph title (first occurrence kept), questions
/// with their answers and, where the file has supporting facts, the gold titles. Tasks hold
/// each question's own paragraphs (gold and distractors, in the file's order).
fn hotpot(text: &str, name: &str, a: &DatasetArgs) -> Result<Imported> {
    let v: Value = serde_json::from_str(text).map_err(|e| anyhow!("{name}: not HotpotQA JSON: {e}"))?;
    let rows = v.as_array().ok_or_else(|| anyhow!("{name}: expected a JSON array of questions"))?;
    let mut seen = std::collections::HashSet::new();
    let (mut docs, mut qs, mut tasks) = (Vec::new(), Vec::new(), Vec::new());
    for (n, r) in rows.iter().enumerate() {
        let question = r["question"].as_str().ok_or_else(|| anyhow!("{name}: record {n} has no \"question\""))?;
        let id = r["_id"]
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| format!("hotpot-{}", r["id"].as_i64().unwrap_or(n as i64)));
        if !in_split(&id, a.split, a.test_share) {
            continue;
        }
        // (title, text) paragraphs of this question
        let paras: Vec<(String, String)> = if let Some(ctx) = r["context"].as_array() {
            ctx.iter()
                .filter_map(|c| {
                    let title = c[0].as_str()?.to_string();
                    let sents: Vec<&str> = c[1].as_array()?.iter().filter_map(|x| x.as_str()).collect();
                    Some((title, sents.concat().trim().to_string()))
                })
                .collect()
        } else if let Some(doc) = r["document"].as_str() {
            doc.split("\n\n")
                .filter(|p| !p.trim().is_empty())
                .map(|p| match p.split_once(". ") {
                    Some((t, rest)) => (t.trim().to_string(), rest.trim().to_string()),
                    None => (String::new(), p.trim().to_string()),
                })
                .collect()
        } else {
            bail!("{name}: record {n} has neither \"context\" nor \"document\"");
        };
        for (t, body) in &paras {
            if seen.insert(t.clone()) {
                docs.push(json!({"id": t, "title": t, "text": body}));
            }
        }
        let answers: Vec<Value> = match (&r["answers"], &r["answer"]) {
            (Value::Array(xs), _) => xs.clone(),
            (_, Value::String(x)) => vec![json!(x)],
            _ => vec![],
        };
        let mut gold: Vec<&str> =
            r["supporting_facts"].as_array().into_iter().flatten().filter_map(|f| f[0].as_str()).collect();
        gold.dedup();
        qs.push(json!({"id": id, "question": question, "answers": answers, "gold_docs": gold}));
        let passages = paras.iter().map(|(t, b)| (json!(t), json!(format!("{t}. {b}"))));
        tasks.push(crate::read::tasks::one_turn_task(&json!(id), &json!(question), passages, &answers, true));
    }
    Ok((docs, qs, Some(tasks)))
}

/// MTRAG generation tasks: passages pooled by document id, the last user turn as a question.
fn mtrag(text: &str, name: &str, a: &DatasetArgs) -> Result<Imported> {
    let mut seen = std::collections::HashSet::new();
    let (mut docs, mut qs, mut tasks) = (Vec::new(), Vec::new(), Vec::new());
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{name}:{}", n + 1);
        let v: Value = serde_json::from_str(line).map_err(|e| anyhow!("{at}: malformed JSON: {e}"))?;
        let task = crate::read::tasks::parse_task(line, &at)?;
        if !in_split(&task.id, a.split, a.test_share) {
            continue;
        }
        let mut gold = Vec::new();
        for c in v["contexts"].as_array().into_iter().flatten() {
            let Some(id) = c["document_id"].as_str() else { continue };
            gold.push(id.to_string());
            if seen.insert(id.to_string()) {
                docs.push(json!({"id": id, "title": c["title"].as_str().unwrap_or(""), "text": c["text"].as_str().unwrap_or("").trim()}));
            }
        }
        qs.push(json!({"id": task.id, "question": task.turn.question, "answers": task.targets, "gold_docs": gold,
                       "answerable": !task.unanswerable}));
        tasks.push(v);
    }
    Ok((docs, qs, Some(tasks)))
}

/// One-turn tasks (`eval --conversations`, `train sft --qa`): the question, its gold passage and
/// `distractors` others (for SQuAD from the same article: ids share the title prefix), in an
/// order fixed by the question id.
fn tasks_of(docs: &[Value], qs: &[Value], distractors: usize) -> Vec<Value> {
    use sha2::{Digest, Sha256};
    let text: std::collections::HashMap<&str, &Value> =
        docs.iter().filter_map(|d| Some((d["id"].as_str()?, &d["text"]))).collect();
    let ids: Vec<&str> = docs.iter().filter_map(|d| d["id"].as_str()).collect();
    let group = |id: &str| id.rsplit_once('-').map_or(id, |(g, _)| g).to_string();
    qs.iter()
        .filter_map(|q| {
            let gold = q["gold_doc"].as_str()?;
            let seed = Sha256::digest(q["id"].to_string().as_bytes());
            let mut r = crate::rng::Rng(u64::from_le_bytes(seed[..8].try_into().unwrap()));
            // Same-group passages first (SQuAD article), else any.
            let same: Vec<&str> = ids
                .iter()
                .copied()
                .filter(|i| *i != gold && group(i) == group(gold) && !gold.starts_with("nq-"))
                .collect();
            let pool: Vec<&str> =
                if same.len() >= distractors { same } else { ids.iter().copied().filter(|i| *i != gold).collect() };
            let mut pool = pool;
            let mut picked = Vec::new();
            while picked.len() < distractors && !pool.is_empty() {
                picked.push(pool.swap_remove(r.below(pool.len())));
            }
            picked.insert(r.below(picked.len() + 1), gold);
            let passages = picked.iter().map(|i| (json!(i), text.get(i).copied().cloned().unwrap_or(Value::Null)));
            let answers = q["answers"].as_array().map(Vec::as_slice).unwrap_or_default();
            Some(crate::read::tasks::one_turn_task(
                &q["id"],
                &q["question"],
                passages,
                answers,
                q["answerable"].as_bool() != Some(false),
            ))
        })
        .collect()
}
