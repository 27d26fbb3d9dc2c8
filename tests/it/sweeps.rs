//! Sweeps end to end: a matrix and a CSV of prompts expand into jobs with readable names that
//! run against the simulation; growing the sweep or the CSV and running again creates only the
//! new combinations, each once.

use crate::support::{FAST_LIMITS, Sim, Workspace};

const SWEEP: &str = "  - prompt: \"a {animal} in fresh snow\"
    name: snow
    matrix:
      animal: [fox, owl]
      seed: [1, 2]
  - from: prompts.csv
    prompt: \"{prompt}, {style}\"
";

const ROWS: &str =
    "prompt,style,steps\na lighthouse at dusk,oil painting,20\n\"a harbour, at dawn\",ink,30\n";

fn sweep_file(sweep: &str) -> String {
    format!("model: image/bfl/flux-1-dev\n{FAST_LIMITS}\njobs:\n{sweep}")
}

#[test]
fn a_sweep_runs_every_combination_and_growing_it_adds_only_the_new_ones() {
    let sim = Sim::start(|_| {});
    let work = Workspace::with_file(&sweep_file(SWEEP));
    let data = work.job_file().with_file_name("prompts.csv");
    std::fs::write(&data, ROWS).expect("prompts.csv");

    let check = work.command(&sim, "unused", &["check"], &["--json"]);
    check.expect_code(0);
    let plan: serde_json::Value = serde_json::from_str(&check.stdout).expect("JSON plan");
    assert_eq!(plan["jobs"], 6, "2 x 2 combinations and 2 rows");

    work.run(&sim, &[]).expect_code(0);
    let manifest = work.manifest();
    let mut names: Vec<&str> = manifest.iter().filter_map(|line| line["name"].as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "prompts-001-a-lighthouse-at-dusk-oil-painting",
            "prompts-002-a-harbour-at-dawn-ink",
            "snow_animal-fox_seed-1",
            "snow_animal-fox_seed-2",
            "snow_animal-owl_seed-1",
            "snow_animal-owl_seed-2",
        ]
    );
    let stats = sim.stats();
    assert_eq!(stats.jobs_created, 6);
    assert!(stats.creations_by_prompt.contains_key("a owl in fresh snow"), "{stats:?}");
    assert!(stats.creations_by_prompt.contains_key("a harbour, at dawn, ink"), "{stats:?}");

    // A third seed (two new combinations: fox and owl with seed 3) and a third row.
    std::fs::write(work.job_file(), sweep_file(&SWEEP.replace("seed: [1, 2]", "seed: [1, 2, 3]")))
        .expect("sweep grown");
    std::fs::write(&data, format!("{ROWS}a pier at night,charcoal,25\n")).expect("row added");
    work.run(&sim, &[]).expect_code(0);
    let stats = sim.stats();
    assert_eq!(stats.jobs_created, 9, "only the three new jobs were created");
    // The simulation counts creations by prompt; a prompt of the matrix has one per seed.
    for (prompt, count) in &stats.creations_by_prompt {
        let expected = if prompt.ends_with("in fresh snow") { 3 } else { 1 };
        assert_eq!(*count, expected, "{prompt}: none paid twice");
    }
    assert_eq!(work.manifest().len(), 9);
}

#[test]
fn a_data_file_behind_a_symlinked_folder_is_refused_by_check_and_run() {
    let sim = Sim::start(|_| {});
    let work = Workspace::with_file(&sweep_file("  - from: data/customers.csv\n"));
    // `data` is a link to a folder outside; the row in it must never become a prompt.
    let private = tempfile::tempdir().expect("a private folder");
    std::fs::write(private.path().join("customers.csv"), "prompt\nJane Doe, card 4111\n")
        .expect("private rows");
    std::os::unix::fs::symlink(private.path(), work.dir.path().join("data")).expect("symlink");
    let expected = format!(
        "krea-batch: {}:14:11: jobs[0].from: data/customers.csv: `data` is a symbolic link",
        work.job_file().display()
    );
    for subcommand in ["check", "run"] {
        let run = work.command(&sim, &sim.key(), &[subcommand], &[]);
        run.expect_code(2);
        assert!(run.stderr.starts_with(&expected), "{subcommand}: {}", run.stderr);
        assert!(!run.stderr.contains("Jane"), "{}", run.stderr);
    }
    assert_eq!(sim.stats().requests_total, 0, "nothing was sent");
}
