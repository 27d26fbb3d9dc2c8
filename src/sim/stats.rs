//! What the simulation records for tests to assert on: the public snapshot [`SimStats`] and the
//! [`Recorder`] that fills it. Recording is O(1) per request (counters, a bounded ring of recent
//! requests, a map of served files), so a benchmark of tens of thousands of requests costs
//! nothing; the per-job list is built only when a snapshot is taken.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// A snapshot of everything the simulation has seen, for assertions. Money is in USD.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SimStats {
    /// The balance now (negative if a top-up set it below what was already reserved).
    pub balance_usd: f64,
    /// Charged for completed jobs so far.
    pub spent_usd: f64,
    /// Held for jobs still in flight.
    pub reserved_usd: f64,
    /// Jobs created (a POST answered 200, or created before its connection was dropped).
    pub jobs_created: u64,
    /// Jobs created per prompt: more than one for a prompt submitted once means it was paid
    /// (or is about to be paid) twice.
    pub creations_by_prompt: BTreeMap<String, u32>,
    /// Jobs created per input URL (the first input of each request that had one): more than
    /// one for an input sent once means a later stage was paid twice.
    pub creations_by_input: BTreeMap<String, u32>,
    /// Every job, oldest first.
    pub jobs: Vec<JobRecord>,
    /// Requests received on all listeners, control endpoints excluded.
    pub requests_total: u64,
    /// The most recent requests (at most `request_log_limit`), oldest first.
    pub requests: Vec<RequestRecord>,
    /// File downloads (on any listener) that carried an `Authorization` header: must stay 0.
    pub auth_header_on_file_host: u64,
    /// `POST /generate/...` requests that arrived after a 402 was answered and before the next
    /// top-up: must stay 0 for a client that stops submitting on 402.
    pub posts_after_402: u64,
    /// Responses with status 401.
    pub responses_401: u64,
    /// Responses with status 402.
    pub responses_402: u64,
    /// Responses with status 429 (concurrency and storm).
    pub responses_429: u64,
    /// Responses with a 5xx status (API and downloads).
    pub responses_5xx: u64,
    /// Connections closed without an answer (resets and dropped POSTs).
    pub dropped_connections: u64,
    /// Result files served completely, by their file-host URL.
    pub served_files: BTreeMap<String, ServedFile>,
    /// Result downloads served completely (a file served twice counts twice).
    pub downloads_completed: u64,
    /// Preview downloads served completely.
    pub preview_downloads: u64,
}

/// One job as the simulation sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The `job_id`.
    pub id: String,
    /// The prompt ("" for models without one).
    pub prompt: String,
    /// The model path, `image/bfl/flux-1-dev`.
    pub model: String,
    /// The state now, as the API would report it.
    pub status: String,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// The job's price.
    pub price_usd: f64,
    /// Whether the price has been charged (only completed jobs are).
    pub charged: bool,
}

/// Which listener a request arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Listener {
    /// The API origin (`SimServer::base_url`).
    Api,
    /// The result-file host (`SimServer::files_base_url`).
    Files,
    /// The third origin that redirect faults point at.
    Redirect,
}

/// One request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// HTTP method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// The listener it arrived on.
    pub listener: Listener,
    /// Whether it carried an `Authorization` header (any value).
    pub authorization: bool,
    /// The response status; 0 when the connection was closed without one.
    pub status: u16,
    /// Arrival, in milliseconds since the server started.
    pub at_ms: u64,
}

/// A result file served whole.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServedFile {
    /// Lowercase hex SHA-256 of the bytes served.
    pub sha256: String,
    /// Bytes served.
    pub len: u64,
    /// How many times it was served whole.
    pub times: u64,
}

/// The counters and logs behind [`SimStats`].
#[derive(Debug)]
pub(crate) struct Recorder {
    limit: usize,
    log: VecDeque<RequestRecord>,
    stats: SimStats,
}

impl Recorder {
    pub(crate) fn new(limit: usize) -> Self {
        Self { limit, log: VecDeque::new(), stats: SimStats::default() }
    }

    /// Counts a finished request.
    pub(crate) fn request(&mut self, record: RequestRecord) {
        let stats = &mut self.stats;
        stats.requests_total += 1;
        match record.status {
            0 => stats.dropped_connections += 1,
            401 => stats.responses_401 += 1,
            402 => stats.responses_402 += 1,
            429 => stats.responses_429 += 1,
            500..=599 => stats.responses_5xx += 1,
            _ => {}
        }
        if self.limit > 0 {
            if self.log.len() == self.limit {
                self.log.pop_front();
            }
            self.log.push_back(record);
        }
    }

    pub(crate) fn auth_header_on_file_host(&mut self) {
        self.stats.auth_header_on_file_host += 1;
    }

    pub(crate) fn post_after_402(&mut self) {
        self.stats.posts_after_402 += 1;
    }

    /// A result file (or a preview) went out whole.
    pub(crate) fn file_served(&mut self, url: String, sha256: String, len: u64, preview: bool) {
        if preview {
            self.stats.preview_downloads += 1;
            return;
        }
        self.stats.downloads_completed += 1;
        self.stats
            .served_files
            .entry(url)
            .and_modify(|file| {
                file.times += 1;
                // Content is deterministic; a change would be a simulation bug worth seeing.
                file.sha256.clone_from(&sha256);
                file.len = len;
            })
            .or_insert(ServedFile { sha256, len, times: 1 });
    }

    /// The counters and logs; the caller fills in balance and jobs from the world.
    pub(crate) fn snapshot(&self) -> SimStats {
        SimStats { requests: self.log.iter().cloned().collect(), ..self.stats.clone() }
    }
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut out, byte| {
        let _ = write!(out, "{byte:02x}");
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(status: u16) -> RequestRecord {
        RequestRecord {
            method: "GET".to_owned(),
            path: "/jobs".to_owned(),
            listener: Listener::Api,
            authorization: true,
            status,
            at_ms: 0,
        }
    }

    #[test]
    fn the_log_keeps_the_most_recent_requests_and_counts_all() {
        let mut recorder = Recorder::new(2);
        for status in [200, 429, 503, 0] {
            recorder.request(request(status));
        }
        let stats = recorder.snapshot();
        assert_eq!(stats.requests_total, 4);
        assert_eq!(
            (stats.responses_429, stats.responses_5xx, stats.dropped_connections),
            (1, 1, 1)
        );
        let kept: Vec<u16> = stats.requests.iter().map(|r| r.status).collect();
        assert_eq!(kept, [503, 0]);
    }

    #[test]
    fn served_files_are_counted_per_url() {
        let mut recorder = Recorder::new(10);
        recorder.file_served("u".to_owned(), "ab".to_owned(), 3, false);
        recorder.file_served("u".to_owned(), "ab".to_owned(), 3, false);
        recorder.file_served("p".to_owned(), "cd".to_owned(), 3, true);
        let stats = recorder.snapshot();
        assert_eq!(stats.served_files["u"].times, 2);
        assert_eq!((stats.downloads_completed, stats.preview_downloads), (2, 1));
        assert_eq!(hex(&[0, 255, 16]), "00ff10");
    }
}
