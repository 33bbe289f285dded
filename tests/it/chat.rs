//! The chat REPL driven through a pseudo-terminal with the real models and a real index.

use crate::common::*;
use expectrl::{ControlCode, Eof, Session, WaitStatus};
use std::time::Duration;

#[test]
fn chat_repl_two_turns_sources_reset() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let st = refrag().args(["index", "-q", "--db"]).arg(&db).arg(fixture("corpus")).status().unwrap();
    assert!(st.success());
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_refrag"));
    cmd.args(["chat", "--device", "cpu", "--mode", "full", "--top-k", "1", "--max-tokens", "24", "--db"])
        .arg(&db)
        .arg("--history")
        .arg(dir.path().join("history"))
        .env("TERM", "dumb")
        .env("NO_COLOR", "1");
    let mut p = Session::spawn(cmd).unwrap();
    p.set_expect_timeout(Some(Duration::from_secs(300)));
    p.expect("> ").unwrap();
    let mut turn = |line: &str| -> String {
        p.send(format!("{line}\r")).unwrap();
        // the reply is what comes before the next prompt
        let m = p.expect("\n> ").unwrap();
        String::from_utf8_lossy(m.before()).to_string()
    };
    let first = turn("What year was Casimir Pulaski born in Warsaw?");
    assert!(first.contains("1745"), "{first}");
    // The follow-up only makes sense with the first turn ("that year").
    let second = turn("Who was born in Warsaw in that year?");
    assert!(second.contains("1745"), "{second}");
    let sources = turn("/sources");
    assert!(sources.contains("warsaw-1.txt"), "{sources}");
    assert!(turn("/reset").contains("forgotten"));
    assert!(turn("/sources").contains("no sources yet"));
    let alone = turn("Who was born in Warsaw in that year?");
    assert!(!alone.contains("1745"), "after /reset the year is unknown: {alone}");
    p.send(ControlCode::EndOfTransmission).unwrap();
    p.expect(Eof).unwrap();
    match p.get_process_mut().wait().unwrap() {
        WaitStatus::Exited(_, code) => assert_eq!(code, 0),
        other => panic!("{other:?}"),
    }
    assert!(dir.path().join("history").exists(), "history file written");
}
