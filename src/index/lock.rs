//! The write lock of a local index: one plain writer, or shard workers side by side; object
//! stores take none (their commits are conditional puts).

use crate::index::store::is_remote;
use anyhow::{anyhow, bail, Context, Result};

/// Lock file of the process that writes a local index.
pub const LOCK_FILE: &str = ".refrag-write.lock";

/// How a writer shares a local index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteLock {
    /// The only writer (plain indexing, --delete, --finalize).
    Exclusive,
    /// One of several shard workers appending side by side (`--shard I/N`).
    Shared,
}

/// Take the write lock of a local index: a lock on `.refrag-write.lock` in its folder, held
/// while the returned file lives (the OS releases it if the process dies). Take it before
/// opening the store. Shard workers share it; a plain writer needs it alone. Refuses a folder
/// that holds files (other than a README or dotfiles) but no LanceDB tables (not an index:
/// nothing in it is touched). Object stores take no lock (None): their commits are conditional
/// puts, safe for concurrent writers.
pub fn lock_for_writing(uri: &str, mode: WriteLock) -> Result<Option<std::fs::File>> {
    if is_remote(uri) {
        return Ok(None);
    }
    let dir = std::path::Path::new(uri.strip_prefix("file://").unwrap_or(uri));
    if dir.exists() && !dir.is_dir() {
        bail!("{uri}: not a directory (a refrag index is a LanceDB folder)");
    }
    if dir.is_dir() {
        let names: Vec<String> = std::fs::read_dir(dir)
            .with_context(|| format!("{uri}: cannot read the folder"))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().to_string())
            // a folder kept in version control with a README (the repository's own `index/`)
            // or dotfiles is still empty as far as indexes go
            .filter(|n| n != LOCK_FILE && !n.starts_with('.') && !n.starts_with("README"))
            .collect();
        if !names.is_empty() && !names.iter().any(|n| n.ends_with(".lance")) {
            bail!("{uri}: holds {} and no LanceDB tables; give an empty or new folder to --db", names[0]);
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("{uri}: cannot create the index folder"))?;
    let path = dir.join(LOCK_FILE);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("{}: cannot write here (read-only?)", path.display()))?;
    let r = match mode {
        WriteLock::Exclusive => f.try_lock(),
        WriteLock::Shared => f.try_lock_shared(),
    };
    match r {
        Ok(()) => Ok(Some(f)),
        Err(std::fs::TryLockError::WouldBlock) if mode == WriteLock::Shared => bail!(
            "{uri}: a plain `refrag index` (or --finalize) is writing to this index; shard workers wait for it to finish (lock {})",
            path.display()
        ),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "{uri}: another `refrag index` is writing to this index (or shard workers are); wait for it to finish (lock {})",
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => Err(anyhow!("{}: cannot lock: {e}", path.display())),
    }
}
