//! `refrag train` on CPU with the real models: a run stopped by --max-seconds resumes from its
//! checkpoint (with the settings it started with) and finishes with every step logged once.

use crate::common::*;

#[test]
fn training_pauses_and_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("w");
    let text = fixture("alice_ch1-3.txt");
    let first = refrag()
        .args([
            "train", "reconstruct", "--device", "cpu", "-q", "--steps", "3", "--tokens-per-step", "128",
            "--max-chunks", "2", "--checkpoint-every", "10",
        ])
        .args(["--lr", "5e-4", "--max-seconds", "0", "--input-scale", "7", "--bow-weight", "0.3", "--text"])
        .arg(&text)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let first: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(first["status"], "paused");
    assert_eq!(first["step"], 1);
    assert!(!out.join("projector.safetensors").exists());
    // kept as it is: resumed with --steps at the step it reached, it trains no more and writes
    // the weights (a copy, so the resume below starts from the pause)
    let kept = dir.path().join("kept");
    std::fs::create_dir(&kept).unwrap();
    for f in std::fs::read_dir(&out).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, kept.join(f.file_name().unwrap())).unwrap();
    }
    assert!(first["keep"].as_str().unwrap().contains("--resume --steps 1"), "{first}");
    let o = refrag()
        .args(["train", "reconstruct", "--device", "cpu", "-q", "--resume", "--steps", "1", "--text"])
        .arg(&text)
        .arg("--out")
        .arg(&kept)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let card: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(card["steps"], 1);
    assert!(kept.join("projector.safetensors").exists() && kept.join("card.json").exists());
    assert_eq!(std::fs::read_to_string(kept.join("train.jsonl")).unwrap().lines().count(), 1);
    // resumed with the data and one change only: every other setting is the checkpoint's, not
    // the defaults (1000 steps, 8192 tokens per step, ...), and the change is said
    let o = refrag()
        .args(["train", "reconstruct", "--device", "cpu", "--resume", "--steps", "4", "--text"])
        .arg(&text)
        .arg("--heldout")
        .arg(fixture("corpus/warsaw-1.txt"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("--steps 4 (was 3)") && !err.contains("--lr"), "{err}");
    let done: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(done["steps"], 4);
    for (key, want) in
        [("input_scale", 7.0), ("bow_weight", 0.3), ("lr", 5e-4), ("tokens_per_step", 128.0), ("max_chunks", 2.0)]
    {
        assert_eq!(done["config"][key].as_f64(), Some(want), "{key}");
    }
    assert!(out.join("projector.safetensors").exists());
    let steps: Vec<u64> = std::fs::read_to_string(out.join("train.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
    assert!(done["heldout"]["chunks_2"]["nll"].as_f64().unwrap().is_finite());
}

/// A few steps (projector, two encoder layers and decoder adapters) lower the loss on a fixed
/// batch: the gradients reach every trained part and the optimizer follows them.
#[test]
fn a_few_training_steps_lower_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let text = fixture("alice_ch1-3.txt");
    let nll = |steps: &str, out: &str| -> f64 {
        let v = json_out(
            refrag()
                .args([
                    "train", "cpt", "--device", "cpu", "-q", "--tokens-per-step", "160", "--max-chunks", "2",
                    "--predict-tokens", "16",
                ])
                .args([
                    "--encoder-layers", "2", "--decoder-lora", "4", "--lr", "2e-3", "--warmup", "0", "--seed", "5",
                    "--steps", steps, "--text",
                ])
                .arg(&text)
                .arg("--heldout")
                .arg(&text) // scored on a fixed batch of the same text: this tests optimisation, not generalisation
                .arg("--out")
                .arg(dir.path().join(out)),
        );
        v["heldout"]["chunks_2"]["nll"].as_f64().unwrap()
    };
    let before = nll("1", "a");
    let after = nll("12", "b");
    assert!(after < before - 0.05, "loss {before} -> {after}");
    for f in ["projector.safetensors", "encoder.safetensors", "decoder_lora.safetensors", "card.json"] {
        assert!(dir.path().join("b").join(f).exists(), "{f}");
    }
}

/// Weights trained with rank-4 adapters start a rank-8 run: the adapters are grown, not
/// refused, and the starting model is the same (the first step's loss equals a rank-4 run's
/// from the same weights and seed); the rank-8 run saves rank-8 adapters.
#[test]
fn a_run_grows_lower_rank_adapters_it_starts_from() {
    let dir = tempfile::tempdir().unwrap();
    let text = fixture("alice_ch1-3.txt");
    let run = |rank: &str, init: Option<&str>, out: &str| -> f64 {
        let mut c = refrag();
        c.args([
            "train", "cpt", "--device", "cpu", "-q", "--tokens-per-step", "160", "--max-chunks", "2",
            "--predict-tokens", "16",
        ])
        .args([
            "--encoder-layers", "1", "--decoder-lora", rank, "--lr", "1e-3", "--warmup", "0", "--seed", "9", "--steps",
            "1", "--text",
        ])
        .arg(&text)
        .arg("--out")
        .arg(dir.path().join(out));
        if let Some(i) = init {
            c.arg("--init").arg(dir.path().join(i));
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let log = std::fs::read_to_string(dir.path().join(out).join("train.jsonl")).unwrap();
        let row: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
        row["loss"].as_f64().unwrap()
    };
    run("4", None, "r4");
    let same = run("4", Some("r4"), "again4");
    let grown = run("8", Some("r4"), "grown8");
    assert!((same - grown).abs() < 1e-4, "first-step loss {same} (rank 4) vs {grown} (grown to 8)");
    let t =
        candle_core::safetensors::load(dir.path().join("grown8/decoder_lora.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert_eq!(t["blk.0.attn_q.lora_a"].dims()[0], 8);
    // a rank cannot shrink: one line, exit 2
    let o = refrag()
        .args([
            "train", "cpt", "--device", "cpu", "-q", "--encoder-layers", "1", "--decoder-lora", "2", "--steps", "1",
            "--text",
        ])
        .arg(&text)
        .arg("--init")
        .arg(dir.path().join("grown8"))
        .arg("--out")
        .arg(dir.path().join("shrunk"))
        .output()
        .unwrap();
    let err = one_line_error(&o);
    assert!(err.contains("rank 8"), "{err}");
}

/// A step split into passes (`--micro-tokens`: one sample per pass here) makes the same update
/// as the whole batch in one pass: same losses, gradient norms and trained weights, with the
/// auxiliary reconstruction and bag-of-words terms on.
#[test]
fn a_step_split_into_passes_makes_the_same_update() {
    let dir = tempfile::tempdir().unwrap();
    let run = |micro: &str| -> (Vec<serde_json::Value>, Vec<f32>) {
        let out = dir.path().join(format!("m{micro}"));
        let o = refrag()
            .args([
                "train", "cpt", "--device", "cpu", "-q", "--tokens-per-step", "160", "--max-chunks", "2",
                "--predict-tokens", "16",
            ])
            .args([
                "--encoder-layers", "1", "--decoder-lora", "2", "--recon-weight", "1", "--bow-weight", "0.1", "--lr",
                "1e-3",
            ])
            .args(["--seed", "3", "--steps", "2", "--micro-tokens", micro, "--text"])
            .arg(fixture("alice_ch1-3.txt"))
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let log = std::fs::read_to_string(out.join("train.jsonl")).unwrap();
        let rows = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let p = candle_core::safetensors::load(out.join("projector.safetensors"), &candle_core::Device::Cpu).unwrap();
        let mut names: Vec<_> = p.keys().cloned().collect();
        names.sort();
        let w = names.iter().flat_map(|n| p[n].flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect();
        (rows, w)
    };
    let (whole, w0) = run("0");
    let (split, w1) = run("40");
    assert_eq!(whole.len(), 2);
    for (i, (a, b)) in whole.iter().zip(&split).enumerate() {
        assert_eq!(a["batch"], b["batch"]);
        assert!(a["batch"].as_u64().unwrap() >= 2, "{a}");
        // step 1: the same gradient (its norm) and terms; step 2 reads weights that Adam moved
        // by about lr times the sign of each gradient component, which float rounding flips
        // where a component is near 0
        for key in ["loss", "grad_norm", "cpt", "recon", "bow"] {
            let tol = match (i, key) {
                (0, _) => 1e-4,
                (_, "grad_norm") => 1e-2,
                _ => 1e-3,
            };
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!((x - y).abs() <= tol * x.abs().max(1.0), "step {}: {key}: {x} vs {y}", i + 1);
        }
    }
    assert_eq!(w0.len(), w1.len());
    let moved = w0.iter().zip(&w1).filter(|(a, b)| (*a - *b).abs() > 1e-4).count();
    assert!(moved * 100 < w0.len(), "{moved} of {} projector weights differ", w0.len());
}

/// `eval perplexity --json` over two windows of Alice (s = 128, o = 32, k = 16): its rows.
pub fn perplexity_rows(extra: &[&std::ffi::OsStr]) -> Vec<serde_json::Value> {
    let o = refrag()
        .args([
            "eval", "perplexity", "--device", "cpu", "-q", "--json", "--s", "128", "--o", "32", "--k", "16",
            "--windows", "2",
        ])
        .args(extra)
        .arg("--text")
        .arg(fixture("alice_ch1-3.txt"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// `eval perplexity` with the shipped weights: context helps the real decoder, and every
/// reading is scored on the same tokens.
#[test]
fn perplexity_table_has_every_reading() {
    let rows = perplexity_rows(&[]);
    assert_eq!(rows.len(), 2, "one text and the pooled row");
    let r = &rows[1];
    assert_eq!(r["text"], "all");
    assert_eq!(r["target_tokens"], 64);
    let (none, full) = (r["nll_none"].as_f64().unwrap(), r["nll_full"].as_f64().unwrap());
    assert!(full < none, "context must help: none {none}, full {full}");
    for key in [
        "nll_last", "nll_refrag", "nll_none_adapted", "gap_closed_refrag", "nll_refrag_other", "nll_full_adapted",
        "gap_closed_adapted",
    ] {
        assert!(r[key].as_f64().unwrap().is_finite(), "{key}: {r}");
    }
    // the controls are other readings, not copies of REFRAG's or the base decoder's
    let (na, fa) = (r["nll_none_adapted"].as_f64().unwrap(), r["nll_full_adapted"].as_f64().unwrap());
    assert!(fa < na, "context must help the adapted decoder too: none {na}, full {fa}");
    assert_ne!(r["nll_refrag_other"], r["nll_refrag"], "{r}");
    // reconstruction of the first chunk from its own vector and from another window's
    for key in ["chunks_1", "chunks_1_other"] {
        let a = r["recon_accuracy"][key].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&a), "{key}: {r}");
    }
}

/// `train cpt --recon-weight W` optimises the continuation loss plus W times a reconstruction
/// loss on its own batch (plus the default bag-of-words term), and logs every term.
#[test]
fn cpt_adds_a_weighted_reconstruction_term() {
    let dir = tempfile::tempdir().unwrap();
    let o = refrag()
        .args([
            "train", "cpt", "--device", "cpu", "-q", "--tokens-per-step", "160", "--max-chunks", "2",
            "--predict-tokens", "16",
        ])
        .args([
            "--encoder-layers", "1", "--decoder-lora", "2", "--warmup", "0", "--steps", "2", "--recon-weight", "0.5",
            "--text",
        ])
        .arg(fixture("alice_ch1-3.txt"))
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = std::fs::read_to_string(dir.path().join("train.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 2);
    for line in log.lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        let (loss, cpt, recon) =
            (r["loss"].as_f64().unwrap(), r["cpt"].as_f64().unwrap(), r["recon"].as_f64().unwrap());
        let bow = r["bow"].as_f64().unwrap(); // on by default (0.1)
        assert!(recon > 0.0 && cpt > 0.0 && bow > 0.0, "{r}");
        assert!((loss - (cpt + 0.5 * recon + 0.1 * bow)).abs() < 1e-3, "{r}");
    }
    let card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("card.json")).unwrap()).unwrap();
    assert_eq!(card["config"]["recon_weight"], 0.5);
    // from scratch, the projector's input factor defaults to sqrt(384)
    let scale = card["config"]["input_scale"].as_f64().unwrap();
    assert!((scale - 384f64.sqrt()).abs() < 1e-9, "{scale}");
}

/// `--bow-weight` adds the chunk vectors' bag-of-words term (logged, weighted into the loss);
/// `--input-scale` is stored in projector.safetensors, a run started from those weights inherits
/// it, and asking for another factor on top of them is refused (exit 2, one line).
#[test]
fn bag_of_words_term_and_input_scale_are_trained_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let train = |stage: &str, out: &str, extra: &[&str]| {
        refrag()
            .args([
                "train", stage, "--device", "cpu", "-q", "--tokens-per-step", "96", "--max-chunks", "1",
                "--predict-tokens", "16",
            ])
            .args(["--encoder-layers", "1", "--warmup", "0", "--steps", "2", "--bow-weight", "0.25", "--text"])
            .arg(fixture("alice_ch1-3.txt"))
            .arg("--out")
            .arg(dir.path().join(out))
            .args(extra)
            .output()
            .unwrap()
    };
    let o = train("reconstruct", "rec", &["--input-scale", "19.5"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rec = dir.path().join("rec");
    for line in std::fs::read_to_string(rec.join("train.jsonl")).unwrap().lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        let (loss, main, bow) = (r["loss"].as_f64().unwrap(), r["main"].as_f64().unwrap(), r["bow"].as_f64().unwrap());
        assert!(main > 0.0 && bow > 0.0, "{r}");
        assert!((loss - (main + 0.25 * bow)).abs() < 1e-3, "{r}");
    }
    let stored = refrag::model::projector::stored_in_scale(&rec.join("projector.safetensors")).unwrap();
    assert!((stored - 19.5).abs() < 1e-6, "{stored}");
    let init = rec.to_str().unwrap();
    let o = train("cpt", "cpt", &["--init", init]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("cpt/card.json")).unwrap()).unwrap();
    assert_eq!(card["config"]["input_scale"], 19.5);
    assert_eq!(card["config"]["bow_weight"], 0.25);
    let o = train("cpt", "bad", &["--init", init, "--input-scale", "1"]);
    let err = one_line_error(&o);
    assert!(err.contains("--input-scale"), "{err}");
}
