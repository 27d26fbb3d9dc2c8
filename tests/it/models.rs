//! `krea-batch models`: the models of the API's OpenAPI document as text and JSON, one model's
//! fields, a typo answered with the closest model, and the per-user cache used offline.

use crate::support::{Run, Sim, krea_batch};
use serde_json::Value;

/// `krea-batch models ARGS` with `XDG_CACHE_HOME` set to `cache`.
fn models(cache: &std::path::Path, args: &[&str]) -> Run {
    let mut command = krea_batch();
    command.arg("models").args(args).env("XDG_CACHE_HOME", cache);
    Run::of(&command.output().expect("models runs"))
}

#[test]
fn models_lists_the_simulations_models_as_text_and_json() {
    let cache = tempfile::tempdir().expect("cache");
    let text = models(cache.path(), &["--simulate"]);
    text.expect_code(0);
    assert!(text.stdout.starts_with("6 models in the built-in simulation"), "{}", text.stdout);
    let flux = text.stdout.lines().find(|line| line.starts_with("image/bfl/flux-1-dev"));
    let flux = flux.unwrap_or_else(|| panic!("flux listed: {}", text.stdout));
    for column in ["image", "prompt", "$0.007"] {
        assert!(flux.contains(column), "{column} in {flux:?}");
    }

    let json = models(cache.path(), &["--simulate", "--json"]);
    json.expect_code(0);
    let list: Value = serde_json::from_str(&json.stdout).expect("JSON");
    let all = list["models"].as_array().expect("models");
    assert_eq!(all.len(), 6, "{list}");
    let topaz = all.iter().find(|m| m["path"] == "enhance/topaz/standard-enhance").expect("topaz");
    assert_eq!(topaz["kind"], "enhance");
    assert!(topaz["required"].as_array().expect("list").contains(&Value::from("image_url")));
    let flux = all.iter().find(|m| m["path"] == "image/bfl/flux-1-dev").expect("flux");
    assert_eq!(flux["price_usd"], 0.007);
}

#[test]
fn one_model_shows_its_fields_and_a_typo_gets_the_closest_model() {
    let cache = tempfile::tempdir().expect("cache");
    let one = models(cache.path(), &["--simulate", "image/bfl/flux-1-dev"]);
    one.expect_code(0);
    let width = one.stdout.lines().find(|line| line.trim_start().starts_with("width:"));
    let width = width.unwrap_or_else(|| panic!("width listed: {}", one.stdout));
    assert!(width.contains("number") && width.contains("2368") && width.contains("default 1024"));

    let json = models(cache.path(), &["--simulate", "--json", "video/kling/kling-2.5"]);
    json.expect_code(0);
    let detail: Value = serde_json::from_str(&json.stdout).expect("JSON");
    let duration =
        detail["fields"].as_array().expect("fields").iter().find(|f| f["name"] == "duration");
    let duration = duration.expect("duration");
    assert_eq!(duration["default"], "5");
    assert!(duration["type"].as_str().is_some_and(|ty| ty.contains('5') && ty.contains("10")));

    let typo = models(cache.path(), &["--simulate", "image/bfl/flux-dev"]);
    typo.expect_code(2);
    assert!(typo.stderr.contains("did you mean image/bfl/flux-1-dev?"), "{}", typo.stderr);
}

#[test]
fn offline_models_reads_the_per_user_cache_and_explains_when_there_is_none() {
    let cache = tempfile::tempdir().expect("cache");
    let sim = Sim::start(|_| {});
    let base = sim.url();
    models(cache.path(), &["--api-base", &base]).expect_code(0);
    drop(sim);
    let offline = models(cache.path(), &["--offline", "--api-base", &base]);
    offline.expect_code(0);
    assert!(offline.stdout.contains("(cached)"), "{}", offline.stdout);

    let empty = tempfile::tempdir().expect("empty cache");
    let none = models(empty.path(), &["--offline", "--api-base", &base]);
    none.expect_code(2);
    assert!(none.stderr.contains("no OpenAPI document"), "{}", none.stderr);
    assert!(none.stderr.contains("--openapi FILE"), "what to do: {}", none.stderr);
}
