//! `krea-batch completions SHELL` and `krea-batch man`: scripts and a page generated from the
//! command line itself, so they name every command.

use crate::support::{Run, krea_batch};

fn output(args: &[&str]) -> Run {
    Run::of(&krea_batch().args(args).output().expect("krea-batch runs"))
}

#[test]
fn completion_scripts_name_the_commands() {
    for shell in ["bash", "zsh", "fish"] {
        let script = output(&["completions", shell]);
        script.expect_code(0);
        for command in ["run", "models", "retry", "simulate-api", "completions"] {
            assert!(script.stdout.contains(command), "{shell}: {command}");
        }
    }
    output(&["completions", "tcsh"]).expect_code(2);
}

#[test]
fn the_man_page_is_roff_and_lists_the_commands() {
    let page = output(&["man"]);
    page.expect_code(0);
    assert!(
        page.stdout.contains(".TH krea-batch 1"),
        "{}",
        &page.stdout[..200.min(page.stdout.len())]
    );
    assert!(page.stdout.contains(".SH NAME"), "a man page's sections");
    for command in ["run", "status", "models", "retry", "man"] {
        let listed = format!("krea\\-batch\\-{command}(1)");
        assert!(page.stdout.contains(&listed), "{listed} under SUBCOMMANDS");
    }
}

#[test]
fn man_dir_writes_a_page_for_every_command() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pages = dir.path().join("man1");
    let written = output(&["man", "--dir", pages.to_str().expect("UTF-8")]);
    written.expect_code(0);
    for page in ["krea-batch.1", "krea-batch-retry.1", "krea-batch-models.1", "krea-batch-run.1"] {
        let text =
            std::fs::read_to_string(pages.join(page)).unwrap_or_else(|err| panic!("{page}: {err}"));
        assert!(text.contains(".SH NAME"), "{page} is a man page");
    }
}

/// A reader that stops early (`krea-batch status | head -1`) is no error: every command's
/// answer goes to stdout through one writer that takes a closed pipe as "enough", where
/// `println!` would panic.
#[test]
fn a_closed_stdout_is_no_panic() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("jobs.yaml");
    std::fs::write(&file, "model: image/bfl/flux-1-dev\njobs:\n  - prompt: a fox\n").expect("file");
    let file = file.to_str().expect("utf-8 path");
    for args in [&["man"][..], &["completions", "bash"], &["check", "--offline", file]] {
        let mut child = krea_batch()
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("krea-batch starts");
        drop(child.stdout.take()); // the reader is gone before anything is written
        let output = child.wait_with_output().expect("krea-batch ends");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(output.status.code(), Some(0), "{args:?}: {stderr}");
    }
}
