//! Crash safety: `refrag index` killed with SIGKILL at random moments never leaves a document
//! half-visible, the index stays readable, and re-running the same command completes it exactly.

use crate::common::*;
use refrag::index::store::Store;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

fn counts(db: &Path) -> HashMap<String, usize> {
    let s = Store::open(db.to_str().unwrap()).expect("the index opens after a kill");
    s.doc_passage_counts().unwrap()
}

fn index_cmd(db: &Path, docs: &Path) -> std::process::Command {
    let mut c = refrag();
    c.args(["index", "-q", "--device", "cpu", "--batch-docs", "2", "--min-words", "40", "--max-words", "80", "--db"])
        .arg(db)
        .arg(docs)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    c
}

#[test]
fn index_survives_sigkill_at_random_points() {
    let dir = tempfile::tempdir().unwrap();
    let docs = dir.path().join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    // 24 documents of Alice, a few passages each.
    let alice = std::fs::read_to_string(fixture("alice_ch1-3.txt")).unwrap();
    let words: Vec<&str> = alice.split_whitespace().collect();
    for (i, part) in words.chunks(words.len() / 24).take(24).enumerate() {
        std::fs::write(docs.join(format!("d{i:02}.txt")), part.join(" ")).unwrap();
    }
    // An uninterrupted run: what every document should hold.
    let reference = dir.path().join("reference");
    let t = Instant::now();
    let out = index_cmd(&reference, &docs).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let full_run = t.elapsed();
    let expected = counts(&reference);
    assert_eq!(expected.len(), 24);
    let total: usize = expected.values().sum();

    let mut rng = refrag::rng::Rng(7);
    let mut killed = 0;
    let (mut committed_docs_seen, mut reruns) = (0usize, 0usize);
    // kills land in 10-70% of the run's length; a run that finishes first (the reference run
    // was slowed by a loaded machine) shortens the window, and does not count as a kill
    let (mut window, mut round) = (full_run, 0);
    while killed < 20 && round < 40 {
        let db = dir.path().join(format!("db{round}"));
        let mut child = index_cmd(&db, &docs).spawn().unwrap();
        let at = window.mul_f64(0.1 + 0.6 * rng.unit());
        std::thread::sleep(at);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            killed += 1;
        } else {
            window = window.mul_f64(0.7);
        }
        child.wait().unwrap();
        if db.exists() {
            // Whatever was committed is whole documents.
            let c = counts(&db);
            committed_docs_seen += c.len();
            for (doc, n) in c {
                assert_eq!(
                    Some(&n),
                    expected.get(&doc),
                    "round {round}: {doc} has {n} passages after a kill at {at:?}"
                );
            }
        }
        if round % 4 == 0 {
            if db.join("passages.lance").exists() {
                let out = refrag()
                    .args(["ask", "--device", "cpu", "--mode", "full", "--top-k", "1", "--max-tokens", "2", "--db"])
                    .arg(&db)
                    .arg("Who is Alice?")
                    .output()
                    .unwrap();
                assert_eq!(
                    out.status.code(),
                    Some(0),
                    "round {round}: ask after a kill: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            // The same command again finishes the job: nothing lost, nothing twice.
            let out = index_cmd(&db, &docs).output().unwrap();
            assert!(out.status.success(), "round {round}: {}", String::from_utf8_lossy(&out.stderr));
            assert_eq!(counts(&db), expected, "round {round}");
            assert_eq!(Store::open(db.to_str().unwrap()).unwrap().rows().unwrap(), total);
            reruns += 1;
        }
        round += 1;
    }
    assert!(killed >= 15, "only {killed} of {round} runs were killed mid-way");
    eprintln!(
        "crash test: {killed}/{round} runs killed; {committed_docs_seen} whole documents found after kills, 0 partial; \
         {reruns} re-runs each ended with exactly {total} rows in {} documents (0 lost, 0 duplicated)",
        expected.len()
    );
}
