//! The crate's module graph points one way: `config` at the bottom, `db` below `http` and
//! `metrics`, nothing importing upwards, and no two sibling modules importing each other. Read
//! from the sources, so a new `use` that closes a cycle fails here before a reviewer has to spot
//! it.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// Top-level module -> the top-level modules its files name through `crate::`.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path.strip_prefix(&src).unwrap();
            let first = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_str()
                .unwrap();
            let module = first.trim_end_matches(".rs").to_owned();
            if matches!(module.as_str(), "lib" | "main") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let deps = edges.entry(module.clone()).or_default();
            for dep in crate_paths(&text) {
                if dep != module {
                    deps.insert(dep);
                }
            }
        }
    }
    edges
}

/// The first segment after every `crate::` (also inside `crate::{a::…, b}`), comments skipped.
fn crate_paths(text: &str) -> BTreeSet<String> {
    paths_after(text, "crate::")
}

/// The first segment after every `prefix` (also inside `prefix{a::…, b}`), comments skipped.
fn paths_after(text: &str, prefix: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find(prefix) {
        rest = &rest[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 || (depth == 1 && c == ',') {
                    push_first_segment(&item, &mut found);
                    item.clear();
                    if depth == 0 {
                        break;
                    }
                } else {
                    item.push(c);
                }
            }
        } else {
            push_first_segment(rest, &mut found);
        }
    }
    found
}

fn push_first_segment(path: &str, found: &mut BTreeSet<String>) {
    let name: String = path
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    if !name.is_empty() && name.chars().next().unwrap().is_ascii_lowercase() {
        found.insert(name);
    }
}

/// A path from `from` back to `from`, if there is one.
fn cycle_through(from: &str, edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    let mut stack = vec![vec![from.to_owned()]];
    let mut seen = BTreeSet::new();
    while let Some(path) = stack.pop() {
        let last = path.last().unwrap();
        for next in edges.get(last).into_iter().flatten() {
            if next == from {
                let mut cycle = path.clone();
                cycle.push(next.clone());
                return Some(cycle);
            }
            if seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push(longer);
            }
        }
    }
    None
}

#[test]
fn the_module_graph_has_no_cycles() {
    let edges = graph();
    assert!(
        edges.contains_key("db") && edges.contains_key("http"),
        "{edges:?}"
    );
    let cycles: Vec<String> = edges
        .keys()
        .filter_map(|m| cycle_through(m, &edges))
        .map(|c| c.join(" -> "))
        .collect();
    assert!(cycles.is_empty(), "import cycles: {cycles:#?}");
}

#[test]
fn config_and_net_are_the_bottom_and_db_and_telemetry_know_no_http() {
    let edges = graph();
    assert_eq!(
        edges["config"],
        BTreeSet::new(),
        "config imports nothing of the crate"
    );
    for above in ["http", "metrics", "startup", "doctor"] {
        assert!(!edges["db"].contains(above), "db imports {above}");
    }
    // HTTP types and OpenAPI belong to `http`: the database and telemetry layers know neither.
    for dir in ["src/db", "src/telemetry"] {
        let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        for entry in std::fs::read_dir(sources).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            for http_only in ["utoipa::", "axum::", "tower_http::", "hyper::"] {
                assert!(
                    !text.contains(http_only),
                    "{} uses {http_only}, which belongs to http",
                    path.display()
                );
            }
        }
    }
}

/// Each directory's module path (`src/http/guard` -> `crate::http::guard::`) and its child
/// modules, one per file or subdirectory (not `mod.rs`, the directory's own).
fn children(dir: &Path, src: &Path) -> (String, BTreeMap<String, std::path::PathBuf>) {
    let rel = dir.strip_prefix(src).unwrap();
    let mut prefix = "crate::".to_owned();
    for part in rel.components() {
        prefix.push_str(part.as_os_str().to_str().unwrap());
        prefix.push_str("::");
    }
    let mut kids = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        if path.is_dir() {
            kids.insert(name, path.join("mod.rs"));
        } else if name != "mod" && path.extension().is_some_and(|e| e == "rs") {
            kids.insert(name, path);
        }
    }
    (prefix, kids)
}

#[test]
fn no_two_sibling_modules_import_each_other() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut pairs = Vec::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        let (prefix, kids) = children(&dir, &src);
        let mut uses: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for (name, path) in &kids {
            if path.ends_with("mod.rs") {
                stack.push(path.parent().unwrap().to_owned());
            }
            let Ok(text) = std::fs::read_to_string(path) else {
                continue;
            };
            // A file's `super::` is its directory; a subdirectory's `mod.rs` reaches its
            // siblings through `super::super::`.
            let via_super = if path.ends_with("mod.rs") {
                "super::super::"
            } else {
                "super::"
            };
            let named: BTreeSet<String> = paths_after(&text, via_super)
                .into_iter()
                .chain(paths_after(&text, &prefix))
                .filter(|n| n != name && kids.contains_key(n))
                .collect();
            uses.insert(name, named);
        }
        for (a, named) in &uses {
            for b in named {
                if *a < b.as_str() && uses.get(b.as_str()).is_some_and(|n| n.contains(*a)) {
                    pairs.push(format!("{prefix}{a} <-> {prefix}{b}"));
                }
            }
        }
    }
    assert!(
        pairs.is_empty(),
        "sibling modules importing each other: {pairs:#?}"
    );
}

#[test]
fn the_reader_of_the_graph_sees_grouped_and_plain_imports() {
    let found = crate_paths(
        "use crate::{config::{A, B}, db::Db};\nlet x = crate::metrics::f();\n// crate::http\n",
    );
    assert_eq!(
        found,
        ["config", "db", "metrics"]
            .map(String::from)
            .into_iter()
            .collect()
    );
}
