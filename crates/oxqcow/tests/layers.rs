//! The engine's modules stay layered as ARCHITECTURE.md draws them: every
//! `crate::` path a source file names must lead to its own module or to a
//! module of a lower layer. The one exception is the backing chain
//! (`qcow2` and `qcow` hold the `Image` their unallocated clusters read
//! from). Test
//! modules (`#[cfg(test)]` to the end of a file) are not checked.

use std::path::{Path, PathBuf};

/// The layers, lowest first; each module is named by its path under `src`.
const LAYERS: &[&[&str]] = &[
    &["error", "extent", "dirty", "qemu_syntax", "names"],
    &["compress", "storage"],
    // Above storage: a caller's `ProtocolOpener` hands storage to the engine.
    &["options"],
    &["crypt"],
    &["qcow2::meta"],
    &["qcow2", "raw", "luks", "qcow"],
    &["image"],
    &["chain_ops", "measure", "cursor", "copy"],
];

/// Imports that go up a layer on purpose.
const ALLOWED_UPWARD: &[(&str, &str)] = &[("qcow2", "image"), ("qcow", "image")];

fn layer_of(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|l| l.contains(&module))
        .unwrap_or_else(|| panic!("module `{module}` is in no layer: add it to LAYERS in tests/layers.rs"))
}

/// The module a source file belongs to: `qcow2/meta/...` is `qcow2::meta`,
/// any other file the first component of its path.
fn module_of_file(rel: &Path) -> Option<String> {
    let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string()).collect();
    match parts.as_slice() {
        [only] if only == "lib" => None,
        [first, second, ..] if first == "qcow2" && second == "meta" => Some("qcow2::meta".into()),
        [first, ..] => Some(first.clone()),
        [] => None,
    }
}

/// The module a `crate::` path names.
fn module_of_path(path: &str) -> String {
    let mut segments = path.split("::");
    let first = segments.next().unwrap_or_default().to_string();
    if first == "qcow2" && segments.next() == Some("meta") {
        return "qcow2::meta".into();
    }
    first
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `crate::a::b` path in `text` (outside line comments), as `a::b`.
fn crate_paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or_default();
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let tail = &rest[i + "crate::".len()..];
            let len = tail.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).unwrap_or(tail.len());
            out.push(tail[..len].trim_end_matches(':').to_string());
            rest = &tail[len..];
        }
    }
    out
}

#[test]
fn imports_go_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    let mut wrong = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let Some(module) = module_of_file(rel) else { continue };
        // A module's unit tests (in their own `tests.rs`) may use anything.
        if rel.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for path in crate_paths(code) {
            let target = module_of_path(&path);
            if target.is_empty() {
                // `crate::{...}` names the crate root's re-exports, which
                // hide which layer an item comes from.
                wrong.push(format!("{}: `crate::{{..}}` (import by module path)", rel.display()));
                continue;
            }
            // Re-exports at the crate root are the public API, not layers.
            if target.chars().next().is_some_and(char::is_uppercase) || target == module {
                continue;
            }
            let up = layer_of(&target) >= layer_of(&module);
            if up && !ALLOWED_UPWARD.contains(&(module.as_str(), target.as_str())) {
                wrong.push(format!("{}: `crate::{path}` ({module} -> {target})", rel.display()));
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the layer order:\n{}", wrong.join("\n"));
}

#[test]
fn the_layer_check_sees_a_wrong_import() {
    // The check itself: a meta file naming the image layer is caught.
    let paths = crate_paths("use crate::image::Image; // crate::qcow2::Qcow2 in a comment");
    assert_eq!(paths, vec!["image::Image".to_string()]);
    let (module, target) = ("qcow2::meta".to_string(), module_of_path(&paths[0]));
    assert!(layer_of(&target) >= layer_of(&module));
    assert_eq!(module_of_file(Path::new("qcow2/meta/check/mod.rs")).as_deref(), Some("qcow2::meta"));
    assert_eq!(module_of_file(Path::new("qcow2/io.rs")).as_deref(), Some("qcow2"));
}
