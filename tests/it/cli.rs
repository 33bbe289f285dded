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
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("refrag: /nonexistent/file.txt"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin.txt");
    std::fs::write(&bin, b"caf\xe9 au lait").unwrap();
    let out = refrag().args(["ask", "--context"]).arg(&bin).arg("q").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not UTF-8"));

    let fake = dir.path().join("fake.gguf");
    std::fs::write(&fake, b"GGUF but not really").unwrap();
    let out = refrag().args(["ask", "--decoder"]).arg(&fake).args(["--context"]).arg(fixture("corpus/warsaw-1.txt")).arg("q").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fake.gguf") && err.trim_end().lines().count() == 1, "{err}");

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
        let committed = std::fs::read(dir.join(&name))
            .unwrap_or_else(|_| panic!("man/{name} missing: run `refrag man man`"));
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
