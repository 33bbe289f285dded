//! `refrag doctor`: what works here and what does not, each with the fix.

use super::Global;
use crate::models::ALL;
use crate::store::Store;
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

pub fn run(g: &Global, a: DoctorArgs) -> Result<ExitCode> {
    let mut checks = Vec::new();
    let mut add = |status, what: &str, detail: String| checks.push(Check { status, what: what.into(), detail });

    match super::config::path() {
        Some((p, _)) if p.exists() => add(Status::Ok, "config", format!("{} (read)", p.display())),
        Some((p, _)) => add(Status::Ok, "config", format!("none ({} would be read)", p.display())),
        None => add(Status::Ok, "config", "none".into()),
    }

    let home = g.home();
    for spec in ALL {
        let overridden = match spec.role {
            "decoder" => g.decoder.as_ref(),
            _ => g.encoder.as_ref(),
        };
        match overridden {
            Some(p) if p.exists() => add(Status::Ok, spec.role, format!("{} (given; not the pinned model)", p.display())),
            Some(p) => add(Status::Fail, spec.role, format!("{}: not found", p.display())),
            None => match spec.verify(&home) {
                Ok(()) => add(Status::Ok, spec.role, format!("{} verified in {}", spec.name, spec.dir(&home).display())),
                Err(e) => add(Status::Fail, spec.role, super::one_line(&e)),
            },
        }
    }

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
    let device = match g.device() {
        Ok(d) => {
            add(Status::Ok, "device", format!("--device {} -> {}; {cuda}", g.device, crate::device::name(&d)));
            Some(d)
        }
        Err(e) => {
            add(Status::Fail, "device", format!("{}; {cuda}", super::one_line(&e)));
            None
        }
    };

    // Load what asking needs, as asking would.
    let loaded = device.as_ref().and_then(|d| {
        let gguf = crate::models::resolve_decoder(g.decoder.as_deref(), &home, true).ok()?;
        let (_, tok_id) = crate::gguf_tokenizer::load(&gguf).ok()?;
        let hidden = crate::decoder::hidden_size(&gguf).ok()?;
        let enc = g.load_encoder(d).ok()?;
        Some((tok_id, hidden, enc))
    });
    let mut trained = None;
    if let Some((_, hidden, enc)) = &loaded {
        match g.trained(enc, *hidden, crate::projector::Purpose::Answers) {
            Ok(Some(t)) => {
                let expands = t.expand.filter(|p| *p > 0.0).map(|p| format!("{:.0}% of chunks expanded unless --expand says otherwise", 100.0 * p));
                let parts = [
                    Some("projector"),
                    (t.chunk_encoder.id != enc.id).then_some("encoder layers"),
                    t.decoder_lora.as_ref().map(|_| "decoder adapters"),
                    t.policy.as_ref().map(|_| "expansion policy"),
                    match t.question_at {
                        Some(crate::prompt::QuestionAt::Both) => Some("question read before and after the passages"),
                        Some(crate::prompt::QuestionAt::Before) => Some("question read before the passages"),
                        _ => None,
                    },
                    expands.as_deref(),
                ];
                let parts: Vec<&str> = parts.into_iter().flatten().collect();
                // Questions and text may read different folders (weights/qa vs weights/).
                let text = g.weights_dirs(crate::projector::Purpose::Text).into_iter().find(|d| d.join(crate::projector::FILE).exists());
                let text = match text {
                    Some(d) if d != t.dir => format!("; for text (perplexity, bench, train): {}", d.display()),
                    _ => String::new(),
                };
                let (k, parts) = (t.k.map(|k| k.to_string()).unwrap_or("?".into()), parts.join(", "));
                add(Status::Ok, "weights", format!("for questions: {} (k = {k}; {parts}){text}", t.dir.display()));
                if let Some(why) = &t.stale_policy {
                    add(Status::Warn, "policy", format!("--policy rl is unavailable: {why}"));
                }
                trained = Some(t);
            }
            Ok(None) => add(Status::Warn, "weights", "no trained weights found: --mode refrag is unavailable (see `refrag train`)".into()),
            Err(e) => add(Status::Fail, "weights", super::one_line(&e)),
        }
    } else {
        add(Status::Fail, "models", "cannot load the decoder tokenizer or the encoder (see above)".into());
    }

    let local_missing = !crate::store::is_remote(&a.db) && !std::path::Path::new(&a.db).exists();
    if local_missing {
        add(Status::Warn, "index", format!("{}: no index yet (build one with `refrag index PATH --db {}`)", a.db, a.db));
    } else {
        match g.storage_options().and_then(|o| Store::open_with(&a.db, &o)) {
            Err(e) => add(Status::Fail, "index", super::one_line(&e)),
            Ok(store) => match (&store.info, &loaded) {
                (None, _) => add(Status::Fail, "index", format!("{}: exists but holds no refrag index", a.db)),
                (Some(info), Some((tok_id, _, enc))) => {
                    let rows = store.rows().unwrap_or(0);
                    let chunk_enc = trained.as_ref().map(|t| &t.chunk_encoder).unwrap_or(enc);
                    let now = crate::indexer::index_info(enc, chunk_enc, tok_id, info.k);
                    let summary = format!(
                        "{}: {rows} passages, k = {}, schema v{}, {:.1} MiB; encoder {}, chunk encoder {}",
                        a.db,
                        info.k,
                        info.schema_version,
                        store.disk_bytes() as f64 / (1 << 20) as f64,
                        info.encoder,
                        info.chunk_encoder
                    );
                    match (info.check(&now, &a.db), info.check_chunks(&now, &a.db)) {
                        (Err(e), _) => add(Status::Fail, "index", format!("{summary}; {}", super::one_line(&e))),
                        (Ok(()), Err(e)) => add(Status::Warn, "index", format!("{summary}; --mode full works, --mode refrag does not: {}", super::one_line(&e))),
                        (Ok(()), Ok(())) => add(Status::Ok, "index", summary),
                    }
                }
                (Some(info), None) => add(Status::Warn, "index", format!("{}: k = {}; not checked against the models (they did not load)", a.db, info.k)),
            },
        }
    }

    let failed = checks.iter().any(|c| c.status == Status::Fail);
    for c in &checks {
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
