//! HTTP-level tests: a real `SimServer` on loopback, driven by reqwest on the real clock with
//! short job times. Conditions are polled with a deadline, never waited for with a bare sleep.

use super::*;
use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::future::Future;
use std::time::Duration;

const FLUX: &str = "image/bfl/flux-1-dev";

fn quick(config: SimConfig) -> SimConfig {
    SimConfig { job_time: Duration::from_millis(100), ..config }
}

struct Harness {
    server: SimServer,
    client: Client,
}

impl Harness {
    async fn start(config: SimConfig) -> Self {
        let server = SimServer::start(config).await.expect("binds loopback");
        let client = Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client builds");
        Self { server, client }
    }

    async fn post(&self, path: &str, body: &Value) -> Response {
        self.client
            .post(format!("{}{path}", self.server.base_url()))
            .bearer_auth(self.server.api_key())
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("request answered")
    }

    async fn generate(&self, prompt: &str) -> Response {
        self.post(&format!("/generate/{FLUX}"), &json!({ "prompt": prompt })).await
    }

    async fn get(&self, path: &str) -> Response {
        self.client
            .get(format!("{}{path}", self.server.base_url()))
            .bearer_auth(self.server.api_key())
            .send()
            .await
            .expect("request answered")
    }

    async fn job_until(&self, id: &str, status: &str) -> Value {
        let path = format!("/jobs/{id}");
        poll(|| async {
            let job = body(self.get(&path).await).await;
            (job["status"] == status).then_some(job)
        })
        .await
    }
}

async fn body(response: Response) -> Value {
    let bytes = response.bytes().await.expect("whole body");
    serde_json::from_slice(&bytes).expect("JSON body")
}

/// Polls `check` until it yields a value, failing after five seconds.
async fn poll<T, F, Fut>(mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "condition not met in time");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_job_completes_and_its_file_downloads_whole() {
    let sim =
        Harness::start(quick(SimConfig { result_bytes: 300_000, ..SimConfig::default() })).await;
    let created = sim.generate("a lighthouse").await;
    assert_eq!(created.status(), StatusCode::OK);
    let created = body(created).await;
    assert_eq!(created["status"], "queued");
    assert!(created["result"].is_null() && created["completed_at"].is_null());
    let id = created["job_id"].as_str().expect("job id").to_owned();

    let done = sim.job_until(&id, "completed").await;
    let url = done["result"]["urls"][0].as_str().expect("a result URL").to_owned();
    assert!(url.starts_with(&sim.server.files_base_url()));
    let download = sim.client.get(&url).send().await.expect("served");
    assert_eq!(download.status(), StatusCode::OK);
    assert_eq!(download.headers()["content-type"], "image/png");
    assert_eq!(download.headers()["content-length"], "300000");
    let bytes = download.bytes().await.expect("whole file");
    assert_eq!(bytes[..8], png::SIGNATURE);

    let stats = poll(|| async {
        let stats = sim.server.stats();
        stats.served_files.contains_key(&url).then_some(stats)
    })
    .await;
    let served = &stats.served_files[&url];
    assert_eq!(served.sha256, stats::hex(&Sha256::digest(&bytes)));
    assert_eq!(served.len, 300_000);
    assert_eq!(stats.auth_header_on_file_host, 0);
    assert_eq!(stats.creations_by_prompt["a lighthouse"], 1);
    assert!((stats.spent_usd - 0.007).abs() < 1e-9);
    assert!(stats.jobs[0].charged);
    sim.server.shutdown().await;
}

#[tokio::test]
async fn requests_are_checked_like_krea_does() {
    let mut sunset = std::collections::BTreeMap::new();
    sunset.insert("image/bfl/flux-1-schnell".to_owned(), SunsetNotice::default());
    let sim = Harness::start(SimConfig {
        forbidden_models: vec!["image/krea/krea-2/large".to_owned()],
        plan_required_models: vec!["image/krea/krea-2/medium".to_owned()],
        sunset_models: sunset,
        deprecated_models: vec![FLUX.to_owned()],
        zero_data_retention: true,
        ..SimConfig::default()
    })
    .await;
    let url = format!("{}/generate/{FLUX}", sim.server.base_url());
    let anonymous = sim.client.post(&url).body("{}").send().await.expect("answered");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(body(anonymous).await, json!({"error": "Unauthorized"}));
    let wrong = sim.client.post(&url).bearer_auth("nope").send().await.expect("answered");
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);

    let typo = sim.post(&format!("/generate/{FLUX}"), &json!({"prompt": "x", "stpes": 3})).await;
    assert_eq!(typo.status(), StatusCode::BAD_REQUEST);
    assert!(typo.headers().contains_key("deprecation") && typo.headers().contains_key("sunset"));
    assert!(body(typo).await["error"].as_str().is_some_and(|e| e.contains("'stpes'")));
    let zdr = sim
        .post(&format!("/generate/{FLUX}"), &json!({"prompt": "x", "image_url": "https://a/b.png"}))
        .await;
    assert_eq!(zdr.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let unknown = sim.post("/generate/image/acme/nothing", &json!({"prompt": "x"})).await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let forbidden = sim.post("/generate/image/krea/krea-2/large", &json!({"prompt": "x"})).await;
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
    let plan = sim.post("/generate/image/krea/krea-2/medium", &json!({"prompt": "x"})).await;
    assert_eq!(plan.status(), StatusCode::PAYMENT_REQUIRED);
    let said = body(plan).await["error"].as_str().unwrap_or_default().to_owned();
    // Words of a plan and none of a balance: what a client reads as a plan refusal.
    assert!(said.contains("requires a higher plan") && !said.contains("balance"), "{said}");
    let gone = sim.post("/generate/image/bfl/flux-1-schnell", &json!({"prompt": "x"})).await;
    assert_eq!(gone.status(), StatusCode::GONE);
    assert_eq!(body(gone).await["error"], "model_unavailable");
    assert_eq!(sim.get("/jobs/no-such-job").await.status(), StatusCode::NOT_FOUND);

    let document = sim.client.get(format!("{}/openapi.json", sim.server.base_url())).send().await;
    let document = body(document.expect("served without a key")).await;
    assert_eq!(document["openapi"], "3.1.0");
    assert!(document["paths"][format!("/generate/{FLUX}")].is_object());
    assert_eq!(sim.server.stats().jobs_created, 0);
}

#[tokio::test]
async fn a_402_stops_creation_and_later_posts_are_counted_until_a_top_up() {
    let sim = Harness::start(SimConfig {
        balance_usd: 0.01,
        job_time: Duration::ZERO,
        ..SimConfig::default()
    })
    .await;
    assert_eq!(sim.generate("one").await.status(), StatusCode::OK);
    let refused = sim.generate("two").await;
    assert_eq!(refused.status(), StatusCode::PAYMENT_REQUIRED);
    assert!(body(refused).await["message"].as_str().is_some_and(|m| m.contains("top up")));
    assert_eq!(sim.generate("three").await.status(), StatusCode::PAYMENT_REQUIRED);
    assert_eq!(sim.server.stats().posts_after_402, 1);

    let top_up = sim.post("/_sim/balance", &json!({"usd": 1.0})).await;
    assert_eq!(top_up.status(), StatusCode::OK);
    assert_eq!(sim.generate("four").await.status(), StatusCode::OK);
    let stats = sim.server.stats();
    assert_eq!((stats.posts_after_402, stats.responses_402, stats.jobs_created), (1, 2, 2));
    assert!((stats.balance_usd - 0.993).abs() < 1e-9, "{}", stats.balance_usd);
}

#[tokio::test]
async fn the_backlog_fills_then_429_and_cancel_frees_a_slot() {
    let sim = Harness::start(SimConfig {
        concurrency: 1,
        backlog: 1,
        job_time: Duration::from_secs(30),
        retry_after_secs: Some(7),
        ..SimConfig::default()
    })
    .await;
    let first = body(sim.generate("first").await).await;
    let second = body(sim.generate("second").await).await;
    assert_eq!(second["status"], "backlogged");
    let refused = sim.generate("third").await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers()["retry-after"], "7");

    let id = first["job_id"].as_str().expect("id");
    let url = format!("{}/jobs/{id}", sim.server.base_url());
    let cancel = sim.client.delete(&url).bearer_auth(sim.server.api_key()).send().await;
    let cancel = cancel.expect("answered");
    assert_eq!(cancel.status(), StatusCode::OK);
    assert!(cancel.bytes().await.expect("body").is_empty());
    let again = sim.client.delete(&url).bearer_auth(sim.server.api_key()).send().await;
    assert_eq!(again.expect("answered").status(), StatusCode::NOT_FOUND);

    let page = body(sim.get("/jobs?limit=1").await).await;
    assert_eq!(page["items"][0]["job_id"], second["job_id"]);
    assert_eq!(page["items"][0]["status"], "queued");
    let cursor = page["next_cursor"].as_str().expect("more pages").replace(':', "%3A");
    let rest = body(sim.get(&format!("/jobs?limit=1&cursor={cursor}")).await).await;
    assert_eq!(rest["items"][0]["status"], "cancelled");
    assert!(rest["next_cursor"].is_null());
    assert_eq!(sim.get("/jobs?limit=0").await.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn dropped_posts_create_jobs_and_resets_do_not() {
    let faults = Faults { post_drop_rate: 1.0, ..Faults::default() };
    let sim = Harness::start(quick(SimConfig { faults, ..SimConfig::default() })).await;
    let url = format!("{}/generate/{FLUX}", sim.server.base_url());
    let lost = sim
        .client
        .post(&url)
        .bearer_auth(sim.server.api_key())
        .body(r#"{"prompt": "lost"}"#)
        .send()
        .await;
    assert!(lost.is_err(), "the connection closes without an answer");
    let listed = body(sim.get("/jobs").await).await;
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(1), "the job exists all the same");

    let resets = Faults { reset_rate: 1.0, ..Faults::default() };
    let set = sim.post("/_sim/faults", &serde_json::to_value(&resets).expect("serialisable")).await;
    assert_eq!(set.status(), StatusCode::OK);
    let reset = sim
        .client
        .post(&url)
        .bearer_auth(sim.server.api_key())
        .body(r#"{"prompt": "reset"}"#)
        .send()
        .await;
    assert!(reset.is_err());
    sim.server.set_faults(Faults::default());
    let stats = sim.server.stats();
    assert_eq!((stats.jobs_created, stats.dropped_connections), (1, 2));
    assert_eq!(stats.creations_by_prompt.get("reset"), None);
}

#[tokio::test]
async fn slow_answers_outlast_a_read_timeout_but_still_create() {
    let faults =
        Faults { slow_rate: 1.0, slow_delay: Duration::from_millis(400), ..Faults::default() };
    let sim = Harness::start(quick(SimConfig { faults, ..SimConfig::default() })).await;
    let url = format!("{}/generate/{FLUX}", sim.server.base_url());
    let request =
        sim.client.post(&url).bearer_auth(sim.server.api_key()).body(r#"{"prompt": "slow"}"#);
    let timed_out = request.timeout(Duration::from_millis(100)).send().await;
    assert!(timed_out.is_err_and(|err| err.is_timeout()));
    assert_eq!(sim.server.stats().creations_by_prompt["slow"], 1);
}

#[tokio::test]
async fn gets_can_be_garbled_huge_or_stormed() {
    let faults = Faults { malformed_json_rate: 1.0, ..Faults::default() };
    let sim = Harness::start(quick(SimConfig { faults, ..SimConfig::default() })).await;
    let garbled = sim.get("/jobs").await.bytes().await.expect("body");
    assert!(serde_json::from_slice::<Value>(&garbled).is_err());

    sim.server.set_faults(Faults {
        huge_body_rate: 1.0,
        huge_body_bytes: 3_000_000,
        ..Faults::default()
    });
    let huge = sim.get("/jobs").await;
    assert!(huge.headers().get("content-length").is_none(), "streamed, length unannounced");
    assert_eq!(huge.bytes().await.expect("body").len(), 3_000_000);

    let storm =
        Storm { rate: 1.0, duration: Duration::from_millis(300), retry_after_secs: Some(2) };
    sim.server.set_faults(Faults { storm: Some(storm), ..Faults::default() });
    let stormed = sim.get("/jobs").await;
    assert_eq!(stormed.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(stormed.headers()["retry-after"], "2");
    poll(|| async { (sim.get("/jobs").await.status() == StatusCode::OK).then_some(()) }).await;
}

#[tokio::test]
async fn download_faults_redirect_cut_and_fail() {
    let sim = Harness::start(SimConfig { job_time: Duration::ZERO, ..SimConfig::default() }).await;
    let id = body(sim.generate("files").await).await["job_id"].as_str().expect("id").to_owned();
    let job = sim.job_until(&id, "completed").await;
    let url = job["result"]["urls"][0].as_str().expect("url").to_owned();
    let path = url.trim_start_matches(&sim.server.files_base_url()).to_owned();
    let location = |response: &Response| {
        response.headers().get("location").and_then(|l| l.to_str().ok()).map(str::to_owned)
    };

    let cases = [
        (
            Faults { redirect_other_origin_rate: 1.0, ..Faults::default() },
            format!("{}{path}", sim.server.redirect_base_url()),
        ),
        (
            Faults { redirect_api_origin_rate: 1.0, ..Faults::default() },
            format!("{}{path}", sim.server.base_url()),
        ),
        (
            Faults { redirect_insecure_rate: 1.0, ..Faults::default() },
            format!("http://192.0.2.1{path}"),
        ),
        (Faults { redirect_loop_rate: 1.0, ..Faults::default() }, format!("{url}?loop=1")),
    ];
    for (faults, expected) in cases {
        sim.server.set_faults(faults);
        let response = sim.client.get(&url).send().await.expect("answered");
        assert_eq!(response.status(), StatusCode::FOUND);
        assert_eq!(location(&response), Some(expected.clone()));
        if !expected.starts_with("http://192.0.2.1") && !expected.contains("loop") {
            let followed = sim.client.get(&expected).send().await.expect("served");
            assert_eq!(followed.headers()["content-type"], "image/png");
        }
    }
    let looped = sim.client.get(format!("{url}?loop=1")).send().await.expect("answered");
    assert_eq!(location(&looped), Some(format!("{url}?loop=2")));

    sim.server.set_faults(Faults { download_error_rate: 1.0, ..Faults::default() });
    assert_eq!(
        sim.client.get(&url).send().await.expect("answered").status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    sim.server.set_faults(Faults { download_truncate_rate: 1.0, ..Faults::default() });
    let cut = sim.client.get(&url).send().await.expect("headers arrive");
    assert!(cut.bytes().await.is_err(), "the body ends short of its Content-Length");

    sim.server.set_faults(Faults::default());
    let with_key = sim.client.get(&url).bearer_auth(sim.server.api_key()).send().await;
    assert_eq!(with_key.expect("served").status(), StatusCode::OK);
    let stats = sim.server.stats();
    assert_eq!(stats.auth_header_on_file_host, 1);
    assert_eq!(stats.responses_5xx, 1);
}

#[tokio::test]
async fn control_endpoints_need_the_key_and_report_stats() {
    let sim = Harness::start(quick(SimConfig::default())).await;
    sim.generate("counted").await;
    let url = format!("{}/_sim/stats", sim.server.base_url());
    let anonymous = sim.client.get(&url).send().await.expect("answered");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let stats: SimStats =
        serde_json::from_value(body(sim.get("/_sim/stats").await).await).expect("SimStats");
    assert_eq!(stats.creations_by_prompt["counted"], 1);
    assert_eq!(stats.requests.len(), 1, "control requests are not recorded");
    assert!(stats.requests[0].authorization);
    let bad = sim.post("/_sim/faults", &json!({"no_such_fault": 1})).await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_world_kept_in_a_file_is_taken_up_again_with_its_jobs_ids_balance_and_ports() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("out-simulated/.krea-batch-sim.json");
    let config = || quick(SimConfig { balance_usd: 0.014, ..SimConfig::default() });
    let server = SimServer::start_with_world(config(), &path).await.expect("starts");
    let world_id = server.world_id().expect("a persistent world").to_owned();
    let mut harness = Harness { server, client: Client::new() };
    let done = body(harness.generate("kept done").await).await;
    // A job that is still running when the simulation stops runs on meanwhile.
    let running = body(harness.generate("kept [stuck]").await).await;
    assert_eq!(harness.generate("one too many").await.status(), StatusCode::PAYMENT_REQUIRED);
    let done_id = done["job_id"].as_str().expect("id").to_owned();
    let done_job = harness.job_until(&done_id, "completed").await;
    let url = done_job["result"]["urls"][0].as_str().expect("url").to_owned();
    let (base, files) = (harness.server.base_url(), harness.server.files_base_url());
    assert!(
        matches!(SimServer::start_with_world(config(), &path).await, Err(SimError::World(_))),
        "one simulation per world"
    );
    harness.server.shutdown().await;

    let server = SimServer::start_with_world(config(), &path).await.expect("starts again");
    assert_eq!(server.world_id(), Some(world_id.as_str()), "the same world");
    assert_eq!((server.base_url(), server.files_base_url()), (base, files), "the same ports");
    harness.server = server;
    let again = body(harness.get(&format!("/jobs/{done_id}")).await).await;
    assert_eq!(again["status"], "completed");
    assert_eq!(again["result"]["urls"][0], url.as_str(), "the result URL still holds");
    let file = harness.client.get(&url).send().await.expect("served");
    assert_eq!(file.status(), StatusCode::OK, "the recorded URL downloads");
    let stuck = running["job_id"].as_str().expect("id");
    assert_eq!(body(harness.get(&format!("/jobs/{stuck}")).await).await["status"], "processing");
    let stats = harness.server.stats();
    assert_eq!(stats.jobs_created, 2);
    assert!((stats.balance_usd - 0.007).abs() < 1e-9, "charged once: {}", stats.balance_usd);
    // The balance is the world's, not the config's; a top-up adds to it.
    assert_eq!(harness.generate("still too many").await.status(), StatusCode::PAYMENT_REQUIRED);
    let topped = body(harness.post("/_sim/top-up", &json!({"usd": 1})).await).await;
    assert!((topped["balance_usd"].as_f64().expect("number") - 1.007).abs() < 1e-9, "{topped}");
    assert_eq!(harness.generate("after the top-up").await.status(), StatusCode::OK);
    let bad = harness.post("/_sim/top-up", &json!({"usd": -1})).await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    harness.server.shutdown().await;

    // Offline, a top-up goes into the file (counting the charge of the job still running).
    let topped = top_up_file(&path, 2.0).expect("topped up");
    let FileTopUp::Saved { balance_usd, .. } = topped else { panic!("{topped:?}") };
    assert!((balance_usd - 3.0).abs() < 1e-9, "{balance_usd}");
}

#[tokio::test]
async fn two_simulations_with_the_same_seed_hand_out_different_ids() {
    let first = Harness::start(quick(SimConfig::default())).await;
    let second = Harness::start(quick(SimConfig::default())).await;
    let a = body(first.generate("same seed").await).await;
    let b = body(second.generate("same seed").await).await;
    let (a, b) = (a["job_id"].as_str().expect("id"), b["job_id"].as_str().expect("id"));
    assert_ne!(a, b, "ids come from the system's randomness, not the seed");
    assert_eq!(a.len(), 36);
    assert_eq!(&a[14..15], "4", "a version-4 UUID: {a}");
}

#[tokio::test]
async fn the_hostile_reuse_job_ids_hands_out_the_first_id_again() {
    let harness =
        Harness::start(quick(SimConfig { reuse_job_ids: true, ..SimConfig::default() })).await;
    let a = body(harness.generate("first").await).await;
    let b = body(harness.generate("second").await).await;
    assert_eq!(a["job_id"], b["job_id"]);
    assert_eq!(harness.server.stats().jobs_created, 2, "both were created");
}

#[tokio::test]
async fn post_latency_holds_each_answer_on_its_own_connection() {
    let held = Harness::start(SimConfig {
        post_latency: Duration::from_hours(1),
        job_time: Duration::from_hours(1),
        ..SimConfig::default()
    })
    .await;
    let url = format!("{}/generate/{FLUX}", held.server.base_url());
    let posts: Vec<_> = ["first", "second"]
        .into_iter()
        .map(|prompt| {
            let request = held
                .client
                .post(&url)
                .bearer_auth(held.server.api_key())
                .body(json!({ "prompt": prompt }).to_string());
            tokio::spawn(request.send())
        })
        .collect();
    // Both jobs exist while neither answer has come: one held POST does not hold up the next.
    poll(|| async { (held.server.jobs().len() == 2).then_some(()) }).await;
    assert!(posts.iter().all(|post| !post.is_finished()), "the answers are held back");
    let listed = body(held.get("/jobs").await).await;
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(2), "a GET is answered meanwhile");
    for post in posts {
        post.abort();
    }
    held.server.shutdown().await;

    let short = Harness::start(quick(SimConfig {
        post_latency: Duration::from_millis(30),
        ..SimConfig::default()
    }))
    .await;
    let answered = short.generate("answered").await;
    assert_eq!(answered.status(), StatusCode::OK);
    let id = body(answered).await["job_id"].as_str().expect("a job id").to_owned();
    assert_eq!(short.server.jobs()[0].id, id);
}

#[tokio::test]
async fn the_request_rate_limit_answers_its_own_429_with_retry_after() {
    let sim = Harness::start(SimConfig {
        concurrency: 1,
        backlog: 0,
        job_time: Duration::from_hours(1),
        post_rate_limit: Some(RateLimit { requests: 2, per: Duration::from_hours(1) }),
        ..SimConfig::default()
    })
    .await;
    assert_eq!(sim.generate("one").await.status(), StatusCode::OK);
    // The second POST passes the rate limit and meets the concurrency limit.
    let full = sim.generate("two").await;
    assert_eq!(full.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(full.headers().get("retry-after").is_none(), "Krea documents none on this one");
    let full = body(full).await["error"].as_str().expect("a message").to_owned();
    assert!(full.contains("maximum number of concurrent jobs"), "{full}");
    let fast = sim.generate("three").await;
    assert_eq!(fast.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = fast.headers()["retry-after"]
        .to_str()
        .ok()
        .and_then(|text| text.parse().ok())
        .expect("Retry-After in seconds");
    assert!((1..=3600).contains(&retry_after), "{retry_after}");
    let fast = body(fast).await["error"].as_str().expect("a message").to_owned();
    assert_eq!(fast, RATE_LIMIT_MESSAGE);
    assert!(!fast.contains("concurrent"), "told apart from the concurrency 429 by its text");
    assert_eq!(sim.get("/jobs").await.status(), StatusCode::OK, "GETs are not rate limited");
    assert_eq!(sim.server.jobs().len(), 1);
}

#[tokio::test]
async fn every_job_is_reported_with_the_prompt_that_created_it() {
    let sim = Harness::start(quick(SimConfig::default())).await;
    let mut created = Vec::new();
    for prompt in ["a fox", "a heron", "a fox"] {
        let job = body(sim.generate(prompt).await).await;
        created.push((job["job_id"].as_str().expect("id").to_owned(), prompt.to_owned()));
    }
    let listed = body(sim.get("/_sim/jobs").await).await;
    let listed: Vec<(String, String)> = listed["jobs"]
        .as_array()
        .expect("a list of jobs")
        .iter()
        .map(|job| {
            let text = |key: &str| job[key].as_str().expect("a string").to_owned();
            (text("id"), text("prompt"))
        })
        .collect();
    assert_eq!(listed, created, "oldest first, each id with its own prompt");
    let in_process: Vec<_> =
        sim.server.jobs().into_iter().map(|job| (job.id, job.prompt)).collect();
    assert_eq!(in_process, created);
    let anonymous = sim.client.get(format!("{}/_sim/jobs", sim.server.base_url())).send().await;
    assert_eq!(anonymous.expect("answered").status(), StatusCode::UNAUTHORIZED);
}

impl Harness {
    async fn upload(&self, bytes: &[u8], content_type: &str, description: &str) -> Response {
        let mut form = Vec::new();
        form.extend_from_slice(
            b"--b0und\r\nContent-Disposition: form-data; name=\"description\"\r\n\r\n",
        );
        form.extend_from_slice(description.as_bytes());
        form.extend_from_slice(
            b"\r\n--b0und\r\nContent-Disposition: form-data; name=\"file\"; filename=\"cat\"\r\n",
        );
        form.extend_from_slice(format!("Content-Type: {content_type}\r\n\r\n").as_bytes());
        form.extend_from_slice(bytes);
        form.extend_from_slice(b"\r\n--b0und--\r\n");
        self.client
            .post(format!("{}/assets", self.server.base_url()))
            .bearer_auth(self.server.api_key())
            .header("content-type", "multipart/form-data; boundary=b0und")
            .body(form)
            .send()
            .await
            .expect("request answered")
    }
}

/// Uploads are listed with their description, their file is served only at the URL the upload
/// returned, and a job takes as input only the account's own assets and results or `data:`
/// URLs; anything else is a 400 naming the field, as Krea refuses what it cannot fetch.
#[tokio::test]
async fn uploads_are_listed_served_and_the_only_foreign_inputs_accepted() {
    let sim = Harness::start(quick(SimConfig::default())).await;
    let head = picture::Picture::default().png_head("a cat", "upload", 0, false, &[7; 32]);
    let png = files::FileLayout::png(head, 0).collect();
    let uploaded = sim.upload(&png, "image/png", "sha256:abc").await;
    assert_eq!(uploaded.status(), StatusCode::OK);
    let asset = body(uploaded).await;
    let url = asset["image_url"].as_str().expect("an image_url").to_owned();
    assert!(url.starts_with(&sim.server.files_base_url()), "{url}");
    assert_eq!(asset["size_bytes"], png.len());
    assert_eq!(asset["mime_type"], "image/png");
    let listed = body(sim.get("/assets?limit=10").await).await;
    assert_eq!(listed["items"][0]["description"], "sha256:abc");
    assert_eq!(listed["items"][0]["image_url"], url.as_str());
    assert_eq!(listed["next_cursor"], Value::Null);
    let served = sim.client.get(&url).send().await.expect("answered");
    assert_eq!(served.status(), StatusCode::OK);
    assert_eq!(&served.bytes().await.expect("body")[..], &png[..]);
    let elsewhere = url.replace(&sim.server.files_base_url(), &sim.server.base_url());
    let elsewhere = sim.client.get(&elsewhere).bearer_auth(sim.server.api_key()).send().await;
    assert_eq!(elsewhere.expect("answered").status(), StatusCode::NOT_FOUND, "only at its URL");
    let text = sim.upload(b"hello", "text/plain", "").await;
    assert_eq!(text.status(), StatusCode::BAD_REQUEST);

    let with = |image: &str| json!({"prompt": "x", "image_url": image});
    let own = sim.post(&format!("/generate/{FLUX}"), &with(&url)).await;
    assert_eq!(own.status(), StatusCode::OK);
    let job = body(own).await;
    let job_id = job["job_id"].as_str().expect("an id").to_owned();
    let done = sim.job_until(&job_id, "completed").await;
    let result = done["result"]["urls"][0].as_str().expect("a result URL").to_owned();
    let chained = sim.post(&format!("/generate/{FLUX}"), &with(&result)).await;
    assert_eq!(chained.status(), StatusCode::OK, "a result of its own is an input");
    let data = sim.post(&format!("/generate/{FLUX}"), &with("data:image/png;base64,AA")).await;
    assert_eq!(data.status(), StatusCode::OK);
    for foreign in [
        "./cat.png".to_owned(),
        "https://example.com/cat.png".to_owned(),
        format!("{}/assets/not-an-asset.png", sim.server.files_base_url()),
        format!("{}/results/not-a-job/0.png", sim.server.files_base_url()),
    ] {
        let refused = sim.post(&format!("/generate/{FLUX}"), &with(&foreign)).await;
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "{foreign}");
        let message = body(refused).await["error"].as_str().unwrap_or_default().to_owned();
        assert!(message.contains("'image_url'"), "{message}");
    }
    sim.server.shutdown().await;
}

/// An asset is part of the kept world: a restarted simulation lists it and still takes its
/// URL as an input.
#[tokio::test]
async fn assets_outlive_a_restart_of_a_kept_world() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("world.json");
    let first =
        SimServer::start_with_world(quick(SimConfig::default()), &path).await.expect("starts");
    let sim = Harness { server: first, client: Client::new() };
    let asset = body(sim.upload(b"\xff\xd8\xff\xe0jpeg", "image/jpeg", "kept").await).await;
    let url = asset["image_url"].as_str().expect("an image_url").to_owned();
    sim.server.shutdown().await;
    let again =
        SimServer::start_with_world(quick(SimConfig::default()), &path).await.expect("restarts");
    let sim = Harness { server: again, client: Client::new() };
    let listed = body(sim.get("/assets").await).await;
    assert_eq!(listed["items"][0]["description"], "kept");
    let job =
        sim.post(&format!("/generate/{FLUX}"), &json!({"prompt": "x", "image_url": url})).await;
    assert_eq!(job.status(), StatusCode::OK);
    sim.server.shutdown().await;
}
