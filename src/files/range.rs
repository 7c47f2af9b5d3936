//! `Range` requests of `zonegate files` (RFC 9110 §14): one byte range of a file, so a
//! download resumes and a video seeks. Sans-IO.

/// What a request's `Range` header asks of a file of `len` bytes (RFC 9110 §14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ranged {
    /// No range, one the server may ignore (several ranges, another unit, bad syntax): 200.
    Whole,
    /// Bytes `start..=end`: 206.
    Part { start: u64, end: u64 },
    /// A range that starts past the end: 416.
    Unsatisfiable,
}

/// Reads a `Range` value: one range of `bytes`, as `first-last`, `first-` or `-suffix`.
pub fn byte_range(value: &str, len: u64) -> Ranged {
    fn num(s: &str) -> Option<u64> {
        // Digits only: `parse` would take a sign.
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    }
    let value = value.trim();
    // The unit is case-insensitive (RFC 9110 §14.1).
    let Some(spec) = value
        .get(..6)
        .filter(|u| u.eq_ignore_ascii_case("bytes="))
        .map(|_| &value[6..])
    else {
        return Ranged::Whole;
    };
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Ranged::Whole;
    };
    if spec.contains(',') {
        // Several ranges would be a multipart answer; a whole answer is allowed instead.
        return Ranged::Whole;
    }
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        return match num(last) {
            Some(0) => Ranged::Unsatisfiable,
            // A suffix of an empty file is satisfiable (RFC 9110 §14.1.3): the empty whole.
            Some(_) if len == 0 => Ranged::Whole,
            Some(n) => Ranged::Part {
                start: len.saturating_sub(n),
                end: len - 1,
            },
            None => Ranged::Whole,
        };
    }
    let Some(start) = num(first) else {
        return Ranged::Whole;
    };
    let end = if last.is_empty() {
        u64::MAX
    } else {
        match num(last) {
            Some(e) if e >= start => e,
            // Digits past u64: the end of any file.
            None if last.bytes().all(|c| c.is_ascii_digit()) => u64::MAX,
            _ => return Ranged::Whole,
        }
    };
    if start >= len {
        return Ranged::Unsatisfiable;
    }
    Ranged::Part {
        start,
        end: end.min(len - 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Whatever a client sends: a part lies inside the file, and an unsatisfiable answer
        /// only for a start at or past its end (or a zero suffix).
        #[test]
        fn any_range_value_is_answered_inside_the_file(
            value in proptest::prop_oneof![
                "\\PC{0,40}",
                // Mostly range syntax, or random text rarely reaches the parser's numbers.
                "(bytes|BYTES|bytes )=[0-9, \\-]{0,30}",
                "bytes=[0-9]{0,25}-[0-9]{0,25}(,[0-9]{0,3}-[0-9]{0,3}){0,2}",
            ],
            len in 0u64..5000,
        ) {
            match byte_range(&value, len) {
                Ranged::Part { start, end } => proptest::prop_assert!(start <= end && end < len),
                Ranged::Unsatisfiable | Ranged::Whole => {}
            }
        }

        #[test]
        fn ranges_of_numbers_are_read_as_written(a in 0u64..3000, b in 0u64..3000, len in 1u64..2000) {
            let (first, last) = (a.min(b), a.max(b));
            let want = if first >= len {
                Ranged::Unsatisfiable
            } else {
                Ranged::Part { start: first, end: last.min(len - 1) }
            };
            proptest::prop_assert_eq!(byte_range(&format!("bytes={first}-{last}"), len), want);
        }
    }

    #[test]
    fn byte_ranges() {
        use Ranged::*;
        let part = |start, end| Part { start, end };
        assert_eq!(byte_range("bytes=0-9", 100), part(0, 9));
        assert_eq!(byte_range("bytes=90-", 100), part(90, 99));
        assert_eq!(byte_range("bytes=90-1000", 100), part(90, 99));
        assert_eq!(byte_range("bytes=-10", 100), part(90, 99));
        assert_eq!(byte_range("bytes=-1000", 100), part(0, 99));
        assert_eq!(byte_range("bytes = 5-5", 100), Whole);
        assert_eq!(byte_range(" bytes=5-5 ", 100), part(5, 5));
        assert_eq!(byte_range("bytes=100-", 100), Unsatisfiable);
        assert_eq!(byte_range("bytes=-0", 100), Unsatisfiable);
        assert_eq!(byte_range("bytes=0-", 0), Unsatisfiable);
        assert_eq!(byte_range("bytes=-5", 0), Whole);
        assert_eq!(byte_range("Bytes=1-2", 100), part(1, 2));
        assert_eq!(byte_range("bytes=1-99999999999999999999", 100), part(1, 99));
        // Ignored (a whole answer): bad syntax, other units, several ranges, overflow, signs.
        for v in [
            "bytes=9-0",
            "bytes=a-b",
            "bytes=-",
            "bytes=1",
            "items=0-1",
            "bytes=0-1,5-6",
            "bytes=+1-2",
            "bytes=1--2",
            "bytes=99999999999999999999-",
        ] {
            assert_eq!(byte_range(v, 100), Whole, "{v}");
        }
    }
}
