//! Bad input and concurrent use: one-line errors naming the file (and line), exit 2, and an
//! index left exactly as it was; two writers never corrupt an index.

use crate::common::*;
use refrag::index::store::Store;
use std::collections::HashMap;
use std::path::Path;

fn counts(db: &Path) -> HashMap<String, usize> {
    Store::open(db.to_str().unwrap()).unwrap().doc_passage_counts().unwrap()
}

fn index(db: &Path, input: &Path) -> std::process::Output {
    refrag().args(["index", "-q", "--device", "cpu", "--db"]).arg(db).arg(input).output().unwrap()
}

#[test]
fn bad_inputs_are_refused_and_leave_the_index_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    assert!(index(&db, &fixture("corpus")).status.success());
    let before = counts(&db);
    let bad = |name: &str, bytes: &[u8], expect: &str| {
        let f = dir.path().join(name);
        std::fs::write(&f, bytes).unwrap();
        let out = index(&db, &f);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{name}: one line: {err}");
        assert!(err.starts_with("refrag: ") && err.contains(expect), "{name}: expected {expect:?} in {err}");
        assert_eq!(counts(&db), before, "{name}: the index changed");
    };
    let mut binary = b"\x7fELF".to_vec();
    binary.extend([0u8; 64]);
    bad("binary.txt", &binary, "binary.txt: binary file");
    bad("latin1.txt", b"caf\xe9 au lait, the French way", "latin1.txt");
    bad("malformed.jsonl", b"{\"id\":\"x\",\"text\":\"fine\"}\n{\"id\": oops\n", "malformed.jsonl:2");
    bad("nested.jsonl", format!("{}{}\n", "[".repeat(4000), "]".repeat(4000)).as_bytes(), "nested.jsonl:1");
    bad("notext.jsonl", b"{\"id\":\"x\",\"title\":\"no text\"}\n", "notext.jsonl:1: missing \"text\"");
    bad(
        "dups.jsonl",
        b"{\"id\":\"x\",\"text\":\"one\"}\n{\"id\":\"x\",\"text\":\"two\"}\n",
        "dups.jsonl:2: duplicate document id",
    );
    // Paths inside documents are data: nothing is opened or followed.
    let untrusted = dir.path().join("untrusted.jsonl");
    std::fs::write(
        &untrusted,
        b"{\"id\":\"/etc/passwd\",\"title\":\"../../x\",\"text\":\"file:///etc/shadow $(rm -rf /) ../../secret\"}\n",
    )
    .unwrap();
    assert!(index(&db, &untrusted).status.success());
    let after = counts(&db);
    assert_eq!(after.get("/etc/passwd"), Some(&1));
    assert_eq!(after.len(), before.len() + 1);
    // A folder that is not an index is not written into.
    let other = dir.path().join("photos");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("cat.jpg"), b"not an index").unwrap();
    let out = index(&other, &fixture("corpus/warsaw-1.txt"));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no LanceDB tables"));
    assert_eq!(std::fs::read_dir(&other).unwrap().count(), 1, "nothing written into it");
    // A folder that holds only a README (the repository's `index/`, the default --db) is one.
    let kept = dir.path().join("kept");
    std::fs::create_dir_all(&kept).unwrap();
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("index/README.md"), kept.join("README.md")).unwrap();
    let out = index(&kept, &fixture("corpus/warsaw-1.txt"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(kept.join("README.md").exists() && counts(&kept).len() == 1);
    // A question longer than the decoder's window is a clear error, not a crash.
    let huge = "why ".repeat(20000);
    let out = refrag().args(["ask", "--device", "cpu", "--db"]).arg(&db).arg(&huge).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("decoder positions"));
}

/// Two `index` runs at once on one database: the second is refused with a clear message while
/// the first writes (or both succeed one after the other), `ask` meanwhile reads a consistent
/// index, and the result has every passage exactly once.
#[test]
fn concurrent_writers_and_readers() {
    let dir = tempfile::tempdir().unwrap();
    let docs = dir.path().join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    let alice = std::fs::read_to_string(fixture("alice_ch1-3.txt")).unwrap();
    let words: Vec<&str> = alice.split_whitespace().collect();
    for (i, part) in words.chunks(words.len() / 12).take(12).enumerate() {
        std::fs::write(docs.join(format!("d{i:02}.txt")), part.join(" ")).unwrap();
    }
    let reference = dir.path().join("reference");
    assert!(index(&reference, &docs).status.success());
    let expected = counts(&reference);

    let db = dir.path().join("db");
    // a first, small index so that readers have something to read while the writers run
    assert!(index(&db, &fixture("corpus/warsaw-1.txt")).status.success());
    let spawn = || {
        refrag()
            .args(["index", "-q", "--device", "cpu", "--batch-docs", "1", "--db"])
            .arg(&db)
            .arg(&docs)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    for _ in 0..3 {
        let out = refrag()
            .args(["ask", "--device", "cpu", "--mode", "full", "--top-k", "2", "--max-tokens", "1", "--json", "--db"])
            .arg(&db)
            .arg("Who is the White Rabbit?")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "ask while writing: {}", String::from_utf8_lossy(&out.stderr));
    }
    let outs = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
    for o in &outs {
        if !o.status.success() {
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(2));
            assert!(err.contains("another `refrag index` is writing"), "{err}");
        }
    }
    assert!(outs.iter().any(|o| o.status.success()));
    // Whatever happened, the same command once more leaves every passage exactly once.
    assert!(index(&db, &docs).status.success());
    let mut got = counts(&db);
    let first = fixture("corpus/warsaw-1.txt").display().to_string(); // a file's id is its path as given
    assert_eq!(got.remove(&first), Some(1));
    assert_eq!(got, expected);
}
