//! The optional config file: defaults for any option, below flags and environment variables.
//!
//! `$REFRAG_CONFIG`, else `<XDG config dir>/refrag/config.toml` (e.g. ~/.config/refrag/config.toml).
//! A top-level key sets the option whose environment variable is `REFRAG_<KEY>`; a key in a
//! table `[cmd]` sets `REFRAG_<CMD>_<KEY>` (dashes become underscores):
//!
//! ```toml
//! device = "cuda"        # REFRAG_DEVICE, --device
//! top_k = 5              # REFRAG_TOP_K, --top-k
//! [train]
//! lr = 1e-4              # REFRAG_TRAIN_LR, train --lr
//! ```
//!
//! Each value becomes that variable unless the environment already has it, so the precedence is
//! flag > environment > file > built-in default. An unknown key is an error (a typo would
//! otherwise be ignored silently).

use anyhow::{anyhow, bail, Result};
use std::collections::BTreeSet;
use std::path::PathBuf;

/// The config file in use: (path, given explicitly through REFRAG_CONFIG).
pub fn path() -> Option<(PathBuf, bool)> {
    match std::env::var_os("REFRAG_CONFIG") {
        Some(p) if !p.is_empty() => Some((PathBuf::from(p), true)),
        _ => dirs::config_dir().map(|d| (d.join("refrag").join("config.toml"), false)),
    }
}

/// Every environment variable an option of `cmd` (or its subcommands) reads.
pub fn known_vars(cmd: &clap::Command) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for a in cmd.get_arguments() {
        if let Some(e) = a.get_env() {
            out.insert(e.to_string_lossy().to_string());
        }
    }
    for s in cmd.get_subcommands() {
        out.extend(known_vars(s));
    }
    out
}

/// Read the config file (if any) into environment variables not already set; returns the
/// path read. Call before parsing arguments, while the process has one thread.
pub fn apply(cmd: &clap::Command) -> Result<Option<PathBuf>> {
    let Some((path, explicit)) = path() else { return Ok(None) };
    if !path.exists() {
        if explicit {
            bail!("{}: config file not found (from REFRAG_CONFIG)", path.display());
        }
        return Ok(None);
    }
    let text = crate::index::corpus::read_text(&path)?;
    let vars = parse(&text, &known_vars(cmd)).map_err(|e| anyhow!("{}:{e}", path.display()))?;
    for (k, v) in vars {
        if std::env::var_os(&k).is_none() {
            std::env::set_var(k, v);
        }
    }
    Ok(Some(path))
}

/// Config text -> (variable, value) pairs; errors read "LINE: message".
pub fn parse(text: &str, known: &BTreeSet<String>) -> Result<Vec<(String, String)>> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e.span().map(|s| text[..s.start.min(text.len())].lines().count().max(1)).unwrap_or(1);
        anyhow!("{line}: {}", e.message().replace('\n', " "))
    })?;
    let line_of = |key: &str| text.lines().position(|l| l.trim_start().starts_with(key)).map(|n| n + 1).unwrap_or(1);
    let mut out = Vec::new();
    let mut put = |key: &str, var: String, v: &toml::Value| -> Result<()> {
        if !known.contains(&var) {
            bail!(
                "{}: unknown setting `{key}` (no option reads {var})",
                line_of(key.rsplit('.').next().unwrap_or(key))
            );
        }
        let s = scalar(v)
            .ok_or_else(|| anyhow!("{}: `{key}` must be a string, number, boolean or list of them", line_of(key)))?;
        out.push((var, s));
        Ok(())
    };
    let name = |k: &str| k.to_uppercase().replace('-', "_");
    for (k, v) in &table {
        match v {
            toml::Value::Table(t) => {
                for (k2, v2) in t {
                    put(&format!("{k}.{k2}"), format!("REFRAG_{}_{}", name(k), name(k2)), v2)?;
                }
            }
            _ => put(k, format!("REFRAG_{}", name(k)), v)?,
        }
    }
    Ok(out)
}

fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Array(a) => a.iter().map(scalar).collect::<Option<Vec<_>>>().map(|v| v.join(",")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> BTreeSet<String> {
        ["REFRAG_DEVICE", "REFRAG_TOP_K", "REFRAG_TRAIN_LR", "REFRAG_BENCH_CONTEXTS"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn keys_map_to_variables() {
        let v = parse("device = \"cpu\"\ntop-k = 5\n[train]\nlr = 1e-4\n[bench]\ncontexts = [512, 2048]\n", &known())
            .unwrap();
        assert!(v.contains(&("REFRAG_DEVICE".into(), "cpu".into())));
        assert!(v.contains(&("REFRAG_TOP_K".into(), "5".into())));
        assert!(v.contains(&("REFRAG_TRAIN_LR".into(), "0.0001".into())));
        assert!(v.contains(&("REFRAG_BENCH_CONTEXTS".into(), "512,2048".into())));
    }

    /// Every flag can be set from the environment and so from the config file.
    #[test]
    fn every_option_has_an_environment_variable() {
        fn missing(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if a.get_long().is_some() && a.get_env().is_none() && !matches!(id, "help" | "version") {
                    out.push(format!("{path} --{}", a.get_long().unwrap_or(id)));
                }
            }
            for s in cmd.get_subcommands() {
                missing(s, &format!("{path} {}", s.get_name()), out);
            }
        }
        use clap::CommandFactory;
        let mut out = Vec::new();
        missing(&crate::cli::Cli::command(), "refrag", &mut out);
        assert!(out.is_empty(), "options without an environment variable: {out:?}");
        assert!(known_vars(&crate::cli::Cli::command()).contains("REFRAG_DATASET_SPLIT"));
    }

    #[test]
    fn typos_and_bad_syntax_name_the_line() {
        let e = parse("device = \"cpu\"\ntopk = 5\n", &known()).unwrap_err().to_string();
        assert!(e.starts_with("2: unknown setting `topk`"), "{e}");
        let e = parse("device = \"cpu\"\n\ntop_k = = 5\n", &known()).unwrap_err().to_string();
        assert!(e.starts_with("3: "), "{e}");
    }
}
