//! Folders of images: `from: photos/` (a `from:` ending in `/`) makes one job per image in the
//! folder. This file lists the folder; `sweep.rs` turns each image into a row of the entry
//! (its variable `{file}`, the file name without extension) and `inputs.rs` reads each image as
//! a local input, as if the job had named it in its model's input field.
//!
//! The rules, decided here:
//! - the folder is inside the job file's folder, under the rules of every path a job file
//!   names (`beside.rs`: relative, no `..`, no symbolic link anywhere on the path);
//! - only the folder's own files are taken, not those of its subfolders;
//! - an image is a JPEG, PNG, WebP or HEIC file by its extension (`.jpg`, `.jpeg`, `.png`,
//!   `.webp`, `.heic`, `.heif`, in any case): the types Krea takes as an image input. Videos,
//!   audio and anything else are skipped, and so are hidden files (`.DS_Store`, `._cat.jpg`)
//!   and subfolders; `check` says how many were skipped;
//! - an image that is a symbolic link is refused, not skipped: the folder's author meant it,
//!   and links are never followed;
//! - images are taken in the order of their names (byte order: `IMG_10` before `IMG_9`).

use crate::beside::list_folder_beside;
use std::path::Path;

/// The extensions of the images a folder gives (lowercase).
const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "heic", "heif"];

/// A folder of images a job file takes jobs from, as `check` reports it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FolderUse {
    /// The line of its `from:`.
    pub line: usize,
    /// The folder as written (`photos/`).
    pub folder: String,
    /// How many images it gave, one job each (before `count` and a `matrix:`).
    pub images: usize,
    /// What it held that is not an image to make a job of.
    pub skipped: Skipped,
}

/// The images of a folder, in order, and what was left out.
#[derive(Debug)]
pub(super) struct Images {
    /// One per image, sorted by file name.
    pub(super) files: Vec<Image>,
    /// What was skipped.
    pub(super) skipped: Skipped,
}

/// One image of a folder.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Image {
    /// The file name without its extension: the variable `{file}`.
    pub(super) stem: String,
    /// The path relative to the job file's folder (`photos/cat.png`), as a local input.
    pub(super) path: String,
}

/// What a folder held that is not an image to make a job of.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    /// Hidden files and folders (names starting with `.`).
    pub hidden: usize,
    /// Subfolders (not looked into).
    pub folders: usize,
    /// Files that are not JPEG, PNG, WebP or HEIC by their extension (videos, text, …).
    pub not_images: usize,
}

impl Skipped {
    /// How many entries were skipped.
    #[must_use]
    pub fn total(&self) -> usize {
        self.hidden + self.folders + self.not_images
    }
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if self.hidden > 0 {
            parts.push(format!("{} hidden", self.hidden));
        }
        if self.folders > 0 {
            parts.push(format!("{} subfolder(s)", self.folders));
        }
        if self.not_images > 0 {
            parts.push(format!("{} not JPEG, PNG, WebP or HEIC", self.not_images));
        }
        if parts.is_empty() {
            f.write_str("nothing skipped")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// Lists the images of the folder `written` (as in the job file, ending in `/`) inside
/// `base`; the error says what is wrong and what to do.
pub(super) fn read(base: &Path, written: &str) -> Result<Images, String> {
    let folder = written.trim_end_matches('/');
    let entries = list_folder_beside(base, Path::new(folder)).map_err(|err| {
        format!("{err}; `from:` ending in `/` names a folder of images beside the job file")
    })?;
    let mut files = Vec::new();
    let mut skipped = Skipped::default();
    for (name, kind) in entries {
        if name.as_encoded_bytes().starts_with(b".") {
            skipped.hidden += 1;
            continue;
        }
        if kind.is_dir() {
            skipped.folders += 1;
            continue;
        }
        let named = Path::new(&name);
        let extension = named.extension().and_then(|ext| ext.to_str()).map(str::to_lowercase);
        if !extension.is_some_and(|ext| IMAGE_EXTENSIONS.contains(&ext.as_str())) {
            skipped.not_images += 1;
            continue;
        }
        let Some(text) = name.to_str() else {
            return Err(format!(
                "{folder}/{} has a name that is not UTF-8; rename it",
                name.to_string_lossy()
            ));
        };
        if kind.is_symlink() {
            return Err(format!(
                "{folder}/{text} is a symbolic link, and links are not followed here (they could \
                 reach files elsewhere); put the image itself in the folder"
            ));
        }
        if !kind.is_file() {
            skipped.not_images += 1;
            continue;
        }
        let stem = named.file_stem().and_then(|stem| stem.to_str()).unwrap_or(text);
        files.push(Image { stem: stem.to_owned(), path: format!("{folder}/{text}") });
    }
    if files.is_empty() {
        return Err(format!(
            "{folder}/ holds no image to make jobs of (JPEG, PNG, WebP or HEIC files; {skipped}); \
             put the images in it, or name another folder"
        ));
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Images { files, skipped })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n";

    #[test]
    fn images_are_listed_by_name_and_the_rest_skipped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let photos = dir.path().join("photos");
        std::fs::create_dir_all(photos.join("inner")).expect("folders");
        for name in ["b.png", "a.JPG", "c.webp", "d.heic", ".hidden.png", "notes.txt", "clip.mp4"] {
            std::fs::write(photos.join(name), PNG).expect("file");
        }
        std::fs::write(photos.join("inner/deeper.png"), PNG).expect("file");
        let images = read(dir.path(), "photos/").expect("listed");
        let stems: Vec<&str> = images.files.iter().map(|image| image.stem.as_str()).collect();
        assert_eq!(stems, ["a", "b", "c", "d"]);
        assert_eq!(images.files[0].path, "photos/a.JPG");
        assert_eq!(images.skipped, Skipped { hidden: 1, folders: 1, not_images: 2 });
        assert_eq!(
            images.skipped.to_string(),
            "1 hidden, 1 subfolder(s), 2 not JPEG, PNG, WebP or HEIC"
        );
        assert_eq!(read(dir.path(), "./photos/inner/").expect("nested").files.len(), 1);
    }

    #[test]
    fn escapes_links_missing_and_empty_folders_are_refused() {
        let root = tempfile::tempdir().expect("temp dir");
        let base = root.path().join("jobs");
        let outside = root.path().join("outside");
        for dir in [base.join("empty"), base.join("mixed"), outside.clone()] {
            std::fs::create_dir_all(dir).expect("folders");
        }
        std::fs::write(outside.join("secret.png"), PNG).expect("file");
        std::fs::write(base.join("empty/readme.txt"), "no images").expect("file");
        std::fs::write(base.join("mixed/ok.png"), PNG).expect("file");
        std::os::unix::fs::symlink(&outside, base.join("linked")).expect("folder link");
        std::os::unix::fs::symlink(outside.join("secret.png"), base.join("mixed/link.png"))
            .expect("file link");
        for (written, needle) in [
            ("../outside/", "not inside"),
            ("/etc/", "not inside"),
            ("linked/", "symbolic link"),
            ("mixed/", "mixed/link.png is a symbolic link"),
            ("missing/", "cannot read missing"),
            ("empty/", "holds no image"),
            ("mixed/ok.png/", "not a folder"),
        ] {
            let refused = read(&base, written).expect_err(written);
            assert!(refused.contains(needle), "{written}: {refused}");
            assert!(!refused.contains(&*root.path().to_string_lossy()), "{refused}");
        }
    }
}
