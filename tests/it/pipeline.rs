//! Krea's pipeline files (the JSON of its `pipeline.py` script) run as job files: each chain of
//! steps becomes a job whose later steps are its stages, with every stage created once and its
//! files on disk; `check` reads them too, and an unclear step is refused naming it.

use crate::support::{Sim, Workspace, krea_batch};
use std::path::Path;
use std::time::Duration;

/// Two chains, generate → enhance → animate, with a variable and the script's camelCase
/// fields, and krea-batch's quick test limits.
const PIPELINE: &str = r#"{
  "variables": {"light": "at dawn"},
  "limits": {"submissions_per_minute": 6000, "burst": 20, "max_in_flight": 8,
             "poll_interval": "50ms", "video_poll_interval": "50ms",
             "poll_interval_max": "200ms", "retry_backoff": "50ms", "request_timeout": "5s"},
  "steps": [
    {"action": "generate_image", "model": "/generate/image/bfl/flux-1-dev",
     "prompt": "a castle {{light}}", "filename": "castle"},
    {"action": "enhance", "use_previous": true, "enhancer": "topaz-standard-enhance",
     "model": "Standard V2", "imageScalingFactor": 2},
    {"action": "generate_video", "use_previous": true, "model": "video/kling/kling-2.5",
     "prompt": "slow push-in", "aspectRatio": "16:9"},
    {"action": "generate_image", "model": "bfl/flux-1-dev",
     "prompt": "a lighthouse {{light}}", "filename": "lighthouse"},
    {"action": "enhance", "use_previous": true, "model": "Standard V2",
     "imageScalingFactor": 2},
    {"action": "generate_video", "use_previous": true, "model": "video/kling/kling-2.5",
     "prompt": "slow push-in", "aspectRatio": "16:9"}
  ]
}"#;

/// `krea-batch <subcommand> <dir>/pipeline.json` against `sim`.
fn pipeline_command(work: &Workspace, sim: &Sim, subcommand: &str) -> crate::support::Run {
    let file = work.dir.path().join("pipeline.json");
    let mut command = krea_batch();
    command.arg(subcommand).arg(&file);
    command.env("KREA_API_BASE", sim.url()).env("KREA_API_KEY", sim.key());
    command.env("XDG_CACHE_HOME", work.cache_home());
    crate::support::Run::of(&command.output().expect("krea-batch runs"))
}

fn workspace_with(pipeline: &str) -> Workspace {
    let work = Workspace::with_file("");
    std::fs::write(work.dir.path().join("pipeline.json"), pipeline).expect("pipeline written");
    work
}

#[test]
fn a_krea_pipeline_file_runs_every_stage_once_with_its_files_on_disk() {
    let sim = Sim::start(|config| config.video_job_time = Duration::from_millis(200));
    let work = workspace_with(PIPELINE);
    pipeline_command(&work, &sim, "check").expect_code(0);
    pipeline_command(&work, &sim, "run").expect_code(0);

    let stats = sim.stats();
    for prompt in ["a castle at dawn", "a lighthouse at dawn"] {
        assert_eq!(stats.creations_by_prompt.get(prompt), Some(&1), "{prompt}");
    }
    assert_eq!(stats.creations_by_prompt.get("slow push-in"), Some(&2));
    let twice: Vec<_> = stats.creations_by_input.iter().filter(|(_, count)| **count != 1).collect();
    assert!(twice.is_empty(), "a stage paid more than once: {twice:?}");
    assert_eq!(stats.creations_by_input.len(), 4, "each later stage, once per input");
    assert_eq!(stats.jobs_created, 6);

    let out = work.out();
    for base in ["castle", "lighthouse"] {
        for (stage, model, ext) in
            [(0, "flux-1-dev", "png"), (1, "standard-enhance", "png"), (2, "kling-2.5", "mp4")]
        {
            let file = out.join(base).join(format!("{stage}-{model}.{ext}"));
            assert!(non_empty(&file), "{} is on disk", file.display());
        }
    }
    let lines = work.manifest();
    assert_eq!(lines.len(), 6, "{lines:?}");
    assert!(lines.iter().all(|line| line["status"] == "completed"), "{lines:?}");

    pipeline_command(&work, &sim, "run").expect_code(0);
    assert_eq!(sim.stats().jobs_created, 6, "a second run pays nothing again");
}

fn non_empty(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|meta| meta.len() > 0)
}

#[test]
fn check_refuses_an_unclear_step_naming_it_and_what_to_write() {
    let sim = Sim::start(|_| {});
    let work = workspace_with(
        r#"{"steps": [
  {"action": "generate_image", "model": "bfl/flux-1-dev", "prompt": "a", "batchSize": 2},
  {"action": "enhance", "use_previous": true}
]}"#,
    );
    let check = pipeline_command(&work, &sim, "check");
    check.expect_code(2);
    assert!(check.stderr.contains("pipeline.json:3"), "{}", check.stderr);
    assert!(check.stderr.contains("step 2 (enhance)"), "{}", check.stderr);
    assert!(check.stderr.contains("\"action\": \"fan_out\""), "{}", check.stderr);
    assert_eq!(sim.stats().jobs_created, 0);
}

#[test]
fn a_fan_out_over_local_files_uploads_each_once_and_numbers_its_jobs() {
    let sim = Sim::start(|config| config.video_job_time = Duration::from_millis(200));
    let work = workspace_with(
        r#"{"limits": {"poll_interval": "50ms", "video_poll_interval": "50ms",
                       "poll_interval_max": "200ms", "retry_backoff": "50ms"},
            "steps": [
  {"action": "fan_out", "sources": ["cat.png", "dog.png"],
   "step": {"action": "enhance", "model": "Standard V2", "width": 64, "height": 64,
            "filename": "pet-{i}"}},
  {"action": "fan_out", "use_previous": true,
   "step": {"action": "generate_video", "model": "video/kling/kling-2.5",
            "prompt": "pet {i} turns its head"}}
]}"#,
    );
    for (index, name) in ["cat.png", "dog.png"].into_iter().enumerate() {
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10\0\0\0\x10".to_vec();
        png.push(u8::try_from(index).expect("small"));
        std::fs::write(work.dir.path().join(name), png).expect("image written");
    }
    pipeline_command(&work, &sim, "run").expect_code(0);

    let stats = sim.stats();
    let uploads = stats.requests.iter().filter(|r| r.method == "POST" && r.path == "/assets");
    assert_eq!(uploads.count(), 2, "each local file uploaded once");
    for prompt in ["pet 1 turns its head", "pet 2 turns its head"] {
        assert_eq!(stats.creations_by_prompt.get(prompt), Some(&1), "{prompt}");
    }
    assert_eq!(stats.jobs_created, 4);
    for pet in ["pet-1", "pet-2"] {
        for file in ["0-standard-enhance.png", "1-kling-2.5.mp4"] {
            let path = work.out().join(pet).join(file);
            assert!(non_empty(&path), "{} is on disk", path.display());
        }
    }
}
