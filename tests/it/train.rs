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
