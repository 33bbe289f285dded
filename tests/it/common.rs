use refrag::model::decoder::{Decoder, Ops};
use refrag::model::encoder::Encoder;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn home() -> PathBuf {
    refrag::model::cache::home_dir()
}

pub fn decoder_path() -> PathBuf {
    refrag::model::cache::resolve_decoder(None, &home(), true).expect("decoder model")
}

/// The real decoder on CPU, loaded once per test binary.
pub fn decoder() -> &'static Decoder {
    static D: OnceLock<Decoder> = OnceLock::new();
    D.get_or_init(|| Decoder::load(&decoder_path(), &candle_core::Device::Cpu, Ops::Fused, true).expect("load decoder"))
}

pub fn encoder() -> &'static Encoder {
    static E: OnceLock<Encoder> = OnceLock::new();
    E.get_or_init(|| {
        let dir = refrag::model::cache::resolve_encoder(None, &home(), true).expect("encoder model");
        Encoder::load(&dir, &candle_core::Device::Cpu).expect("load encoder")
    })
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// The refrag binary built for this test run.
pub fn refrag() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_refrag"));
    c.env("NO_COLOR", "1").env_remove("REFRAG_DEVICE");
    c
}

/// A run that failed on bad input: exit code 2 and a one-line `refrag: ...` error, returned.
#[track_caller]
pub fn one_line_error(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.starts_with("refrag: ") && err.trim().lines().count() == 1, "one line `refrag: ...` expected: {err}");
    err
}

/// Run a refrag command that must succeed, and parse the JSON it prints.
#[track_caller]
pub fn json_out(cmd: &mut Command) -> serde_json::Value {
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}
