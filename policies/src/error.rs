//! Policy errors: every problem carries the file and, when known, the line and column.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A 1-based line and column (column counted in characters, as editors show it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

impl Position {
    /// Converts a byte offset into `src` to a line and column (a scan of `src`: for one
    /// position; [`SourceText`] for many).
    pub fn from_offset(src: &str, offset: usize) -> Self {
        SourceText::new(src).position(offset)
    }
}

/// A policy file's text with where its lines start, to turn byte offsets into positions by a
/// binary search: a scan from the file's start for each made a 1 MiB file of 170,000
/// duplicate keys take 55 s of CPU to report (and each of thousands of apps cost one).
#[derive(Debug)]
pub struct SourceText<'a> {
    src: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> SourceText<'a> {
    pub fn new(src: &'a str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(src.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        SourceText { src, line_starts }
    }

    /// The line and column of a byte offset. Offsets past the end (toml reports end-of-input
    /// errors that way) clamp to the last position.
    pub fn position(&self, offset: usize) -> Position {
        let src = self.src;
        let mut offset = offset.min(src.len());
        // A span may start inside a multi-byte character only if the parser is buggy; step
        // back to a boundary rather than panic on user input.
        while !src.is_char_boundary(offset) {
            offset -= 1;
        }
        // Lines starting at or before the offset: the first always does.
        let line = self.line_starts.partition_point(|&s| s <= offset);
        let line_start = self.line_starts[line - 1];
        let column = src[line_start..offset].chars().count() + 1;
        Position { line, column }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// One problem in a policy file (or the directory). `Display` is `path:line:col: message`, the
/// form editors and `zonegate policy check` use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    pub path: PathBuf,
    /// `None` for problems that are not about a place in a file (unreadable directory, ...).
    pub position: Option<Position>,
    pub message: String,
    /// A file or directory that could not be read (permissions, a race with an edit): not a
    /// mistake in what is written, and may pass when tried again.
    pub unreadable: bool,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some(p) => write!(f, "{}:{}: {}", self.path.display(), p, self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

impl PolicyError {
    pub(crate) fn at(
        path: &Path,
        text: &SourceText<'_>,
        span: Range<usize>,
        message: impl Into<String>,
    ) -> Self {
        PolicyError {
            unreadable: false,
            path: path.to_path_buf(),
            position: Some(text.position(span.start)),
            message: message.into(),
        }
    }

    pub(crate) fn whole(path: &Path, message: impl Into<String>) -> Self {
        PolicyError {
            path: path.to_path_buf(),
            position: None,
            message: message.into(),
            unreadable: false,
        }
    }

    /// `path` could not be read ([`PolicyError::unreadable`]).
    pub(crate) fn unreadable(path: &Path, message: impl Into<String>) -> Self {
        PolicyError {
            unreadable: true,
            ..Self::whole(path, message)
        }
    }
}

/// A semantic problem found while checking one value: the span it is about and what was wrong.
/// Turned into a [`PolicyError`] once the file it came from is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SpanError {
    pub span: Range<usize>,
    pub message: String,
}

impl SpanError {
    pub(crate) fn new(span: Range<usize>, message: impl Into<String>) -> Self {
        SpanError {
            span,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_and_count_chars() {
        let src = "a = 1\nbé = 2\n";
        assert_eq!(
            Position::from_offset(src, 0),
            Position { line: 1, column: 1 }
        );
        assert_eq!(
            Position::from_offset(src, 6),
            Position { line: 2, column: 1 }
        );
        // "bé " is 4 bytes but 3 characters.
        let eq = src.find("= 2").unwrap();
        assert_eq!(
            Position::from_offset(src, eq),
            Position { line: 2, column: 4 }
        );
        assert_eq!(
            Position::from_offset(src, 999),
            Position { line: 3, column: 1 }
        );
        // The index agrees with a plain count at every offset, multi-byte characters and a
        // text without a final newline included.
        for src in ["", "a", "\n\n", "x = 1\nbé\n\nyz", "é\n"] {
            let text = SourceText::new(src);
            for offset in 0..=src.len() + 1 {
                let at = offset.min(src.len());
                if !src.is_char_boundary(at) {
                    continue;
                }
                let before = &src[..at];
                let line = before.matches('\n').count() + 1;
                let start = before.rfind('\n').map_or(0, |i| i + 1);
                let want = Position {
                    line,
                    column: before[start..].chars().count() + 1,
                };
                assert_eq!(text.position(offset), want, "{src:?} at {offset}");
            }
        }
    }

    #[test]
    fn display_is_path_line_col_message() {
        let e = PolicyError::at(Path::new("p/a.toml"), &SourceText::new("x\ny"), 2..3, "bad");
        assert_eq!(e.to_string(), "p/a.toml:2:1: bad");
        assert_eq!(
            PolicyError::whole(Path::new("p"), "gone").to_string(),
            "p: gone"
        );
    }
}
