//! Reconciliation: deciding, for each POST that ended without an answer, whether Krea created
//! the job, without ever paying twice.
//!
//! Krea has no idempotency key. A POST whose answer is lost (timeout, reset, a 5xx from a proxy,
//! a process killed mid-request) may or may not have created a job that will be billed. Such a
//! job is `unknown` until reconciliation lists the account's jobs created around the attempt
//! (`GET /jobs`, newest first) and looks for ones that no record claims:
//!
//! - none in the attempt's time window: the job was not created and may be submitted again;
//! - as many unclaimed jobs as unknown attempts in a group of overlapping windows: they are
//!   adopted where the windows force the pairing (an attempt only one job fits, or a job only
//!   one attempt fits, taken one by one), else in order when the attempts were sent one after
//!   another (Krea creates jobs in the order the POSTs arrive, so for POSTs that never shared
//!   the wire arrival order is attempt order);
//! - anything else (fewer jobs than attempts, or more, or a job without a readable time): which
//!   attempt made which job cannot be told, so those attempts are reported and left `unknown`,
//!   never guessed into a second payment.
//!
//! # What cannot be told apart (several POSTs on the wire)
//!
//! With up to K POSTs on the wire, two POSTs whose answers are lost while they overlap may
//! reach Krea in either order, and Krea's job list says nothing that ties a job to its request
//! (no prompt, no parameters; only times, states and the type). So the rules are:
//!
//! - (a) no job is created twice because of a guess: an attempt is "not created" only when no
//!   unclaimed job (readable or not) was created in its window, and the engine lists only when
//!   no POST is on the wire and sends none while an attempt is unknown
//!   (`runner/reconciling.rs`);
//! - (b) no result goes to the wrong job: attempts that raced ([`Attempt::raced`]) are never
//!   paired by order, only where the windows leave no choice; a group of one attempt with one
//!   job is adopted as before, since the job can be no other attempt's;
//! - (c) what cannot be told apart is paid once and still delivered: a group of raced attempts
//!   with unclaimed jobs that no forced pairing explains becomes [`Outcome::Unattributed`].
//!   Every attempt of the group stays `unknown`, set aside and never sent again (whether one of
//!   them created nothing cannot be known either); the group's jobs are polled and their
//!   results downloaded to `<output>/unattributed/` with sidecars naming every candidate job.
//!
//! Attempts sent one at a time (K = 1, or the one-at-a-time window after a lost answer) never
//! race, and are decided exactly as before K existed.
//!
//! An item of the list that cannot be read (no id, an id over 200 characters, not an object) is
//! skipped, and the run says so once. It is never adopted, but it is not ignored either: if it
//! was created in an attempt's window (or its time cannot be read), it might be that attempt's
//! job, so the attempt is ambiguous rather than "not created". Items outside every window, the
//! usual case (an old job of the account), change nothing.
//!
//! Windows are in Krea's clock. The offset between the local clock and Krea's is bounded from
//! earlier successful POSTs (sent at `s`, answered at `r`, created at `c`: the offset lies in
//! `[c − r, c − s]`); without any, a wide margin ([`UNMEASURED_CLOCK_MARGIN`]) is used.
//!
//! The matching is pure and unit-tested here; `runner/reconciling.rs` decides when to reconcile
//! (after the POST's own timeout and `limits.reconcile_after`, with no POST in flight) and
//! applies the outcomes. The one honest limit: if Krea loses a job, or `GET /jobs` does not show it,
//! reconciliation concludes it was not created and it is submitted again. With several POSTs
//! on the wire, a job that another program made with the same key inside a raced group's
//! windows may be downloaded to `unattributed/` among the group's jobs (it costs nothing more).

use crate::api::{ApiError, RemoteJob};
use crate::retry::{RetryPolicy, Verdict};
use crate::seam::KreaApi;
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, UNIX_EPOCH};

/// The clock margin used when no earlier POST bounds the offset to Krea's clock.
pub(crate) const UNMEASURED_CLOCK_MARGIN: Duration = Duration::from_mins(1);
/// Extra margin on measured windows: millisecond rounding, drift, time stamped mid-request.
pub(crate) const MEASURED_CLOCK_MARGIN: Duration = Duration::from_millis(500);
/// Jobs listed per page.
const PAGE_SIZE: u32 = 100;
/// The most pages read in one reconciliation (100,000 jobs).
const MAX_PAGES: usize = 1000;

/// One POST whose outcome is unknown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Attempt {
    /// The engine's handle of the job.
    pub slot: usize,
    /// Local time the attempt was recorded, before the POST (ms since the epoch).
    pub started_ms: i64,
    /// Local time the POST ended without an answer; `None` when the process died during it.
    pub ended_ms: Option<i64>,
    /// Whether another unknown attempt may have been on the wire at the same time (their
    /// local spans overlap; an attempt whose end was not seen spans to the end of time). Krea
    /// may have created the jobs of such attempts in either order, so their order proves
    /// nothing ([`Attempt::raced_among`]).
    pub raced: bool,
}

impl Attempt {
    /// Sets `raced` on each of `attempts` that may have been on the wire together with
    /// another one of them.
    pub(crate) fn raced_among(attempts: &mut [Attempt]) {
        let span = |a: &Attempt| (a.started_ms, a.ended_ms.unwrap_or(i64::MAX));
        for i in 0..attempts.len() {
            let (start, end) = span(&attempts[i]);
            attempts[i].raced = attempts.iter().enumerate().any(|(j, other)| {
                let (other_start, other_end) = span(other);
                j != i && start < other_end && other_start < end
            });
        }
    }
}

/// A job at Krea that no record claims.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Candidate {
    /// The job as listed; `None` for an item of the list that could not be read, which is
    /// never adopted but keeps the attempts it may belong to from counting as "not created".
    pub job: Option<RemoteJob>,
    /// Its `created_at` in ms since the epoch, if readable.
    pub created_ms: Option<i64>,
}

impl Candidate {
    fn label(&self) -> &str {
        self.job.as_ref().map_or("an unreadable item", |job| job.job_id.as_str())
    }
}

/// What one reconciliation's listing found.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Listing {
    /// Unclaimed jobs created since the earliest attempt (unreadable ones included).
    pub candidates: Vec<Candidate>,
    /// Items of the list that could not be read, on every page read.
    pub unreadable: usize,
    /// Why the first of them could not be read.
    pub first_unreadable: Option<String>,
}

/// Bounds on (Krea's clock − the local clock), in ms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ClockOffset {
    /// The smallest the offset can be.
    pub low_ms: i64,
    /// The largest.
    pub high_ms: i64,
}

impl ClockOffset {
    /// No measurement: ± [`UNMEASURED_CLOCK_MARGIN`].
    #[must_use]
    pub(crate) fn unmeasured() -> Self {
        let margin = millis(UNMEASURED_CLOCK_MARGIN);
        Self { low_ms: -margin, high_ms: margin }
    }

    /// Bounds from earlier successful POSTs, each (sent, answered, created) in ms: the union of
    /// the per-POST bounds, widened by [`MEASURED_CLOCK_MARGIN`]. The union, not the
    /// intersection: Krea's answers may come from servers whose clocks differ slightly, and a
    /// window too narrow would miss a job and pay for it twice; one too wide only reports.
    #[must_use]
    pub(crate) fn measured(samples: &[(i64, i64, i64)]) -> Self {
        let low = samples.iter().map(|(_, answered, created)| created - answered).min();
        let high = samples.iter().map(|(sent, _, created)| created - sent).max();
        let (Some(low), Some(high)) = (low, high) else { return Self::unmeasured() };
        let margin = millis(MEASURED_CLOCK_MARGIN);
        Self { low_ms: low - margin, high_ms: high + margin }
    }
}

/// What reconciliation decided for one attempt.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Outcome {
    /// Krea created this job for the attempt: record its id and poll it.
    Adopt {
        /// The engine's handle of the job.
        slot: usize,
        /// Krea's job.
        job: RemoteJob,
    },
    /// Krea has no job for the attempt: it may be submitted again.
    NotCreated {
        /// The engine's handle of the job.
        slot: usize,
    },
    /// Attempts that raced (several POSTs on the wire) and as many unclaimed jobs, or jobs
    /// that cannot all be ours, with no pairing forced by the times: which job is which
    /// attempt's cannot be told. Every attempt of the group is left `unknown` (never sent
    /// again), and the results of these jobs are downloaded to `unattributed/` naming every
    /// attempt of the group as a candidate.
    Unattributed {
        /// The engine's handle of the job.
        slot: usize,
        /// The group's readable unclaimed jobs: one of them may be this attempt's.
        jobs: Vec<RemoteJob>,
        /// What was seen.
        reason: String,
    },
    /// Cannot be told: reported, left `unknown`.
    Ambiguous {
        /// The engine's handle of the job.
        slot: usize,
        /// What was seen.
        reason: String,
    },
}

/// Matches unknown attempts with unclaimed jobs. `request_timeout` bounds an attempt whose end
/// was not recorded.
#[must_use]
pub(crate) fn match_attempts(
    attempts: &[Attempt],
    candidates: &[Candidate],
    offset: ClockOffset,
    request_timeout: Duration,
) -> Vec<Outcome> {
    // Each attempt's window in Krea's clock.
    let windows: Vec<(i64, i64)> = attempts
        .iter()
        .map(|attempt| {
            let end = attempt.ended_ms.unwrap_or(attempt.started_ms + millis(request_timeout));
            (attempt.started_ms + offset.low_ms, end.max(attempt.started_ms) + offset.high_ms)
        })
        .collect();
    let fits = |window: (i64, i64), candidate: &Candidate| {
        candidate.created_ms.is_none_or(|t| window.0 <= t && t <= window.1)
    };

    // Group attempts whose windows share a candidate (union-find over attempts).
    let mut group: Vec<usize> = (0..attempts.len()).collect();
    let mut members_of: Vec<Vec<usize>> = Vec::with_capacity(candidates.len());
    for candidate in candidates {
        let members: Vec<usize> =
            (0..attempts.len()).filter(|&i| fits(windows[i], candidate)).collect();
        for pair in members.windows(2) {
            let (a, b) = (root(&mut group, pair[0]), root(&mut group, pair[1]));
            group[a] = b;
        }
        members_of.push(members);
    }
    let mut groups: BTreeMap<usize, (Vec<usize>, Vec<usize>)> = BTreeMap::new();
    for index in 0..attempts.len() {
        let key = root(&mut group, index);
        groups.entry(key).or_default().0.push(index);
    }
    for (candidate, members) in members_of.iter().enumerate() {
        if let Some(&first) = members.first() {
            let key = root(&mut group, first);
            groups.entry(key).or_default().1.push(candidate);
        }
    }

    let mut outcomes = Vec::with_capacity(attempts.len());
    for (mut members, mut found) in groups.into_values() {
        members.sort_by_key(|&i| (attempts[i].started_ms, attempts[i].slot));
        found.sort_by_key(|&c| (candidates[c].created_ms.unwrap_or(i64::MAX), c));
        if found.is_empty() {
            outcomes
                .extend(members.iter().map(|&i| Outcome::NotCreated { slot: attempts[i].slot }));
            continue;
        }
        let timed_and_readable = found.len() == members.len()
            && found
                .iter()
                .all(|&c| candidates[c].created_ms.is_some() && candidates[c].job.is_some());
        // A group of one is decided as before (adopt its only job, or report a foreign one).
        let raced = members.len() > 1 && members.iter().any(|&i| attempts[i].raced);
        // A pairing the windows force (each step pairs an attempt and a job that fit only each
        // other among those left) assumes nothing about order, so it holds for raced attempts.
        let forced = timed_and_readable
            .then(|| forced_pairs(&members, &found, |i, c| fits(windows[i], &candidates[c])))
            .flatten();
        // In order: sequential POSTs reach Krea in the order they were sent.
        let in_order = timed_and_readable
            && !raced
            && members.iter().zip(&found).all(|(&i, &c)| fits(windows[i], &candidates[c]));
        let pairs: Option<Vec<(usize, usize)>> = forced.or_else(|| {
            in_order.then(|| members.iter().copied().zip(found.iter().copied()).collect())
        });
        if let Some(pairs) = pairs {
            outcomes.extend(pairs.into_iter().filter_map(|(i, c)| {
                let job = candidates[c].job.clone()?;
                Some(Outcome::Adopt { slot: attempts[i].slot, job })
            }));
            continue;
        }
        let ids: Vec<&str> = found.iter().map(|&c| candidates[c].label()).collect();
        if raced {
            let jobs: Vec<RemoteJob> =
                found.iter().filter_map(|&c| candidates[c].job.clone()).collect();
            let reason = format!(
                "{} unclaimed job(s) at Krea ({}) were created while {} submission(s) without an \
                 answer were on the wire together; which belongs to which cannot be told. Their \
                 results go to unattributed/ in the output folder, each naming every candidate \
                 job; this job is not submitted again",
                found.len(),
                ids.join(", "),
                members.len()
            );
            outcomes.extend(members.iter().map(|&i| Outcome::Unattributed {
                slot: attempts[i].slot,
                jobs: jobs.clone(),
                reason: reason.clone(),
            }));
            continue;
        }
        let reason = format!(
            "{} unclaimed job(s) at Krea ({}) were created around {} unanswered submission(s); \
             which belongs to which cannot be told. Check them at Krea; this job is not \
             submitted again",
            found.len(),
            ids.join(", "),
            members.len()
        );
        outcomes.extend(
            members
                .iter()
                .map(|&i| Outcome::Ambiguous { slot: attempts[i].slot, reason: reason.clone() }),
        );
    }
    outcomes
}

/// Pairs every attempt of `members` with a job of `found` when the windows (`fits`) leave no
/// choice: repeatedly, an attempt that only one remaining job fits, or a job that fits only
/// one remaining attempt, is paired with it. `None` as soon as a choice would be a guess.
fn forced_pairs(
    members: &[usize],
    found: &[usize],
    fits: impl Fn(usize, usize) -> bool,
) -> Option<Vec<(usize, usize)>> {
    let mut attempts: Vec<usize> = members.to_vec();
    let mut jobs: Vec<usize> = found.to_vec();
    let mut pairs = Vec::with_capacity(members.len());
    while !attempts.is_empty() {
        let by_attempt = attempts.iter().enumerate().find_map(|(a, &i)| {
            let mut fitting = jobs.iter().enumerate().filter(|&(_, &c)| fits(i, c));
            match (fitting.next(), fitting.next()) {
                (Some((j, _)), None) => Some((a, j)),
                _ => None,
            }
        });
        let by_job = || {
            jobs.iter().enumerate().find_map(|(j, &c)| {
                let mut fitting = attempts.iter().enumerate().filter(|&(_, &i)| fits(i, c));
                match (fitting.next(), fitting.next()) {
                    (Some((a, _)), None) => Some((a, j)),
                    _ => None,
                }
            })
        };
        let (a, j) = by_attempt.or_else(by_job)?;
        pairs.push((attempts.swap_remove(a), jobs.swap_remove(j)));
    }
    Some(pairs)
}

fn root(group: &mut [usize], mut index: usize) -> usize {
    while group[index] != index {
        group[index] = group[group[index]];
        index = group[index];
    }
    index
}

/// Lists the account's jobs created at or after `since_ms` (Krea's clock) that are not in
/// `claimed`, newest first, paging back with the cursor. Items that cannot be read are counted,
/// and kept as candidates without a job when they may be recent.
///
/// Each next cursor is the oldest `created_at` seen plus a millisecond, so jobs that share the
/// boundary millisecond are listed again rather than skipped; repeats are dropped by id.
pub(crate) async fn list_unclaimed<S: std::hash::BuildHasher>(
    api: &dyn KreaApi,
    since_ms: i64,
    claimed: &HashSet<String, S>,
    policy: &RetryPolicy,
) -> Result<Listing, ApiError> {
    let mut seen: HashSet<String> = HashSet::new();
    let mut listing = Listing::default();
    let found = &mut listing.candidates;
    let mut cursor: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let page = crate::retry::retry(
            policy,
            |err: &ApiError| match err {
                ApiError::RateLimited { retry_after, .. } => Verdict::Retry(*retry_after),
                err if err.is_transient() => Verdict::Retry(None),
                _ => Verdict::GiveUp,
            },
            |err, wait| tracing::debug!(%err, ?wait, "listing jobs failed; retrying"),
            || api.list_jobs(cursor.as_deref(), PAGE_SIZE),
        )
        .await?;
        let mut oldest: Option<i64> = None;
        let mut new_items = 0;
        for item in page.unreadable {
            let created_ms = item.created_at.as_deref().and_then(parse_time_ms);
            oldest = match (oldest, created_ms) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            listing.unreadable += 1;
            listing.first_unreadable.get_or_insert(item.reason);
            if created_ms.is_none_or(|t| t >= since_ms) {
                found.push(Candidate { job: None, created_ms });
            }
        }
        for job in page.items {
            let created_ms = job.created_at.as_deref().and_then(parse_time_ms);
            oldest = match (oldest, created_ms) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if !seen.insert(job.job_id.clone()) {
                continue;
            }
            new_items += 1;
            let recent = created_ms.is_none_or(|t| t >= since_ms);
            if recent && !claimed.contains(&job.job_id) {
                found.push(Candidate { job: Some(job), created_ms });
            }
        }
        let Some(server_cursor) = page.next_cursor else { break };
        if oldest.is_some_and(|t| t < since_ms) {
            break;
        }
        let ours = oldest.map(|t| format_time_ms(t + 1));
        // No progress (more jobs in one millisecond than a page holds): take Krea's cursor.
        cursor = if new_items == 0 || ours == cursor { Some(server_cursor) } else { ours };
    }
    Ok(listing)
}

/// Milliseconds since the epoch of an RFC 3339 UTC time (`Z` or `+00:00`); `None` otherwise.
#[must_use]
pub(crate) fn parse_time_ms(text: &str) -> Option<i64> {
    let text = text.trim();
    let utc =
        text.strip_suffix("+00:00").map_or_else(|| text.to_owned(), |base| format!("{base}Z"));
    let time = humantime::parse_rfc3339(&utc).ok()?;
    i64::try_from(time.duration_since(UNIX_EPOCH).ok()?.as_millis()).ok()
}

/// RFC 3339 with milliseconds, UTC.
#[must_use]
pub(crate) fn format_time_ms(ms: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or_default());
    humantime::format_rfc3339_millis(time).to_string()
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(30);

    /// An attempt sent alone (one POST at a time).
    fn attempt(slot: usize, started_ms: i64, ended_ms: Option<i64>) -> Attempt {
        Attempt { slot, started_ms, ended_ms, raced: false }
    }

    /// Attempts as the engine hands them over, `raced` computed from their spans.
    fn raced(mut attempts: Vec<Attempt>) -> Vec<Attempt> {
        Attempt::raced_among(&mut attempts);
        attempts
    }

    fn candidate(id: &str, created_ms: Option<i64>) -> Candidate {
        let job = RemoteJob {
            job_id: id.into(),
            status: None,
            created_at: None,
            completed_at: None,
            urls: Vec::new(),
            error: None,
        };
        Candidate { job: Some(job), created_ms }
    }

    /// Krea's clock 2 s ahead, known to ±10 ms.
    fn offset() -> ClockOffset {
        ClockOffset { low_ms: 1990, high_ms: 2010 }
    }

    fn adopted(outcomes: &[Outcome]) -> Vec<(usize, &str)> {
        let mut pairs: Vec<(usize, &str)> = outcomes
            .iter()
            .filter_map(|o| match o {
                Outcome::Adopt { slot, job } => Some((*slot, job.job_id.as_str())),
                _ => None,
            })
            .collect();
        pairs.sort_unstable();
        pairs
    }

    #[test]
    fn a_dropped_answer_is_adopted() {
        let outcomes = match_attempts(
            &[attempt(7, 10_000, Some(10_300))],
            &[candidate("k", Some(12_100))],
            offset(),
            TIMEOUT,
        );
        assert_eq!(adopted(&outcomes), [(7, "k")]);
    }

    #[test]
    fn nothing_in_the_window_means_not_created() {
        let far = candidate("someone-elses", Some(50_000));
        let outcomes =
            match_attempts(&[attempt(1, 10_000, Some(10_300))], &[far], offset(), TIMEOUT);
        assert_eq!(outcomes, [Outcome::NotCreated { slot: 1 }]);
    }

    #[test]
    fn several_unknowns_are_matched_in_attempt_order() {
        let attempts = [attempt(2, 20_000, Some(20_200)), attempt(1, 10_000, Some(10_200))];
        // Sequential POSTs: the windows do not overlap, each job falls in one.
        let candidates = [candidate("second", Some(22_100)), candidate("first", Some(12_100))];
        let outcomes = match_attempts(&attempts, &candidates, offset(), TIMEOUT);
        assert_eq!(adopted(&outcomes), [(1, "first"), (2, "second")]);
    }

    #[test]
    fn overlapping_windows_with_as_many_jobs_pair_in_order() {
        // A killed process: neither end was recorded, so both windows span the timeout.
        let attempts = [attempt(1, 10_000, None), attempt(2, 10_050, None)];
        let candidates = [candidate("b", Some(12_070)), candidate("a", Some(12_020))];
        let outcomes = match_attempts(&attempts, &candidates, offset(), TIMEOUT);
        assert_eq!(adopted(&outcomes), [(1, "a"), (2, "b")]);
    }

    #[test]
    fn fewer_jobs_than_overlapping_attempts_is_never_guessed() {
        let attempts = [attempt(1, 10_000, None), attempt(2, 10_050, None)];
        let outcomes =
            match_attempts(&attempts, &[candidate("a", Some(12_060))], offset(), TIMEOUT);
        assert!(outcomes.iter().all(|o| matches!(o, Outcome::Ambiguous { .. })), "{outcomes:?}");
        assert_eq!(outcomes.len(), 2);
    }

    #[test]
    fn a_foreign_job_in_the_window_is_reported() {
        let candidates = [candidate("ours?", Some(12_100)), candidate("theirs?", Some(12_150))];
        let outcomes =
            match_attempts(&[attempt(1, 10_000, Some(10_300))], &candidates, offset(), TIMEOUT);
        match &outcomes[..] {
            [Outcome::Ambiguous { slot: 1, reason }] => {
                assert!(reason.contains("ours?") && reason.contains("theirs?"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_job_without_a_time_makes_its_group_ambiguous() {
        let outcomes = match_attempts(
            &[attempt(1, 10_000, Some(10_300))],
            &[candidate("x", None)],
            offset(),
            TIMEOUT,
        );
        assert!(matches!(outcomes[..], [Outcome::Ambiguous { slot: 1, .. }]));
    }

    #[test]
    fn independent_groups_are_decided_independently() {
        let attempts = [
            attempt(1, 10_000, Some(10_100)),
            attempt(2, 100_000, Some(100_100)),
            attempt(3, 200_000, Some(200_100)),
        ];
        let candidates = [
            candidate("one", Some(12_050)),
            candidate("x", Some(202_050)),
            candidate("y", Some(202_060)),
        ];
        let outcomes = match_attempts(&attempts, &candidates, offset(), TIMEOUT);
        let one = candidate("one", None).job.expect("readable");
        assert!(outcomes.contains(&Outcome::Adopt { slot: 1, job: one }));
        assert!(outcomes.contains(&Outcome::NotCreated { slot: 2 }));
        assert!(outcomes.iter().any(|o| matches!(o, Outcome::Ambiguous { slot: 3, .. })));
    }

    #[test]
    fn an_unreadable_item_outside_every_window_changes_nothing() {
        let old = Candidate { job: None, created_ms: Some(1_000) };
        let outcomes = match_attempts(
            &[attempt(7, 10_000, Some(10_300)), attempt(8, 20_000, Some(20_300))],
            &[candidate("k", Some(12_100)), old],
            offset(),
            TIMEOUT,
        );
        assert!(outcomes.contains(&Outcome::NotCreated { slot: 8 }), "{outcomes:?}");
        assert_eq!(adopted(&outcomes), [(7, "k")]);
    }

    #[test]
    fn an_unreadable_item_in_the_window_is_never_taken_for_nothing() {
        // It may be the attempt's own job under an id krea-batch cannot use: sending the job
        // again could pay twice, adopting it is impossible, so the attempt is reported.
        for created_ms in [Some(12_100), None] {
            let unreadable = Candidate { job: None, created_ms };
            let outcomes = match_attempts(
                &[attempt(1, 10_000, Some(10_300))],
                &[unreadable],
                offset(),
                TIMEOUT,
            );
            match &outcomes[..] {
                [Outcome::Ambiguous { slot: 1, reason }] => {
                    assert!(reason.contains("unreadable"), "{reason}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn attempts_race_when_their_spans_overlap() {
        let attempts = raced(vec![
            attempt(1, 10_000, Some(10_300)),
            attempt(2, 10_100, Some(10_400)),
            attempt(3, 20_000, Some(20_100)),
            // Killed mid-request: on the wire to the end of time, so raced with what came after.
            attempt(4, 30_000, None),
            attempt(5, 40_000, Some(40_100)),
        ]);
        let flags: Vec<bool> = attempts.iter().map(|a| a.raced).collect();
        assert_eq!(flags, [true, true, false, true, true]);
    }

    #[test]
    fn raced_attempts_with_as_many_jobs_are_not_paired_by_order() {
        // Two POSTs on the wire together, both answers lost, two unclaimed jobs created in
        // both windows: Krea may have created them in either order.
        let attempts =
            raced(vec![attempt(1, 10_000, Some(10_300)), attempt(2, 10_010, Some(10_310))]);
        let candidates = [candidate("b", Some(12_200)), candidate("a", Some(12_100))];
        let outcomes = match_attempts(&attempts, &candidates, offset(), TIMEOUT);
        assert!(adopted(&outcomes).is_empty(), "{outcomes:?}");
        for slot in [1, 2] {
            let found = outcomes.iter().find_map(|o| match o {
                Outcome::Unattributed { slot: s, jobs, reason } if *s == slot => {
                    Some((jobs, reason))
                }
                _ => None,
            });
            let (jobs, reason) = found.unwrap_or_else(|| panic!("slot {slot}: {outcomes:?}"));
            let mut ids: Vec<&str> = jobs.iter().map(|job| job.job_id.as_str()).collect();
            ids.sort_unstable();
            assert_eq!(ids, ["a", "b"]);
            assert!(reason.contains("unattributed/"), "{reason}");
        }
    }

    #[test]
    fn raced_attempts_with_fewer_jobs_download_what_exists_and_send_nothing_again() {
        let attempts = raced(vec![attempt(1, 10_000, None), attempt(2, 10_050, None)]);
        let outcomes =
            match_attempts(&attempts, &[candidate("a", Some(12_060))], offset(), TIMEOUT);
        assert_eq!(outcomes.len(), 2);
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, Outcome::Unattributed { jobs, .. } if jobs.len() == 1)),
            "{outcomes:?}"
        );
    }

    #[test]
    fn raced_attempts_are_paired_when_the_windows_force_it() {
        // Both on the wire around 10.9 s. "late" fits both windows, but "early" was created
        // before the second POST was sent: it can only be the first's, so "late" is the second's.
        let attempts =
            raced(vec![attempt(1, 10_000, Some(11_000)), attempt(2, 10_900, Some(40_000))]);
        let candidates = [candidate("early", Some(12_100)), candidate("late", Some(12_950))];
        let outcomes = match_attempts(&attempts, &candidates, offset(), TIMEOUT);
        assert_eq!(adopted(&outcomes), [(1, "early"), (2, "late")]);
    }

    #[test]
    fn clock_offset_bounds_come_from_earlier_posts() {
        // Sent at 1000, answered at 1100, created at 3050 (Krea ~2 s ahead).
        let offset = ClockOffset::measured(&[(1000, 1100, 3050), (5000, 5040, 7030)]);
        assert_eq!((offset.low_ms, offset.high_ms), (1950 - 500, 2050 + 500));
        assert_eq!(ClockOffset::measured(&[]), ClockOffset::unmeasured());
    }

    #[test]
    fn times_round_trip() {
        let ms = parse_time_ms("2026-11-26T13:37:46.793Z").expect("parses");
        assert_eq!(format_time_ms(ms), "2026-11-26T13:37:46.793Z");
        assert_eq!(parse_time_ms("2026-11-26T13:37:46.793+00:00"), Some(ms));
        assert_eq!(
            parse_time_ms("2026-11-26T15:37:46.793+02:00"),
            None,
            "offsets other than UTC are not guessed"
        );
    }
}
