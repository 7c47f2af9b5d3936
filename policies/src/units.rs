//! Small value syntaxes of the policy language: rates, sizes, hours, offsets, names, paths.
//!
//! Each parser returns a typed value or a message saying what was expected; the caller adds
//! the position.

use std::time::Duration;

/// `N/s`, `N/min`, `N/h`: `count` events per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub period: Duration,
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.period.as_secs() {
            1 => "s",
            60 => "min",
            _ => "h",
        };
        write!(f, "{}/{}", self.count, unit)
    }
}

pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let expected =
        || format!("expected a rate such as \"50/s\", \"600/min\" or \"3/h\", found {s:?}");
    let (n, unit) = s.split_once('/').ok_or_else(expected)?;
    // Digits only: `u32::from_str` also takes a sign ("+50/s").
    let n = n.trim();
    if !n.bytes().all(|b| b.is_ascii_digit()) {
        return Err(expected());
    }
    let count: u32 = n.parse().map_err(|_| expected())?;
    if count == 0 {
        return Err(
            "a rate of 0 would refuse everything; remove the app or its allow rule instead".into(),
        );
    }
    let period = match unit.trim() {
        "s" | "sec" => Duration::from_secs(1),
        "min" | "m" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        _ => return Err(expected()),
    };
    Ok(Rate { count, period })
}

/// `512KiB`, `10MiB`, `1GB`, `100B`: SI units are powers of 1000, IEC units (`KiB` ...) powers
/// of 1024. A fraction is allowed (`1.5MiB`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let expected = || {
        format!("expected a size such as \"512KiB\", \"10MiB\" or \"1GB\" (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), found {s:?}")
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(expected)?;
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim() {
        "B" => 1,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return Err(expected()),
    };
    let value = parse_decimal(num).ok_or_else(expected)?;
    let bytes = value * mult as f64;
    // `u64::MAX as f64` is 2^64 itself, which `as u64` would quietly turn into u64::MAX.
    if bytes < 1.0 {
        return Err(format!("size {s:?} is out of range (at least 1 byte)"));
    }
    if bytes >= u64::MAX as f64 {
        return Err(format!(
            "size {s:?} is out of range (at most 16 EiB; leave the limit out for none)"
        ));
    }
    Ok(bytes.round() as u64)
}

fn parse_decimal(num: &str) -> Option<f64> {
    // Only plain decimals: f64::from_str would also accept "inf" and exponents.
    if num.is_empty() || num.starts_with('.') || num.ends_with('.') || num.matches('.').count() > 1
    {
        return None;
    }
    num.parse().ok()
}

/// `20MiB/s`: bytes per second.
pub fn parse_bandwidth(s: &str) -> Result<u64, String> {
    let size = s.trim().strip_suffix("/s").ok_or_else(|| {
        format!("expected a bandwidth such as \"20MiB/s\" or \"1MB/s\", found {s:?}")
    })?;
    // Line speeds are sold in bits: say so rather than "expected a size".
    let unit = size.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.');
    if unit.ends_with('b') || unit.to_ascii_lowercase().ends_with("bit") {
        // The hint in the unit written: "100kb/s" was told "for megabytes write MB/s".
        let number = &size[..size.len() - unit.len()];
        let lower = unit.to_ascii_lowercase();
        // `Mib/s` (mebibits) is told in MiB; a unit with no prefix (`800b/s`) in bytes.
        let binary = lower.get(1..2) == Some("i");
        let (prefix, name) = match lower.chars().next() {
            Some('k') => ("K", "kilobytes"),
            Some('m') => ("M", "megabytes"),
            Some('g') => ("G", "gigabytes"),
            Some('t') => ("T", "terabytes"),
            _ => ("", "bytes"),
        };
        let (prefix, name) = match (binary && !prefix.is_empty(), name) {
            (true, "kilobytes") => ("Ki", "kibibytes"),
            (true, "megabytes") => ("Mi", "mebibytes"),
            (true, "gigabytes") => ("Gi", "gibibytes"),
            (true, _) => ("Ti", "tebibytes"),
            (false, name) => (prefix, name),
        };
        let bytes = number
            .parse::<f64>()
            .ok()
            .map(|n| format!(" ({number} {prefix}bit/s is \"{}{prefix}B/s\")", n / 8.0))
            .unwrap_or_default();
        return Err(format!("{s:?}: a bandwidth is in bytes per second with a capital B (KB, MB, KiB, MiB ...): for {name} write \"{number}{prefix}B/s\"; for bits divide by 8{bytes}"));
    }
    parse_size(size).map_err(|e| format!("{e}, in the bandwidth {s:?}"))
}

/// A daily window in minutes since midnight, `end` exclusive. `start > end` wraps midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hours {
    pub start: u16,
    pub end: u16,
}

pub fn parse_hours(s: &str) -> Result<Hours, String> {
    let expected =
        || format!("expected hours as \"HH:MM-HH:MM\" (e.g. \"07:00-21:00\"), found {s:?}");
    let (a, b) = s.split_once('-').ok_or_else(expected)?;
    // Written right, out of range ("22:00-25:00"): said as such, not as the wrong form.
    let in_range = |t: &str, allow_24: bool| {
        parse_hhmm(t, allow_24).ok_or_else(|| {
            match parse_hhmm(t, true).is_some() || well_formed(t) {
                true => format!(
                    "hours {s:?}: {t:?} is no time of day (00:00 to 23:59, and 24:00 as an end)"
                ),
                false => expected(),
            }
        })
    };
    let start = in_range(a.trim(), false)?;
    let end = in_range(b.trim(), true)?;
    if start == end || (start == 0 && end == 24 * 60) {
        return Err(format!(
            "hours {s:?} cover the whole day or nothing; leave `hours` out for all day"
        ));
    }
    Ok(Hours { start, end })
}

/// `HH:MM` in form, whatever the numbers.
fn well_formed(s: &str) -> bool {
    s.split_once(':').is_some_and(|(h, m)| {
        h.len() == 2 && m.len() == 2 && h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit())
    })
}

fn parse_hhmm(s: &str, allow_24: bool) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    // Two digits each: `u16::from_str` would take "+7".
    if h.len() != 2 || m.len() != 2 || !h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let h: u16 = h.parse().ok()?;
    let m: u16 = m.parse().ok()?;
    if m >= 60 || h > 24 || (h == 24 && (m != 0 || !allow_24)) {
        return None;
    }
    Some(h * 60 + m)
}

/// `UTC`, `Z`, `+01:00`, `-05:30`: a fixed offset from UTC in seconds. Named zones with
/// daylight-saving rules are deliberately not supported: a fixed offset is predictable.
pub fn parse_tz(s: &str) -> Result<i32, String> {
    let expected = || {
        format!(
            "expected a fixed UTC offset such as \"UTC\", \"+01:00\" or \"-05:30\", found {s:?}"
        )
    };
    if s == "UTC" || s == "Z" {
        return Ok(0);
    }
    let (sign, rest) = match s.as_bytes().first() {
        Some(b'+') => (1, &s[1..]),
        Some(b'-') => (-1, &s[1..]),
        _ => return Err(expected()),
    };
    let minutes = parse_hhmm(rest, false).ok_or_else(expected)?;
    if minutes > 18 * 60 {
        return Err(format!("offset {s:?} is beyond ±18:00"));
    }
    Ok(sign * i32::from(minutes) * 60)
}

/// A device, service or role name: one DNS label in lowercase (it becomes part of DNS names).
pub fn check_label(s: &str, what: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {what} name {s:?}: expected a DNS label (lowercase letters, digits and '-', 1 to 63 characters, not starting or ending with '-')"
        ))
    }
}

/// An HTTP host name; returned lowercase without a trailing dot.
pub fn parse_host(s: &str) -> Result<String, String> {
    let h = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok {
        Ok(h)
    } else if h.contains('_') && parse_host(&h.replace('_', "-")).is_ok() {
        // Requests may carry one (routing takes them), but no public CA issues certificates
        // for such names since 2019: HTTPS for it could never be made to work.
        Err(format!(
            "invalid host {s:?}: '_' is not allowed in host names (certificate authorities refuse them); use '-'"
        ))
    } else {
        Err(format!(
            "invalid host {s:?}: expected a DNS name such as \"alice.example\" (no scheme, port or path)"
        ))
    }
}

/// A URL path prefix: starts with '/', no query or fragment. A trailing '/' is dropped
/// (except for "/") so that "/dfs" and "/dfs/" name the same prefix. It must be in the form
/// request paths are compared in ([`normalize_path`]), or it could never match.
pub fn parse_path_prefix(s: &str) -> Result<String, String> {
    if !s.starts_with('/') || s.contains(['?', '#']) || s.contains(char::is_whitespace) {
        return Err(format!(
            "invalid path {s:?}: expected a path prefix starting with '/' without '?', '#' or spaces"
        ));
    }
    if s.contains(';') {
        return Err(format!(
            "invalid path {s:?}: ';' parameters are left out when paths are compared; write the path without them"
        ));
    }
    let trimmed = s.trim_end_matches('/');
    let prefix = if trimmed.is_empty() { "/" } else { trimmed };
    match normalize_path(prefix) {
        Ok(n) if n == prefix => Ok(prefix.to_string()),
        Ok(n) => Err(format!(
            "invalid path {s:?}: request paths are compared in normal form, write it as {:?}",
            match n.trim_end_matches('/') {
                "" => "/",
                t => t,
            }
        )),
        Err(e) => Err(format!("invalid path {s:?}: {e}")),
    }
}

/// Why a request path cannot be routed (see [`normalize_path`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path does not start with '/'")]
    NotAbsolute,
    #[error("the path has a '%' not followed by two hex digits")]
    BadEscape,
    #[error("the path has a '\\' or an encoded '/' or '\\'")]
    AmbiguousSeparator,
    #[error("a path segment is '.' or '..' with ';' parameters")]
    DotSegmentWithParams,
    #[error("the path has an encoded control character (%00 to %1F, %7F)")]
    ControlCharacter,
}

/// The form of a request path that routing, path rules and the service all use (RFC 3986
/// §6.2.2): escapes of unreserved characters decoded (`%61` → `a`, `%2E` → `.`), other escapes
/// in upper case, `.` and `..` segments resolved, empty segments merged (`//` → `/`), and an
/// empty path taken as `/`. A service resolving the path it gets then lands where the gateway
/// routed: no `..`, escape or doubled slash moves a request out of the app that allowed it.
///
/// Paths a service may split otherwise than we do are refused: a `\` or an encoded `/` or `\`
/// (some servers take them as separators), `.`/`..` followed by `;` parameters (Java
/// servers drop those, then resolve the dots), and encoded control characters. Borrowed when already normal, the common case.
pub fn normalize_path(path: &str) -> Result<std::borrow::Cow<'_, str>, PathError> {
    use std::borrow::Cow;
    if path.is_empty() {
        return Ok(Cow::Borrowed("/"));
    }
    let rest = path.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
    if path.contains('\\') {
        return Err(PathError::AmbiguousSeparator);
    }
    let dotted = |s: &str| matches!(s.split(';').next(), Some("." | ".."));
    // Raw bytes past ASCII and the ASCII a URI must escape (both of which the http crate lets
    // through) are written as escapes: `/café` and `/caf%C3%A9`, `/{x}` and `/%7Bx%7D` are
    // one path to a service, and must be one to routing and rules.
    if !path.bytes().any(needs_escape)
        && !path.contains(['%'])
        && !path.contains("//")
        && !rest.split('/').any(dotted)
    {
        return Ok(Cow::Borrowed(path));
    }
    let mut segs: Vec<String> = Vec::new();
    let mut trailing = false;
    let raw: Vec<&str> = rest.split('/').collect();
    for (i, s) in raw.iter().enumerate() {
        let s = decode_unreserved(s)?;
        trailing = i + 1 == raw.len() && matches!(s.as_str(), "" | "." | "..");
        match s.as_str() {
            "" | "." => {}
            ".." => {
                segs.pop();
            }
            s if dotted(s) => return Err(PathError::DotSegmentWithParams),
            _ => segs.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segs {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// One path segment with escapes of unreserved characters decoded and other escapes in upper
/// case; an escaped `/` or `\` is refused.
fn decode_unreserved(seg: &str) -> Result<String, PathError> {
    let mut out = String::with_capacity(seg.len());
    let mut rest = seg;
    while let Some(at) = rest.find('%') {
        push_escaped(&mut out, &rest[..at]);
        let hex = rest
            .get(at + 1..at + 3)
            .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or(PathError::BadEscape)?;
        let byte = u8::from_str_radix(hex, 16).map_err(|_| PathError::BadEscape)?;
        match byte {
            b'/' | b'\\' => return Err(PathError::AmbiguousSeparator),
            // A service may cut the path at a NUL (C strings) or drop a tab or a line break:
            // `/admin%00/x` routed by the `/` app could be served as `/admin`.
            b if b.is_ascii_control() => return Err(PathError::ControlCharacter),
            b if b.is_ascii_alphanumeric() || b"-._~".contains(&b) => out.push(b as char),
            _ => {
                out.push('%');
                out.push_str(&hex.to_ascii_uppercase());
            }
        }
        rest = &rest[at + 3..];
    }
    push_escaped(&mut out, rest);
    Ok(out)
}

/// A byte a path holds only escaped: past ASCII, or ASCII that RFC 3986 allows in no path
/// (`"`, `<`, `>`, `[`, `]`, `^`, `` ` ``, `{`, `|`, `}`; `\` is refused before this).
fn needs_escape(b: u8) -> bool {
    !b.is_ascii() || b"\"<>[]^`{|}".contains(&b)
}

/// `s` onto `out`, each byte [`needs_escape`] says as an upper-case `%XX` escape.
fn push_escaped(out: &mut String, s: &str) {
    if !s.bytes().any(needs_escape) {
        out.push_str(s);
        return;
    }
    for b in s.bytes() {
        if needs_escape(b) {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(b as char);
        }
    }
}

/// Does `path` fall under `prefix` (as made by [`parse_path_prefix`])? Matches whole path
/// segments only: "/dfs" covers "/dfs" and "/dfs/x" but not "/dfsx". See
/// [`strip_path_prefix`] for how `;` parameters and empty segments count.
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    strip_path_prefix(path, prefix).is_some()
}

/// What follows `prefix` in `path` (empty, or starting with `/`), if `path` falls under it.
/// `path` is in normal form ([`normalize_path`]).
/// Segments of `path` are compared without their `;` parameters, and segments that are empty
/// without them are skipped: Tomcat, Jetty and Spring serve `/admin;x/users` and
/// `/;x/admin/users` as `/admin/users`, so they must route, be allowed or refused, and be
/// stripped as that.
pub fn strip_path_prefix<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    if prefix == "/" {
        return Some(path);
    }
    if !path.contains(';') {
        // The common case, per request: a normal-form path has no empty segments either.
        return path
            .strip_prefix(prefix)
            .filter(|rest| rest.is_empty() || rest.starts_with('/'));
    }
    let bare = |seg: &str| seg.split(';').next().unwrap_or("").is_empty();
    let mut rest = path;
    for want in prefix.split('/').filter(|s| !s.is_empty()) {
        let seg = loop {
            rest = rest.strip_prefix('/')?;
            let end = rest.find('/').unwrap_or(rest.len());
            let seg = &rest[..end];
            rest = &rest[end..];
            if !bare(seg) {
                break seg;
            }
            if rest.is_empty() {
                return None;
            }
        };
        if seg.split(';').next() != Some(want) {
            return None;
        }
    }
    Some(rest)
}

/// Do two listen addresses of one kind take the same port (equal, or one a wildcard of the
/// other's family, or `[::]` which is dual-stack)? Used by policy checks and by the gateway
/// when it rebinds listeners, so both agree.
pub fn listens_overlap(a: std::net::SocketAddr, b: std::net::SocketAddr) -> bool {
    a.port() == b.port()
        && (a.ip() == b.ip()
            || a.ip().is_unspecified() && (a.is_ipv6() || b.is_ipv4())
            || b.ip().is_unspecified() && (b.is_ipv6() || a.is_ipv4()))
}

/// The methods of IANA's HTTP Method Registry (HTTP, WebDAV, CalDAV, DeltaV, …), and QUERY.
pub const KNOWN_METHODS: [&str; 40] = [
    "ACL",
    "BASELINE-CONTROL",
    "BIND",
    "CHECKIN",
    "CHECKOUT",
    "CONNECT",
    "COPY",
    "DELETE",
    "GET",
    "HEAD",
    "LABEL",
    "LINK",
    "LOCK",
    "MERGE",
    "MKACTIVITY",
    "MKCALENDAR",
    "MKCOL",
    "MKREDIRECTREF",
    "MKWORKSPACE",
    "MOVE",
    "OPTIONS",
    "ORDERPATCH",
    "PATCH",
    "POST",
    "PRI",
    "PROPFIND",
    "PROPPATCH",
    "PUT",
    "QUERY",
    "REBIND",
    "REPORT",
    "SEARCH",
    "TRACE",
    "UNBIND",
    "UNCHECKOUT",
    "UNLINK",
    "UNLOCK",
    "UPDATE",
    "UPDATEREDIRECTREF",
    "VERSION-CONTROL",
];

/// An HTTP method token. Methods are case-sensitive in HTTP, so "get" is refused rather than
/// silently never matching; and one a letter (or two swapped) from a registered one
/// ([`KNOWN_METHODS`]) is refused as its misspelling: `HAED` was accepted and the rule then
/// answered 405 to the HEAD meant. Other names are extension methods (PURGE, SUBSCRIBE…).
pub fn check_method(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 32 || !s.bytes().all(|b| b.is_ascii_uppercase() || b == b'-') {
        return Err(format!(
            "invalid method {s:?}: expected an uppercase HTTP method such as \"GET\" or \"POST\""
        ));
    }
    if KNOWN_METHODS.contains(&s) {
        return Ok(());
    }
    let near = KNOWN_METHODS
        .iter()
        .filter(|k| edit_distance(k, s) == 1)
        .map(|k| format!("{k:?}"))
        .collect::<Vec<_>>();
    match near.is_empty() {
        true => Ok(()),
        false => Err(format!(
            "method {s:?} is no registered HTTP method and one letter from {}: a misspelling? (the rule would never match the method meant)",
            near.join(" or ")
        )),
    }
}

/// Edit distance of two ASCII words counting a swap of neighbours as one edit (optimal
/// string alignment; methods are at most 32 bytes).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(
            parse_rate("50/s").unwrap(),
            Rate {
                count: 50,
                period: Duration::from_secs(1)
            }
        );
        assert_eq!(
            parse_rate("600/min").unwrap().period,
            Duration::from_secs(60)
        );
        assert_eq!(parse_rate("3/h").unwrap().period, Duration::from_secs(3600));
        for bad in ["50", "50/d", "/s", "-1/s", "0/s", "1.5/s"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_distinguish_si_and_iec() {
        assert_eq!(parse_size("512KiB").unwrap(), 512 * 1024);
        assert_eq!(parse_size("1GB").unwrap(), 1_000_000_000);
        assert_eq!(parse_size("10MiB").unwrap(), 10 * 1024 * 1024);
        assert_eq!(parse_size("1.5MiB").unwrap(), 1_572_864);
        assert_eq!(parse_size("100B").unwrap(), 100);
        for bad in [
            "", "10", "10mb", "MiB", "1e3B", "inf B", "0B", "1.B", "10 XB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_bandwidth("20MiB/s").unwrap(), 20 * 1024 * 1024);
        assert!(parse_bandwidth("20MiB").is_err());
        // Told in the unit written.
        for (bits, says) in [
            ("10Mbit/s", "for megabytes write \"10MB/s\"; for bits divide by 8 (10 Mbit/s is \"1.25MB/s\")"),
            ("20mb/s", "write \"20MB/s\"; for bits divide by 8 (20 Mbit/s is \"2.5MB/s\")"),
            ("100kb/s", "for kilobytes write \"100KB/s\"; for bits divide by 8 (100 Kbit/s is \"12.5KB/s\")"),
            ("800b/s", "for bytes write \"800B/s\"; for bits divide by 8 (800 bit/s is \"100B/s\")"),
            ("10Mib/s", "for mebibytes write \"10MiB/s\"; for bits divide by 8 (10 Mibit/s is \"1.25MiB/s\")"),
        ] {
            let e = parse_bandwidth(bits).unwrap_err();
            assert!(e.contains("bytes per second") && e.contains(says), "{e}");
        }
        let e = parse_bandwidth("20XB/s").unwrap_err();
        assert!(e.contains("in the bandwidth \"20XB/s\""), "{e}");
    }

    #[test]
    fn hours_out_of_range_are_told_so() {
        let e = parse_hours("22:00-25:00").unwrap_err();
        assert!(e.contains("\"25:00\" is no time of day"), "{e}");
        let e = parse_hours("24:00-06:00").unwrap_err();
        assert!(e.contains("\"24:00\" is no time of day"), "{e}");
        let e = parse_hours("7-21").unwrap_err();
        assert!(e.contains("expected hours as \"HH:MM-HH:MM\""), "{e}");
    }

    #[test]
    fn hours_and_offsets() {
        assert_eq!(
            parse_hours("07:00-21:00").unwrap(),
            Hours {
                start: 420,
                end: 1260
            }
        );
        assert_eq!(
            parse_hours("22:00-02:30").unwrap(),
            Hours {
                start: 1320,
                end: 150
            }
        );
        assert_eq!(parse_hours("18:00-24:00").unwrap().end, 1440);
        for bad in [
            "7:00-21:00",
            "07:00",
            "07:60-08:00",
            "24:00-01:00",
            "08:00-08:00",
            "00:00-24:00",
        ] {
            assert!(parse_hours(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_tz("UTC").unwrap(), 0);
        assert_eq!(parse_tz("+01:00").unwrap(), 3600);
        assert_eq!(parse_tz("-05:30").unwrap(), -19800);
        for bad in ["Europe/Paris", "+1", "+19:00", "01:00"] {
            assert!(parse_tz(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_hosts_paths() {
        assert!(check_label("home1", "device").is_ok());
        for bad in ["", "Home1", "-a", "a-", "a.b", "a_b"] {
            assert!(check_label(bad, "device").is_err(), "{bad}");
        }
        assert_eq!(parse_host("Alice.Example.").unwrap(), "alice.example");
        assert!(parse_host("http://x").is_err());
        assert!(parse_host("x:80").is_err());
        assert!(parse_host("my_app.example")
            .unwrap_err()
            .contains("'_' is not allowed in host names"));
        // Told only when it is the only problem: the scheme and path first.
        assert!(parse_host("https://my_app.example/x")
            .unwrap_err()
            .contains("no scheme, port or path"));
        assert_eq!(parse_path_prefix("/dfs/").unwrap(), "/dfs");
        assert_eq!(parse_path_prefix("/").unwrap(), "/");
        assert!(parse_path_prefix("dfs").is_err());
        assert!(path_has_prefix("/dfs/a", "/dfs"));
        assert!(path_has_prefix("/dfs", "/dfs"));
        assert!(!path_has_prefix("/dfsx", "/dfs"));
        assert!(path_has_prefix("/anything", "/"));
        // `;` parameters do not hide a segment from its prefix.
        assert!(path_has_prefix("/admin;x/users", "/admin"));
        assert!(path_has_prefix("/admin;jsessionid=1", "/admin"));
        assert!(path_has_prefix("/a/admin;/b", "/a/admin"));
        assert!(!path_has_prefix("/adminx;y", "/admin"));
        // A segment of parameters only is no segment (Tomcat merges the slashes around it).
        assert!(path_has_prefix("/;x/admin/users", "/admin"));
        assert!(path_has_prefix("/;/admin", "/admin"));
        assert!(path_has_prefix("/a/;x/b", "/a/b"));
        assert!(!path_has_prefix("/;x", "/admin"));
        assert_eq!(strip_path_prefix("/dfs;x/a", "/dfs"), Some("/a"));
        assert_eq!(strip_path_prefix("/dfs/a;y/b", "/dfs"), Some("/a;y/b"));
        assert_eq!(strip_path_prefix("/dfs;x", "/dfs"), Some(""));
        assert_eq!(strip_path_prefix("/dfsx", "/dfs"), None);
        assert!(parse_path_prefix("/a;b").is_err());
        assert_eq!(
            parse_path_prefix("/a/../b").unwrap_err(),
            "invalid path \"/a/../b\": request paths are compared in normal form, write it as \"/b\""
        );
        assert!(parse_path_prefix("/%61dmin").is_err());
        assert!(parse_path_prefix("/a%2fb").is_err());
        assert_eq!(parse_path_prefix("/caf%C3%A9/").unwrap(), "/caf%C3%A9");
        // Signs are no digits.
        assert!(parse_rate("+50/s").is_err());
        assert!(parse_hours("+7:00-21:00").is_err());
        assert!(parse_tz("++01:00").is_err());
        assert!(parse_size("18446744073709551616B")
            .unwrap_err()
            .contains("at most 16 EiB"));
        assert!(parse_size("0.1B").unwrap_err().contains("at least 1 byte"));
        assert_eq!(parse_size("1KiB").unwrap(), 1024);
        // A prefix that normalizes to the root is suggested as "/", not as "".
        assert!(parse_path_prefix("/dfs/..")
            .unwrap_err()
            .ends_with("write it as \"/\""));
        // Raw UTF-8 is one path with its escapes: in requests (routing and rules alike) and,
        // said so, in policy files.
        assert_eq!(normalize_path("/café/x").unwrap(), "/caf%C3%A9/x");
        assert_eq!(normalize_path("/caf%c3%a9/x").unwrap(), "/caf%C3%A9/x");
        assert_eq!(normalize_path("/ä%41/ü").unwrap(), "/%C3%A4A/%C3%BC");
        assert!(path_has_prefix(
            &normalize_path("/café/secret").unwrap(),
            "/caf%C3%A9"
        ));
        assert!(parse_path_prefix("/café")
            .unwrap_err()
            .contains("write it as \"/caf%C3%A9\""));
        // So are the characters a URI path holds only escaped.
        assert_eq!(normalize_path("/api/{x}|y").unwrap(), "/api/%7Bx%7D%7Cy");
        assert_eq!(normalize_path("/api/%7bx%7D").unwrap(), "/api/%7Bx%7D");
        assert!(path_has_prefix(
            &normalize_path("/api/{x}/z").unwrap(),
            "/api/%7Bx%7D"
        ));
        assert!(parse_path_prefix("/api/{x}").is_err());
    }

    #[test]
    fn paths_normalize_like_a_service_resolves_them() {
        let n = |p: &str| normalize_path(p).map(|c| c.into_owned());
        // Already normal: borrowed, unchanged.
        assert!(matches!(
            normalize_path("/dfs/a.txt"),
            Ok(std::borrow::Cow::Borrowed(_))
        ));
        assert_eq!(n("/a/./b/../c").unwrap(), "/a/c");
        assert_eq!(n("/dfs/../admin").unwrap(), "/admin");
        assert_eq!(n("/../../x").unwrap(), "/x");
        assert_eq!(n("/a/b/..").unwrap(), "/a/");
        assert_eq!(n("/a/.").unwrap(), "/a/");
        assert_eq!(n("//admin//x/").unwrap(), "/admin/x/");
        assert_eq!(n("/%61dmin/%2e%2E/%7euser").unwrap(), "/~user");
        assert_eq!(n("/a%3bb%c3%a9").unwrap(), "/a%3Bb%C3%A9");
        assert_eq!(n("").unwrap(), "/");
        assert_eq!(n("*"), Err(PathError::NotAbsolute));
        assert_eq!(n("/a\\..\\admin"), Err(PathError::AmbiguousSeparator));
        assert_eq!(n("/a%2F..%2fadmin"), Err(PathError::AmbiguousSeparator));
        assert_eq!(n("/a%5c"), Err(PathError::AmbiguousSeparator));
        assert_eq!(n("/pub/..;/admin"), Err(PathError::DotSegmentWithParams));
        assert_eq!(n("/pub/%2e;x/admin"), Err(PathError::DotSegmentWithParams));
        assert_eq!(n("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(n("/a%+1"), Err(PathError::BadEscape));
        assert_eq!(n("/a%4"), Err(PathError::BadEscape));
        assert_eq!(n("/admin%00/x"), Err(PathError::ControlCharacter));
        assert_eq!(n("/admin%09"), Err(PathError::ControlCharacter));
        assert_eq!(n("/a%7f"), Err(PathError::ControlCharacter));
        // Normal form is a fixed point.
        for p in ["/a/c", "/admin/x/", "/~user", "/a%3Bb%C3%A9", "/"] {
            assert_eq!(n(p).unwrap(), p);
        }
        assert!(check_method("GET").is_ok());
        assert!(check_method("PROPFIND").is_ok());
        assert!(check_method("VERSION-CONTROL").is_ok());
        assert!(check_method("get").is_err());
        let e = check_method("HAED").unwrap_err();
        assert!(
            e.contains("\"HAED\" is no registered HTTP method and one letter from \"HEAD\""),
            "{e}"
        );
        assert!(check_method("GTE").is_err());
        assert!(check_method("DELTE").is_err());
        // Extension methods: not a registered one's misspelling.
        for m in ["PURGE", "SUBSCRIBE", "NOTIFY", "FROBNICATE"] {
            assert!(check_method(m).is_ok(), "{m}");
        }
    }

    #[test]
    fn overlapping_listen_addresses() {
        let a = |s: &str| s.parse().unwrap();
        assert!(listens_overlap(a("127.0.0.1:80"), a("127.0.0.1:80")));
        assert!(listens_overlap(a("0.0.0.0:80"), a("127.0.0.1:80")));
        assert!(listens_overlap(a("127.0.0.1:80"), a("0.0.0.0:80")));
        // `[::]` is dual-stack: it takes the port on IPv4 addresses too.
        assert!(listens_overlap(a("[::]:80"), a("127.0.0.1:80")));
        assert!(listens_overlap(a("0.0.0.0:80"), a("[::]:80")));
        assert!(listens_overlap(a("[::]:80"), a("[::1]:80")));
        assert!(!listens_overlap(a("0.0.0.0:80"), a("[::1]:80")));
        assert!(!listens_overlap(a("127.0.0.1:80"), a("127.0.0.2:80")));
        assert!(!listens_overlap(a("0.0.0.0:80"), a("0.0.0.0:81")));
    }
}
