//! The CLI's layers, as ARCHITECTURE.md draws them, checked on the source:
//! every `crate::`, `super::` and `self::` path (and every path through a
//! child module a file declares) in every file of `src/` is resolved to the
//! file that defines its module, and the test fails on an import against
//! the allowed order or on any import cycle between files.
//!
//! The layers: `main.rs` (the dispatcher) may import anything; `app/`
//! imports only `app/`; `cmd/`, `io/` and `export/` import `app/` and
//! themselves, never each other; one subcommand (`cmd/NAME.rs` or
//! `cmd/NAME/`) never imports another; nothing imports `main.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A file's module path (`["app", "ctx"]`; `[]` for `main.rs`).
type ModPath = Vec<String>;

/// The source files under `src`, by module path.
fn source_files(src: &Path) -> BTreeMap<ModPath, String> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<ModPath, String>) {
        let mut entries: Vec<PathBuf> =
            std::fs::read_dir(dir).expect("src/ is readable").map(|e| e.expect("a directory entry").path()).collect();
        entries.sort();
        for path in entries {
            let name = path.file_name().and_then(|n| n.to_str()).expect("UTF-8 file names").to_string();
            if path.is_dir() {
                let mut p = prefix.to_vec();
                p.push(name);
                walk(&path, &p, out);
            } else if let Some(stem) = name.strip_suffix(".rs") {
                let mut p = prefix.to_vec();
                if stem != "mod" && stem != "main" {
                    p.push(stem.to_string());
                }
                out.insert(p, std::fs::read_to_string(&path).expect("a readable source file"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(src, &[], &mut out);
    out
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Ident(String),
    Colons,
    Open,
    Close,
    Comma,
    Semi,
    Star,
    Other,
}

/// The tokens that paths are made of; comments, strings and character
/// literals are skipped.
fn tokens(src: &str) -> Vec<Tok> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else if c == b'r' && matches!(b.get(i + 1), Some(b'"') | Some(b'#')) && raw_string_end(b, i).is_some() {
            i = raw_string_end(b, i).expect("checked");
        } else if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == b'\'' {
            // A character literal ('x', '\n', '"'), or a lifetime ('a).
            if b.get(i + 1) == Some(&b'\\') {
                i += 2;
                while i < b.len() && b[i] != b'\'' {
                    i += 1;
                }
                i += 1;
            } else if b.get(i + 2) == Some(&b'\'') {
                i += 3;
            } else {
                i += 1;
            }
        } else if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push(Tok::Ident(src[start..i].to_string()));
        } else {
            out.push(match c {
                b':' if b.get(i + 1) == Some(&b':') => {
                    i += 1;
                    Tok::Colons
                }
                b'{' => Tok::Open,
                b'}' => Tok::Close,
                b',' => Tok::Comma,
                b';' => Tok::Semi,
                b'*' => Tok::Star,
                _ => Tok::Other,
            });
            i += 1;
        }
    }
    out
}

/// Where a raw string literal starting at `i` (`r"..."`, `r#"..."#`) ends.
fn raw_string_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    let mut hashes = 0;
    while b.get(j) == Some(&b'#') {
        hashes += 1;
        j += 1;
    }
    if b.get(j) != Some(&b'"') {
        return None;
    }
    j += 1;
    loop {
        if j >= b.len() {
            return Some(j);
        }
        if b[j] == b'"' && b[j + 1..].iter().take(hashes).filter(|&&h| h == b'#').count() == hashes {
            return Some(j + 1 + hashes);
        }
        j += 1;
    }
}

/// The module paths one file refers to, resolved from the file's module
/// `here` (inline `mod x { ... }` blocks, such as unit tests, included).
fn references(here: &ModPath, src: &str) -> BTreeSet<ModPath> {
    let toks = tokens(src);
    let children: BTreeSet<String> = toks
        .windows(3)
        .filter_map(|w| match w {
            [Tok::Ident(m), Tok::Ident(name), Tok::Semi] if m == "mod" => Some(name.clone()),
            _ => None,
        })
        .collect();
    let mut out = BTreeSet::new();
    // Inline modules open at brace depth d: (name, d).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < toks.len() {
        match &toks[i] {
            Tok::Open => depth += 1,
            Tok::Close => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
            }
            Tok::Ident(m) if m == "mod" => {
                if let (Some(Tok::Ident(name)), Some(Tok::Open)) = (toks.get(i + 1), toks.get(i + 2)) {
                    inline.push((name.clone(), depth));
                    depth += 1;
                    i += 3;
                    continue;
                }
            }
            Tok::Ident(first) if i == 0 || toks[i - 1] != Tok::Colons => {
                let mut current = here.clone();
                current.extend(inline.iter().map(|(n, _)| n.clone()));
                let base = match first.as_str() {
                    "crate" => Some(Vec::new()),
                    "self" => Some(current.clone()),
                    "super" => Some(current[..current.len().saturating_sub(1)].to_vec()),
                    child if inline.is_empty() && children.contains(child) => {
                        if toks.get(i + 1) == Some(&Tok::Colons) {
                            i = path_tail(&toks, i, here.clone(), &mut out);
                            continue;
                        }
                        None
                    }
                    _ => None,
                };
                if let (Some(base), Some(Tok::Colons)) = (base, toks.get(i + 1)) {
                    i = path_tail(&toks, i + 2, base, &mut out);
                    continue;
                }
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// Reads the rest of a path after `prefix::` (with `super::super::`,
/// `use` groups `{a, b::c}` and globs), adding every path it names.
/// Returns the index of the first token after it.
fn path_tail(toks: &[Tok], mut i: usize, mut prefix: ModPath, out: &mut BTreeSet<ModPath>) -> usize {
    loop {
        match toks.get(i) {
            Some(Tok::Ident(s)) if s == "super" => {
                prefix.pop();
            }
            Some(Tok::Ident(s)) => prefix.push(s.clone()),
            Some(Tok::Open) => {
                // A use group: each item is a path from `prefix`.
                i += 1;
                loop {
                    match toks.get(i) {
                        Some(Tok::Close) => return i + 1,
                        Some(Tok::Comma) => i += 1,
                        Some(Tok::Ident(s)) if s == "self" => {
                            out.insert(prefix.clone());
                            i += 1;
                        }
                        Some(Tok::Ident(s)) => {
                            let mut p = prefix.clone();
                            p.push(s.clone());
                            if toks.get(i + 1) == Some(&Tok::Colons) {
                                i = path_tail(toks, i + 2, p, out);
                            } else {
                                out.insert(p);
                                i += 1;
                                // `x as y`
                                if toks.get(i) == Some(&Tok::Ident("as".into())) {
                                    i += 2;
                                }
                            }
                        }
                        Some(_) => i += 1,
                        None => return i,
                    }
                }
            }
            _ => {
                out.insert(prefix);
                return i;
            }
        }
        i += 1;
        if toks.get(i) != Some(&Tok::Colons) {
            out.insert(prefix);
            return i;
        }
        i += 1;
    }
}

/// The file defining the module `path` names: its longest prefix that is
/// a file of the crate.
fn owner<'a>(files: &'a BTreeMap<ModPath, String>, path: &ModPath) -> Option<&'a ModPath> {
    (0..=path.len()).rev().find_map(|n| files.get_key_value(&path[..n]).map(|(k, _)| k))
}

/// The file-to-file import graph.
fn graph(files: &BTreeMap<ModPath, String>) -> BTreeMap<ModPath, BTreeSet<ModPath>> {
    files
        .iter()
        .map(|(m, src)| {
            let targets =
                references(m, src).iter().filter_map(|p| owner(files, p)).filter(|t| *t != m).cloned().collect();
            (m.clone(), targets)
        })
        .collect()
}

fn name(m: &ModPath) -> String {
    if m.is_empty() {
        "main".into()
    } else {
        m.join("::")
    }
}

/// Why importing `to` from `from` goes against the layers, if it does.
fn violation(from: &ModPath, to: &ModPath) -> Option<String> {
    let layer = |m: &ModPath| m.first().cloned().unwrap_or_default();
    let (lf, lt) = (layer(from), layer(to));
    let why = match (lf.as_str(), lt.as_str()) {
        ("", _) => return None,
        (_, "") => "nothing imports main.rs",
        ("app", "app") => return None,
        ("app", _) => "app/ imports only app/",
        (_, "app") => return None,
        ("cmd", "cmd") => {
            // A subcommand is cmd/NAME.rs or everything under cmd/NAME/.
            if from.get(1).is_some() && from.get(1) == to.get(1) {
                return None;
            }
            "a subcommand never imports another one"
        }
        (f, t) if f == t && matches!(f, "io" | "export") => return None,
        _ => "cmd/, io/ and export/ never import each other",
    };
    Some(format!("{} imports {}: {why}", name(from), name(to)))
}

/// One import cycle, if the graph has any.
fn cycle(g: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> Option<Vec<ModPath>> {
    fn visit(
        n: &ModPath,
        g: &BTreeMap<ModPath, BTreeSet<ModPath>>,
        state: &mut BTreeMap<ModPath, u8>,
        stack: &mut Vec<ModPath>,
    ) -> Option<Vec<ModPath>> {
        state.insert(n.clone(), 1);
        stack.push(n.clone());
        for t in g.get(n).into_iter().flatten() {
            match state.get(t) {
                Some(1) => {
                    let at = stack.iter().position(|s| s == t).expect("on the stack");
                    let mut c = stack[at..].to_vec();
                    c.push(t.clone());
                    return Some(c);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(t, g, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(n.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if !state.contains_key(n) {
            if let Some(c) = visit(n, g, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

/// Every problem with a set of files: layer violations, then a cycle.
fn problems(files: &BTreeMap<ModPath, String>) -> Vec<String> {
    let g = graph(files);
    let mut out: Vec<String> = g.iter().flat_map(|(f, ts)| ts.iter().filter_map(|t| violation(f, t))).collect();
    if let Some(c) = cycle(&g) {
        out.push(format!("import cycle: {}", c.iter().map(name).collect::<Vec<_>>().join(" -> ")));
    }
    out
}

#[test]
fn the_cli_keeps_its_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = source_files(&src);
    for layer in ["app", "cmd", "io", "export"] {
        assert!(files.keys().any(|m| m.first().map(String::as_str) == Some(layer)), "no {layer}/ in {src:?}");
    }
    let g = graph(&files);
    // The checker sees the edges that are there (crate::, super::, child
    // modules), so that an empty list of problems means something.
    let m = |s: &str| -> ModPath { s.split("::").filter(|p| !p.is_empty()).map(String::from).collect() };
    for (from, to) in [
        ("cmd::convert", "app::ctx"),
        ("cmd::convert", "cmd::convert::setup"),
        ("cmd::convert::setup", "cmd::convert::args"),
        ("io::cmds::read", "io::session"),
        ("export::mount", "export::mount::filesystem"),
        ("export::serve", "export::daemon"),
        ("", "cmd::convert"),
    ] {
        assert!(
            g.get(&m(from)).is_some_and(|ts| ts.contains(&m(to))),
            "{from} -> {to} not seen: {:?}",
            g.get(&m(from))
        );
    }
    let found = problems(&files);
    assert!(found.is_empty(), "{}", found.join("\n"));
}

fn fake(files: &[(&str, &str)]) -> BTreeMap<ModPath, String> {
    files
        .iter()
        .map(|(m, s)| (m.split("::").filter(|p| !p.is_empty()).map(String::from).collect(), s.to_string()))
        .collect()
}

#[test]
fn imports_against_the_layers_are_found() {
    let files = fake(&[
        ("", "mod app; mod cmd; fn main() { cmd::a::run(); }"),
        ("app", "pub mod x;"),
        ("app::x", "use crate::cmd::a::helper; // app reaching up\n"),
        ("cmd", "pub mod a; pub mod b;"),
        ("cmd::a", "use crate::app::x;\nuse crate::cmd::{b::other, a};\npub fn run() {}"),
        ("cmd::b", "pub fn other() { let s = \"crate::io::nothing\"; }"),
        ("io", "use super::cmd::a; // io reaching into a command"),
    ]);
    let found = problems(&files);
    let expected = [
        "app::x imports cmd::a: app/ imports only app/",
        "cmd::a imports cmd::b: a subcommand never imports another one",
        "io imports cmd::a: cmd/, io/ and export/ never import each other",
    ];
    for e in expected {
        assert!(found.iter().any(|f| f == e), "{e} not in {found:?}");
    }
    assert!(found.iter().any(|f| f.starts_with("import cycle: ")), "app::x -> cmd::a -> app::x: {found:?}");
    assert_eq!(found.len(), expected.len() + 1, "{found:?}");
}

#[test]
fn paths_are_resolved_as_rust_resolves_them() {
    let files = fake(&[
        ("", "mod io;"),
        ("io", "mod cmds; mod session; fn f() { cmds::run(); }"),
        ("io::cmds", "mod rw;\nuse super::session::Session;\nfn g() { rw::read(); }"),
        ("io::cmds::rw", "use super::super::session::{self, Session as S};\nuse crate::io::cmds::*;"),
        ("io::session", "#[cfg(test)]\nmod tests {\n    use super::*;\n    use crate::io::cmds;\n}\n"),
    ]);
    let g = graph(&files);
    let set = |v: &[&str]| -> BTreeSet<ModPath> {
        v.iter().map(|m| m.split("::").filter(|p| !p.is_empty()).map(String::from).collect()).collect()
    };
    assert_eq!(g[&vec!["io".to_string()]], set(&["io::cmds"]));
    assert_eq!(g[&vec!["io".to_string(), "cmds".to_string()]], set(&["io::session", "io::cmds::rw"]));
    assert_eq!(g[&vec!["io".to_string(), "cmds".to_string(), "rw".to_string()]], set(&["io::session", "io::cmds"]));
    assert_eq!(g[&vec!["io".to_string(), "session".to_string()]], set(&["io::cmds"]), "a unit test's imports count");
    assert_eq!(
        problems(&files),
        ["import cycle: io::cmds -> io::cmds::rw -> io::cmds"],
        "the cycle through `use crate::io::cmds::*`"
    );
}
