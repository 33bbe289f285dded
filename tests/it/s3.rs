//! The index on object storage: an S3-compatible server (moto, from the Python package index;
//! `.ci/deps` installs it) started on loopback by the test. Four shard workers index one corpus
//! side by side into one table, `--finalize` builds the search indexes, and the result must
//! equal a local-disk index of the same corpus, row for row and hit for hit.

use crate::common::*;
use refrag::index::store::Store;
use refrag::options::SearchKind;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BUCKET: &str = "refrag-test";

/// A moto S3 server on a free loopback port, stopped when dropped.
struct S3Server {
    child: Child,
    endpoint: String,
}

impl S3Server {
    fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 to start moto");
        let mut s = Self { child, endpoint: format!("http://127.0.0.1:{port}") };
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = s.child.try_wait() {
                let mut err = String::new();
                s.child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                panic!(
                    "moto server exited ({st}); install it with `pip install 'moto[server]'` (.ci/deps does): {err}"
                );
            }
            assert!(t.elapsed() < Duration::from_secs(60), "moto server did not listen within 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        s.request("PUT", &format!("/{BUCKET}"));
        s
    }

    /// One plain HTTP request (moto does not check signatures); returns the status code.
    fn request(&self, method: &str, path: &str) -> u16 {
        let host = self.endpoint.trim_start_matches("http://");
        let mut c = TcpStream::connect(host).unwrap();
        write!(c, "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut resp = String::new();
        c.read_to_string(&mut resp).unwrap();
        let code: u16 = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        assert_eq!(code, 200, "{method} {path}: {resp}");
        code
    }

    /// Everything a client needs, as --storage-option pairs (credentials come from the
    /// environment in the CLI runs, to test that path too).
    fn options(&self) -> Vec<(String, String)> {
        [
            ("aws_endpoint", self.endpoint.as_str()),
            ("allow_http", "true"),
            ("aws_region", "us-east-1"),
            ("aws_access_key_id", "test"),
            ("aws_secret_access_key", "test"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn cli(&self) -> Command {
        let mut c = refrag();
        c.env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env_remove("AWS_PROFILE")
            .args(["--device", "cpu", "--storage-option", &format!("aws_endpoint={}", self.endpoint)])
            .args(["--storage-option", "allow_http=true"]);
        c
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A corpus of many small documents: the Warsaw files and Alice in runs of paragraphs.
fn corpus(path: &Path) -> usize {
    let mut lines = Vec::new();
    for n in 1..=3 {
        let text = std::fs::read_to_string(fixture(&format!("corpus/warsaw-{n}.txt"))).unwrap();
        lines.push(serde_json::json!({"id": format!("warsaw-{n}"), "title": "Warsaw", "text": text}));
    }
    let alice = std::fs::read_to_string(fixture("alice_ch1-3.txt")).unwrap();
    let paras: Vec<&str> = alice.split("\n\n").map(str::trim).filter(|p| !p.is_empty()).collect();
    for (i, run) in paras.chunks(6).enumerate() {
        lines.push(serde_json::json!({"id": format!("alice-{i}"), "title": "Alice", "text": run.join("\n\n")}));
    }
    let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, body).unwrap();
    lines.len()
}

fn json_of(out: &std::process::Output, what: &str) -> serde_json::Value {
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{what}: {e}: {stdout}"))
}

#[test]
fn four_shard_workers_on_s3_equal_a_local_index() {
    let s3 = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let docs_file = dir.path().join("docs.jsonl");
    let n_docs = corpus(&docs_file);
    let local = dir.path().join("local");
    let remote = format!("s3://{BUCKET}/indexes/shared");

    let out =
        refrag().args(["index", "--device", "cpu", "--json", "--db"]).arg(&local).arg(&docs_file).output().unwrap();
    let local_sum = json_of(&out, "local index");
    assert_eq!(local_sum["documents"].as_u64().unwrap() as usize, n_docs);

    // Four workers at once, each its own process, all appending to one table on S3.
    let workers: Vec<Child> = (0..4)
        .map(|i| {
            s3.cli()
                .args(["index", "--json", "--shard", &format!("{i}/4"), "--db", &remote])
                .arg(&docs_file)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let sums: Vec<serde_json::Value> = workers
        .into_iter()
        .enumerate()
        .map(|(i, w)| json_of(&w.wait_with_output().unwrap(), &format!("shard {i}/4")))
        .collect();
    let field = |k: &str| sums.iter().map(|s| s[k].as_u64().unwrap()).collect::<Vec<_>>();
    let docs = field("documents");
    assert_eq!(docs.iter().sum::<u64>() as usize, n_docs, "every document in exactly one shard: {sums:?}");
    assert!(docs.iter().all(|&d| d > 0), "each worker had work: {docs:?}");
    assert_eq!(field("passages").iter().sum::<u64>(), local_sum["passages"].as_u64().unwrap());
    assert_eq!(field("chunks").iter().sum::<u64>(), local_sum["chunks"].as_u64().unwrap());

    let out = s3.cli().args(["index", "--finalize", "--json", "--db", &remote]).output().unwrap();
    let fin = json_of(&out, "finalize");
    assert_eq!(fin["rows_total"], local_sum["rows_total"], "{fin}");
    assert!(fin["bytes_on_disk"].as_u64().unwrap() > 0, "{fin}");

    // Row for row: the same documents, hashes and passage counts.
    let l = Store::open(local.to_str().unwrap()).unwrap();
    let r = Store::open_with(&remote, &s3.options()).unwrap();
    assert_eq!(r.info, l.info);
    assert_eq!(r.doc_hashes().unwrap(), l.doc_hashes().unwrap());
    assert_eq!(r.doc_passage_counts().unwrap(), l.doc_passage_counts().unwrap());

    // Hit for hit, vector and hybrid: ids, scores, tokens and chunk vectors.
    for q in ["Where was Casimir Pulaski born?", "the White Rabbit with pink eyes", "a caucus race to get dry"] {
        let v = encoder().encode(&[q]).unwrap().to_vec2::<f32>().unwrap().remove(0);
        for kind in [SearchKind::Vector, SearchKind::Hybrid] {
            let a = l.search(&v, q, 5, kind).unwrap();
            let b = r.search(&v, q, 5, kind).unwrap();
            let ids =
                |h: &[refrag::index::schema::Hit]| h.iter().map(|h| h.passage.passage_id.clone()).collect::<Vec<_>>();
            assert_eq!(ids(&b), ids(&a), "{q} ({kind:?})");
            for (x, y) in a.iter().zip(&b) {
                assert!((x.score - y.score).abs() < 1e-4, "{q}: {} vs {}", x.score, y.score);
                assert_eq!(x.passage.tokens, y.passage.tokens);
                assert_eq!(x.passage.chunks, y.passage.chunks);
            }
        }
    }

    // And the product path: ask over the S3 index answers as over the local one.
    let q = "What year was Casimir Pulaski born in Warsaw?";
    let ask = |c: &mut Command, db: &str| {
        let out = c
            .args(["ask", "--json", "--mode", "full", "--top-k", "1", "--max-tokens", "24", "--db", db, q])
            .output()
            .unwrap();
        json_of(&out, "ask")
    };
    let from_s3 = ask(&mut s3.cli(), &remote);
    let from_disk = ask(refrag().args(["--device", "cpu"]), local.to_str().unwrap());
    assert_eq!(from_s3["sources"], from_disk["sources"]);
    assert_eq!(from_s3["answer"], from_disk["answer"]);
    assert!(from_s3["answer"].as_str().unwrap().contains("1745"), "{from_s3}");
}

#[test]
fn a_bad_storage_option_is_one_line() {
    let out = refrag()
        .args(["index", "--storage-option", "novalue", "--db", "s3://b/x"])
        .arg(fixture("corpus"))
        .output()
        .unwrap();
    let err = one_line_error(&out);
    assert!(err.contains("--storage-option novalue: expected KEY=VALUE"), "{err}");
}
