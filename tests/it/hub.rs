//! Hugging Face model ids (`--encoder owner/name`), against a stand-in hub on loopback that
//! serves the real MiniLM files with the headers and byte ranges the hub client asks for.

use crate::common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Serve `/{repo}/resolve/{rev}/{file}` from `dir` until the test ends; returns the endpoint.
fn serve(dir: PathBuf, repo: &'static str) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut first = String::new();
                if r.read_line(&mut first).is_err() {
                    return;
                }
                let mut range = None;
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        let (a, b) = v.trim().split_once('-').unwrap();
                        range = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()));
                    }
                }
                let path = first.split_whitespace().nth(1).unwrap_or("/").to_string();
                let prefix = format!("/{repo}/resolve/main/");
                let mut w = conn;
                let Some(file) = path.strip_prefix(&prefix) else {
                    let _ = w.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    return;
                };
                let Ok(data) = std::fs::read(dir.join(file)) else {
                    let _ = w.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    return;
                };
                let etag = refrag::model::cache::hex(&<sha2::Sha256 as sha2::Digest>::digest(&data));
                let (a, b) = range.unwrap_or((0, data.len() - 1));
                let b = b.min(data.len() - 1);
                let head = format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {a}-{b}/{}\r\n\
                     ETag: \"{etag}\"\r\nX-Repo-Commit: {COMMIT}\r\nConnection: close\r\n\r\n",
                    b + 1 - a,
                    data.len()
                );
                let _ = w.write_all(head.as_bytes());
                let _ = w.write_all(&data[a..=b]);
            });
        }
    });
    format!("http://{addr}")
}

/// `--encoder test-org/minilm` downloads the three encoder files into the Hugging Face cache,
/// and an index built with the local copy is readable with the hub id (same weights).
#[test]
fn encoder_from_a_hub_id() {
    let local = refrag::model::cache::resolve_encoder(None, &home(), true).unwrap();
    let endpoint = serve(local.clone(), "test-org/minilm");
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("db");
    let hf_home = tmp.path().join("hf");
    let out = refrag()
        .args(["-q", "index", "--device", "cpu", "--db"])
        .arg(&db)
        .arg(fixture("corpus/warsaw-1.txt"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ask = |encoder: &str| {
        refrag()
            .env("HF_ENDPOINT", &endpoint)
            .env("HF_HOME", &hf_home)
            .args(["-q", "ask", "--device", "cpu", "--mode", "full", "--max-tokens", "4", "--encoder", encoder, "--db"])
            .arg(&db)
            .arg("Where was Chopin born?")
            .output()
            .unwrap()
    };
    let out = ask("test-org/minilm");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let snap = hf_home.join("hub/models--test-org--minilm/snapshots").join(COMMIT);
    for f in refrag::model::hub::ENCODER_FILES {
        let got = refrag::model::cache::sha256_file(&snap.join(f)).unwrap();
        assert_eq!(got, refrag::model::cache::sha256_file(&local.join(f)).unwrap(), "{f}");
    }
    // An id the hub does not have: one line, exit 2.
    let out = ask("test-org/missing");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("test-org/missing: cannot fetch config.json"), "{err}");
}
