//! The engine's modules import one way: no module (file) reaches,
//! through the modules it names (`crate::a::b`, `super::c`), back to
//! itself. A submodule using its parent's items, or a parent its
//! submodules', is not a cycle (as in `cargo modules`' use graph). The listing of edges is printed for the record
//! (`cargo test -p rimg-tests --test module_cycles -- --nocapture`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path ("qcow::write", "" for the crate root) -> its file.
fn modules(root: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = p.strip_prefix(root).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|l| l == "mod" || l == "lib") {
                parts.pop();
            }
            out.insert(parts.join("::"), p);
        }
    }
    out
}

/// The paths a source names: `crate::...`/`super::...` in code and in
/// `use` trees (comments and `#[cfg(test)]` code left out).
fn named_paths(src: &str) -> Vec<String> {
    let code: String = src
        .split("#[cfg(test)]")
        .next()
        .unwrap()
        .lines()
        .map(without_comment)
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = Vec::new();
    let b = code.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let at_word = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
        let start = ["crate::", "super::"]
            .into_iter()
            .find(|k| at_word && code[i..].starts_with(k));
        let Some(_) = start else {
            i += 1;
            continue;
        };
        let (paths, end) = use_tree(&code, i, "");
        out.extend(paths);
        i = end.max(i + 1);
    }
    out
}

/// The line up to a `//` comment that is not inside a string literal.
fn without_comment(line: &str) -> &str {
    let mut in_str = false;
    let b = line.as_bytes();
    for i in 0..b.len() {
        match b[i] {
            b'"' if i == 0 || b[i - 1] != b'\\' => in_str = !in_str,
            b'/' if !in_str && b.get(i + 1) == Some(&b'/') => return &line[..i],
            _ => {}
        }
    }
    line
}

/// Expands the path or `use` tree starting at `i` ("a::b::{c, d::{e}}"),
/// with `prefix` before it; returns the paths and where the tree ends.
fn use_tree(code: &str, mut i: usize, prefix: &str) -> (Vec<String>, usize) {
    let b = code.as_bytes();
    let mut path = prefix.to_string();
    loop {
        let s = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
            i += 1;
        }
        if !path.is_empty() && !path.ends_with("::") && s < i {
            path.push_str("::");
        }
        path.push_str(&code[s..i]);
        if code[i..].starts_with("::{") {
            i += 3;
            let mut out = Vec::new();
            loop {
                while i < b.len() && (b[i] == b' ' || b[i] == b'\n' || b[i] == b',') {
                    i += 1;
                }
                if i >= b.len() || b[i] == b'}' {
                    return (out, i + 1);
                }
                let (p, end) = use_tree(code, i, &path);
                out.extend(p);
                i = end;
            }
        }
        if code[i..].starts_with("::") {
            i += 2;
            continue;
        }
        return (vec![path], i);
    }
}

/// The module a path names: its longest prefix that is a module.
fn resolve(mods: &BTreeMap<String, PathBuf>, from: &str, path: &str) -> Option<String> {
    let mut segs: Vec<&str> = Vec::new();
    let mut rest = path.split("::").peekable();
    match rest.next()? {
        "crate" => {}
        "super" => {
            segs.extend(from.split("::"));
            segs.pop();
            while rest.peek() == Some(&"super") {
                rest.next();
                segs.pop();
            }
        }
        _ => return None,
    }
    segs.extend(rest);
    (1..=segs.len())
        .rev()
        .map(|n| segs[..n].join("::"))
        .find(|m| mods.contains_key(m))
}

fn related(a: &str, b: &str) -> bool {
    a.starts_with(&format!("{b}::")) || b.starts_with(&format!("{a}::"))
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        e: &'a BTreeMap<String, BTreeSet<String>>,
        idx: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let n = t.idx.len();
        t.idx.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        for w in t.e.get(v).into_iter().flatten() {
            if !t.idx.contains_key(w.as_str()) {
                visit(t, w);
                let l = t.low[v].min(t.low[w.as_str()]);
                t.low.insert(v, l);
            } else if t.stack.contains(&w.as_str()) {
                let l = t.low[v].min(t.idx[w.as_str()]);
                t.low.insert(v, l);
            }
        }
        if t.low[v] == t.idx[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        e: edges,
        idx: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !t.idx.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

fn edges_of(root: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules(root);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, file) in &mods {
        if m.split("::").any(|s| s == "tests" || s == "fuzz_targets") {
            continue;
        }
        let set = edges.entry(m.clone()).or_default();
        for p in named_paths(&std::fs::read_to_string(file).unwrap()) {
            if let Some(t) = resolve(&mods, m, &p) {
                if !t.is_empty() && &t != m && !related(&t, m) {
                    set.insert(t);
                }
            }
        }
    }
    edges
}

#[test]
fn the_engine_has_no_import_cycles() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../qcow2/src");
    let edges = edges_of(&root);
    for (m, to) in &edges {
        println!(
            "{m} -> {}",
            to.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    // The check sees real edges: the engine's core reaches its storage.
    assert!(edges["qcow"].contains("storage"), "{edges:?}");
    assert!(edges.len() > 40, "{} modules", edges.len());
    assert_eq!(cycles(&edges), Vec::<Vec<String>>::new());
}

#[test]
fn a_cycle_is_found() {
    let mut e: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    e.entry("a".into()).or_default().insert("b".into());
    e.entry("b".into()).or_default().insert("c".into());
    e.entry("c".into()).or_default().insert("a".into());
    e.entry("d".into()).or_default().insert("a".into());
    assert_eq!(cycles(&e), vec![vec!["a", "b", "c"]]);
    let code = "use crate::x::{y::{Z, w}, v};\nfn f() { super::q::r(); } // crate::no";
    assert_eq!(
        named_paths(code),
        [
            "crate::x::y::Z",
            "crate::x::y::w",
            "crate::x::v",
            "super::q::r"
        ]
    );
}
