//! `refrag doctor`: what works here and what does not, each with the fix.

use super::Global;
#[cfg(feature = "store")]
use crate::index::store::Store;
use crate::model::cache::ALL;
use anyhow::Result;
use clap::Args;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Index database to check (a folder, or an object-store URI).
    #[arg(long, env = "REFRAG_DB", default_value = "index")]
    pub db: String,
    /// Print one JSON object per check.
    #[arg(long, env = "REFRAG_JSON")]
    pub json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(serde::Serialize)]
struct Check {
    status: Status,
    what: String,
    detail: String,
}

/// The checks so far, in order.
#[derive(Default)]
struct Checks(Vec<Check>);

impl Checks {
    fn add(&mut self, status: Status, what: &str, detail: String) {
        self.0.push(Check { status, what: what.into(), detail });
    }
}

/// What asking loads, as asking would: the decoder tokenizer's id, the decoder and the encoder.
type Loaded = (String, crate::model::decoder::Decoder, crate::model::encoder::Encoder);

pub fn run(g: &Global, a: DoctorArgs) -> Result<ExitCode> {
    let mut checks = Checks::default();
    match super::config::path() {
        Some((p, _)) if p.exists() => checks.add(Status::Ok, "config", format!("{} (read)", p.display())),
        Some((p, _)) => checks.add(Status::Ok, "config", format!("none ({} would be read)", p.display())),
        None => checks.add(Status::Ok, "config", "none".into()),
    }
    check_models(g, &mut checks);
    let device = check_device(g, &mut checks);
    let loader = device.and_then(|d| g.loader_on(d).ok());
    let loaded: Option<Loaded> = loader.as_ref().and_then(|ld| {
        let dec = ld.decoder_with(crate::model::decoder::Ops::Fused, false).ok()?;
        let enc = ld.encoder().ok()?;
        Some((dec.tokenizer_id.clone(), dec, enc))
    });
    if let Some(ld) = loader.as_ref().filter(|ld| ld.device.is_cuda() && crate::model::layer_grad::enabled()) {
        check_layer_grad(ld, &mut checks);
    }
    let trained = match (&loaded, &loader) {
        (Some((_, dec, enc)), Some(ld)) => check_weights(ld, enc, dec, &mut checks),
        _ => {
            checks.add(Status::Fail, "models", "cannot load the decoder tokenizer or the encoder (see above)".into());
            None
        }
    };
    check_index(g, &a.db, loaded.as_ref(), trained.as_ref(), &mut checks);
    let failed = checks.0.iter().any(|c| c.status == Status::Fail);
    for c in &checks.0 {
        if a.json {
            outln!("{}", serde_json::to_string(c)?);
        } else {
            let tag = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            outln!("{tag} {:<8} {}", c.what, c.detail);
        }
    }
    Ok(if failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// The base models: given files exist, pinned ones are in the cache and verify.
fn check_models(g: &Global, checks: &mut Checks) {
    let home = g.home();
    for spec in ALL {
        let overridden = match spec.role {
            "decoder" => g.decoder.as_ref(),
            _ => g.encoder.as_ref(),
        };
        match overridden {
            Some(p) if p.exists() => {
                checks.add(Status::Ok, spec.role, format!("{} (given; not the pinned model)", p.display()))
            }
            Some(p) => checks.add(Status::Fail, spec.role, format!("{}: not found", p.display())),
            None => match spec.verify(&home) {
                Ok(()) => checks.add(
                    Status::Ok,
                    spec.role,
                    format!("{} verified in {}", spec.name, spec.dir(&home).display()),
                ),
                Err(e) => checks.add(Status::Fail, spec.role, super::one_line(&e)),
            },
        }
    }
}

/// The device --device names, and whether CUDA is built in and usable.
fn check_device(g: &Global, checks: &mut Checks) -> Option<candle_core::Device> {
    let cuda_built = cfg!(feature = "cuda");
    let cuda = if !cuda_built {
        "CUDA not compiled in (build with --features cuda)".to_string()
    } else if candle_core::utils::cuda_is_available() {
        match candle_core::Device::new_cuda(0) {
            Ok(_) => "CUDA device 0 usable".into(),
            Err(e) => format!("CUDA compiled in but device 0 fails: {e}"),
        }
    } else {
        "CUDA compiled in but no driver/device found".into()
    };
    match g.device() {
        Ok(d) => {
            checks.add(Status::Ok, "device", format!("--device {} -> {}; {cuda}", g.device, crate::device::name(&d)));
            if d.is_cuda() && crate::model::attention::enabled() {
                check_kernels(&d, checks);
            }
            if d.is_cuda() && crate::model::elementwise::enabled() {
                check_elementwise(&d, checks);
            }
            Some(d)
        }
        Err(e) => {
            checks.add(Status::Fail, "device", format!("{}; {cuda}", super::one_line(&e)));
            None
        }
    }
}

/// The fused attention kernel against attention written out in f32, on random inputs.
fn check_kernels(d: &candle_core::Device, checks: &mut Checks) {
    // bf16 inputs and output: ~1e-2 is rounding; a wrong tile or mask is off by ~0.1-1
    const TOLERANCE: f32 = 2e-2;
    // relative, gradients: P and dS are rounded to bf16 inside the backward kernel
    const GRAD_TOLERANCE: f32 = 5e-2;
    let checked = crate::model::attention::parity(d).and_then(|e| Ok((e, crate::model::attention::grad_parity(d)?)));
    match checked {
        Ok((e, g)) if e <= TOLERANCE && g <= GRAD_TOLERANCE => checks.add(
            Status::Ok,
            "kernels",
            format!("fused attention agrees with f32 attention (max error {e:.1e}; gradients {g:.1e} relative)"),
        ),
        Ok((e, g)) => checks.add(
            Status::Fail,
            "kernels",
            format!("fused attention differs from f32 attention by {e:.1e} (gradients {g:.1e} relative): run with REFRAG_FUSED_ATTENTION=0"),
        ),
        Err(e) => checks.add(
            Status::Fail,
            "kernels",
            format!("fused attention fails ({}): run with REFRAG_FUSED_ATTENTION=0", super::one_line(&e)),
        ),
    }
}

/// The fused elementwise kernels (on by default on CUDA) against candle's ops.
fn check_elementwise(d: &candle_core::Device, checks: &mut Checks) {
    // bf16 outputs of size ~1-4: one rounding step is ~1.6e-2
    const TOLERANCE: f32 = 3e-2;
    let (status, what) = match crate::model::elementwise::parity(d) {
        Ok(e) if e <= TOLERANCE => {
            (Status::Ok, format!("fused add-norm, silu-mul, decoding Q/K/V and argmax agree with candle's ops (max error {e:.1e})"))
        }
        Ok(e) => (
            Status::Fail,
            format!("fused add-norm/silu-mul/decoding Q/K/V/argmax differ from candle's ops by {e:.1e}: set REFRAG_FUSED_ELEMENTWISE=0"),
        ),
        Err(e) => (
            Status::Fail,
            format!("fused add-norm/silu-mul/argmax fail ({}): set REFRAG_FUSED_ELEMENTWISE=0", super::one_line(&e)),
        ),
    };
    checks.add(status, "kernels", what);
    let (status, what) = match crate::model::diffops::parity(d) {
        Ok(e) if e <= TOLERANCE => {
            (Status::Ok, format!("training cross-entropy and norm gradients agree with f32 (relative error {e:.1e})"))
        }
        Ok(e) => (
            Status::Fail,
            format!("training kernels differ from f32 by {e:.1e}: set REFRAG_OP_BY_OP=1 to train without them"),
        ),
        Err(e) => (Status::Fail, format!("training kernels fail ({}): set REFRAG_OP_BY_OP=1", super::one_line(&e))),
    };
    checks.add(status, "kernels", what);
}

/// Training's layer op (a layer's backward written out) against autograd op by op on the real
/// decoder: the loss's and the gradients' relative error.
fn check_layer_grad(ld: &crate::model::load::Loader, checks: &mut Checks) {
    // bf16 on both sides, summed in other orders: ~1e-2 is rounding; a wrong term is ~1
    const TOLERANCE: f32 = 5e-2;
    let checked =
        ld.decoder_with(crate::model::decoder::Ops::Differentiable, false).and_then(|mut dec| dec.layer_grad_parity());
    let (status, what) = match checked {
        Ok(e) if e <= TOLERANCE => {
            (Status::Ok, format!("training's layer op agrees with autograd (gradients {e:.1e} relative)"))
        }
        Ok(e) => (
            Status::Fail,
            format!(
                "training's layer op differs from autograd by {e:.1e}: set REFRAG_LAYER_GRAD=0 to train without it"
            ),
        ),
        Err(e) => {
            (Status::Fail, format!("training's layer op fails ({}): set REFRAG_LAYER_GRAD=0", super::one_line(&e)))
        }
    };
    checks.add(status, "kernels", what);
}

/// The trained weights for questions (and for text, where they differ).
fn check_weights(
    ld: &crate::model::load::Loader,
    enc: &crate::model::encoder::Encoder,
    dec: &crate::model::decoder::Decoder,
    checks: &mut Checks,
) -> Option<crate::model::weights::Trained> {
    match ld.trained(enc, dec, crate::model::weights::Purpose::Answers) {
        Ok(Some(t)) => {
            let expands = t
                .expand
                .filter(|p| *p > 0.0)
                .map(|p| format!("{:.0}% of chunks expanded unless --expand says otherwise", 100.0 * p));
            let parts = [
                Some("projector"),
                match &t.chunk_encoder {
                    crate::model::compressor::ChunkEncoder::MiniLm(e) => (e.id != enc.id).then_some("encoder layers"),
                    crate::model::compressor::ChunkEncoder::Grown(_) => Some("chunk encoder grown from the decoder"),
                },
                t.decoder_lora.as_ref().map(|_| "decoder adapters"),
                t.policy.as_ref().map(|_| "expansion policy"),
                match t.question_at {
                    Some(crate::options::QuestionAt::Both) => Some("question read before and after the passages"),
                    Some(crate::options::QuestionAt::Before) => Some("question read before the passages"),
                    _ => None,
                },
                expands.as_deref(),
            ];
            let parts: Vec<&str> = parts.into_iter().flatten().collect();
            // Questions and text may read different folders (weights/qa vs weights/).
            let text = ld
                .weights_dirs(crate::model::weights::Purpose::Text)
                .into_iter()
                .find(|d| d.join(crate::model::projector::FILE).exists());
            let text = match text {
                Some(d) if d != t.dir => format!("; for text (perplexity, bench, train): {}", d.display()),
                _ => String::new(),
            };
            let (k, parts) = (t.k.map(|k| k.to_string()).unwrap_or("?".into()), parts.join(", "));
            checks.add(Status::Ok, "weights", format!("for questions: {} (k = {k}; {parts}){text}", t.dir.display()));
            if let Some(why) = &t.stale_policy {
                checks.add(Status::Warn, "policy", format!("--policy rl is unavailable: {why}"));
            }
            Some(t)
        }
        Ok(None) => {
            checks.add(
                Status::Warn,
                "weights",
                "no trained weights found: --mode refrag is unavailable (see `refrag train`)".into(),
            );
            None
        }
        Err(e) => {
            checks.add(Status::Fail, "weights", super::one_line(&e));
            None
        }
    }
}

/// Built without the store (the lean GPU binary): no index to check.
#[cfg(not(feature = "store"))]
fn check_index(
    _: &Global,
    db: &str,
    _: Option<&Loaded>,
    _: Option<&crate::model::weights::Trained>,
    checks: &mut Checks,
) {
    checks.add(Status::Warn, "index", format!("{db}: not checked (this binary was built without the store feature)"));
}

/// The index at `db`: there, readable, and built with the models (and chunk encoder) in use.
#[cfg(feature = "store")]
fn check_index(
    g: &Global,
    db: &str,
    loaded: Option<&Loaded>,
    trained: Option<&crate::model::weights::Trained>,
    checks: &mut Checks,
) {
    let local_missing = !crate::index::store::is_remote(db) && !std::path::Path::new(db).exists();
    if local_missing {
        checks.add(
            Status::Warn,
            "index",
            format!("{}: no index yet (build one with `refrag index PATH --db {}`)", db, db),
        );
    } else {
        match g.storage_options().and_then(|o| Store::open_with(db, &o)) {
            Err(e) => checks.add(Status::Fail, "index", super::one_line(&e)),
            Ok(store) => match (&store.info, loaded) {
                (None, _) => checks.add(Status::Fail, "index", format!("{}: exists but holds no refrag index", db)),
                (Some(info), Some((tok_id, _, enc))) => {
                    let rows = store.rows().unwrap_or(0);
                    let minilm = crate::model::compressor::ChunkEncoder::MiniLm(enc.clone());
                    let chunk_enc = trained.map(|t| &t.chunk_encoder).unwrap_or(&minilm);
                    let now = crate::index::indexer::index_info(enc, chunk_enc, tok_id, info.k);
                    let summary = format!(
                        "{}: {rows} passages, k = {}, schema v{}, {:.1} MiB; encoder {}, chunk encoder {}",
                        db,
                        info.k,
                        info.schema_version,
                        store.disk_bytes() as f64 / (1 << 20) as f64,
                        info.encoder,
                        info.chunk_encoder
                    );
                    match (info.check(&now, db), info.check_chunks(&now, db)) {
                        (Err(e), _) => checks.add(Status::Fail, "index", format!("{summary}; {}", super::one_line(&e))),
                        (Ok(()), Err(e)) => checks.add(
                            Status::Warn,
                            "index",
                            format!("{summary}; --mode full works, --mode refrag does not: {}", super::one_line(&e)),
                        ),
                        (Ok(()), Ok(())) => checks.add(Status::Ok, "index", summary),
                    }
                }
                (Some(info), None) => checks.add(
                    Status::Warn,
                    "index",
                    format!("{}: k = {}; not checked against the models (they did not load)", db, info.k),
                ),
            },
        }
    }
}
