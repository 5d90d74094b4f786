//! Errors of reading a configuration. Each names the key (`checkpoint.interval`) and, when the
//! text came from a file or string, where in it (file, line, column).
//!
//! toml reports a byte span; the key path is recovered by finding the key or value in the
//! parsed document whose span holds the start of the error span.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// Where a problem is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Location {
    /// The file, when the text came from `Config::load`.
    pub file: Option<PathBuf>,
    /// 1-based line, when the problem is at a place in the text (not for a key left at its
    /// default, nor for a `Config` built in code).
    pub line: Option<usize>,
    /// 1-based column (in characters) on `line`.
    pub column: Option<usize>,
}

impl Location {
    fn at(text: &str, file: Option<&Path>, offset: Option<usize>) -> Self {
        let (line, column) = match offset {
            Some(offset) => {
                let (line, column) = line_column(text, offset);
                (Some(line), Some(column))
            }
            None => (None, None),
        };
        Self { file: file.map(Path::to_path_buf), line, column }
    }
}

/// Writes `file:line:column: ` (or what of it is known) as a prefix for a message.
impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line, self.column) {
            (Some(file), Some(line), Some(column)) => write!(f, "{}:{line}:{column}: ", file.display()),
            (Some(file), Some(line), None) => write!(f, "{}:{line}: ", file.display()),
            (Some(file), None, _) => write!(f, "{}: ", file.display()),
            (None, Some(line), Some(column)) => write!(f, "line {line}, column {column}: "),
            (None, Some(line), None) => write!(f, "line {line}: "),
            (None, None, _) => Ok(()),
        }
    }
}

/// Errors of loading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The text is not TOML.
    #[error("{at}not valid TOML: {message}")]
    Syntax { at: Location, message: String },
    /// A key is unknown, or its value has the wrong type or form (`interval = "fast"`).
    #[error("{at}{key}: {message}")]
    Value { at: Location, key: String, message: String },
    /// The values are well-formed but break a rule (`election_ticks` not above
    /// `heartbeat_ticks`).
    #[error("{at}{key}: {message}")]
    Invalid { at: Location, key: String, message: String },
}

impl ConfigError {
    /// The dotted key the error is about (`checkpoint.interval`), if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Value { key, .. } | Self::Invalid { key, .. } => Some(key),
            Self::Read { .. } | Self::Syntax { .. } => None,
        }
    }

    /// Where the error is, if it is about the text.
    pub fn location(&self) -> Option<&Location> {
        match self {
            Self::Syntax { at, .. } | Self::Value { at, .. } | Self::Invalid { at, .. } => Some(at),
            Self::Read { .. } => None,
        }
    }

    pub(crate) fn invalid(key: &str, message: impl Into<String>) -> Self {
        Self::Invalid { at: Location::default(), key: key.to_owned(), message: message.into() }
    }

    /// A syntax error from toml's parser.
    pub(crate) fn syntax(e: &toml::de::Error, text: &str, file: Option<&Path>) -> Self {
        let at = Location::at(text, file, e.span().map(|s| s.start));
        Self::Syntax { at, message: e.message().trim_end().to_owned() }
    }

    /// A deserialization error (unknown key, wrong type, malformed value) on a document that
    /// parsed: names the key whose text holds the error's span.
    pub(crate) fn value(e: &toml::de::Error, text: &str, file: Option<&Path>) -> Self {
        let message = e.message().trim_end();
        let offset = e.span().map(|s| s.start);
        let doc = DeTable::parse(text).ok();
        let path = match (&doc, offset) {
            (Some(doc), Some(offset)) => key_at(doc.get_ref(), offset, &mut Vec::new()),
            _ => None,
        };
        let at = Location::at(text, file, offset);
        let (key, message) = match message.strip_prefix("unknown field `") {
            Some(rest) => {
                let (name, expected) = rest.split_once('`').unwrap_or((rest, ""));
                let path = path.unwrap_or_else(|| vec![name.to_owned()]);
                let what = match path.split_last() {
                    Some((_, section)) if !section.is_empty() => format!("unknown key in [{}]", section.join(".")),
                    _ if is_table(doc.as_ref(), &path) => "unknown section".to_owned(),
                    _ => "unknown top-level key (options belong in sections)".to_owned(),
                };
                (path.join("."), format!("{what}{}", expected.replace(", expected", "; expected")))
            }
            None => {
                let message = match &path {
                    // `[[volume]]` (an array of tables) where `[volume]` belongs: serde's own
                    // message describes the first field it tried instead.
                    Some(p) if p.len() == 1 && is_array(doc.as_ref(), p) => {
                        format!("expected a table [{0}], not an array of tables [[{0}]]", p[0])
                    }
                    _ => plain_types(message),
                };
                (path.map(|p| p.join(".")).unwrap_or_else(|| "(document)".to_owned()), message)
            }
        };
        Self::Value { at, key, message }
    }

    /// Fills in where an `Invalid` error's key is written in `text` (or just the file when the
    /// key is left at its default).
    pub(crate) fn locate(self, text: &str, file: Option<&Path>) -> Self {
        match self {
            Self::Invalid { key, message, .. } => {
                let path: Vec<String> = key.split('.').map(str::to_owned).collect();
                let doc = DeTable::parse(text).ok();
                let offset = doc.as_ref().and_then(|doc| find_value(doc.get_ref(), &path)).map(|v| v.span().start);
                Self::Invalid { at: Location::at(text, file, offset), key, message }
            }
            other => other,
        }
    }
}

/// serde names Rust types (`expected usize`, `expected struct VolumeConfig`); say what the
/// file needs instead.
fn plain_types(message: &str) -> String {
    let mut out = message.to_owned();
    for ty in ["usize", "u64", "u32", "u16", "u8"] {
        out = out.replace(&format!("expected {ty}"), "expected a non-negative integer");
    }
    if let Some(at) = out.find("expected struct ") {
        out.replace_range(at.., "expected a table");
    }
    out.replace("expected a boolean", "expected true or false")
}

fn is_table(doc: Option<&Spanned<DeTable<'_>>>, path: &[String]) -> bool {
    doc.and_then(|doc| find_value(doc.get_ref(), path)).is_some_and(|v| matches!(v.get_ref(), DeValue::Table(_)))
}

fn is_array(doc: Option<&Spanned<DeTable<'_>>>, path: &[String]) -> bool {
    doc.and_then(|doc| find_value(doc.get_ref(), path)).is_some_and(|v| matches!(v.get_ref(), DeValue::Array(_)))
}

fn contains(span: Range<usize>, offset: usize) -> bool {
    span.start <= offset && offset < span.end.max(span.start + 1)
}

/// The path of the deepest key whose key or value text holds `offset`.
fn key_at(table: &DeTable<'_>, offset: usize, path: &mut Vec<String>) -> Option<Vec<String>> {
    for (key, value) in table.iter() {
        path.push(key.get_ref().to_string());
        // Look inside first: a `[section]` table's own span may not cover its keys.
        if let DeValue::Table(inner) = value.get_ref() {
            if let Some(found) = key_at(inner, offset, path) {
                return Some(found);
            }
        }
        if contains(key.span(), offset) || contains(value.span(), offset) {
            return Some(path.clone());
        }
        path.pop();
    }
    None
}

/// The value at `path`, if the document has one.
fn find_value<'a, 'i>(table: &'a DeTable<'i>, path: &[String]) -> Option<&'a Spanned<DeValue<'i>>> {
    let (first, rest) = path.split_first()?;
    let (_, value) = table.iter().find(|(k, _)| k.get_ref() == first)?;
    match (rest, value.get_ref()) {
        ([], _) => Some(value),
        (rest, DeValue::Table(inner)) => find_value(inner, rest),
        _ => None,
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (before.matches('\n').count() + 1, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_column_counts_from_one_in_characters() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        assert_eq!(line_column(text, 9), (2, 3), "é is one character of two bytes");
        assert_eq!(line_column(text, 100), (3, 1), "past the end clamps");
    }

    #[test]
    fn location_prefixes() {
        let full = Location { file: Some("rblk.toml".into()), line: Some(3), column: Some(7) };
        assert_eq!(full.to_string(), "rblk.toml:3:7: ");
        let file = Location { file: Some("rblk.toml".into()), line: None, column: None };
        assert_eq!(file.to_string(), "rblk.toml: ");
        let text = Location { file: None, line: Some(3), column: Some(7) };
        assert_eq!(text.to_string(), "line 3, column 7: ");
        assert_eq!(Location::default().to_string(), "");
    }
}
