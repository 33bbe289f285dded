//! index → ask → eval through the real binary, real models and a real LanceDB in a temp dir.

use crate::common::*;
use std::path::Path;

fn index(db: &Path, extra: &[&str]) -> serde_json::Value {
    let out = refrag()
        .args(["index", "--device", "cpu", "--json", "--db"])
        .arg(db)
        .arg(fixture("corpus"))
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn ask(db: &Path, q: &str, extra: &[&str]) -> (std::process::ExitStatus, serde_json::Value, String) {
    let out = refrag().args(["ask", "--device", "cpu", "--json", "--db"]).arg(db).args(extra).arg(q).output().unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status, v, String::from_utf8_lossy(&out.stderr).to_string())
}

#[test]
fn index_reindex_ask_eval() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");

    let first = index(&db, &[]);
    assert_eq!(first["documents"], 3);
    assert_eq!(first["added"], 3);
    let rows = first["rows_total"].as_u64().unwrap();
    assert!(rows >= 3, "{first}");
    assert!(first["chunks"].as_u64().unwrap() > rows * 4, "{first}");

    // Re-indexing the same files changes nothing and adds no duplicates.
    let again = index(&db, &[]);
    assert_eq!(again["unchanged"], 3);
    assert_eq!(again["added"], 0);
    assert_eq!(again["rows_total"].as_u64().unwrap(), rows);

    // Another k on the same index is refused.
    let out = refrag().args(["index", "--k", "8", "--db"]).arg(&db).arg(fixture("corpus")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("k = 16"));

    // Full-context RAG over the index answers from the right passage.
    let (st, v, err) = ask(&db, "What year was Casimir Pulaski born in Warsaw?", &["--mode", "full", "--top-k", "1"]);
    assert!(st.success(), "{err}");
    assert!(v["answer"].as_str().unwrap().contains("1745"), "{v}");
    assert!(v["sources"][0]["doc_id"].as_str().unwrap().eq("warsaw-1.txt"), "{v}");
    let full_positions = v["decoder_positions"].as_u64().unwrap();
    assert!(v["retrieval_ms"].as_f64().unwrap() > 0.0);
    // building the input is part of the time to the first token
    let input_ms = v["input_ms"].as_f64().unwrap();
    assert!(input_ms > 0.0 && input_ms < v["ttft_ms"].as_f64().unwrap(), "{v}");

    // --mode none reads no passages: answering without any is a success, not "nothing found"
    let (st, v, err) = ask(&db, "What is the capital of Poland?", &["--mode", "none", "--max-tokens", "4"]);
    assert!(st.success(), "{err}");
    assert_eq!(v["sources"].as_array().map(Vec::len), Some(0), "{v}");

    // Hybrid search (vector + BM25 fused by rank) finds the passage naming the garden.
    let (st, v, err) = ask(
        &db,
        "Where is the Tomb of the Unknown Soldier?",
        &["--mode", "full", "--search", "hybrid", "--top-k", "2", "--max-tokens", "4"],
    );
    assert!(st.success(), "{err}");
    assert_eq!(v["sources"][0]["doc_id"], "warsaw-2.txt", "{v}");

    // No trained projector: refrag mode says so instead of printing noise.
    let empty = dir.path().join("no-weights");
    std::fs::create_dir_all(&empty).unwrap();
    let (st, _, err) = ask(&db, "Who was Chopin?", &["--mode", "refrag", "--weights", empty.to_str().unwrap()]);
    assert_eq!(st.code(), Some(2));
    assert!(err.contains("projector"), "{err}");

    // Weights whose chunk encoder differs from the one that made the index's chunk vectors
    // (here: an untrained projector, i.e. the base encoder) are refused, not read as noise.
    let w = dir.path().join("weights");
    std::fs::create_dir_all(&w).unwrap();
    let vm = candle_nn::VarMap::new();
    refrag::model::projector::Projector::init(&vm, &candle_core::Device::Cpu, 384, 576).unwrap();
    vm.save(w.join("projector.safetensors")).unwrap();
    let (st, _, err) = ask(&db, "Who was Chopin?", &["--mode", "refrag", "--weights", w.to_str().unwrap()]);
    assert_eq!(st.code(), Some(2), "{err}");
    assert!(err.contains("chunk vectors were made by"), "{err}");

    // With the shipped weights (the index was built with their chunk encoder), the decoder
    // reads one position per chunk: far fewer positions than full mode, and expanding 25% of
    // the chunks adds tokens.
    let args = ["--mode", "refrag", "--top-k", "1", "--max-tokens", "4"];
    let mut none = args.to_vec();
    none.extend(["--expand", "0"]);
    let (st, v, err) = ask(&db, "What year was Casimir Pulaski born in Warsaw?", &none);
    assert!(st.success(), "{err}");
    let chunks = v["chunks"].as_u64().unwrap();
    let compressed_positions = v["decoder_positions"].as_u64().unwrap();
    assert!(chunks > 4);
    assert_eq!(v["expanded_chunks"], 0);
    assert!(compressed_positions + 20 < full_positions, "{compressed_positions} vs {full_positions}");
    let mut more = args.to_vec();
    more.extend(["--expand", "0.25", "--policy", "sim"]);
    let (st, v, err) = ask(&db, "What year was Casimir Pulaski born in Warsaw?", &more);
    assert!(st.success(), "{err}");
    let expanded = v["expanded_chunks"].as_u64().unwrap();
    assert_eq!(expanded, ((chunks as f64) * 0.25).round() as u64);
    assert!(v["decoder_positions"].as_u64().unwrap() > compressed_positions + expanded * 8);
    // Every policy behind the same interface expands the same share (the shipped weights/qa
    // have no RL policy: `--policy rl` over an index is covered by the MiniLM weights' tests).
    for policy in ["sim-span", "ppl-desc", "ppl-asc", "random"] {
        let mut a = args.to_vec();
        a.extend(["--expand", "0.25", "--policy", policy]);
        let (st, v, err) = ask(&db, "What year was Casimir Pulaski born in Warsaw?", &a);
        assert!(st.success(), "{policy}: {err}");
        assert_eq!(v["expanded_chunks"].as_u64().unwrap(), expanded, "{policy}");
    }
    // Without --mode, ask reads compressed (the index was built with the answer weights), with
    // the share their card recommends expanded.
    let (st, v, err) =
        ask(&db, "What year was Casimir Pulaski born in Warsaw?", &["--top-k", "1", "--max-tokens", "4"]);
    assert!(st.success(), "{err}");
    assert_eq!(
        (&v["mode"], &v["expand"], &v["expanded_chunks"]),
        (&"refrag".into(), &0.25.into(), &expanded.into()),
        "{v}"
    );
    // A budget of positions instead of a share: as many chunks as fit, each up to k = 16.
    let budget = (chunks + 2 * 15).to_string();
    let mut a = args.to_vec();
    a.extend(["--budget", budget.as_str(), "--policy", "sim"]);
    let (st, v, err) = ask(&db, "What year was Casimir Pulaski born in Warsaw?", &a);
    assert!(st.success(), "{err}");
    assert_eq!((&v["expanded_chunks"], &v["policy"]), (&2.into(), &"sim".into()), "{v}");
    assert!(v["decoder_positions"].as_u64().unwrap() <= compressed_positions + 2 * 15, "{v}");

    // eval: metrics over the fixture questions, plus a malformed line reported and skipped.
    let qs = dir.path().join("q.jsonl");
    let mut text = std::fs::read_to_string(fixture("squad_questions.jsonl")).unwrap();
    let keep: Vec<&str> = text.lines().take(4).collect();
    let good = dir.path().join("q4.jsonl");
    std::fs::write(&good, keep.join("\n")).unwrap();
    text = format!("{}\n{{not json\n", keep.join("\n"));
    std::fs::write(&qs, text).unwrap();
    let out_file = dir.path().join("answers.jsonl");
    let out = refrag()
        .args(["eval", "--device", "cpu", "--json", "--mode", "full", "--top-k", "1", "--max-tokens", "16", "--db"])
        .arg(&db)
        .arg("--questions")
        .arg(&qs)
        .arg("--out")
        .arg(&out_file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "a bad line makes the run exit 2: {err}");
    assert!(err.contains("q.jsonl:5"), "{err}");
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["questions"], 4);
    assert_eq!(s["bad_lines"], 1);
    assert!(s["f1"].as_f64().unwrap() > 0.1, "{s}");
    assert!(s["answer_contains_gold"].as_f64().unwrap() >= 0.25, "{s}");
    assert!(s["recall_at_1"].as_f64().unwrap() >= 0.75, "{s}");
    let lines = std::fs::read_to_string(&out_file).unwrap();
    assert_eq!(lines.lines().count(), 4);
    // each answer's whole time: retrieval, the first token, every later one
    for l in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let f = |k: &str| v[k].as_f64().unwrap_or_else(|| panic!("no {k}: {v}"));
        assert!(f("answer_ms") >= f("retrieval_ms") + f("ttft_ms"), "{v}");
        assert!(v["generated_tokens"].as_u64().unwrap() >= 1, "{v}");
    }
    assert!(s["answer_ms_median"].as_f64().unwrap() > 0.0, "{s}");
    assert_eq!(s["adapted"], false, "{s}");
    assert!(s["weights"].is_null(), "the base decoder reads full context: {s}");

    // --adapted: the same full-context reading through the adapters of the weights for
    // answers (weights/qa unless --weights), reported as such; the answers change.
    let adapted = |extra: &[&str]| {
        let out = refrag()
            .args([
                "eval", "--device", "cpu", "--json", "--mode", "full", "--adapted", "--top-k", "1", "--max-tokens",
                "16", "--db",
            ])
            .arg(&db)
            .arg("--questions")
            .arg(&good)
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        (out.status.code(), serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default(), err)
    };
    let (code, a, err) = adapted(&["--out", dir.path().join("adapted.jsonl").to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(a["adapted"], true, "{a}");
    assert!(a["weights"].as_str().unwrap_or_default().replace('\\', "/").ends_with("weights/qa"), "{a}");
    let answers = |f: &str| -> Vec<String> {
        std::fs::read_to_string(dir.path().join(f))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["answer"].to_string())
            .collect()
    };
    assert_ne!(answers("adapted.jsonl"), answers("answers.jsonl"), "the adapters must change the reading");
    // weights without adapters: a one-line error, exit 2
    let bare = dir.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/qa-minilm");
    for f in ["projector.safetensors", "encoder.safetensors", "card.json"] {
        std::fs::copy(shipped.join(f), bare.join(f)).unwrap();
    }
    let (code, _, err) = adapted(&["--weights", bare.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--adapted") && err.trim().lines().count() == 1, "{err}");

    // --retrieval-only --tasks: each question with its retrieved passages as a task; reading
    // the tasks with --conversations replays the index's reading exactly.
    let tasks = dir.path().join("tasks.jsonl");
    let run = |args: &[&str]| {
        let out = refrag().args(["eval", "--device", "cpu", "--json"]).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let lines = |f: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(f).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let (db_s, good_s, tasks_s) = (db.to_str().unwrap(), good.to_str().unwrap(), tasks.to_str().unwrap());
    let s = run(&["--retrieval-only", "--top-k", "2", "--db", db_s, "--questions", good_s, "--tasks", tasks_s]);
    assert!(s["ttft_ms_median"].is_null() && s["f1"].is_null(), "nothing decoded: {s}");
    let written = lines(&tasks);
    assert_eq!(written.len(), 4);
    for t in &written {
        assert_eq!(t["contexts"].as_array().unwrap().len(), 2, "{t}");
        assert!(!t["targets"].as_array().unwrap().is_empty(), "{t}");
    }
    let (qa, ca) = (dir.path().join("qa.jsonl"), dir.path().join("ca.jsonl"));
    let read = ["--max-tokens", "8", "--top-k", "2"];
    for (mode, extra) in [("full", &[][..]), ("refrag", &["--expand", "0.25", "--policy", "sim"][..])] {
        let q = run(&[
            &read[..],
            &["--mode", mode, "--db", db_s, "--questions", good_s, "--out", qa.to_str().unwrap()],
            extra,
        ]
        .concat());
        let c =
            run(&[&read[..], &["--mode", mode, "--conversations", tasks_s, "--out", ca.to_str().unwrap()], extra]
                .concat());
        let (ql, cl) = (lines(&qa), lines(&ca));
        let pos =
            |v: &[serde_json::Value]| v.iter().map(|l| l["decoder_positions"].as_u64().unwrap()).collect::<Vec<_>>();
        assert_eq!(pos(&ql), pos(&cl), "{mode}: the same prompt sizes");
        if mode == "full" {
            let ans = |v: &[serde_json::Value]| v.iter().map(|l| l["answer"].to_string()).collect::<Vec<_>>();
            assert_eq!(ans(&ql), ans(&cl), "full: the same answers");
            assert_eq!(q["f1"], c["f1_answerable"], "{q} {c}");
            // no policy chose anything: neither summary names one
            assert!(q["policy"].is_null() && c["policy"].is_null(), "{q} {c}");
        } else {
            // TTFT counts building the input (the policy's choice and the projection)
            for l in &ql {
                assert!(
                    l["input_ms"].as_f64().unwrap() > 0.0
                        && l["ttft_ms"].as_f64().unwrap() >= l["input_ms"].as_f64().unwrap(),
                    "{l}"
                );
            }
            assert_eq!(q["policy"], "sim", "{q}");
            assert_eq!(c["policy"], "sim", "{c}");
            // each answer line says how many chunks went back to tokens, the same both ways
            let exp =
                |v: &[serde_json::Value]| v.iter().map(|l| l["expanded_chunks"].as_u64().unwrap()).collect::<Vec<_>>();
            assert_eq!(exp(&ql), exp(&cl));
            assert_eq!(exp(&cl).iter().sum::<u64>(), c["chunks_expanded"].as_u64().unwrap(), "{c}");
            assert!(exp(&cl).iter().all(|&n| n > 0), "{cl:?}");
        }
    }
}

#[test]
fn delete_removes_a_document() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let first = index(&db, &[]);
    let rows = first["rows_total"].as_u64().unwrap();
    let out = refrag().args(["index", "--json", "--delete", "warsaw-3.txt", "--db"]).arg(&db).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["rows_total"].as_u64().unwrap() < rows, "{v}");
    // indexing the folder again brings it back, and only it
    let again = index(&db, &[]);
    assert_eq!(again["added"], 1);
    assert_eq!(again["unchanged"], 2);
    assert_eq!(again["rows_total"].as_u64().unwrap(), rows);
}

#[test]
fn asking_without_an_index_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (st, _, err) = ask(&dir.path().join("nothing"), "q", &[]);
    assert_eq!(st.code(), Some(2));
    assert!(err.contains("no index here"), "{err}");
}

/// `eval --conversations` on MTRAG tasks: every reading scores every task; REFRAG reads the
/// history and passages in far fewer positions; a malformed line is reported and skipped.
#[test]
fn eval_conversations_full_and_refrag() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("conv.jsonl");
    let mut text = std::fs::read_to_string(fixture("mtrag_tiny.jsonl")).unwrap();
    text.push_str("{\"input\": []}\n");
    std::fs::write(&file, text).unwrap();
    let run = |mode: &str| -> (Option<i32>, serde_json::Value, String) {
        let out = refrag()
            .args(["eval", "--device", "cpu", "--json", "--max-tokens", "6", "--mode", mode, "--conversations"])
            .arg(&file)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        (out.status.code(), serde_json::from_slice(&out.stdout).unwrap_or_default(), err)
    };
    let (code, full, err) = run("full");
    assert_eq!(code, Some(2), "the bad line makes the run exit 2: {err}");
    assert!(err.contains("conv.jsonl:4"), "{err}");
    assert_eq!(full["conversations"], 3, "{full}");
    assert_eq!(full["answerable"], 2);
    assert_eq!(full["unanswerable"], 1);
    assert!(full["f1_answerable"].as_f64().unwrap() >= 0.0);
    assert_eq!(full["adapted"], false, "the base decoder reads full context: {full}");
    let (_, refrag, err) = run("refrag");
    assert_eq!(refrag["conversations"], 3, "{refrag} {err}");
    assert_eq!(refrag["adapted"], true, "refrag mode folds the shipped adapters in: {refrag}");
    // Questions are answered with the weights fine-tuned for answers (weights/qa) unless
    // --weights says otherwise; full mode with the base decoder names none.
    let used = refrag["weights"].as_str().unwrap_or_default().replace('\\', "/");
    assert!(used.ends_with("weights/qa"), "{refrag}");
    assert!(full["weights"].is_null(), "{full}");
    // weights/qa reads the question before and after the passages, the base decoder after them
    assert_eq!((&refrag["question_at"], &full["question_at"]), (&"both".into(), &"after".into()));
    let pos = |v: &serde_json::Value| v["decoder_positions_mean"].as_f64().unwrap();
    // weights/qa's card sets the share expanded when --expand is not given
    assert_eq!(refrag["expand"], 0.25, "{refrag}");
    assert!(refrag["chunks_expanded"].as_u64().unwrap() > 0, "{refrag}");
    // (the second copy of each question costs refrag ~10 positions of these ~80)
    assert!(pos(&refrag) * 1.5 < pos(&full), "refrag {} vs full {}", pos(&refrag), pos(&full));
}

/// `eval --conversations --mode full --adapted`: the trained decoder adapters read the full
/// passages (the LLaMA-FT baseline); without adapters in --weights it is a one-line error.
#[test]
fn eval_conversations_adapted_full_reading() {
    let dir = tempfile::tempdir().unwrap();
    let run = |weights: &std::path::Path| {
        let out = refrag()
            .args([
                "eval", "--device", "cpu", "--json", "--max-tokens", "4", "--limit", "1", "--mode", "full", "--adapted",
            ])
            .arg("--weights")
            .arg(weights)
            .arg("--conversations")
            .arg(fixture("mtrag_tiny.jsonl"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        (out.status.code(), serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default(), err)
    };
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("weights");
    let (code, v, err) = run(&shipped);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(v["adapted"], true, "{v}");
    assert_eq!(v["conversations"], 1, "{v}");
    // a weights folder with a projector but no adapters
    for f in ["projector.safetensors", "encoder.safetensors", "card.json"] {
        std::fs::copy(shipped.join(f), dir.path().join(f)).unwrap();
    }
    let (code, _, err) = run(dir.path());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--adapted") && err.trim().lines().count() == 1, "{err}");
}

/// An empty task file (or one with only malformed lines) is a one-line error, not a run that
/// scores nothing and exits 0.
#[test]
fn eval_refuses_an_empty_task_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("empty.jsonl");
    for content in ["", "\n\n", "{\"input\": []}\n"] {
        std::fs::write(&file, content).unwrap();
        let out = refrag().args(["eval", "--device", "cpu", "--conversations"]).arg(&file).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{content:?}: {err}");
        assert!(err.contains("empty.jsonl: no usable lines"), "{content:?}: {err}");
    }
}
