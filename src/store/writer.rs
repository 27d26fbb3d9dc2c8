//! The engine's writer: one thread owning the writing connection (or, for tests on paused
//! time, the connection used inline on the caller's thread).

use super::{Change, Store, StoreError};
use std::path::PathBuf;
use std::sync::Arc;

/// The engine's handle on the state file: a thread that owns the writing connection and commits
/// what it is sent. Requests that queue up while a commit runs are merged into the next one, so
/// a busy engine pays for one fsync per batch rather than per job.
///
/// [`StoreWriter::inline`] makes one that runs every call on the caller instead: awaiting a
/// reply from another thread leaves a paused tokio runtime idle, and paused time then jumps to
/// the next timer; inline, a commit takes no virtual time. Tests use it; production uses the
/// thread.
#[derive(Clone, Debug)]
pub(crate) struct StoreWriter {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Thread {
        requests: tokio::sync::mpsc::UnboundedSender<WriteRequest>,
        thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
    },
    /// Only tests on paused time keep the store inline ([`StoreWriter::inline`]).
    #[cfg(test)]
    Inline(Arc<std::sync::Mutex<Store>>),
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Thread { .. } => "Thread",
            #[cfg(test)]
            Self::Inline(_) => "Inline",
        })
    }
}

/// Work for the writer thread: changes to commit, or a function to run on the store.
enum WriteRequest {
    /// Changes, whether they must be fsynced, and where to say it is done.
    Commit(Vec<Change>, bool, tokio::sync::oneshot::Sender<Result<(), Arc<StoreError>>>),
    Call(Box<dyn FnOnce(&mut Store) + Send>),
}

impl StoreWriter {
    /// Moves `store` onto its own thread.
    pub(crate) fn spawn(mut store: Store) -> Result<Self, StoreError> {
        let (requests, mut receiver) = tokio::sync::mpsc::unbounded_channel::<WriteRequest>();
        let thread = std::thread::Builder::new()
            .name("krea-batch-store".into())
            .spawn(move || {
                let mut next = receiver.blocking_recv();
                while let Some(request) = next.take() {
                    let (mut changes, mut synced, mut replies) = match request {
                        WriteRequest::Call(call) => {
                            call(&mut store);
                            next = receiver.blocking_recv();
                            continue;
                        }
                        WriteRequest::Commit(changes, synced, reply) => {
                            (changes, synced, vec![reply])
                        }
                    };
                    // Merge the commits queued meanwhile into one transaction.
                    loop {
                        match receiver.try_recv() {
                            Ok(WriteRequest::Commit(more, more_synced, reply)) => {
                                changes.extend(more);
                                synced |= more_synced;
                                replies.push(reply);
                            }
                            Ok(call) => {
                                next = Some(call);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    // One error for every merged commit: shared, not flattened to text.
                    let result = store.apply_with(&changes, synced).map_err(Arc::new);
                    for reply in replies {
                        let _ = reply.send(result.clone());
                    }
                    if next.is_none() {
                        next = receiver.blocking_recv();
                    }
                }
            })
            .map_err(|source| StoreError::Io { path: PathBuf::from("<store thread>"), source })?;
        let thread = Arc::new(std::sync::Mutex::new(Some(thread)));
        Ok(Self { inner: Inner::Thread { requests, thread } })
    }

    /// Keeps `store` on the caller: every call runs synchronously where it is awaited, taking no
    /// (virtual) time. For tests on paused tokio time.
    #[cfg(test)]
    #[must_use]
    pub(crate) fn inline(store: Store) -> Self {
        Self { inner: Inner::Inline(Arc::new(std::sync::Mutex::new(store))) }
    }

    /// Runs `call` on the inline store.
    #[cfg(test)]
    fn run_inline<T>(
        store: &std::sync::Mutex<Store>,
        call: impl FnOnce(&mut Store) -> T,
    ) -> Result<T, StoreError> {
        let mut store = store.lock().map_err(|_| StoreError::WriterGone)?;
        Ok(call(&mut store))
    }

    /// Waits until every handle is dropped and the queue is written, then for the thread to
    /// close the state file and release the one-writer lock.
    pub(crate) async fn close(self) {
        let thread = match &self.inner {
            Inner::Thread { thread, .. } => thread.lock().ok().and_then(|mut thread| thread.take()),
            #[cfg(test)]
            Inner::Inline(_) => return,
        };
        drop(self);
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }

    /// Commits `changes`, fsynced only if `synced` (see [`Store::apply_with`]).
    pub(crate) async fn commit_with(
        &self,
        changes: Vec<Change>,
        synced: bool,
    ) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let requests = match &self.inner {
            Inner::Thread { requests, .. } => requests,
            #[cfg(test)]
            Inner::Inline(store) => {
                return Self::run_inline(store, |store| store.apply_with(&changes, synced))?
                    .map_err(|err| StoreError::WriteFailed(Arc::new(err)));
            }
        };
        let (reply, done) = tokio::sync::oneshot::channel();
        requests
            .send(WriteRequest::Commit(changes, synced, reply))
            .map_err(|_| StoreError::WriterGone)?;
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(StoreError::WriteFailed(err)),
            Err(_) => Err(StoreError::WriterGone),
        }
    }

    /// Runs `call` on the writer thread with the store (an import, reading requests), after
    /// the commits sent before it.
    pub(crate) async fn with_store<T: Send + 'static>(
        &self,
        call: impl FnOnce(&mut Store) -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        let requests = match &self.inner {
            Inner::Thread { requests, .. } => requests,
            #[cfg(test)]
            Inner::Inline(store) => return Self::run_inline(store, call),
        };
        let (reply, done) = tokio::sync::oneshot::channel();
        let call = Box::new(move |store: &mut Store| {
            let _ = reply.send(call(store));
        });
        requests.send(WriteRequest::Call(call)).map_err(|_| StoreError::WriterGone)?;
        done.await.map_err(|_| StoreError::WriterGone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::Instant;

    /// Paused time jumps to the next timer whenever the runtime is idle, as it is while a reply
    /// from the writer thread is awaited; inline, the store's work takes no virtual time.
    #[tokio::test(start_paused = true)]
    async fn an_inline_writer_takes_no_virtual_time() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let store = Store::open_writer(&dir.path().join("state.db")).expect("the state");
        let writer = StoreWriter::inline(store);
        let timer = tokio::spawn(tokio::time::sleep(Duration::from_hours(1)));
        let started = Instant::now();
        // Through a thread, one of these replies would come after the runtime went idle.
        for _ in 0..100 {
            let jobs = writer.with_store(|store| store.jobs(None)).await.expect("the writer");
            assert!(jobs.expect("the jobs").is_empty());
        }
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert!(!timer.is_finished());
        writer.close().await;
    }
}
