//! `refrag eval perplexity`: compressed reading of text against no context, full context and
//! the last tokens (paper Table 1).

use super::PerplexityArgs;
use crate::cli::Global;
use crate::eval::perplexity::PplScores;
use anyhow::{bail, Result};
use std::io::Write;
use std::process::ExitCode;

pub fn perplexity(g: &Global, a: PerplexityArgs) -> Result<ExitCode> {
    use crate::eval::perplexity::{score, PplOptions, PplScores};
    if a.s == 0 || a.o < 2 || a.windows == 0 || a.k.iter().any(|&k| k == 0 || !a.s.is_multiple_of(k)) {
        bail!("need --s > 0, --o >= 2, --windows > 0 and every --k dividing --s");
    }
    if !(0.0..=1.0).contains(&a.expand) {
        bail!("--expand {}: must be between 0 and 1", a.expand);
    }
    let policies: Vec<crate::options::Policy> =
        a.policy.iter().copied().filter(|&p| p != crate::options::Policy::None).collect();
    let ld = g.loader()?;
    let decoder = ld.decoder_with(crate::model::decoder::Ops::Fused, false)?;
    if a.s + a.o > decoder.cfg.max_positions {
        bail!("--s {} + --o {} exceed the decoder's {} positions", a.s, a.o, decoder.cfg.max_positions);
    }
    let encoder = ld.encoder()?;
    let trained = ld.trained(&encoder, &decoder, crate::model::weights::Purpose::Text)?;
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
            let t = crate::index::corpus::read_text(p)?;
            let ids = crate::read::prompt::tokenize(&decoder, crate::train::data::strip_gutenberg(&t))?;
            Ok((p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(), ids))
        })
        .collect::<Result<Vec<_>>>()?;
    let pb = crate::progress::bar(g.quiet, (a.k.len() * texts.len() * a.windows) as u64, "windows");
    let mut out = std::io::stdout().lock();
    for &k in &a.k {
        let compress = trained
            .as_ref()
            .filter(|t| t.k.is_none_or(|tk| tk == k))
            .map(|t| crate::model::compressor::Compressor::new(&t.chunk_encoder, &t.projector, k));
        if compress.is_none() && !g.quiet {
            eprintln!("refrag: no trained weights for k = {k}: REFRAG row left out");
        }
        let opts = PplOptions {
            s: a.s,
            o: a.o,
            k,
            windows: a.windows,
            expand: a.expand,
            policies: policies.clone(),
            query_tokens: a.query_tokens,
            recon_marker: trained.as_ref().is_some_and(|t| t.recon_marker),
        };
        crate::read::policy::require(
            policies.contains(&crate::options::Policy::Rl) && compress.is_some(),
            trained.as_ref(),
        )?;
        let policy =
            trained.as_ref().filter(|_| compress.is_some()).and_then(|t| t.policy.as_deref()).map(|p| (p, &encoder));
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
            pb.suspend(|| print_table(&mut out, &a, k, &rows))?;
        }
    }
    pb.finish_and_clear();
    Ok(ExitCode::SUCCESS)
}

/// The readings of each text and pooled, as a table with the controls below it.
fn print_table(out: &mut impl Write, a: &PerplexityArgs, k: usize, rows: &[PplScores]) -> Result<()> {
    writeln!(
        out,
        "perplexity of {} tokens after {} context tokens, k = {k} ({} positions compressed)",
        a.o,
        a.s,
        a.s / k
    )?;
    writeln!(
        out,
        "{:<28} {:>7} {:>9} {:>9} {:>9} {:>9} {:>11} {:>13}",
        "text",
        "windows",
        "none",
        "full",
        format!("last-{}", a.s / k),
        format!("refrag-{k}"),
        "gap closed",
        "none+adapter"
    )?;
    let p = |x: Option<f64>| x.map(|n| format!("{:.2}", PplScores::ppl(n))).unwrap_or_else(|| "-".into());
    for r in rows {
        let gc = r.nll_refrag.map(|n| format!("{:.1}%", 100.0 * r.gap_closed(n))).unwrap_or_else(|| "-".into());
        writeln!(
            out,
            "{:<28} {:>7} {:>9.2} {:>9.2} {:>9.2} {:>9} {:>11} {:>13}",
            r.text,
            r.windows,
            PplScores::ppl(r.nll_none),
            PplScores::ppl(r.nll_full),
            PplScores::ppl(r.nll_last),
            p(r.nll_refrag),
            gc,
            p(r.nll_none_adapted)
        )?;
    }
    if let Some(r) = rows.last().filter(|r| r.nll_refrag_other.is_some() || r.nll_full_adapted.is_some()) {
        let pct = |x: Option<f64>| x.map(|g| format!("{:.1}%", 100.0 * g)).unwrap_or_else(|| "-".into());
        writeln!(out, "controls (pooled): refrag-{k} reading another window's chunks {}; adapted decoder none {} / full {}; gap closed within the adapted decoder {}",
            p(r.nll_refrag_other), p(r.nll_none_adapted), p(r.nll_full_adapted), pct(r.gap_closed_adapted()))?;
    }
    if let Some(r) = rows.last().filter(|r| !r.recon_accuracy.is_empty()) {
        let parts: Vec<String> = crate::eval::perplexity::RECON_CHUNKS
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
        writeln!(
            out,
            "REFRAG-{k} with {:.0}% of chunks expanded (pooled): policy, perplexity, gap closed",
            100.0 * a.expand
        )?;
        for (name, &n) in &pooled.nll_expanded {
            writeln!(out, "  {name:<16} {:>9.2} {:>10.1}%", PplScores::ppl(n), 100.0 * pooled.gap_closed(n))?;
        }
    }
    Ok(())
}
