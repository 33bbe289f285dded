//! Imports run one way: each folder of src/ imports only the folders before it in [`LAYERS`],
//! and no two files import each other, directly or through a loop (README, "Layout").

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The top-level modules of src/, each importing only those before it.
const LAYERS: [&str; 12] =
    ["rng", "options", "device", "progress", "profile", "model", "index", "read", "train", "eval", "bench", "cli"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// A file's module path under src/ ("model/decoder"; a folder's mod.rs is the folder).
fn node(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let s = rel.to_string_lossy().replace('\\', "/");
    s.strip_suffix("/mod").map(str::to_string).unwrap_or(s)
}

/// The file a path of module names starting at src/ lands in: the deepest that exists.
fn target(src: &Path, parts: &[&str]) -> Option<String> {
    (1..=parts.len().min(3))
        .rev()
        .map(|n| parts[..n].join("/"))
        .find(|m| src.join(format!("{m}.rs")).exists() || src.join(m).join("mod.rs").exists())
}

/// The modules of src/ that a file's code (comments left out) names: `crate::a::b`, and
/// `super::b` for a sibling.
fn imports(src: &Path, me: &str, text: &str) -> BTreeSet<String> {
    let code: String = text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
    let parent: Vec<&str> = me.split('/').collect();
    let parent = &parent[..parent.len() - 1];
    let mut out = BTreeSet::new();
    for (prefix, base) in [("crate::", vec![]), ("super::", parent.to_vec())] {
        let mut rest = code.as_str();
        while let Some(i) = rest.find(prefix) {
            let after = &rest[i + prefix.len()..];
            let path: Vec<&str> = after
                .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .next()
                .unwrap_or("")
                .split("::")
                .filter(|p| !p.is_empty())
                .collect();
            let full: Vec<&str> = base.iter().copied().chain(path).collect();
            if let Some(t) = target(src, &full).filter(|t| t != me && !me.starts_with(&format!("{t}/"))) {
                out.insert(t);
            }
            rest = after;
        }
    }
    out
}

#[test]
fn imports_run_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let me = node(&src, f);
        if me == "lib" || me == "main" || me.ends_with("/tests") {
            continue;
        }
        graph.insert(me.clone(), imports(&src, &me, &std::fs::read_to_string(f).unwrap()));
    }
    assert!(graph.len() > 40, "only {} modules found", graph.len());
    let rank = |m: &str| {
        LAYERS.iter().position(|l| *l == m.split('/').next().unwrap()).unwrap_or_else(|| panic!("{m}: not in LAYERS"))
    };
    for (me, deps) in &graph {
        for d in deps {
            assert!(rank(d) <= rank(me), "{me} imports {d}, a later layer");
        }
    }
    // no loop of files: depth-first search for a back edge
    fn visit<'a>(
        n: &'a str,
        g: &'a BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) {
        state.insert(n, 1);
        path.push(n);
        for d in g.get(n).into_iter().flatten() {
            match state.get(d.as_str()) {
                Some(1) => panic!("import loop: {} -> {d}", path.join(" -> ")),
                Some(_) => {}
                None => visit(d, g, state, path),
            }
        }
        path.pop();
        state.insert(n, 2);
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if !state.contains_key(n.as_str()) {
            visit(n, &graph, &mut state, &mut Vec::new());
        }
    }
}
