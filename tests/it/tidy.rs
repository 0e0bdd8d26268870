//! Tidy: the architecture invariants of `src/lib.rs` that a grep can hold.

use std::path::{Path, PathBuf};

fn sources() -> Vec<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    let mut stack: Vec<PathBuf> = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let name = path
                    .strip_prefix(&src)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                out.push((name, std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// The code of a file without its comments (line comments and doc comments).
fn code(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn module(name: &str) -> &str {
    name.trim_end_matches(".rs").split('/').next().unwrap()
}

#[test]
fn every_module_starts_with_its_doc() {
    for (name, text) in sources() {
        assert!(
            text.starts_with("//!"),
            "src/{name} must start with a //! module doc"
        );
    }
}

#[test]
fn each_framework_stays_in_its_module() {
    // (crate, the only modules that may use it)
    let rules: &[(&str, &[&str])] = &[
        ("sled", &["store"]),
        ("axum", &["api"]),
        ("clap", &["cli", "main"]),
        ("libmimalloc_sys", &["lib"]),
    ];
    for (name, text) in sources() {
        let code = code(&text);
        for (krate, allowed) in rules {
            let used =
                code.contains(&format!("{krate}::")) || code.contains(&format!("use {krate}"));
            assert!(
                !used || allowed.contains(&module(&name)),
                "src/{name} uses {krate}, which belongs to {allowed:?} only"
            );
        }
    }
}

#[test]
fn no_floating_point_anywhere_in_src() {
    for (name, text) in sources() {
        let code = code(&text);
        for word in ["f32", "f64", "to_f64", "from_f64", "to_f32", "from_f32"] {
            let found = code
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .any(|token| token == word);
            assert!(
                !found,
                "src/{name} uses `{word}`: money is rust_decimal, never floating point"
            );
        }
    }
}

#[test]
fn the_core_does_no_io_and_reads_no_clock() {
    let forbidden = [
        "std::fs",
        "std::io",
        "std::net",
        "std::thread",
        "std::env",
        "Utc::now",
        "SystemTime",
        "Instant::now",
        "tokio",
        "now_v7",
        "new_v4",
        "File::",
    ];
    for (name, text) in sources() {
        if !["money", "events", "rules", "projections", "replay"].contains(&module(&name)) {
            continue;
        }
        let code = code(&text);
        for word in forbidden {
            assert!(
                !code.contains(word),
                "src/{name} is pure core but uses `{word}`"
            );
        }
    }
}

#[test]
fn dependencies_point_down_only() {
    // module → the crate modules it may import
    let allowed: &[(&str, &[&str])] = &[
        ("money", &[]),
        ("events", &["money"]),
        ("log", &["events"]),
        ("rules", &["events", "money"]),
        ("projections", &["events", "money"]),
        ("replay", &["events", "money", "rules"]),
        ("store", &["events", "money", "log", "projections", "rules"]),
        (
            "ledger",
            &[
                "events",
                "money",
                "log",
                "rules",
                "projections",
                "store",
                "replay",
            ],
        ),
        (
            "api",
            &[
                "events",
                "money",
                "ledger",
                "rules",
                "projections",
                "log",
                "replay",
            ],
        ),
        (
            "cli",
            &[
                "events",
                "money",
                "ledger",
                "rules",
                "projections",
                "log",
                "api",
                "demo",
                "replay",
            ],
        ),
        (
            "demo",
            &["events", "money", "ledger", "rules", "projections"],
        ),
    ];
    let modules = [
        "money",
        "events",
        "log",
        "rules",
        "projections",
        "replay",
        "store",
        "ledger",
        "api",
        "cli",
        "demo",
    ];
    for (name, text) in sources() {
        let this = module(&name);
        let Some((_, may)) = allowed.iter().find(|(m, _)| *m == this) else {
            continue;
        };
        let code = code(&text);
        for other in modules {
            if other == this {
                continue;
            }
            let uses = code.contains(&format!("crate::{other}"))
                || code.contains(&format!("crate::{{{other}"));
            assert!(
                !uses || may.contains(&other),
                "src/{name} imports {other}, against the direction of the arrows"
            );
        }
    }
}

/// The README's commands run the server with a bare `cargo run`: with the
/// tools beside it, Cargo must be told which binary that is.
#[test]
fn a_bare_cargo_run_runs_the_server() {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let manifest = std::fs::read_to_string(format!("{root}/Cargo.toml")).unwrap();
    assert!(readme.contains("\ncargo run --release -- serve\n"));
    let bins = manifest.matches("[[bin]]").count();
    assert!(bins > 1, "the tools are binaries too");
    let package = manifest.split("\n[").next().unwrap();
    assert!(
        package
            .lines()
            .any(|l| l.trim() == "default-run = \"commission-ledger\""),
        "Cargo.toml's [package] names the server as default-run"
    );
    let first_bin = manifest.split("[[bin]]").nth(1).unwrap();
    assert!(
        first_bin.contains("name = \"commission-ledger\"") && first_bin.contains("src/main.rs")
    );
}
