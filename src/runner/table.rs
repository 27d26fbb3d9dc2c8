//! The engine's job table: every job the engine holds, its phase (`phase.rs`: where it stands,
//! with the data that needs), and the one queue it waits in. A transition is one call here: it
//! checks that the move is allowed, changes the phase, moves the job between queues, writes the
//! state columns of the job's record from the phase, keeps the counts and the budget's ledger,
//! and queues the state-file write. The engine decides *what* happens to a job (`submit.rs`,
//! `poll.rs`, `fetch.rs`, `reconciling.rs`); it never touches a queue or a state column itself.
//!
//! # Queues
//!
//! A job waits in at most one queue, and only in one its phase allows: `pending` jobs in the
//! submission queue or backing off, `unknown` ones awaiting reconciliation (or in none once set
//! aside or left to the next run), `submitted` ones in the poll timers (or in none while a GET
//! or DELETE is under way), `completed` ones in the download queue (or in none while
//! downloading, or once a download failed). Leaving a phase always leaves its queue, so a
//! failed or cancelled job is in none.
//!
//! The table does not limit how many jobs are `submitting` at once, nor say when a pending job
//! may go: the loop decides (up to K POSTs on the wire, `submit.rs`), and
//! whatever decides later (a stage waiting for its parent's result) decides before calling
//! [`JobTable::submitting`].
//!
//! # An illegal transition
//!
//! [`JobState::may_become`] is the one table of allowed moves; [`JobTable::enter`] is the one
//! place that consults it, and operations that keep a job in its phase (a poll scheduled, an
//! unknown job set aside) check that phase. A move it refuses is a bug in the engine, never
//! bad input: rows are made consistent on the way in (`phase.rs`), and requests from outside
//! (`krea-batch cancel`) are checked against the phase first. It is refused with an
//! [`IllegalTransition`] and the job is left exactly as it was, nothing written. The caller
//! stops acting on that job (`?`); the engine's loop logs the error and, in debug builds,
//! fails loudly (`debug_assert!`) so the tests catch it. Refusing rather than panicking in
//! release keeps every other job going and keeps the promise not to pay twice: a job whose
//! move to `submitting` is refused is not sent, a job Krea has is never put back to `pending`.

use super::budget::Ledger;
use super::phase::{AtKrea, IllegalTransition, Phase};
use super::status::Counts;
use crate::api::RemoteJob;
use crate::job::JobState;
use crate::store::{Change, FileRecord, JobRecord};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::time::{DelayQueue, delay_queue};

/// The queue a job waits in; at most one, and only one its phase allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Queue {
    /// None: being worked on, set aside, or ended.
    None,
    /// The submission queue (`pending`).
    Submit,
    /// Waiting out its own back-off before it rejoins the submission queue (`pending`).
    BackingOff(Instant),
    /// Holding submissions until reconciliation decides (`unknown`).
    Reconcile,
    /// Waiting for its next poll (`submitted`).
    Poll(delay_queue::Key),
    /// Waiting for a download slot (`completed`).
    Download,
}

impl Queue {
    /// Whether a job in `phase` may wait in this queue.
    fn fits(self, phase: &Phase) -> bool {
        match self {
            Self::None => true,
            Self::Submit | Self::BackingOff(_) => *phase == Phase::Pending,
            Self::Reconcile => *phase == Phase::Unknown,
            Self::Poll(_) => matches!(phase, Phase::Submitted(_)),
            Self::Download => matches!(phase, Phase::Completed { .. }),
        }
    }
}

/// What the engine keeps about a job beyond its phase.
#[derive(Debug, Default)]
pub(super) struct Notes {
    /// This run's attempts of the job that got no usable answer and were shown to have created
    /// nothing: (label, detail), e.g. ("500", "Internal Server Error").
    pub(super) unanswered: Vec<(String, String)>,
}

#[derive(Debug)]
struct Slot {
    /// The image of the job's row; its state columns are written only from `phase`.
    record: JobRecord,
    phase: Phase,
    queue: Queue,
    output_dir: Arc<PathBuf>,
    notes: Notes,
}

/// Every job the engine holds, by slot (an index stable for the engine's life), with its phase,
/// its queue, and the writes its changes need. See the module docs.
#[derive(Debug)]
pub(super) struct JobTable {
    slots: Vec<Slot>,
    /// Slot of each state-file row id.
    by_id: HashMap<i64, usize>,
    /// Krea job ids claimed by a job of this table.
    remote_ids: HashMap<String, usize>,
    /// Krea job ids claimed by other batches of the state file.
    claimed_elsewhere: HashSet<String>,
    /// Jobs to submit, in order.
    submit: VecDeque<usize>,
    /// Jobs whose attempt created nothing, waiting out their back-off: (when, slot).
    backing_off: BTreeSet<(Instant, usize)>,
    /// Unknown jobs awaiting reconciliation (not those set aside or left to the next run).
    reconcile: BTreeSet<usize>,
    /// Submitted jobs waiting for their next poll.
    polls: DelayQueue<usize>,
    /// Completed jobs waiting for a download slot.
    downloads: VecDeque<usize>,
    counts: Counts,
    /// What is committed against the budget.
    ledger: Ledger,
    /// Writes not yet committed.
    changes: Vec<Change>,
    /// Jobs that ended since the last commit, for the manifest.
    ended: Vec<usize>,
}

impl JobTable {
    /// An empty table; `claimed_elsewhere` are the Krea ids other batches of the state file hold.
    pub(super) fn new(claimed_elsewhere: HashSet<String>) -> Self {
        Self {
            slots: Vec::new(),
            by_id: HashMap::new(),
            remote_ids: HashMap::new(),
            claimed_elsewhere,
            submit: VecDeque::new(),
            backing_off: BTreeSet::new(),
            reconcile: BTreeSet::new(),
            polls: DelayQueue::new(),
            downloads: VecDeque::new(),
            counts: Counts::default(),
            ledger: Ledger::default(),
            changes: Vec::new(),
            ended: Vec::new(),
        }
    }

    /// Takes a stored job on, in the queue its state calls for: pending ones at the end of the
    /// submission queue, submitted ones polled at once (they may have ended while nobody was
    /// looking), completed ones in the download queue, unknown ones awaiting reconciliation.
    /// A row is converted into its phase as `phase.rs` says. Returns the job's slot, or
    /// `None` when the job is not taken: already held (by row id), or pending and no longer in
    /// its job file.
    pub(super) fn add(
        &mut self,
        mut job: JobRecord,
        output_dir: Arc<PathBuf>,
        now_ms: i64,
    ) -> Option<usize> {
        if (!job.in_file && job.state == JobState::Pending) || self.by_id.contains_key(&job.id) {
            return None;
        }
        let (phase, repaired) = Phase::of_row(&mut job);
        if repaired {
            self.changes.push(Change::Job(Box::new(job.clone())));
        }
        let slot = self.slots.len();
        self.by_id.insert(job.id, slot);
        self.counts.add(job.state);
        self.ledger.add(&job, now_ms);
        if let Some(id) = &job.remote_id {
            self.remote_ids.insert(id.clone(), slot);
            self.claimed_elsewhere.remove(id);
        }
        self.slots.push(Slot {
            record: job,
            phase,
            queue: Queue::None,
            output_dir,
            notes: Notes::default(),
        });
        let queue = match &self.slots[slot].phase {
            Phase::Pending => Queue::Submit,
            Phase::Unknown => Queue::Reconcile,
            Phase::Submitted(_) => Queue::Poll(self.polls.insert(slot, Duration::ZERO)),
            Phase::Completed { .. } => Queue::Download,
            _ => Queue::None,
        };
        self.join(slot, queue, false);
        Some(slot)
    }

    // --- Reading -------------------------------------------------------------------------

    /// The job's record, as its row will be written.
    pub(super) fn job(&self, slot: usize) -> &JobRecord {
        &self.slots[slot].record
    }

    /// The job's phase.
    #[cfg(test)]
    pub(super) fn phase(&self, slot: usize) -> &Phase {
        &self.slots[slot].phase
    }

    /// The job's state (its phase's).
    pub(super) fn state(&self, slot: usize) -> JobState {
        self.slots[slot].phase.state()
    }

    /// The job at Krea, if it is submitted.
    pub(super) fn at_krea(&mut self, slot: usize) -> Option<&mut AtKrea> {
        match &mut self.slots[slot].phase {
            Phase::Submitted(at) => Some(at),
            _ => None,
        }
    }

    /// The output folder of the job's batch.
    pub(super) fn output_dir(&self, slot: usize) -> &Arc<PathBuf> {
        &self.slots[slot].output_dir
    }

    /// The engine's notes about the job.
    pub(super) fn notes(&self, slot: usize) -> &Notes {
        &self.slots[slot].notes
    }

    /// The same, to change.
    pub(super) fn notes_mut(&mut self, slot: usize) -> &mut Notes {
        &mut self.slots[slot].notes
    }

    /// The slot of a state-file row id.
    pub(super) fn slot_of(&self, id: i64) -> Option<usize> {
        self.by_id.get(&id).copied()
    }

    /// Every job with its output folder.
    pub(super) fn jobs(&self) -> impl Iterator<Item = (&Arc<PathBuf>, &JobRecord)> {
        self.slots.iter().map(|slot| (&slot.output_dir, &slot.record))
    }

    /// Every job's record, as it ended.
    pub(super) fn into_records(self) -> Vec<JobRecord> {
        self.slots.into_iter().map(|slot| slot.record).collect()
    }

    /// Jobs by state.
    pub(super) fn counts(&self) -> Counts {
        self.counts
    }

    /// What is committed against the budget.
    pub(super) fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The job of this table that holds a Krea job id, if any.
    pub(super) fn slot_of_remote(&self, remote_id: &str) -> Option<usize> {
        self.remote_ids.get(remote_id).copied()
    }

    /// Who already holds a Krea job id, if anyone.
    pub(super) fn claim_owner(&self, remote_id: &str) -> Option<String> {
        if let Some(&owner) = self.remote_ids.get(remote_id) {
            return Some(format!("job {}", self.slots[owner].record.name));
        }
        self.claimed_elsewhere.contains(remote_id).then(|| "another job file's job".to_owned())
    }

    /// Every Krea job id held, here or by other batches: what reconciliation must not adopt.
    pub(super) fn claimed(&self) -> HashSet<String> {
        self.remote_ids.keys().chain(self.claimed_elsewhere.iter()).cloned().collect()
    }

    /// The next job to submit, left in the queue.
    pub(super) fn next_to_submit(&self) -> Option<usize> {
        self.submit.front().copied()
    }

    /// Whether a pending job waits, in the queue or backing off.
    pub(super) fn has_pending(&self) -> bool {
        !(self.submit.is_empty() && self.backing_off.is_empty())
    }

    /// When the next job's back-off ends, if one is backing off.
    pub(super) fn backoff_wake(&self) -> Option<Instant> {
        self.backing_off.first().map(|(due, _)| *due)
    }

    /// How many unknown jobs await reconciliation (each holds submissions back).
    pub(super) fn waiting_to_reconcile(&self) -> usize {
        self.reconcile.len()
    }

    /// Unknown jobs awaiting reconciliation, in slot order.
    pub(super) fn awaiting_reconciliation(&self) -> impl ExactSizeIterator<Item = usize> + '_ {
        self.reconcile.iter().copied()
    }

    /// Whether any submitted job waits for a poll.
    pub(super) fn has_polls(&self) -> bool {
        !self.polls.is_empty()
    }

    /// Whether any completed job waits for a download slot.
    pub(super) fn has_downloads(&self) -> bool {
        !self.downloads.is_empty()
    }

    // --- Transitions ---------------------------------------------------------------------

    /// `pending` → `submitting`: records the attempt (its time, one more attempt) and takes the
    /// job out of the submission queue. The POST may start once this is committed.
    pub(super) fn submitting(&mut self, slot: usize, now_ms: i64) -> Result<(), IllegalTransition> {
        self.enter(slot, Phase::Submitting, Queue::None, None, now_ms, |job| {
            job.attempt_at = Some(now_ms);
            job.attempt_ended = None;
            job.attempts += 1;
        })
    }

    /// Back to `pending` at the head of the submission queue: the POST was answered with a
    /// refusal that proves nothing was created, or reconciliation showed it created nothing.
    pub(super) fn requeue(&mut self, slot: usize, now_ms: i64) -> Result<(), IllegalTransition> {
        self.enter(slot, Phase::Pending, Queue::Submit, None, now_ms, |_| {})
    }

    /// Back to `pending`, but sent again only after `until` (then at the head of the queue),
    /// while the other jobs go on.
    pub(super) fn back_to_pending_after(
        &mut self,
        slot: usize,
        until: Instant,
        now_ms: i64,
    ) -> Result<(), IllegalTransition> {
        self.enter(slot, Phase::Pending, Queue::BackingOff(until), None, now_ms, |_| {})
    }

    /// Moves the jobs whose back-off has ended (by `now`) to the head of the submission queue.
    pub(super) fn release_backed_off(&mut self, now: Instant) {
        while let Some(&(due, slot)) = self.backing_off.first() {
            if due > now {
                break;
            }
            self.leave(slot);
            self.join(slot, Queue::Submit, true);
        }
    }

    /// `submitting` → `unknown`: the POST ended at `ended_ms` without a usable answer. With
    /// `reconcile`, the job holds submissions until reconciliation decides; without (after a
    /// Ctrl-C, while draining), it is left unknown for the next run.
    pub(super) fn unanswered(
        &mut self,
        slot: usize,
        ended_ms: i64,
        reason: String,
        reconcile: bool,
    ) -> Result<(), IllegalTransition> {
        let queue = if reconcile { Queue::Reconcile } else { Queue::None };
        self.enter(slot, Phase::Unknown, queue, Some(reason), ended_ms, |job| {
            job.attempt_ended = Some(ended_ms);
        })
    }

    /// `submitting` → `submitted`: Krea accepted the POST at `now_ms` and named the job. The
    /// id is claimed for this job. It waits in no queue until the engine schedules its poll
    /// (or cancels it, or completes it) from what the answer said.
    pub(super) fn accepted(
        &mut self,
        slot: usize,
        remote: &RemoteJob,
        now_ms: i64,
    ) -> Result<(), IllegalTransition> {
        self.at_krea_from(slot, remote, Some(now_ms), now_ms)
    }

    /// `unknown` → `submitted`: reconciliation found the job at Krea. As [`Self::accepted`], but
    /// with no time of an answer (there was none).
    pub(super) fn adopted(
        &mut self,
        slot: usize,
        remote: &RemoteJob,
        now_ms: i64,
    ) -> Result<(), IllegalTransition> {
        self.at_krea_from(slot, remote, None, now_ms)
    }

    fn at_krea_from(
        &mut self,
        slot: usize,
        remote: &RemoteJob,
        answered_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<(), IllegalTransition> {
        let phase = Phase::Submitted(AtKrea::new(remote.job_id.clone()));
        self.enter(slot, phase, Queue::None, None, now_ms, |job| {
            if remote.created_at.is_some() {
                job.created_at.clone_from(&remote.created_at);
            }
            if answered_ms.is_some() {
                job.submitted_at = answered_ms;
            }
        })?;
        self.remote_ids.insert(remote.job_id.clone(), slot);
        Ok(())
    }

    /// → `completed`: Krea finished the job with these results; it joins the download queue.
    pub(super) fn completed(
        &mut self,
        slot: usize,
        urls: Vec<String>,
        now_ms: i64,
    ) -> Result<(), IllegalTransition> {
        self.enter(slot, Phase::Completed { urls }, Queue::Download, None, now_ms, |_| {})
    }

    /// `completed` → `downloaded`: every result is on disk; the error (a pending download's)
    /// is cleared.
    pub(super) fn downloaded(&mut self, slot: usize, now_ms: i64) -> Result<(), IllegalTransition> {
        self.enter(slot, Phase::Downloaded, Queue::None, None, now_ms, |job| job.error = None)
    }

    /// → `failed`, for `reason`; the job leaves every queue.
    pub(super) fn failed(
        &mut self,
        slot: usize,
        reason: String,
        now_ms: i64,
    ) -> Result<(), IllegalTransition> {
        let phase = Phase::Failed { reason: reason.clone() };
        self.enter(slot, phase, Queue::None, Some(reason), now_ms, |_| {})
    }

    /// → `cancelled` (before submission, or at Krea); `note` replaces the recorded error when
    /// given. The job leaves every queue.
    pub(super) fn cancelled(
        &mut self,
        slot: usize,
        note: Option<String>,
        now_ms: i64,
    ) -> Result<(), IllegalTransition> {
        self.enter(slot, Phase::Cancelled, Queue::None, note, now_ms, |_| {})
    }

    /// Fails every pending job of `model` (its model is refused): those in the submission
    /// queue in their order, then those backing off.
    pub(super) fn fail_pending_of_model(
        &mut self,
        model: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<(), IllegalTransition> {
        let of_model = |slot: &usize| self.slots[*slot].record.model == model;
        let doomed: Vec<usize> = self
            .submit
            .iter()
            .filter(|slot| of_model(slot))
            .chain(self.backing_off.iter().map(|(_, slot)| slot).filter(|slot| of_model(slot)))
            .copied()
            .collect();
        for slot in doomed {
            self.failed(slot, reason.to_owned(), now_ms)?;
        }
        Ok(())
    }

    /// The one step every transition takes: checks the move ([`JobState::may_become`]), and
    /// only if it is allowed leaves the old queue, applies `details` and the phase to the
    /// record (`error` replaces the recorded one when given; reaching `completed` or an end
    /// dates it), keeps the counts and the ledger, joins `queue` and queues the write.
    fn enter(
        &mut self,
        slot: usize,
        phase: Phase,
        queue: Queue,
        error: Option<String>,
        now_ms: i64,
        details: impl FnOnce(&mut JobRecord),
    ) -> Result<(), IllegalTransition> {
        let from = self.slots[slot].phase.state();
        let to = phase.state();
        if !from.may_become(to) {
            return Err(self.refused(slot, to));
        }
        debug_assert!(queue.fits(&phase), "{queue:?} does not fit {phase:?}");
        self.leave(slot);
        let entry = &mut self.slots[slot];
        let job = &mut entry.record;
        details(job);
        job.state = to;
        match &phase {
            Phase::Submitted(at) => job.remote_id = Some(at.remote_id().to_owned()),
            Phase::Completed { urls } => job.urls.clone_from(urls),
            _ => {}
        }
        if error.is_some() {
            job.error = error;
        }
        if to.is_final() || to == JobState::Completed {
            job.finished_at.get_or_insert(now_ms);
        }
        entry.phase = phase;
        self.counts.moved(from, to);
        self.ledger.moved(&self.slots[slot].record, from, now_ms);
        if to.is_final() {
            self.ended.push(slot);
        }
        self.join(slot, queue, true);
        self.touch(slot);
        Ok(())
    }

    /// The error for an operation on `slot` that needs it to go to (or be in) `to`.
    pub(super) fn refused(&self, slot: usize, to: JobState) -> IllegalTransition {
        IllegalTransition {
            job: self.slots[slot].record.name.clone(),
            from: self.slots[slot].phase.state(),
            to,
        }
    }

    // --- Queues without a change of phase --------------------------------------------------

    /// Schedules the submitted job's next poll after the delay `next` gives from the last
    /// one (`None` before the first).
    pub(super) fn schedule_poll(
        &mut self,
        slot: usize,
        next: impl FnOnce(Option<Duration>) -> Duration,
    ) -> Result<(), IllegalTransition> {
        let Phase::Submitted(at) = &mut self.slots[slot].phase else {
            return Err(self.refused(slot, JobState::Submitted));
        };
        let delay = next(at.poll_delay);
        at.poll_delay = Some(delay);
        self.leave(slot);
        let key = self.polls.insert(slot, delay);
        self.join(slot, Queue::Poll(key), false);
        Ok(())
    }

    /// The next job whose poll is due, once one is (pending forever when none waits); it
    /// leaves the poll timers. Cancel-safe: a job is taken only when this resolves.
    pub(super) async fn next_poll(&mut self) -> Option<usize> {
        let expired = std::future::poll_fn(|cx| self.polls.poll_expired(cx)).await?;
        let slot = expired.into_inner();
        self.slots[slot].queue = Queue::None;
        Some(slot)
    }

    /// The next completed job to download, out of the download queue.
    pub(super) fn next_download(&mut self) -> Option<usize> {
        let slot = *self.downloads.front()?;
        self.leave(slot);
        Some(slot)
    }

    /// Empties the download queue (the service drains): the jobs stay `completed`, download
    /// pending, for the next start.
    pub(super) fn drop_downloads(&mut self) {
        while self.next_download().is_some() {}
    }

    /// Stops holding submissions for an unknown job that cannot be reconciled with confidence,
    /// and records why. It stays `unknown`: never submitted again by krea-batch.
    pub(super) fn set_aside(
        &mut self,
        slot: usize,
        reason: String,
    ) -> Result<(), IllegalTransition> {
        if self.slots[slot].phase != Phase::Unknown {
            return Err(self.refused(slot, JobState::Unknown));
        }
        self.leave(slot);
        self.slots[slot].record.error = Some(reason);
        self.touch(slot);
        Ok(())
    }

    /// Stops waiting to reconcile (a Ctrl-C or SIGTERM): the unknown jobs stay `unknown` in the
    /// state file for the next run. Returns the names of those that were waiting.
    pub(super) fn leave_unknown_to_next_run(&mut self) -> Vec<String> {
        let waiting: Vec<usize> = self.reconcile.iter().copied().collect();
        waiting
            .into_iter()
            .map(|slot| {
                self.leave(slot);
                self.slots[slot].record.name.clone()
            })
            .collect()
    }

    fn leave(&mut self, slot: usize) {
        match std::mem::replace(&mut self.slots[slot].queue, Queue::None) {
            Queue::None => {}
            Queue::Submit => {
                if self.submit.front() == Some(&slot) {
                    self.submit.pop_front();
                } else {
                    self.submit.retain(|&waiting| waiting != slot);
                }
            }
            Queue::BackingOff(due) => {
                self.backing_off.remove(&(due, slot));
            }
            Queue::Reconcile => {
                self.reconcile.remove(&slot);
            }
            Queue::Poll(key) => {
                self.polls.remove(&key);
            }
            Queue::Download => {
                if self.downloads.front() == Some(&slot) {
                    self.downloads.pop_front();
                } else {
                    self.downloads.retain(|&waiting| waiting != slot);
                }
            }
        }
    }

    /// Puts a job that is in no queue into `queue`: the submission queue at its head when
    /// `first` (a job put back) or its end (a job taken on); the download queue at its end.
    fn join(&mut self, slot: usize, queue: Queue, first: bool) {
        debug_assert_eq!(self.slots[slot].queue, Queue::None);
        match queue {
            Queue::None | Queue::Poll(_) => {}
            Queue::Submit if first => self.submit.push_front(slot),
            Queue::Submit => self.submit.push_back(slot),
            Queue::BackingOff(due) => {
                self.backing_off.insert((due, slot));
            }
            Queue::Reconcile => {
                self.reconcile.insert(slot);
            }
            Queue::Download => self.downloads.push_back(slot),
        }
        self.slots[slot].queue = queue;
    }

    // --- Writes without a change of phase --------------------------------------------------

    /// Takes in what Krea says of a submitted job (its status and times); returns whether its
    /// status changed. Nothing is written: the caller decides ([`Self::touch`]).
    pub(super) fn remote_update(&mut self, slot: usize, status: &str, remote: &RemoteJob) -> bool {
        let job = &mut self.slots[slot].record;
        let changed = job.remote_status.as_deref() != Some(status);
        job.remote_status = Some(status.to_owned());
        if remote.created_at.is_some() {
            job.created_at.clone_from(&remote.created_at);
        }
        if remote.completed_at.is_some() {
            job.completed_at.clone_from(&remote.completed_at);
        }
        changed
    }

    /// Records when the job's POST ended (an accepted POST that cannot be kept).
    pub(super) fn attempt_ended(&mut self, slot: usize, now_ms: i64) {
        self.slots[slot].record.attempt_ended = Some(now_ms);
    }

    /// Records a result file as whole on disk.
    pub(super) fn file_written(&mut self, slot: usize, file: FileRecord) {
        let job = &mut self.slots[slot].record;
        self.changes.push(Change::File { job_id: job.id, file: file.clone() });
        job.files.retain(|known| known.index != file.index);
        job.files.push(file);
        job.files.sort_by_key(|file| file.index);
    }

    /// A completed job's download failed: it stays `completed`, in no queue, with why.
    pub(super) fn download_pending(&mut self, slot: usize, error: &str) {
        self.slots[slot].record.error = Some(format!("download pending: {error}"));
        self.touch(slot);
    }

    /// Queues a write of the job as it is.
    pub(super) fn touch(&mut self, slot: usize) {
        self.changes.push(Change::Job(Box::new(self.slots[slot].record.clone())));
    }

    /// The writes queued since the last call, and the jobs that ended meanwhile.
    pub(super) fn take_changes(&mut self) -> (Vec<Change>, Vec<usize>) {
        (std::mem::take(&mut self.changes), std::mem::take(&mut self.ended))
    }

    /// Whether writes are waiting.
    pub(super) fn has_changes(&self) -> bool {
        !self.changes.is_empty()
    }

    /// What is broken in the table, if anything: a job in a queue its phase does not allow, a
    /// queue and a job disagreeing on whether it waits there, a record whose state columns do
    /// not follow its phase, counts that are not the jobs'. Checked by the tests after every
    /// operation of theirs and after every turn of the engine's loop.
    #[cfg(test)]
    pub(super) fn broken(&self) -> Option<String> {
        let once = |count: usize, waits: bool| count == usize::from(waits);
        for (slot, entry) in self.slots.iter().enumerate() {
            let name = &entry.record.name;
            let (phase, queue) = (&entry.phase, entry.queue);
            if !queue.fits(phase) {
                return Some(format!("{name}: {phase:?} waits in {queue:?}"));
            }
            let in_queues = [
                once(self.submit.iter().filter(|&&s| s == slot).count(), queue == Queue::Submit),
                once(
                    self.backing_off.iter().filter(|(_, s)| *s == slot).count(),
                    matches!(queue, Queue::BackingOff(_)),
                ),
                self.reconcile.contains(&slot) == (queue == Queue::Reconcile),
                once(
                    self.downloads.iter().filter(|&&s| s == slot).count(),
                    queue == Queue::Download,
                ),
            ];
            if in_queues.contains(&false) {
                return Some(format!("{name}: marked {queue:?}, queues say {in_queues:?}"));
            }
            if let Queue::BackingOff(due) = queue
                && !self.backing_off.contains(&(due, slot))
            {
                return Some(format!("{name}: backing off until another time"));
            }
            if entry.record.state != phase.state() {
                return Some(format!("{name}: recorded {} but {phase:?}", entry.record.state));
            }
            let columns_follow = match phase {
                Phase::Submitted(at) => {
                    entry.record.remote_id.as_deref() == Some(at.remote_id())
                        && self.remote_ids.get(at.remote_id()) == Some(&slot)
                }
                Phase::Completed { urls } => entry.record.urls == *urls,
                Phase::Failed { reason } => entry.record.error.as_deref().unwrap_or("") == reason,
                _ => true,
            };
            if !columns_follow {
                return Some(format!("{name}: its record's columns do not follow {phase:?}"));
            }
        }
        let polled = self.slots.iter().filter(|entry| matches!(entry.queue, Queue::Poll(_)));
        if polled.count() != self.polls.len() {
            return Some(format!("{} poll timers for other jobs", self.polls.len()));
        }
        let recounted = Counts::of(self.slots.iter().map(|entry| &entry.record));
        (recounted != self.counts).then(|| format!("counts {:?}, jobs {recounted:?}", self.counts))
    }
}

#[cfg(test)]
#[path = "table_tests.rs"]
mod tests;
