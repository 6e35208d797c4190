//! Checks that keep ARCHITECTURE.md true, run as tests (so `cargo xtask ci` runs them):
//!
//! - the dependency edges between workspace crates are exactly those of ARCHITECTURE.md's
//!   "Dependency edges" block, read from `cargo metadata`;
//! - the crates that may know reqwest, redis and axum are the only ones that depend on them;
//! - no crate's modules import each other in a circle (`use crate::…` edges, outside tests).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `crate -> [dependencies]` from the fenced block after the `Dependency edges` heading.
fn documented_edges() -> BTreeMap<String, BTreeSet<String>> {
    let text = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let after = text
        .split("### Dependency edges")
        .nth(1)
        .expect("ARCHITECTURE.md has a `### Dependency edges` section");
    let block = after
        .split("```")
        .nth(1)
        .expect("the section has a fenced block");
    let mut edges = BTreeMap::new();
    for line in block.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (from, to) = line
            .split_once("->")
            .unwrap_or_else(|| panic!("`{line}`: write `crate -> dep, dep`"));
        let to: BTreeSet<String> = to
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty() && *d != "(none)")
            .map(str::to_owned)
            .collect();
        edges.insert(from.trim().to_owned(), to);
    }
    edges
}

/// Every workspace package with its normal (and build) dependencies by name.
fn metadata() -> Vec<(String, Vec<String>)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let value: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    value["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|package| {
            let deps = package["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["kind"].is_null() || d["kind"] == "build")
                .map(|d| d["name"].as_str().unwrap().to_owned())
                .collect();
            (package["name"].as_str().unwrap().to_owned(), deps)
        })
        .collect()
}

#[test]
fn dependency_edges_are_the_ones_architecture_md_draws() {
    let packages = metadata();
    let members: BTreeSet<&str> = packages.iter().map(|(n, _)| n.as_str()).collect();
    let actual: BTreeMap<String, BTreeSet<String>> = packages
        .iter()
        .map(|(name, deps)| {
            let internal = deps
                .iter()
                .filter(|d| members.contains(d.as_str()))
                .cloned()
                .collect();
            (name.clone(), internal)
        })
        .collect();
    let documented = documented_edges();
    for (name, deps) in &actual {
        let allowed = documented
            .get(name)
            .unwrap_or_else(|| panic!("ARCHITECTURE.md draws no edges for `{name}`"));
        let undrawn: Vec<_> = deps.difference(allowed).collect();
        assert!(
            undrawn.is_empty(),
            "`{name}` depends on {undrawn:?}, which ARCHITECTURE.md does not allow"
        );
        let stale: Vec<_> = allowed.difference(deps).collect();
        assert!(
            stale.is_empty(),
            "ARCHITECTURE.md says `{name}` depends on {stale:?}; it does not (redraw the map)"
        );
    }
    for name in documented.keys() {
        assert!(
            actual.contains_key(name),
            "ARCHITECTURE.md names `{name}`, which is not a workspace crate"
        );
    }
}

#[test]
fn only_the_crates_that_may_know_reqwest_redis_and_axum_depend_on_them() {
    let rules: [(&str, &[&str]); 3] = [
        ("reqwest", &["backend-openai"]),
        ("redis", &["state-redis"]),
        ("axum", &["router-gateway"]),
    ];
    for (name, deps) in metadata() {
        for (external, allowed) in rules {
            if deps.iter().any(|d| d == external) {
                assert!(
                    allowed.contains(&name.as_str()),
                    "`{name}` depends on {external}; only {allowed:?} may"
                );
            }
        }
    }
}

/// `module -> modules it imports` for the crate whose sources are in `src`.
fn module_imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut imports: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = vec![src.to_path_buf()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.extension().is_none_or(|e| e != "rs") || file == "tests.rs" {
            continue;
        }
        let relative = path.strip_prefix(src).unwrap();
        let module = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // Test modules may import anything.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let entry = imports.entry(module.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let name: String = code[i + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            if !name.is_empty() && name != module {
                entry.insert(name);
            }
        }
    }
    imports
}

/// A circle in `graph`, if there is one.
fn circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_owned());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_crate_has_an_import_circle() {
    let crates = root().join("crates");
    for entry in std::fs::read_dir(&crates).unwrap() {
        let src = entry.unwrap().path().join("src");
        if !src.is_dir() {
            continue;
        }
        let graph = module_imports(&src);
        assert_eq!(
            circle(&graph),
            None,
            "modules of {} import each other in a circle",
            src.display()
        );
    }
}

#[test]
fn a_circle_is_found() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(
        circle(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
}
