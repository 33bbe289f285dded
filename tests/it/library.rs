//! Folders walked as ripgrep walks them, every file passed over counted by reason; the
//! documents of an index listed, counted and removed (`refrag docs`).

use crate::common::*;
use std::path::Path;

fn index(db: &Path, extra: &[&str], input: &Path) -> std::process::Output {
    refrag().args(["index", "--device", "cpu", "-q", "--db"]).arg(db).args(extra).arg(input).output().unwrap()
}

fn json(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn folders_are_walked_like_ripgrep_and_every_skip_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    for sub in ["sub", ".hidden"] {
        std::fs::create_dir_all(src.join(sub)).unwrap();
    }
    let corpus = |n: &str| std::fs::read(fixture("corpus").join(n)).unwrap();
    std::fs::write(src.join("a.txt"), corpus("warsaw-1.txt")).unwrap();
    std::fs::write(src.join("sub/b.md"), corpus("warsaw-2.txt")).unwrap();
    std::fs::write(src.join(".hidden/c.txt"), corpus("warsaw-3.txt")).unwrap();
    std::fs::write(src.join("ignored.txt"), b"A file the .gitignore names. It is not indexed.").unwrap();
    std::fs::write(src.join(".gitignore"), b"ignored.txt\n").unwrap();
    std::fs::write(src.join("photo.jpg"), b"\xff\xd8\xff\xe0 not text").unwrap();
    std::fs::write(src.join("bin.txt"), b"\x7fELF\0\0\0\0").unwrap();
    std::fs::write(src.join("latin1.txt"), b"caf\xe9 au lait").unwrap();
    std::fs::write(src.join("big.txt"), "word ".repeat(300_000)).unwrap();
    let db = dir.path().join("db");

    // .gitignore'd and hidden files are not walked; every other file is indexed or counted
    let v = json(&index(&db, &["--json", "--max-file-mib", "1"], &src));
    assert_eq!((&v["documents"], &v["added"], &v["skipped"]), (&2.into(), &2.into(), &4.into()), "{v}");
    assert_eq!(
        v["skipped_by_reason"],
        serde_json::json!({"binary": 1, "not UTF-8": 1, "too large": 1, "unsupported type": 1}),
        "{v}"
    );
    // the same folder again adds nothing
    let v = json(&index(&db, &["--json", "--max-file-mib", "1"], &src));
    assert_eq!((&v["added"], &v["unchanged"]), (&0.into(), &2.into()), "{v}");
    // the summary line counts the skips; -v names each
    let o = refrag()
        .args(["index", "--device", "cpu", "-v", "--max-file-mib", "1", "--db"])
        .arg(&db)
        .arg(&src)
        .output()
        .unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{err}");
    assert!(out.contains("4 skipped: 1 binary, 1 not UTF-8, 1 too large, 1 unsupported type"), "{out}");
    assert!(err.contains("photo.jpg: unsupported type") && err.contains("latin1.txt: not UTF-8"), "{err}");

    // --hidden --no-ignore walk them too; --glob '!*.md' leaves the Markdown file out
    let db2 = dir.path().join("db2");
    let v = json(&index(&db2, &["--json", "--max-file-mib", "1", "--hidden", "--no-ignore", "-g", "!*.md"], &src));
    assert_eq!(v["documents"], 3, "a.txt, .hidden/c.txt, ignored.txt: {v}");
    let ids: Vec<String> =
        String::from_utf8_lossy(&refrag().args(["docs", "list", "--json", "--db"]).arg(&db2).output().unwrap().stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_str().unwrap().to_string())
            .collect();
    assert_eq!(ids, [".hidden/c.txt", "a.txt", "ignored.txt"].map(|s| s.replace('/', std::path::MAIN_SEPARATOR_STR)));
    // a file named on the command line is still an error when it is not text
    let err = one_line_error(&index(&db, &[], &src.join("bin.txt")));
    assert!(err.contains("bin.txt: binary file"), "{err}");

    // symbolic links are walked with -L/--follow only; a dangling one is then counted unreadable
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(src.join("a.txt"), src.join("link.txt")).unwrap();
        std::os::unix::fs::symlink(src.join("gone.txt"), src.join("dangling.txt")).unwrap();
        let v = json(&index(&db, &["--json", "--max-file-mib", "1"], &src));
        assert_eq!((&v["documents"], &v["skipped"]), (&2.into(), &4.into()), "links not followed: {v}");
        let v = json(&index(&dir.path().join("db3"), &["--json", "--max-file-mib", "1", "-L"], &src));
        assert_eq!((&v["documents"], &v["skipped_by_reason"]["unreadable"]), (&3.into(), &1.into()), "{v}");
    }
}

#[test]
fn docs_lists_counts_and_removes_documents() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    assert!(index(&db, &[], &fixture("corpus")).status.success());
    let list = |db: &Path| -> Vec<serde_json::Value> {
        let o = refrag().args(["docs", "list", "--json", "--db"]).arg(db).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let docs = list(&db);
    let ids: Vec<&str> = docs.iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["warsaw-1.txt", "warsaw-2.txt", "warsaw-3.txt"]);
    for d in &docs {
        let (p, c, t) = (d["passages"].as_u64().unwrap(), d["chunks"].as_u64().unwrap(), d["tokens"].as_u64().unwrap());
        assert!(p >= 1 && c >= p && c * 16 >= t && t > (c - p) * 16, "{d}");
    }
    let stats = |db: &Path| json(&refrag().args(["docs", "stats", "--json", "--db"]).arg(db).output().unwrap());
    let s = stats(&db);
    let total = |f: &str| docs.iter().map(|d| d[f].as_u64().unwrap()).sum::<u64>();
    assert_eq!(
        (&s["documents"], &s["passages"], &s["chunks"]),
        (&3.into(), &total("passages").into(), &total("chunks").into())
    );
    assert!(s["bytes_on_disk"].as_u64().unwrap() > 0 && s["k"] == 16, "{s}");
    assert!(s["chunk_encoder"].as_str().unwrap().contains("+trained@"), "{s}");

    // an unknown id: one line naming it, nothing removed
    let o = refrag().args(["docs", "rm", "warsaw-1.txt", "nope.txt", "--db"]).arg(&db).output().unwrap();
    let err = one_line_error(&o);
    assert!(err.contains("nope.txt") && err.contains("nothing removed"), "{err}");
    assert_eq!(list(&db).len(), 3);
    // removed in one commit; the index reads as before for the rest
    let v = json(&refrag().args(["docs", "rm", "warsaw-2.txt", "--json", "--db"]).arg(&db).output().unwrap());
    assert_eq!(v["removed"], 1);
    assert_eq!(v["passages"], docs[1]["passages"], "{v}");
    let after = list(&db);
    assert_eq!(after.iter().map(|d| d["id"].as_str().unwrap()).collect::<Vec<_>>(), ["warsaw-1.txt", "warsaw-3.txt"]);
    assert_eq!(stats(&db)["documents"], 2);
    // no index there: one line, exit 2
    let err = one_line_error(&refrag().args(["docs", "list", "--db"]).arg(dir.path().join("none")).output().unwrap());
    assert!(err.contains("no index here"), "{err}");
}
