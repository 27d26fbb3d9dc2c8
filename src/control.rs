//! `krea-batch cancel` and `krea-batch resume`: acting on the jobs of a state file, whether or
//! not a krea-batch process (the daemon, a run) holds it.
//!
//! When one does, the request is left in the state file's `requests` table and that process
//! acts on it within a few seconds (the daemon reads requests at each inbox scan). When none
//! does, `cancel` acts itself: pending jobs are marked cancelled, and jobs in flight are
//! cancelled at Krea with `DELETE /jobs/{id}` (cancelled jobs are not billed).
//!
//! Krea cancels a job only while it is `queued` or `processing`, and answers any other cancel
//! with a 404, as it answers for a job it does not know. So a refused `DELETE` is followed by a
//! `GET` of the job: a job Krea still runs was refused (said as such, with Krea's reason), one
//! it has ended is said to have ended, and only a job Krea does not know is "not found". A job
//! whose cancel cannot be carried out now (refused, or its submission never answered) keeps its
//! request in the state file, so the next `run` or the service asks again while Krea allows;
//! and the command exits non-zero ([`NotAllCancelled`]).

use crate::api::{self, ApiError, KreaClient, RemoteStatus};
use crate::error::InputError;
use crate::job::JobState;
use crate::key::ApiKey;
use crate::report::count;
use crate::selection::{Selection, select};
use crate::setup;
use crate::store::{Change, JobRecord, Request, Store};
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

/// How long to wait for a running process to take a request.
const TAKEN_WITHIN: Duration = Duration::from_secs(30);

/// `krea-batch cancel`. Returns what to tell the user. `api_base`, when given, is where the
/// state's jobs are now served (a simulated world started again), else the recorded one.
pub async fn cancel(
    state: &Path,
    selection: &Selection,
    key: Option<ApiKey>,
    api_base: Option<&str>,
) -> anyhow::Result<String> {
    let reader = Store::open_reader(state)?;
    let jobs = select(&reader, selection)?;
    drop(reader);
    let open: Vec<&JobRecord> = jobs.iter().filter(|job| !job.state.is_final()).collect();
    // Completed jobs are billed already; their downloads are left to finish.
    let open: Vec<&JobRecord> =
        open.into_iter().filter(|job| job.state != JobState::Completed).collect();
    if open.is_empty() {
        return Ok(match jobs.len() {
            1 => "nothing to cancel: the selected job has ended (or completed at Krea)".to_owned(),
            n => format!(
                "nothing to cancel: the {n} selected jobs have all ended (or completed at Krea)"
            ),
        });
    }
    if Store::is_locked(state) {
        let requester = Store::open_requester(state)?;
        for job in &open {
            requester.push_request(&Request::Cancel(job.id))?;
        }
        wait_until_taken(&requester).await?;
        return Ok(format!(
            "asked the running krea-batch to cancel {}: pending ones are cancelled at once, \
             jobs in flight at Krea as soon as Krea allows (see `krea-batch status`)",
            count(open.len(), "job")
        ));
    }
    cancel_directly(state, &open, key, api_base).await
}

/// `krea-batch resume`: asks the process holding `state` to probe now whether submitting may
/// resume (after a top-up).
pub async fn resume(state: &Path) -> anyhow::Result<String> {
    if !Store::is_locked(state) {
        return Ok(format!(
            "no krea-batch is running on {}; the next `krea-batch run` or daemon start resumes by \
             itself",
            state.display()
        ));
    }
    let requester = Store::open_requester(state)?;
    requester.push_request(&Request::Resume)?;
    wait_until_taken(&requester).await?;
    Ok("asked the running krea-batch to probe now; it resumes submitting if Krea accepts".into())
}

async fn wait_until_taken(requester: &Store) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + TAKEN_WITHIN;
    while requester.has_requests()? {
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "the running krea-batch has not taken the request within {} s; it stays queued \
                 and is taken when it next reads requests",
                TAKEN_WITHIN.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Cancels that could not be carried out: the command's answer when some were not (exit 1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct NotAllCancelled(String);

/// What became of one job's cancel at Krea.
enum AtKrea {
    /// Cancelled (now, or already before): not billed.
    Cancelled,
    /// Krea runs the job on: it refused, with this reason.
    Refused(String),
    /// It cannot be cancelled any more, or not by this command: why.
    NotCancelled(String),
}

/// No process holds the state: mark pending jobs cancelled and cancel jobs in flight at Krea.
async fn cancel_directly(
    state: &Path,
    open: &[&JobRecord],
    key: Option<ApiKey>,
    api_base: Option<&str>,
) -> anyhow::Result<String> {
    let mut store = setup::open_store(state)?;
    let in_flight = open.iter().filter(|job| job.state == JobState::Submitted).count();
    let client = match (in_flight, key) {
        (0, _) => None,
        (_, None) => {
            return Err(InputError::msg(format!(
                "{in_flight} selected jobs are running at Krea; cancelling them needs the API key"
            ))
            .into());
        }
        (_, Some(key)) => {
            let base = match api_base {
                Some(base) => base.to_owned(),
                None => setup::recorded_api_base(&store)?
                    .unwrap_or_else(|| api::DEFAULT_BASE_URL.to_owned()),
            };
            let base = api::parse_base_url(&base).map_err(InputError::new)?;
            Some(setup::api_client(base, Duration::from_secs(30), key)?)
        }
    };
    let (mut changes, mut cancelled) = (Vec::new(), 0);
    let (mut refused, mut not_cancelled, mut asked_later) = (Vec::new(), Vec::new(), Vec::new());
    for job in open {
        let outcome = match (job.state, &client, job.remote_id.as_deref()) {
            (JobState::Pending, _, _) => AtKrea::Cancelled,
            (JobState::Submitted, Some(client), Some(id)) => cancel_at_krea(client, id).await,
            // Its POST was never answered: whether Krea has it is for reconciliation to find.
            _ => {
                asked_later.push(job.name.clone());
                store.push_request(&Request::Cancel(job.id))?;
                continue;
            }
        };
        match outcome {
            AtKrea::Cancelled => {
                let mut job = (*job).clone();
                job.state = JobState::Cancelled;
                job.error = Some("cancelled by the user".into());
                job.finished_at = Some(crate::store::now_ms());
                changes.push(Change::Job(Box::new(job)));
                cancelled += 1;
            }
            AtKrea::Refused(reason) => {
                refused.push(format!("{}: {reason}", job.name));
                store.push_request(&Request::Cancel(job.id))?;
            }
            AtKrea::NotCancelled(why) => not_cancelled.push(format!("{}: {why}", job.name)),
        }
    }
    store.apply(&changes)?;
    let all = refused.is_empty() && asked_later.is_empty() && not_cancelled.is_empty();
    let mut message = if all {
        format!("cancelled {}", count(cancelled, "job"))
    } else {
        format!("cancelled {cancelled} of {}", count(open.len(), "job"))
    };
    if !refused.is_empty() {
        let _ = write!(
            message,
            "\nKrea refused to cancel {} (it cancels only queued or processing jobs); {}:\n  \
             {}\nThe next `krea-batch run` of this state (or the service) asks Krea again \
             whenever Krea shows it queued or processing.",
            count(refused.len(), "job"),
            if refused.len() == 1 {
                "it runs on at Krea and is billed if it completes"
            } else {
                "they run on at Krea and are billed if they complete"
            },
            refused.join("\n  ")
        );
    }
    if !asked_later.is_empty() {
        let _ = write!(
            message,
            "\nNot cancelled yet: {} sent without an answer, so it is not known whether Krea has \
             them: {}. The next `krea-batch run` of this state looks for them at Krea and \
             cancels them there, or never sends them again.",
            count(asked_later.len(), "job"),
            asked_later.join(", ")
        );
    }
    if !not_cancelled.is_empty() {
        let _ = write!(message, "\nNot cancelled:\n  {}", not_cancelled.join("\n  "));
    }
    if all { Ok(message) } else { Err(NotAllCancelled(message).into()) }
}

/// `DELETE /jobs/{id}`, and when Krea will not, a `GET` to tell a refusal from an end.
async fn cancel_at_krea(client: &KreaClient, id: &str) -> AtKrea {
    let refusal = match client.cancel_job(id).await {
        Ok(()) => return AtKrea::Cancelled,
        Err(err) if err.is_transient() || matches!(err, ApiError::Auth { .. }) => {
            return AtKrea::NotCancelled(format!("could not cancel it: {err}"));
        }
        Err(ApiError::NotFound { message } | ApiError::Rejected { message, .. }) => message,
        Err(err) => err.to_string(),
    };
    let reason = if refusal.trim().is_empty() { "no reason given".to_owned() } else { refusal };
    match client.get_job(id).await {
        Ok(remote) => match remote.status {
            Some(RemoteStatus::Cancelled) => AtKrea::Cancelled,
            Some(RemoteStatus::Completed) => AtKrea::NotCancelled(
                "Krea had already completed it (it is billed); the next run downloads it".into(),
            ),
            Some(RemoteStatus::Failed) => AtKrea::NotCancelled(
                "it had already failed at Krea (not billed); the next run records why".into(),
            ),
            Some(status) => AtKrea::Refused(format!("{reason} (Krea shows it {status})")),
            None => AtKrea::Refused(reason),
        },
        Err(ApiError::NotFound { message }) => {
            AtKrea::NotCancelled(format!("Krea does not know job {id} (404): {message}"))
        }
        Err(err) => AtKrea::Refused(format!("{reason} (its state at Krea is unknown: {err})")),
    }
}
