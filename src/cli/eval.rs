//! `refrag eval`: batch questions from JSONL, with metrics; `refrag eval perplexity`.
#![cfg_attr(not(feature = "store"), allow(dead_code, unused_imports))]

use super::ask::{mode_name, policy_named, RagArgs, SamplingArgs};
use super::Global;
use crate::metrics;
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub cmd: Option<EvalCmd>,
    /// Questions: one {"id","question","answers":[...],"gold_doc"?,"answerable"?} per line.
    #[arg(long, required_unless_present = "conversations", env = "REFRAG_EVAL_QUESTIONS")]
    pub questions: Option<PathBuf>,
    /// Multi-turn tasks (MTRAG format: "input" turns ending with the user's question,
    /// "contexts", "targets", "answerability"): the last turn is answered from the given
    /// passages and the earlier turns; no index is needed.
    #[arg(long, conflicts_with = "questions", env = "REFRAG_EVAL_CONVERSATIONS")]
    pub conversations: Option<PathBuf>,
    /// With --conversations: most decoder positions per answer (default: the decoder's
    /// window); the oldest turns, then the last passages, are left out beyond it.
    #[arg(long, env = "REFRAG_EVAL_WINDOW")]
    pub window: Option<usize>,
    /// Write one JSON line per question here.
    #[arg(long, env = "REFRAG_EVAL_OUT")]
    pub out: Option<PathBuf>,
    /// Score retrieval only (recall@k), without decoding.
    #[arg(long, env = "REFRAG_EVAL_RETRIEVAL_ONLY")]
    pub retrieval_only: bool,
    /// With --retrieval-only: also write each question with its retrieved passages as a task
    /// (the format of --conversations and `train sft --qa`), to replay this retrieval where
    /// there is no index or to fine-tune on it.
    #[arg(long, requires = "retrieval_only", env = "REFRAG_EVAL_TASKS")]
    pub tasks: Option<PathBuf>,
    /// Evaluate only the first N questions.
    #[arg(long, env = "REFRAG_EVAL_LIMIT")]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub rag: RagArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print the summary as JSON.
    #[arg(long, env = "REFRAG_JSON")]
    pub json: bool,
}

struct Question {
    id: String,
    question: String,
    answers: Vec<String>,
    gold_docs: Vec<String>,
    answerable: bool,
}

fn parse(line: &str, at: &str) -> Result<Question> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| anyhow!("{at}: malformed JSON: {e}"))?;
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

#[derive(Subcommand, Debug)]
pub enum EvalCmd {
    /// Perplexity of the next --o tokens after --s context tokens: no context, full context,
    /// the last s/k tokens, and REFRAG's s/k chunk vectors (paper Table 1).
    Perplexity(PerplexityArgs),
    /// Paired comparison of two readings' answers (`eval --out` files of the same questions):
    /// per-question differences in F1, EM and contains, joined by id, with bootstrap intervals.
    Compare(CompareArgs),
    /// Reference-answer log-likelihood of held-out tasks (`dataset ... --tasks`) under six
    /// readings: base decoder with no passages / with them as tokens, the adapted decoder with
    /// them as tokens, and REFRAG with no passages / its own / another task's compressed
    /// passages (does the compressed passage's content reach the answer?).
    Answers(AnswersArgs),
    /// Is the answer in the chunk vector at all? For held-out tasks whose reference answer lies
    /// within one k-token chunk of the passage, the decoder writes what it reads in that chunk's
    /// vector alone, and in another task's chunk (the control); share of read-backs holding the
    /// answer, paired.
    Readback(ReadbackArgs),
}

#[derive(Args, Debug)]
pub struct ReadbackArgs {
    /// Task files (`refrag dataset ... --tasks`; answerable tasks with passages are read).
    #[arg(long, required = true, num_args = 1.., env = "REFRAG_READBACK_QA")]
    pub qa: Vec<PathBuf>,
    /// Tasks read per file, from its start.
    #[arg(long, default_value_t = 100, env = "REFRAG_READBACK_LIMIT")]
    pub limit: usize,
    /// Read-backs printed as examples (the first ones).
    #[arg(long, default_value_t = 3, env = "REFRAG_READBACK_SHOW")]
    pub show: usize,
    #[command(flatten)]
    pub bootstrap: BootstrapArgs,
    /// Print one JSON object instead of a table.
    #[arg(long, env = "REFRAG_JSON")]
    pub json: bool,
}

/// The bootstrap of `eval compare`, `eval answers` and `eval readback`.
#[derive(Args, Debug)]
pub struct BootstrapArgs {
    /// Bootstrap resamples of the paired differences (95% percentile interval).
    #[arg(long, default_value_t = 2000, env = "REFRAG_COMPARE_SAMPLES")]
    pub samples: usize,
    /// Seed of the resampling.
    #[arg(long, default_value_t = 1, env = "REFRAG_COMPARE_SEED")]
    pub seed: u64,
}

impl BootstrapArgs {
    /// Mean of paired differences and its 95% interval: (mean, low, high).
    fn interval(&self, diffs: &[f64]) -> (f64, f64, f64) {
        metrics::paired_bootstrap(diffs, self.samples, self.seed)
    }
}

#[derive(Args, Debug)]
pub struct AnswersArgs {
    /// Task files (`refrag dataset ... --tasks`; answerable tasks with passages are read).
    #[arg(long, required = true, num_args = 1.., env = "REFRAG_ANSWERS_QA")]
    pub qa: Vec<PathBuf>,
    /// Tasks read per file, from its start.
    #[arg(long, default_value_t = 100, env = "REFRAG_ANSWERS_LIMIT")]
    pub limit: usize,
    #[command(flatten)]
    pub bootstrap: BootstrapArgs,
    /// Print one JSON object instead of a table.
    #[arg(long, env = "REFRAG_JSON")]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Answers of the baseline reading (`eval --out` files, e.g. one per question set).
    #[arg(long, required = true, num_args = 1.., env = "REFRAG_COMPARE_BASE")]
    pub base: Vec<PathBuf>,
    /// Answers of the reading compared with it: the same sets, in the same order as --base.
    #[arg(long, required = true, num_args = 1.., env = "REFRAG_COMPARE_NEW")]
    pub new: Vec<PathBuf>,
    #[command(flatten)]
    pub bootstrap: BootstrapArgs,
    /// Print one JSON object instead of a table.
    #[arg(long, env = "REFRAG_JSON")]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    /// Text files to score (UTF-8; Gutenberg headers are stripped). Never training text.
    #[arg(long, required = true, num_args = 1.., env = "REFRAG_PERPLEXITY_TEXT")]
    pub text: Vec<PathBuf>,
    /// Context tokens.
    #[arg(long, default_value_t = 2048, env = "REFRAG_PERPLEXITY_S")]
    pub s: usize,
    /// Predicted tokens.
    #[arg(long, default_value_t = 512, env = "REFRAG_PERPLEXITY_O")]
    pub o: usize,
    /// Chunk sizes; REFRAG rows need trained weights for that k (the others print without).
    #[arg(long, value_delimiter = ',', default_value = "16", env = "REFRAG_PERPLEXITY_K")]
    pub k: Vec<usize>,
    /// Windows per text, spread evenly over it.
    #[arg(long, default_value_t = 16, env = "REFRAG_PERPLEXITY_WINDOWS")]
    pub windows: usize,
    /// Fraction of chunks expanded back to tokens in the policy readings.
    #[arg(long, default_value_t = 0.1, env = "REFRAG_PERPLEXITY_EXPAND")]
    pub expand: f64,
    /// Expansion policies read at --expand (random, ppl-desc, ppl-asc, rl; none = no readings).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "random", env = "REFRAG_PERPLEXITY_POLICY")]
    pub policy: Vec<crate::options::Policy>,
    /// Target tokens a conditioned RL policy reads as its query (a stand-in for a question).
    #[arg(long, default_value_t = 32, env = "REFRAG_PERPLEXITY_QUERY_TOKENS")]
    pub query_tokens: usize,
    /// Print JSON lines instead of a table.
    #[arg(long, env = "REFRAG_JSON")]
    pub json: bool,
}

pub fn run(g: &Global, args: EvalArgs) -> Result<ExitCode> {
    match args.cmd {
        Some(EvalCmd::Perplexity(a)) => perplexity(g, a),
        Some(EvalCmd::Compare(a)) => compare(a),
        Some(EvalCmd::Answers(a)) => answers(g, a),
        Some(EvalCmd::Readback(a)) => readback(g, a),
        None => match args.conversations.clone() {
            Some(c) => run_conversations(g, &args, &c),
            None => run_questions(g, args),
        },
    }
}

/// Answer metrics compared by `eval compare`, as `eval --out` names them.
const COMPARED: [&str; 3] = ["f1", "em", "contains_gold"];

/// One `eval --out` file: id -> the compared metrics it has (booleans count as 0/1). Questions
/// without a reference answer (`"unanswerable": true`, or an empty `"gold"`) are left out, as
/// eval's own F1 leaves them out.
fn read_answers(path: &std::path::Path) -> Result<Vec<(String, [Option<f64>; 3])>> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|_| anyhow!("{}: not UTF-8", path.display()))?;
    let mut seen = std::collections::HashSet::new();
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| anyhow!("{}: not JSON ({e})", at()))?;
        let id = match &v["id"] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => bail!("{}: no \"id\" (an `eval --out` answers file has one per line)", at()),
        };
        if !seen.insert(id.clone()) {
            bail!("{}: id {id} appears twice", at());
        }
        if v["unanswerable"].as_bool() == Some(true) || v["gold"].as_array().is_some_and(|g| g.is_empty()) {
            continue;
        }
        let m = COMPARED.map(|k| match &v[k] {
            serde_json::Value::Bool(b) => Some(*b as u8 as f64),
            x => x.as_f64(),
        });
        rows.push((id, m));
    }
    Ok(rows)
}

fn compare(a: CompareArgs) -> Result<ExitCode> {
    if a.base.len() != a.new.len() {
        bail!("--base has {} files and --new {}: give the same question sets in the same order", a.base.len(), a.new.len());
    }
    let (mut diffs, mut base_v, mut new_v) = ([vec![], vec![], vec![]], [vec![], vec![], vec![]], [vec![], vec![], vec![]]);
    let (mut questions, mut only_base, mut only_new) = (0, 0, 0);
    for (b, n) in a.base.iter().zip(&a.new) {
        let base = read_answers(b)?;
        let new: std::collections::HashMap<String, [Option<f64>; 3]> = read_answers(n)?.into_iter().collect();
        let mut matched = 0;
        for (id, mb) in &base {
            let Some(mn) = new.get(id) else {
                only_base += 1;
                continue;
            };
            matched += 1;
            for k in 0..COMPARED.len() {
                if let (Some(x), Some(y)) = (mb[k], mn[k]) {
                    diffs[k].push(y - x);
                    base_v[k].push(x);
                    new_v[k].push(y);
                }
            }
        }
        if matched == 0 {
            bail!("{} and {}: no question ids in common", b.display(), n.display());
        }
        questions += matched;
        only_new += new.len() - matched;
    }
    if diffs.iter().all(Vec::is_empty) {
        bail!("no answer scores (f1, em, contains_gold) in both files of any pair: `eval --out` files of answered questions are needed (not --retrieval-only)");
    }
    // one row per metric with scores on both sides
    struct Row {
        name: &'static str,
        n: usize,
        base: f64,
        new: f64,
        /// difference, interval low, interval high
        diff: (f64, f64, f64),
    }
    let rows: Vec<Row> = (0..COMPARED.len())
        .filter(|&k| !diffs[k].is_empty())
        .map(|k| Row {
            name: COMPARED[k],
            n: diffs[k].len(),
            base: metrics::mean(&base_v[k]),
            new: metrics::mean(&new_v[k]),
            diff: a.bootstrap.interval(&diffs[k]),
        })
        .collect();
    let mut out = std::io::stdout().lock();
    if a.json {
        let m: serde_json::Map<String, serde_json::Value> = rows
            .iter()
            .map(|r| {
                let (d, lo, hi) = r.diff;
                (r.name.to_string(), serde_json::json!({"questions": r.n, "base": r.base, "new": r.new, "difference": d, "interval_95": [lo, hi]}))
            })
            .collect();
        let report = serde_json::json!({"questions": questions, "file_pairs": a.base.len(), "only_in_base": only_base,
            "only_in_new": only_new, "samples": a.bootstrap.samples, "metrics": m});
        writeln!(out, "{report}")?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{questions} questions paired by id over {} file pair(s) ({only_base} only in --base, {only_new} only in --new); 95% bootstrap intervals, {} resamples",
        a.base.len(),
        a.bootstrap.samples
    )?;
    writeln!(out, "{:<14} {:>8} {:>8} {:>10}   95% interval", "metric", "base", "new", "new - base")?;
    for Row { name, base, new, diff: (d, lo, hi), .. } in rows {
        writeln!(out, "{name:<14} {base:>8.4} {new:>8.4} {d:>+10.4}   {lo:+.4} .. {hi:+.4}")?;
    }
    Ok(ExitCode::SUCCESS)
}

fn answers(g: &Global, a: AnswersArgs) -> Result<ExitCode> {
    use crate::sft::{answer_readings, QaPool, ANSWER_READINGS};
    if a.limit == 0 {
        bail!("--limit 0: no tasks to read");
    }
    let device = g.device()?;
    let base = g.load_decoder_with(&device, crate::decoder::Ops::Fused, false)?;
    let encoder = g.load_encoder(&device)?;
    let trained = g
        .trained(&encoder, base.cfg.hidden, crate::projector::Purpose::Answers)?
        .ok_or_else(|| crate::projector::missing(&g.weights_dirs(crate::projector::Purpose::Answers)))?;
    let k = trained.k.unwrap_or(16);
    let question_at = crate::prompt::use_question_at(trained.question_at);
    let mut student = base.clone();
    trained.adapt(&mut student)?;
    let pools = a.qa.iter().map(|f| QaPool::load(std::slice::from_ref(f), &base)).collect::<Result<Vec<_>>>()?;
    let total: usize = pools.iter().map(|p| p.examples.len().min(a.limit)).sum();
    let pb = crate::progress::bar(g.quiet, total as u64, "tasks");
    // per file: one row per reading, one value per task; then all files together
    let mut per_file = Vec::new();
    let mut all = vec![Vec::new(); ANSWER_READINGS.len()];
    for (f, pool) in a.qa.iter().zip(&pools) {
        let n = pool.examples.len().min(a.limit);
        let rows = answer_readings(&base, &student, &trained.chunk_encoder, &trained.projector, k, &pool.examples[..n], || pb.inc(1))
            .with_context(|| f.display().to_string())?;
        for (all, row) in all.iter_mut().zip(&rows) {
            all.extend_from_slice(row);
        }
        per_file.push((f.display().to_string(), rows));
    }
    pb.finish_and_clear();
    // REFRAG reading its own passages against three other readings, paired by task
    let at = |reading: &str| ANSWER_READINGS.iter().position(|r| *r == reading).expect("one of ANSWER_READINGS");
    let own = at("refrag, own passages");
    let diff = |other: usize| -> (f64, f64, f64) {
        let d: Vec<f64> = all[own].iter().zip(&all[other]).map(|(x, y)| x - y).collect();
        a.bootstrap.interval(&d)
    };
    let differences = [
        (at("refrag, another task's passages"), "own - another task's passages"),
        (at("refrag, no passages"), "own - no passages"),
        (at("full, base decoder"), "own - full, base decoder"),
    ];
    let mut out = std::io::stdout().lock();
    if a.json {
        let means = |rows: &[Vec<f64>]| -> serde_json::Value {
            ANSWER_READINGS.iter().zip(rows).map(|(name, r)| (name.to_string(), serde_json::json!(metrics::mean(r)))).collect::<serde_json::Map<_, _>>().into()
        };
        let files: Vec<serde_json::Value> =
            per_file.iter().map(|(f, rows)| serde_json::json!({"file": f, "tasks": rows[0].len(), "nll": means(rows)})).collect();
        let d: serde_json::Map<String, serde_json::Value> = differences
            .iter()
            .map(|&(i, name)| {
                let (m, lo, hi) = diff(i);
                (format!("refrag, {name}"), serde_json::json!({"difference": m, "interval_95": [lo, hi]}))
            })
            .collect();
        let report = serde_json::json!({"weights": trained.dir.display().to_string(), "k": k, "question_at": question_at, "tasks": all[0].len(), "unit": "nats per answer token, mean over tasks",
            "nll": means(&all), "files": files, "paired": d, "samples": a.bootstrap.samples});
        writeln!(out, "{report}")?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(out, "{} tasks, weights {} (k = {k}); reference-answer cross-entropy, nats per answer token (mean over tasks)", all[0].len(), trained.dir.display())?;
    write!(out, "{:<34}", "reading")?;
    for (f, _) in &per_file {
        let name = std::path::Path::new(f).file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        write!(out, " {name:>10.10}")?;
    }
    writeln!(out, " {:>10}", "all")?;
    for (r, name) in ANSWER_READINGS.iter().enumerate() {
        write!(out, "{name:<34}")?;
        for (_, rows) in &per_file {
            write!(out, " {:>10.3}", metrics::mean(&rows[r]))?;
        }
        writeln!(out, " {:>10.3}", metrics::mean(&all[r]))?;
    }
    writeln!(out, "paired over the tasks, 95% bootstrap intervals ({} resamples):", a.bootstrap.samples)?;
    for (i, name) in differences {
        let (m, lo, hi) = diff(i);
        writeln!(out, "  refrag, {name:<32} {m:>+8.3}   {lo:+.3} .. {hi:+.3}")?;
    }
    Ok(ExitCode::SUCCESS)
}

fn readback(g: &Global, a: ReadbackArgs) -> Result<ExitCode> {
    if a.limit == 0 {
        bail!("--limit 0: no tasks to read");
    }
    let device = g.device()?;
    let mut dec = g.load_decoder_with(&device, crate::decoder::Ops::Fused, false)?;
    let encoder = g.load_encoder(&device)?;
    let trained = g
        .trained(&encoder, dec.cfg.hidden, crate::projector::Purpose::Text)?
        .ok_or_else(|| crate::projector::missing(&g.weights_dirs(crate::projector::Purpose::Text)))?;
    let k = trained.k.unwrap_or(16);
    trained.adapt(&mut dec)?;
    let pools = a.qa.iter().map(|f| crate::sft::QaPool::load(std::slice::from_ref(f), &dec)).collect::<Result<Vec<_>>>()?;
    let total: usize = pools.iter().map(|p| p.examples.len().min(a.limit)).sum();
    let pb = crate::progress::bar(g.quiet, total as u64, "tasks");
    let has = |text: &str, answer: &str| f64::from(u8::from(metrics::contains_any(text, &[answer.to_string()])));
    // per file and over all: (own, other) answer found; (own, other) read-back F1 against the chunk
    let mut files = Vec::new();
    let (mut all, mut shown) = ([Vec::new(), Vec::new(), Vec::new(), Vec::new()], Vec::new());
    // answer-token NLL, teacher-forced read-back: (own, other) per task where it was placed
    let (mut nll_own, mut nll_other) = (Vec::new(), Vec::new());
    for (f, pool) in a.qa.iter().zip(&pools) {
        let n = pool.examples.len().min(a.limit);
        let rows = crate::sft::readback(&dec, &trained.chunk_encoder, &trained.projector, k, &pool.examples[..n], || pb.inc(1))
            .with_context(|| f.display().to_string())?;
        let mut cols = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        for r in rows.iter().flatten() {
            let v = [has(&r.own, &r.answer), has(&r.other, &r.answer), metrics::f1(&r.own, &r.chunk), metrics::f1(&r.other, &r.chunk)];
            for ((c, a), v) in cols.iter_mut().zip(all.iter_mut()).zip(v) {
                c.push(v);
                a.push(v);
            }
            if let Some((o, t)) = r.answer_nll {
                nll_own.push(o);
                nll_other.push(t);
            }
            if shown.len() < a.show {
                shown.push(serde_json::json!({"answer": r.answer, "chunk": r.chunk, "own": r.own, "other": r.other}));
            }
        }
        files.push((f.display().to_string(), n, cols));
    }
    pb.finish_and_clear();
    if all[0].is_empty() {
        bail!("{:?}: no task has its answer within one {k}-token chunk of its passage", a.qa);
    }
    let diff = |own: &[f64], other: &[f64]| -> (f64, f64, f64) {
        let d: Vec<f64> = own.iter().zip(other).map(|(x, y)| x - y).collect();
        a.bootstrap.interval(&d)
    };
    let (m, lo, hi) = diff(&all[0], &all[1]);
    let (nm, nlo, nhi) = diff(&nll_own, &nll_other);
    let mut out = std::io::stdout().lock();
    if a.json {
        let per: Vec<serde_json::Value> = files
            .iter()
            .map(|(f, n, c)| serde_json::json!({"file": f, "tasks": n, "probed": c[0].len(), "answer_own": metrics::mean(&c[0]), "answer_other": metrics::mean(&c[1])}))
            .collect();
        let report = serde_json::json!({"weights": trained.dir.display().to_string(), "k": k, "tasks": total, "probed": all[0].len(),
            "answer_read_back": {"own": metrics::mean(&all[0]), "other": metrics::mean(&all[1]), "difference": m, "interval_95": [lo, hi]},
            "chunk_f1": {"own": metrics::mean(&all[2]), "other": metrics::mean(&all[3])},
            "answer_token_nll": {"tasks": nll_own.len(), "own": metrics::mean(&nll_own), "other": metrics::mean(&nll_other), "difference": nm, "interval_95": [nlo, nhi]},
            "files": per, "examples": shown, "samples": a.bootstrap.samples});
        writeln!(out, "{report}")?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(out, "weights {} (k = {k}): the chunk that holds the answer, read back from its vector alone (greedy)", trained.dir.display())?;
    writeln!(out, "{:<24} {:>6} {:>7} {:>10} {:>10} {:>9} {:>9}", "file", "tasks", "probed", "answer own", "other", "F1 own", "other")?;
    for (f, n, c) in &files {
        let name = std::path::Path::new(f).file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        writeln!(out, "{name:<24.24} {n:>6} {:>7} {:>9.1}% {:>9.1}% {:>9.3} {:>9.3}", c[0].len(), 100.0 * metrics::mean(&c[0]), 100.0 * metrics::mean(&c[1]), metrics::mean(&c[2]), metrics::mean(&c[3]))?;
    }
    writeln!(out, "{:<24} {total:>6} {:>7} {:>9.1}% {:>9.1}% {:>9.3} {:>9.3}", "all", all[0].len(), 100.0 * metrics::mean(&all[0]), 100.0 * metrics::mean(&all[1]), metrics::mean(&all[2]), metrics::mean(&all[3]))?;
    writeln!(out, "answer read back, own - other: {:+.1} points ({:+.1} .. {:+.1}, 95% bootstrap, {} resamples)", 100.0 * m, 100.0 * lo, 100.0 * hi, a.bootstrap.samples)?;
    writeln!(
        out,
        "answer tokens read back teacher-forced ({} tasks): {:.2} nats from its own vector, {:.2} from the other; own - other {nm:+.2} ({nlo:+.2} .. {nhi:+.2})",
        nll_own.len(),
        metrics::mean(&nll_own),
        metrics::mean(&nll_other)
    )?;
    for e in &shown {
        writeln!(out, "\nanswer: {}\nchunk:  {}\nown:    {}\nother:  {}", e["answer"].as_str().unwrap_or(""), e["chunk"].as_str().unwrap_or("").trim(), e["own"].as_str().unwrap_or("").trim(), e["other"].as_str().unwrap_or("").trim())?;
    }
    Ok(ExitCode::SUCCESS)
}

fn perplexity(g: &Global, a: PerplexityArgs) -> Result<ExitCode> {
    use crate::perplexity::{score, PplOptions, PplScores};
    if a.s == 0 || a.o < 2 || a.windows == 0 || a.k.iter().any(|&k| k == 0 || !a.s.is_multiple_of(k)) {
        bail!("need --s > 0, --o >= 2, --windows > 0 and every --k dividing --s");
    }
    if !(0.0..=1.0).contains(&a.expand) {
        bail!("--expand {}: must be between 0 and 1", a.expand);
    }
    let policies: Vec<crate::options::Policy> = a.policy.iter().copied().filter(|&p| p != crate::options::Policy::None).collect();
    let device = g.device()?;
    let decoder = g.load_decoder_with(&device, crate::decoder::Ops::Fused, false)?;
    if a.s + a.o > decoder.cfg.max_positions {
        bail!("--s {} + --o {} exceed the decoder's {} positions", a.s, a.o, decoder.cfg.max_positions);
    }
    let encoder = g.load_encoder(&device)?;
    let trained = g.trained(&encoder, decoder.cfg.hidden, crate::projector::Purpose::Text)?;
    // REFRAG rows read with the adapted decoder (when adapters were trained); the baselines
    // with the base decoder.
    let adapted = match &trained {
        Some(t) if t.decoder_lora.is_some() => {
            let mut d = decoder.clone();
            t.adapt(&mut d)?;
            Some(d)
        }
        _ => None,
    };
    let texts = a
        .text
        .iter()
        .map(|p| {
            let t = crate::corpus::read_text(p)?;
            let ids = crate::prompt::tokenize(&decoder, crate::train::strip_gutenberg(&t))?;
            Ok((p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(), ids))
        })
        .collect::<Result<Vec<_>>>()?;
    let pb = crate::progress::bar(g.quiet, (a.k.len() * texts.len() * a.windows) as u64, "windows");
    let mut out = std::io::stdout().lock();
    for &k in &a.k {
        let compress = trained
            .as_ref()
            .filter(|t| t.k.is_none_or(|tk| tk == k))
            .map(|t| (&t.chunk_encoder, &t.projector));
        if compress.is_none() && !g.quiet {
            eprintln!("refrag: no trained weights for k = {k}: REFRAG row left out");
        }
        let opts = PplOptions { s: a.s, o: a.o, k, windows: a.windows, expand: a.expand, policies: policies.clone(), query_tokens: a.query_tokens };
        crate::policy::require(policies.contains(&crate::options::Policy::Rl) && compress.is_some(), trained.as_ref())?;
        let policy = compress.and(trained.as_ref()).and_then(|t| t.policy.as_deref()).map(|p| (p, &encoder));
        let mut rows = Vec::new();
        for (name, ids) in &texts {
            pb.set_message(format!("k={k} {name}"));
            rows.push(score(&decoder, adapted.as_ref(), compress, policy, name, ids, &opts, || pb.inc(1))?);
        }
        rows.push(PplScores::pooled(&rows));
        for r in &rows {
            if a.json {
                let mut v = serde_json::to_value(r)?;
                v["k"] = k.into();
                v["s"] = a.s.into();
                v["o"] = a.o.into();
                v["weights"] = compress.and(trained.as_ref()).map(|t| t.dir.display().to_string()).into();
                v["gap_closed_last"] = r.gap_closed(r.nll_last).into();
                v["gap_closed_refrag"] = r.nll_refrag.map(|n| r.gap_closed(n)).into();
                v["gap_closed_none_adapted"] = r.nll_none_adapted.map(|n| r.gap_closed(n)).into();
                v["gap_closed_refrag_other"] = r.nll_refrag_other.map(|n| r.gap_closed(n)).into();
                v["gap_closed_adapted"] = r.gap_closed_adapted().into();
                writeln!(out, "{v}")?;
            }
        }
        if !a.json {
            pb.suspend(|| -> Result<()> {
                writeln!(out, "perplexity of {} tokens after {} context tokens, k = {k} ({} positions compressed)", a.o, a.s, a.s / k)?;
                writeln!(out, "{:<28} {:>7} {:>9} {:>9} {:>9} {:>9} {:>11} {:>13}", "text", "windows", "none", "full", format!("last-{}", a.s / k), format!("refrag-{k}"), "gap closed", "none+adapter")?;
                let p = |x: Option<f64>| x.map(|n| format!("{:.2}", PplScores::ppl(n))).unwrap_or_else(|| "-".into());
                for r in &rows {
                    let gc = r.nll_refrag.map(|n| format!("{:.1}%", 100.0 * r.gap_closed(n))).unwrap_or_else(|| "-".into());
                    writeln!(out, "{:<28} {:>7} {:>9.2} {:>9.2} {:>9.2} {:>9} {:>11} {:>13}", r.text, r.windows, PplScores::ppl(r.nll_none), PplScores::ppl(r.nll_full), PplScores::ppl(r.nll_last), p(r.nll_refrag), gc, p(r.nll_none_adapted))?;
                }
                if let Some(r) = rows.last().filter(|r| r.nll_refrag_other.is_some() || r.nll_full_adapted.is_some()) {
                    let pct = |x: Option<f64>| x.map(|g| format!("{:.1}%", 100.0 * g)).unwrap_or_else(|| "-".into());
                    writeln!(out, "controls (pooled): refrag-{k} reading another window's chunks {}; adapted decoder none {} / full {}; gap closed within the adapted decoder {}",
                        p(r.nll_refrag_other), p(r.nll_none_adapted), p(r.nll_full_adapted), pct(r.gap_closed_adapted()))?;
                }
                if let Some(r) = rows.last().filter(|r| !r.recon_accuracy.is_empty()) {
                    let parts: Vec<String> = crate::perplexity::RECON_CHUNKS
                        .iter()
                        .filter_map(|n| {
                            let own = r.recon_accuracy.get(&format!("chunks_{n}"))?;
                            let other = r.recon_accuracy.get(&format!("chunks_{n}_other"))?;
                            Some(format!("{n} chunk(s) {:.1}% (another window's vectors {:.1}%)", 100.0 * own, 100.0 * other))
                        })
                        .collect();
                    writeln!(out, "reconstruction token accuracy (pooled): {}", parts.join("; "))?;
                }
                if let Some(pooled) = rows.last().filter(|r| !r.nll_expanded.is_empty()) {
                    writeln!(out, "REFRAG-{k} with {:.0}% of chunks expanded (pooled): policy, perplexity, gap closed", 100.0 * a.expand)?;
                    for (name, &n) in &pooled.nll_expanded {
                        writeln!(out, "  {name:<16} {:>9.2} {:>10.1}%", PplScores::ppl(n), 100.0 * pooled.gap_closed(n))?;
                    }
                }
                Ok(())
            })?;
        }
    }
    pb.finish_and_clear();
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(feature = "store"))]
fn run_questions(_: &Global, _: EvalArgs) -> Result<ExitCode> {
    bail!("this refrag was built without the `store` feature: only `eval perplexity` works")
}

#[cfg(feature = "store")]
fn run_questions(g: &Global, args: EvalArgs) -> Result<ExitCode> {
    let questions = args.questions.clone().context("--questions FILE is required")?;
    let (mut qs, bad) = read_jsonl(&questions, parse)?;
    if let Some(l) = args.limit {
        qs.truncate(l);
    }
    let sampling = args.sampling.options()?;
    let (engine, mode, rag) = args.rag.engine(g)?;
    let opts = rag.options(mode, sampling);
    let mut out = out_file(&args.out)?;
    let mut tasks_out = out_file(&args.tasks)?;
    let pb = crate::progress::bar(g.quiet, qs.len() as u64, "questions");
    pb.set_message("eval");
    let mut contains = vec![];
    let (mut ems, mut f1s, mut ttfts, mut tps, mut rms, mut positions, mut inputs) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut recall = vec![0usize; args.rag.top_k + 1];
    let (mut with_gold, mut abst_total, mut abst_right) = (0usize, 0usize, 0usize);
    for q in &qs {
        let (hits_ids, line) = if args.retrieval_only {
            let (hits, _, ms) = engine.retrieve(&q.question, args.rag.top_k, args.rag.search)?;
            rms.push(ms);
            if let Some(t) = tasks_out.as_mut() {
                let passages = hits.iter().map(|h| (h.passage.passage_id.clone().into(), h.passage.text.clone().into()));
                let answers: Vec<serde_json::Value> = q.answers.iter().map(|a| a.as_str().into()).collect();
                let task = crate::chat::one_turn_task(&q.id.as_str().into(), &q.question.as_str().into(), passages, &answers, q.answerable);
                writeln!(t, "{task}")?;
            }
            let ids: Vec<String> = hits.iter().map(|h| h.passage.doc_id.clone()).collect();
            (ids.clone(), serde_json::json!({"id": q.id, "sources": ids, "retrieval_ms": ms}))
        } else {
            let ans = engine.answer(&q.question, &opts, |_| Ok(()))?;
            let gen = &ans.generation;
            let (em, f1) = metrics::best(&gen.text, &q.answers);
            let contains_gold = metrics::contains_any(&gen.text, &q.answers);
            if q.answerable && !q.answers.is_empty() {
                ems.push(em);
                f1s.push(f1);
                contains.push(contains_gold as u8 as f64);
            }
            if !q.answerable {
                abst_total += 1;
                abst_right += metrics::abstains(&gen.text) as usize;
            }
            ttfts.push(gen.ttft_ms());
            tps.push(gen.tokens_per_s());
            rms.push(ans.retrieval_ms);
            inputs.push(ans.input_ms);
            positions.push(gen.prompt_positions as f64);
            let ids: Vec<String> = ans.sources.iter().map(|s| s.doc_id.clone()).collect();
            (
                ids,
                serde_json::json!({
                    "id": q.id, "question": q.question, "answer": gen.text, "gold": q.answers,
                    "em": em, "f1": f1, "contains_gold": contains_gold, "sources": ans.sources, "ttft_ms": gen.ttft_ms(),
                    "tokens_per_s": gen.tokens_per_s(), "retrieval_ms": ans.retrieval_ms,
                    "input_ms": ans.input_ms, "decoder_positions": gen.prompt_positions, "context_tokens": ans.context_tokens,
                    "chunks": ans.chunks, "expanded_chunks": ans.expanded_chunks,
                }),
            )
        };
        if !q.gold_docs.is_empty() {
            with_gold += 1;
            // A gold id matches a document id, or a file document's id without its extension.
            let is_gold = |d: &String| {
                let stem = std::path::Path::new(d).with_extension("");
                q.gold_docs.iter().any(|g| g == d || std::path::Path::new(g) == stem)
            };
            if let Some(rank) = hits_ids.iter().position(is_gold) {
                for r in recall.iter_mut().skip(rank + 1) {
                    *r += 1;
                }
            }
        }
        if let Some(o) = out.as_mut() {
            writeln!(o, "{line}")?;
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    for mut o in [out, tasks_out].into_iter().flatten() {
        o.flush()?;
    }
    let mean = metrics::mean;
    let (ttft_mean, ttft_median, ttft_p95) = metrics::summary(&ttfts);
    let recall_at = |k: usize| (with_gold > 0).then(|| recall[k.min(args.rag.top_k)] as f64 / with_gold as f64);
    let mut summary = serde_json::json!({
        "questions": qs.len(),
        "bad_lines": bad,
        "mode": mode_name(mode),
        "adapted": engine.adapted,
        "weights": engine.weights.as_ref().map(|w| w.display().to_string()),
        "question_at": crate::prompt::question_at(),
        "top_k": args.rag.top_k,
        "expand": rag.reported_share(),
        "budget": rag.budget,
        "policy": policy_named(mode, rag.expands(), rag.policy),
        "exact_match": (!args.retrieval_only).then(|| mean(&ems)),
        "f1": (!args.retrieval_only).then(|| mean(&f1s)),
        "answer_contains_gold": (!args.retrieval_only).then(|| mean(&contains)),
        "scored": ems.len(),
        "recall_at_1": recall_at(1),
        "recall_at_k": recall_at(args.rag.top_k),
        "abstention_accuracy": (abst_total > 0).then(|| abst_right as f64 / abst_total as f64),
        "retrieval_ms_mean": mean(&rms),
    });
    if !args.retrieval_only {
        let decoding = [
            ("ttft_ms_mean", ttft_mean), ("ttft_ms_median", ttft_median), ("ttft_ms_p95", ttft_p95),
            ("tokens_per_s_mean", mean(&tps)), ("input_ms_mean", mean(&inputs)), ("decoder_positions_mean", mean(&positions)),
        ];
        let fields = summary.as_object_mut().expect("a JSON object");
        for (k, v) in decoding {
            fields.insert(k.to_string(), v.into());
        }
    }
    print_summary(&summary, args.json)?;
    Ok(if bad > 0 { ExitCode::from(2) } else { ExitCode::SUCCESS })
}

/// The per-item JSONL output file of --out, if any.
fn out_file(path: &Option<PathBuf>) -> Result<Option<std::io::BufWriter<std::fs::File>>> {
    path.as_ref()
        .map(|p| Ok(std::io::BufWriter::new(std::fs::File::create(p).with_context(|| format!("{}: cannot create", p.display()))?)))
        .transpose()
}

/// A metrics summary on stdout: one JSON object, or one `key value` line per metric.
fn print_summary(summary: &serde_json::Value, json: bool) -> Result<()> {
    if json {
        outln!("{summary}");
    } else {
        for (k, v) in summary.as_object().into_iter().flatten() {
            if !v.is_null() {
                outln!("{k:<26} {}", match v.as_f64() {
                    Some(x) if v.is_f64() => format!("{x:.4}"),
                    _ => v.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Bad lines are reported (file:line) and skipped; returns the good ones and the bad count.
fn read_jsonl<T>(path: &std::path::Path, parse: impl Fn(&str, &str) -> Result<T>) -> Result<(Vec<T>, usize)> {
    let text = crate::corpus::read_text(path)?;
    let name = path.display().to_string();
    let (mut good, mut bad) = (Vec::new(), 0);
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse(line, &format!("{name}:{}", n + 1)) {
            Ok(q) => good.push(q),
            Err(e) => {
                bad += 1;
                eprintln!("refrag: {} (skipped)", super::one_line(&e));
            }
        }
    }
    if good.is_empty() {
        bail!("{name}: no usable lines (empty, or every line malformed)");
    }
    Ok((good, bad))
}

/// `eval --conversations`: the last user turn of each conversation, answered with its given
/// passages and the earlier turns (compressed in refrag mode, truncated to --window in full).
fn run_conversations(g: &Global, args: &EvalArgs, path: &std::path::Path) -> Result<ExitCode> {
    use crate::options::Mode;
    let (mut tasks, bad) = read_jsonl(path, crate::chat::parse_task)?;
    if let Some(l) = args.limit {
        tasks.truncate(l);
    }
    let sampling = args.sampling.options()?;
    let mode = args.rag.mode.unwrap_or(Mode::Full);
    args.rag.settled(Mode::Full, None)?; // a bad --expand fails before the models load
    let device = g.device()?;
    let mut decoder = g.load_decoder(&device)?;
    let encoder = g.load_encoder(&device)?;
    let trained = g.trained(&encoder, decoder.cfg.hidden, crate::projector::Purpose::Answers)?;
    let compress = match (mode, &trained) {
        (Mode::Refrag, None) => return Err(crate::projector::missing(&g.weights_dirs(crate::projector::Purpose::Answers))),
        (Mode::Refrag, Some(t)) => Some((&t.chunk_encoder, &t.projector)),
        _ => None,
    };
    // the decoder reads with the trained adapters folded in: refrag mode, or --adapted
    let adapted = super::ask::reads_adapted(args.rag.adapted, mode, trained.as_ref())?;
    if let (true, Some(t)) = (adapted, &trained) {
        t.adapt(&mut decoder)?;
    }
    // the weights that shaped the answers (reported, so a default pick is visible)
    let weights_used = super::ask::weights_read(trained.as_ref(), mode, adapted).map(|w| w.display().to_string());
    let question_at = crate::prompt::use_question_at(trained.as_ref().filter(|_| weights_used.is_some()).and_then(|t| t.question_at));
    let k = args.rag.k.or(trained.as_ref().and_then(|t| t.k)).unwrap_or(16);
    let rag = args.rag.settled(mode, trained.as_ref())?;
    crate::policy::require(mode == Mode::Refrag && rag.policy == crate::options::Policy::Rl && rag.expands(), trained.as_ref())?;
    let select = Some((rag.selection(trained.as_ref().and_then(|t| t.policy.as_deref()), sampling.seed), &encoder));
    let reader = crate::chat::Reader { decoder: &decoder, compress, k, select };
    let window = args.window.unwrap_or(decoder.cfg.max_positions).min(decoder.cfg.max_positions).saturating_sub(sampling.max_tokens);
    let mut out = out_file(&args.out)?;
    let pb = crate::progress::bar(g.quiet, tasks.len() as u64, "conversations");
    let (mut f1s, mut ttfts, mut positions, mut hist_kept, mut hist_total, mut psg_kept, mut psg_total) = (vec![], vec![], vec![], 0, 0, 0, 0);
    let (mut unans, mut unans_right, mut false_abst) = (0usize, 0usize, 0usize);
    let (mut ems, mut containss, mut expanded) = (vec![], vec![], 0usize);
    for t in &tasks {
        let r = crate::chat::answer_given(&reader, mode, &t.turn, window, &sampling)?;
        let answer = &r.generation.text;
        let (em, f1) = metrics::best(answer, &t.targets);
        let contains = metrics::contains_any(answer, &t.targets);
        let abstained = metrics::abstains(answer);
        if t.unanswerable {
            unans += 1;
            unans_right += usize::from(abstained);
        } else {
            f1s.push(f1);
            ems.push(em);
            containss.push(f64::from(u8::from(contains)));
            false_abst += usize::from(abstained);
        }
        ttfts.push(r.generation.ttft_ms());
        positions.push(r.generation.prompt_positions as f64);
        hist_kept += r.history_kept;
        hist_total += t.turn.history.len();
        psg_kept += r.passages_kept;
        expanded += r.chunks_expanded;
        psg_total += if mode == Mode::None { 0 } else { t.turn.passages.len() };
        if let Some(o) = out.as_mut() {
            writeln!(o, "{}", serde_json::json!({"id": t.id, "answer": answer, "f1": f1, "em": em, "contains_gold": contains, "unanswerable": t.unanswerable,
                "abstained": abstained, "ttft_ms": r.generation.ttft_ms(), "decoder_positions": r.generation.prompt_positions,
                "history_turns_kept": r.history_kept, "history_turns": t.turn.history.len(), "passages_kept": r.passages_kept,
                "expanded_chunks": r.chunks_expanded}))?;
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    if let Some(mut o) = out {
        o.flush()?;
    }
    let mean = metrics::mean;
    let (ttft_mean, ttft_median, ttft_p95) = metrics::summary(&ttfts);
    let share = |a: usize, b: usize| (b > 0).then(|| a as f64 / b as f64);
    let summary = serde_json::json!({
        "conversations": tasks.len(), "bad_lines": bad, "mode": mode_name(mode), "adapted": adapted, "weights": weights_used, "question_at": question_at, "window": window,
        "f1_answerable": mean(&f1s), "em_answerable": mean(&ems), "contains_gold_answerable": mean(&containss),
        "answerable": f1s.len(),
        "abstention_unanswerable": share(unans_right, unans), "unanswerable": unans,
        "false_abstention": share(false_abst, f1s.len()),
        "history_turns_kept": share(hist_kept, hist_total), "passages_kept": share(psg_kept, psg_total),
        "ttft_ms_mean": ttft_mean, "ttft_ms_median": ttft_median, "ttft_ms_p95": ttft_p95,
        "decoder_positions_mean": mean(&positions),
        "expand": rag.reported_share(), "budget": rag.budget, "policy": policy_named(mode, rag.expands(), rag.policy), "chunks_expanded": expanded,
    });
    print_summary(&summary, args.json)?;
    Ok(if bad > 0 { ExitCode::from(2) } else { ExitCode::SUCCESS })
}
