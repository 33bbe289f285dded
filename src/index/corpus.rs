//! Documents in, passages and chunks out.
//!
//! Inputs are files of text, Markdown, HTML and PDF (one document each, id = path; how each is
//! read: [`formats`]), source files with `--code`, and .jsonl files (one document per line:
//! `{"id","title","text"}`, other fields kept as metadata). Everything is read and
//! checked before anything is written, so bad input leaves an index as it was. Paths inside
//! JSONL are data: nothing in a document is opened or followed.

use super::formats::{self, Kind, Section};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One document to index.
#[derive(Debug, Clone)]
pub struct Document {
    pub id: String,
    pub title: String,
    pub text: String,
    /// Other JSONL fields, as a JSON object string.
    pub meta: String,
    /// Where it came from (`file` or `file:line`), for messages.
    pub source: String,
    /// Where pages or headings start in `text` (empty: one section).
    pub sections: Vec<Section>,
}

impl Document {
    /// sha256 of everything that shapes the stored rows.
    pub fn hash(&self, settings: &str) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for part in [&self.title, &self.text, &self.meta, settings] {
            h.update(part.as_bytes());
            h.update([0u8]);
        }
        // Sections cut passages: a document with them hashes them too (one without hashes as before).
        for s in &self.sections {
            h.update(format!("{}:{:?}", s.start, s.at).as_bytes());
        }
        crate::model::cache::hex(&h.finalize()[..16])
    }

    /// Its passages (see [`passages`]), each with the page or heading it sits under; a
    /// passage never spans two sections.
    pub fn passages(&self, min_words: usize, max_words: usize) -> Vec<(String, Option<&formats::Locator>)> {
        let mut cuts: Vec<(usize, Option<&formats::Locator>)> = vec![(0, None)];
        for s in &self.sections {
            if s.start == 0 {
                cuts[0].1 = Some(&s.at);
            } else if s.start < self.text.len() && self.text.is_char_boundary(s.start) {
                cuts.push((s.start, Some(&s.at)));
            }
        }
        let mut out = Vec::new();
        for (i, &(start, at)) in cuts.iter().enumerate() {
            let end = cuts.get(i + 1).map_or(self.text.len(), |c| c.0);
            out.extend(passages(&self.text[start..end], min_words, max_words).into_iter().map(|p| (p, at)));
        }
        out
    }

    /// The shard (0..n) this document belongs to: a stable hash of its id, so every worker of
    /// `refrag index --shard I/N` over the same corpus takes a disjoint part, and a document
    /// stays in its shard whatever else changes.
    pub fn shard(&self, n: usize) -> usize {
        use sha2::{Digest, Sha256};
        let d = Sha256::digest(self.id.as_bytes());
        (u64::from_le_bytes(d[..8].try_into().unwrap()) % n.max(1) as u64) as usize
    }
}

/// A file to read and the id its text document gets: the path relative to the folder given
/// on the command line, or the path as given for a file named directly.
#[derive(Debug, Clone)]
pub struct InputFile {
    pub path: PathBuf,
    pub id: String,
    /// Found by walking a folder: a file that cannot be read as text is skipped (and counted),
    /// not an error as for a file named on the command line.
    pub walked: bool,
}

/// How folders are walked (as ripgrep walks them: the `ignore` crate).
#[derive(Debug, Clone)]
pub struct WalkOptions {
    /// Also hidden files and folders (names starting with a dot).
    pub hidden: bool,
    /// Do not read .gitignore, .ignore and git's exclude files.
    pub no_ignore: bool,
    /// Follow symbolic links.
    pub follow: bool,
    /// Include (`*.md`) and exclude (`!drafts/**`) globs, gitignore syntax, as `rg --glob`.
    pub globs: Vec<String>,
    /// Files larger than this are skipped.
    pub max_bytes: u64,
    /// Also source files (`formats::CODE`), as text.
    pub code: bool,
    /// Only files of these ripgrep file types (`rg --type-list`; e.g. `md`, `html`, `py`): a
    /// source type asked for is taken as text without `--code`.
    pub types: Vec<String>,
    /// Not files of these file types.
    pub types_not: Vec<String>,
}

/// Why a file found in a folder was passed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    Unsupported,
    Binary,
    NotUtf8,
    TooLarge,
    Unreadable,
    /// A PDF whose text could not be read (damaged, encrypted, scanned, or no pdftotext).
    Pdf,
}

impl SkipReason {
    pub fn name(self) -> &'static str {
        match self {
            SkipReason::Unsupported => "unsupported type",
            SkipReason::Binary => "binary",
            SkipReason::NotUtf8 => "not UTF-8",
            SkipReason::TooLarge => "too large",
            SkipReason::Unreadable => "unreadable",
            SkipReason::Pdf => "PDF not read",
        }
    }
}

/// A file passed over, and why (with the error for an unreadable one).
#[derive(Debug, Clone)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: SkipReason,
    pub detail: String,
}

/// Expand files and folders: files named are taken as they are; folders are walked (sorted,
/// .gitignore/.ignore respected, hidden entries skipped, as `walk` says), keeping the files
/// [`Kind::of`] knows and recording every other file in `skipped`.
pub fn collect_files(paths: &[PathBuf], walk: &WalkOptions, skipped: &mut Vec<Skipped>) -> Result<Vec<InputFile>> {
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).with_context(|| format!("{}", p.display()))?;
        if !meta.is_dir() {
            out.push(InputFile { id: p.to_string_lossy().to_string(), path: p.clone(), walked: false });
            continue;
        }
        let mut b = ignore::WalkBuilder::new(p);
        let respect = !walk.no_ignore;
        b.hidden(!walk.hidden)
            .ignore(respect)
            .git_ignore(respect)
            .git_exclude(respect)
            .git_global(respect)
            .parents(respect)
            .require_git(false)
            .follow_links(walk.follow)
            .sort_by_file_name(|a, b| a.cmp(b));
        if !walk.globs.is_empty() {
            let mut o = ignore::overrides::OverrideBuilder::new(p);
            for g in &walk.globs {
                o.add(g).with_context(|| format!("--glob {g}"))?;
            }
            b.overrides(o.build().context("--glob")?);
        }
        if !walk.types.is_empty() || !walk.types_not.is_empty() {
            let mut tb = ignore::types::TypesBuilder::new();
            tb.add_defaults();
            for t in &walk.types {
                tb.select(t);
            }
            for t in &walk.types_not {
                tb.negate(t);
            }
            b.types(tb.build().context("--type")?);
        }
        for entry in b.build() {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    let path = match &e {
                        ignore::Error::WithPath { path, .. } => path.clone(),
                        _ => p.clone(),
                    };
                    // the OS's words alone: the error's own text repeats the path twice more
                    let detail = e.io_error().map_or_else(|| e.to_string(), |io| io.to_string());
                    skipped.push(Skipped { path, reason: SkipReason::Unreadable, detail });
                    continue;
                }
            };
            if !entry.file_type().is_some_and(|t| t.is_file()) {
                continue; // folders; symbolic links unless --follow
            }
            let f = entry.into_path();
            let skip = |reason, detail: String| Skipped { path: f.clone(), reason, detail };
            if Kind::of(&f, walk.code || !walk.types.is_empty()).is_none() {
                skipped.push(skip(SkipReason::Unsupported, String::new()));
                continue;
            }
            match std::fs::metadata(&f) {
                Err(e) => skipped.push(skip(SkipReason::Unreadable, e.to_string())),
                Ok(m) if m.len() > walk.max_bytes => {
                    skipped.push(skip(SkipReason::TooLarge, format!("{} bytes", m.len())));
                }
                Ok(_) => out.push(InputFile {
                    id: f.strip_prefix(p).unwrap_or(&f).to_string_lossy().to_string(),
                    path: f,
                    walked: true,
                }),
            }
        }
    }
    Ok(out)
}

/// Read a UTF-8 text file; errors name the file (and the line of a bad byte).
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    utf8(path, bytes)
}

/// As [`read_text`], decompressing a file whose name ends in `.gz`.
pub fn read_text_gz(path: &Path) -> Result<String> {
    if path.extension().is_none_or(|e| e != "gz") {
        return read_text(path);
    }
    use std::io::Read;
    let f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(f)
        .read_to_end(&mut bytes)
        .with_context(|| format!("{}: not a gzip file (or a broken one)", path.display()))?;
    utf8(path, bytes)
}

fn utf8(path: &Path, bytes: Vec<u8>) -> Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        anyhow!("{}:{line}: not UTF-8 text (invalid byte at offset {at})", path.display())
    })
}

/// Read every document of these files. Empty documents are skipped with a note in `warnings`;
/// a walked file that is not text (binary, not UTF-8) or vanished is recorded in `skipped`.
pub fn load(files: &[InputFile], warnings: &mut Vec<String>, skipped: &mut Vec<Skipped>) -> Result<Vec<Document>> {
    let mut docs = Vec::new();
    let mut seen: HashMap<String, String> = HashMap::new();
    for InputFile { path: f, id: file_id, walked } in files {
        if Kind::of(f, true) == Some(Kind::Pdf) {
            match formats::pdf(f) {
                Ok(ex) => docs.push(document(f, file_id, ex)),
                Err(e) if *walked => {
                    let e = format!("{e:#}");
                    let detail = e.strip_prefix(&format!("{}: ", f.display())).unwrap_or(&e).to_string();
                    skipped.push(Skipped { path: f.clone(), reason: SkipReason::Pdf, detail })
                }
                Err(e) => return Err(e),
            }
            continue;
        }
        let bytes = match std::fs::read(f) {
            Ok(b) => b,
            Err(e) if *walked => {
                skipped.push(Skipped { path: f.clone(), reason: SkipReason::Unreadable, detail: e.to_string() });
                continue;
            }
            Err(e) => return Err(anyhow!("{}: {e}", f.display())),
        };
        if *walked {
            let reason = if bytes.contains(&0) {
                Some(SkipReason::Binary)
            } else {
                std::str::from_utf8(&bytes).is_err().then_some(SkipReason::NotUtf8)
            };
            if let Some(reason) = reason {
                skipped.push(Skipped { path: f.clone(), reason, detail: String::new() });
                continue;
            }
        }
        docs.extend(documents_from_bytes(f, file_id, bytes)?);
    }
    let mut out = Vec::new();
    for d in docs {
        if d.text.trim().is_empty() {
            warnings.push(format!("{}: empty document skipped", d.source));
            continue;
        }
        if let Some(prev) = seen.insert(d.id.clone(), d.source.clone()) {
            bail!("{}: duplicate document id {:?} (first at {prev})", d.source, d.id);
        }
        out.push(d);
    }
    Ok(out)
}

/// A document of one file's extracted text; metadata records the format's fields.
fn document(f: &Path, file_id: &str, ex: formats::Extracted) -> Document {
    Document {
        id: file_id.to_string(),
        title: ex.title,
        text: ex.text,
        meta: serde_json::Value::Object(ex.meta).to_string(),
        source: f.display().to_string(),
        sections: ex.sections,
    }
}

/// The documents of one file's bytes: a .jsonl file holds one per line, any other file is one
/// document whose id is `file_id` (Markdown and HTML read as [`formats`] says). Errors name the file (and line). Nothing here touches the
/// file system: paths inside documents are data.
pub fn documents_from_bytes(f: &Path, file_id: &str, bytes: Vec<u8>) -> Result<Vec<Document>> {
    if bytes.contains(&0) {
        bail!("{}: binary file (contains NUL bytes), not text", f.display());
    }
    let text = utf8(f, bytes)?;
    Ok(match Kind::of(f, true) {
        Some(Kind::Jsonl) => parse_jsonl(f, &text)?,
        Some(Kind::Markdown) => vec![document(f, file_id, formats::markdown(&text))],
        Some(Kind::Html) => vec![document(f, file_id, formats::html(&text))],
        // A text file's name is its id, not a title (titles help retrieval; names do not).
        _ => vec![document(f, file_id, formats::plain(text, f))],
    })
}

fn parse_jsonl(path: &Path, text: &str) -> Result<Vec<Document>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = format!("{}:{}", path.display(), n + 1);
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| anyhow!("{at}: malformed JSON: {e}"))?;
        let serde_json::Value::Object(mut obj) = v else {
            bail!("{at}: expected a JSON object {{\"id\",\"title\",\"text\"}}");
        };
        let id = match obj.remove("id") {
            Some(serde_json::Value::String(s)) if !s.is_empty() => s,
            Some(serde_json::Value::Number(x)) => x.to_string(),
            _ => bail!("{at}: missing \"id\" (a non-empty string or a number)"),
        };
        let text = match obj.remove("text") {
            Some(serde_json::Value::String(s)) => s,
            _ => bail!("{at}: missing \"text\" (a string)"),
        };
        let title = match obj.remove("title") {
            Some(serde_json::Value::String(s)) => s,
            None | Some(serde_json::Value::Null) => String::new(),
            _ => bail!("{at}: \"title\" must be a string"),
        };
        let meta = serde_json::Value::Object(obj).to_string();
        out.push(Document { id, title, text, meta, source: at, sections: Vec::new() });
    }
    Ok(out)
}

/// Split a document into passages of about `min_words`..`max_words` words, keeping paragraphs
/// together where they fit and cutting long paragraphs at sentence ends.
pub fn passages(text: &str, min_words: usize, max_words: usize) -> Vec<String> {
    let mut units: Vec<String> = Vec::new();
    for para in text.split("\n\n").map(|p| p.split_whitespace().collect::<Vec<_>>().join(" ")) {
        if para.is_empty() {
            continue;
        }
        if para.split(' ').count() <= max_words {
            units.push(para);
        } else {
            units.extend(split_long(&para, max_words));
        }
    }
    let mut out: Vec<String> = Vec::new();
    let mut cur = String::new();
    let mut cur_words = 0;
    for u in units {
        let w = u.split(' ').count();
        if cur_words > 0 && (cur_words >= min_words || cur_words + w > max_words) {
            out.push(std::mem::take(&mut cur));
            cur_words = 0;
        }
        if !cur.is_empty() {
            cur.push('\n');
        }
        cur.push_str(&u);
        cur_words += w;
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Cut a long paragraph into pieces of at most `max_words`, preferring sentence ends.
fn split_long(para: &str, max_words: usize) -> Vec<String> {
    let words: Vec<&str> = para.split(' ').collect();
    let mut out = Vec::new();
    let mut start = 0;
    while start < words.len() {
        let end = (start + max_words).min(words.len());
        let mut cut = end;
        if end < words.len() {
            // last sentence end in the second half of the window
            if let Some(i) = (start + max_words / 2..end).rev().find(|&i| words[i].ends_with(['.', '!', '?'])) {
                cut = i + 1;
            }
        }
        out.push(words[start..cut].join(" "));
        start = cut;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_vanishes_between_walk_and_read_is_counted_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["a.txt", "b.txt"] {
            std::fs::write(dir.path().join(n), format!("The text of {n}.")).unwrap();
        }
        let walk = WalkOptions {
            hidden: false,
            no_ignore: false,
            follow: false,
            globs: vec![],
            max_bytes: 1 << 20,
            code: false,
            types: vec![],
            types_not: vec![],
        };
        let mut skipped = Vec::new();
        let files = collect_files(&[dir.path().to_path_buf()], &walk, &mut skipped).unwrap();
        assert_eq!(files.len(), 2);
        std::fs::remove_file(dir.path().join("a.txt")).unwrap();
        let docs = load(&files, &mut Vec::new(), &mut skipped).unwrap();
        assert_eq!(docs.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["b.txt"]);
        assert_eq!(skipped.len(), 1);
        assert_eq!((skipped[0].reason, skipped[0].path.ends_with("a.txt")), (SkipReason::Unreadable, true));
    }
}
