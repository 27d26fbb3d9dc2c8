//! Which jobs of a state file a command names: those of one job file (found from the job file
//! as `status` finds its state, or by its name in the daemon's inbox), all or by name. Shared
//! by `cancel` (`control.rs`) and `retry` (`rerun.rs`), below both.

use crate::error::InputError;
use crate::inbox;
use crate::setup;
use crate::store::{JobRecord, Store};
use std::path::Path;

/// Which jobs a command acts on: the named ones, or every one; of one job file, or of the
/// whole state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// Only the jobs of this job file: its path, its file name in the daemon's inbox, or its
    /// name.
    pub file: Option<String>,
    /// Only the jobs with these names; none: every job (of `file`, when given).
    pub names: Vec<String>,
    /// `file` was run with `--simulate` (its results are in `<output>-simulated`).
    pub simulated: bool,
}

/// The jobs `selection` names; an unknown name or job file is an error.
pub(crate) fn select(store: &Store, selection: &Selection) -> anyhow::Result<Vec<JobRecord>> {
    let mut jobs = store.jobs(None)?;
    if let Some(file) = &selection.file {
        let batch = batch_of(store, file, selection.simulated)?;
        jobs.retain(|job| job.batch_id == batch);
    }
    let names = &selection.names;
    if names.is_empty() {
        return Ok(jobs);
    }
    if let Some(missing) = names.iter().find(|name| !jobs.iter().any(|job| &job.name == *name)) {
        let among = selection.file.as_ref().map_or_else(String::new, |file| format!(" of {file}"));
        let known: Vec<&str> = jobs.iter().map(|job| job.name.as_str()).collect();
        let hint = crate::schema::closest(missing, &known).map_or_else(
            || "`krea-batch status` lists the state's jobs".to_owned(),
            |near| format!("did you mean {near}?"),
        );
        return Err(InputError::msg(format!(
            "no job named {missing}{among} in {} ({hint})",
            store.path().display()
        ))
        .into());
    }
    jobs.retain(|job| names.contains(&job.name));
    Ok(jobs)
}

/// The batch of the state that the job file `file` was imported as (`simulated`: by
/// `run --simulate`, whose results go to another folder).
fn batch_of(store: &Store, file: &str, simulated: bool) -> anyhow::Result<i64> {
    let path = Path::new(file);
    let mut sources = vec![format!("inbox:{}", inbox::batch_name(&file_name(path)))];
    // A job file run on its own: its output folder's marker names the batch (older states
    // named it by the file's path).
    let marker = setup::places_of(path, None, simulated)
        .ok()
        .and_then(|places| crate::output::read_marker(&places.output_dir).ok().flatten());
    if let Some(marker) = marker {
        sources.push(marker.batch);
    }
    if let Ok(canonical) = std::fs::canonicalize(path) {
        sources.push(canonical.to_string_lossy().into_owned());
    }
    sources.push(format!("inbox:{file}"));
    sources.iter().find_map(|source| store.batch_id(source).ok().flatten()).ok_or_else(|| {
        InputError::msg(format!("{file} is not a job file of {}", store.path().display())).into()
    })
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(String::new, |name| name.to_string_lossy().into_owned())
}
