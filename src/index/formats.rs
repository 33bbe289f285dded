//! File formats into text: what each kind of file gives a document (title, text, metadata,
//! and the places in the text where a page or a heading starts, so that sources can cite them).
//!
//! - Markdown: front matter (`---` ... `---`, `key: value` lines) becomes the title and metadata;
//!   ATX headings (`# ...`) start sections.
//! - HTML: text with headings, paragraphs and list items; `<script>`, `<style>`, `<nav>`,
//!   `<header>`, `<footer>`, `<aside>`, `<noscript>`, `<template>`, `<svg>` and forms dropped;
//!   `<title>` as the title; `<h1>`..`<h6>` start sections. html5ever's tokenizer (the
//!   browser-grade tokenizer of the Servo project) reads it, entities and broken markup included.
//! - PDF: text per page through poppler's `pdftotext` (installed with poppler-utils); each
//!   page starts a section, cited as `file.pdf#p12`.
//! - Plain text (.txt, reStructuredText, AsciiDoc, Org) and, with `index --code`, source files:
//!   the text as it is; the headings of Org (`* ...`), AsciiDoc (`== ...`) and
//!   reStructuredText (a line underlined with `=`, `-`, `~`, ...) start sections.

use anyhow::{anyhow, bail, Result};
use std::path::Path;

/// What kind of file, by its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Markdown,
    Html,
    Pdf,
    Jsonl,
    Code,
}

const TEXT: [&str; 8] = ["txt", "text", "rst", "adoc", "asciidoc", "asc", "org", "textile"];
const MARKDOWN: [&str; 3] = ["md", "markdown", "mdx"];
const HTML: [&str; 3] = ["html", "htm", "xhtml"];
/// Source files taken with `index --code` (as text, one document each).
pub const CODE: [&str; 30] = [
    "rs", "py", "js", "mjs", "ts", "tsx", "jsx", "go", "c", "h", "cc", "cpp", "hpp", "java", "kt", "swift", "rb",
    "php", "cs", "scala", "sh", "bash", "lua", "sql", "r", "jl", "toml", "yaml", "yml", "css",
];

impl Kind {
    /// The kind of a file name; code only when `code` is on.
    pub fn of(path: &Path, code: bool) -> Option<Kind> {
        let ext = path.extension().and_then(|x| x.to_str()).unwrap_or("").to_ascii_lowercase();
        let e = ext.as_str();
        Some(if TEXT.contains(&e) {
            Kind::Text
        } else if MARKDOWN.contains(&e) {
            Kind::Markdown
        } else if HTML.contains(&e) {
            Kind::Html
        } else if e == "pdf" {
            Kind::Pdf
        } else if e == "jsonl" {
            Kind::Jsonl
        } else if code && CODE.contains(&e) {
            Kind::Code
        } else {
            return None;
        })
    }
}

/// Where a section of a document starts, and what names it.
#[derive(Debug, Clone, PartialEq)]
pub struct Section {
    /// Byte offset in the document's text.
    pub start: usize,
    pub at: Locator,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Locator {
    /// A PDF page, from 1.
    Page(u32),
    /// A heading's text.
    Heading(String),
}

impl Locator {
    /// The metadata field a passage of this section carries: `{"page": 12}` or `{"section": "..."}`.
    pub fn field(&self) -> (&'static str, serde_json::Value) {
        match self {
            Locator::Page(p) => ("page", (*p).into()),
            Locator::Heading(h) => ("section", h.clone().into()),
        }
    }
}

/// A file's text as a document gets it.
#[derive(Debug, Clone, Default)]
pub struct Extracted {
    pub title: String,
    pub text: String,
    pub meta: serde_json::Map<String, serde_json::Value>,
    pub sections: Vec<Section>,
}

/// The text of a Markdown file: front matter out (title and metadata), headings as sections.
pub fn markdown(text: &str) -> Extracted {
    let mut out = Extracted::default();
    let mut body = text;
    let t = text.strip_prefix('\u{feff}').unwrap_or(text);
    if let Some(rest) = t.strip_prefix("---\n").or_else(|| t.strip_prefix("---\r\n")) {
        if let Some(end) = rest.find("\n---") {
            let after = &rest[end + 4..];
            if after.is_empty() || after.starts_with('\n') || after.starts_with("\r\n") {
                for line in rest[..end].lines() {
                    let Some((k, v)) = line.split_once(':') else { continue };
                    let (k, v) = (k.trim(), v.trim().trim_matches(['"', '\'']));
                    if k.is_empty() || k.starts_with(' ') || v.is_empty() {
                        continue;
                    }
                    if k == "title" {
                        out.title = v.to_string();
                    } else {
                        out.meta.insert(k.to_string(), v.into());
                    }
                }
                body = after.trim_start_matches(['\r', '\n']);
            }
        }
    }
    let mut fence = false;
    for line in body.split_inclusive('\n') {
        let l = line.trim_end();
        if l.trim_start().starts_with("```") || l.trim_start().starts_with("~~~") {
            fence = !fence;
        } else if !fence {
            if let Some(h) = atx_heading(l) {
                out.sections.push(Section { start: out.text.len(), at: Locator::Heading(h) });
            }
        }
        out.text.push_str(line);
    }
    out
}

fn atx_heading(line: &str) -> Option<String> {
    let hashes = line.len() - line.trim_start_matches('#').len();
    if !(1..=6).contains(&hashes) {
        return None;
    }
    let rest = &line[hashes..];
    if !rest.starts_with(' ') {
        return None;
    }
    let h = rest.trim().trim_end_matches('#').trim();
    (!h.is_empty()).then(|| h.to_string())
}

/// A text file as it is (less Org's `#+KEYWORD` lines); Org, AsciiDoc and reStructuredText
/// headings start sections; Org's `#+TITLE:` is the title.
pub fn plain(text: String, path: &Path) -> Extracted {
    let ext = path.extension().and_then(|x| x.to_str()).unwrap_or("").to_ascii_lowercase();
    if !matches!(ext.as_str(), "org" | "adoc" | "asciidoc" | "asc" | "rst") {
        return Extracted { text, ..Default::default() };
    }
    let mut out = Extracted::default();
    let mut prev: Option<(usize, String)> = None;
    for line in text.split_inclusive('\n') {
        let l = line.trim_end();
        if ext == "org" && l.starts_with("#+") {
            if let Some(t) = l.strip_prefix("#+TITLE:").or_else(|| l.strip_prefix("#+title:")) {
                out.title = t.trim().to_string();
            }
            continue;
        }
        let heading = match ext.as_str() {
            "org" => prefixed_heading(l, '*'),
            "rst" => {
                if let Some((start, title)) = prev.take().filter(|(_, title)| rst_underline(l, title)) {
                    out.sections.push(Section { start, at: Locator::Heading(title.trim().to_string()) });
                }
                None
            }
            _ => prefixed_heading(l, '='),
        };
        if let Some(h) = heading {
            out.sections.push(Section { start: out.text.len(), at: Locator::Heading(h) });
        }
        if ext == "rst" {
            prev = (!l.trim().is_empty()).then(|| (out.text.len(), l.to_string()));
        }
        out.text.push_str(line);
    }
    out
}

/// `* Heading` (Org) or `== Heading` (AsciiDoc): marks, a space, the heading.
fn prefixed_heading(line: &str, mark: char) -> Option<String> {
    let n = line.len() - line.trim_start_matches(mark).len();
    let rest = &line[n..];
    ((1..=6).contains(&n) && rest.starts_with(' ') && !rest.trim().is_empty()).then(|| rest.trim().to_string())
}

/// A reStructuredText underline: one punctuation character repeated, at least as long as the title.
fn rst_underline(line: &str, title: &str) -> bool {
    let mut cs = line.chars();
    let Some(c) = cs.next() else { return false };
    "=-~^\"'`#*+:.".contains(c)
        && cs.all(|x| x == c)
        && line.chars().count() >= title.trim().chars().count().max(3)
        && !title.trim_start().starts_with(c)
}

/// The text of an HTML page.
pub fn html(src: &str) -> Extracted {
    use html5ever::tendril::StrTendril;
    use html5ever::tokenizer::{BufferQueue, Tokenizer, TokenizerOpts};
    let sink = HtmlText::default();
    let tok = Tokenizer::new(sink, TokenizerOpts::default());
    let queue = BufferQueue::default();
    queue.push_back(StrTendril::from_slice(src));
    // Scripts are not run: a script result only pauses the tokenizer; feed until all is read.
    while !queue.is_empty() {
        let _ = tok.feed(&queue);
    }
    tok.end();
    let s = tok.sink.finish();
    let mut out = Extracted { title: collapse(&s.title), ..Default::default() };
    // Blocks joined by blank lines (the passage splitter keeps paragraphs together).
    for b in s.blocks {
        let t = collapse(&b.text);
        if t.is_empty() {
            continue;
        }
        if !out.text.is_empty() {
            out.text.push_str("\n\n");
        }
        if b.heading {
            out.sections.push(Section { start: out.text.len(), at: Locator::Heading(t.clone()) });
        }
        out.text.push_str(&t);
    }
    out
}

fn collapse(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[derive(Default)]
struct Block {
    text: String,
    heading: bool,
}

#[derive(Default)]
struct HtmlState {
    title: String,
    in_title: bool,
    /// Depth inside dropped elements (scripts, navigation, ...).
    skip: usize,
    blocks: Vec<Block>,
    cur: Block,
}

#[derive(Default)]
struct HtmlText {
    state: std::cell::RefCell<HtmlState>,
}

impl HtmlText {
    fn state(&self) -> std::cell::RefMut<'_, HtmlState> {
        self.state.borrow_mut()
    }

    fn finish(&self) -> HtmlState {
        let mut s = std::mem::take(&mut *self.state());
        s.flush(false);
        s
    }
}

const DROPPED: [&str; 13] = [
    "script", "style", "nav", "header", "footer", "aside", "noscript", "template", "svg", "form", "button", "select",
    "iframe",
];
const BLOCKS: [&str; 22] = [
    "p", "div", "br", "li", "dt", "dd", "tr", "td", "th", "table", "ul", "ol", "dl", "pre", "blockquote", "section",
    "article", "main", "figure", "figcaption", "hr", "body",
];

impl HtmlState {
    fn flush(&mut self, heading: bool) {
        let cur = std::mem::take(&mut self.cur);
        if !cur.text.trim().is_empty() {
            self.blocks.push(cur);
        }
        self.cur.heading = heading;
    }
}

impl html5ever::tokenizer::TokenSink for HtmlText {
    type Handle = ();

    fn process_token(
        &self,
        token: html5ever::tokenizer::Token,
        _line: u64,
    ) -> html5ever::tokenizer::TokenSinkResult<()> {
        use html5ever::tokenizer::{TagKind, Token};
        let mut s = self.state();
        match token {
            Token::TagToken(tag) => {
                let name: &str = &tag.name;
                let start = tag.kind == TagKind::StartTag;
                if DROPPED.contains(&name) {
                    if start && !tag.self_closing {
                        s.skip += 1;
                    } else if !start {
                        s.skip = s.skip.saturating_sub(1);
                    }
                } else if name == "title" {
                    s.in_title = start;
                } else if s.skip == 0 {
                    let heading = matches!(name, "h1" | "h2" | "h3" | "h4" | "h5" | "h6");
                    if heading {
                        s.flush(start);
                    } else if BLOCKS.contains(&name) {
                        s.flush(false);
                        if start && name == "li" {
                            s.cur.text.push_str("- ");
                        }
                    }
                }
            }
            Token::CharacterTokens(t) => {
                if s.in_title {
                    s.title.push_str(&t);
                } else if s.skip == 0 {
                    s.cur.text.push_str(&t);
                }
            }
            _ => {}
        }
        html5ever::tokenizer::TokenSinkResult::Continue
    }
}

/// The text of a PDF, page by page, through poppler's `pdftotext`.
pub fn pdf(path: &Path) -> Result<Extracted> {
    let out = std::process::Command::new("pdftotext")
        .args(["-q", "-enc", "UTF-8", "-eol", "unix"])
        .arg(path)
        .arg("-")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                anyhow!("{}: reading PDF needs pdftotext (install poppler-utils)", path.display())
            }
            _ => anyhow!("{}: pdftotext: {e}", path.display()),
        })?;
    if !out.status.success() {
        let why = match out.status.code() {
            Some(1) => "cannot be opened (damaged, encrypted with a password, or not a PDF)",
            Some(3) => "encrypted: its permissions forbid copying text",
            _ => "cannot be read (damaged)",
        };
        bail!("{}: PDF {why}", path.display());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut ex = Extracted::default();
    // Pages end with a form feed; the last one is followed by nothing.
    for (i, page) in text.split('\u{c}').enumerate() {
        let page = page.trim();
        if page.is_empty() {
            continue;
        }
        if !ex.text.is_empty() {
            ex.text.push_str("\n\n");
        }
        ex.sections.push(Section { start: ex.text.len(), at: Locator::Page(i as u32 + 1) });
        ex.text.push_str(page);
    }
    if ex.text.is_empty() {
        bail!("{}: PDF has no text (scanned pages need OCR first)", path.display());
    }
    Ok(ex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_keeps_text_headings_and_title_and_drops_scripts_and_navigation() {
        let e = html(
            "<html><head><title>The &amp; Title</title><style>p{}</style><script>var x=1;</script></head>\
             <body><nav><a>Home</a></nav><h1>First</h1><p>One <b>two</b>\nthree.</p><ul><li>a</li><li>b</li></ul>\
             <h2>Second</h2><p>Four &lt;5&gt;</p><footer>(c) me</footer></body></html>",
        );
        assert_eq!(e.title, "The & Title");
        assert_eq!(e.text, "First\n\nOne two three.\n\n- a\n\n- b\n\nSecond\n\nFour <5>");
        let at: Vec<_> = e.sections.iter().map(|s| (&e.text[s.start..s.start + 5], s.at.clone())).collect();
        assert_eq!(at, vec![("First", Locator::Heading("First".into())), ("Secon", Locator::Heading("Second".into()))]);
    }

    #[test]
    fn markdown_front_matter_and_headings() {
        let e = markdown("---\ntitle: \"Notes\"\ndate: 2026-12-01\n---\n\nIntro.\n\n# One\ntext\n```\n# not a heading\n```\n## Two ##\nmore\n");
        assert_eq!(e.title, "Notes");
        assert_eq!(e.meta["date"], "2026-12-01");
        assert!(e.text.starts_with("Intro."));
        let hs: Vec<_> = e.sections.iter().map(|s| s.at.clone()).collect();
        assert_eq!(hs, vec![Locator::Heading("One".into()), Locator::Heading("Two".into())]);
        assert!(e.text[e.sections[1].start..].starts_with("## Two"));
        assert_eq!(markdown("# Only\nbody").sections[0].start, 0);
    }

    #[test]
    fn org_asciidoc_and_rst_headings() {
        let heads = |text: &str, name: &str| -> Vec<(String, String)> {
            let e = plain(text.to_string(), Path::new(name));
            e.sections
                .iter()
                .map(|s| match &s.at {
                    Locator::Heading(h) => (h.clone(), e.text[s.start..].lines().next().unwrap().to_string()),
                    l => panic!("{l:?}"),
                })
                .collect()
        };
        assert_eq!(plain("#+TITLE: The Org\n".into(), Path::new("a.org")).title, "The Org");
        let org = heads("#+TITLE: x\n* One\ntext\n** Two\n*bold* text\n", "a.org");
        assert_eq!(org, [("One".into(), "* One".into()), ("Two".into(), "** Two".into())]);
        let adoc = heads("= Doc\n\n== Part\ntext\n", "a.adoc");
        assert_eq!(adoc.iter().map(|h| h.0.as_str()).collect::<Vec<_>>(), ["Doc", "Part"]);
        let rst = heads("Title\n=====\n\ntext\n\nSub part\n--------\nmore\n\n----\n", "a.rst");
        assert_eq!(rst, [("Title".into(), "Title".into()), ("Sub part".into(), "Sub part".into())]);
        assert!(plain("* not a heading in .txt\n".into(), Path::new("a.txt")).sections.is_empty());
    }
}
