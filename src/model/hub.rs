//! Hugging Face model ids for `--decoder` / `--encoder`, where a machine is online.
//!
//! Accepted forms: `owner/name` (the encoder: config.json, tokenizer.json, model.safetensors;
//! a decoder repository holding exactly one .gguf file), `owner/name:FILE.gguf` (one file of a
//! repository), with `@REVISION` after the name to pin a branch or commit. Files land in the
//! standard Hugging Face cache (`$HF_HOME/hub`), so other tools share them; `HF_ENDPOINT`
//! points at a mirror and `HF_TOKEN` authenticates. Nothing in refrag depends on this: the
//! pinned models come from the Python package index (see `models`).

use anyhow::{bail, Result};
use std::path::PathBuf;

/// A parsed model id.
#[derive(Debug, PartialEq, Eq)]
pub struct HubId {
    pub repo: String,
    pub revision: Option<String>,
    pub file: Option<String>,
}

/// `owner/name[@rev][:file]`, or None when `s` does not look like a model id (a path).
pub fn parse(s: &str) -> Option<HubId> {
    if s.starts_with(['.', '/', '~']) || s.contains('\\') {
        return None;
    }
    let (id, file) = match s.split_once(':') {
        Some((a, f)) if !f.is_empty() && !f.contains(':') => (a, Some(f.to_string())),
        Some(_) => return None,
        None => (s, None),
    };
    let (repo, revision) = match id.split_once('@') {
        Some((r, v)) if !v.is_empty() => (r, Some(v.to_string())),
        Some(_) => return None,
        None => (id, None),
    };
    let parts: Vec<&str> = repo.split('/').collect();
    let ok = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && p != "..";
    if parts.len() != 2 || !parts.iter().all(|p| ok(p)) {
        return None;
    }
    Some(HubId { repo: repo.to_string(), revision, file })
}

/// Encoder files a model folder needs.
pub const ENCODER_FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

/// Download (or find in the cache) what a role needs; returns the GGUF file (decoder) or the
/// folder holding the encoder files.
#[cfg(feature = "hub")]
pub fn fetch(id: &HubId, role: &str, quiet: bool) -> Result<PathBuf> {
    use anyhow::Context;
    use hf_hub::{api::tokio::ApiBuilder, Repo, RepoType};
    let spec = format!("{}{}", id.repo, id.revision.as_ref().map(|r| format!("@{r}")).unwrap_or_default());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let api = ApiBuilder::from_env()
            .with_progress(!quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .build()
            .with_context(|| format!("{spec}: cannot set up the Hugging Face client"))?;
        let repo = match &id.revision {
            Some(r) => Repo::with_revision(id.repo.clone(), RepoType::Model, r.clone()),
            None => Repo::model(id.repo.clone()),
        };
        let repo = api.repo(repo);
        let get = |f: String| {
            let repo = &repo;
            let spec = &spec;
            async move {
                repo.get(&f).await.with_context(|| {
                    format!("{spec}: cannot fetch {f} from the Hugging Face hub (offline? set HF_ENDPOINT for a mirror, or pass a local path)")
                })
            }
        };
        if role == "encoder" {
            let mut dir = None;
            for f in ENCODER_FILES {
                let p = get(f.to_string()).await?;
                dir = p.parent().map(std::path::Path::to_path_buf);
            }
            return dir.context("empty download path");
        }
        let file = match &id.file {
            Some(f) => f.clone(),
            None => {
                let info = repo.info().await.with_context(|| format!("{spec}: cannot list the repository on the Hugging Face hub"))?;
                let ggufs: Vec<String> =
                    info.siblings.into_iter().map(|s| s.rfilename).filter(|f| f.ends_with(".gguf")).collect();
                match ggufs.as_slice() {
                    [one] => one.clone(),
                    [] => bail!("{spec}: the repository holds no .gguf file"),
                    many => bail!("{spec}: several .gguf files; name one as {}:FILE ({})", id.repo, many.join(", ")),
                }
            }
        };
        get(file).await
    })
}

#[cfg(not(feature = "hub"))]
pub fn fetch(id: &HubId, role: &str, _quiet: bool) -> Result<PathBuf> {
    bail!("{}: no such {role} file; Hugging Face ids need a build with the `hub` feature", id.repo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_paths() {
        let id = parse("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:smollm2.q4_1.gguf").unwrap();
        assert_eq!(id.repo, "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF");
        assert_eq!(id.file.as_deref(), Some("smollm2.q4_1.gguf"));
        let id = parse("sentence-transformers/all-MiniLM-L6-v2@main").unwrap();
        assert_eq!(id.revision.as_deref(), Some("main"));
        assert_eq!(id.file, None);
        for path in ["./a/b", "/abs/x", "a/b/c", "model.gguf", "~/m", "a/..", "a/b@", "a/b:"] {
            assert_eq!(parse(path), None, "{path}");
        }
    }
}
