//! The gallery in a real browser: headless Chromium (Debian's `chromium` package) opens a
//! finished batch's `index.html`, takes a screenshot, and its network log must show no request
//! made by the page. Run by hand, since CI does not install a browser:
//!
//! ```sh
//! apt install chromium
//! cargo test --test it gallery -- --ignored --nocapture
//! ```
//!
//! The screenshot is left at `target/gallery-screenshot.png` for a person to look at.

use crate::support::{Sim, Workspace};
use std::path::Path;
use std::process::Command;

#[test]
#[ignore = "needs Debian's chromium: cargo test --test it gallery -- --ignored"]
fn the_gallery_renders_in_chromium_without_a_request_of_its_own() {
    let sim = Sim::start(|_| {});
    let work = Workspace::with_jobs(
        "  - {name: fox, prompt: a red fox in fresh snow, count: 3}\n  \
         - {name: lighthouse, prompt: \"a lighthouse at dusk, <b>oil</b> painting\", params: {seed: 7}}\n  \
         - {name: clip, prompt: a wave breaking, model: video/kling/kling-2.5, params: {duration: 5}}\n  \
         - {name: refused, prompt: \"[nsfw] a refused prompt\"}\n",
    );
    work.run(&sim, &["--no-validate"]).expect_code(1);
    let page = work.out().join("index.html");
    assert!(page.is_file());

    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let screenshot = target.join("gallery-screenshot.png");
    let netlog = work.dir.path().join("netlog.json");
    let profile = tempfile::tempdir().expect("profile");
    let status = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1200,1300",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--log-net-log={}", netlog.display()))
        .arg(format!("--screenshot={}", screenshot.display()))
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("chromium runs (apt install chromium)");
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let png = std::fs::read(&screenshot).expect("screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "a real screenshot: {} bytes",
        png.len()
    );

    // Chromium's own background requests have no origin; a request made by the page would
    // carry the page's (a file's origin shows as "null").
    let log: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&netlog).expect("net log")).expect("JSON net log");
    let start_job =
        log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"].as_u64().expect("event type");
    let by_page: Vec<&str> = log["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|event| event["type"].as_u64() == Some(start_job))
        .filter(|event| event["params"]["initiator"].as_str() != Some("not an origin"))
        .filter_map(|event| event["params"]["url"].as_str())
        .collect();
    assert!(by_page.is_empty(), "the page requested {by_page:?}");
    eprintln!("screenshot: {}", screenshot.display());
}
