//! Source files and diagnostics: turns byte offsets from the TOML parser into `file:line:col`
//! and carries the one [`Diagnostic`] shape every binary renders (errors and review warnings).
//!
//! Nothing here knows about policies; `compile.rs` and `review.rs` build diagnostics, binaries
//! print them.

use std::fmt;
use std::ops::Range;
use std::path::Path;

/// A file's text with a line index, so byte offsets can be reported as `line:col`.
#[derive(Debug, Clone)]
pub struct SourceFile {
    name: String,
    text: String,
    /// Byte offset at which each line starts; `line_starts[0] == 0`.
    line_starts: Vec<usize>,
}

impl SourceFile {
    /// Wraps already read text; `name` is what diagnostics print as the file.
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Self {
        let text = text.into();
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self {
            name: name.into(),
            text,
            line_starts,
        }
    }

    /// Reads a file as UTF-8.
    ///
    /// # Errors
    /// A [`Diagnostic`] at line 0 (the whole file) when the file cannot be read or is not UTF-8.
    pub fn read(path: &Path) -> Result<Self, Diagnostic> {
        let name = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Self::new(name, text)),
            Err(e) => Err(Diagnostic::whole_file(
                name,
                format!("cannot read the file: {e}"),
                "check the path and that the file is readable UTF-8 text",
            )),
        }
    }

    /// The name diagnostics use for this file.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file's text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// 1-based line and column (in characters) of a byte offset; offsets past the end map to
    /// the end of the file.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset) - 1;
        let start = self.line_starts[line];
        let col = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count());
        (line + 1, col + 1)
    }

    /// A diagnostic pointing at the start of `span`.
    pub fn diagnostic(
        &self,
        span: Range<usize>,
        message: impl Into<String>,
        help: impl Into<String>,
    ) -> Diagnostic {
        let (line, col) = self.line_col(span.start);
        Diagnostic {
            file: self.name.clone(),
            line,
            col,
            message: message.into(),
            help: help.into(),
        }
    }
}

/// One problem found in a file: where, what, and what to do about it.
///
/// `Display` renders `FILE:LINE:COL: message` and, on the next line, `  help: ...`. A
/// diagnostic about the whole file (it could not be read) has `line == 0` and renders as
/// `FILE: message`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    /// The file, as named on the command line or in the config.
    pub file: String,
    /// 1-based line; 0 when the diagnostic is about the whole file.
    pub line: usize,
    /// 1-based column in characters; 0 when the diagnostic is about the whole file.
    pub col: usize,
    /// What is wrong, lowercase, no trailing period.
    pub message: String,
    /// What to do next.
    pub help: String,
}

impl Diagnostic {
    /// A diagnostic about the whole file rather than a place in it.
    pub fn whole_file(
        file: impl Into<String>,
        message: impl Into<String>,
        help: impl Into<String>,
    ) -> Self {
        Self {
            file: file.into(),
            line: 0,
            col: 0,
            message: message.into(),
            help: help.into(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)?;
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.col, self.message
            )?;
        }
        write!(f, "\n  help: {}", self.help)
    }
}

impl std::error::Error for Diagnostic {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_map_to_one_based_line_and_char_column() {
        let src = SourceFile::new("p.toml", "ab\nc\u{e9}d\n\nx");
        assert_eq!(src.line_col(0), (1, 1));
        assert_eq!(src.line_col(1), (1, 2));
        assert_eq!(src.line_col(3), (2, 1));
        // `é` is two bytes but one column.
        assert_eq!(src.line_col(6), (2, 3));
        assert_eq!(src.line_col(9), (4, 1));
        assert_eq!(src.line_col(999), (4, 2));
    }

    #[test]
    fn display_has_location_and_help() {
        let d = SourceFile::new("p.toml", "\n  x").diagnostic(3..4, "bad x", "fix x");
        assert_eq!(d.to_string(), "p.toml:2:3: bad x\n  help: fix x");
        let w = Diagnostic::whole_file("p.toml", "cannot read", "check it");
        assert_eq!(w.to_string(), "p.toml: cannot read\n  help: check it");
    }
}
