//! Turning the world's job views into the JSON Krea sends: the job object (with result and
//! preview URLs on the file host) and the list page, in the shape the configured quirks pick.

use super::config::Quirks;
use super::ids::rfc3339;
use super::models::Kind;
use super::world::{JobView, Millis, Status, status_name};
use serde_json::{Map, Value, json};

/// What rendering needs besides the job.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Renderer<'a> {
    pub files_base: &'a str,
    pub outputs: u32,
    pub quirks: &'a Quirks,
    /// Hostile tests: the key to quote in every text (`SimConfig::echo_key`).
    pub echo_key: Option<&'a str>,
}

impl Renderer<'_> {
    /// The job object. `create` renders the create response, which may omit `status`.
    pub(crate) fn job(&self, view: &JobView, create: bool) -> Value {
        let undocumented = self.quirks.undocumented_state.as_deref().unwrap_or("processing");
        let mut object = Map::new();
        object.insert("job_id".to_owned(), json!(view.id));
        if !(create && self.quirks.omit_status_on_create) {
            object.insert("status".to_owned(), json!(status_name(view.status, undocumented)));
        }
        object.insert("type".to_owned(), json!(view.job_type));
        object.insert("created_at".to_owned(), json!(self.quoting(rfc3339(view.created_ms))));
        let completed_at = view.ended_ms.map_or(Value::Null, |ms| json!(self.quoting(rfc3339(ms))));
        object.insert("completed_at".to_owned(), completed_at);
        let result = match (view.status, &view.failure) {
            (Status::Completed, _) => json!({ "urls": self.urls(view, "results") }),
            (Status::IntermediateComplete, _) => json!({ "urls": self.urls(view, "previews") }),
            (Status::Failed, Some(failure)) if self.echo_key.is_some() => {
                let message = self.quoting(failure.message.clone());
                object.insert(
                    "error".to_owned(),
                    json!({ "code": failure.code, "message": message }),
                );
                json!({ "error": message })
            }
            (Status::Failed, Some(failure)) if self.quirks.failure_in_result => {
                json!({ "error": failure.message })
            }
            (Status::Failed, Some(failure)) => {
                object.insert(
                    "error".to_owned(),
                    json!({ "code": failure.code, "message": failure.message }),
                );
                Value::Null
            }
            _ => Value::Null,
        };
        object.insert("result".to_owned(), result);
        Value::Object(object)
    }

    /// `text`, quoting the key when the hostile `echo_key` is on.
    fn quoting(&self, text: String) -> String {
        match self.echo_key {
            Some(key) => format!("{text} (Authorization: Bearer {key})"),
            None => text,
        }
    }

    /// A page of `GET /jobs`.
    pub(crate) fn page(&self, items: &[JobView], next: Option<Millis>) -> Value {
        let items: Vec<Value> = items.iter().map(|view| self.job(view, false)).collect();
        let key = if self.quirks.next_cursor_camel_case { "nextCursor" } else { "next_cursor" };
        let mut object = Map::new();
        object.insert("items".to_owned(), Value::Array(items));
        object.insert(key.to_owned(), next.map_or(Value::Null, |ms| json!(rfc3339(ms))));
        Value::Object(object)
    }

    /// The file URLs of a job: results (`.mp4` for video) or previews (always `.png`).
    fn urls(&self, view: &JobView, folder: &str) -> Vec<Value> {
        let extension = if folder == "results" && view.kind == Kind::Video { "mp4" } else { "png" };
        (0..self.outputs)
            .map(|index| {
                let mut url =
                    format!("{}/{folder}/{}/{index}.{extension}", self.files_base, view.id);
                if let Some(key) = self.echo_key.filter(|_| index > 0 && index + 1 == self.outputs)
                {
                    url = format!("{url}?token={key}");
                }
                if self.quirks.result_urls_as_objects { json!({ "url": url }) } else { json!(url) }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::world::Failure;

    fn view(status: Status) -> JobView {
        JobView {
            id: "j1".to_owned(),
            status,
            kind: Kind::Image,
            job_type: "flux",
            created_ms: 1_780_000_000_000,
            ended_ms: status.is_terminal().then_some(1_780_000_001_000),
            failure: (status == Status::Failed)
                .then(|| Failure { code: "content_moderation", message: "flagged".to_owned() }),
        }
    }

    #[test]
    fn jobs_render_in_the_documented_shape() {
        let quirks = Quirks::default();
        let renderer =
            Renderer { files_base: "http://f", outputs: 2, quirks: &quirks, echo_key: None };
        let pending = renderer.job(&view(Status::Queued), true);
        assert_eq!(pending["status"], "queued");
        assert_eq!(pending["created_at"], "2026-05-28T20:26:40.000Z");
        assert!(pending["completed_at"].is_null() && pending["result"].is_null());
        let done = renderer.job(&view(Status::Completed), false);
        assert_eq!(
            done["result"]["urls"],
            json!(["http://f/results/j1/0.png", "http://f/results/j1/1.png"])
        );
        assert_eq!(done["completed_at"], "2026-05-28T20:26:41.000Z");
        let preview = renderer.job(&view(Status::IntermediateComplete), false);
        assert_eq!(preview["result"]["urls"][0], "http://f/previews/j1/0.png");
        let failed = renderer.job(&view(Status::Failed), false);
        assert_eq!(failed["error"], json!({"code": "content_moderation", "message": "flagged"}));
        let page = renderer.page(&[view(Status::Queued)], Some(1_780_000_000_000));
        assert_eq!(page["next_cursor"], "2026-05-28T20:26:40.000Z");
    }

    #[test]
    fn quirks_change_the_shape() {
        let quirks = Quirks {
            next_cursor_camel_case: true,
            result_urls_as_objects: true,
            omit_status_on_create: true,
            failure_in_result: true,
            ..Quirks::default()
        };
        let renderer =
            Renderer { files_base: "http://f", outputs: 1, quirks: &quirks, echo_key: None };
        assert!(renderer.job(&view(Status::Queued), true).get("status").is_none());
        assert_eq!(
            renderer.job(&view(Status::Completed), false)["result"]["urls"][0]["url"],
            "http://f/results/j1/0.png"
        );
        let failed = renderer.job(&view(Status::Failed), false);
        assert_eq!(failed["result"]["error"], "flagged");
        assert!(failed.get("error").is_none());
        assert!(renderer.page(&[], None)["nextCursor"].is_null());
    }
}
