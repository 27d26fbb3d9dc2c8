//! Fuzzes the job-file loader: any bytes either parse into jobs that are whole (a body, a
//! valid name, a key; a prompt, when sent, not blank) or are refused with one line that names
//! the file. A panic, a hang (`-timeout`) or runaway memory (`-rss_limit_mb`) is a finding.

#![no_main]

use krea_batch::check_job_name;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    match krea_batch::parse_job_file(data, Path::new("fuzz.yaml")) {
        Ok(file) => {
            assert!(!file.jobs.is_empty(), "a file without jobs was accepted");
            for job in &file.jobs {
                assert!(!job.body.is_empty(), "job {} has no body", job.name);
                let object = job.body.starts_with('{') && job.body.ends_with('}');
                assert!(object, "job {}: body is not an object", job.name);
                // A prompt may be left out (the schema check decides); one sent is not blank.
                if let Some(prompt) = job.body_map().get("prompt") {
                    let prompt = prompt.as_str().unwrap_or_default();
                    assert!(!prompt.trim().is_empty(), "job {} has a blank prompt", job.name);
                }
                assert!(check_job_name(&job.name).is_ok(), "job name {:?} is invalid", job.name);
                assert!(!job.key.to_string().is_empty(), "job {} has no key", job.name);
                assert!(!job.model.is_empty(), "job {} has no model", job.name);
            }
        }
        Err(error) => {
            let shown = error.to_string();
            assert!(shown.starts_with("fuzz.yaml"), "no file named: {shown}");
            assert!(!shown.contains('\n') && !shown.contains('\r'), "not one line: {shown:?}");
            assert!(!error.message.is_empty(), "no message: {shown}");
        }
    }
});
