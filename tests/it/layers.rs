//! The layers of the crate (`src/lib.rs`, "Dependency direction"): nothing below the commands
//! imports a command module, so the commands can change without the engine, the store or the
//! set-up noticing, and no two modules import each other through a command.

use std::path::{Path, PathBuf};

/// The command modules: each wires one `krea-batch` subcommand end to end.
const COMMANDS: [&str; 8] =
    ["run", "check", "status", "control", "rerun", "models", "recover", "daemon"];

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is readable").flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            found.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to (`runner/mod.rs` → `runner`).
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).expect("under src");
    let first = relative.components().next().expect("a component");
    first.as_os_str().to_string_lossy().trim_end_matches(".rs").to_owned()
}

/// Every file of `src/`: its path, its top-level module and its text.
fn sources() -> Vec<(PathBuf, String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files
        .into_iter()
        .map(|file| {
            let module = module_of(&src, &file);
            let text = std::fs::read_to_string(&file).expect("readable");
            (file, module, text)
        })
        .collect()
}

#[test]
fn no_module_below_the_commands_imports_a_command() {
    let mut offences = Vec::new();
    for (file, module, text) in sources() {
        if COMMANDS.contains(&module.as_str()) || module == "main" || module == "lib" {
            continue;
        }
        for command in COMMANDS {
            let named = [format!("crate::{command}::"), format!("crate::{command}}}")];
            let imported = format!("crate::{{{command}");
            if named.iter().any(|name| text.contains(name.as_str())) || text.contains(&imported) {
                offences.push(format!("{} names crate::{command}", file.display()));
            }
        }
    }
    assert!(offences.is_empty(), "lower modules import commands:\n{}", offences.join("\n"));
}

#[test]
fn the_commands_do_not_import_each_other() {
    let mut offences = Vec::new();
    for (file, module, text) in sources() {
        if !COMMANDS.contains(&module.as_str()) {
            continue;
        }
        for command in COMMANDS.iter().filter(|command| **command != module) {
            if text.contains(&format!("crate::{command}::")) {
                offences.push(format!("{} names crate::{command}", file.display()));
            }
        }
    }
    assert!(offences.is_empty(), "commands import each other:\n{}", offences.join("\n"));
}

#[test]
fn the_simulation_imports_nothing_from_the_rest_of_the_crate() {
    // It models Krea, not krea-batch: kept apart as a crate of its own would be (`src/lib.rs`,
    // "The simulation"), so a change to the client cannot make the simulation agree with it.
    let mut offences = Vec::new();
    for (file, module, text) in sources() {
        if module != "sim" {
            continue;
        }
        for (at, _) in text.match_indices("crate::") {
            let rest = &text[at + "crate::".len()..];
            if !rest.starts_with("sim::") {
                let line = text[..at].matches('\n').count() + 1;
                let named: String = rest.chars().take_while(|c| *c != ';').take(40).collect();
                offences.push(format!("{}:{line} names crate::{named}", file.display()));
            }
        }
    }
    assert!(offences.is_empty(), "the simulation imports the client:\n{}", offences.join("\n"));
}
