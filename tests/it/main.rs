//! Integration tests: the real `krea-batch` binary against the simulated Krea API on loopback.
//! One test binary; a module per area.

mod cancel;
mod chaos;
mod commands;
mod completions;
mod daemon;
mod folders;
mod gallery;
mod hostile;
mod input;
mod kill;
mod layers;
mod manifest;
mod models;
mod pipeline;
mod readme;
mod resume;
mod retry;
mod run;
mod security;
mod signals;
mod simulate;
mod spend;
mod support;
mod sweeps;
mod uploads;
