//! Local files as job inputs: uploaded once per content through `POST /assets`, the simulation
//! given its own asset URL, a lost upload answer found again instead of sent twice, and paths
//! that leave the job file's folder refused before anything is sent.

use crate::support::{FAST_LIMITS, Run, Sim, Workspace, krea_batch, sha256_of};
use serde_json::Value;

/// A small file that is a PNG by its first bytes.
const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10\0\0\0\x10a cat";

/// A workspace with `cat.png` and a flux job file whose `jobs` are given.
fn workspace(limits: &str, jobs: &str) -> Workspace {
    let work =
        Workspace::with_file(&format!("model: image/bfl/flux-1-dev\n{limits}\njobs:\n{jobs}"));
    std::fs::write(work.dir.path().join("cat.png"), PNG).expect("cat.png");
    work
}

/// The requests the simulation got for `method path` (path without its query).
fn requests(sim: &Sim, method: &str, path: &str) -> usize {
    let stats = sim.stats();
    stats
        .requests
        .iter()
        .filter(|r| r.method == method && r.path.split('?').next() == Some(path))
        .count()
}

/// The line (from 1) of the job file holding `needle`.
fn line_of(work: &Workspace, needle: &str) -> usize {
    let text = std::fs::read_to_string(work.job_file()).expect("job file");
    text.lines().position(|line| line.contains(needle)).expect("in the job file") + 1
}

fn completed(work: &Workspace) -> usize {
    work.manifest().iter().filter(|job| job["status"] == "completed").count()
}

/// `run --simulate`: the job's local `image_url` is uploaded to the simulation, which refuses
/// any input URL but its own, so a completed job shows it was given its own asset's URL.
#[test]
fn a_local_image_runs_against_the_simulation_with_its_asset_url() {
    let work = workspace(
        FAST_LIMITS,
        "  - prompt: a cat in a hat\n    params: {image_url: ./cat.png, strength: 0.5}\n",
    );
    let run = Run::of(
        &krea_batch()
            .current_dir(work.dir.path())
            .args(["run", "--simulate"])
            .arg(work.job_file())
            .output()
            .expect("runs"),
    );
    run.expect_code(0);
    let out = work.dir.path().join("out-simulated");
    let text = std::fs::read_to_string(out.join(".krea-batch-sim.json")).expect("world kept");
    let world: Value = serde_json::from_str(&text).expect("JSON");
    let assets = world["account"]["assets"].as_array().expect("assets kept in the world");
    assert_eq!(assets.len(), 1, "{assets:?}");
    let sha = sha256_of(&work.dir.path().join("cat.png"));
    assert_eq!(assets[0]["description"], format!("krea-batch sha256:{sha}"));
    assert_eq!(assets[0]["mime_type"], "image/png");
    assert_eq!(world["account"]["jobs"].as_array().map(Vec::len), Some(1));
}

/// Two jobs naming the same content (under two names) upload it once; a rerun that adds a
/// third job using it uploads nothing, and every job completes with the simulation's URL.
#[test]
fn one_upload_per_content_across_jobs_and_runs() {
    let sim = Sim::start(|_| {});
    let work = workspace(
        FAST_LIMITS,
        "  - prompt: a cat\n    params: {image_url: cat.png}\n  - prompt: a cat, again\n    \
         params: {image_url: ./cat.png}\n",
    );
    std::fs::copy(work.dir.path().join("cat.png"), work.dir.path().join("same.png"))
        .expect("copied");
    work.run(&sim, &[]).expect_code(0);
    assert_eq!(completed(&work), 2);
    assert_eq!(requests(&sim, "POST", "/assets"), 1, "one upload for one content");

    let text = std::fs::read_to_string(work.job_file()).expect("job file");
    let more = format!("{text}  - prompt: a third cat\n    params: {{image_url: same.png}}\n");
    std::fs::write(work.job_file(), more).expect("job added");
    work.run(&sim, &[]).expect_code(0);
    assert_eq!(completed(&work), 3);
    assert_eq!(requests(&sim, "POST", "/assets"), 1, "the recorded URL is reused");
    assert_eq!(sim.stats().jobs_created, 3);
}

/// Every POST's answer is lost (the asset and the jobs exist, their answers never come): the
/// upload is found with `GET /assets` by its description and never sent a second time.
#[test]
fn a_lost_upload_answer_is_found_without_a_second_upload() {
    let sim = Sim::start(|config| {
        config.faults = krea_batch::sim::Faults { post_drop_rate: 1.0, ..Default::default() };
    });
    let limits = format!("{FAST_LIMITS}  reconcile_after: 50ms\n");
    let work = workspace(
        &limits,
        "  - prompt: a cat\n    params: {image_url: cat.png}\n  - prompt: a dog\n    \
         params: {image_url: cat.png}\n",
    );
    work.run(&sim, &[]).expect_code(0);
    assert_eq!(completed(&work), 2);
    assert_eq!(requests(&sim, "POST", "/assets"), 1, "never uploaded twice");
    assert!(requests(&sim, "GET", "/assets") >= 1, "looked for at Krea");
    assert_eq!(sim.stats().jobs_created, 2);
}

/// Paths that leave the job file's folder, and links, are refused at their line before
/// anything is sent; `check` says the same of a missing file.
#[test]
fn escaping_and_missing_local_files_are_refused_at_their_line() {
    let sim = Sim::start(|_| {});
    let outside = tempfile::tempdir().expect("temp dir");
    std::fs::write(outside.path().join("x.png"), PNG).expect("outside file");
    let absolute = outside.path().join("x.png").display().to_string();
    for (value, needle) in [
        ("../x.png".to_owned(), "not inside"),
        (absolute, "not inside"),
        ("linked.png".to_owned(), "symbolic link"),
    ] {
        let work = workspace(
            FAST_LIMITS,
            &format!(
                "  - prompt: fine\n  - prompt: a cat\n    params:\n      image_url: '{value}'\n"
            ),
        );
        std::os::unix::fs::symlink(
            outside.path().join("x.png"),
            work.dir.path().join("linked.png"),
        )
        .expect("link");
        let run = work.run(&sim, &[]);
        run.expect_code(2);
        let line = format!("jobs.yaml:{}:", line_of(&work, "image_url"));
        assert!(run.stderr.contains(&line), "{line} in {}", run.stderr);
        assert!(run.stderr.contains(needle) && run.stderr.contains("image_url"), "{}", run.stderr);
    }
    assert_eq!(sim.stats().requests_total, 0, "nothing was sent");

    let work = workspace(FAST_LIMITS, "  - prompt: a cat\n    params: {image_url: gone.png}\n");
    let check = work.command(&sim, "unused", &["check"], &[]);
    check.expect_code(2);
    let line = format!("jobs.yaml:{}:", line_of(&work, "image_url"));
    assert!(check.stderr.contains(&line) && check.stderr.contains("gone.png"), "{}", check.stderr);
}

/// `n` distinct 16×16 PNGs (by their header; the rest tells them apart) in `folder`, named
/// `<prefix>NN.png`.
fn write_pngs(folder: &std::path::Path, prefix: &str, n: usize) {
    std::fs::create_dir_all(folder).expect("folder");
    for index in 0..n {
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10\0\0\0\x10".to_vec();
        png.extend_from_slice(format!("{prefix}{index:02}").as_bytes());
        std::fs::write(folder.join(format!("{prefix}{index:02}.png")), png).expect("image");
    }
}

/// A folder of 20 images enhanced by a Topaz model (no prompt; its required width and height
/// read from each image): one job per image, each uploaded once; `check` counts the images and the files skipped, at the line of `from:`. A
/// rerun after adding 5 images creates exactly 5 jobs and uploads only their 5 images.
#[test]
fn a_folder_of_images_enhanced_then_grown_creates_only_the_new_jobs() {
    let sim = Sim::start(|_| {});
    let work = Workspace::with_file(&format!(
        "model: enhance/topaz/standard-enhance\n{FAST_LIMITS}params:\n  model: Standard V2\n  \
         image_scaling_factor: 2\njobs:\n  - from: photos/\n    name: \"{{file}}-2x\"\n"
    ));
    let photos = work.dir.path().join("photos");
    write_pngs(&photos, "img-", 20);
    std::fs::write(photos.join(".DS_Store"), "finder").expect("hidden file");
    std::fs::write(photos.join("notes.txt"), "not an image").expect("other file");

    let check = work.command(&sim, "unused", &["check"], &[]);
    check.expect_code(0);
    let line = line_of(&work, "from: photos/");
    let folder = format!("line {line}: photos/: 20 images; skipped 1 hidden, 1 not JPEG");
    assert!(check.stdout.contains(&folder), "{folder} in {}", check.stdout);

    work.run(&sim, &[]).expect_code(0);
    assert_eq!(completed(&work), 20);
    assert_eq!(sim.stats().jobs_created, 20);
    assert_eq!(requests(&sim, "POST", "/assets"), 20, "one upload per image");
    let names: Vec<String> = work
        .manifest()
        .iter()
        .map(|job| job["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(names.contains(&"img-00-2x".to_owned()) && names.contains(&"img-19-2x".to_owned()));
    // The manifest and the gallery name each input as the job file does, not by its hash.
    let first = work.manifest().into_iter().find(|job| job["name"] == "img-00-2x").expect("listed");
    assert_eq!(first["inputs"], serde_json::json!(["photos/img-00.png"]), "{first}");
    let gallery = std::fs::read_to_string(work.out().join("index.html")).expect("gallery");
    assert!(gallery.contains("photos/img-07.png"), "the input is named in its card");
    assert!(!gallery.contains("krea-batch-file:"), "no placeholder is shown");

    write_pngs(&photos, "new-", 5);
    work.run(&sim, &[]).expect_code(0);
    assert_eq!(completed(&work), 25);
    assert_eq!(sim.stats().jobs_created, 25, "exactly the 5 new images made jobs");
    assert_eq!(requests(&sim, "POST", "/assets"), 25, "only the new images were uploaded");
    let created = sim.server().jobs();
    assert!(created.iter().all(|job| job.model == "enhance/topaz/standard-enhance"), "{created:?}");

    // A folder that is gone is refused by `check` at the line of its `from:`.
    std::fs::rename(&photos, work.dir.path().join("elsewhere")).expect("moved away");
    let check = work.command(&sim, "unused", &["check"], &[]);
    check.expect_code(2);
    let at = format!("jobs.yaml:{line}:");
    assert!(check.stderr.contains(&at) && check.stderr.contains("photos"), "{}", check.stderr);
}
