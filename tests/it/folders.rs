//! What users do to their folders between runs must never pay twice: a renamed, copied or moved
//! job file resumes; a lost, emptied or rolled-back state file stops the run until `recover`
//! rebuilds it; two state files cannot share an output folder; a folder krea-batch did not make
//! is not written into.

use crate::support::{Run, Sim, Workspace, krea_batch, numbered_jobs, sha256_of};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `krea-batch <subcommand> <job file> <extra>` against `sim`.
fn command(sim: &Sim, subcommand: &str, job_file: &Path, extra: &[&str]) -> Run {
    let mut command = krea_batch();
    command.arg(subcommand).arg(job_file).args(extra);
    command.env("KREA_API_BASE", sim.url()).env("KREA_API_KEY", sim.key());
    Run::of(&command.output().expect("krea-batch runs"))
}

/// The result files and sidecars under `out`, with their SHA-256 and modification time: a
/// rerun that changes nothing leaves this exactly as it was.
fn results(out: &Path) -> BTreeMap<PathBuf, (String, std::time::SystemTime)> {
    crate::support::files_under(out)
        .into_iter()
        .filter(|path| {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let page = path.extension().is_some_and(|ext| ext == "html");
            !name.starts_with('.') && name != "manifest.jsonl" && !page
        })
        .map(|path| {
            let modified = std::fs::metadata(&path).and_then(|m| m.modified()).expect("mtime");
            let relative = path.strip_prefix(out).expect("under out").to_owned();
            (relative, (sha256_of(&path), modified))
        })
        .collect()
}

/// Removes the state file and its companions (write-ahead log, shared memory).
fn remove_state(out: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(out.join(format!(".krea-batch.sqlite{suffix}")));
    }
}

#[test]
fn a_renamed_copied_or_moved_job_file_resumes_and_pays_nothing() {
    let sim = Sim::start(|_| {});
    let work = Workspace::with_jobs(&numbered_jobs("a shoot", 5));
    work.run(&sim, &[]).expect_code(0);
    assert_eq!(sim.stats().jobs_created, 5);
    let paid = results(&work.out());
    assert_eq!(paid.len(), 10, "5 results and their sidecars: {paid:?}");

    // Renamed: `check` says nothing is left to pay for, and the run buys nothing.
    let renamed = work.dir.path().join("shoot-final.yaml");
    std::fs::rename(work.job_file(), &renamed).expect("renamed");
    let check = command(&sim, "check", &renamed, &["--json"]);
    check.expect_code(0);
    let plan: serde_json::Value = serde_json::from_str(&check.stdout).expect("JSON plan");
    assert_eq!(plan["resume"]["done"], 5, "{plan}");
    assert_eq!(plan["resume"]["to_pay"], 0, "{plan}");
    command(&sim, "run", &renamed, &[]).expect_code(0);
    // Commands that name the job file find its batch under the new name too.
    let cancel = Run::of(
        &krea_batch()
            .args(["cancel", "--file"])
            .arg(&renamed)
            .env("KREA_API_KEY", sim.key())
            .output()
            .expect("cancel runs"),
    );
    cancel.expect_code(0);
    let said = format!("{}{}", cancel.stdout, cancel.stderr);
    assert!(said.contains("the 5 selected jobs have all ended"), "{said}");
    // Copied under another name, writing into the same folder.
    let copy = work.dir.path().join("copy.yaml");
    std::fs::copy(&renamed, &copy).expect("copied");
    command(&sim, "run", &copy, &[]).expect_code(0);
    assert_eq!(sim.stats().jobs_created, 5, "no job was bought again");
    assert_eq!(results(&work.out()), paid, "no file was replaced");

    // The whole project folder moved elsewhere.
    let elsewhere = tempfile::tempdir().expect("another place");
    let moved = elsewhere.path().join("project");
    std::fs::rename(work.dir.path(), &moved).expect("project moved");
    let run = command(&sim, "run", &moved.join("shoot-final.yaml"), &[]);
    run.expect_code(0);
    assert_eq!(sim.stats().jobs_created, 5, "the moved project resumed: {}", run.stderr);
    assert_eq!(results(&moved.join("out")), paid, "no file was replaced after the move");
    // Put it back so that the workspace cleans up after itself.
    std::fs::rename(&moved, work.dir.path()).expect("moved back");
}

#[test]
fn a_deleted_or_emptied_state_file_stops_the_run_until_recover_rebuilds_it() {
    let sim = Sim::start(|_| {});
    let work = Workspace::with_jobs(&numbered_jobs("a paid job", 4));
    work.run(&sim, &[]).expect_code(0);
    let paid = results(&work.out());

    for damage in ["deleted", "emptied"] {
        remove_state(&work.out());
        if damage == "emptied" {
            std::fs::write(work.out().join(".krea-batch.sqlite"), b"").expect("0-byte state");
        }
        let run = work.run(&sim, &[]);
        run.expect_code(2);
        assert!(run.stderr.contains("krea-batch recover"), "{damage}: {}", run.stderr);
        assert_eq!(sim.stats().jobs_created, 4, "{damage}: nothing was bought again");
        assert_eq!(results(&work.out()), paid, "{damage}: no file was touched");
    }

    let recover = work.command(&sim, &sim.key(), &["recover"], &[]);
    recover.expect_code(0);
    assert!(recover.stderr.contains("4 jobs recovered"), "{}", recover.stderr);
    let run = work.run(&sim, &["--json"]);
    run.expect_code(0);
    assert_eq!(sim.stats().jobs_created, 4, "after recover nothing is bought again");
    assert_eq!(results(&work.out()), paid, "after recover no file was touched");
    let manifest = work.manifest();
    assert_eq!(manifest.len(), 4);
    assert!(manifest.iter().all(|line| line["status"] == "completed"), "{manifest:?}");
}

#[test]
fn a_state_rolled_back_by_a_lost_write_ahead_log_is_caught() {
    let sim = Sim::start(|_| {});
    let work = Workspace::with_jobs(&numbered_jobs("an early job", 2));
    work.run(&sim, &[]).expect_code(0);
    // The state as it was: what a lost write-ahead log leaves after a kill -9.
    let backup = tempfile::tempdir().expect("backup");
    for suffix in ["", "-wal"] {
        let name = format!(".krea-batch.sqlite{suffix}");
        if work.out().join(&name).exists() {
            std::fs::copy(work.out().join(&name), backup.path().join(&name)).expect("copied");
        }
    }
    let mut jobs = numbered_jobs("an early job", 2);
    jobs.push_str(&numbered_jobs("a later job", 2));
    work.set_jobs(&jobs);
    work.run(&sim, &[]).expect_code(0);
    assert_eq!(sim.stats().jobs_created, 4);
    let paid = results(&work.out());

    remove_state(&work.out());
    for entry in std::fs::read_dir(backup.path()).expect("backup").flatten() {
        std::fs::copy(entry.path(), work.out().join(entry.file_name())).expect("restored");
    }
    let run = work.run(&sim, &[]);
    run.expect_code(2);
    assert!(run.stderr.contains("does not know"), "{}", run.stderr);
    assert!(run.stderr.contains("krea-batch recover"), "{}", run.stderr);
    assert_eq!(sim.stats().jobs_created, 4, "the later jobs were not bought again");

    work.command(&sim, &sim.key(), &["recover"], &[]).expect_code(0);
    work.run(&sim, &[]).expect_code(0);
    assert_eq!(sim.stats().jobs_created, 4, "after recover nothing is bought again");
    assert_eq!(results(&work.out()), paid);
}

#[test]
fn two_state_files_cannot_share_an_output_folder() {
    let sim = Sim::start(|_| {});
    let work = Workspace::with_jobs(&numbered_jobs("a shared folder", 3));
    let first = work.dir.path().join("a.sqlite");
    let second = work.dir.path().join("b.sqlite");
    command(&sim, "run", &work.job_file(), &["--state", first.to_str().unwrap()]).expect_code(0);
    let paid = results(&work.out());

    let run = command(&sim, "run", &work.job_file(), &["--state", second.to_str().unwrap()]);
    run.expect_code(2);
    assert!(run.stderr.contains("belongs to the state file"), "{}", run.stderr);
    assert!(run.stderr.contains("a.sqlite"), "the owner is named: {}", run.stderr);
    assert_eq!(sim.stats().jobs_created, 3, "the second state sent nothing");
    assert_eq!(results(&work.out()), paid);

    // Its owner still resumes it.
    command(&sim, "run", &work.job_file(), &["--state", first.to_str().unwrap()]).expect_code(0);
    assert_eq!(sim.stats().jobs_created, 3);
}

#[test]
fn a_folder_krea_batch_did_not_make_is_not_written_into() {
    let sim = Sim::start(|_| {});
    let work = Workspace::with_jobs("  - {name: hero, prompt: a hero image}\n");
    std::fs::create_dir_all(work.out()).expect("out");
    let theirs = [("index.html", "<h1>my site</h1>"), ("notes.txt", "mine")];
    for (name, text) in theirs {
        std::fs::write(work.out().join(name), text).expect("their file");
    }

    let run = work.run(&sim, &[]);
    run.expect_code(2);
    assert!(run.stderr.contains("did not write"), "{}", run.stderr);
    assert!(run.stderr.contains("--force"), "{}", run.stderr);
    // Even --force never replaces their gallery page.
    let forced = work.run(&sim, &["--force"]);
    forced.expect_code(2);
    assert!(forced.stderr.contains("index.html"), "{}", forced.stderr);
    assert_eq!(sim.stats().jobs_created, 0);
    for (name, text) in theirs {
        assert_eq!(std::fs::read_to_string(work.out().join(name)).expect("kept"), text);
    }

    // Without a file it would replace, --force writes beside theirs and leaves them alone.
    std::fs::remove_file(work.out().join("index.html")).expect("removed");
    work.run(&sim, &["--force"]).expect_code(0);
    assert_eq!(std::fs::read_to_string(work.out().join("notes.txt")).expect("kept"), "mine");
    assert!(work.out().join("hero.png").is_file());
    // From then on the folder is krea-batch's: a rerun needs no --force.
    work.run(&sim, &[]).expect_code(0);
    assert_eq!(sim.stats().jobs_created, 1);
}

#[test]
fn a_file_in_a_results_place_is_never_replaced_the_result_gets_another_name() {
    let sim = Sim::start(|_| {});
    let work = Workspace::with_jobs("  - {name: first, prompt: a first image}\n");
    work.run(&sim, &[]).expect_code(0);
    // A file krea-batch did not download for the job lies where its result would go.
    std::fs::write(work.out().join("hero.png"), b"mine").expect("their file");
    work.set_jobs("  - {name: first, prompt: a first image}\n  - {name: hero, prompt: a hero}\n");
    let run = work.run(&sim, &[]);
    run.expect_code(0);
    assert!(run.stderr.contains("saved under another name"), "warned: {}", run.stderr);
    assert_eq!(std::fs::read(work.out().join("hero.png")).expect("kept"), b"mine");
    let manifest = work.manifest();
    let hero = manifest.iter().find(|line| line["name"] == "hero").expect("listed");
    assert_eq!(hero["files"], serde_json::json!(["hero-2.png"]), "{hero}");
    assert!(work.out().join("hero-2.png.json").is_file());
    // The rerun finds the result where it was saved and fetches nothing again.
    let again = results(&work.out());
    work.run(&sim, &[]).expect_code(0);
    assert_eq!(results(&work.out()), again);
    assert_eq!(sim.stats().jobs_created, 2);
}
