//! `refrag eval compare`: two readings' `--out` answers paired by question id, with 95%
//! bootstrap intervals of their differences.

use super::CompareArgs;
use crate::eval::metrics;
use anyhow::{anyhow, bail, Context, Result};
use std::io::Write;
use std::process::ExitCode;

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

pub fn compare(a: CompareArgs) -> Result<ExitCode> {
    if a.base.len() != a.new.len() {
        bail!(
            "--base has {} files and --new {}: give the same question sets in the same order",
            a.base.len(),
            a.new.len()
        );
    }
    let (mut diffs, mut base_v, mut new_v) =
        ([vec![], vec![], vec![]], [vec![], vec![], vec![]], [vec![], vec![], vec![]]);
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
