//! Sweeps: one job entry that expands into many jobs.
//!
//! - `matrix:` maps variables to lists of values; the entry becomes one job per combination
//!   (the cross product, in the order the lists are written, variables sorted by name).
//! - `from: prompts.csv` (or `.jsonl`) reads a data file beside the job file; the entry becomes
//!   one job per row (times the matrix's combinations, if it has one too). Each column is a
//!   variable; `prompt`, `name` and `model` columns give the job's prompt, name and model.
//! - `from: photos/` (ending in `/`) names a folder of images beside the job file; the entry
//!   becomes one job per image (`folder.rs` lists them), with the variable `file` (the file name
//!   without extension) and the image in the model's input field (`image_url`, or
//!   `start_image` for a video model). Its jobs are named `{file}` unless `name:` says otherwise.
//! - In such an entry the prompt and the name are templates: `{seed}` is the variable's value,
//!   `{{` and `}}` are literal braces. A variable the prompt does not use becomes a request
//!   field of its name (`seed: [1, 2]` sets `"seed": 1`, then 2), so a matrix sweeps
//!   parameters and a CSV can carry per-row parameters. `model` sets the job's model.
//!
//! A plain entry (no `matrix`, no `from`) is not a template: its braces are text.
//!
//! Identity stays the one of part 2: a job's key is its model, its request body and its
//! occurrence, so adding a value to a list or a row to the file adds only the new jobs, and
//! reordering changes nothing. Names are readable and stable: the entry's name (or one derived
//! from it) followed by `_<variable>-<value>` for each matrix variable, e.g.
//! `fox_aspect_ratio-16-9_seed-3`; rows use their `name` column, or the data file's name,
//! the row's number and the prompt's first words (`prompts-0007-a-red-fox`). A `name:`
//! template (`fox-{seed}`) chooses the pattern instead.

use super::JobFileError;
use super::folder::{Images, Skipped};
use super::locate::Seg;
use super::values::parse_model_path;
use super::{MAX_DATA_SIZE, MAX_JOBS};
use crate::beside::{check_relative, open_beside};
use crate::job::derive_name;
use serde_json::{Map, Number, Value};
use std::borrow::Cow;
use std::io::Read as _;
use std::path::{Path, PathBuf};

/// Why an entry cannot be expanded: a node of the job file, or a row of its data file.
#[derive(Debug)]
pub(super) enum Refusal {
    /// At this key path of the job file.
    At(Vec<Seg>, String),
    /// In the data file (its path, line and column are in the error), or an error already
    /// placed by the caller of [`expand`].
    Data(JobFileError),
}

/// Whether what `from:` names is a folder of images: written with a trailing `/`.
pub(crate) fn is_folder(text: &str) -> bool {
    text.ends_with('/')
}

/// Checks what `from:` names: a `.csv` or `.jsonl` file, or a folder (`photos/`), inside the
/// job file's folder. Only a relative path without `..` (and, when it is read, without links:
/// [`open_beside`]): when the service runs job files written by others, `from:` must not read
/// files elsewhere and send them to Krea as prompts or images.
pub(crate) fn check_data_path(text: &str) -> Result<(), DataPathError> {
    if text.trim().is_empty() {
        return Err(DataPathError::Empty);
    }
    let path = Path::new(text);
    if check_relative(path).is_err() {
        return Err(DataPathError::Outside(text.to_owned()));
    }
    if is_folder(text) {
        return Ok(());
    }
    match DataFormat::of(path) {
        Some(_) => Ok(()),
        None => Err(DataPathError::Format(text.to_owned())),
    }
}

/// What is wrong with what `from:` names ([`check_data_path`]).
#[derive(Debug, thiserror::Error)]
pub(crate) enum DataPathError {
    /// Nothing named.
    #[error("the data file is empty; write a file beside the job file, e.g. prompts.csv")]
    Empty,
    /// Absolute, or with `..`.
    #[error("{0:?} is not inside the job file's folder; write a path relative to it, without `..`")]
    Outside(String),
    /// Neither `.csv` nor `.jsonl`, nor a folder.
    #[error(
        "{0:?} is neither .csv nor .jsonl; prompts are read from CSV (with a header row) or \
         JSON Lines (one object per line), and a folder of images is written with a trailing \
         `/`, like `photos/`"
    )]
    Format(String),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum DataFormat {
    Csv,
    JsonLines,
    /// A folder of images (`folder.rs`): one row per image.
    Folder,
}

impl DataFormat {
    fn of(path: &Path) -> Option<Self> {
        let extension = path.extension()?.to_str()?.to_ascii_lowercase();
        match extension.as_str() {
            "csv" => Some(Self::Csv),
            "jsonl" | "ndjson" => Some(Self::JsonLines),
            _ => None,
        }
    }
}

/// One row of a data file.
pub(super) struct Row {
    /// Its line in the file, from 1.
    line: usize,
    /// Its values by column. CSV cells are text; see [`DataRows::typed`].
    values: Map<String, Value>,
}

/// A `from:` file, checked whole. Its rows are not held: [`DataRows::each_row`] reads them
/// again from the text, one at a time, while the entry expands (a row's values as a map take
/// ten times its text, and a file may hold a hundred thousand rows).
pub(super) struct DataRows {
    path: PathBuf,
    /// The file name without extension, as a name prefix (`prompts`).
    stem: String,
    /// The CSV header, or every key of the JSON Lines objects in order of appearance.
    columns: Vec<String>,
    /// The file's text as read once (its rows must not change between the check and the use).
    bytes: Vec<u8>,
    format: DataFormat,
    /// How many rows.
    len: usize,
    /// CSV cells are text; as request fields they are read as numbers and booleans where they
    /// are written as such (JSON Lines values keep their JSON types).
    typed: bool,
    /// A folder's images, and the request field each goes into.
    images: Option<(Images, &'static str)>,
}

impl DataRows {
    /// How many rows.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The length of the file's text: what its rows can add to the jobs' bodies, per copy.
    pub(super) fn text_len(&self) -> usize {
        let images = self.images.iter().flat_map(|(images, _)| &images.files);
        self.bytes.len() + images.map(|image| image.stem.len() + image.path.len()).sum::<usize>()
    }

    /// What a folder of images skipped; `None` for a data file.
    pub(super) fn skipped(&self) -> Option<Skipped> {
        self.images.as_ref().map(|(images, _)| images.skipped)
    }

    /// The request field a folder's images go into; `None` for a data file.
    pub(super) fn input_field(&self) -> Option<&'static str> {
        self.images.as_ref().map(|(_, field)| *field)
    }

    fn is_folder(&self) -> bool {
        self.format == DataFormat::Folder
    }

    /// Reads the rows in file order, handing each to `use_row`; the first error stops.
    fn each_row(&self, mut use_row: impl FnMut(Row) -> Result<(), Refusal>) -> Result<(), Refusal> {
        match self.format {
            DataFormat::Csv => self.each_csv_row(&mut use_row),
            DataFormat::JsonLines => self.each_json_row(&mut use_row),
            DataFormat::Folder => {
                let Some((images, field)) = &self.images else { return Ok(()) };
                for (number, image) in images.files.iter().enumerate() {
                    let mut values = Map::new();
                    values.insert("file".into(), Value::String(image.stem.clone()));
                    values.insert((*field).to_owned(), Value::String(image.path.clone()));
                    use_row(Row { line: number + 1, values })?;
                }
                Ok(())
            }
        }
    }
}

/// Lists the folder of images `written` (ending in `/`) of entry `index`, beside `job_file`:
/// one row per image, which puts it in `field` (the model's input) and names it `{file}`.
pub(super) fn read_folder(
    job_file: &Path,
    index: usize,
    written: &str,
    field: &'static str,
) -> Result<DataRows, Refusal> {
    let at = || vec![Seg::key("jobs"), Seg::Index(index), Seg::key("from")];
    let folder = job_file.parent().filter(|dir| !dir.as_os_str().is_empty());
    let base = folder.unwrap_or_else(|| Path::new("."));
    let images =
        super::folder::read(base, written).map_err(|message| Refusal::At(at(), message))?;
    let path = folder.map_or_else(|| PathBuf::from(written), |dir| dir.join(written));
    Ok(DataRows {
        stem: slug(written.trim_end_matches('/')),
        path,
        columns: vec!["file".to_owned()],
        bytes: Vec::new(),
        format: DataFormat::Folder,
        len: images.files.len(),
        typed: false,
        images: Some((images, field)),
    })
}

/// Reads the `from:` file `written` of entry `index`, beside `job_file`, and checks every row.
pub(super) fn read_rows(job_file: &Path, index: usize, written: &str) -> Result<DataRows, Refusal> {
    let at = || vec![Seg::key("jobs"), Seg::Index(index), Seg::key("from")];
    let folder = job_file.parent().filter(|dir| !dir.as_os_str().is_empty());
    // No link in any component, no `..`: see `crate::beside`.
    let (file, meta) = open_beside(folder.unwrap_or_else(|| Path::new(".")), Path::new(written))
        .map_err(|err| Refusal::At(at(), err.to_string()))?;
    if meta.len() > MAX_DATA_SIZE {
        return Err(Refusal::At(at(), too_large(written)));
    }
    let mut bytes = Vec::new();
    file.take(MAX_DATA_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(|err| Refusal::At(at(), format!("cannot read {written}: {err}")))?;
    if bytes.len() as u64 > MAX_DATA_SIZE {
        return Err(Refusal::At(at(), too_large(written)));
    }
    let path = folder.map_or_else(|| PathBuf::from(written), |dir| dir.join(written));
    let stem = path.file_stem().map_or_else(String::new, |stem| slug(&stem.to_string_lossy()));
    let format = DataFormat::of(Path::new(written)).unwrap_or(DataFormat::JsonLines);
    let mut rows = DataRows {
        path,
        stem,
        columns: Vec::new(),
        bytes,
        format,
        len: 0,
        typed: format == DataFormat::Csv,
        images: None,
    };
    let mut columns = Vec::new();
    let mut len = 0_usize;
    if format == DataFormat::Csv {
        rows.columns = csv_header(&rows)?;
    }
    rows.each_row(|row| {
        len += 1;
        if len > MAX_JOBS {
            return Err(data_error(
                &rows,
                row.line,
                None,
                format!(
                    "more than {MAX_JOBS} rows; a job file may make at most {MAX_JOBS} jobs; split \
                     the data file"
                ),
            ));
        }
        if format == DataFormat::JsonLines {
            for column in row.values.keys() {
                if !columns.contains(column) {
                    columns.push(column.clone());
                }
            }
        }
        Ok(())
    })?;
    if format == DataFormat::JsonLines {
        rows.columns = columns;
    }
    rows.len = len;
    if rows.len == 0 {
        return Err(Refusal::At(at(), format!("{written} has no rows, so there is nothing to do")));
    }
    Ok(rows)
}

fn too_large(written: &str) -> String {
    format!(
        "{written} is larger than {} MiB, the most krea-batch reads of a data file; split it \
         into several files",
        MAX_DATA_SIZE >> 20
    )
}

/// An error at `line` (and `column`) of the data file.
fn data_error(rows: &DataRows, line: usize, column: Option<usize>, message: String) -> Refusal {
    Refusal::Data(JobFileError {
        file: rows.path.clone(),
        line: Some(line),
        column,
        key: None,
        message,
    })
}

/// The CSV header row's column names, checked.
fn csv_header(rows: &DataRows) -> Result<Vec<String>, Refusal> {
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(&rows.bytes[..]);
    let header_error = |message: String| data_error(rows, 1, None, message);
    let headers = match reader.headers() {
        Ok(headers) => headers.clone(),
        Err(err) => return Err(header_error(format!("cannot read the header row: {err}"))),
    };
    let mut columns: Vec<String> = Vec::new();
    for (number, column) in headers.iter().enumerate() {
        let column = column.trim();
        if column.is_empty() {
            return Err(header_error(format!(
                "column {} has no name; the first row names the columns",
                number + 1
            )));
        }
        if columns.iter().any(|seen| seen == column) {
            return Err(header_error(format!("the column {column:?} appears twice")));
        }
        columns.push(column.to_owned());
    }
    Ok(columns)
}

impl DataRows {
    fn each_csv_row(
        &self,
        use_row: &mut impl FnMut(Row) -> Result<(), Refusal>,
    ) -> Result<(), Refusal> {
        let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(&self.bytes[..]);
        let mut record = csv::StringRecord::new();
        loop {
            match reader.read_record(&mut record) {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(err) => {
                    let line =
                        err.position().map_or(1, |at| usize::try_from(at.line()).unwrap_or(1));
                    return Err(data_error(self, line, None, csv_message(&err)));
                }
            }
            let line = record.position().map_or(1, |at| usize::try_from(at.line()).unwrap_or(1));
            let values = self
                .columns
                .iter()
                .zip(record.iter())
                .map(|(column, cell)| (column.clone(), Value::String(cell.to_owned())))
                .collect();
            use_row(Row { line, values })?;
        }
    }

    fn each_json_row(
        &self,
        use_row: &mut impl FnMut(Row) -> Result<(), Refusal>,
    ) -> Result<(), Refusal> {
        let text = match std::str::from_utf8(&self.bytes) {
            Ok(text) => text.strip_prefix('\u{feff}').unwrap_or(text),
            Err(err) => {
                let line = self.bytes[..err.valid_up_to()].split(|byte| *byte == b'\n').count();
                return Err(data_error(
                    self,
                    line,
                    None,
                    "not valid UTF-8; save it as UTF-8".into(),
                ));
            }
        };
        for (number, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let values = match serde_json::from_str::<Value>(line) {
                Ok(Value::Object(values)) => values,
                Ok(_) => {
                    return Err(data_error(
                        self,
                        number + 1,
                        None,
                        "each line must be a JSON object, like {\"prompt\": \"a red fox\"}".into(),
                    ));
                }
                Err(err) => {
                    let message = err.to_string();
                    let message = message.split(" at line ").next().unwrap_or(&message).to_owned();
                    return Err(data_error(self, number + 1, Some(err.column()), message));
                }
            };
            use_row(Row { line: number + 1, values })?;
        }
        Ok(())
    }
}

/// The csv crate's message without its own position (the error carries the line).
fn csv_message(err: &csv::Error) -> String {
    match err.kind() {
        csv::ErrorKind::UnequalLengths { expected_len, len, .. } => format!(
            "this row has {len} cells, the header {expected_len}; quote cells that contain commas"
        ),
        csv::ErrorKind::Utf8 { .. } => "this row is not valid UTF-8; save the file as UTF-8".into(),
        _ => err.to_string(),
    }
}

/// A checked `matrix:`: variables (sorted by name) and their values.
pub(super) struct Matrix {
    variables: Vec<(String, Vec<Value>)>,
}

impl Matrix {
    /// An upper bound of what one combination's values weigh (the largest value of each
    /// variable), in the units of the job file's budgets.
    pub(super) fn weight_per_combination(&self) -> usize {
        self.variables
            .iter()
            .map(|(variable, values)| {
                variable.len() + values.iter().map(super::value_weight).max().unwrap_or(0)
            })
            .fold(0, usize::saturating_add)
    }

    /// How many combinations, saturating.
    pub(super) fn combinations(&self) -> usize {
        self.variables
            .iter()
            .fold(1_usize, |product, (_, values)| product.saturating_mul(values.len()))
    }

    /// Checks the `matrix:` of entry `index`.
    pub(super) fn check(index: usize, written: &Map<String, Value>) -> Result<Self, Refusal> {
        let at = |variable: &str| {
            let mut path = vec![Seg::key("jobs"), Seg::Index(index), Seg::key("matrix")];
            if !variable.is_empty() {
                path.push(Seg::key(variable));
            }
            path
        };
        if written.is_empty() {
            return Err(Refusal::At(
                at(""),
                "the matrix is empty; give each variable a list, like `seed: [1, 2, 3]`".into(),
            ));
        }
        let mut variables = Vec::new();
        for (variable, values) in written {
            if !is_variable(variable) {
                return Err(Refusal::At(
                    at(variable),
                    format!(
                        "{variable:?} cannot be a variable; use letters, digits and '_', not \
                         starting with a digit"
                    ),
                ));
            }
            if matches!(variable.as_str(), "prompt" | "name") {
                return Err(Refusal::At(
                    at(variable),
                    format!(
                        "`{variable}` cannot be swept directly; sweep a variable and use it in \
                         the {variable}, like `{variable}: \"a {{animal}} in snow\"` with \
                         `animal: [fox, owl]`"
                    ),
                ));
            }
            let Value::Array(values) = values else {
                return Err(Refusal::At(
                    at(variable),
                    format!("`{variable}` needs a list of values, like `{variable}: [1, 2, 3]`"),
                ));
            };
            if values.is_empty() {
                return Err(Refusal::At(
                    at(variable),
                    format!("the list of `{variable}` is empty; give it at least one value"),
                ));
            }
            // By their JSON text (values are not `Hash`): a long list of seeds stays linear.
            let mut seen = std::collections::HashSet::new();
            for value in values {
                if !seen.insert(value.to_string()) {
                    return Err(Refusal::At(
                        at(variable),
                        format!("the value {value} appears twice in the list of `{variable}`"),
                    ));
                }
                if variable == "model" && !value.is_string() {
                    return Err(Refusal::At(
                        at(variable),
                        format!("models are model paths like image/bfl/flux-1-dev; found {value}"),
                    ));
                }
            }
            variables.push((variable.clone(), values.clone()));
        }
        Ok(Self { variables })
    }
}

fn is_variable(text: &str) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A brace in a template that is neither `{{`, `}}` nor part of a `{variable}`: the text from
/// it (up to 20 characters).
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a `{{variable}}`; in a sweep, write `{{{{` and `}}}}` for literal braces")]
pub(super) struct BraceError(String);

/// A prompt or name with `{variable}` slots.
pub(super) struct Template {
    parts: Vec<Part>,
}

enum Part {
    Text(String),
    Variable(String),
}

impl Template {
    /// Parses `text`; a brace that is neither `{{`, `}}` nor part of a `{variable}` is refused.
    pub(super) fn parse(text: &str) -> Result<Self, BraceError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(at) = rest.find(['{', '}']) {
            literal.push_str(&rest[..at]);
            let tail = &rest[at..];
            if tail.starts_with("{{") || tail.starts_with("}}") {
                literal.push_str(&tail[..1]);
                rest = &tail[2..];
                continue;
            }
            let closed = tail.starts_with('{').then(|| tail.find('}')).flatten();
            let Some(end) = closed.filter(|end| is_variable(&tail[1..*end])) else {
                return Err(BraceError(tail.chars().take(20).collect()));
            };
            if !literal.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut literal)));
            }
            parts.push(Part::Variable(tail[1..end].to_owned()));
            rest = &tail[end + 1..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        Ok(Self { parts })
    }

    fn variables(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|part| match part {
            Part::Variable(name) => Some(name.as_str()),
            Part::Text(_) => None,
        })
    }

    fn uses(&self, variable: &str) -> bool {
        self.variables().any(|used| used == variable)
    }

    /// The text without its slots, for a name derived from it.
    fn literal(&self) -> String {
        self.parts
            .iter()
            .map(|part| match part {
                Part::Text(text) => text.as_str(),
                Part::Variable(_) => " ",
            })
            .collect()
    }

    fn render<E>(&self, mut value: impl FnMut(&str) -> Result<String, E>) -> Result<String, E> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Variable(name) => out.push_str(&value(name)?),
            }
        }
        Ok(out)
    }
}

/// One job an entry expands into (before `count`).
pub(super) struct Instance<'a> {
    /// Borrowed from the entry when it is not a sweep (most of a 100,000-job file).
    pub(super) prompt: Cow<'a, str>,
    pub(super) name: String,
    /// From a `model` variable or column; else the entry's or the file's model.
    pub(super) model: Option<String>,
    /// Request fields from the variables the prompt does not use, over the entry's params.
    pub(super) fields: Map<String, Value>,
}

/// Expands entry `index` (its prompt, name, matrix and data rows) into its jobs, handing each
/// to `emit` as it is made (rows are read one at a time, and no list of them is built).
pub(super) fn expand(
    index: usize,
    prompt: &str,
    name: Option<&str>,
    matrix: Option<&Matrix>,
    rows: Option<&DataRows>,
    emit: &mut dyn FnMut(Instance<'static>) -> Result<(), Refusal>,
) -> Result<(), Refusal> {
    let at = |key: &str| vec![Seg::key("jobs"), Seg::Index(index), Seg::key(key)];
    let prompt = Template::parse(prompt)
        .map_err(|message| Refusal::At(at("prompt"), message.to_string()))?;
    let name_template = match name.filter(|name| name.contains(['{', '}'])) {
        Some(name) => Some(
            Template::parse(name)
                .map_err(|message| Refusal::At(at("name"), message.to_string()))?,
        ),
        None => None,
    };
    let swept: &[(String, Vec<Value>)] = matrix.map_or(&[], |matrix| &matrix.variables);
    check_variables(index, &prompt, name_template.as_ref(), swept, rows)?;
    let entry = Entry { index, prompt, name, name_template, swept, rows };
    let mut combination = vec![0_usize; swept.len()];
    let mut each_combination = |row: Option<(usize, &Row)>| {
        combination.fill(0);
        loop {
            emit(entry.instance(row, &combination)?)?;
            if !next_combination(&mut combination, swept) {
                return Ok(());
            }
        }
    };
    match rows {
        None => each_combination(None),
        Some(data) => {
            let mut number = 0;
            data.each_row(|row| {
                each_combination(Some((number, &row)))?;
                number += 1;
                Ok(())
            })
        }
    }
}

/// Checks that the templates use only the entry's variables, that a matrix variable is not
/// also a column, and that rows have a prompt.
fn check_variables(
    index: usize,
    prompt: &Template,
    name_template: Option<&Template>,
    swept: &[(String, Vec<Value>)],
    rows: Option<&DataRows>,
) -> Result<(), Refusal> {
    let at = |key: &str| vec![Seg::key("jobs"), Seg::Index(index), Seg::key(key)];
    let columns: &[String] = rows.map_or(&[], |rows| &rows.columns);
    if let (Some(rows), Some((variable, _))) =
        (rows, swept.iter().find(|(variable, _)| columns.contains(variable)))
    {
        return Err(Refusal::At(
            vec![Seg::key("jobs"), Seg::Index(index), Seg::key("matrix"), Seg::key(variable)],
            format!("`{variable}` is also a column of {}; rename one of them", rows.path.display()),
        ));
    }
    if let Some(rows) = rows
        && prompt.parts.len() == 1
        && prompt.uses("prompt")
        && !columns.iter().any(|column| column == "prompt")
    {
        return Err(Refusal::At(
            at("from"),
            format!(
                "{} has no `prompt` column; add one, or give this job a `prompt:` template \
                 that uses its columns ({})",
                rows.path.display(),
                columns.join(", ")
            ),
        ));
    }
    let known = |variable: &str| {
        swept.iter().any(|(swept, _)| swept == variable) || columns.iter().any(|c| c == variable)
    };
    for (key, template) in [("prompt", Some(prompt)), ("name", name_template)] {
        let Some(template) = template else { continue };
        if let Some(unknown) = template.variables().find(|variable| !known(variable)) {
            let mut listed: Vec<&str> =
                swept.iter().map(|(variable, _)| variable.as_str()).collect();
            listed.extend(columns.iter().map(String::as_str));
            let listed = if listed.is_empty() { "none".to_owned() } else { listed.join(", ") };
            return Err(Refusal::At(
                at(key),
                format!(
                    "`{{{unknown}}}` is not a variable of this job (its variables: {listed}); \
                     write `{{{{` and `}}}}` for literal braces"
                ),
            ));
        }
    }
    Ok(())
}

/// Steps `combination` (indices into each variable's values) to the next, the last variable
/// fastest; `false` after the last one.
fn next_combination(combination: &mut [usize], swept: &[(String, Vec<Value>)]) -> bool {
    for (position, (_, values)) in swept.iter().enumerate().rev() {
        combination[position] += 1;
        if combination[position] < values.len() {
            return true;
        }
        combination[position] = 0;
    }
    false
}

/// An entry being expanded.
struct Entry<'a> {
    index: usize,
    prompt: Template,
    name: Option<&'a str>,
    name_template: Option<Template>,
    swept: &'a [(String, Vec<Value>)],
    rows: Option<&'a DataRows>,
}

impl Entry<'_> {
    /// The job of data row `row` (with its index) and matrix `combination`.
    fn instance(
        &self,
        row: Option<(usize, &Row)>,
        combination: &[usize],
    ) -> Result<Instance<'static>, Refusal> {
        let mut values: Vec<(&str, &Value)> = Vec::new();
        if let Some((_, row)) = row {
            values.extend(row.values.iter().map(|(column, value)| (column.as_str(), value)));
        }
        for ((variable, list), chosen) in self.swept.iter().zip(combination) {
            values.push((variable, &list[*chosen]));
        }
        let lookup =
            |variable: &str| values.iter().find(|(name, _)| *name == variable).map(|(_, v)| *v);
        let fail = |key: &str, message: String| match (row, self.rows) {
            (Some((_, row)), Some(rows)) if !rows.is_folder() => {
                data_error(rows, row.line, None, message)
            }
            _ => {
                Refusal::At(vec![Seg::key("jobs"), Seg::Index(self.index), Seg::key(key)], message)
            }
        };
        let text = |variable: &str| -> Result<String, Refusal> {
            match lookup(variable) {
                Some(Value::String(text)) => Ok(text.clone()),
                Some(Value::Number(number)) => Ok(number.to_string()),
                Some(Value::Bool(value)) => Ok(value.to_string()),
                None | Some(Value::Null) => {
                    Err(fail("prompt", format!("`{variable}` has no value here")))
                }
                Some(other) => Err(fail(
                    "prompt",
                    format!(
                        "`{variable}` is {other}, a list or mapping; only text and numbers \
                             go into a prompt or name"
                    ),
                )),
            }
        };
        let prompt = self.prompt.render(&text)?;
        // No prompt written is no prompt (a model may take none); one written that comes out
        // blank is a mistake.
        if prompt.trim().is_empty() && !self.prompt.parts.is_empty() {
            return Err(fail("prompt", "the prompt is empty; write the text to generate".into()));
        }
        let model = match lookup("model") {
            None | Some(Value::Null) => None,
            Some(Value::String(model)) if model.is_empty() => None,
            Some(Value::String(model)) => {
                Some(parse_model_path(model).map_err(|why| fail("matrix", why.to_string()))?)
            }
            Some(other) => {
                return Err(fail("matrix", format!("a model is a model path; found {other}")));
            }
        };
        let mut fields = Map::new();
        for (variable, value) in &values {
            let folder_name = *variable == "file" && self.rows.is_some_and(DataRows::is_folder);
            let special = matches!(*variable, "prompt" | "name" | "model") || folder_name;
            if special || self.prompt.uses(variable) || value.is_null() {
                continue;
            }
            let typed = self.rows.is_some_and(|rows| rows.typed);
            match value {
                Value::String(cell) if typed && cell.is_empty() => {}
                Value::String(cell) if typed => {
                    fields.insert((*variable).to_owned(), typed_cell(cell));
                }
                _ => {
                    fields.insert((*variable).to_owned(), (*value).clone());
                }
            }
        }
        let name = self.name(row, &prompt, combination, &lookup)?;
        Ok(Instance { prompt: Cow::Owned(prompt), name, model, fields })
    }

    fn name<'v>(
        &self,
        row: Option<(usize, &Row)>,
        prompt: &str,
        combination: &[usize],
        lookup: &impl Fn(&str) -> Option<&'v Value>,
    ) -> Result<String, Refusal> {
        if let Some(template) = &self.name_template {
            return template.render(|variable| Ok(self.name_part(variable, lookup(variable))));
        }
        let row_name = lookup("name").filter(|_| row.is_some()).map(|name| scalar_text(Some(name)));
        let mut name = match (self.name, row_name.filter(|name| !name.is_empty()), row) {
            (Some(name), _, _) => name.to_owned(),
            (None, Some(name), _) => name,
            (None, None, Some(_)) if self.rows.is_some_and(DataRows::is_folder) => {
                self.name_part("file", lookup("file"))
            }
            (None, None, Some((number, _))) => {
                let stem = self.rows.map_or("rows", |rows| rows.stem.as_str());
                format!("{stem}-{}", derive_name(number + 1, prompt))
            }
            (None, None, None) => derive_name(self.index + 1, &self.prompt.literal()),
        };
        for ((variable, list), chosen) in self.swept.iter().zip(combination) {
            name.push('_');
            name.push_str(variable);
            name.push('-');
            name.push_str(&slug(&scalar_text(Some(&list[*chosen]))));
        }
        Ok(name)
    }
}

impl Entry<'_> {
    /// A variable's value as a piece of a job name. A folder's `{file}` keeps up to 100
    /// characters, not 32: photos are told apart by names that often share a long start
    /// (`holiday-2024-beach-0001`), and two jobs may not share a name.
    fn name_part(&self, variable: &str, value: Option<&Value>) -> String {
        let folder_file = variable == "file" && self.rows.is_some_and(DataRows::is_folder);
        slug_of_at_most(&scalar_text(value), if folder_file { 100 } else { 32 })
    }
}

/// A value as text for names: strings as written, numbers and booleans as JSON.
fn scalar_text(value: Option<&Value>) -> String {
    match value {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// A CSV cell as a request field: a number or boolean when written as one, else text.
fn typed_cell(cell: &str) -> Value {
    if let Ok(whole) = cell.parse::<i64>() {
        return Value::Number(whole.into());
    }
    let numeric = cell.bytes().any(|byte| byte.is_ascii_digit())
        && cell.bytes().all(|byte| byte.is_ascii_digit() || b"+-.eE".contains(&byte));
    if numeric && let Some(number) = cell.parse::<f64>().ok().and_then(Number::from_f64) {
        return Value::Number(number);
    }
    match cell {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => Value::String(cell.to_owned()),
    }
}

/// A value as a piece of a job name: ASCII letters, digits and '.', other runs as one '-',
/// at most 32 characters; `x` when nothing is left. A leading minus sign reads `neg`, so that
/// `-1` and `1` stay apart.
fn slug(text: &str) -> String {
    slug_of_at_most(text, 32)
}

/// [`slug`] with another length limit.
fn slug_of_at_most(text: &str, max: usize) -> String {
    let mut out = String::new();
    let text = match text.strip_prefix('-') {
        Some(rest) if rest.starts_with(|c: char| c.is_ascii_digit()) => {
            out.push_str("neg");
            rest
        }
        _ => text,
    };
    for c in text.chars() {
        if out.len() >= max {
            break;
        }
        if c.is_ascii_alphanumeric() || c == '.' {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    let trimmed = out.trim_matches(|c| c == '-' || c == '.');
    if trimmed.is_empty() { "x".to_owned() } else { trimmed.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_take_variables_and_doubled_braces() {
        let template = Template::parse("a {animal} in {{snow}}").expect("valid");
        let rendered = template.render(|name| Ok::<_, ()>(format!("<{name}>"))).expect("rendered");
        assert_eq!(rendered, "a <animal> in {snow}");
        for bad in ["a {animal", "a } b", "a {two words}", "{}"] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn csv_cells_become_numbers_and_booleans_only_when_written_so() {
        assert_eq!(typed_cell("42"), Value::from(42));
        assert_eq!(typed_cell("-1.5"), Value::from(-1.5));
        assert_eq!(typed_cell("true"), Value::Bool(true));
        for text in ["16:9", "inf", "NaN", "1e", "007a", "yes"] {
            assert_eq!(typed_cell(text), Value::String(text.into()), "{text}");
        }
    }

    #[test]
    fn slugs_are_short_safe_and_never_empty() {
        assert_eq!(slug("16:9"), "16-9");
        assert_eq!(slug("oil painting, warm"), "oil-painting-warm");
        assert_eq!(slug("日本"), "x");
        assert_eq!(slug(&"a".repeat(100)).len(), 32);
        assert_eq!(slug("../x"), "x");
        assert_eq!(slug("-14"), "neg14");
        assert_eq!(slug("-x"), "x");
    }

    #[test]
    fn data_paths_stay_beside_the_job_file() {
        assert!(check_data_path("prompts.csv").is_ok());
        assert!(check_data_path("data/rows.jsonl").is_ok());
        for bad in ["/etc/passwd.csv", "../up.csv", "a/../../b.csv", "prompts.txt", " "] {
            assert!(check_data_path(bad).is_err(), "{bad}");
        }
    }
}
