//! Documents in, passages and chunks out.
//!
//! Inputs are .txt/.md files (one document each, id = path) and .jsonl files (one document per
//! line: `{"id","title","text"}`, other fields kept as metadata). Everything is read and
//! checked before anything is written, so bad input leaves an index as it was. Paths inside
//! JSONL are data: nothing in a document is opened or followed.

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
        crate::model::cache::hex(&h.finalize()[..16])
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

const TEXT_EXT: [&str; 3] = ["txt", "md", "markdown"];

/// A file to read and the id its text document gets: the path relative to the folder given
/// on the command line, or the path as given for a file named directly.
#[derive(Debug, Clone)]
pub struct InputFile {
    pub path: PathBuf,
    pub id: String,
}

/// Expand files and folders (recursively, .txt/.md/.jsonl only, in sorted order).
pub fn collect_files(paths: &[PathBuf]) -> Result<Vec<InputFile>> {
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).with_context(|| format!("{}", p.display()))?;
        if meta.is_dir() {
            let mut found = Vec::new();
            walk(p, &mut found)?;
            out.extend(
                found
                    .into_iter()
                    .map(|f| InputFile { id: f.strip_prefix(p).unwrap_or(&f).to_string_lossy().to_string(), path: f }),
            );
        } else {
            out.push(InputFile { id: p.to_string_lossy().to_string(), path: p.clone() });
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("{}", dir.display()))?
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("{}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let ft = e.file_type()?;
        let p = e.path();
        if ft.is_dir() {
            if !e.file_name().to_string_lossy().starts_with('.') {
                walk(&p, out)?;
            }
        } else if ft.is_file() {
            let ext = p.extension().and_then(|x| x.to_str()).unwrap_or("").to_ascii_lowercase();
            if TEXT_EXT.contains(&ext.as_str()) || ext == "jsonl" {
                out.push(p);
            }
        }
        // symbolic links inside folders are not followed
    }
    Ok(())
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

/// Read every document of these files. Empty documents are skipped with a note in `warnings`.
pub fn load(files: &[InputFile], warnings: &mut Vec<String>) -> Result<Vec<Document>> {
    let mut docs = Vec::new();
    let mut seen: HashMap<String, String> = HashMap::new();
    for InputFile { path: f, id: file_id } in files {
        let bytes = std::fs::read(f).with_context(|| format!("{}", f.display()))?;
        for d in documents_from_bytes(f, file_id, bytes)? {
            if d.text.trim().is_empty() {
                warnings.push(format!("{}: empty document skipped", d.source));
                continue;
            }
            if let Some(prev) = seen.insert(d.id.clone(), d.source.clone()) {
                bail!("{}: duplicate document id {:?} (first at {prev})", d.source, d.id);
            }
            docs.push(d);
        }
    }
    Ok(docs)
}

/// The documents of one file's bytes: a .jsonl file holds one per line, any other file is one
/// document whose id is `file_id`. Errors name the file (and line). Nothing here touches the
/// file system: paths inside documents are data.
pub fn documents_from_bytes(f: &Path, file_id: &str, bytes: Vec<u8>) -> Result<Vec<Document>> {
    if bytes.contains(&0) {
        bail!("{}: binary file (contains NUL bytes), not text", f.display());
    }
    let text = utf8(f, bytes)?;
    let is_jsonl = f.extension().and_then(|x| x.to_str()).is_some_and(|x| x.eq_ignore_ascii_case("jsonl"));
    Ok(if is_jsonl {
        parse_jsonl(f, &text)?
    } else {
        // A text file's name is its id, not a title (titles help retrieval; names do not).
        let source = f.display().to_string();
        vec![Document { id: file_id.to_string(), title: String::new(), text, meta: "{}".into(), source }]
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
        out.push(Document { id, title, text, meta: serde_json::Value::Object(obj).to_string(), source: at });
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
