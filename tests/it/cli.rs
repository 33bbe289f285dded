use crate::common::*;

/// Plain RAG from a context file: the answer contains the gold answer.
#[test]
fn ask_with_context_file_answers_from_it() {
    let out = refrag()
        .args(["ask", "--device", "cpu", "--json", "--context"])
        .arg(fixture("corpus/warsaw-1.txt"))
        .arg("What was Maria Curie the first female recipient of?")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stderr: {stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let answer = v["answer"].as_str().unwrap();
    assert!(answer.contains("Nobel Prize"), "answer: {answer}");
    assert!(v["ttft_ms"].as_f64().unwrap() > 0.0);
    assert!(v["prompt_tokens"].as_u64().unwrap() > 100);
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    let out = refrag().args(["ask", "--context", "/nonexistent/file.txt", "q"]).output().unwrap();
    let err = one_line_error(&out);
    assert!(err.starts_with("refrag: /nonexistent/file.txt"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin.txt");
    std::fs::write(&bin, b"caf\xe9 au lait").unwrap();
    let out = refrag().args(["ask", "--context"]).arg(&bin).arg("q").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not UTF-8"));

    let fake = dir.path().join("fake.gguf");
    std::fs::write(&fake, b"GGUF but not really").unwrap();
    let out = refrag()
        .args(["ask", "--decoder"])
        .arg(&fake)
        .args(["--context"])
        .arg(fixture("corpus/warsaw-1.txt"))
        .arg("q")
        .output()
        .unwrap();
    let err = one_line_error(&out);
    assert!(err.contains("fake.gguf"), "{err}");

    let out = refrag().args(["ask", "--no-such-flag"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// The committed man pages are what the CLI definitions generate (regenerate with
/// `cargo run --release -- man man`).
#[test]
fn man_pages_match_the_cli() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("man");
    let pages = refrag::cli::docs::man_pages().unwrap();
    assert!(pages.len() >= 6);
    for (name, text) in pages {
        let committed =
            std::fs::read(dir.join(&name)).unwrap_or_else(|_| panic!("man/{name} missing: run `refrag man man`"));
        assert!(committed == text, "man/{name} is stale: run `refrag man man`");
    }
}

#[test]
fn completions_and_json_outputs_parse() {
    let out = refrag().args(["completions", "bash"]).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("refrag"));
    let out = refrag().args(["models", "list", "--json"]).output().unwrap();
    assert!(out.status.success());
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["present"].as_bool().unwrap(), "{v}");
    }
}

/// The question may come from stdin.
#[test]
fn question_from_stdin() {
    use std::io::Write;
    let mut child = refrag()
        .args(["ask", "--device", "cpu", "--json", "--max-tokens", "8", "--context"])
        .arg(fixture("corpus/warsaw-1.txt"))
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"In what year was Casimir Pulaski born?\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["answer"].as_str().unwrap().contains("1745"), "{v}");
}

/// Defaults come from the config file below environment variables and flags:
/// flag > env > file > built-in default. A typo in the file is an error naming its line.
#[test]
fn config_file_precedence() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, "# test\nmax-tokens = 2\ndevice = \"cpu\"\n").unwrap();
    let run = |env: Option<&str>, flag: Option<&str>| -> u64 {
        let mut c = refrag();
        c.env("REFRAG_CONFIG", &cfg).env_remove("REFRAG_MAX_TOKENS");
        if let Some(e) = env {
            c.env("REFRAG_MAX_TOKENS", e);
        }
        c.args(["ask", "--json", "--context"]).arg(fixture("corpus/warsaw-1.txt"));
        if let Some(f) = flag {
            c.args(["--max-tokens", f]);
        }
        let out = c.arg("Describe Warsaw in detail.").output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["device"], "cpu", "{v}");
        v["generated_tokens"].as_u64().unwrap()
    };
    assert_eq!(run(None, None), 2, "file");
    assert_eq!(run(Some("3"), None), 3, "env over file");
    assert_eq!(run(Some("3"), Some("1")), 1, "flag over env");

    std::fs::write(&cfg, "device = \"cpu\"\nmax_tokenz = 2\n").unwrap();
    let out = refrag().env("REFRAG_CONFIG", &cfg).args(["models", "list"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("config.toml:2: unknown setting `max_tokenz`"), "{err}");
}

/// `doctor` passes on a working setup (no index yet is a warning) and fails, exit 1, on a
/// database path that is not an index; its JSON lines parse.
#[test]
fn doctor_reports_and_exits_by_health() {
    let dir = tempfile::tempdir().unwrap();
    let out = refrag().args(["doctor", "--json", "--db"]).arg(dir.path().join("nothing")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let checks: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let status =
        |what: &str| checks.iter().find(|c| c["what"] == what).map(|c| c["status"].as_str().unwrap().to_string());
    assert_eq!(status("decoder").as_deref(), Some("ok"));
    assert_eq!(status("encoder").as_deref(), Some("ok"));
    assert_eq!(status("index").as_deref(), Some("warn"));
    // the shipped weights: weights/qa for questions, weights/ for text
    let weights = checks.iter().find(|c| c["what"] == "weights").unwrap().to_string().replace("\\\\", "/");
    assert!(
        weights.contains("weights/qa (k = 16") && weights.contains("for text (perplexity, bench, train)"),
        "{weights}"
    );
    // weights/qa: the chunk encoder grown from the decoder, no trained policy (sim-span needs none)
    assert!(
        weights.contains("chunk encoder grown from the decoder")
            && !weights.contains("expansion policy")
            && status("policy").is_none(),
        "{weights}"
    );
    assert!(weights.contains("question read before and after the passages"), "{weights}");
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let out = refrag().args(["doctor", "--db"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAIL index"));
}

/// Output to pipes and NO_COLOR: no escape codes, even with logging on; a reader that goes
/// away early is not an error.
#[test]
fn plain_output_and_closed_pipes() {
    let out = refrag()
        .args(["-v", "ask", "--device", "cpu", "--max-tokens", "3", "--context"])
        .arg(fixture("corpus/warsaw-1.txt"))
        .arg("Where is Warsaw?")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!out.stdout.contains(&0x1b) && !out.stderr.contains(&0x1b), "escape codes in output");
    assert!(String::from_utf8_lossy(&out.stderr).contains("first token after"), "-v logs");

    let mut child = refrag()
        .args(["completions", "zsh"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}

/// `dataset --tasks`: each question with its gold passage among `--distractors` others, in the
/// `eval --conversations` format; `--split train|test` partition whole articles.
#[test]
fn dataset_tasks_and_splits() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = dir.path().join("tasks.jsonl");
    let out = refrag()
        .args(["dataset", "squad", "--distractors", "1", "--tasks"])
        .arg(&tasks)
        .arg(fixture("squad_tiny.json"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(&tasks).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 15);
    let corpus = std::fs::read_to_string(fixture("squad_corpus.jsonl")).unwrap();
    let questions: Vec<serde_json::Value> = std::fs::read_to_string(fixture("squad_questions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (r, q) in rows.iter().zip(&questions) {
        assert_eq!(r["input"][0]["text"], q["question"]);
        let ctx = r["contexts"].as_array().unwrap();
        assert_eq!(ctx.len(), 2, "{r}");
        assert_ne!(ctx[0]["text"], ctx[1]["text"]);
        // the gold paragraph is one of the two: it holds every reference answer
        let targets: Vec<&str> = r["targets"].as_array().unwrap().iter().map(|t| t["text"].as_str().unwrap()).collect();
        assert!(!targets.is_empty(), "{r}");
        assert!(ctx.iter().any(|c| targets.iter().all(|a| c["text"].as_str().unwrap().contains(a))), "{r}");
        assert!(ctx.iter().all(|c| corpus.contains(&serde_json::to_string(&c["text"]).unwrap())));
    }
    // One article: with every share it lands wholly on one side (an empty side is an error).
    let count = |split: &str, share: &str| -> usize {
        let p = dir.path().join(format!("{split}{share}.jsonl"));
        let out = refrag()
            .args(["dataset", "squad", "--split", split, "--test-share", share, "--questions"])
            .arg(&p)
            .arg(fixture("squad_tiny.json"))
            .output()
            .unwrap();
        if !out.status.success() {
            assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("no documents in the {split} part")));
            return 0;
        }
        std::fs::read_to_string(&p).unwrap().lines().count()
    };
    for share in ["0", "0.5", "1"] {
        assert_eq!(count("train", share) + count("test", share), 15, "share {share}");
    }
    assert_eq!(count("test", "0"), 0);
    assert_eq!(count("train", "1"), 0);
}

/// `dataset cloze`: one fill-in-the-blank question per paragraph; the answer, put back in the
/// blank, gives a sentence of the gold passage and is not elsewhere in the question; the same
/// input gives the same questions; `--split` partitions the paragraphs; non-UTF-8 input exits 2.
#[test]
fn dataset_cloze_blanks_a_span_of_its_passage() {
    let dir = tempfile::tempdir().unwrap();
    let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let core = |w: &str| w.trim_matches(|c: char| !c.is_alphanumeric()).to_lowercase();
    let make = |file: &str, extra: &[&str], name: &str| -> (std::process::Output, std::path::PathBuf) {
        let q = dir.path().join(format!("{name}.q.jsonl"));
        let t = dir.path().join(format!("{name}.t.jsonl"));
        let out = refrag()
            .args(["dataset", "cloze", "--questions"])
            .arg(&q)
            .arg("--tasks")
            .arg(&t)
            .args(extra)
            .arg(fixture(file))
            .output()
            .unwrap();
        (out, q)
    };
    let rows = |p: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let (out, q) = make("alice_ch1-3.txt", &["--distractors", "1"], "a");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let qs = rows(&q);
    let tasks = rows(&dir.path().join("a.t.jsonl"));
    assert!(qs.len() >= 20, "{} questions", qs.len());
    assert_eq!(tasks.len(), qs.len());
    for (q, t) in qs.iter().zip(&tasks) {
        let question = q["question"].as_str().unwrap();
        let answer = q["answers"][0].as_str().unwrap();
        let sentence = question.strip_prefix("Fill in the blank: ").expect(question);
        assert_eq!(sentence.matches("____").count(), 1, "{q}");
        let ctx = t["contexts"].as_array().unwrap();
        assert_eq!(ctx.len(), 2, "{t}");
        let gold = ctx.iter().find(|c| c["document_id"] == q["gold_doc"]).expect("gold passage in the task");
        assert!(squash(gold["text"].as_str().unwrap()).contains(&squash(&sentence.replace("____", answer))), "{q}");
        let others: Vec<String> = sentence.split_whitespace().map(core).collect();
        assert!(answer.split_whitespace().all(|w| !others.contains(&core(w))), "{q}");
        assert_eq!(t["targets"][0]["text"], answer);
    }
    // fixed by the paragraph, not by chance
    let (again, q2) = make("alice_ch1-3.txt", &["--distractors", "1"], "b");
    assert!(again.status.success());
    assert_eq!(std::fs::read_to_string(&q).unwrap(), std::fs::read_to_string(&q2).unwrap());
    let n = |split: &str| -> usize {
        let (out, q) = make("alice_ch1-3.txt", &["--split", split, "--test-share", "0.5"], split);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        rows(&q).len()
    };
    let (train, test) = (n("train"), n("test"));
    assert!(train > 0 && test > 0);
    assert_eq!(train + test, qs.len());
    // a Wikipedia-style paragraph: the blank is a name
    let (out, q) = make("corpus/warsaw-1.txt", &[], "w");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let w = rows(&q);
    assert_eq!(w.len(), 1);
    assert!(w[0]["answers"][0].as_str().unwrap().chars().next().unwrap().is_uppercase(), "{}", w[0]);
    // bad input: one line naming the file, exit 2, nothing written
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, b"caf\xe9 au lait\n\nmore text here").unwrap();
    let t = dir.path().join("bad.t.jsonl");
    let out = refrag().args(["dataset", "cloze", "--tasks"]).arg(&t).arg(&bad).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("bad.txt") && err.contains("UTF-8"), "{err}");
    assert!(!t.exists());
}

/// `ask --json --context warsaw-2.txt "Who was Chopin?"` with `extra` options, on the CPU.
fn ask_chopin(max_tokens: &str, extra: &[&str]) -> serde_json::Value {
    let out = refrag()
        .args(["ask", "--device", "cpu", "--json", "--max-tokens", max_tokens, "--context"])
        .arg(fixture("corpus/warsaw-2.txt"))
        .args(extra)
        .arg("Who was Chopin?")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `ask --context` reads the files as --mode says: compressed chunks in refrag mode (fewer
/// decoder positions), with the policy's share of chunks expanded back to tokens.
#[test]
fn ask_context_in_refrag_mode_compresses_and_expands() {
    let run = |extra: &[&str]| ask_chopin("8", extra);
    let full = run(&[]);
    let compressed = run(&["--mode", "refrag", "--expand", "0"]);
    let expanded = run(&["--mode", "refrag", "--expand", "0.5", "--policy", "sim"]);
    assert_eq!(full["mode"], "full");
    assert_eq!(compressed["mode"], "refrag");
    let pos = |v: &serde_json::Value| v["decoder_positions"].as_u64().unwrap();
    // warsaw-2 is ~380 tokens: 24 chunks read as 24 positions instead of ~380
    assert!(pos(&compressed) * 3 < pos(&full), "{compressed} vs {full}");
    assert_eq!(compressed["expanded_chunks"], 0);
    let n = expanded["expanded_chunks"].as_u64().unwrap();
    assert!(n >= 10, "{expanded}");
    // each expanded chunk takes up to k = 16 positions instead of 1
    assert!(pos(&expanded) > pos(&compressed) + n * 8, "{expanded} vs {compressed}");
    // the default policy is sim-span: as many chunks, in windows around the closest ones
    let default = run(&["--mode", "refrag", "--expand", "0.5"]);
    let span = run(&["--mode", "refrag", "--expand", "0.5", "--policy", "sim-span"]);
    assert_eq!(default["expanded_chunks"], expanded["expanded_chunks"]);
    assert_eq!((&default["answer"], pos(&default)), (&span["answer"], pos(&span)));
    assert_eq!(
        (&default["policy"], &expanded["policy"], &compressed["policy"]),
        (&"sim-span".into(), &"sim".into(), &serde_json::Value::Null)
    );
    // --budget N: as many chunks as keep the passages within N positions
    let all = run(&["--mode", "refrag", "--budget", "100000"]);
    let chunks = all["expanded_chunks"].as_u64().unwrap();
    assert!(chunks >= 20 && pos(&all) + 30 > pos(&full), "{all} vs {full}");
    assert_eq!(run(&["--mode", "refrag", "--budget", "3"])["expanded_chunks"], 0);
    let b = run(&["--mode", "refrag", "--budget", &(chunks + 5 * 15).to_string()]);
    assert_eq!(
        (&b["expanded_chunks"], &b["policy"], &b["expand"]),
        (&5.into(), &"sim-span".into(), &serde_json::Value::Null)
    );
    let grown = pos(&b) - pos(&compressed);
    assert!(grown > 5 * 8 && grown <= 5 * 15, "{b} vs {compressed}");
    let out = refrag()
        .args(["ask", "--device", "cpu", "--mode", "refrag", "--expand", "0.5", "--budget", "50", "--context"])
        .arg(fixture("corpus/warsaw-2.txt"))
        .arg("Who was Chopin?")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    // without --expand, the share the weights' card recommends (weights/qa: 0.25, sim-span)
    let card = run(&["--mode", "refrag"]);
    let all_chunks = chunks as f64;
    assert_eq!(
        (&card["expand"], &card["policy"], &compressed["expand"]),
        (&0.25.into(), &"sim-span".into(), &0.0.into()),
        "{card}"
    );
    assert_eq!(
        run(&["--mode", "refrag", "--policy", "none"])["expand"],
        0.0,
        "--policy none expands nothing, and says so"
    );
    let n = card["expanded_chunks"].as_u64().unwrap() as f64;
    assert!((n - 0.25 * all_chunks).abs() <= 1.0, "{card}: {n} of {all_chunks}");
    // a card whose share is not one: one line naming it, exit 2; a card with none: nothing expanded
    let dir = tempfile::tempdir().unwrap();
    let qa = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/qa");
    for f in std::fs::read_dir(&qa).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    let text = std::fs::read_to_string(dir.path().join("card.json")).unwrap();
    std::fs::write(dir.path().join("card.json"), text.replace("\"expand\": 0.25", "\"expand\": 2")).unwrap();
    let out = ask_chopin_with(dir.path());
    let err = one_line_error(&out);
    assert!(err.contains("card.json") && err.contains("expand"), "{err}");
    std::fs::write(dir.path().join("card.json"), text.replace("\"expand\": 0.25,", "")).unwrap();
    let w = dir.path().to_str().unwrap();
    assert_eq!(run(&["--mode", "refrag", "--weights", w])["expanded_chunks"], 0);
}

/// `--question-at auto` reads the question where the weights that answer were trained to find
/// it (the shipped weights/qa: before and after the passages), and after the passages for the
/// base decoder; a choice on the command line wins.
#[test]
fn the_question_is_read_where_the_weights_were_trained_to_find_it() {
    let card: serde_json::Value = serde_json::from_slice(
        &std::fs::read(env!("CARGO_MANIFEST_DIR").to_string() + "/weights/qa/card.json").unwrap(),
    )
    .unwrap();
    assert_eq!(card["question_at"], "both", "the shipped weights/qa were trained with the question on both sides");
    let run = |extra: &[&str]| ask_chopin("4", extra);
    let pos = |v: &serde_json::Value| v["decoder_positions"].as_u64().unwrap();
    let compressed = run(&["--mode", "refrag", "--expand", "0"]);
    let after = run(&["--mode", "refrag", "--expand", "0", "--question-at", "after"]);
    let full = run(&["--mode", "full"]);
    let adapted = run(&["--mode", "full", "--adapted"]);
    let full_both = run(&["--mode", "full", "--question-at", "both"]);
    let before = run(&["--mode", "refrag", "--expand", "0", "--question-at", "before"]);
    assert_eq!(
        (&compressed["question_at"], &after["question_at"], &before["question_at"]),
        (&"both".into(), &"after".into(), &"before".into())
    );
    assert_eq!(
        (&full["question_at"], &adapted["question_at"], &full_both["question_at"]),
        (&"after".into(), &"both".into(), &"both".into())
    );
    // the copy in front costs the same positions in either reading: "Question: Who was Chopin?\n\n"
    let extra = pos(&compressed) - pos(&after);
    assert!((5..=15).contains(&extra), "{compressed} vs {after}");
    assert_eq!(pos(&full_both) - pos(&full), extra);
    assert_eq!(pos(&adapted), pos(&full_both));
    // before: the copy in front, none after (nor the blank line that led to it)
    let gone = pos(&compressed) - pos(&before);
    assert!(gone + 2 >= extra && gone <= extra + 2, "{compressed} vs {before}");
    // a card naming no layout: one line naming the card, exit 2
    let dir = tempfile::tempdir().unwrap();
    let qa = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/qa");
    for f in std::fs::read_dir(&qa).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    let card = std::fs::read_to_string(dir.path().join("card.json"))
        .unwrap()
        .replace("\"question_at\": \"both\"", "\"question_at\": \"middle\"");
    std::fs::write(dir.path().join("card.json"), card).unwrap();
    let out = ask_chopin_with(dir.path());
    let err = one_line_error(&out);
    assert!(err.contains("card.json") && err.contains("middle"), "{err}");
}

/// HotpotQA and MTRAG importers: corpus, questions with gold ids, tasks.
#[test]
fn dataset_hotpot_and_mtrag() {
    let dir = tempfile::tempdir().unwrap();
    let read = |p: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let (c, q, t) = (dir.path().join("c.jsonl"), dir.path().join("q.jsonl"), dir.path().join("t.jsonl"));
    for (kind, file) in [("hotpot", "hotpotqa_tiny.json"), ("mtrag", "mtrag_tiny.jsonl")] {
        let out = refrag()
            .args(["dataset", kind, "--corpus"])
            .arg(&c)
            .arg("--questions")
            .arg(&q)
            .arg("--tasks")
            .arg(&t)
            .arg(fixture(file))
            .output()
            .unwrap();
        assert!(out.status.success(), "{kind}: {}", String::from_utf8_lossy(&out.stderr));
        let (docs, qs, tasks) = (read(&c), read(&q), read(&t));
        let ids: std::collections::HashSet<&str> = docs.iter().map(|d| d["id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), docs.len(), "{kind}: document ids are unique");
        assert!(docs.iter().all(|d| !d["text"].as_str().unwrap().trim().is_empty()), "{kind}");
        match kind {
            "hotpot" => {
                assert_eq!(docs.len(), 50); // 5 questions x 10 distinct paragraphs
                assert_eq!(qs.len(), 5);
                assert_eq!(qs[0]["answers"][0], "a spirit");
                assert_eq!(qs[0]["gold_docs"], serde_json::json!(["Alû", "Lilu (mythology)"]));
                assert_eq!(tasks[0]["contexts"].as_array().unwrap().len(), 10);
            }
            _ => {
                assert_eq!(qs.len(), 3);
                assert_eq!(tasks.len(), 3);
                // answerable turns have their reference passages as gold; the unanswerable one none
                for x in &qs {
                    assert_eq!(
                        x["answerable"].as_bool().unwrap(),
                        !x["gold_docs"].as_array().unwrap().is_empty(),
                        "{x}"
                    );
                }
                assert_eq!(qs.iter().filter(|x| x["answerable"] == false).count(), 1);
                assert_eq!(
                    qs[0]["question"].as_str().unwrap(),
                    tasks[0]["input"].as_array().unwrap().last().unwrap()["text"]
                );
            }
        }
        for x in &qs {
            for g in x["gold_docs"].as_array().unwrap() {
                assert!(ids.contains(g.as_str().unwrap()), "{kind}: gold {g} in the corpus");
            }
        }
    }
}

/// `eval compare` pairs two readings' answer files by question id: exact mean differences, a
/// bootstrap interval around them, and one-line errors (exit 2) for files it cannot pair.
#[test]
fn eval_compare_pairs_answers_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, lines: Vec<String>| {
        let p = dir.path().join(name);
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        p
    };
    // base: 20 questions at F1 0.2; new: the same in reverse order plus one more, F1 +0.1 on
    // the even ids, contains on the first five
    let mut rows: Vec<String> =
        (0..20).map(|i| format!(r#"{{"id":"q{i}","f1":0.2,"em":0.0,"contains_gold":false}}"#)).collect();
    // a question without an answer is left out of the pairing, as eval's F1 leaves it out
    rows.push(r#"{"id":"u","f1":0.0,"em":0.0,"contains_gold":false,"unanswerable":true}"#.into());
    let base = write("base.jsonl", rows);
    let new = write(
        "new.jsonl",
        (0..21)
            .rev()
            .map(|i| {
                format!(
                    r#"{{"id":"q{i}","f1":{},"em":0.0,"contains_gold":{}}}"#,
                    if i % 2 == 0 { 0.3 } else { 0.2 },
                    i < 5
                )
            })
            .collect(),
    );
    let compare = |b: &std::path::Path, n: &std::path::Path, json: bool| {
        let mut c = refrag();
        c.args(["eval", "compare", "--base"]).arg(b).arg("--new").arg(n);
        if json {
            c.arg("--json");
        }
        c.output().unwrap()
    };
    let o = compare(&base, &new, true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["questions"].as_u64(), v["only_in_new"].as_u64(), v["only_in_base"].as_u64()),
        (Some(20), Some(1), Some(0)),
        "{v}"
    );
    let f1 = &v["metrics"]["f1"];
    let d = f1["difference"].as_f64().unwrap();
    assert!((d - 0.05).abs() < 1e-9 && (f1["new"].as_f64().unwrap() - 0.25).abs() < 1e-9, "{f1}");
    let (lo, hi) = (f1["interval_95"][0].as_f64().unwrap(), f1["interval_95"][1].as_f64().unwrap());
    assert!(0.0 <= lo && lo < d && d < hi && hi <= 0.1, "{f1}");
    assert!((v["metrics"]["contains_gold"]["difference"].as_f64().unwrap() - 0.25).abs() < 1e-9, "{v}");
    let o = compare(&base, &new, false);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("20 questions paired by id"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // files it cannot pair: a malformed line (named by file and line), no common ids, unequal lists
    let bad = write(
        "bad.jsonl",
        vec![r#"{"id":"q0","f1":0.1}"#.into(), r#"{"id":"q1","f1":0.1}"#.into(), "{not json".into()],
    );
    let other = write("other.jsonl", vec![r#"{"id":"x","f1":0.1}"#.into()]);
    let retrieval = write("retrieval.jsonl", (0..20).map(|i| format!(r#"{{"id":"q{i}","sources":[]}}"#)).collect());
    for (o, want) in [
        (compare(&base, &bad, false), "bad.jsonl:3"),
        (compare(&base, &retrieval, false), "no answer scores"),
        (compare(&base, &other, false), "no question ids in common"),
        (
            refrag().args(["eval", "compare", "--base"]).arg(&base).arg(&base).arg("--new").arg(&new).output().unwrap(),
            "--base has 2 files",
        ),
    ] {
        let err = one_line_error(&o);
        assert!(err.contains(want), "{err}");
    }
}

/// `ask --mode refrag` about Chopin with the weights in `dir`, from the fixture passage.
fn ask_chopin_with(dir: &std::path::Path) -> std::process::Output {
    refrag()
        .args(["ask", "--device", "cpu", "--mode", "refrag", "--weights"])
        .arg(dir)
        .arg("--context")
        .arg(fixture("corpus/warsaw-2.txt"))
        .arg("Who was Chopin?")
        .output()
        .unwrap()
}

/// `bench` times each reading to its whole answer (prefill, first token, later tokens), and
/// REFRAG's compressed prefill holds fewer positions than full context.
#[test]
fn bench_reports_whole_answer_times() {
    let out = refrag()
        .args(["bench", "--device", "cpu", "--contexts", "160", "--k", "16", "--repeats", "1"])
        .args(["--decode-tokens", "2", "--no-encoder", "--json", "-q"])
        .output()
        .unwrap();
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let row = |name: &str| rows.iter().find(|r| r["variant"] == name).unwrap_or_else(|| panic!("no {name} row"));
    let (full, refrag) = (row("full"), row("refrag-16-cached"));
    for r in [full, refrag] {
        let (ttft, ttit) = (r["ttft_ms_median"].as_f64().unwrap(), r["ttit_ms_median"].as_f64().unwrap());
        let answer = r["answer_ms_median"].as_f64().unwrap();
        assert!(ttft > 0.0 && ttit > 0.0, "{r}");
        assert!(answer >= ttft + ttit, "the answer takes its first and two later tokens: {r}");
    }
    assert!(refrag["positions"].as_u64() < full["positions"].as_u64(), "{refrag} vs {full}");
}
