//! Training and reading for answers, with the real models on CPU: answer fine-tuning (SFT,
//! distillation), the expansion policy on text and on questions, `eval answers` and
//! `eval readback`.

use crate::common::*;
use refrag::model::decoder::{Decoder, Ops};
use refrag::options::QuestionAt;
use std::path::{Path, PathBuf};

/// A copy of a shipped weights folder (under the crate root) in `dir`, without its policy.
fn shipped_without_policy(dir: &Path, which: &str) -> PathBuf {
    let w = dir.join("w");
    std::fs::create_dir_all(&w).unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join(which);
    for f in ["projector.safetensors", "encoder.safetensors", "decoder_lora.safetensors", "card.json"] {
        std::fs::copy(shipped.join(f), w.join(f)).unwrap();
    }
    w
}

/// `train policy` on CPU with `args`, on the weights in `w` and into `w`; its card.
fn train_policy(w: &Path, args: &[&str]) -> serde_json::Value {
    let o = refrag()
        .args(["train", "policy", "--device", "cpu", "-q"])
        .args(args)
        .arg("--weights")
        .arg(w)
        .arg("--out")
        .arg(w)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&std::fs::read(w.join("policy.json")).unwrap()).unwrap()
}

/// The fixture SQuAD file as one-turn tasks (`dataset squad --tasks`), in `dir`.
fn squad_tasks(dir: &Path) -> PathBuf {
    let tasks = dir.join("tasks.jsonl");
    let out =
        refrag().args(["dataset", "squad", "--tasks"]).arg(&tasks).arg(fixture("squad_tiny.json")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    tasks
}

/// The same for answer fine-tuning: a batch of three tasks in one pass or one task per pass
/// gives the same loss terms (each a mean over all the batch's answer tokens) and gradient.
#[test]
fn an_sft_step_split_into_passes_makes_the_same_update() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = squad_tasks(dir.path());
    let run = |micro: &str| -> serde_json::Value {
        let out = dir.path().join(format!("s{micro}"));
        let o = refrag()
            .args([
                "train", "sft", "--device", "cpu", "-q", "--batch", "3", "--steps", "1", "--encoder-layers", "4",
                "--decoder-lora", "8",
            ])
            .args(["--mixed", "0.3", "--seed", "4", "--micro-tokens", micro, "--init"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/qa-minilm"))
            .arg("--qa")
            .arg(&tasks)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_str(std::fs::read_to_string(out.join("train.jsonl")).unwrap().lines().next().unwrap()).unwrap()
    };
    let (whole, split) = (run("0"), run("1"));
    assert_eq!(whole["batch"], 3);
    for key in ["loss", "grad_norm", "ce", "kl"] {
        let (x, y) = (whole[key].as_f64().unwrap(), split[key].as_f64().unwrap());
        assert!(x > 0.0 && (x - y).abs() <= 1e-4 * x.max(1.0), "{key}: {x} vs {y}");
    }
}

/// `train policy` on CPU (a few GRPO steps on top of the shipped weights) writes a policy and
/// its card; `eval perplexity` then reads it beside the heuristics, every reading on the same
/// tokens, and expanding chunks back to tokens helps on average.
#[test]
fn policy_trains_and_is_read_beside_the_heuristics() {
    let dir = tempfile::tempdir().unwrap();
    let w = shipped_without_policy(dir.path(), "weights");
    let text = fixture("alice_ch1-3.txt");
    let card = train_policy(
        &w,
        &[
            "--steps",
            "3",
            "--s",
            "128",
            "--predict-tokens",
            "16",
            "--group",
            "3",
            "--condition",
            "--text",
            text.to_str().unwrap(),
        ],
    );
    assert_eq!(card["steps_done"], 3);
    assert_eq!(std::fs::read_to_string(w.join("policy_train.jsonl")).unwrap().lines().count(), 3);
    let extra = ["--expand", "0.5", "--policy", "random,ppl-desc,ppl-asc,rl", "--weights"].map(std::ffi::OsStr::new);
    let mut args: Vec<&std::ffi::OsStr> = extra.to_vec();
    args.push(w.as_os_str());
    let rows = crate::train::perplexity_rows(&args);
    let r = &rows[rows.len() - 1];
    let e = r["nll_expanded"].as_object().unwrap();
    assert_eq!(e.len(), 4, "{r}");
    let mean = e.values().map(|v| v.as_f64().unwrap()).sum::<f64>() / 4.0;
    assert!(mean < r["nll_refrag"].as_f64().unwrap(), "half the chunks as tokens should help: {r}");
}

/// `train sft` on a few SQuAD fixture tasks, from the shipped weights: more steps lower the
/// answer loss on those tasks (optimisation, not generalisation), and the outputs are written.
#[test]
fn sft_steps_lower_the_answer_loss() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = squad_tasks(dir.path());
    let weights = Path::new(env!("CARGO_MANIFEST_DIR")).join("weights");
    let nll = |steps: &str, out: &str| -> f64 {
        let v = json_out(
            refrag()
                .args([
                    "train", "sft", "--device", "cpu", "-q", "--batch", "2", "--lr", "3e-4", "--warmup", "0", "--seed",
                    "3",
                ])
                .args(["--encoder-layers", "4", "--decoder-lora", "8", "--distill", "0.5", "--steps", steps, "--init"])
                .arg(&weights)
                .arg("--qa")
                .arg(&tasks)
                .arg("--heldout-qa")
                .arg(&tasks)
                .arg("--out")
                .arg(dir.path().join(out)),
        );
        assert_eq!(v["stage"], "sft");
        let qa = &v["heldout"]["qa"];
        assert_eq!(qa["tasks"], 15);
        // the full-context teacher reads the same tasks in both runs
        qa["answer_nll_refrag"].as_f64().unwrap()
    };
    let before = nll("1", "a");
    let after = nll("8", "b");
    assert!(after < before - 0.1, "answer loss {before} -> {after}");
    let log = std::fs::read_to_string(dir.path().join("b").join("train.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert!(last["kl"].as_f64().unwrap() >= 0.0 && last["ce"].as_f64().unwrap() > 0.0, "{last}");
    for f in ["projector.safetensors", "encoder.safetensors", "decoder_lora.safetensors", "card.json"] {
        assert!(dir.path().join("b").join(f).exists(), "{f}");
    }
}

/// `train sft --recon-weight W --text FILE`: each step adds W times a reconstruction loss on
/// the text (so the chunk vectors keep their content while the reader learns to answer). The
/// answer terms of the first step are those of a run without it (same tasks, same weights);
/// the step's loss is the sum; without --text it is a one-line error.
#[test]
fn sft_keeps_a_reconstruction_term_on_text() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = squad_tasks(dir.path());
    let weights = Path::new(env!("CARGO_MANIFEST_DIR")).join("weights");
    let step = |out: &str, extra: &[&str]| -> std::process::Output {
        refrag()
            .args([
                "train", "sft", "--device", "cpu", "-q", "--batch", "2", "--seed", "3", "--steps", "1",
                "--tokens-per-step", "160", "--max-chunks", "2",
            ])
            .args(["--encoder-layers", "4", "--decoder-lora", "8", "--distill", "0.5", "--init"])
            .arg(&weights)
            .arg("--qa")
            .arg(&tasks)
            .args(extra)
            .arg("--out")
            .arg(dir.path().join(out))
            .output()
            .unwrap()
    };
    let row = |out: &str| -> serde_json::Value {
        let log = std::fs::read_to_string(dir.path().join(out).join("train.jsonl")).unwrap();
        serde_json::from_str(log.lines().next().unwrap()).unwrap()
    };
    let text = fixture("alice_ch1-3.txt");
    let o = step("plain", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = step("recon", &["--recon-weight", "0.5", "--text", text.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (plain, recon) = (row("plain"), row("recon"));
    let x = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k}: {v}"));
    assert!(
        (x(&plain, "ce") - x(&recon, "ce")).abs() < 1e-4 && (x(&plain, "kl") - x(&recon, "kl")).abs() < 1e-4,
        "{plain} vs {recon}"
    );
    assert!(plain["recon"].is_null() && x(&recon, "recon") > 0.5, "{recon}");
    let sum = x(&recon, "ce") + 0.5 * x(&recon, "kl") + 0.5 * x(&recon, "recon");
    assert!((x(&recon, "loss") - sum).abs() < 1e-3, "{recon}");
    let card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("recon/card.json")).unwrap()).unwrap();
    assert!(card["data"].as_str().unwrap().contains("alice_ch1-3.txt"), "{card}");
    let o = step("none", &["--recon-weight", "0.5"]);
    let err = one_line_error(&o);
    assert!(err.contains("--text"), "{err}");
}

/// `train sft --teacher-weights`: the distillation teacher is the decoder with that folder's
/// adapters folded in. Same student, same batch: the first step's answer cross-entropy is the
/// same as with the base teacher, its KL is not; the card names the teacher; a folder without
/// adapters is refused in one line.
#[test]
fn sft_distils_from_a_fine_tuned_teacher() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = squad_tasks(dir.path());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let step_with = |out: &str, teacher: Option<&Path>, extra: &[&str]| -> std::process::Output {
        let mut c = refrag();
        c.args(["train", "sft", "--device", "cpu", "-q", "--batch", "2", "--steps", "1", "--seed", "5"])
            .args(extra)
            .args(["--encoder-layers", "4", "--decoder-lora", "8", "--init"])
            .arg(root.join("weights"))
            .arg("--qa")
            .arg(&tasks)
            .arg("--out")
            .arg(dir.path().join(out));
        if let Some(t) = teacher {
            c.arg("--teacher-weights").arg(t);
        }
        c.output().unwrap()
    };
    let step = |out: &str, teacher: Option<&Path>| step_with(out, teacher, &[]);
    let first = |out: &str| -> serde_json::Value {
        let log = std::fs::read_to_string(dir.path().join(out).join("train.jsonl")).unwrap();
        serde_json::from_str(log.lines().next().unwrap()).unwrap()
    };
    let o = step("base", None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = step("ft", Some(&root.join("weights").join("qa-minilm")));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let card: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(card["config"]["teacher_weights"].as_str().unwrap().ends_with("qa-minilm"), "{card}");
    assert!(card["data"].as_str().unwrap().contains("teacher: base decoder + "), "{card}");
    let (b, f) = (first("base"), first("ft"));
    assert!((b["ce"].as_f64().unwrap() - f["ce"].as_f64().unwrap()).abs() < 1e-6, "{b} {f}");
    assert!((b["kl"].as_f64().unwrap() - f["kl"].as_f64().unwrap()).abs() > 1e-3, "{b} {f}");
    // the layout: weights/ (the --init) names none, so the question goes after the passages;
    // with --question-at both the same step reads another input, and the card says so
    assert_eq!(card["question_at"], "after", "{card}");
    let o = step_with("both", Some(&root.join("weights").join("qa-minilm")), &["--question-at", "both"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let card: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(card["question_at"], "both", "{card}");
    let q = first("both");
    assert!((q["ce"].as_f64().unwrap() - f["ce"].as_f64().unwrap()).abs() > 1e-4, "{q} {f}");
    // no adapters in the folder: one line, exit 2, no run folder left behind
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = step("bad", Some(&empty));
    let err = one_line_error(&o);
    assert!(err.contains("--teacher-weights") && err.contains("decoder_lora.safetensors"), "{err}");
    assert!(!dir.path().join("bad").join("train.jsonl").exists());
}

/// SFT reads a batch in one forward pass with rows right-padded to one length: every row's
/// answer logits equal those of the row read alone (padding never reaches a real position).
#[test]
fn batched_answer_logits_equal_one_at_a_time() {
    use refrag::read::prompt::Segment;
    let dec = decoder();
    let ids = |t: &str| refrag::read::prompt::tokenize(dec, t).unwrap();
    let p1 = vec![vec![Segment::Tokens(ids("Marie Curie was born in Warsaw in 1867 and moved to Paris."))]];
    let p2 = vec![
        vec![Segment::Tokens(ids("The Nile flows north."))],
        vec![Segment::Tokens(ids("It ends in the Mediterranean Sea near Alexandria, a city founded by Alexander."))],
    ];
    let (a1, a2) = (ids("Warsaw<|im_end|>"), ids("the Mediterranean Sea<|im_end|>"));
    let items = vec![
        (refrag::read::prompt::rag("Where was Marie Curie born?", p1, QuestionAt::After), a1.as_slice()),
        (refrag::read::prompt::rag("Where does the Nile end?", p2, QuestionAt::After), a2.as_slice()),
    ];
    let batched = refrag::read::score::answer_logits(dec, &items).unwrap();
    assert_eq!(batched.len(), 2);
    for (i, item) in items.iter().enumerate() {
        let alone = refrag::read::score::answer_logits(dec, std::slice::from_ref(item)).unwrap().remove(0);
        assert_eq!(alone.dims(), batched[i].dims());
        assert_eq!(alone.dims()[0], item.1.len());
        let diff = (&alone - &batched[i]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-3, "row {i}: max |batched - alone| = {diff}");
    }
}

/// SFT tasks keep their last earlier turns (as `eval --conversations` reads them: here as tokens
/// for the teacher), cut to a bounded length; `train sft` trains on such multi-turn tasks.
#[test]
fn sft_reads_earlier_turns() {
    let dec = decoder();
    let pool = refrag::train::sft::QaPool::load(&[fixture("mtrag_tiny.jsonl")], dec).unwrap();
    let ex = pool.examples.iter().find(|e| !e.history.is_empty()).expect("a task with earlier turns");
    assert!(ex.history.len() <= refrag::train::sft::MAX_HISTORY_TURNS);
    let bare = refrag::train::sft::QaExample {
        history: vec![],
        question: ex.question.clone(),
        passages: ex.passages.clone(),
        answer: ex.answer.clone(),
    };
    let with =
        refrag::read::prompt::positions(dec, &refrag::train::sft::full_context_prompt(ex, QuestionAt::After)).unwrap();
    let without =
        refrag::read::prompt::positions(dec, &refrag::train::sft::full_context_prompt(&bare, QuestionAt::After))
            .unwrap();
    let turns: usize = ex.history.iter().map(|(u, a)| u.len() + a.len()).sum();
    assert!(with > without + turns && with < without + turns + 16 * ex.history.len(), "{with} vs {without} + {turns}");

    let dir = tempfile::tempdir().unwrap();
    let o = refrag()
        .args([
            "train", "sft", "--device", "cpu", "-q", "--batch", "2", "--steps", "1", "--encoder-layers", "4",
            "--decoder-lora", "8", "--init",
        ])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/qa-minilm"))
        .arg("--qa")
        .arg(fixture("mtrag_tiny.jsonl"))
        .arg("--out")
        .arg(dir.path().join("o"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = std::fs::read_to_string(dir.path().join("o").join("train.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert!(first["ce"].as_f64().unwrap() > 0.0 && first["kl"].as_f64().unwrap() >= 0.0, "{first}");
}

/// The expansion policy's reward on question tasks (`train policy --qa`): a task read with every
/// chunk expanded is exactly the full-context prompt (same answer loss), and reading the
/// passages as tokens predicts the reference answers better than reading them compressed,
/// which is what the reward pays the policy for.
#[test]
fn answer_reward_reads_expanded_chunks_as_tokens() {
    use refrag::read::score::answer_nll;
    use refrag::train::sft::{full_context_prompt, EncodedTask, QaPool};
    let dir = tempfile::tempdir().unwrap();
    let tasks = squad_tasks(dir.path());
    let mut dec = Decoder::load(&decoder_path(), &candle_core::Device::Cpu, Ops::Differentiable, false).unwrap();
    let qa = Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/qa-minilm");
    let trained = refrag::model::weights::find(&[qa], encoder(), &dec).unwrap().expect("weights/qa-minilm");
    trained.adapt(&mut dec).unwrap();
    let pool = QaPool::load(&[tasks], &dec).unwrap();
    let (mut compressed, mut expanded) = (0.0, 0.0);
    for ex in pool.examples.iter().take(5) {
        let comp = refrag::model::compressor::Compressor::new(&trained.chunk_encoder, &trained.projector, 16);
        let t = EncodedTask::new(&dec, &comp, QuestionAt::After, ex).unwrap();
        let n = t.raw.dim(0).unwrap();
        assert_eq!(n, ex.passages.iter().map(|p| p.len().div_ceil(16)).sum::<usize>());
        let a = ex.answer.as_slice();
        let r = answer_nll(
            &dec,
            &[
                (t.prompt(16, &vec![false; n]).unwrap(), a),
                (t.prompt(16, &vec![true; n]).unwrap(), a),
                (full_context_prompt(ex, QuestionAt::After), a),
            ],
        )
        .unwrap();
        assert!((r[1] - r[2]).abs() < 1e-3, "all expanded {} vs full context {}", r[1], r[2]);
        compressed += r[0];
        expanded += r[1];
    }
    assert!(
        expanded < compressed,
        "answer loss read as tokens {expanded} vs compressed {compressed} (sums over 5 tasks)"
    );
}

/// `train policy --qa --condition --span` learns on question tasks with the question-answering
/// weights and writes a policy started from sim-span that `eval --conversations --policy rl` reads.
#[test]
fn policy_trains_on_answer_reward() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = squad_tasks(dir.path());
    let w = shipped_without_policy(dir.path(), "weights/qa-minilm");
    // --span (started from sim-span) needs --condition
    let o = refrag()
        .args(["train", "policy", "--device", "cpu", "-q", "--span", "--qa"])
        .arg(&tasks)
        .arg("--weights")
        .arg(&w)
        .arg("--out")
        .arg(&w)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--condition"), "{}", String::from_utf8_lossy(&o.stderr));
    let card = train_policy(
        &w,
        &["--steps", "2", "--group", "2", "--expand", "0.25", "--condition", "--span", "--qa", tasks.to_str().unwrap()],
    );
    assert_eq!(card["steps_done"], 2);
    assert_eq!(card["config"]["span"], true, "{card}");
    assert!(card["what"].as_str().unwrap().contains("reference answer"), "{card}");
    assert!(card["data"].as_str().unwrap().contains("tasks.jsonl"), "{card}");
    // the text episodes' window sizes are not listed for a policy trained on tasks
    assert!(card["train"]["s"].is_null() && card["train"]["expand"] == 0.25, "{card}");
    for line in std::fs::read_to_string(w.join("policy_train.jsonl")).unwrap().lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        // the reward is minus an answer loss: negative and finite
        assert!(r["reward_mean"].as_f64().unwrap() < 0.0, "{r}");
    }
    let v = json_out(
        refrag()
            .args([
                "eval", "--device", "cpu", "-q", "--json", "--limit", "2", "--max-tokens", "4", "--mode", "refrag",
                "--policy", "rl", "--expand", "0.25", "--conversations",
            ])
            .arg(&tasks)
            .arg("--weights")
            .arg(&w),
    );
    assert_eq!(v["policy"], "rl", "{v}");
    assert!(v["chunks_expanded"].as_u64().unwrap() > 0, "{v}");
}

/// A policy trained on other chunk vectors than its folder's (new weights copied beside an old
/// policy) is refused by name for `--policy rl`; the folder still reads with other policies.
#[test]
fn a_policy_for_other_chunk_vectors_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let w = shipped_without_policy(dir.path(), "weights/qa-minilm");
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/qa-minilm");
    std::fs::copy(shipped.join("policy.safetensors"), w.join("policy.safetensors")).unwrap();
    let mut card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(shipped.join("policy.json")).unwrap()).unwrap();
    card["chunk_encoder"] = "all-minilm-l6-v2@0+trained@0123456789abcdef".into();
    std::fs::write(w.join("policy.json"), serde_json::to_vec(&card).unwrap()).unwrap();
    let tasks = squad_tasks(dir.path());
    let eval = |policy: &str| {
        refrag()
            .args([
                "eval", "--device", "cpu", "-q", "--json", "--limit", "1", "--max-tokens", "2", "--mode", "refrag",
                "--expand", "0.25", "--policy", policy, "--conversations",
            ])
            .arg(&tasks)
            .arg("--weights")
            .arg(&w)
            .output()
            .unwrap()
    };
    let o = eval("rl");
    let err = one_line_error(&o);
    assert!(err.contains("trained@0123456789abcdef") && err.contains("policy.json"), "{err}");
    let o = eval("sim");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // doctor warns about it
    let o = refrag()
        .args(["doctor", "--json", "--weights"])
        .arg(&w)
        .arg("--db")
        .arg(dir.path().join("none"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    let policy =
        text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).find(|c| c["what"] == "policy");
    assert!(
        policy
            .as_ref()
            .is_some_and(|c| c["status"] == "warn" && c["detail"].to_string().contains("trained@0123456789abcdef")),
        "{text}"
    );
}

/// `eval answers` reads held-out tasks six ways with the shipped `weights/qa`: every reading
/// scores, the gold passage read as tokens makes the base decoder's reference answer likelier
/// than no passage, and the paired differences come with intervals around them. A missing
/// task file is a one-line error (exit 2).
#[test]
fn eval_answers_reads_tasks_six_ways() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = squad_tasks(dir.path());
    let v = json_out(
        refrag().args(["eval", "answers", "--device", "cpu", "-q", "--json", "--limit", "6", "--qa"]).arg(&tasks),
    );
    assert_eq!(v["tasks"], 6, "{v}");
    assert_eq!(v["k"], 16);
    let nll = |r: &str| v["nll"][r].as_f64().unwrap_or_else(|| panic!("{r}: {v}"));
    for r in [
        "none, base decoder", "full, base decoder", "full, adapted decoder", "refrag, no passages",
        "refrag, own passages", "refrag, another task's passages",
    ] {
        assert!(nll(r).is_finite() && nll(r) > 0.0, "{r}: {v}");
    }
    assert!(nll("full, base decoder") < nll("none, base decoder") - 0.1, "{v}");
    let paired = v["paired"].as_object().unwrap();
    assert_eq!(paired.len(), 3, "{v}");
    for (name, d) in paired {
        let (m, lo, hi) = (
            d["difference"].as_f64().unwrap(),
            d["interval_95"][0].as_f64().unwrap(),
            d["interval_95"][1].as_f64().unwrap(),
        );
        assert!(lo <= m && m <= hi, "{name}: {d}");
    }
    // own - no passages is the difference of the two readings' means
    let own_none = paired["refrag, own - no passages"]["difference"].as_f64().unwrap();
    assert!((own_none - (nll("refrag, own passages") - nll("refrag, no passages"))).abs() < 1e-9, "{v}");

    let missing = dir.path().join("nope.jsonl");
    let o = refrag().args(["eval", "answers", "--device", "cpu", "-q", "--qa"]).arg(&missing).output().unwrap();
    let err = one_line_error(&o);
    assert!(err.contains("nope.jsonl"), "{err}");
}

/// `eval readback`: for held-out tasks whose answer lies within one chunk of the passage, the
/// decoder writes what it reads in that chunk's vector alone and in another task's. Every probed
/// chunk holds its answer, the read-back of a chunk's own vector is closer to its text than the
/// control's (the vector carries its chunk's gist), and the paired difference of the answer's
/// share comes with an interval around it. `--limit 0` is a one-line error (exit 2).
#[test]
fn eval_readback_reads_the_answer_chunk_back_from_its_vector() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = squad_tasks(dir.path());
    let v = json_out(
        refrag()
            .args(["eval", "readback", "--device", "cpu", "-q", "--json", "--limit", "6", "--show", "6", "--qa"])
            .arg(&tasks),
    );
    assert_eq!((&v["tasks"], &v["k"]), (&6.into(), &16.into()), "{v}");
    let probed = v["probed"].as_u64().unwrap();
    assert!((1..=6).contains(&probed), "{v}");
    let examples = v["examples"].as_array().unwrap();
    assert_eq!(examples.len() as u64, probed, "{v}");
    for e in examples {
        let (answer, chunk) = (e["answer"].as_str().unwrap(), e["chunk"].as_str().unwrap());
        assert!(refrag::eval::metrics::contains_any(chunk, &[answer.to_string()]), "{e}");
        assert!(!e["own"].as_str().unwrap().trim().is_empty(), "{e}");
    }
    assert!(v["chunk_f1"]["own"].as_f64().unwrap() > v["chunk_f1"]["other"].as_f64().unwrap(), "{v}");
    let r = &v["answer_read_back"];
    let (own, other, d) = (r["own"].as_f64().unwrap(), r["other"].as_f64().unwrap(), r["difference"].as_f64().unwrap());
    assert!(
        (d - (own - other)).abs() < 1e-9
            && r["interval_95"][0].as_f64().unwrap() <= d
            && d <= r["interval_95"][1].as_f64().unwrap(),
        "{v}"
    );
    // the answer's tokens, read back teacher-forced, are likelier from their own chunk's vector
    let n = &v["answer_token_nll"];
    assert!(n["tasks"].as_u64().unwrap() >= 1 && n["tasks"].as_u64().unwrap() <= probed, "{v}");
    assert!(n["own"].as_f64().unwrap() > 0.0 && n["own"].as_f64().unwrap() < n["other"].as_f64().unwrap(), "{v}");
    let o = refrag()
        .args(["eval", "readback", "--device", "cpu", "-q", "--limit", "0", "--qa"])
        .arg(&tasks)
        .output()
        .unwrap();
    let err = one_line_error(&o);
    assert!(err.contains("--limit 0"), "{err}");
}
