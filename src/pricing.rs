//! What a generation costs, for the estimates in `check`, the run summary and `status`.
//!
//! Krea has no endpoint for prices or the balance, so krea-batch carries a table ([`TABLE_DATE`],
//! [`TABLE_SOURCE`]): the "Fixed API prices in USD" that the page of each model in Krea's API
//! reference gives. A job file's `prices:` overrides it per model. The figures are estimates:
//! Krea's bill is the truth. Only completed jobs are billed.
//!
//! Krea's pages give a price for few of the models its API lists; the others stay unpriced (no
//! figure is guessed for them), and a budgeted job file using one is refused with the model
//! named and `prices:` as the way on. One exception is made, for the model the README's
//! examples use: Kling 2.5 has no published price, and is estimated at Kling 1.0 pro's
//! published $0.0772 per second, because Krea prices Kling 1.0 in proportion to its compute
//! units ($0.00184 per unit in both modes) and Kling 2.5 needs slightly fewer (200 per 5 s
//! against 210): the estimate errs high, on a budget's safe side.

use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// When the built-in table was last checked against Krea's pages.
pub(crate) const TABLE_DATE: &str = "2026-12-02";

/// Where the built-in prices come from.
pub(crate) const TABLE_SOURCE: &str =
    "the Pricing section of each model's page in Krea's API reference (docs.krea.ai)";

/// Prices in USD per generation, by model, with the parameters that change them.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct PriceTable {
    overrides: BTreeMap<String, f64>,
}

impl PriceTable {
    /// The built-in table with a job file's `prices:` on top.
    #[must_use]
    pub(crate) fn with_overrides(overrides: BTreeMap<String, f64>) -> Self {
        Self { overrides }
    }

    /// The price of one generation of `model` with `body`, if known.
    #[must_use]
    pub(crate) fn price(&self, model: &str, body: &Map<String, Value>) -> Option<f64> {
        self.overrides.get(model).copied().or_else(|| builtin_price(model, body))
    }
}

/// The built-in prices. Models not listed have no estimate (the summary says how many).
fn builtin_price(model: &str, body: &Map<String, Value>) -> Option<f64> {
    let text = |field: &str| body.get(field).and_then(Value::as_str).unwrap_or_default();
    let has = |field: &str| {
        body.get(field).is_some_and(|value| value.as_array().is_none_or(|items| !items.is_empty()))
    };
    // Krea 2 costs more with style references, more still with moodboards.
    let krea2 = |plain: f64, styled: f64, moodboards: f64| {
        if has("moodboards") {
            moodboards
        } else if has("image_style_references") {
            styled
        } else {
            plain
        }
    };
    let seconds = || body.get("duration").and_then(Value::as_f64).unwrap_or(5.0);
    match model {
        "image/bfl/flux-1-dev" => Some(0.007),
        "image/bfl/flux-1-kontext-dev" => Some(0.0128),
        "image/krea/krea-2/medium" => Some(krea2(0.03, 0.035, 0.04)),
        "image/krea/krea-2/large" => Some(krea2(0.06, 0.065, 0.07)),
        "image/krea/krea-2/medium-turbo" => Some(krea2(0.015, 0.0175, 0.02)),
        "image/google/nano-banana-2" => match text("resolution") {
            "2K" => Some(0.12),
            "4K" => Some(0.16),
            _ => Some(0.08),
        },
        "video/kling/kling-1" => {
            let per_second = if text("mode") == "pro" { 0.0772 } else { 0.0221 };
            Some(per_second * seconds())
        }
        // An estimate, not a published price: see the module documentation.
        "video/kling/kling-2.5" => Some(0.0772 * seconds()),
        _ => None,
    }
}

/// An amount for people: cents always, and the smaller digits of a price only when it has
/// them (`$25.00`, `$0.021`, `$0.0075`).
#[must_use]
pub(crate) fn usd(amount: f64) -> String {
    let precise = format!("{amount:.4}");
    let trimmed = precise.trim_end_matches('0');
    let decimals = trimmed.split_once('.').map_or(0, |(_, fraction)| fraction.len());
    if decimals <= 2 { format!("${amount:.2}") } else { format!("${trimmed}") }
}

/// `amount` rounded to a millionth of a dollar, the finest step of a price: a sum of prices
/// carries binary noise (`0.1 + 0.2` is `0.30000000000000004`) that means nothing, and is
/// rounded away before it is shown or exported.
#[must_use]
pub(crate) fn round_usd(amount: f64) -> f64 {
    (amount * 1e6).round() / 1e6
}

/// A sum of prices that remembers how many jobs had none.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Estimate {
    /// The sum of the known prices, USD.
    pub usd: f64,
    /// Jobs whose model has no known price.
    pub unpriced: usize,
}

impl Estimate {
    /// Adds one job's price.
    pub(crate) fn add(&mut self, price: Option<f64>) {
        match price {
            Some(usd) => self.usd += usd,
            None => self.unpriced += 1,
        }
    }
}

impl std::fmt::Display for Estimate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "${:.4}", self.usd)?;
        if self.unpriced > 0 {
            let noun = if self.unpriced == 1 { "job" } else { "jobs" };
            write!(f, " (+ {} {noun} with no known price)", self.unpriced)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(value: &Value) -> Map<String, Value> {
        value.as_object().cloned().expect("object")
    }

    #[test]
    fn money_is_rounded_to_what_it_means() {
        assert_eq!(serde_json::json!(0.1 + 0.2).to_string(), "0.30000000000000004");
        assert_eq!(serde_json::json!(round_usd(0.1 + 0.2)).to_string(), "0.3");
        assert_eq!(serde_json::json!(round_usd(0.007 * 3.0)).to_string(), "0.021");
        assert!(round_usd(f64::NAN).is_nan());
    }

    #[test]
    fn prices_depend_on_model_and_parameters() {
        let table = PriceTable::default();
        let plain = body(&json!({"prompt": "x"}));
        assert_eq!(table.price("image/bfl/flux-1-dev", &plain), Some(0.007));
        assert_eq!(table.price("image/krea/krea-2/medium", &plain), Some(0.03));
        let styled = body(&json!({"prompt": "x", "image_style_references": [{"url": "u"}]}));
        assert_eq!(table.price("image/krea/krea-2/medium", &styled), Some(0.035));
        let moods = body(&json!({"prompt": "x", "moodboards": ["m"]}));
        assert_eq!(table.price("image/krea/krea-2/large", &moods), Some(0.07));
        let four_k = body(&json!({"prompt": "x", "resolution": "4K"}));
        assert_eq!(table.price("image/google/nano-banana-2", &four_k), Some(0.16));
        let video = body(&json!({"prompt": "x", "duration": 10, "mode": "pro"}));
        let price = table.price("video/kling/kling-1", &video).expect("priced");
        assert!((price - 0.772).abs() < 1e-9);
        assert_eq!(table.price("image/unknown/model", &plain), None);
        let turbo = body(&json!({"prompt": "x", "moodboards": ["m"]}));
        assert_eq!(table.price("image/krea/krea-2/medium-turbo", &turbo), Some(0.02));
    }

    /// The README's example video model has a price (an estimate), by duration; models whose
    /// pages give no price stay unpriced rather than guessed.
    #[test]
    fn kling_2_5_is_priced_and_unpublished_models_are_not() {
        let table = PriceTable::default();
        let five = table.price("video/kling/kling-2.5", &body(&json!({"prompt": "x"})));
        assert!((five.expect("priced") - 0.386).abs() < 1e-9);
        let ten = table.price("video/kling/kling-2.5", &body(&json!({"duration": 10})));
        assert!((ten.expect("priced") - 0.772).abs() < 1e-9);
        for unpublished in ["video/google/veo-3.1", "image/bfl/flux-1.1-pro"] {
            assert_eq!(table.price(unpublished, &body(&json!({"prompt": "x"}))), None);
        }
    }

    #[test]
    fn overrides_win() {
        let table = PriceTable::with_overrides(BTreeMap::from([
            ("image/bfl/flux-1-dev".to_owned(), 0.01),
            ("image/new/model".to_owned(), 0.5),
        ]));
        let plain = body(&json!({"prompt": "x"}));
        assert_eq!(table.price("image/bfl/flux-1-dev", &plain), Some(0.01));
        assert_eq!(table.price("image/new/model", &plain), Some(0.5));
    }

    #[test]
    fn amounts_show_cents_and_only_the_digits_they_have() {
        assert_eq!(usd(25.0), "$25.00");
        assert_eq!(usd(0.021), "$0.021");
        assert_eq!(usd(0.0075), "$0.0075");
        assert_eq!(usd(7.5), "$7.50");
        assert_eq!(usd(0.0), "$0.00");
    }

    #[test]
    fn estimates_count_the_unpriced() {
        let mut estimate = Estimate::default();
        estimate.add(Some(0.5));
        estimate.add(None);
        assert_eq!(estimate.to_string(), "$0.5000 (+ 1 job with no known price)");
    }
}
