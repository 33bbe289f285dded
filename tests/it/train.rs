//! `refrag train` on CPU with the real models: a run stopped by --max-seconds resumes from its
//! checkpoint and finishes with every step logged once.

use crate::common::*;

#[test]
fn training_pauses_and_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("w");
    let text = fixture("alice_ch1-3.txt");
    let run = |extra: &[&str]| {
        let o = refrag()
            .args(["train", "reconstruct", "--device", "cpu", "-q", "--steps", "3", "--tokens-per-step", "128", "--max-chunks", "2", "--checkpoint-every", "10", "--text"])
            .arg(&text)
            .arg("--heldout")
            .arg(fixture("corpus/warsaw-1.txt"))
            .arg("--out")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let first = run(&["--max-seconds", "0"]);
    assert_eq!(first["status"], "paused");
    assert_eq!(first["step"], 1);
    assert!(!out.join("projector.safetensors").exists());
    let done = run(&["--resume"]);
    assert_eq!(done["steps"], 3);
    assert!(out.join("projector.safetensors").exists());
    let steps: Vec<u64> = std::fs::read_to_string(out.join("train.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3]);
    assert!(done["heldout"]["chunks_2"]["nll"].as_f64().unwrap().is_finite());
}

/// A few steps (projector, two encoder layers and decoder adapters) lower the loss on a fixed
/// batch: the gradients reach every trained part and the optimizer follows them.
#[test]
fn a_few_training_steps_lower_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let text = fixture("alice_ch1-3.txt");
    let nll = |steps: &str, out: &str| -> f64 {
        let o = refrag()
            .args(["train", "cpt", "--device", "cpu", "-q", "--tokens-per-step", "160", "--max-chunks", "2", "--predict-tokens", "16"])
            .args(["--encoder-layers", "2", "--decoder-lora", "4", "--lr", "2e-3", "--warmup", "0", "--seed", "5", "--steps", steps, "--text"])
            .arg(&text)
            .arg("--heldout")
            .arg(&text) // scored on a fixed batch of the same text: this tests optimisation, not generalisation
            .arg("--out")
            .arg(dir.path().join(out))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["heldout"]["chunks_2"]["nll"].as_f64().unwrap()
    };
    let before = nll("1", "a");
    let after = nll("12", "b");
    assert!(after < before - 0.05, "loss {before} -> {after}");
    for f in ["projector.safetensors", "encoder.safetensors", "decoder_lora.safetensors", "card.json"] {
        assert!(dir.path().join("b").join(f).exists(), "{f}");
    }
}

/// `eval perplexity` with the shipped weights: context helps the real decoder, and every
/// reading is scored on the same tokens.
#[test]
fn perplexity_table_has_every_reading() {
    let o = refrag()
        .args(["eval", "perplexity", "--device", "cpu", "-q", "--json", "--s", "128", "--o", "32", "--k", "16", "--windows", "2", "--text"])
        .arg(fixture("alice_ch1-3.txt"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Vec<serde_json::Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2, "one text and the pooled row");
    let r = &rows[1];
    assert_eq!(r["text"], "all");
    assert_eq!(r["target_tokens"], 64);
    let (none, full) = (r["nll_none"].as_f64().unwrap(), r["nll_full"].as_f64().unwrap());
    assert!(full < none, "context must help: none {none}, full {full}");
    for key in ["nll_last", "nll_refrag", "nll_none_adapted", "gap_closed_refrag"] {
        assert!(r[key].as_f64().unwrap().is_finite(), "{key}: {r}");
    }
}
