//! Tests of the translation of Krea's pipeline files into job files.

use super::*;
use serde_json::json;

fn translated(pipeline: &Value) -> Value {
    translate(pipeline).unwrap_or_else(|error| panic!("translates: {error:?}")).document
}

fn refused(pipeline: &Value) -> PipelineError {
    translate(pipeline).expect_err("refused")
}

#[test]
fn a_chain_of_steps_becomes_one_job_with_stages_in_snake_case() {
    let pipeline = json!({
        "steps": [
            {"action": "generate_image", "model": "bfl/flux-1-dev", "prompt": "a dragon",
             "aspectRatio": "16:9", "filename": "dragon.png"},
            {"action": "enhance", "use_previous": true, "enhancer": "topaz-standard-enhance",
             "model": "Standard V2", "width": 4096, "height": 4096},
            {"action": "generate_video", "use_previous": true,
             "model": "/generate/video/kling/kling-2.5", "prompt": "it roars",
             "duration": 5, "generateAudio": true},
        ]
    });
    assert_eq!(
        translated(&pipeline),
        json!({"jobs": [{
            "name": "dragon",
            "model": "image/bfl/flux-1-dev",
            "prompt": "a dragon",
            "params": {"aspect_ratio": "16:9"},
            "then": [
                {"model": "enhance/topaz/standard-enhance",
                 "params": {"model": "Standard V2", "width": 4096, "height": 4096}},
                {"model": "video/kling/kling-2.5", "prompt": "it roars",
                 "params": {"duration": 5, "generate_audio": true}},
            ],
        }]})
    );
    let origins = translate(&pipeline).expect("translates").origins;
    let actions: Vec<_> = origins[0].iter().map(|step| (step.number, step.action)).collect();
    assert_eq!(actions, [(1, "generate_image"), (2, "enhance"), (3, "generate_video")]);
}

#[test]
fn a_fan_out_over_sources_makes_one_job_per_source_and_later_steps_follow_each() {
    let pipeline = json!({
        "variables": {"style": "cinematic"},
        "budget": {"max_usd": 5},
        "steps": [
            {"action": "fan_out", "sources": ["cat.png", "https://example.com/dog.png"],
             "step": {"action": "generate_image", "model": "image/bfl/flux-1-dev",
                      "prompt": "{{style}} shot {i}", "filename": "shot-{i}"}},
            {"action": "fan_out", "use_previous": true, "parallel": true,
             "step": {"action": "generate_video", "model": "video/kling/kling-2.5",
                      "prompt": "spin {i}", "duration": 5}},
        ]
    });
    let document = translated(&pipeline);
    assert_eq!(document["budget"], json!({"max_usd": 5}), "settings are passed on");
    let jobs = document["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 2, "one job per source: {jobs:?}");
    for (index, (job, source)) in
        jobs.iter().zip(["cat.png", "https://example.com/dog.png"]).enumerate()
    {
        let n = index + 1;
        assert_eq!(job["name"], json!(format!("shot-{n}")));
        assert_eq!(job["prompt"], json!(format!("cinematic shot {n}")));
        assert_eq!(job["params"]["image_url"], json!(source), "the source is the input");
        assert_eq!(job["then"][0]["prompt"], json!(format!("spin {n}")), "one result each");
        assert_eq!(job["then"][0]["params"], json!({"duration": 5}));
    }
}

#[test]
fn an_independent_step_starts_a_new_job() {
    let pipeline = json!({"steps": [
        {"action": "generate_image", "model": "bfl/flux-1-dev", "prompt": "a", "filename": "a"},
        {"action": "enhance", "image_url": "photo.png", "width": 2048, "height": 2048},
    ]});
    let jobs = translated(&pipeline)["jobs"].as_array().expect("jobs").clone();
    assert_eq!(jobs.len(), 2);
    assert_eq!(jobs[1]["model"], json!("enhance/topaz/standard-enhance"), "the default enhancer");
    assert_eq!(jobs[1]["params"]["image_url"], json!("photo.png"));
    assert!(jobs[1].get("prompt").is_none(), "an enhancer takes no prompt");
}

#[test]
fn a_fan_out_over_many_results_is_one_stage_without_numbering() {
    let pipeline = json!({"steps": [
        {"action": "generate_image", "model": "bfl/flux-1-dev", "prompt": "a", "batchSize": 4},
        {"action": "fan_out", "use_previous": true,
         "step": {"action": "enhance", "width": 2048, "height": 2048}},
    ]});
    let document = translated(&pipeline);
    assert_eq!(document["jobs"].as_array().map(Vec::len), Some(1));
    assert_eq!(document["jobs"][0]["then"][0]["model"], json!("enhance/topaz/standard-enhance"));
    assert_eq!(document["jobs"][0]["params"]["batch_size"], json!(4));
}

fn assert_refused(pipeline: &Value, step: &str, says: &[&str]) {
    let error = refused(pipeline);
    let at = error.step.as_ref().map(ToString::to_string);
    assert_eq!(at.as_deref(), Some(step), "{error:?}");
    for part in says {
        assert!(error.message.contains(part), "{part:?} missing from: {}", error.message);
    }
}

#[test]
fn a_step_that_would_drop_results_is_refused_with_the_fan_out_to_write() {
    let pipeline = json!({"steps": [
        {"action": "generate_image", "model": "bfl/flux-1-dev", "prompt": "a", "batchSize": 2},
        {"action": "enhance", "use_previous": true, "width": 2048, "height": 2048},
    ]});
    assert_refused(&pipeline, "step 2 (enhance)", &["has 2", "\"action\": \"fan_out\""]);
}

#[test]
fn numbering_results_that_fan_out_at_run_time_is_refused() {
    let pipeline = json!({"steps": [
        {"action": "generate_image", "model": "bfl/flux-1-dev", "prompt": "a", "batchSize": 3},
        {"action": "fan_out", "use_previous": true,
         "step": {"action": "generate_image", "model": "bfl/flux-1-dev", "prompt": "angle {i}"}},
    ]});
    assert_refused(&pipeline, "step 2 (fan_out)", &["{i}", "sources"]);
}

#[test]
fn an_undefined_variable_is_refused_naming_its_step() {
    let pipeline = json!({"variables": {"subject": "car"}, "steps": [
        {"action": "generate_image", "model": "bfl/flux-1-dev", "prompt": "a {{subject}}"},
        {"action": "generate_video", "use_previous": true, "model": "video/kling/kling-2.5",
         "prompt": "{{motion}}"},
    ]});
    assert_refused(&pipeline, "step 2 (generate_video)", &["{{motion}}", "\"variables\""]);
}

#[test]
fn unclear_steps_are_refused_with_what_to_write() {
    let cases = [
        (json!({"steps": [{"prompt": "a"}]}), "step 1 (?)", "no `action`"),
        (json!({"steps": [{"action": "paint"}]}), "step 1 (?)", "unknown action"),
        (
            json!({"steps": [{"action": "enhance", "use_previous": true}]}),
            "step 1 (enhance)",
            "first step",
        ),
        (
            json!({"steps": [{"action": "generate_image", "model": "flux-1-dev", "prompt": "a"}]}),
            "step 1 (generate_image)",
            "image/<provider>/flux-1-dev",
        ),
        (
            json!({"steps": [{"action": "generate_image", "model": "bfl/x"}]}),
            "step 1 (generate_image)",
            "no `prompt`",
        ),
        (
            json!({"steps": [{"action": "enhance", "image_url": "a.png", "width": 8}]}),
            "step 1 (enhance)",
            "\"width\": 4096, \"height\": 4096",
        ),
        (
            json!({"steps": [{"action": "fan_out", "step": {"action": "enhance"}}]}),
            "step 1 (fan_out)",
            "\"sources\"",
        ),
        (
            json!({"steps": [{"action": "fan_out", "sources": ["a.png"],
                              "step": {"action": "fan_out"}}]}),
            "step 1 (fan_out)",
            "two fan_out steps",
        ),
        (
            json!({"steps": [
                {"action": "generate_image", "model": "bfl/x", "prompt": "a"},
                {"action": "enhance", "use_previous": true, "imageUrl": "b.png"},
            ]}),
            "step 2 (enhance)",
            "remove one",
        ),
        (
            json!({"steps": [{"action": "generate_image", "model": "bfl/x", "prompt": "a",
                              "aspectRatio": "1:1", "aspect_ratio": "1:1"}]}),
            "step 1 (generate_image)",
            "written twice",
        ),
    ];
    for (pipeline, step, says) in cases {
        assert_refused(&pipeline, step, &[says]);
    }
}

#[test]
fn the_file_itself_is_checked() {
    for (pipeline, says) in [
        (json!({"steps": []}), "non-empty list"),
        (json!({"steps": [], "name": "x"}), "unknown top-level key \"name\""),
        (json!({"steps": [{"action": "enhance"}], "variables": [1]}), "`variables` is an object"),
    ] {
        let error = refused(&pipeline);
        assert_eq!(error.step, None);
        assert!(error.message.contains(says), "{says:?} missing from: {}", error.message);
    }
}

#[test]
fn camel_case_keys_become_snake_case() {
    for (camel, snake) in [
        ("imageUrl", "image_url"),
        ("startImage", "start_image"),
        ("aspectRatio", "aspect_ratio"),
        ("guidance_scale", "guidance_scale"),
        ("generateAudio", "generate_audio"),
    ] {
        assert_eq!(snake_case(camel), snake);
    }
}

#[test]
fn variables_fill_only_whole_names_and_leave_other_braces() {
    let variables = read_variables(Some(&json!({"a": "x", "n": 3}))).expect("variables");
    assert_eq!(fill("{{a}}-{{n}} {i} {{ a }} {{", &variables).as_deref(), Ok("x-3 {i} {{ a }} {{"));
}

#[test]
fn the_text_puts_each_job_on_its_own_line() {
    let pipeline = json!({"output": "renders", "steps": [
        {"action": "generate_image", "model": "bfl/x", "prompt": "a"},
        {"action": "generate_image", "model": "bfl/x", "prompt": "b"},
    ]});
    let translation = translate(&pipeline).expect("translates");
    let text = translation.text();
    let lines: Vec<&str> = text.lines().collect();
    let first = translation.first_job_line();
    assert!(lines[first - 1].contains("\"a\""), "{text}");
    assert!(lines[first].contains("\"b\""), "{text}");
    assert_eq!(lines[0], "\"output\": \"renders\"");
}

fn parse_text(text: &str) -> Result<crate::jobfile::JobFile, crate::jobfile::JobFileError> {
    crate::jobfile::parse(text.as_bytes(), std::path::Path::new("/p/pipeline.json"))
}

#[test]
fn a_pipeline_file_is_read_as_jobs_at_their_steps_lines() {
    let text = r#"{
  "variables": {"subject": "a red car"},
  "steps": [
    {"action": "generate_image", "model": "bfl/flux-1-dev", "prompt": "{{subject}}",
     "aspectRatio": "1:1", "filename": "car"},
    {"action": "fan_out",
     "sources": ["https://example.com/a.png", "https://example.com/b.png"],
     "step": {"action": "generate_video", "model": "video/kling/kling-2.5",
              "prompt": "spin {i}", "filename": "spin-{i}"}}
  ]
}"#;
    let file = parse_text(text).expect("parses");
    let jobs: Vec<_> = file.jobs.iter().map(|job| (job.name.as_str(), job.line)).collect();
    assert_eq!(jobs, [("car", 4), ("spin-1", 6), ("spin-2", 6)]);
    assert_eq!(file.jobs[0].model, "image/bfl/flux-1-dev");
    assert_eq!(file.jobs[0].body_map()["aspect_ratio"], json!("1:1"));
    assert_eq!(file.jobs[0].body_map()["prompt"], json!("a red car"));
    assert_eq!(file.jobs[2].body_map()["start_image"], json!("https://example.com/b.png"));
    assert_eq!(file.output_dir, std::path::Path::new("/p/out"));
}

#[test]
fn errors_of_the_job_file_reader_name_the_step_and_its_line() {
    let text = "{\"steps\": [\n  {\"action\": \"generate_image\", \"model\": \"bfl/flux-1-dev\", \
                \"prompt\": \"a\"},\n  {\"action\": \"generate_image\", \"model\": \"bfl/Flux\", \
                \"prompt\": \"b\"}\n]}";
    let error = parse_text(text).expect_err("an upper-case model path");
    assert_eq!(error.line, Some(3), "{error}");
    assert_eq!(error.key.as_deref(), Some("step 2 (generate_image) model"), "{error}");
    let error =
        parse_text("{\"steps\": [\n{\"action\": \"generate_video\", \"prompt\": \"a\"}, \n{\"action\": \"x\"}]}")
            .expect_err("unknown action");
    assert_eq!((error.line, error.key.as_deref()), (Some(3), Some("step 2 (?)")), "{error}");
}

#[test]
fn a_pipeline_in_yaml_is_refused_with_what_to_write() {
    let error = parse_text("output: out\nsteps:\n  - action: generate_image\n")
        .expect_err("YAML pipelines are not read");
    assert_eq!(error.line, Some(2), "{error}");
    assert!(error.message.contains("as JSON"), "{error}");
}

#[test]
fn a_job_file_in_json_is_still_a_job_file() {
    let file = parse_text(r#"{"model": "bfl/flux-1-dev", "jobs": [{"prompt": "a"}]}"#);
    assert_eq!(file.expect("parses").jobs.len(), 1);
}

#[test]
fn huge_result_counts_do_not_overflow() {
    let huge = u64::MAX / 2;
    let pipeline = json!({"steps": [
        {"action": "generate_image", "model": "bfl/x", "prompt": "a", "batchSize": huge},
        {"action": "fan_out", "use_previous": true,
         "step": {"action": "generate_image", "model": "bfl/x", "prompt": "b", "batchSize": 4}},
        {"action": "enhance", "use_previous": true},
    ]});
    assert_refused(&pipeline, "step 3 (enhance)", &[&format!("has {}", u64::MAX)]);
}

#[test]
fn step_offsets_skip_strings_and_nested_lists() {
    let text = r#"{"variables": {"steps": "[x]"}, "note\"steps": [1],
 "steps": [ {"prompt": "a \"[,]\" b", "sources": [1, 2]},
   {"action": "x"} ]}"#;
    let offsets = step_offsets(text);
    let starts: Vec<&str> = offsets.iter().map(|at| &text[*at..*at + 3]).collect();
    assert_eq!(starts, [r#"{"p"#, r#"{"a"#]);
    assert!(step_offsets(r#"{"steps": []}"#).is_empty());
}

#[test]
fn a_pipeline_that_translates_past_the_size_limit_says_so() {
    let sources: Vec<String> =
        (0..60_000).map(|i| format!("https://example.com/a-long-folder-name/{i}.png")).collect();
    let pipeline = json!({"steps": [{"action": "fan_out", "sources": sources,
        "step": {"action": "generate_image", "model": "bfl/flux-1-dev",
                 "prompt": "a fairly long prompt describing picture {i} in some detail"}}]});
    let text = pipeline.to_string();
    assert!(text.len() < 8 << 20, "the pipeline itself is under the limit");
    let error = parse_text(&text).expect_err("too large once translated");
    assert!(error.message.contains("this pipeline makes 60000 jobs"), "{error}");
}
