//! `refrag completions SHELL` and `refrag man DIR`: generated from the clap definitions, so
//! they cannot drift (a test compares the committed man/ pages with fresh ones).

use super::Cli;
use anyhow::{Context, Result};
use clap::CommandFactory;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct CompletionsArgs {
    /// Shell to generate completions for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(clap::Args, Debug)]
pub struct ManArgs {
    /// Folder to write refrag.1 and refrag-SUBCOMMAND.1 into.
    #[arg(default_value = "man")]
    pub dir: PathBuf,
}

pub fn completions(a: CompletionsArgs) -> Result<ExitCode> {
    let mut cmd = Cli::command();
    let mut buf = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "refrag", &mut buf);
    std::io::Write::write_all(&mut std::io::stdout(), &buf)?;
    Ok(ExitCode::SUCCESS)
}

/// Every man page: (file name, roff text).
pub fn man_pages() -> Result<Vec<(String, Vec<u8>)>> {
    let cmd = Cli::command();
    let mut out = Vec::new();
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut buf)?;
    out.push(("refrag.1".to_string(), buf));
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("refrag-{}", sub.get_name());
        let leaked: &'static str = Box::leak(name.clone().into_boxed_str());
        let sub = sub.clone().name(leaked);
        let mut buf = Vec::new();
        clap_mangen::Man::new(sub).render(&mut buf)?;
        out.push((format!("{name}.1"), buf));
    }
    Ok(out)
}

pub fn man(a: ManArgs) -> Result<ExitCode> {
    write_man(&a.dir)?;
    Ok(ExitCode::SUCCESS)
}

pub fn write_man(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    for (name, text) in man_pages()? {
        std::fs::write(dir.join(&name), text).with_context(|| format!("{}", dir.join(&name).display()))?;
    }
    Ok(())
}
