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

#[derive(Args, Debug)]
pub struct DatasetArgs {
    #[arg(value_enum)]
    pub kind: Kind,
    /// Input file (.json, .jsonl or .jsonl.gz).
    pub file: PathBuf,
    #[arg(long, env = "REFRAG_DATASET_CORPUS")]
    pub corpus: PathBuf,
    #[arg(long, env = "REFRAG_DATASET_QUESTIONS")]
    pub questions: PathBuf,
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
                let ctx = v["ctxs"].as_array().and_then(|c| c.iter().find(|x| x["isgold"].as_bool() == Some(true)).or(c.first()))
                    .ok_or_else(|| anyhow!("{name}:{}: no ctxs", n + 1))?;
                docs.push(json!({"id": id, "title": ctx["title"], "text": ctx["text"]}));
                qs.push(json!({"id": id, "question": v["question"], "answers": v["answers"], "gold_doc": id}));
            }
        }
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
    write(&a.corpus, &docs)?;
    write(&a.questions, &qs)?;
    if a.json {
        outln!("{}", serde_json::json!({"documents": docs.len(), "corpus": a.corpus, "questions": qs.len(), "questions_file": a.questions}));
    } else {
        outln!("{} documents -> {}, {} questions -> {}", docs.len(), a.corpus.display(), qs.len(), a.questions.display());
    }
    Ok(ExitCode::SUCCESS)
}
