//! `refrag eval answers` (reference-answer NLL under six readings) and `refrag eval readback`
//! (is the answer in its chunk's vector?).

use super::{AnswersArgs, ReadbackArgs};
use crate::cli::Global;
use crate::eval::metrics;
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::process::ExitCode;

pub fn answers(g: &Global, a: AnswersArgs) -> Result<ExitCode> {
    use crate::eval::answers::{answer_readings, ANSWER_READINGS};
    use crate::train::sft::QaPool;
    if a.limit == 0 {
        bail!("--limit 0: no tasks to read");
    }
    let ld = g.loader()?;
    let base = ld.decoder_with(crate::model::decoder::Ops::Fused, false)?;
    let encoder = ld.encoder()?;
    let trained = ld.require_trained(&encoder, &base, crate::model::weights::Purpose::Answers)?;
    let k = trained.k.unwrap_or(crate::model::load::DEFAULT_K);
    let question_at = ld.question_at(Some(&trained));
    let comp = crate::model::compressor::Compressor::new(&trained.chunk_encoder, &trained.projector, k);
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
        let rows = answer_readings(&base, &student, &comp, question_at, &pool.examples[..n], || pb.inc(1))
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
            ANSWER_READINGS
                .iter()
                .zip(rows)
                .map(|(name, r)| (name.to_string(), serde_json::json!(metrics::mean(r))))
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        let files: Vec<serde_json::Value> = per_file
            .iter()
            .map(|(f, rows)| serde_json::json!({"file": f, "tasks": rows[0].len(), "nll": means(rows)}))
            .collect();
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
    writeln!(
        out,
        "{} tasks, weights {} (k = {k}); reference-answer cross-entropy, nats per answer token (mean over tasks)",
        all[0].len(),
        trained.dir.display()
    )?;
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

pub fn readback(g: &Global, a: ReadbackArgs) -> Result<ExitCode> {
    if a.limit == 0 {
        bail!("--limit 0: no tasks to read");
    }
    let ld = g.loader()?;
    let mut dec = ld.decoder_with(crate::model::decoder::Ops::Fused, false)?;
    let encoder = ld.encoder()?;
    let trained = ld.require_trained(&encoder, &dec, crate::model::weights::Purpose::Text)?;
    let k = trained.k.unwrap_or(crate::model::load::DEFAULT_K);
    let comp = crate::model::compressor::Compressor::new(&trained.chunk_encoder, &trained.projector, k);
    trained.adapt(&mut dec)?;
    let pools =
        a.qa.iter()
            .map(|f| crate::train::sft::QaPool::load(std::slice::from_ref(f), &dec))
            .collect::<Result<Vec<_>>>()?;
    let total: usize = pools.iter().map(|p| p.examples.len().min(a.limit)).sum();
    let pb = crate::progress::bar(g.quiet, total as u64, "tasks");
    let Probed { files, all, nll_own, nll_other, shown } =
        probe(&dec, &comp, trained.recon_marker, &a, &pools, || pb.inc(1))?;
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
    writeln!(
        out,
        "weights {} (k = {k}): the chunk that holds the answer, read back from its vector alone (greedy)",
        trained.dir.display()
    )?;
    writeln!(
        out,
        "{:<24} {:>6} {:>7} {:>10} {:>10} {:>9} {:>9}",
        "file", "tasks", "probed", "answer own", "other", "F1 own", "other"
    )?;
    let mut row = |name: &str, n: usize, c: &[Vec<f64>; 4]| -> Result<()> {
        let (m0, m1, m2, m3) = (metrics::mean(&c[0]), metrics::mean(&c[1]), metrics::mean(&c[2]), metrics::mean(&c[3]));
        let probed = c[0].len();
        writeln!(
            out,
            "{name:<24.24} {n:>6} {probed:>7} {:>9.1}% {:>9.1}% {m2:>9.3} {m3:>9.3}",
            100.0 * m0,
            100.0 * m1
        )?;
        Ok(())
    };
    for (f, n, c) in &files {
        let name = std::path::Path::new(f).file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        row(&name, *n, c)?;
    }
    row("all", total, &all)?;
    writeln!(
        out,
        "answer read back, own - other: {:+.1} points ({:+.1} .. {:+.1}, 95% bootstrap, {} resamples)",
        100.0 * m,
        100.0 * lo,
        100.0 * hi,
        a.bootstrap.samples
    )?;
    writeln!(
        out,
        "answer tokens read back teacher-forced ({} tasks): {:.2} nats from its own vector, {:.2} from the other; own - other {nm:+.2} ({nlo:+.2} .. {nhi:+.2})",
        nll_own.len(),
        metrics::mean(&nll_own),
        metrics::mean(&nll_other)
    )?;
    for e in &shown {
        writeln!(
            out,
            "\nanswer: {}\nchunk:  {}\nown:    {}\nother:  {}",
            e["answer"].as_str().unwrap_or(""),
            e["chunk"].as_str().unwrap_or("").trim(),
            e["own"].as_str().unwrap_or("").trim(),
            e["other"].as_str().unwrap_or("").trim()
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// What `eval readback` found, per file and over all files: (own, other) answer read back and
/// (own, other) read-back F1 against the chunk; the answer tokens' NLL read back teacher-forced
/// (own, other) where the answer could be placed; the first examples.
struct Probed {
    files: Vec<(String, usize, [Vec<f64>; 4])>,
    all: [Vec<f64>; 4],
    nll_own: Vec<f64>,
    nll_other: Vec<f64>,
    shown: Vec<serde_json::Value>,
}

/// Read back the answer chunk of the first `a.limit` tasks of each file; `tick` after each task.
fn probe(
    dec: &crate::model::decoder::Decoder,
    comp: &crate::model::compressor::Compressor,
    marker: bool,
    a: &ReadbackArgs,
    pools: &[crate::train::sft::QaPool],
    mut tick: impl FnMut(),
) -> Result<Probed> {
    let has = |text: &str, answer: &str| f64::from(u8::from(metrics::contains_any(text, &[answer.to_string()])));
    // per file and over all: (own, other) answer found; (own, other) read-back F1 against the chunk
    let mut files = Vec::new();
    let (mut all, mut shown) = ([Vec::new(), Vec::new(), Vec::new(), Vec::new()], Vec::new());
    // answer-token NLL, teacher-forced read-back: (own, other) per task where it was placed
    let (mut nll_own, mut nll_other) = (Vec::new(), Vec::new());
    for (f, pool) in a.qa.iter().zip(pools) {
        let n = pool.examples.len().min(a.limit);
        let rows = crate::eval::readback::readback(dec, comp, &pool.examples[..n], marker, &mut tick)
            .with_context(|| f.display().to_string())?;
        let mut cols = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        for r in rows.iter().flatten() {
            let v = [
                has(&r.own, &r.answer),
                has(&r.other, &r.answer),
                metrics::f1(&r.own, &r.chunk),
                metrics::f1(&r.other, &r.chunk),
            ];
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
    Ok(Probed { files, all, nll_own, nll_other, shown })
}
