//! `krea-batch check`: the plan of a job file, nothing sent: its jobs (and the folders of
//! images they come from, with the files skipped) and their estimated cost per model, how the estimate fits its budget, what a run would send now given its state
//! file, and whether the request bodies fit Krea's schemas (checked by the caller with
//! [`crate::openapi::schema_report`]).

use crate::costs::Costs;
use crate::error::InputError;
use crate::jobfile::{Budget, FolderUse, JobFile};
use crate::openapi::SchemaReport;
use crate::output;
use crate::pricing::{PriceTable, round_usd, usd};
use crate::report::count;
use crate::setup::places;
use crate::store::Store;
use serde::Serialize;

/// The plan `check` prints.
#[derive(Debug, Serialize)]
pub struct Plan {
    /// The job file.
    pub file: String,
    /// Jobs in all (after `count`).
    pub jobs: usize,
    /// Stage jobs (`then:`) besides them, one per job and stage: a stage whose input gives
    /// several results runs once per result, which only the run can know.
    pub stage_jobs: usize,
    /// The folders of images jobs are made from (`from: photos/`): images taken, files skipped.
    pub folders: Vec<FolderUse>,
    /// Jobs and estimated cost per model.
    pub models: Vec<ModelPlan>,
    /// The estimated total, USD.
    pub estimated_usd: f64,
    /// Jobs whose model has no known price.
    pub unpriced: usize,
    /// Where results go.
    pub output_dir: String,
    /// The state file.
    pub state: String,
    /// The API.
    pub api_base: String,
    /// The check of the request bodies against Krea's schemas.
    pub schema: SchemaReport,
    /// How the estimate compares with the file's `budget:`, when it has one.
    pub budget: Option<BudgetFit>,
    /// What a run would do now, given the state file (absent before the first run).
    pub resume: Option<Resume>,
}

/// What a run of the job file would send now, given what its state file already holds.
#[derive(Debug, Default, Serialize)]
pub struct Resume {
    /// Jobs already sent or ended: not sent again.
    pub done: usize,
    /// Jobs that would take a result this state already paid for (`reuse:`).
    pub reused: usize,
    /// Jobs that would be submitted and paid for, later stages of new jobs included (one per
    /// job and stage).
    pub to_pay: usize,
    /// Their estimated cost, USD.
    pub to_pay_usd: f64,
    /// Why a run would refuse to start, if it would (its output folder is not its own).
    pub refusal: Option<String>,
}

impl Resume {
    /// Reads the state file of `file`'s output folder (its simulated one when `simulated`),
    /// when there is one.
    fn of(file: &JobFile, simulated: bool) -> Option<Self> {
        let places = places(file, None, simulated);
        let store = Store::open_reader(&places.state).ok();
        let marker = output::read_marker(&places.output_dir);
        if store.is_none() && !matches!(marker, Ok(Some(_))) {
            return None;
        }
        let mut resume = Self::default();
        let state_id = store.as_ref().and_then(Store::recorded_id);
        let batch = match marker {
            Ok(Some(marker)) if Some(&marker.state_id) == state_id.as_ref() => Some(marker.batch),
            Ok(Some(_)) => {
                resume.refusal = Some(format!(
                    "the output folder {} belongs to another or a lost state file: a run would \
                     refuse to start (it says what to do)",
                    places.output_dir.display()
                ));
                None
            }
            // Written by a krea-batch from before the marker: the run adopts the same batch.
            Ok(None) => store.as_ref().and_then(|store| {
                let source = std::fs::canonicalize(&file.source).ok()?;
                let dir = std::fs::canonicalize(&places.output_dir).ok()?;
                let in_folder = places.state_in_folder();
                store.legacy_batch(&source.to_string_lossy(), &dir, in_folder).ok().flatten()
            }),
            Err(err) => {
                resume.refusal = Some(err.to_string());
                None
            }
        };
        let (known, reusable) = store
            .as_ref()
            .and_then(|store| store.preview(batch.as_deref()).ok())
            .unwrap_or_default();
        let prices = PriceTable::with_overrides(file.prices.clone());
        for job in &file.jobs {
            if known.contains(job.key.as_str()) {
                resume.done += 1;
            } else if file.reuse && reusable.contains(job.key.as_str()) {
                resume.reused += 1;
            } else {
                resume.to_pay += 1;
                resume.to_pay_usd += prices.price(&job.model, &job.body_map()).unwrap_or(0.0);
                // Its later stages, one per job as in the estimate above.
                for stage in crate::chain::Chain::stages_after(job.chain.as_deref()) {
                    resume.to_pay += 1;
                    resume.to_pay_usd += prices.price(&stage.model, &stage.body).unwrap_or(0.0);
                }
            }
        }
        resume.to_pay_usd = round_usd(resume.to_pay_usd);
        Some(resume)
    }
}

/// The estimate against a budget, as `check` prints it.
#[derive(Debug, Serialize)]
pub struct BudgetFit {
    /// The total cap, USD.
    pub max_usd: Option<f64>,
    /// The daily cap, USD.
    pub per_day_usd: Option<f64>,
    /// Whether the whole file can run under the total cap: every job priced and the estimate
    /// at most `max_usd` (a daily cap only spreads the jobs over days).
    pub fits: bool,
    /// When jobs have no known price: why the run would be refused.
    pub unpriced: Option<String>,
}

impl BudgetFit {
    fn of(file: &JobFile, budget: Budget, costs: &Costs<'_>) -> Self {
        let unpriced = costs.unpriced_refusal(file).map(|refusal| refusal.to_string());
        let within = budget.max_usd.is_none_or(|cap| costs.total.usd <= cap + 1e-9);
        Self {
            max_usd: budget.max_usd,
            per_day_usd: budget.per_day_usd,
            fits: unpriced.is_none() && within,
            unpriced,
        }
    }
}

/// One model's share of a plan.
#[derive(Debug, Serialize)]
pub struct ModelPlan {
    /// The model path.
    pub model: String,
    /// Its jobs.
    pub jobs: usize,
    /// Their estimated cost, USD (None when no price is known).
    pub estimated_usd: Option<f64>,
}

/// `krea-batch check`: the plan, without sending anything (the schema check is done by the
/// caller, [`crate::openapi::schema_report`], and included); `simulated`: the plan of
/// `run --simulate`, whose results and state are in `<output>-simulated`.
pub fn plan(
    file: &JobFile,
    base: &reqwest::Url,
    schema: SchemaReport,
    simulated: bool,
) -> Result<Plan, InputError> {
    let places = places(file, None, simulated);
    let costs = Costs::of(file);
    let models = costs
        .by_model
        .iter()
        .map(|(model, (jobs, estimate))| ModelPlan {
            model: model.to_string(),
            jobs: *jobs,
            estimated_usd: (estimate.unpriced == 0).then_some(round_usd(estimate.usd)),
        })
        .collect();
    Ok(Plan {
        file: file.source.display().to_string(),
        jobs: file.jobs.len(),
        stage_jobs: costs.stage_jobs,
        folders: file.folders.clone(),
        models,
        estimated_usd: round_usd(costs.total.usd),
        unpriced: costs.total.unpriced,
        output_dir: places.output_dir.display().to_string(),
        state: places.state.display().to_string(),
        api_base: base.to_string(),
        schema,
        budget: file.budget.map(|budget| BudgetFit::of(file, budget, &costs)),
        resume: Resume::of(file, simulated),
    })
}

impl Plan {
    fn write_budget(
        &self,
        f: &mut std::fmt::Formatter<'_>,
        budget: &BudgetFit,
    ) -> std::fmt::Result {
        if let Some(why) = &budget.unpriced {
            return writeln!(f, "budget: does not fit: {why}");
        }
        if let Some(cap) = budget.max_usd {
            let verdict = if budget.fits { "fits" } else { "does NOT fit" };
            write!(f, "budget: {}: the estimate {verdict}", usd(cap))?;
            if !budget.fits {
                write!(f, "; the run would stop before exceeding it, leaving jobs unsent")?;
            }
            writeln!(f)?;
        }
        if let Some(daily) = budget.per_day_usd {
            // The jobs of one day may cost `daily`: spread over that many UTC days at least.
            let days = if daily > 0.0 { (self.estimated_usd / daily).ceil().max(1.0) } else { 0.0 };
            if days > 0.0 {
                writeln!(
                    f,
                    "daily budget: {}: the estimate takes at least {days} day(s)",
                    usd(daily)
                )?;
            } else {
                writeln!(f, "daily budget: $0.00: nothing would be sent")?;
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // "valid" only when nothing below says otherwise.
        let verdict = match self.schema.problems.len() {
            0 => "valid".to_owned(),
            n => format!("NOT valid: {}, listed below", count(n, "problem")),
        };
        writeln!(f, "{}: {}, {verdict}", self.file, count(self.jobs, "job"))?;
        if self.stage_jobs > 0 {
            writeln!(
                f,
                "  and {} of later stages (then:), priced as one per input result: a stage whose \
                 input gives several results runs, and costs, once per result",
                count(self.stage_jobs, "job")
            )?;
        }
        for folder in &self.folders {
            write!(
                f,
                "  line {}: {}: {}",
                folder.line,
                folder.folder,
                count(folder.images, "image")
            )?;
            if folder.skipped.total() > 0 {
                write!(f, "; skipped {}", folder.skipped)?;
            }
            writeln!(f)?;
        }
        for model in &self.models {
            let cost = model
                .estimated_usd
                .map_or_else(|| "no known price".into(), |usd| format!("${usd:.4}"));
            let noun = if model.jobs == 1 { "job" } else { "jobs" };
            writeln!(f, "  {:<40} {:>6} {noun:<4}  {cost}", model.model, model.jobs)?;
        }
        write!(f, "estimated cost: ${:.4}", self.estimated_usd)?;
        if self.unpriced > 0 {
            write!(f, " (+ {} with no known price)", count(self.unpriced, "job"))?;
        }
        writeln!(f)?;
        if let Some(budget) = &self.budget {
            self.write_budget(f, budget)?;
        }
        if let Some(resume) = &self.resume {
            writeln!(
                f,
                "a run now: {} already sent or done, {} would reuse results already paid for, \
                 {} to submit (estimated ${:.4})",
                count(resume.done, "job"),
                resume.reused,
                resume.to_pay,
                resume.to_pay_usd
            )?;
            if let Some(refusal) = &resume.refusal {
                writeln!(f, "warning: {refusal}")?;
            }
        }
        writeln!(
            f,
            "results: {}\nstate:   {}\napi:     {}",
            self.output_dir, self.state, self.api_base
        )?;
        if !self.schema.origin.is_empty() {
            let verdict = if self.schema.problems.is_empty() { "fit" } else { "do not fit" };
            writeln!(f, "request bodies {verdict} the schemas of {}", self.schema.origin)?;
        }
        for problem in &self.schema.problems {
            writeln!(f, "  {problem}")?;
        }
        for warning in &self.schema.warnings {
            writeln!(f, "warning: {warning}")?;
        }
        Ok(())
    }
}
