//! Files of each format `refrag index` reads (fixtures/formats: a PDF, an HTML page, Markdown
//! with front matter, Org text), their passages citing page or heading, a question answered
//! from each; bad files counted and named; `refrag docs rm` killed mid-way never leaves part of
//! a document.

use crate::common::*;
use std::path::Path;

fn index(db: &Path, extra: &[&str], input: &Path) -> std::process::Output {
    refrag().args(["index", "--device", "cpu", "-q", "--json", "--db"]).arg(db).args(extra).arg(input).output().unwrap()
}

fn ok_json(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn docs(db: &Path) -> Vec<serde_json::Value> {
    let o = refrag().args(["docs", "list", "--json", "--db"]).arg(db).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// fixtures/formats plus a damaged PDF, a source file and an image, in a temp folder.
fn mixed_folder(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("mixed");
    std::fs::create_dir_all(&src).unwrap();
    for e in std::fs::read_dir(fixture("formats")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, src.join(p.file_name().unwrap())).unwrap();
    }
    let pdf = std::fs::read(fixture("formats/shared-mime-info-spec.pdf")).unwrap();
    std::fs::write(src.join("damaged.pdf"), &pdf[..pdf.len() / 3]).unwrap();
    std::fs::write(src.join("tool.rs"), b"/// Adds one.\nfn add_one(x: u32) -> u32 { x + 1 }\n").unwrap();
    std::fs::write(src.join("photo.png"), b"\x89PNG\r\n\x1a\n\0\0").unwrap();
    src
}

#[test]
fn every_format_is_indexed_cited_and_answered_from() {
    let dir = tempfile::tempdir().unwrap();
    let src = mixed_folder(dir.path());
    let db = dir.path().join("db");
    let v = ok_json(&index(&db, &[], &src));
    assert_eq!((&v["documents"], &v["added"], &v["skipped"]), (&4.into(), &4.into(), &3.into()), "{v}");
    assert_eq!(
        v["skipped_by_reason"],
        serde_json::json!({"PDF not read": 1, "unsupported type": 2}),
        "damaged.pdf, tool.rs (no --code), photo.png: {v}"
    );
    // the same folder again adds nothing
    let v = ok_json(&index(&db, &[], &src));
    assert_eq!((&v["added"], &v["unchanged"]), (&0.into(), &4.into()), "{v}");

    // titles from <title> and front matter; every document has passages and a time it was indexed
    let list = docs(&db);
    let by_id = |id: &str| list.iter().find(|d| d["id"] == id).unwrap_or_else(|| panic!("{id} not in {list:?}"));
    assert_eq!(by_id("users-and-groups.html")["title"], "Users and Groups in the Debian System");
    assert_eq!(by_id("alice-notes.md")["title"], "Alice in Wonderland, chapters II and III");
    assert_eq!(by_id("rabbit-hole.org")["title"], "Down the Rabbit-Hole");
    let pdf = by_id("shared-mime-info-spec.pdf");
    assert!(pdf["passages"].as_u64().unwrap() >= 17, "17 pages, at least a passage each: {pdf}");
    for d in &list {
        assert!(d["indexed"].as_str().unwrap().ends_with('Z'), "{d}");
    }

    // a question answered from each format, its first source citing the page or heading
    let cases = [
        ("What version of the Shared MIME-info Database specification is this?", "shared-mime-info-spec.pdf#p1"),
        (
            "Which tool keeps the master passwd and group files in sync on Debian systems?",
            "users-and-groups.html#Chapter 1. Introduction",
        ),
        ("What did Alice cry when she was opening out like the largest telescope?", "alice-notes.md#The Pool of Tears"),
        ("Why did Alice think the rabbit-hole well was very deep?", "rabbit-hole.org#Down the Rabbit-Hole"),
    ];
    for (q, cite) in cases {
        let v = json_out(
            refrag()
                .args(["ask", "--device", "cpu", "--json", "--top-k", "2", "--max-tokens", "12", "--db"])
                .arg(&db)
                .arg(q),
        );
        assert_eq!(v["sources"][0]["cite"], cite, "{q}: {v}");
        assert!(!v["answer"].as_str().unwrap_or("").trim().is_empty(), "{q}: {v}");
    }

    // --code takes source files; a damaged PDF named on the command line is a one-line error
    let db2 = dir.path().join("db2");
    let v = ok_json(&index(&db2, &["--code", "-g", "*.rs"], &src));
    assert_eq!(v["documents"], 1, "{v}");
    // --type picks ripgrep's file types (a source type without --code), --type-not leaves them out
    let v = ok_json(&index(&dir.path().join("db3"), &["-t", "rust", "-t", "markdown"], &src));
    assert_eq!(v["documents"], 2, "tool.rs, alice-notes.md: {v}");
    let v = ok_json(&index(&dir.path().join("db4"), &["-T", "pdf", "-T", "html"], &src));
    assert_eq!((&v["documents"], &v["skipped"]), (&2.into(), &2.into()), "md, org; tool.rs, photo.png: {v}");
    let err = one_line_error(&index(&db2, &[], &src.join("damaged.pdf")));
    assert!(err.contains("damaged.pdf: PDF cannot be"), "{err}");
}

#[test]
fn docs_rm_killed_at_any_moment_removes_whole_documents_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    ok_json(&index(&base, &[], &fixture("formats")));
    let before: std::collections::HashMap<String, u64> =
        docs(&base).iter().map(|d| (d["id"].as_str().unwrap().to_string(), d["passages"].as_u64().unwrap())).collect();
    let rm = |db: &Path| {
        let mut c = refrag();
        c.args(["docs", "rm", "--db"]).arg(db).args(["shared-mime-info-spec.pdf", "alice-notes.md"]);
        c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        c
    };
    let t = std::time::Instant::now();
    let reference = dir.path().join("reference");
    copy_dir(&base, &reference);
    assert!(rm(&reference).status().unwrap().success());
    let full = t.elapsed();
    let mut rng = refrag::rng::Rng(11);
    let (mut killed, mut removed, mut kept) = (0, 0, 0);
    for round in 0..12 {
        let db = dir.path().join(format!("db{round}"));
        copy_dir(&base, &db);
        let mut child = rm(&db).spawn().unwrap();
        std::thread::sleep(full.mul_f64(0.2 + 0.8 * rng.unit()));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            killed += 1;
        }
        child.wait().unwrap();
        // the index opens; each document is all there or all gone, and the others untouched
        let now: std::collections::HashMap<String, u64> = docs(&db)
            .iter()
            .map(|d| (d["id"].as_str().unwrap().to_string(), d["passages"].as_u64().unwrap()))
            .collect();
        for (id, n) in &before {
            match now.get(id) {
                Some(m) => {
                    assert_eq!(m, n, "round {round}: {id} has {m} of {n} passages");
                    kept += 1;
                }
                None => {
                    assert!(id == "shared-mime-info-spec.pdf" || id == "alice-notes.md", "round {round}: {id} lost");
                    removed += 1;
                }
            }
        }
        let both_or_neither = now.contains_key("shared-mime-info-spec.pdf") == now.contains_key("alice-notes.md");
        assert!(both_or_neither, "round {round}: one commit removes both or neither: {now:?}");
    }
    eprintln!("docs rm crash test: {killed}/12 runs killed; {removed} removals and {kept} documents kept, 0 partial");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &p);
        } else {
            std::fs::copy(e.path(), &p).unwrap();
        }
    }
}
