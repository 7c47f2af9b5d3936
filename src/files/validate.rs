//! Validators and conditional requests of `zonegate files` (RFC 9110 §8.8, §13): a file's
//! `ETag` and `Last-Modified`, and what `If-Match`, `If-Unmodified-Since`, `If-None-Match`,
//! `If-Modified-Since` and `If-Range` make of a GET or HEAD. Sans-IO.

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, SystemTime};

use hyper::header::{self, HeaderMap, HeaderValue};

/// What identifies a version of a file, as far as this service can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validators {
    /// Strong entity tag, quotes included: inode, modification and change times to the
    /// nanosecond and length, so a file replaced by a rename (a new inode) or rewritten gets
    /// a new tag — even when the writer set its modification time back (`touch -d`, `exiftool
    /// -P`): the change time is the kernel's, no program can set it.
    pub etag: Option<String>,
    /// The `Last-Modified` time: the later of the modification and change times, for a file
    /// settled and with an honest modification time, if an HTTP date can say it (see
    /// [`http_date`]).
    pub modified: Option<SystemTime>,
    /// The later of the modification and change times, settled or not: what "changed since?"
    /// is asked of (`If-Unmodified-Since`, and `If-Modified-Since` and `If-Range` with a
    /// date). Not the modification time alone: `cp -p` or `rsync -t` set that back, and a
    /// download resumed by date would splice the new content onto the old; the change time
    /// is the kernel's. Erring towards "changed" is safe in each (412, 200, the whole file).
    pub changed: Option<SystemTime>,
}

impl Validators {
    /// The validators of a file with metadata `meta`, at `now`. A file modified within the
    /// last [`SETTLE`] (or changed within [`SETTLE_CHANGE`]) gets none: two writes within one
    /// tick of the file system's clock (2 s for FAT's modification times, a scheduler tick
    /// for Linux's change times) leave the same times (and, at the same length, the same
    /// tag), so a client holding the first version would take the second for it.
    pub fn of(meta: &std::fs::Metadata, now: SystemTime) -> Validators {
        let changed = u64::try_from(meta.ctime()).ok().and_then(|s| {
            let nanos = u32::try_from(meta.ctime_nsec()).unwrap_or(0);
            SystemTime::UNIX_EPOCH.checked_add(Duration::new(s, nanos))
        });
        let modified = meta.modified().ok();
        // Change times of a file system that keeps whole seconds only are a second's tick.
        let change_window = if meta.ctime_nsec() == 0 {
            SETTLE
        } else {
            SETTLE_CHANGE
        };
        let settled = modified.filter(|t| {
            settled(*t, now, SETTLE) && changed.is_some_and(|c| settled(c, now, change_window))
        });
        // A modification time set back (`cp -p`, `rsync -t`, `touch -d`) can name an older
        // version than the content: no date to validate by then (If-Modified-Since would
        // answer 304 for new content), the tag still tells.
        let date_honest = match (modified, changed) {
            (Some(m), Some(c)) => c.duration_since(m).map_or(true, |d| d < SETTLE),
            _ => false,
        };
        Validators {
            etag: settled.map(|_| {
                format!(
                    "\"{:x}-{:x}.{:x}-{:x}.{:x}-{:x}\"",
                    meta.ino(),
                    meta.mtime(),
                    meta.mtime_nsec(),
                    meta.ctime(),
                    meta.ctime_nsec(),
                    meta.len()
                )
            }),
            // The date that "changed since?" is asked against ([`Validators::changed`]), so
            // a client that sends back the `Last-Modified` it got is answered 304 (or 206 for
            // `If-Range`): with the modification time here, a file renamed or chmod-ed in the
            // next second (honest still) never matched its own date.
            // Given once its second is over: a date is whole seconds, and a change later in
            // that second (settling takes 100 ms) would carry the same one, so a client sending
            // it back got 304 for the new content, or a resumed download spliced onto it. Over
            // by a tick's margin: change times are stamped from the kernel's coarse clock,
            // which runs up to a tick behind `now`.
            modified: http_date(
                settled
                    .filter(|_| date_honest)
                    .and(modified.max(changed))
                    .filter(|t| {
                        now.checked_sub(SETTLE_CHANGE)
                            .is_some_and(|n| secs(n) > secs(*t))
                    }),
            ),
            changed: modified.max(changed),
        }
    }

    /// The `Last-Modified` value, if any.
    pub fn last_modified(&self) -> Option<String> {
        self.modified.map(httpdate::fmt_http_date)
    }

    /// Adds `ETag` and `Last-Modified` to an answer's headers (200, 206, 304 and 412 carry them).
    pub fn write(&self, headers: &mut HeaderMap) {
        let values = [
            (header::ETAG, self.etag.clone()),
            (header::LAST_MODIFIED, self.last_modified()),
        ];
        for (name, value) in values {
            if let Some(v) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
                headers.insert(name, v);
            }
        }
    }
}

/// How long ago a file must have been modified to get validators: the coarsest clock of a
/// common file system (FAT's 2 s).
pub const SETTLE: Duration = Duration::from_secs(2);
/// How long ago its inode must have changed: change times are the kernel's coarse clock
/// (a scheduler tick, 1–10 ms), and a writer that set the modification time back leaves
/// only the change time to tell two versions apart.
pub const SETTLE_CHANGE: Duration = Duration::from_millis(100);

/// Whether `at` is at least `window` before `now` (a time in the future, after a clock was
/// set back, is not settled either).
fn settled(at: SystemTime, now: SystemTime, window: Duration) -> bool {
    now.duration_since(at).is_ok_and(|age| age >= window)
}

/// `modified` if an HTTP date can say it: they run from 1970 to 9999 (and `httpdate` panics
/// outside them).
fn http_date(modified: Option<SystemTime>) -> Option<SystemTime> {
    let last = SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799);
    modified.filter(|t| *t >= SystemTime::UNIX_EPOCH && *t <= last)
}

/// What the conditional headers of a GET or HEAD make of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Answer normally; `range` is whether a `Range` may be honoured (`If-Range` matched or
    /// was absent).
    Serve { range: bool },
    /// 304: the client's copy is current.
    NotModified,
    /// 412: `If-Match` or `If-Unmodified-Since` failed.
    PreconditionFailed,
}

/// Evaluates the conditional headers in RFC 9110 §13.2.2's order.
pub fn evaluate(headers: &HeaderMap, v: &Validators) -> Verdict {
    // A list header may come as several lines: together they are one list (RFC 9110 §5.3).
    let tags = |name, strong| {
        let mut lines = headers.get_all(name).iter().peekable();
        lines.peek()?;
        Some(lines.any(|l| tag_list_matches(l.as_bytes(), v.etag.as_deref(), strong)))
    };
    let date = |name| {
        headers
            .get(name)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| httpdate::parse_http_date(h).ok())
    };
    if let Some(matched) = tags(header::IF_MATCH, true) {
        if !matched {
            return Verdict::PreconditionFailed;
        }
    } else if let (Some(since), Some(changed)) = (date(header::IF_UNMODIFIED_SINCE), v.changed) {
        // Against the file's time even when it is too fresh for a validator: 412 errs safe.
        if secs(changed) > secs(since) {
            return Verdict::PreconditionFailed;
        }
    }
    if let Some(matched) = tags(header::IF_NONE_MATCH, false) {
        if matched {
            return Verdict::NotModified;
        }
    } else if let (Some(since), Some(_)) = (date(header::IF_MODIFIED_SINCE), v.modified) {
        // Only for a file that gives its date (settled and honest): 304 must be sure.
        if unchanged_since(v, since) {
            return Verdict::NotModified;
        }
    }
    let range = match headers.get(header::IF_RANGE) {
        None => true,
        Some(value) => if_range_matches(value.as_bytes(), v),
    };
    Verdict::Serve { range }
}

/// Whole seconds since 1970: HTTP dates have no finer grain.
fn secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether the file has not changed after `since` (to the second), by [`Validators::changed`];
/// a file without a time has.
fn unchanged_since(v: &Validators, since: SystemTime) -> bool {
    v.changed.is_some_and(|c| secs(c) <= secs(since))
}

/// Whether `If-Range`'s value names the version held: an entity tag compared strongly (a weak
/// one never matches), or a date equal to `Last-Modified` (ours are strong: settled files
/// only) that the file has not changed since.
fn if_range_matches(value: &[u8], v: &Validators) -> bool {
    let value = value.trim_ascii();
    if value.starts_with(b"\"") || value.starts_with(b"W/") {
        return v.etag.as_deref().map(str::as_bytes) == Some(value);
    }
    v.last_modified().as_deref().map(str::as_bytes) == Some(value)
        && v.modified.is_some_and(|m| unchanged_since(v, m))
}

/// Whether a list of entity tags (`If-Match`, `If-None-Match`) matches `etag`: `*` matches
/// any current version; otherwise compared strongly (`If-Match`: a weak tag matches nothing)
/// or weakly (`If-None-Match`: `W/` ignored). A list that does not parse matches nothing.
fn tag_list_matches(list: &[u8], etag: Option<&str>, strong: bool) -> bool {
    let list = list.trim_ascii();
    if list == b"*" {
        return true;
    }
    let Some(ours) = etag.map(str::as_bytes) else {
        return false;
    };
    let mut rest = list;
    loop {
        rest = rest.trim_ascii_start();
        while let Some(r) = rest.strip_prefix(b",") {
            rest = r.trim_ascii_start();
        }
        if rest.is_empty() {
            return false;
        }
        let (weak, tagged) = match rest.strip_prefix(b"W/") {
            Some(r) => (true, r),
            None => (false, rest),
        };
        // An opaque tag: a quoted string without quotes inside (RFC 9110 §8.8.3).
        let Some(body) = tagged.strip_prefix(b"\"") else {
            return false;
        };
        let Some(end) = body.iter().position(|&c| c == b'"') else {
            return false;
        };
        let tag = &tagged[..end + 2];
        if (!strong || !weak) && tag == ours {
            return true;
        }
        rest = &tagged[end + 2..];
        let next = rest.trim_ascii_start();
        if !next.is_empty() && !next.starts_with(b",") {
            return false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Says a skipped check straight to fd 2: libtest captures `eprintln!` of passing tests,
    /// and a skip must show.
    fn skipped(why: &str) {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "\n!!!!! SKIPPED: {why} !!!!!\n");
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn validators() -> Validators {
        Validators {
            etag: Some("\"a-1.0-3\"".into()),
            modified: Some(at(1_700_000_000)),
            changed: Some(at(1_700_000_000)),
        }
    }

    fn verdict(pairs: &[(&str, &str)]) -> Verdict {
        verdict_of(pairs, &validators())
    }

    fn verdict_of(pairs: &[(&str, &str)], v: &Validators) -> Verdict {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        evaluate(&h, v)
    }

    /// A file whose inode changed after its modification time (its content rewritten and the
    /// time set back within the same second's tick, or its metadata changed) has changed since
    /// that date, for every question asked by date: a download resumed by `If-Range` or
    /// `If-Unmodified-Since` gets the whole file or 412, never a part of new content.
    #[test]
    fn dates_are_checked_against_the_change_time_too() {
        use Verdict::*;
        let lm = "Tue, 14 Nov 2023 22:13:20 GMT";
        let v = Validators {
            changed: Some(at(1_700_000_001)),
            ..validators()
        };
        assert_eq!(
            verdict_of(&[("if-unmodified-since", lm)], &v),
            PreconditionFailed
        );
        assert_eq!(verdict_of(&[("if-range", lm)], &v), Serve { range: false });
        assert_eq!(
            verdict_of(&[("if-modified-since", lm)], &v),
            Serve { range: true }
        );
    }

    #[test]
    fn only_settled_dates_in_range_are_validators() {
        let t = at(1_700_000_000);
        let ms = Duration::from_millis;
        // Changed within the last two seconds: two writes could share the date (FAT).
        assert!(!settled(t, t + ms(1999), SETTLE));
        assert!(settled(t, t + ms(2000), SETTLE));
        // Dated in the future (a clock set back since): not settled either.
        assert!(!settled(t + ms(5000), t, SETTLE));
        // Outside what an HTTP date can say.
        assert_eq!(http_date(Some(SystemTime::UNIX_EPOCH - ms(1000))), None);
        assert_eq!(http_date(Some(at(253_402_300_800))), None);
        assert_eq!(http_date(Some(t)), Some(t));
        assert_eq!(http_date(None), None);
    }

    #[test]
    fn tag_lists_compare_as_the_rfc_says() {
        let ours = Some("\"a-1\"");
        for (list, strong, want) in [
            ("\"a-1\"", true, true),
            ("W/\"a-1\"", true, false),
            ("W/\"a-1\"", false, true),
            ("\"x\", \"a-1\"", true, true),
            (" ,\"x\" ,, W/\"a-1\" ", false, true),
            ("\"x\"", false, false),
            ("*", true, true),
            // Commas inside a tag are part of it.
            ("\"a,-1\", \"b\"", false, false),
            ("\"a-1", false, false),
            ("a-1", false, false),
            ("\"x\"\"a-1\"", false, false),
            ("", false, false),
        ] {
            assert_eq!(
                tag_list_matches(list.as_bytes(), ours, strong),
                want,
                "{list}"
            );
        }
        // Without a tag of ours only `*` matches.
        assert!(!tag_list_matches(b"\"a-1\"", None, false));
        assert!(tag_list_matches(b" * ", None, true));
    }

    #[test]
    fn preconditions_are_evaluated_in_order() {
        use Verdict::*;
        let lm = "Tue, 14 Nov 2023 22:13:20 GMT";
        let earlier = "Tue, 14 Nov 2023 22:13:19 GMT";
        assert_eq!(verdict(&[]), Serve { range: true });
        // If-Match: a strong match, or 412; it overrides If-Unmodified-Since.
        assert_eq!(
            verdict(&[("if-match", "\"a-1.0-3\"")]),
            Serve { range: true }
        );
        assert_eq!(verdict(&[("if-match", "\"b\"")]), PreconditionFailed);
        assert_eq!(
            verdict(&[("if-match", "*"), ("if-unmodified-since", earlier)]),
            Serve { range: true }
        );
        assert_eq!(
            verdict(&[("if-unmodified-since", earlier)]),
            PreconditionFailed
        );
        assert_eq!(
            verdict(&[("if-unmodified-since", lm)]),
            Serve { range: true }
        );
        // Several lines are one list.
        assert_eq!(
            verdict(&[("if-match", "\"x\""), ("if-match", "\"a-1.0-3\"")]),
            Serve { range: true }
        );
        assert_eq!(
            verdict(&[("if-none-match", "\"x\""), ("if-none-match", "\"a-1.0-3\"")]),
            NotModified
        );
        // If-None-Match, weakly; it overrides If-Modified-Since.
        assert_eq!(verdict(&[("if-none-match", "W/\"a-1.0-3\"")]), NotModified);
        assert_eq!(
            verdict(&[("if-none-match", "\"b\""), ("if-modified-since", lm)]),
            Serve { range: true }
        );
        assert_eq!(verdict(&[("if-modified-since", lm)]), NotModified);
        assert_eq!(
            verdict(&[("if-modified-since", earlier)]),
            Serve { range: true }
        );
        assert_eq!(
            verdict(&[("if-modified-since", "not a date")]),
            Serve { range: true }
        );
        // If-Range: our tag (strongly) or our date exactly.
        for (value, range) in [
            ("\"a-1.0-3\"", true),
            ("W/\"a-1.0-3\"", false),
            ("\"b\"", false),
            (lm, true),
            (earlier, false),
        ] {
            assert_eq!(verdict(&[("if-range", value)]), Serve { range }, "{value}");
        }
    }

    /// A file changed (renamed into place, chmod-ed) a moment after it was written: the
    /// `Last-Modified` it is given validates it again when sent back.
    #[test]
    fn the_last_modified_date_sent_back_matches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "abc").unwrap();
        // Its modification time set to just before the second its change time falls in (less
        // than the 2 s that keep it honest): the two differ at whole seconds, as they do
        // whenever a second starts between a write and a rename.
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        let ctime_of = |m: &std::fs::Metadata| at(m.ctime() as u64);
        let meta = std::fs::metadata(&path).unwrap();
        f.set_modified(ctime_of(&meta) - Duration::from_millis(100))
            .unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let v = Validators::of(&meta, SystemTime::now() + Duration::from_secs(3));
        let lm = v.last_modified().expect("settled and honest");
        assert_eq!(secs(v.modified.unwrap()), secs(v.changed.unwrap()));
        assert_eq!(
            verdict_of(&[("if-modified-since", &lm)], &v),
            Verdict::NotModified
        );
        assert_eq!(
            verdict_of(&[("if-range", &lm)], &v),
            Verdict::Serve { range: true }
        );
        assert_eq!(
            verdict_of(&[("if-unmodified-since", &lm)], &v),
            Verdict::Serve { range: true }
        );
    }

    /// A date is given once its second is over, not while a change later in that second
    /// could still carry it.
    #[test]
    fn a_date_is_given_once_its_second_is_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "abc").unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        let nanos = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        };
        for _ in 0..20 {
            // Modified 1.95 s before its change: honest, and settled 100 ms after the change.
            let now = SystemTime::now();
            f.set_modified(now - Duration::from_millis(1950)).unwrap();
            let meta = std::fs::metadata(&path).unwrap();
            if meta.ctime_nsec() == 0 {
                skipped("this file system keeps change times to the second only");
                return;
            }
            let changed = at(meta.ctime() as u64) + Duration::from_nanos(meta.ctime_nsec() as u64);
            let soon = changed.max(meta.modified().unwrap() + SETTLE) + Duration::from_millis(110);
            if secs(soon) != secs(changed) {
                // Too near the second's end to look within it: again, later in a second.
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            let within = Validators::of(&meta, soon);
            assert!(within.etag.is_some(), "settled");
            assert_eq!(within.modified, None, "a date while its second runs");
            let next = soon + Duration::from_nanos(u64::from(1_000_000_000 - nanos(soon)));
            // Not at the next second's first instant: a tick's margin later.
            assert_eq!(
                Validators::of(&meta, next).modified,
                None,
                "at the next second"
            );
            let after = Validators::of(&meta, next + SETTLE_CHANGE);
            assert_eq!(after.modified.map(secs), Some(secs(changed)));
            return;
        }
        panic!("never early enough in a second");
    }

    #[test]
    fn a_fresh_file_has_no_validators_and_a_settled_one_both() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "abc").unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let modified = meta.modified().unwrap();
        let fresh = Validators::of(&meta, modified);
        assert_eq!((&fresh.etag, fresh.modified), (&None, None));
        // If-Unmodified-Since still sees a fresh file's time.
        assert!(fresh.changed >= Some(modified), "{:?}", fresh.changed);
        let later = Validators::of(&meta, modified + Duration::from_secs(2));
        let tag = later.etag.as_deref().unwrap();
        assert!(tag.starts_with('"') && tag.ends_with("-3\""), "{tag}");
        assert_eq!(later.modified, Some(modified));
        // Rewritten (another length): another tag.
        std::fs::write(&path, "abcd").unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let again = Validators::of(&meta, meta.modified().unwrap() + Duration::from_secs(2));
        assert_ne!(again.etag, later.etag);
        // Rewritten in place at the same length, its modification time set back: the change
        // time still tells (past a tick of the kernel's coarse clock, which kernels before
        // 6.13 stamp change times with: two writes within one tick share one).
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, "wxyz").unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(meta.modified().unwrap()).unwrap();
        let meta2 = std::fs::metadata(&path).unwrap();
        assert_eq!(meta2.modified().unwrap(), meta.modified().unwrap());
        let now = SystemTime::now() + Duration::from_secs(3);
        if meta2.ctime_nsec() == 0 {
            skipped("this file system keeps change times to the second only, so two writes 20 ms apart may share one");
        } else {
            assert_ne!(
                Validators::of(&meta2, now).etag,
                Validators::of(&meta, now).etag
            );
        }
        // Restored with an old date (`cp -p`, `rsync -t`): the date names another version
        // than the content, and is not given.
        f.set_modified(SystemTime::now() - Duration::from_secs(3600))
            .unwrap();
        let restored = Validators::of(&std::fs::metadata(&path).unwrap(), now);
        assert!(restored.etag.is_some());
        assert_eq!(restored.modified, None);
        // Asked "unchanged since" the old date (a download resumed against the copy it
        // replaced): changed, by the change time the kernel set.
        let old = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(3600));
        let mut h = HeaderMap::new();
        h.insert(
            header::IF_UNMODIFIED_SINCE,
            HeaderValue::from_str(&old).unwrap(),
        );
        assert_eq!(evaluate(&h, &restored), Verdict::PreconditionFailed);
    }
}
