//! The plain-text event format: the default format's lines, built cheaply, byte for byte but
//! for control characters, which it escapes in every field so that each event is one line.
//!
//! Without colour (journald, log files: the production case) lines are formatted by
//! [`PlainFormat`] rather than tracing-subscriber's default `Format`: the same bytes (control
//! characters aside), at a fraction of the cost. The default formats a request's line through `core::fmt` and an ANSI
//! `Style::paint` wrapper for every field name and `=` even with colour off: ~17k instructions,
//! ~20% of the gateway's instructions under load (callgrind, one `info!` line per request).

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer as FmtWriter;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::{LookupSpan, SpanRef};

/// Formats an event as tracing-subscriber 0.3's default `Format<Full, SystemTime>` does with
/// `.with_ansi(false)` and `.with_target(false)`, byte for byte but for control characters:
///
/// `2026-12-01T23:23:13.702430Z  INFO http{client=127.0.0.1:33680}: http request status=200`
///
/// The timestamp (UTC, microseconds), the level padded to 5, each span of the event's scope from
/// the root as `name{fields}:` (its fields as the fmt layer already formatted them, or just
/// `name:`), then the message and `name=value` fields as the default `DefaultVisitor` writes
/// them: strings `Debug`-quoted, `log.*` fields (from the `log` crate bridge) skipped, an `r#`
/// prefix dropped — and, where the default escapes only the terminal controls of messages and
/// errors, every control character in the line, with the same spellings (see [`one_line`]).
/// Only for a writer
/// without ANSI colours: with colours (a terminal), the default format (see
/// [`init`](super::init)), whose `%` fields stay raw.
///
/// The cost is in what it avoids: the line is built in a thread-local `String` with plain
/// appends (one call into the fmt layer's writer at the end), integers go through `itoa`, the
/// date and time of day are formatted once a second, plain strings skip `core::fmt`. Only
/// `Debug` and `Display` values (`?x`, `%x`, and the message's `format_args!`) still go through
/// `core::fmt`, which is how they format themselves.
pub(super) struct PlainFormat {
    /// The clock: `SystemTime::now`, except in tests.
    now: fn() -> SystemTime,
}

impl PlainFormat {
    pub(super) fn new() -> Self {
        Self {
            now: SystemTime::now,
        }
    }

    /// Appends the event's line, newline and all, to `scratch.line`.
    fn format<S, N>(
        &self,
        ctx: &FmtContext<'_, S, N>,
        event: &Event<'_>,
        scratch: &mut Scratch,
    ) -> fmt::Result
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        N: for<'a> FormatFields<'a> + 'static,
    {
        scratch.timestamp((self.now)());
        let line = &mut scratch.line;
        // The level padded to 5, and a space. (Events from the `log` crate carry their level in
        // their metadata too.)
        line.push_str(match *event.metadata().level() {
            Level::TRACE => "TRACE ",
            Level::DEBUG => "DEBUG ",
            Level::INFO => " INFO ",
            Level::WARN => " WARN ",
            Level::ERROR => "ERROR ",
        });
        // The event's span and its parents, as `event_scope().from_root()` gives them (both skip
        // spans that per-layer filters disable), without collecting them first.
        if let Some(span) = ctx.parent_span() {
            write_scope::<S, N>(line, &span);
            line.push(' ');
        }
        let mut fields = FieldWriter {
            line,
            first: true,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        one_line(line);
        line.push('\n');
        Ok(())
    }
}

/// Escapes every control character that could make `line` read as more than
/// one line or act on a terminal: CR, LF and the other C0 controls but tab, DEL and the C1
/// controls. The default format escapes terminal controls in messages and errors only, and
/// neither CR nor LF: a `%` field (`error = %e`) carries peer text raw — a QUIC peer's close
/// reason, before any certificate is checked — so one client could forge whole log lines.
/// Messages and errors are written raw up to here: this is their only escaping, a superset of
/// the default's (ESC, BEL, BS, FF, DEL and C1), spelled as the default spells those. What is
/// already escaped (`?` strings) is printable here and unchanged.
fn one_line(line: &mut String) {
    if printable_ascii(line) {
        return;
    }
    let raw = std::mem::take(line);
    line.reserve(raw.len() + 16);
    for c in raw.chars() {
        match c {
            '\t' => line.push(c),
            '\n' => line.push_str("\\n"),
            '\r' => line.push_str("\\r"),
            '\0'..='\x1f' | '\x7f' => {
                let _ = write!(line, "\\x{:02x}", c as u32);
            }
            // C1, and what reorders or breaks a line where it is shown (line and paragraph
            // separators, bidi embeddings, overrides and isolates: U+202E shows a peer's
            // text backwards over the fields after it).
            '\u{80}'..='\u{9f}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2066}'..='\u{2069}' => {
                let _ = write!(line, "\\u{{{:x}}}", c as u32);
            }
            c => line.push(c),
        }
    }
}

/// Appends `name{fields}:` (or `name:`) for `span`'s parents from the root, then for `span`.
fn write_scope<S, N>(line: &mut String, span: &SpanRef<'_, S>)
where
    S: for<'a> LookupSpan<'a>,
    N: 'static,
{
    if let Some(parent) = span.parent() {
        write_scope::<S, N>(line, &parent);
    }
    line.push_str(span.metadata().name());
    if let Some(fields) = span.extensions().get::<FormattedFields<N>>() {
        if !fields.is_empty() {
            line.push('{');
            line.push_str(fields);
            line.push('}');
        }
    }
    line.push(':');
}

impl<S, N> FormatEvent<S, N> for PlainFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: FmtWriter<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        thread_local! {
            static SCRATCH: RefCell<Scratch> = const { RefCell::new(Scratch::new()) };
        }
        SCRATCH.with(|scratch| {
            // Taken already only if formatting a value logged an event: that one gets its own.
            let mut own;
            let mut borrowed;
            let scratch = match scratch.try_borrow_mut() {
                Ok(s) => {
                    borrowed = s;
                    &mut *borrowed
                }
                Err(_) => {
                    own = Scratch::new();
                    &mut own
                }
            };
            scratch.line.clear();
            let result = self
                .format(ctx, event, scratch)
                .and_then(|()| writer.write_str(&scratch.line));
            if scratch.line.capacity() > KEEP_LINE_CAPACITY {
                scratch.line = String::new();
            }
            result
        })
    }
}

/// The line buffer a thread keeps between events (beyond this, a long line's is freed).
const KEEP_LINE_CAPACITY: usize = 4 << 10;

/// A thread's line buffer, and its date and time of day to the second.
struct Scratch {
    line: String,
    /// `prefix` is for this second since the Unix epoch (`i64::MIN`: none yet).
    second: i64,
    /// `2026-12-01T23:23:13.`: the timestamp up to its microseconds.
    prefix: String,
}

impl Scratch {
    const fn new() -> Self {
        Self {
            line: String::new(),
            second: i64::MIN,
            prefix: String::new(),
        }
    }

    /// Appends `now` as [`write_timestamp`] does; the date and time of day are formatted once a
    /// second, only the microseconds each time.
    fn timestamp(&mut self, now: SystemTime) {
        let (second, nanos) = unix_time(now);
        if second != self.second {
            self.prefix.clear();
            if write_timestamp(&mut self.prefix, now).is_ok() {
                // Keep `…:SS.`: drop `123456Z `.
                self.prefix.truncate(self.prefix.len() - 8);
                self.second = second;
            } else {
                self.second = i64::MIN; // cannot happen: writing to a `String`
            }
        }
        self.line.push_str(&self.prefix);
        // Six digits with their leading zeros: those of 1xxxxxx after the 1.
        let mut digits = itoa::Buffer::new();
        self.line
            .push_str(&digits.format(1_000_000 + nanos / 1_000)[1..]);
        self.line.push_str("Z ");
    }
}

/// Whole seconds since the Unix epoch rounded down, and the nanoseconds since then (before
/// 1970 too).
fn unix_time(t: SystemTime) -> (i64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            match d.subsec_nanos() {
                0 => (-(d.as_secs() as i64), 0),
                n => (-(d.as_secs() as i64) - 1, 1_000_000_000 - n),
            }
        }
    }
}

/// Writes `t` as the default `SystemTime` timer does (RFC 3339, UTC, microseconds, `Z`),
/// followed by the space the default puts after it.
fn write_timestamp(w: &mut impl fmt::Write, t: SystemTime) -> fmt::Result {
    let (secs, nanos) = unix_time(t);
    let micros = nanos / 1_000;
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400) as u32;
    let (hour, minute, second) = (sod / 3600, sod / 60 % 60, sod % 60);
    if !(0..=9999).contains(&year) {
        // Never the case for "now"; the default's own notation, the slow way.
        return if year > 9999 {
            write!(w, "+{year}")
        } else {
            write!(w, "{year:05}")
        }
        .and_then(|()| {
            write!(
                w,
                "-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{micros:06}Z "
            )
        });
    }
    let mut buf = *b"0000-00-00T00:00:00.000000Z ";
    put_digits(&mut buf[0..4], year as u32);
    put_digits(&mut buf[5..7], month);
    put_digits(&mut buf[8..10], day);
    put_digits(&mut buf[11..13], hour);
    put_digits(&mut buf[14..16], minute);
    put_digits(&mut buf[17..19], second);
    put_digits(&mut buf[20..26], micros);
    w.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
}

/// Writes `n`'s last `out.len()` decimal digits into `out`, zero-padded.
fn put_digits(out: &mut [u8], mut n: u32) {
    for d in out.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// The proleptic Gregorian (year, month, day) of a day counted from 1970-01-01 (Howard
/// Hinnant's `civil_from_days`: a few multiplications, no loops or tables).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468; // from 0000-03-01
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of the 400-year era, [0, 146096]
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // from March 1st, [0, 365]
    let mp = (5 * doy + 2) / 153; // month from March, [0, 11]
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Writes an event's fields as tracing-subscriber's `DefaultVisitor` does: separated by
/// spaces, the message bare, the others as `name=value`.
struct FieldWriter<'a> {
    line: &'a mut String,
    first: bool,
    /// Only `Debug`/`Display` implementations can fail.
    result: fmt::Result,
}

impl FieldWriter<'_> {
    /// Starts a field: the separating space, and `name=` unless it is the message. False if
    /// the field is not to be written: a `log.*` field (the `log` crate's target, file and
    /// line, which the default skips), or after an error.
    fn start(&mut self, name: &str) -> bool {
        if self.result.is_err() || name.starts_with("log.") {
            return false;
        }
        if self.first {
            self.first = false;
        } else {
            self.line.push(' ');
        }
        if name != "message" {
            self.line.push_str(name.strip_prefix("r#").unwrap_or(name));
            self.line.push('=');
        }
        true
    }

    fn write_int(&mut self, field: &Field, value: impl itoa::Integer) {
        if self.start(field.name()) {
            self.line.push_str(itoa::Buffer::new().format(value));
        }
    }
}

impl Visit for FieldWriter<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        let name = field.name();
        if !self.start(name) {
            return;
        }
        if name == "message" {
            // The default writes a string message with `Display` (its control characters are
            // escaped with the whole line's, by `one_line`).
            self.line.push_str(value);
        } else if value
            .bytes()
            .all(|b| matches!(b, b' '..=b'~') && b != b'"' && b != b'\\')
        {
            // `{:?}` of a string that has nothing to escape: the string, quoted.
            self.line.push('"');
            self.line.push_str(value);
            self.line.push('"');
        } else {
            self.result = write!(self.line, "{value:?}");
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.write_int(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.write_int(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.start(field.name()) {
            self.line.push_str(if value { "true" } else { "false" });
        }
    }

    // f64, i128, u128 and bytes: `Visit`'s own defaults, which go to `record_debug` as the
    // default formatter's do.

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // As the default: the error, then its sources as `name.sources=[a, b]` (the field's
        // name as declared, `r#` and all), each quoted as a value when it needs to be.
        self.record_debug(field, &format_args!("{value}"));
        if let (Some(source), true) = (value.source(), self.result.is_ok()) {
            self.line.push(' ');
            self.line.push_str(field.name());
            self.line.push_str(".sources=");
            let at = self.line.len();
            self.result = write!(self.line, "{}", Sources(source));
            if field.name() != "message" {
                self.quote_from(at);
            }
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let name = field.name();
        if !self.start(name) {
            return;
        }
        let at = self.line.len();
        self.result = write!(self.line, "{value:?}");
        // The message is left as it is (the request line is written as one).
        if name != "message" {
            self.quote_from(at);
        }
    }
}

impl FieldWriter<'_> {
    /// Quotes the value written from `at` when it has whitespace, `=` or `"` in it, unless it is
    /// one quoted string already (`?` of a string); a lone `"` left raw would open a quote a
    /// later field's value closes, and what stands between them would read as fields. Raw, as the default writes it, peer text (a
    /// QUIC close reason in `error = %e`) could add fields of its own choosing to the line
    /// (`… remote=ADDR`), which a reader or a logfmt parser would take for the gateway's.
    fn quote_from(&mut self, at: usize) {
        if self.result.is_err() {
            return;
        }
        let written = &self.line[at..];
        // Any whitespace or control: a tab (logfmt parsers split on it) let peer text add
        // a key of its own; `{:?}` escapes those, and separators and bidi controls.
        let plain = |c: char| {
            !(c.is_whitespace()
                || c.is_control()
                || matches!(c, '=' | '"' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'))
        };
        if !written.chars().all(plain) && !one_quoted_string(written) {
            let quoted = format!("{written:?}");
            self.line.truncate(at);
            self.line.push_str(&quoted);
        }
    }
}

/// Whether `s` is a single `"…"` string whose inner quotes are all escaped (as `{:?}` of a
/// string writes it).
fn one_quoted_string(s: &str) -> bool {
    let Some(inner) = s.strip_prefix('"').and_then(|rest| rest.strip_suffix('"')) else {
        return false;
    };
    let mut escaped = false;
    for c in inner.chars() {
        match (escaped, c) {
            (true, _) => escaped = false,
            (false, '\\') => escaped = true,
            (false, '"') => return false,
            _ => {}
        }
    }
    !escaped
}

/// True if `s` is printable ASCII only, so has nothing [`one_line`] escapes (those are all
/// below 0x20, 0x7f, or C1 controls: 0xC2 0x80..0x9F in UTF-8). Anything else — tabs, other
/// UTF-8 — takes its careful path, which writes what needs no escaping unchanged. Folded
/// without an early exit so it compiles to a vector loop: a short-circuiting `any` over the six
/// bytes cost ~20 instructions per byte, and the per-request log line is ~110 bytes
/// (callgrind, benches/front_cost.sh).
fn printable_ascii(s: &str) -> bool {
    s.bytes()
        .fold(true, |ok, b| ok & (b.wrapping_sub(0x20) < 0x5f))
}

/// An error's `Display`, as `Debug` too (the default's source list entries).
struct Shown<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Debug for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.0, f)
    }
}

/// An error and its sources as `[a, b]`.
struct Sources<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for Sources<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        let mut next = Some(self.0);
        while let Some(e) = next {
            list.entry(&Shown(e));
            next = e.source();
        }
        list.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;
    use std::io::{self, Write};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tracing::{debug, error, info, info_span, trace, warn};
    use tracing_subscriber::fmt::time::FormatTime;
    use tracing_subscriber::fmt::MakeWriter;

    /// The instant both formatters are given: 2026-12-01T23:23:13.702430Z (and some nanos,
    /// which are cut, not rounded).
    fn fixed_now() -> SystemTime {
        UNIX_EPOCH + Duration::new(1_796_167_393, 702_430_999)
    }

    /// The default formatter's timer, at [`fixed_now`] (which `write_timestamp` is tested on).
    struct FixedTimer;

    impl FormatTime for FixedTimer {
        fn format_time(&self, w: &mut FmtWriter<'_>) -> fmt::Result {
            w.write_str("2026-12-01T23:23:13.702430Z")
        }
    }

    /// Captures whole output in memory.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    /// The output of `emit` through the default format (`plain == false`) or [`PlainFormat`],
    /// both configured as `init` does without colour.
    fn render(plain: bool, emit: impl FnOnce()) -> String {
        let buf = Buf::default();
        let builder = tracing_subscriber::fmt()
            .with_writer(buf.clone())
            .with_max_level(Level::TRACE)
            .with_ansi(false)
            .with_target(false);
        if plain {
            let format = PlainFormat { now: fixed_now };
            tracing::subscriber::with_default(builder.event_format(format).finish(), emit);
        } else {
            tracing::subscriber::with_default(builder.with_timer(FixedTimer).finish(), emit);
        }
        let out = buf.0.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    #[derive(Debug)]
    struct Failure {
        what: &'static str,
        source: Option<Box<Failure>>,
    }

    impl fmt::Display for Failure {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.what)
        }
    }

    impl Error for Failure {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.source.as_deref().map(|e| e as &(dyn Error + 'static))
        }
    }

    #[derive(Debug)]
    #[allow(dead_code)] // read by Debug only
    struct Point {
        x: i32,
        label: &'static str,
    }

    fn emit_all() {
        // No span, message only; all levels.
        trace!("trace line");
        debug!("debug line");
        info!("info line");
        warn!("warn line");
        error!("error line");
        info!("formatted {} and {:?}", 5, "quoted");
        // Message and fields of every kind.
        let addr: std::net::SocketAddr = "127.0.0.1:33680".parse().unwrap();
        info!(
            s = "web",
            d = %addr,
            dq = %"with \"quotes\"",
            g = ?Point { x: -3, label: "p\"q" },
            u = 200u64,
            small = 7u16,
            i = -42i64,
            imin = i64::MIN,
            umax = u64::MAX,
            b = true,
            nb = false,
            f = 1.5f64,
            f1 = 1.0f64,
            fbig = 1e21f64,
            fnan = f64::NAN,
            finf = f64::NEG_INFINITY,
            big = u128::MAX,
            neg = i128::MIN,
            c = ?'\'',
            opt = ?Some("x"),
            "message + fields"
        );
        // Strings that need escaping, and one that is empty.
        info!(
            quote = "say \"hi\"",
            backslash = "a\\b",
            newline = "line\nbreak\r\t",
            unicode = "héllo wörld ☃ 日本",
            combining = "e\u{301} \u{301}x",
            control = "\u{1b}[31mred\u{7}\u{0}\u{7f}\u{85}",
            single = "it's",
            error = "",
            "escapes"
        );
        // The production line.
        info!(
            app = %"web",
            device = %"n1",
            client = %addr,
            method = %"GET",
            path = %"/",
            status = 200u16,
            bytes_in = 0u64,
            bytes_out = 3u64,
            ms = 2u64,
            error = "",
            "http request"
        );
        // No message; an empty one; a message given as a string value or a number.
        info!(a = 1, b = "x");
        info!("");
        info!(a = 1, "");
        info!(message = "as a str \u{1b}[1m bold");
        info!(message = 17u64, other = 1);
        info!(message = ?"debug str");
        // Terminal control characters in messages are escaped.
        info!("esc \u{1b}[31m bel \u{7} bs \u{8} ff \u{c} del \u{7f} c1 \u{85}\u{9f} é ° ok");
        info!("{}", "formatted \u{1b} esc");
        // Raw identifiers, and `log` crate metadata fields (skipped).
        info!(
            r#type = "web",
            r#loop = 3,
            "r#quoted" = 4,
            "r#" = 5,
            "raw names"
        );
        info!(
            log.target = "quinn::conn",
            log.module_path = "quinn::conn",
            log.file = "conn.rs",
            log.line = 12u64,
            "from the log crate"
        );
        info!(log.line = 1u64, a = 2);
        // Errors, with and without sources, and with a control character.
        let inner = Failure {
            what: "out of space",
            source: Some(Box::new(Failure {
                what: "disk \u{1b} gone",
                source: None,
            })),
        };
        let outer = Failure {
            what: "write failed",
            source: Some(Box::new(inner)),
        };
        let lone = Failure {
            what: "lonely \u{7}",
            source: None,
        };
        info!(err = &outer as &(dyn Error + 'static), "with sources");
        info!(err = &lone as &(dyn Error + 'static), "without");
        info!(r#err = &outer as &(dyn Error + 'static), "raw error");
        info!(message = &outer as &(dyn Error + 'static), x = 1);
        // Bytes.
        info!(bytes = &b"ab\x00\xff"[..], "bytes");

        // Spans: with fields, without, with fields not yet recorded, nested.
        let http = info_span!("http", client = %addr, scheme = "http");
        let _h = http.enter();
        info!(status = 200u64, "in one span");
        let bare = info_span!("bare");
        let _b = bare.enter();
        info!("in two spans");
        let empty = info_span!("empty", later = tracing::field::Empty);
        let _e = empty.enter();
        info!("field not recorded");
        empty.record("later", 5);
        warn!(x = "y", "field recorded later");
        let inner = info_span!("inner", n = 3, q = "a\"b", msg = %"esc\u{1b}");
        let _i = inner.enter();
        error!("deep");
        info!(a = 1);
    }

    #[test]
    fn one_line_escapes_controls_as_the_default_spells_them_and_passes_the_rest() {
        let run = |s: &str| {
            let mut out = s.to_owned();
            one_line(&mut out);
            out
        };
        for plain in ["", "http request app=web", " ~", "tab\there", "é ü 😀"] {
            assert_eq!(run(plain), plain);
        }
        // The default's own escapes (tracing-subscriber's `EscapeGuard`), spelled alike.
        assert_eq!(run("a\x1b[31mb"), "a\\x1b[31mb");
        assert_eq!(run("\x07\x08\x0c\x7f"), "\\x07\\x08\\x0c\\x7f");
        assert_eq!(run("c1\u{85}é"), "c1\\u{85}é");
        // And what the default leaves raw.
        assert_eq!(run("a\nb\rc\0"), "a\\nb\\rc\\x00");
        assert!(printable_ascii(" azAZ09~"));
        for c in ['\x1f', '\x7f', '\t', 'é'] {
            assert!(!printable_ascii(&format!("ab{c}cd")), "{c:?}");
        }
    }

    #[test]
    fn plain_format_is_byte_identical_to_the_default_but_one_line_each_and_values_quoted() {
        let default = render(false, emit_all);
        let plain = render(true, emit_all);
        assert!(default.lines().count() > 30, "{default}");
        // The default's lines, with what it leaves raw escaped, and field values with a space
        // `=` or `"` in them quoted (`{:?}`, which spells controls `\u{1b}`): the differences.
        let quoted = [
            (r#"dq=with "quotes""#, r#"dq="with \"quotes\"""#),
            (
                r#"g=Point { x: -3, label: "p\"q" }"#,
                r#"g="Point { x: -3, label: \"p\\\"q\" }""#,
            ),
            (
                r#"err=write failed err.sources=[out of space, disk \x1b gone]"#,
                r#"err="write failed" err.sources="[out of space, disk \u{1b} gone]""#,
            ),
            (r#"err=lonely \x07"#, r#"err="lonely \u{7}""#),
            (r#"bytes=[61 62 00 ff]"#, r#"bytes="[61 62 00 ff]""#),
            (r#"opt=Some("x")"#, r#"opt="Some(\"x\")""#),
        ];
        let default_one_line: String = default
            .lines()
            .map(|l| {
                let mut l = l.to_owned();
                one_line(&mut l);
                for (raw, q) in quoted {
                    l = l.replace(raw, q);
                }
                l + "\n"
            })
            .collect();
        assert_ne!(default_one_line, default, "the corpus has raw controls");
        for (d, p) in default_one_line.lines().zip(plain.lines()) {
            assert_eq!(p, d);
        }
        assert_eq!(plain, default_one_line);
        // Spot checks that the test sees what it means to (span fields are as the fmt layer
        // formatted them: it escapes control characters in messages only).
        assert!(default.contains(
            "2026-12-01T23:23:13.702430Z  INFO http request app=web device=n1 \
             client=127.0.0.1:33680 method=GET path=/ status=200 bytes_in=0 bytes_out=3 ms=2 \
             error=\"\"\n"
        ));
        assert!(default.contains(" INFO raw names type=\"web\" loop=3 quoted=4 =5\n"));
        assert!(default.contains(
            "Z ERROR http{client=127.0.0.1:33680 scheme=\"http\"}:bare:empty{later=5}:\
             inner{n=3 q=\"a\\\"b\" msg=esc\u{1b}}: deep\n"
        ));
        assert!(plain.contains("inner{n=3 q=\"a\\\"b\" msg=esc\\x1b}: deep\n"));
    }

    #[test]
    fn peer_text_cannot_forge_a_line_or_reach_the_terminal() {
        // A QUIC peer's close reason reaches the log as `error = %e`, raw in the default format.
        let reason = "closed: x\n2026-12-01T23:23:13.702430Z  INFO tunnel up device=home1\r\u{1b}[2J\u{0}\u{85}";
        let plain = render(true, || {
            info!(error = %reason, peer = ?reason, "handshake failed\nforged");
            info!(path = %"/a\tb", "tab\tstays");
            info!(name = %"abc\u{202e}fed", "shown backwards\u{2066}");
        });
        assert_eq!(plain.lines().count(), 3, "{plain}");
        assert_eq!(plain.matches('\n').count(), 3, "{plain}");
        assert!(
            plain.contains(
                "handshake failed\\nforged error=\"closed: x\\n2026-12-01T23:23:13.702430Z  INFO tunnel up \
                 device=home1\\r\\u{1b}[2J\\0\\u{85}\" peer="
            ),
            "{plain}"
        );
        assert!(
            !plain.contains('\u{1b}') && !plain.contains('\r'),
            "{plain}"
        );
        // A tab stays in a message, but a value with one is quoted (logfmt splits on it: a
        // peer's `x\tadmin` was a key of its own); bidi controls are escaped wherever.
        assert!(plain.contains("tab\tstays path=\"/a\\tb\"\n"), "{plain}");
        assert!(
            plain.contains("shown backwards\\u{2066} name=\"abc\\u{202e}fed\"\n"),
            "{plain}"
        );
        // Nor add fields of its own to it: a value with a space, `=` or `"` is quoted, and a value
        // that opens a quote of its own does not pass for a quoted one.
        let forged = "x remote=10.0.0.5:443 unlogged=0";
        let plain = render(true, || {
            warn!(remote = %"203.0.113.9:5000", error = %forged, "agent connection refused");
            warn!(error = %"\"x\" remote=10.0.0.5:443", "again");
            warn!(error = %"\"x", reason = %"y remote=10.0.0.5:443", "two fields");
        });
        assert!(
            plain.contains(
                "agent connection refused remote=203.0.113.9:5000 error=\"x remote=10.0.0.5:443 unlogged=0\"\n"
            ),
            "{plain}"
        );
        assert!(
            plain.contains("again error=\"\\\"x\\\" remote=10.0.0.5:443\"\n"),
            "{plain}"
        );
        assert!(
            plain.contains("two fields error=\"\\\"x\" reason=\"y remote=10.0.0.5:443\"\n"),
            "{plain}"
        );
    }

    fn timestamp(t: SystemTime) -> String {
        let mut s = String::new();
        write_timestamp(&mut s, t).unwrap();
        s
    }

    #[test]
    fn timestamps_at_known_instants() {
        let at = |secs: i64, nanos: u32| {
            if secs >= 0 {
                UNIX_EPOCH + Duration::new(secs as u64, nanos)
            } else {
                UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::new(0, nanos)
            }
        };
        for (t, want) in [
            (at(0, 0), "1970-01-01T00:00:00.000000Z "),
            (at(951_868_799, 999_999_999), "2000-02-29T23:59:59.999999Z "),
            (at(951_868_800, 0), "2000-03-01T00:00:00.000000Z "),
            (
                at(1_796_167_393, 702_430_000),
                "2026-12-01T23:23:13.702430Z ",
            ),
            (at(4_107_542_399, 1_000), "2100-02-28T23:59:59.000001Z "),
            (at(4_107_542_400, 0), "2100-03-01T00:00:00.000000Z "),
            (at(253_402_300_799, 0), "9999-12-31T23:59:59.000000Z "),
            (at(253_402_300_800, 0), "+10000-01-01T00:00:00.000000Z "),
            (at(-1, 500_000_000), "1969-12-31T23:59:59.500000Z "),
            (at(-62_135_596_800, 0), "0001-01-01T00:00:00.000000Z "),
            (at(-62_167_219_200, 0), "0000-01-01T00:00:00.000000Z "),
            (at(-62_167_219_201, 0), "-0001-12-31T23:59:59.000000Z "),
        ] {
            assert_eq!(timestamp(t), want);
        }
    }

    #[test]
    fn cached_timestamps_are_the_same() {
        let mut scratch = Scratch::new();
        let base = fixed_now();
        for t in [
            base,
            base + Duration::from_micros(1),
            base + Duration::from_nanos(297_568_999), // the last microsecond of that second
            base + Duration::from_nanos(297_570_000), // the next second
            base,                                     // back again
            UNIX_EPOCH - Duration::from_nanos(1),
            UNIX_EPOCH + Duration::from_secs(253_402_300_800), // year 10000
            UNIX_EPOCH + Duration::from_secs(253_402_300_800) + Duration::from_micros(7),
        ] {
            scratch.line.clear();
            scratch.timestamp(t);
            assert_eq!(scratch.line, timestamp(t));
        }
    }

    #[test]
    fn timestamps_agree_with_the_time_crate() {
        // Every ~3.3 days (an odd step: all times of day, months, leap days) over 1900-2400.
        let mut secs: i64 = -2_208_988_800;
        while secs < 13_569_465_600 {
            let nanos = (secs.unsigned_abs() % 1_000_000_000) as u32;
            let t = if secs >= 0 {
                UNIX_EPOCH + Duration::new(secs as u64, nanos)
            } else {
                UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::new(0, nanos)
            };
            let d = time::OffsetDateTime::from(t);
            let want = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z ",
                d.year(),
                u8::from(d.month()),
                d.day(),
                d.hour(),
                d.minute(),
                d.second(),
                d.microsecond()
            );
            assert_eq!(timestamp(t), want, "at {secs}");
            secs += 287_777;
        }
    }
}
