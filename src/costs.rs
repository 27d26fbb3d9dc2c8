//! What a job file is estimated to cost: every job priced (`pricing.rs`) and summed per model,
//! for `check`'s plan, the budget's checks at the start of a run, and the service's inbox
//! (a job file whose jobs a budget cannot count is refused). Reads the parsed job file only.

use crate::error::InputError;
use crate::jobfile::JobFile;
use crate::pricing::{Estimate, PriceTable, TABLE_DATE, TABLE_SOURCE, usd};
use crate::report::count;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Every job's estimated price, summed per model: one pass over the request bodies for the
/// plan, the budget's checks and the warning at the start of a run.
pub(crate) struct Costs<'f> {
    /// Every job's estimate, summed.
    pub(crate) total: Estimate,
    /// Per model: its jobs and their estimate.
    pub(crate) by_model: BTreeMap<Cow<'f, str>, (usize, Estimate)>,
    /// Of those, the jobs of later stages (`then:`), counted one per job: how many results a
    /// stage's input gives is known only once it ran, and each result makes a stage job.
    pub(crate) stage_jobs: usize,
}

impl<'f> Costs<'f> {
    /// Prices every job of `file` (its `prices:` over the built-in table).
    pub(crate) fn of(file: &'f JobFile) -> Self {
        let prices = PriceTable::with_overrides(file.prices.clone());
        let mut costs =
            Self { total: Estimate::default(), by_model: BTreeMap::new(), stage_jobs: 0 };
        for job in &file.jobs {
            costs.add(Cow::Borrowed(&job.model), prices.price(&job.model, &job.body_map()));
            for stage in crate::chain::Chain::stages_after(job.chain.as_deref()) {
                let price = prices.price(&stage.model, &stage.body);
                costs.add(Cow::Owned(stage.model), price);
                costs.stage_jobs += 1;
            }
        }
        costs
    }

    fn add(&mut self, model: Cow<'f, str>, price: Option<f64>) {
        self.total.add(price);
        let (jobs, estimate) = self.by_model.entry(model).or_default();
        *jobs += 1;
        estimate.add(price);
    }

    /// Why these jobs cannot run under a budget: some have no known price, so what they
    /// commit cannot be counted. `None` when every job is priced.
    pub(crate) fn unpriced_refusal(&self, file: &JobFile) -> Option<Unpriced> {
        let models: Vec<(String, usize)> = self
            .by_model
            .iter()
            .filter(|(_, (_, estimate))| estimate.unpriced > 0)
            .map(|(model, (_, estimate))| (model.to_string(), estimate.unpriced))
            .collect();
        (!models.is_empty()).then(|| Unpriced { file: file.source.clone(), models })
    }
}

/// A budget is set, but some jobs have no known price, so what they commit cannot be counted.
#[derive(Debug, thiserror::Error)]
#[error(
    "{}: a budget is set, but krea-batch knows no price for {} (its table, checked {}, holds \
     the prices published in {}); add each under `prices:` (USD per generation, e.g. \
     `prices: {{{}: 0.05}}`) so the budget can count them",
    file.display(),
    listed(models),
    TABLE_DATE,
    TABLE_SOURCE,
    models.first().map_or("", |(model, _)| model.as_str())
)]
pub(crate) struct Unpriced {
    /// The job file.
    pub file: PathBuf,
    /// Each model without a price, with its number of jobs.
    pub models: Vec<(String, usize)>,
}

fn listed(models: &[(String, usize)]) -> String {
    let listed: Vec<String> =
        models.iter().map(|(model, jobs)| format!("{model} ({})", count(*jobs, "job"))).collect();
    listed.join(", ")
}

/// Why `file`'s jobs cannot run under a budget (see `Costs::unpriced_refusal`); for the
/// service's inbox.
#[must_use]
pub(crate) fn unpriced_under_budget(file: &JobFile) -> Option<Unpriced> {
    Costs::of(file).unpriced_refusal(file)
}

/// Refuses to start a run under a budget with jobs of unknown price, and says at the start
/// when the estimate is above the total cap (the run will stop at the cap).
pub(crate) fn enforce_budget(file: &JobFile) -> Result<(), InputError> {
    let Some(budget) = file.budget else { return Ok(()) };
    let costs = Costs::of(file);
    if let Some(refusal) = costs.unpriced_refusal(file) {
        return Err(InputError::new(refusal));
    }
    if let Some(cap) = budget.max_usd.filter(|cap| costs.total.usd > *cap) {
        tracing::warn!(
            "the jobs are estimated at {}, above the budget of {}; submitting stops before the \
             budget would be exceeded (jobs already done count against it)",
            usd(costs.total.usd),
            usd(cap)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_is_priced_once_per_job_and_counted_apart() {
        let text = "model: image/bfl/flux-1-dev
prices: {enhance/topaz/standard-enhance: 0.1}
jobs:
  - {prompt: a, count: 2, then: [{model: enhance/topaz/standard-enhance}, {model: video/acme/new-model}]}
";
        let file = crate::jobfile::parse(text.as_bytes(), std::path::Path::new("jobs.yaml"))
            .expect("valid");
        let costs = Costs::of(&file);
        assert_eq!(costs.stage_jobs, 4);
        assert_eq!(costs.by_model["enhance/topaz/standard-enhance"].0, 2);
        assert!((costs.total.usd - (2.0 * 0.007 + 2.0 * 0.1)).abs() < 1e-9);
        // A model without a price: a budget cannot count it.
        assert_eq!(costs.total.unpriced, 2);
        assert!(costs.unpriced_refusal(&file).is_some());
    }
}
