//! The gallery: `index.html` in an output folder, a static page showing every job of the batch
//! as a card (its image or playable video, prompt, model, params, job id, and the reason for a
//! failure), so a batch can be looked over in a browser. It makes no request of its own: inline
//! styles, no scripts, no fonts, and the only sources are the result files beside it, by
//! relative path. Large batches are split into pages of [`PER_PAGE`] jobs
//! (`index.html`, `index-2.html`, …).
//!
//! It reads job records and writes HTML; `runner` decides when (at the end of a run, and every
//! few seconds while jobs end, so the daemon keeps it current).

use crate::files::{FileError, write_atomically};
use crate::job::JobState;
use crate::report::manifest_status;
use crate::store::JobRecord;
use std::fmt::Write as _;
use std::path::Path;

/// Jobs per page.
pub(crate) const PER_PAGE: usize = 500;

/// Writes the gallery of `jobs` into `dir` (atomically, page by page).
pub(crate) fn write<'a>(
    dir: &Path,
    jobs: impl IntoIterator<Item = &'a JobRecord>,
) -> Result<(), FileError> {
    let jobs: Vec<&JobRecord> = jobs.into_iter().collect();
    // The title names the job file the folder's marker names; a folder without one (or with an
    // unreadable one) still gets its gallery.
    let job_file =
        crate::output::read_marker(dir).ok().flatten().and_then(|marker| marker.job_file);
    let title = match &job_file {
        Some(name) => format!("{name}: krea-batch results"),
        None => "krea-batch results".to_owned(),
    };
    let pages = jobs.len().div_ceil(PER_PAGE).max(1);
    for page in 0..pages {
        let start = page * PER_PAGE;
        let slice = &jobs[start..jobs.len().min(start + PER_PAGE)];
        let html = render_page(&title, &jobs, slice, page, pages);
        write_atomically(&dir.join(page_name(page)), html.as_bytes(), false)?;
    }
    Ok(())
}

/// `index.html`, `index-2.html`, …
fn page_name(page: usize) -> String {
    if page == 0 { "index.html".to_owned() } else { format!("index-{}.html", page + 1) }
}

fn render_page(
    title: &str,
    all: &[&JobRecord],
    jobs: &[&JobRecord],
    page: usize,
    pages: usize,
) -> String {
    let counts = crate::runner::status::Counts::of(all.iter().copied());
    let title = escape(title);
    let mut html = String::with_capacity(2048 + jobs.len() * 1024);
    let _ = write!(
        html,
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n<style>\n"
    );
    html.push_str(STYLE);
    let _ = writeln!(html, "</style>\n</head>\n<body>\n<header>\n<h1>{title}</h1>");
    let _ = writeln!(
        html,
        "<p class=\"counts\">{}</p>",
        escape(&format!("{}: {counts}", crate::report::count(counts.total, "job")))
    );
    if pages > 1 {
        html.push_str(&pager(page, pages));
    }
    html.push_str("</header>\n<main>\n");
    // A later stage links to its parent's card, on whichever page it is.
    let page_of: std::collections::HashMap<&str, usize> =
        all.iter().enumerate().map(|(index, job)| (job.name.as_str(), index / PER_PAGE)).collect();
    for job in jobs {
        let parent = crate::chain::place(job.chain.as_deref()).and_then(|(_, parent)| parent);
        let link = parent.map(|parent| {
            let theirs = page_of.get(parent.as_str()).copied().unwrap_or(page);
            let other_page = if theirs == page { String::new() } else { page_name(theirs) };
            (format!("{other_page}#{parent}"), parent)
        });
        card(&mut html, job, link);
    }
    html.push_str("</main>\n");
    if pages > 1 {
        html.push_str(&pager(page, pages));
    }
    html.push_str("</body>\n</html>\n");
    html
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:0;background:#f4f4f5;color:#18181b}\
header{padding:1rem 1.5rem;background:#fff;border-bottom:1px solid #e4e4e7}\
h1{font-size:1.25rem;margin:0 0 .25rem}.counts{margin:0;color:#52525b}\
nav{margin-top:.5rem}nav a,nav span{margin-right:.5rem}\
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(240px,1fr));gap:1rem;padding:1.5rem}\
article{background:#fff;border:1px solid #e4e4e7;border-radius:8px;overflow:hidden;display:flex;flex-direction:column}\
article.failed,article.cancelled{border-color:#f87171}\
.media{aspect-ratio:1;background:#e4e4e7;display:flex;align-items:center;justify-content:center}\
.media img,.media video{width:100%;height:100%;object-fit:contain;image-rendering:pixelated}\
.media .none{color:#71717a;font-size:.9rem;padding:1rem;text-align:center}\
.body{padding:.75rem;font-size:.85rem;display:flex;flex-direction:column;gap:.35rem}\
.name{font-weight:600}.status{font-size:.75rem;text-transform:uppercase;color:#52525b}\
.failed .status,.cancelled .status{color:#b91c1c}.reason{color:#b91c1c}\
.prompt{white-space:pre-wrap}.meta{color:#52525b;font-size:.75rem;word-break:break-all}\
pre{margin:0;font-size:.7rem;white-space:pre-wrap;word-break:break-all;background:#f4f4f5;padding:.35rem;border-radius:4px}\n";

fn pager(page: usize, pages: usize) -> String {
    let mut nav = String::from("<nav>");
    for other in 0..pages {
        if other == page {
            let _ = write!(nav, "<span>page {}</span>", other + 1);
        } else {
            let _ = write!(nav, "<a href=\"{}\">page {}</a>", page_name(other), other + 1);
        }
    }
    nav.push_str("</nav>\n");
    nav
}

/// One job's card; `parent` is the link to its input's card and that job's name.
fn card(html: &mut String, job: &JobRecord, parent: Option<(String, String)>) {
    let status = manifest_status(job.state);
    let _ = writeln!(html, "<article class=\"{status}\" id=\"{}\">", escape(&job.name));
    html.push_str("<div class=\"media\">");
    let shown = job.files.first().filter(|_| job.state == JobState::Downloaded);
    match shown {
        Some(file) if file.content_type.starts_with("video/") => {
            let _ = write!(
                html,
                "<video src=\"{}\" controls muted preload=\"metadata\"></video>",
                escape(&file.path)
            );
        }
        Some(file) => {
            let _ = write!(
                html,
                "<img src=\"{}\" alt=\"{}\" loading=\"lazy\">",
                escape(&file.path),
                escape(&job.name)
            );
        }
        None => {
            let _ =
                write!(html, "<span class=\"none\">{}</span>", escape(&status.replace('_', " ")));
        }
    }
    html.push_str("</div>\n<div class=\"body\">\n");
    let _ = writeln!(html, "<span class=\"name\">{}</span>", escape(&job.name));
    let _ = writeln!(html, "<span class=\"status\">{}</span>", escape(&status.replace('_', " ")));
    if let Some((href, name)) = parent {
        let _ = writeln!(
            html,
            "<span class=\"meta\">from <a href=\"{}\">{}</a></span>",
            escape(&href),
            escape(&name)
        );
    }
    if let (Some(error), true) = (&job.error, job.state != JobState::Downloaded) {
        let _ = writeln!(html, "<span class=\"reason\">{}</span>", escape(error));
    }
    let mut params: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&crate::report::shown_body(job)).unwrap_or_default();
    let prompt = params.remove("prompt");
    let prompt = prompt.as_ref().and_then(serde_json::Value::as_str).unwrap_or_default();
    let _ = writeln!(html, "<span class=\"prompt\">{}</span>", escape(prompt));
    let _ = writeln!(html, "<span class=\"meta\">{}</span>", escape(&job.model));
    if !params.is_empty() {
        let text = serde_json::to_string_pretty(&params).unwrap_or_default();
        let _ = writeln!(html, "<pre>{}</pre>", escape(&text));
    }
    if let Some(id) = &job.remote_id {
        let _ = writeln!(html, "<span class=\"meta\">job {}</span>", escape(id));
    }
    for file in job.files.iter().skip(1) {
        let _ = writeln!(html, "<a class=\"meta\" href=\"{0}\">{0}</a>", escape(&file.path));
    }
    html.push_str("</div>\n</article>\n");
}

/// Escapes text for HTML content and quoted attribute values.
#[must_use]
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            ch if ch.is_control() && ch != '\n' => out.push(' '),
            ch => out.push(ch),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobKey;
    use crate::store::FileRecord;
    use std::sync::Arc;

    fn job(name: &str, state: JobState, content_type: &str) -> JobRecord {
        let files = if state == JobState::Downloaded {
            let ext = if content_type.starts_with("video/") { "mp4" } else { "png" };
            vec![FileRecord {
                index: 0,
                url: "https://gen.krea.ai/x".into(),
                path: format!("{name}.{ext}"),
                bytes: 10,
                sha256: "00".into(),
                content_type: content_type.into(),
            }]
        } else {
            Vec::new()
        };
        JobRecord {
            id: 1,
            batch_id: 1,
            key: JobKey::from_stored("k".into()),
            name: name.into(),
            model: "image/bfl/flux-1-dev".into(),
            body: Arc::from(
                r#"{"prompt":"a <b>bold</b> \"fox\"","seed":7,"image_url":"https://example.com/a.png"}"#,
            ),
            state,
            remote_id: Some("job-1".into()),
            remote_status: None,
            attempt_at: None,
            attempt_ended: None,
            attempts: 1,
            submitted_at: None,
            created_at: None,
            completed_at: None,
            finished_at: None,
            urls: Vec::new(),
            error: (state == JobState::Failed).then(|| "content_moderation: flagged".into()),
            price_usd: None,
            in_file: true,
            reused_from: None,
            chain: None,
            parent_id: None,
            files,
            inputs: Vec::new(),
        }
    }

    #[test]
    fn cards_show_images_videos_and_failures() {
        let jobs = [
            job("fox", JobState::Downloaded, "image/png"),
            job("clip", JobState::Downloaded, "video/mp4"),
            job("bad", JobState::Failed, ""),
        ];
        let html = render_page(
            "t",
            &jobs.iter().collect::<Vec<_>>(),
            &jobs.iter().collect::<Vec<_>>(),
            0,
            1,
        );
        assert!(html.contains("<img src=\"fox.png\""));
        assert!(html.contains("<video src=\"clip.mp4\" controls"));
        assert!(html.contains("content_moderation: flagged"));
        assert!(html.contains("a &lt;b&gt;bold&lt;/b&gt; &quot;fox&quot;"), "prompts are escaped");
        assert!(html.contains("job-1") && html.contains("&quot;seed&quot;: 7"));
    }

    #[test]
    fn the_page_makes_no_request_of_its_own() {
        let jobs = [job("fox", JobState::Downloaded, "image/png")];
        let html = render_page(
            "t",
            &jobs.iter().collect::<Vec<_>>(),
            &jobs.iter().collect::<Vec<_>>(),
            0,
            1,
        );
        for attribute in [
            "src=\"http",
            "href=\"http",
            "src=\"//",
            "href=\"//",
            "<script",
            "<link",
            "@import",
            "url(",
        ] {
            assert!(!html.contains(attribute), "{attribute} in the page");
        }
        // The params' URL is shown as text, not fetched.
        assert!(html.contains("https://example.com/a.png"));
    }

    #[test]
    fn large_batches_are_paged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let jobs: Vec<JobRecord> = (0..PER_PAGE + 3)
            .map(|i| job(&format!("j{i}"), JobState::Downloaded, "image/png"))
            .collect();
        write(dir.path(), &jobs).expect("written");
        let second = std::fs::read_to_string(dir.path().join("index-2.html")).expect("page 2");
        assert_eq!(second.matches("<article").count(), 3);
        assert!(second.contains("<a href=\"index.html\">page 1</a>"));
        assert!(!dir.path().join("index-3.html").exists());
    }

    /// The title names the job file the folder's marker names, escaped; without a marker it is
    /// generic.
    #[test]
    fn the_title_names_the_job_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let jobs = [job("fox", JobState::Downloaded, "image/png")];
        write(dir.path(), &jobs).expect("written");
        let page = std::fs::read_to_string(dir.path().join("index.html")).expect("page");
        assert!(page.contains("<title>krea-batch results</title>"), "{page}");
        let marker = crate::output::Marker::new("id", Path::new("/s"), "batch:1", Vec::new())
            .with_job_file(Path::new("/work/foxes & owls.yaml"));
        crate::output::write_marker(dir.path(), &marker).expect("marker");
        write(dir.path(), &jobs).expect("written");
        let page = std::fs::read_to_string(dir.path().join("index.html")).expect("page");
        let title = "foxes &amp; owls.yaml: krea-batch results";
        assert!(page.contains(&format!("<title>{title}</title>")), "{page}");
        assert!(page.contains(&format!("<h1>{title}</h1>")), "{page}");
    }

    #[test]
    fn a_later_stage_links_to_its_parent_on_its_page() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut jobs: Vec<JobRecord> = (0..PER_PAGE)
            .map(|i| job(&format!("j{i}"), JobState::Downloaded, "image/png"))
            .collect();
        let chain = |stage: u32, parent: &str| {
            let text = format!("{{\"base\":\"castle\",\"stage\":{stage},\"parent\":\"{parent}\"}}");
            Some(std::sync::Arc::from(text.as_str()))
        };
        let mut enhanced = job("castle/1-standard-enhance", JobState::Downloaded, "image/png");
        enhanced.chain = chain(1, "j3");
        let mut animated = job("castle/2-kling-2.5", JobState::Downloaded, "video/mp4");
        animated.chain = chain(2, "castle/1-standard-enhance");
        jobs.extend([enhanced, animated]);
        write(dir.path(), &jobs).expect("written");
        let second = std::fs::read_to_string(dir.path().join("index-2.html")).expect("page 2");
        assert!(second.contains("from <a href=\"index.html#j3\">j3</a>"), "{second}");
        assert!(second.contains("<article class=\"completed\" id=\"castle/1-standard-enhance\">"));
        assert!(second.contains("from <a href=\"#castle/1-standard-enhance\">"));
    }

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            escape("<a href='x'>&\"</a>\u{7}"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt; "
        );
    }
}
