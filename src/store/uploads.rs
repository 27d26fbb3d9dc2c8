//! The uploads of local files (`POST /assets`), one row per file content (its SHA-256) and
//! API: the state is committed before each upload is sent (`attempting`), marked `unknown` when
//! its answer is lost, and `uploaded` with Krea's URL once known. `uploads.rs` runs the protocol;
//! this file only records it.

use super::{Store, StoreError, now_ms, sqlite};
use rusqlite::{OptionalExtension, params};
use std::collections::HashMap;

/// Where an upload stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum UploadState {
    /// Committed before the POST; a process killed during it leaves this.
    Attempting,
    /// The POST got no usable answer: the asset may exist at Krea.
    Unknown,
    /// Krea's answer is recorded: every job using this content takes this URL.
    Uploaded {
        /// The asset's URL.
        url: String,
    },
}

/// One upload as the state file holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct UploadRecord {
    /// The content's SHA-256, lowercase hex.
    pub sha256: String,
    /// The file as the job file named it (for messages).
    pub path: String,
    /// Where it stands.
    pub state: UploadState,
    /// When the last attempt was committed (ms since the epoch).
    pub attempt_at: Option<i64>,
}

impl Store {
    /// The upload of `sha256` to the API at `api`, if one was ever recorded.
    pub(crate) fn upload(
        &self,
        sha256: &str,
        api: &str,
    ) -> Result<Option<UploadRecord>, StoreError> {
        self.conn
            .query_row(
                "SELECT path, state, url, attempt_at FROM uploads WHERE sha256 = ?1 AND api = ?2",
                params![sha256, api],
                |row| {
                    let state: String = row.get(1)?;
                    let url: Option<String> = row.get(2)?;
                    Ok((row.get::<_, String>(0)?, state, url, row.get::<_, Option<i64>>(3)?))
                },
            )
            .optional()
            .map_err(sqlite(&self.path))?
            .map(|(path, state, url, attempt_at)| {
                let state = match (state.as_str(), url) {
                    ("uploaded", Some(url)) => UploadState::Uploaded { url },
                    ("attempting", _) => UploadState::Attempting,
                    ("unknown", _) => UploadState::Unknown,
                    (other, _) => {
                        return Err(StoreError::Corrupt {
                            path: self.path.clone(),
                            message: format!("upload {sha256} has the state {other:?}"),
                        });
                    }
                };
                Ok(UploadRecord { sha256: sha256.to_owned(), path, state, attempt_at })
            })
            .transpose()
    }

    /// The path each uploaded content was named by (whatever the API; the latest recorded),
    /// by SHA-256: the names the manifest and the gallery show for local inputs.
    pub(crate) fn upload_paths(&self) -> Result<HashMap<String, String>, StoreError> {
        let err = sqlite(&self.path);
        let mut stmt = self
            .conn
            .prepare_cached("SELECT sha256, path FROM uploads ORDER BY updated_at")
            .map_err(&err)?;
        let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?))).map_err(&err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }

    /// Records, durably, that `sha256` is about to be uploaded to `api`: before the POST.
    pub(crate) fn begin_upload(
        &mut self,
        sha256: &str,
        api: &str,
        path: &str,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        self.conn
            .execute(
                "INSERT INTO uploads (sha256, api, path, state, attempt_at, updated_at)
                 VALUES (?1, ?2, ?3, 'attempting', ?4, ?4)
                 ON CONFLICT (sha256, api) DO UPDATE SET path = ?3, state = 'attempting',
                     url = NULL, attempt_at = ?4, updated_at = ?4",
                params![sha256, api, path, now],
            )
            .map(drop)
            .map_err(sqlite(&self.path))
    }

    /// The upload of `sha256` got no usable answer.
    pub(crate) fn upload_unknown(&mut self, sha256: &str, api: &str) -> Result<(), StoreError> {
        self.set_upload(sha256, api, "unknown", None)
    }

    /// The upload of `sha256` is at Krea, at `url`.
    pub(crate) fn upload_done(
        &mut self,
        sha256: &str,
        api: &str,
        url: &str,
    ) -> Result<(), StoreError> {
        self.set_upload(sha256, api, "uploaded", Some(url))
    }

    /// Nothing was uploaded (refused, not sent, or shown not to exist): the record goes.
    pub(crate) fn forget_upload(&mut self, sha256: &str, api: &str) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM uploads WHERE sha256 = ?1 AND api = ?2", params![sha256, api])
            .map(drop)
            .map_err(sqlite(&self.path))
    }

    fn set_upload(
        &mut self,
        sha256: &str,
        api: &str,
        state: &str,
        url: Option<&str>,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE uploads SET state = ?3, url = ?4, updated_at = ?5
                 WHERE sha256 = ?1 AND api = ?2",
                params![sha256, api, state, url, now_ms()],
            )
            .map(drop)
            .map_err(sqlite(&self.path))
    }
}
