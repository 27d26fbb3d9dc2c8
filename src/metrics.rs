//! The optional Prometheus `/metrics` endpoint of the daemon, on loopback only.
//!
//! The daemon publishes a [`MetricsSnapshot`] through a `tokio::sync::watch` channel whenever its
//! figures change; [`serve`] answers each scrape with [`render`] of the latest one, in the
//! Prometheus text exposition format 0.0.4 (no timestamps). [`check_listen`] and [`bind`] refuse
//! every address but loopback: the endpoint has no authentication. Idle, it costs an accept loop
//! and nothing else: no timers, no polling.
//!
//! Left to others: gathering the figures and publishing snapshots, the config switch (off by
//! default) and its address (`daemon.rs`); what the job counts mean (`report.rs`).

use crate::runner::Counts;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The `Content-Type` of the text exposition format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4";

/// A client that has not sent a whole request head by then is dropped; this also closes
/// keep-alive connections left idle that long.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The pause after a failed `accept` (out of file descriptors and the like), so as not to spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What the endpoint reports; the daemon publishes a fresh one through a tokio watch channel.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct MetricsSnapshot {
    /// Jobs by where they stand.
    pub counts: Counts,
    /// Submissions (POSTs) sent.
    pub submissions_total: u64,
    /// 429 answers received.
    pub rate_limited_total: u64,
    /// 402 answers received.
    pub payment_required_total: u64,
    /// Why submission is paused (`payment_required`, `auth_refused`), `None` when it is not.
    pub paused: Option<String>,
    /// Result files downloaded.
    pub downloads_total: u64,
    /// Bytes of result files downloaded.
    pub download_bytes_total: u64,
    /// Completed jobs at their estimated price, in US dollars.
    pub spend_usd_estimate: f64,
    /// The account's running capacity as learned, once it is.
    pub account_capacity: Option<u32>,
    /// Jobs allowed in flight now.
    pub allowed_in_flight: u32,
    /// POSTs allowed at once now.
    pub posts_allowed: u32,
    /// Our jobs last seen backlogged at Krea.
    pub backlogged: u32,
    /// The submission pace in force, POSTs per second; `None` while none is needed.
    pub pace_per_second: Option<f64>,
}

/// Accepts only loopback addresses (127.0.0.0/8, `::1`); the error says why not.
pub(crate) fn check_listen(addr: &SocketAddr) -> Result<(), ListenRefused> {
    if addr.ip().to_canonical().is_loopback() {
        return Ok(());
    }
    Err(ListenRefused(*addr))
}

/// The metrics endpoint may not listen on this address: it is not loopback.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the metrics endpoint may not listen on {0}{every}: it has no authentication, so only \
     loopback addresses (127.0.0.0/8 or [::1]) are allowed",
    every = if .0.ip().to_canonical().is_unspecified() { " (that is every interface)" } else { "" }
)]
pub struct ListenRefused(pub SocketAddr);

/// Checks `addr` with [`check_listen`] (an `InvalidInput` error if it is refused), then binds it.
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    check_listen(&addr)
        .map_err(|why| std::io::Error::new(std::io::ErrorKind::InvalidInput, why))?;
    TcpListener::bind(addr).await
}

/// `snapshot` in the Prometheus text exposition format 0.0.4.
///
/// Jobs are one gauge family, `krea_batch_jobs{state=...}`, without the total: `sum()` gives it.
#[must_use]
pub(crate) fn render(snapshot: &MetricsSnapshot) -> String {
    let mut out = String::with_capacity(2048);
    let counts = &snapshot.counts;
    family(&mut out, "jobs", "gauge", "Jobs by where they stand.");
    for (state, value) in [
        ("pending", counts.pending),
        ("in_flight", counts.in_flight),
        ("unknown", counts.unknown),
        ("download_pending", counts.download_pending),
        ("completed", counts.completed),
        ("failed", counts.failed),
        ("cancelled", counts.cancelled),
    ] {
        sample(&mut out, "jobs", Some(("state", state)), value);
    }
    let counters = [
        ("submissions_total", "Submissions (POSTs) sent.", snapshot.submissions_total),
        ("rate_limited_total", "429 answers received.", snapshot.rate_limited_total),
        ("payment_required_total", "402 answers received.", snapshot.payment_required_total),
        ("downloads_total", "Result files downloaded.", snapshot.downloads_total),
        ("download_bytes_total", "Bytes of files downloaded.", snapshot.download_bytes_total),
    ];
    for (name, help, value) in counters {
        family(&mut out, name, "counter", help);
        sample(&mut out, name, None, value);
    }
    family(&mut out, "paused", "gauge", "1 while submission is paused, with the reason.");
    match &snapshot.paused {
        Some(reason) => sample(&mut out, "paused", Some(("reason", reason)), 1),
        None => sample(&mut out, "paused", None, 0),
    }
    let spend = "spend_usd_estimate";
    family(&mut out, spend, "gauge", "Completed jobs at their estimated price, in US dollars.");
    sample(&mut out, spend, None, float(crate::pricing::round_usd(snapshot.spend_usd_estimate)));
    // What the engine learned of the account; a figure not learned yet has no sample.
    let learned = [
        (
            "account_capacity",
            "Jobs the account runs at once, as learned.",
            snapshot.account_capacity.map(f64::from),
        ),
        (
            "allowed_in_flight",
            "Jobs allowed in flight now.",
            Some(f64::from(snapshot.allowed_in_flight)),
        ),
        (
            "posts_allowed",
            "Submissions allowed to await their answer at once.",
            Some(f64::from(snapshot.posts_allowed)),
        ),
        ("backlogged", "Jobs last seen backlogged at Krea.", Some(f64::from(snapshot.backlogged))),
        ("pace_per_second", "Submission pace in force, per second.", snapshot.pace_per_second),
    ];
    for (name, help, value) in learned {
        family(&mut out, name, "gauge", help);
        if let Some(value) = value {
            sample(&mut out, name, None, float(value));
        }
    }
    out
}

/// Appends formatted text; a `String` accepts every write, so there is no error to handle.
fn push(out: &mut String, args: std::fmt::Arguments<'_>) {
    let _ = out.write_fmt(args);
}

/// The `# HELP` and `# TYPE` lines of a metric family (`help` is ours: nothing to escape).
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    push(out, format_args!("# HELP krea_batch_{name} {help}\n# TYPE krea_batch_{name} {kind}\n"));
}

/// One sample line, with at most one label.
fn sample(
    out: &mut String,
    name: &str,
    label: Option<(&str, &str)>,
    value: impl std::fmt::Display,
) {
    match label {
        Some((key, raw)) => {
            let escaped = escape_label(raw);
            push(out, format_args!("krea_batch_{name}{{{key}=\"{escaped}\"}} {value}\n"));
        }
        None => push(out, format_args!("krea_batch_{name} {value}\n")),
    }
}

/// A label value escaped as the exposition format asks: backslash, double quote, line feed.
fn escape_label(raw: &str) -> String {
    raw.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// A float as Prometheus spells it (`NaN`, `+Inf`, `-Inf` included).
fn float(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        value.to_string()
    }
}

/// Answers `GET /metrics` (and `HEAD`) on `listener` with the latest snapshot until `shutdown`
/// is cancelled; other paths get 404, other methods 405.
///
/// Each connection runs in its own task, so a slow or broken client holds up no other; one that
/// takes over 10 s to send its request head is dropped. A failed `accept` is logged and retried
/// after a short pause: the endpoint never takes the daemon down. Returns `Ok` on shutdown,
/// aborting the connections still open.
pub(crate) async fn serve(
    listener: TcpListener,
    snapshot: watch::Receiver<MetricsSnapshot>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(connection(stream, snapshot.clone()));
                }
                Err(err) => {
                    tracing::warn!(error = %err, "metrics endpoint could not accept a connection");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    }
                }
            },
        }
    }
    Ok(())
}

/// Serves one connection to its end.
async fn connection(stream: TcpStream, snapshot: watch::Receiver<MetricsSnapshot>) {
    let service = service_fn(move |request| {
        let response = respond(&request, &snapshot);
        async move { Ok::<_, Infallible>(response) }
    });
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(err) = served {
        tracing::debug!(error = %err, "metrics connection ended with an error");
    }
}

/// The answer to one request.
fn respond<B>(
    request: &Request<B>,
    snapshot: &watch::Receiver<MetricsSnapshot>,
) -> Response<Full<Bytes>> {
    if request.uri().path() != "/metrics" {
        return text(StatusCode::NOT_FOUND, "not found\n".to_owned());
    }
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n".into());
        response.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let mut response = text(StatusCode::OK, render(&snapshot.borrow()));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_FORMAT));
    response
}

/// A plain-text response.
fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_snapshot() -> MetricsSnapshot {
        let counts = Counts {
            total: 28,
            pending: 3,
            in_flight: 4,
            unknown: 1,
            download_pending: 2,
            completed: 10,
            failed: 5,
            cancelled: 3,
        };
        MetricsSnapshot {
            counts,
            submissions_total: 21,
            rate_limited_total: 7,
            payment_required_total: 1,
            paused: Some("payment_required".to_owned()),
            downloads_total: 12,
            download_bytes_total: 3_456_789,
            spend_usd_estimate: 1.25,
            account_capacity: Some(20),
            allowed_in_flight: 25,
            posts_allowed: 3,
            backlogged: 4,
            pace_per_second: None,
        }
    }

    #[test]
    fn render_has_every_family_with_its_type() {
        let text = render(&sample_snapshot());
        let lines: Vec<&str> = text.lines().collect();
        for expected in [
            "# TYPE krea_batch_jobs gauge",
            "krea_batch_jobs{state=\"pending\"} 3",
            "krea_batch_jobs{state=\"in_flight\"} 4",
            "krea_batch_jobs{state=\"unknown\"} 1",
            "krea_batch_jobs{state=\"download_pending\"} 2",
            "krea_batch_jobs{state=\"completed\"} 10",
            "krea_batch_jobs{state=\"failed\"} 5",
            "krea_batch_jobs{state=\"cancelled\"} 3",
            "# TYPE krea_batch_submissions_total counter",
            "krea_batch_submissions_total 21",
            "# TYPE krea_batch_rate_limited_total counter",
            "krea_batch_rate_limited_total 7",
            "# TYPE krea_batch_payment_required_total counter",
            "krea_batch_payment_required_total 1",
            "# TYPE krea_batch_paused gauge",
            "krea_batch_paused{reason=\"payment_required\"} 1",
            "# TYPE krea_batch_downloads_total counter",
            "krea_batch_downloads_total 12",
            "# TYPE krea_batch_download_bytes_total counter",
            "krea_batch_download_bytes_total 3456789",
            "# TYPE krea_batch_spend_usd_estimate gauge",
            "krea_batch_spend_usd_estimate 1.25",
            "# TYPE krea_batch_account_capacity gauge",
            "krea_batch_account_capacity 20",
            "krea_batch_allowed_in_flight 25",
            "krea_batch_posts_allowed 3",
            "krea_batch_backlogged 4",
            "# TYPE krea_batch_pace_per_second gauge",
        ] {
            assert!(lines.contains(&expected), "missing {expected:?} in:\n{text}");
        }
        // Every family has one HELP and one TYPE line, each sample a known family.
        let types = lines.iter().filter(|l| l.starts_with("# TYPE ")).count();
        let helps = lines.iter().filter(|l| l.starts_with("# HELP krea_batch_")).count();
        assert_eq!((types, helps), (13, 13));
        let pace_samples = lines.iter().filter(|l| l.starts_with("krea_batch_pace_per_second"));
        assert_eq!(pace_samples.count(), 0, "no pace needed: no sample");
        assert!(lines.iter().all(|l| l.starts_with("# ") || l.starts_with("krea_batch_")));
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn render_escapes_labels_and_spells_odd_values() {
        let paused = Some("a\"b\\c\nd".to_owned());
        let text = render(&MetricsSnapshot { paused, ..MetricsSnapshot::default() });
        assert!(text.lines().any(|l| l == r#"krea_batch_paused{reason="a\"b\\c\nd"} 1"#), "{text}");
        let snapshot = MetricsSnapshot { spend_usd_estimate: f64::NAN, ..Default::default() };
        let text = render(&snapshot);
        assert!(text.lines().any(|l| l == "krea_batch_paused 0"), "{text}");
        assert!(text.lines().any(|l| l == "krea_batch_spend_usd_estimate NaN"), "{text}");
        assert_eq!((float(f64::INFINITY), float(0.0)), ("+Inf".to_owned(), "0".to_owned()));
        // A sum of prices is shown as the money it is, not with its binary noise.
        let snapshot = MetricsSnapshot { spend_usd_estimate: 0.1 + 0.2, ..Default::default() };
        let text = render(&snapshot);
        assert!(text.lines().any(|l| l == "krea_batch_spend_usd_estimate 0.3"), "{text}");
    }

    #[tokio::test]
    async fn only_loopback_is_accepted() {
        for ok in ["127.0.0.1:0", "[::1]:0", "127.1.2.3:9100"] {
            assert_eq!(check_listen(&ok.parse().unwrap()), Ok(()), "{ok}");
        }
        for refused in ["0.0.0.0:9100", "10.0.0.1:9100", "[::]:9100", "192.168.1.5:0"] {
            let why = check_listen(&refused.parse().unwrap()).unwrap_err().to_string();
            assert!(why.contains("loopback"), "{refused}: {why}");
        }
        let err = bind("0.0.0.0:0".parse().unwrap()).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    }

    #[tokio::test]
    async fn serves_the_latest_snapshot_and_stops() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (publish, snapshot) = watch::channel(MetricsSnapshot::default());
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, snapshot, shutdown.clone()));
        let client = reqwest::Client::new();

        let first = client.get(format!("{base}/metrics")).send().await.unwrap();
        assert_eq!(first.status(), 200);
        let first = first.text().await.unwrap();
        assert!(first.lines().any(|l| l == "krea_batch_submissions_total 0"), "{first}");

        publish.send_replace(sample_snapshot());
        let response = client.get(format!("{base}/metrics")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()[CONTENT_TYPE], TEXT_FORMAT);
        assert_eq!(response.text().await.unwrap(), render(&sample_snapshot()));

        let other = client.get(format!("{base}/other")).send().await.unwrap();
        assert_eq!(other.status(), 404);
        let post = client.post(format!("{base}/metrics")).send().await.unwrap();
        assert_eq!(post.status(), 405);

        // The client keeps its connection open: shutdown must not wait for it.
        shutdown.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(5), server).await;
        ended.expect("serve returns after shutdown").unwrap().unwrap();
        let after = client.get(format!("{base}/metrics")).send().await;
        assert!(after.is_err(), "still answering after shutdown");
    }
}
