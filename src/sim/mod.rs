//! The simulated Krea API: a real HTTP server on loopback that behaves like Krea, quirks and
//! failures included, so tests, the benchmark and new users can run krea-batch against it
//! in-process (`--simulate`) or as its own process (`krea-batch simulate-api`). It models Krea,
//! not krea-batch, and depends on nothing else in the crate.
//!
//! # Listeners
//!
//! [`SimServer::start`] binds three listeners on 127.0.0.1, three different origins:
//! - the **API** ([`SimServer::base_url`]): `POST /generate/<kind>/<provider>/<model>`,
//!   `GET /jobs`, `GET`/`DELETE /jobs/{id}`, `POST`/`GET /assets` (uploads), `GET /openapi.json` (no key needed), and the control
//!   endpoints `GET /_sim/stats`, `POST /_sim/balance` (`{"usd": 12.5}`: sets it),
//!   `POST /_sim/top-up` (`{"usd": 5}`: adds to it; what `simulate-api --top-up` sends),
//!   `POST /_sim/faults` (a [`Faults`] object), and `GET /_sim/jobs` (every job created, oldest
//!   first, with the prompt that created it: `{"jobs": [`[`JobRecord`]`, …]}`, so a test can check
//!   that a result was attributed to the job its prompt made), which need the key but are
//!   neither faulted nor recorded;
//! - the **file host** ([`SimServer::files_base_url`]): `/results/<job_id>/<i>.png` (`.mp4` for
//!   video), `/previews/<job_id>/<i>.png`, and uploaded assets at the URLs their uploads
//!   returned (`/assets/<id>.<ext>`);
//! - a **third origin** that redirect faults point at; it serves the same files.
//!
//! # Decisions where Krea's documents are silent
//!
//! - **Reservation.** A job's price is reserved when it is created and held until it ends:
//!   charged when it completes, released when it fails or is cancelled. A POST whose price does
//!   not fit in (balance − reserved) gets 402. So the balance covers every job in flight, and
//!   jobs in flight always finish normally, as Krea documents. Setting the balance below what is
//!   reserved (a test cutting funds) lets it go negative as those jobs complete.
//! - A POST is checked in this order: faults, 401, the request-rate 429
//!   ([`SimConfig::post_rate_limit`]), 410 (sunset), 403, 404 (unknown model), 400, 422, 402,
//!   the concurrency 429. The two 429s say different things (Krea documents only the
//!   concurrency one's text), so a client can tell them apart. A 402 turns on the "after 402" marker that [`SimStats::posts_after_402`]
//!   counts against; [`SimServer::set_balance`] turns it off.
//! - Lifecycle by fraction of the job time, once started: `queued` 0–10 %, `scheduled` 10–20 %,
//!   (the undocumented state 20–30 %, if configured), `processing` to 50 %, `sampling` to 80 %,
//!   `intermediate-complete` (with preview URLs in `result.urls`) to 100 %, then `completed`.
//!   Failing jobs fail at 50 %; stuck jobs stay `processing`. The automatic timeout counts from
//!   the start, not from creation (a backlogged job has not started).
//! - The create response always shows the job as created (`queued` or `backlogged`,
//!   `completed_at` and `result` null), as Krea's schema does, even when a zero job time has
//!   already finished it.
//! - `created_at` is unique per job (bumped by a millisecond on a collision), so the strict
//!   `cursor` of `GET /jobs` pages without losing jobs. `next_cursor` is set only when more jobs
//!   match beyond the page.
//! - Cancelling follows the doc literally: only `queued` or `processing` jobs (see
//!   [`SimConfig::cancel_any_pending`]); a failed or cancelled job is never billed.
//! - Job `type`: `flux`, `krea-2`, `externalImage`, `externalVideo`, `enhance`.
//! - **Hostile tests only:** [`SimConfig::echo_key`] makes the server quote `Bearer <key>` in
//!   the texts it writes (Krea does not), to check that the client redacts server text.
//! - **POST latency** ([`SimConfig::post_latency`]): a `POST /generate` is handled on arrival
//!   (its job created then) and answered after the latency, on its own connection, so other
//!   requests go on meanwhile: the round trip of a distant API, and the worst case for a client
//!   that loses the answer, since the job exists all that time.
//! - Result files exist as soon as the job does (their URLs are only published on completion).
//! - Result files are stand-ins that tell themselves apart: an image shows its prompt and seed
//!   (or job id) in the requested aspect ratio, 512 pixels on its longer side
//!   (`picture.rs`); a video is one short checked-in H.264 clip (`files.rs`). Krea's real
//!   sizes are not drawn: nothing downstream reads pixels.
//! - Job ids are random version-4 UUIDs from the operating system's randomness, never from
//!   `seed`: two simulations never hand out the same id, as Krea never does. (`seed` keeps
//!   random failures and faults reproducible.)
//! - **Inputs.** A job whose input URL (`image_url`, `start_image`, …) is neither a `data:` URL,
//!   nor an asset this account uploaded, nor a result of one of its jobs is refused with a 400,
//!   as Krea refuses a URL it cannot fetch (a local path, a host it cannot reach). A dropped
//!   POST (`faults.post_drop_rate`) drops uploads as well as job creations: the asset exists
//!   and its answer is lost.
//! - A world kept in a file ([`SimServer::start_with_world`]) outlives the process as Krea's
//!   account outlives a client: jobs run on while no simulation serves them.
//!
//! # Files
//!
//! No file here imports one that imports it back (no circle), so each reads on its own.
//!
//! | file | job |
//! |---|---|
//! | `assets.rs` | uploads: `POST`/`GET /assets`, their files, which input URLs are the account's own |
//! | `config.rs` | [`SimConfig`], [`Faults`], [`Quirks`]: the settings |
//! | `world.rs` | the pure model: jobs, lifecycle, concurrency, balance (no I/O) |
//! | `world_file.rs` | the world kept in a file across restarts (`--simulate`, `--world`), its lock, top-ups of it |
//! | `jobs.rs` | the job vocabulary: states and wire names, views, queries, refusals |
//! | `ids.rs` | identities and timestamps as Krea writes them: UUIDs, RFC 3339, `%XX` decoding |
//! | `models.rs` | the model table: schemas and prices |
//! | `validate.rs` | request bodies checked against a model's schema |
//! | `openapi.rs` | the served OpenAPI document, built from the model table |
//! | `render.rs` | job and list JSON, shaped by the quirks |
//! | `http.rs` | routing, authentication, the control endpoints |
//! | `faults.rs` | drawing faults and building broken answers |
//! | `files.rs` | the file host: streamed, hashed result files |
//! | `png.rs` | PNG bytes by hand: CRC-32, Adler-32, stored deflate |
//! | `reply.rs` | response bodies and builders |
//! | `padding.rs` | the filler that pads large bodies (results, the huge-JSON fault) |
//! | `rate.rs` | the request-rate limit on `POST /generate`: a sliding window |
//! | `stats.rs` | [`SimStats`] and its recorder |

mod assets;
mod config;
mod faults;
mod files;
mod http;
mod ids;
mod jobs;
mod models;
mod openapi;
mod padding;
mod picture;
mod png;
mod rate;
mod render;
mod reply;
mod stats;
mod validate;
mod world;
mod world_file;

#[cfg(test)]
mod tests;

pub use config::{
    DEFAULT_CONFIG_YAML, Faults, Quirks, RATE_LIMIT_MESSAGE, RateLimit, SimConfig, Storm,
    SunsetNotice, config_keys_help,
};
pub use stats::{JobRecord, Listener, RequestRecord, ServedFile, SimStats};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use models::MICROS_PER_USD;
use render::Renderer;
use stats::Recorder;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use world::{Millis, World};
pub use world_file::{FileTopUp, WORLD_FILE, WorldFileError, top_up_file};
use world_file::{SavedPorts, SavedWorld, WorldFile};

/// A running simulated Krea API. Dropping it stops the listeners too; [`SimServer::shutdown`]
/// also waits for them.
#[derive(Debug)]
pub struct SimServer {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl SimServer {
    /// Binds the three listeners on 127.0.0.1 (ports from `config`, 0 for any) and starts
    /// serving on the current tokio runtime. The world lives in memory only.
    pub async fn start(config: SimConfig) -> std::io::Result<Self> {
        let ports = SavedPorts {
            api: config.api_port,
            files: config.files_port,
            redirect: config.redirect_port,
        };
        let world = World::new(&config);
        Self::serve_world(config, world, ports, None).await
    }

    /// Like [`SimServer::start`], with the world kept in `path`: taken up again when the file
    /// exists (its jobs, ids, timings and balance; `config` then sets the behaviour, not the
    /// balance), saved after every change, and served on the ports it was served on before
    /// when `config` names none and they are free. Refused while another simulation serves it.
    pub async fn start_with_world(config: SimConfig, path: &Path) -> Result<Self, SimError> {
        let (file, saved) = WorldFile::open(path)?;
        let unreadable = |detail| WorldFileError::Unreadable { path: path.to_owned(), detail };
        let (world, world_id, before) = match saved {
            Some(saved) => {
                let world = World::restore(&config, saved.account).map_err(unreadable)?;
                (world, saved.world_id, saved.ports)
            }
            None => (World::new(&config), ids::random_uuid(), SavedPorts::default()),
        };
        let pick = |configured: u16, before: u16| if configured == 0 { before } else { configured };
        let ports = SavedPorts {
            api: pick(config.api_port, before.api),
            files: pick(config.files_port, before.files),
            redirect: pick(config.redirect_port, before.redirect),
        };
        let persisted = Persisted { file, world_id, saved: Mutex::new(None) };
        let server = Self::serve_world(config, world, ports, Some(persisted)).await?;
        // Saved at once: the world exists (with its id and ports) from its first start.
        server.shared.persist();
        Ok(server)
    }

    async fn serve_world(
        config: SimConfig,
        world: World,
        ports: SavedPorts,
        persisted: Option<Persisted>,
    ) -> std::io::Result<Self> {
        // A remembered port taken meanwhile by another program: any free one instead (only
        // results not yet downloaded from the earlier address are then out of reach). A port
        // the configuration names is used or refused, never swapped.
        let remembered = persisted.is_some();
        let bind = |port: u16, configured: u16| async move {
            let listen = |port| TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
            match listen(port).await {
                Err(err) if remembered && port != 0 && configured == 0 => {
                    tracing::warn!(port, error = %err, "the simulation's earlier port is taken; listening on another");
                    listen(0).await
                }
                other => other,
            }
        };
        let api = bind(ports.api, config.api_port).await?;
        let files = bind(ports.files, config.files_port).await?;
        let redirect = bind(ports.redirect, config.redirect_port).await?;
        let origin = |listener: &TcpListener| -> std::io::Result<String> {
            Ok(format!("http://{}", listener.local_addr()?))
        };
        let (api_base, files_base, redirect_base) =
            (origin(&api)?, origin(&files)?, origin(&redirect)?);
        let bound = SavedPorts {
            api: api.local_addr()?.port(),
            files: files.local_addr()?.port(),
            redirect: redirect.local_addr()?.port(),
        };
        let epoch_ms = now_unix_ms();
        let state = State {
            world,
            recorder: Recorder::new(config.request_log_limit),
            faults: config.faults.clone(),
            faults_set_ms: epoch_ms,
            posts_failed: 0,
            rng: fastrand::Rng::with_seed(config.seed.wrapping_add(1)),
            after_402: false,
            generation: 0,
            post_rate: rate::RateWindow::default(),
        };
        let shared = Arc::new(Shared {
            config,
            api_base,
            files_base,
            redirect_base,
            ports: bound,
            epoch: Instant::now(),
            epoch_ms,
            state: Mutex::new(state),
            persisted,
        });
        let (stop, stopped) = watch::channel(false);
        let tasks =
            [(api, Listener::Api), (files, Listener::Files), (redirect, Listener::Redirect)]
                .into_iter()
                .map(|(listener, which)| {
                    tokio::spawn(serve(listener, which, Arc::clone(&shared), stopped.clone()))
                })
                .collect();
        Ok(Self { shared, stop, tasks })
    }

    /// The identity of a persistent world ([`SimServer::start_with_world`]): the same for as
    /// long as its file lives, whatever ports it listens on.
    #[must_use]
    pub fn world_id(&self) -> Option<&str> {
        self.shared.persisted.as_ref().map(|persisted| persisted.world_id.as_str())
    }

    /// The API origin, e.g. `http://127.0.0.1:41234`.
    #[must_use]
    pub fn base_url(&self) -> String {
        self.shared.api_base.clone()
    }

    /// The result-file host, a different origin from the API.
    #[must_use]
    pub fn files_base_url(&self) -> String {
        self.shared.files_base.clone()
    }

    /// The third origin some redirect faults send downloads to.
    #[must_use]
    pub fn redirect_base_url(&self) -> String {
        self.shared.redirect_base.clone()
    }

    /// The API key the server accepts.
    #[must_use]
    pub fn api_key(&self) -> &str {
        &self.shared.config.api_key
    }

    /// A snapshot of everything recorded so far.
    #[must_use]
    pub fn stats(&self) -> SimStats {
        self.shared.stats()
    }

    /// Every job created so far, oldest first, each with the prompt that created it: what a
    /// test checks attribution against (a result's job id must be one its prompt created).
    /// Cheaper than [`SimServer::stats`], which also copies the request log.
    #[must_use]
    pub fn jobs(&self) -> Vec<JobRecord> {
        self.shared.jobs()
    }

    /// Sets the balance and clears the "a 402 was answered" marker.
    pub fn set_balance(&self, usd: f64) {
        self.shared.set_balance(usd);
    }

    /// Adds `usd` to the balance (a top-up) and clears the "a 402 was answered" marker.
    pub fn top_up(&self, usd: f64) {
        self.shared.top_up(usd);
    }

    /// Replaces the fault injection; a storm's window starts now.
    pub fn set_faults(&self, faults: Faults) {
        self.shared.set_faults(faults);
    }

    /// Stops accepting, closes open connections and waits for the listeners to end.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        // Settled up to now, so the file shows the charges of the jobs that have ended.
        {
            let now = self.shared.now_ms();
            let mut state = self.shared.lock();
            state.world.advance(now);
            state.generation += 1;
        }
        self.shared.persist();
    }
}

/// Why a simulation cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A listener cannot be bound.
    #[error("the simulation cannot listen on 127.0.0.1: {0}")]
    Bind(#[from] std::io::Error),
    /// Its world file cannot be used.
    #[error(transparent)]
    World(#[from] WorldFileError),
}

/// A world kept in a file.
#[derive(Debug)]
struct Persisted {
    file: WorldFile,
    world_id: String,
    /// The generation last written (none yet); held while writing, so writes never go back
    /// in time.
    saved: Mutex<Option<u64>>,
}

/// What every request handler shares.
#[derive(Debug)]
pub(crate) struct Shared {
    config: SimConfig,
    api_base: String,
    files_base: String,
    redirect_base: String,
    /// The ports listened on.
    ports: SavedPorts,
    epoch: Instant,
    /// Unix time at `epoch`; `now_ms` moves on from it with the monotonic clock.
    epoch_ms: Millis,
    state: Mutex<State>,
    /// Where the world is kept, if anywhere.
    persisted: Option<Persisted>,
}

/// The mutable part, behind one mutex held only for short, non-async stretches.
#[derive(Debug)]
pub(crate) struct State {
    world: World,
    recorder: Recorder,
    faults: Faults,
    faults_set_ms: Millis,
    /// POSTs answered 500 since the faults were set, for `server_error_first_posts`.
    posts_failed: u32,
    rng: fastrand::Rng,
    /// A 402 has been answered since the last top-up.
    after_402: bool,
    /// Counts the changes to the world that time alone does not explain (creations,
    /// cancellations, top-ups): what the world file must catch up with.
    generation: u64,
    /// The POSTs the request-rate limit let through lately.
    post_rate: rate::RateWindow,
}

impl Shared {
    fn now_ms(&self) -> Millis {
        self.epoch_ms + u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX / 2)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the state half-updated in a way worth refusing to serve.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn renderer(&self) -> Renderer<'_> {
        Renderer {
            files_base: &self.files_base,
            outputs: self.config.outputs_per_job,
            quirks: &self.config.quirks,
            echo_key: self.config.echo_key.then_some(self.config.api_key.as_str()),
        }
    }

    /// The name jobs show in the undocumented state, if the quirk is on (else never shown).
    fn undocumented_state(&self) -> &str {
        self.config.quirks.undocumented_state.as_deref().unwrap_or("processing")
    }

    fn jobs(&self) -> Vec<JobRecord> {
        let now = self.now_ms();
        let undocumented = self.undocumented_state();
        self.lock().world.job_records(now, undocumented)
    }

    fn stats(&self) -> SimStats {
        let now = self.now_ms();
        let undocumented = self.undocumented_state();
        let mut state = self.lock();
        let jobs = state.world.job_records(now, undocumented);
        let world = &state.world;
        SimStats {
            balance_usd: world.balance() as f64 / MICROS_PER_USD,
            spent_usd: world.spent() as f64 / MICROS_PER_USD,
            reserved_usd: world.reserved() as f64 / MICROS_PER_USD,
            jobs_created: jobs.len() as u64,
            creations_by_prompt: world.creations_by_prompt().clone(),
            creations_by_input: world.creations_by_input().clone(),
            jobs,
            ..state.recorder.snapshot()
        }
    }

    fn set_balance(&self, usd: f64) {
        {
            let mut state = self.lock();
            state.world.set_balance(world::usd_to_micros(usd));
            state.after_402 = false;
            state.generation += 1;
        }
        self.persist();
    }

    fn top_up(&self, usd: f64) -> f64 {
        let balance = {
            let mut state = self.lock();
            let balance = state.world.balance().saturating_add(world::usd_to_micros(usd));
            state.world.set_balance(balance);
            state.after_402 = false;
            state.generation += 1;
            balance
        };
        self.persist();
        balance as f64 / MICROS_PER_USD
    }

    /// Writes the world to its file, if it is kept in one and has changed since it was last
    /// written. Called before a change is answered, so that a client never holds an id the
    /// file lacks. A failed write is logged: the simulation goes on in memory.
    pub(crate) fn persist(&self) {
        let Some(persisted) = &self.persisted else { return };
        let mut saved = persisted.saved.lock().unwrap_or_else(PoisonError::into_inner);
        let (generation, account) = {
            let state = self.lock();
            if *saved == Some(state.generation) {
                return; // another request wrote this change already
            }
            (state.generation, state.world.save())
        };
        let world = SavedWorld::new(persisted.world_id.clone(), self.ports, account);
        match persisted.file.save(&world) {
            Ok(()) => *saved = Some(generation),
            Err(err) => tracing::error!(
                file = %persisted.file.path().display(), error = %err,
                "cannot save the simulated world; a restarted simulation will miss the latest jobs"
            ),
        }
    }

    fn set_faults(&self, faults: Faults) {
        let now = self.now_ms();
        let mut state = self.lock();
        state.faults = faults;
        state.faults_set_ms = now;
        state.posts_failed = 0;
    }
}

fn now_unix_ms() -> Millis {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(0)
}

/// Accepts connections until told to stop; dropping the `JoinSet` then aborts open ones.
async fn serve(
    listener: TcpListener,
    which: Listener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let shared = Arc::clone(&shared);
                    connections.spawn(async move {
                        let service = service_fn(move |request| {
                            http::handle(Arc::clone(&shared), which, request)
                        });
                        // Errors here are clients going away or simulated drops: nothing to do.
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %err, "simulated API could not accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
}
