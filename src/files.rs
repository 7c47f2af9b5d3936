//! A read-only HTTP file service (`zonegate files`): the "file node" of the quick start.
//! GET and HEAD only; files stream from disk, whole or as one byte range (`Range`, so a
//! download resumes and a video seeks); `Last-Modified` and `If-Modified-Since` let a client
//! keep what it has; directories get a plain HTML listing of at most [`MAX_LISTING`] entries;
//! paths never leave the served directory.

use std::collections::BinaryHeap;
use std::convert::Infallible;
use std::ffi::OsStr;
use std::io::SeekFrom;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// Entries a directory listing shows at most. A directory of a million files must not become
/// a response (and names held in memory) of a hundred megabytes; the rest are counted, not held.
pub const MAX_LISTING: usize = 10_000;

type Body = BoxBody<Bytes, std::io::Error>;

/// A body held whole in memory.
fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

fn empty() -> Body {
    full(Bytes::new())
}

fn text(status: StatusCode, msg: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(full(format!("{msg}\n")))
        .expect("valid response")
}

/// Decodes %XX escapes into bytes (file names need not be UTF-8); `None` for an invalid
/// escape or a NUL byte, which no file name holds.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    (!out.contains(&0)).then_some(out)
}

/// Escapes every byte of a file name but the unreserved ones (RFC 3986 §2.3), so a name with
/// `#`, `?`, `%`, spaces or non-UTF-8 bytes still links to itself.
fn percent_encode(name: &[u8]) -> String {
    let mut out = String::with_capacity(name.len());
    for &c in name {
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

/// Maps a URL path to a file under `root`, refusing anything that could climb out of it.
pub fn resolve(root: &Path, url_path: &str) -> Option<PathBuf> {
    let decoded = percent_decode(url_path.split('?').next().unwrap_or(""))?;
    let mut p = root.to_path_buf();
    for c in Path::new(OsStr::from_bytes(&decoded)).components() {
        match c {
            Component::Normal(part) => p.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(p)
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The URL path of `rel` (a directory under the root), as links in a listing use it:
/// built from the path's components rather than echoed from the request, so it is canonical
/// (`//`, `/./` gone) and no longer than the path; `prefix` is what a gateway app stripped
/// (`X-Forwarded-Prefix`), so links work through it.
fn dir_url(prefix: &str, rel: &Path) -> String {
    let mut url = prefix.trim_end_matches('/').to_owned();
    for c in rel.components() {
        if let Component::Normal(part) = c {
            url.push('/');
            url.push_str(&percent_encode(part.as_bytes()));
        }
    }
    url.push('/');
    url
}

/// The prefix a gateway app stripped before the request reached this service, if it sent one
/// that can stand in a link. A client that sends its own only changes its own page's links.
fn forwarded_prefix(headers: &HeaderMap) -> &str {
    headers
        .get("x-forwarded-prefix")
        .and_then(|v| v.to_str().ok())
        // One leading slash: `//host` would make every link lead to another site.
        .filter(|p| p.starts_with('/') && !p.starts_with("//") && p.len() <= 1024)
        // No `\` either: browsers read `/\host` as `//host`.
        .filter(|p| {
            p.bytes()
                .all(|b| b.is_ascii_graphic() && !b"\"<>\\".contains(&b))
        })
        .unwrap_or("")
}

/// The HTML listing of `dir`, whose URL path is `url` (from [`dir_url`]).
async fn listing(dir: &Path, url: &str) -> std::io::Result<String> {
    // The first MAX_LISTING names in sorted order, whatever order the directory yields them
    // in: a max-heap that drops its largest past the cap.
    let mut heap: BinaryHeap<(Vec<u8>, bool)> = BinaryHeap::new();
    let mut left_out = 0usize;
    let mut rd = tokio::fs::read_dir(dir).await?;
    while let Some(e) = rd.next_entry().await? {
        let name = e.file_name().as_bytes().to_vec();
        if heap.len() == MAX_LISTING {
            left_out += 1;
            if heap.peek().is_some_and(|(last, _)| *last <= name) {
                continue;
            }
            heap.pop();
        }
        let is_dir = e.file_type().await.map(|t| t.is_dir()).unwrap_or(false);
        heap.push((name, is_dir));
    }
    let names = heap.into_sorted_vec();
    let base = html_escape(url);
    let title = html_escape(&String::from_utf8_lossy(
        &percent_decode(url).unwrap_or_default(),
    ));
    let mut html =
        format!("<!doctype html><meta charset=utf-8><title>{title}</title><h1>{title}</h1><ul>\n");
    for (name, is_dir) in &names {
        let slash = if *is_dir { "/" } else { "" };
        html.push_str(&format!(
            "<li><a href=\"{base}{}{slash}\">{}{slash}</a></li>\n",
            percent_encode(name),
            html_escape(&String::from_utf8_lossy(name)),
        ));
    }
    html.push_str("</ul>\n");
    if left_out > 0 {
        html.push_str(&format!(
            "<p>{left_out} more entries not listed: a listing shows at most {MAX_LISTING}.</p>\n"
        ));
    }
    Ok(html)
}

/// `path` with symlinks followed, if it really lies under `root`: `resolve` stops `..`, but a
/// symlink inside the directory could still point anywhere (a home directory, /dev/zero).
/// What is served is then opened by this path, so a link swapped in after the check is not
/// followed out. `Err` is the answer to give instead.
async fn inside(root: &Path, path: &Path) -> Result<PathBuf, Response<Body>> {
    match tokio::fs::canonicalize(path).await {
        Ok(real) if real.starts_with(root) => Ok(real),
        Ok(_) => Err(text(StatusCode::FORBIDDEN, "outside the shared directory")),
        Err(_) => Err(text(StatusCode::NOT_FOUND, "not found")),
    }
}

async fn handle(root: Arc<PathBuf>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "read-only file service: GET and HEAD only",
        );
        r.headers_mut()
            .insert("allow", HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let head = req.method() == Method::HEAD;
    let url_path = req.uri().path().to_owned();
    let Some(asked) = resolve(&root, &url_path) else {
        return text(StatusCode::BAD_REQUEST, "bad path");
    };
    let path = match inside(&root, &asked).await {
        Ok(real) => real,
        Err(answer) => return answer,
    };
    let meta = match tokio::fs::metadata(&path).await {
        Ok(m) => m,
        Err(_) => return text(StatusCode::NOT_FOUND, "not found"),
    };
    if !meta.is_dir() && !meta.is_file() {
        return text(StatusCode::FORBIDDEN, "not a regular file");
    }
    if meta.is_dir() {
        let index = path.join("index.html");
        if tokio::fs::metadata(&index)
            .await
            .map(|m| m.is_file())
            .unwrap_or(false)
        {
            // The index may be a symlink too.
            return match inside(&root, &index).await {
                Ok(index) => file(&index, head, req.headers()).await,
                Err(answer) => answer,
            };
        }
        let rel = asked.strip_prefix(root.as_path()).unwrap_or(Path::new(""));
        let url = dir_url(forwarded_prefix(req.headers()), rel);
        return match listing(&path, &url).await {
            Ok(html) => Response::builder()
                .header("content-type", "text/html; charset=utf-8")
                .header(header::CONTENT_LENGTH, html.len())
                .body(if head { empty() } else { full(html) })
                .expect("valid response"),
            Err(_) => text(StatusCode::FORBIDDEN, "cannot list this directory"),
        };
    }
    file(&path, head, req.headers()).await
}

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

/// Whether a GET or HEAD is answered 304: `If-None-Match` decides when present (RFC 9110
/// §13.2.2; this service gives no tags, so only `*`, "any current version", matches), else
/// whether the `If-Modified-Since` date covers `modified` (HTTP dates have whole seconds).
fn not_modified(headers: &HeaderMap, modified: Option<SystemTime>) -> bool {
    if let Some(tags) = headers.get(header::IF_NONE_MATCH) {
        return tags.as_bytes().trim_ascii() == b"*";
    }
    let (Some(since), Some(modified)) = (
        headers
            .get(header::IF_MODIFIED_SINCE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok()),
        modified,
    ) else {
        return false;
    };
    let secs = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    };
    secs(modified) <= secs(since)
}

/// A file's modification time as `Last-Modified` may say it, at `now`. HTTP dates run from
/// 1970 to 9999 (and `httpdate` panics outside them). And a date is a validator only for a
/// file unchanged within its second (RFC 9110 §8.8.2.2): two writes in one second share a
/// date, and a client resuming with that date in `If-Range` would get a part of the second
/// spliced onto the first. A file dated otherwise gets no date: no 304 and no `If-Range`
/// match for it.
fn http_date(modified: Option<SystemTime>, now: SystemTime) -> Option<SystemTime> {
    let last = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(253_402_300_799);
    modified.filter(|t| {
        *t >= SystemTime::UNIX_EPOCH
            && *t <= last
            && now
                .duration_since(*t)
                .is_ok_and(|age| age >= std::time::Duration::from_secs(1))
    })
}

async fn file(path: &Path, head: bool, headers: &HeaderMap) -> Response<Body> {
    // `path` is canonical, so no symlink in its last part: one swapped in after the checks is
    // not followed (O_NOFOLLOW; one swapped in for a parent directory still would be, which
    // only openat2's RESOLVE_BENEATH would stop). Non-blocking, so a FIFO swapped in cannot
    // hold a blocking-pool thread in open(2); anything but a regular file is refused below,
    // on the opened handle.
    let opened = tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
        .await;
    let mut f = match opened {
        Ok(f) => f,
        Err(_) => return text(StatusCode::FORBIDDEN, "cannot read this file"),
    };
    let meta = match f.metadata().await {
        Ok(m) if m.is_file() => m,
        _ => return text(StatusCode::FORBIDDEN, "not a regular file"),
    };
    let len = meta.len();
    let modified = http_date(meta.modified().ok(), SystemTime::now());
    let last_modified = modified.map(httpdate::fmt_http_date);
    let ctype = match path.extension().and_then(|e| e.to_str()) {
        Some("html") | Some("htm") => "text/html; charset=utf-8",
        Some("txt") | Some("md") => "text/plain; charset=utf-8",
        Some("json") => "application/json",
        Some("png") => "image/png",
        Some("jpg") | Some("jpeg") => "image/jpeg",
        _ => "application/octet-stream",
    };
    let mut r = Response::builder().header(header::ACCEPT_RANGES, "bytes");
    if let Some(lm) = &last_modified {
        r = r.header(header::LAST_MODIFIED, lm);
    }
    if not_modified(headers, modified) {
        return r
            .status(StatusCode::NOT_MODIFIED)
            .body(empty())
            .expect("valid response");
    }
    let mut ranged = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map_or(Ranged::Whole, |v| byte_range(v, len));
    // `If-Range`: a part only of the version the client already holds (compared by date, the
    // one validator this service gives, and only a strong one: see `http_date`); otherwise
    // the whole new file.
    if let Some(if_range) = headers.get(header::IF_RANGE) {
        if last_modified.as_deref().map(str::as_bytes) != Some(if_range.as_bytes()) {
            ranged = Ranged::Whole;
        }
    }
    let (status, start, count) = match ranged {
        Ranged::Whole => (StatusCode::OK, 0, len),
        Ranged::Part { start, end } => {
            r = r.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"));
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        Ranged::Unsatisfiable => {
            return r
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                .body(empty())
                .expect("valid response");
        }
    };
    let body: Body = if head {
        empty()
    } else {
        if start > 0 {
            if let Err(e) = f.seek(SeekFrom::Start(start)).await {
                debug!(error = %e, path = %path.display(), "seek failed");
                return text(StatusCode::FORBIDDEN, "cannot read this file");
            }
        }
        // Streamed from disk: memory stays flat for any file size.
        let stream = tokio_util::io::ReaderStream::with_capacity(f.take(count), 64 * 1024)
            .map_ok(Frame::data);
        BodyExt::boxed(StreamBody::new(stream))
    };
    r.status(status)
        .header(header::CONTENT_TYPE, ctype)
        .header(header::CONTENT_LENGTH, count)
        .body(body)
        .expect("valid response")
}

/// Serves `root` read-only on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, root: PathBuf, shutdown: CancellationToken) {
    // Canonical root, so the containment check in `handle` compares like with like.
    let root = Arc::new(std::fs::canonicalize(&root).unwrap_or(root));
    if let Ok(a) = listener.local_addr() {
        info!(addr = %a, dir = %root.display(), "read-only file service listening");
    }
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                // Typically out of file descriptors: back off instead of spinning.
                Err(_) => { tokio::time::sleep(std::time::Duration::from_millis(50)).await; continue }
            },
        };
        let root = root.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let root = root.clone();
                async move {
                    let (m, p) = (req.method().clone(), req.uri().path().to_owned());
                    let r = handle(root, req).await;
                    info!(client = %peer, method = %m, path = %p, status = r.status().as_u16(), "file request");
                    Ok::<_, Infallible>(r)
                }
            });
            let io = hyper_util::rt::TokioIo::new(tcp);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
            {
                debug!(error = %e, "file connection ended");
            }
        });
    }
}

/// Binds and serves (for `zonegate files`).
pub async fn run(
    dir: PathBuf,
    listen: SocketAddr,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let l = TcpListener::bind(listen).await?;
    serve(l, dir, shutdown).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_root() {
        let root = Path::new("/srv/files");
        assert_eq!(
            resolve(root, "/a/b.txt"),
            Some(PathBuf::from("/srv/files/a/b.txt"))
        );
        assert_eq!(
            resolve(root, "/a%20b"),
            Some(PathBuf::from("/srv/files/a b"))
        );
        assert_eq!(resolve(root, "/../etc/passwd"), None);
        assert_eq!(resolve(root, "/a/%2e%2e/%2e%2e/etc"), None);
        assert_eq!(resolve(root, "/%zz"), None);
        assert_eq!(resolve(root, "/%+1"), None);
        assert_eq!(resolve(root, "/a%00b"), None);
        assert_eq!(resolve(root, "/"), Some(PathBuf::from("/srv/files")));
        // Names need not be UTF-8.
        assert_eq!(
            resolve(root, "/%FFx"),
            Some(Path::new("/srv/files").join(OsStr::from_bytes(b"\xffx")))
        );
    }

    #[test]
    fn encoded_names_decode_to_themselves() {
        for name in [
            &b"a b#c?d%e&f"[..],
            b"\xff\xfe",
            "é.txt".as_bytes(),
            b"plain-1.2_~",
        ] {
            let enc = percent_encode(name);
            assert!(enc
                .bytes()
                .all(|c| c.is_ascii_graphic() && !b"#?\"<>&".contains(&c)));
            assert_eq!(percent_decode(&enc).as_deref(), Some(name));
        }
        assert_eq!(percent_encode(b"plain-1.2_~"), "plain-1.2_~");
    }

    proptest::proptest! {
        /// Whatever a client sends: a part lies inside the file, and an unsatisfiable answer
        /// only for a start at or past its end (or a zero suffix).
        #[test]
        fn any_range_value_is_answered_inside_the_file(value in "\\PC{0,40}", len in 0u64..5000) {
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

        /// No request path leaves the root, and every name links back to itself.
        #[test]
        fn no_path_leaves_the_root(path in "[/.a%2eE0fF]{0,30}") {
            let root = Path::new("/srv/files");
            if let Some(p) = resolve(root, &path) {
                proptest::prop_assert!(p.starts_with(root));
                proptest::prop_assert!(p.components().all(|c| c != Component::ParentDir));
            }
        }

        #[test]
        fn any_name_round_trips_through_its_link(name in proptest::collection::vec(1u8..=255, 0..40)) {
            proptest::prop_assert_eq!(percent_decode(&percent_encode(&name)), Some(name));
        }
    }

    #[test]
    fn only_settled_dates_in_range_are_validators() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let ms = std::time::Duration::from_millis;
        // Changed within the last second: two writes could share the date.
        assert_eq!(http_date(Some(t), t + ms(500)), None);
        assert_eq!(http_date(Some(t), t + ms(1000)), Some(t));
        // Dated in the future (a clock set back since): not settled either.
        assert_eq!(http_date(Some(t + ms(5000)), t), None);
        // Outside what an HTTP date can say.
        let before_1970 = SystemTime::UNIX_EPOCH - ms(1000);
        assert_eq!(http_date(Some(before_1970), t), None);
        let after_9999 = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(253_402_300_800);
        assert_eq!(http_date(Some(after_9999), after_9999 + ms(5000)), None);
        assert_eq!(http_date(None, t), None);
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

    async fn get(addr: SocketAddr, target: &str, extra: &str) -> String {
        request(addr, "GET", target, extra).await
    }

    async fn head_req(addr: SocketAddr, target: &str) -> String {
        request(addr, "HEAD", target, "").await
    }

    /// One request over a fresh connection; the whole answer as text (head and body).
    async fn request(addr: SocketAddr, method: &str, target: &str, extra: &str) -> String {
        use tokio::io::AsyncWriteExt;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head =
            format!("{method} {target} HTTP/1.1\r\nHost: t\r\n{extra}Connection: close\r\n\r\n");
        c.write_all(head.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).await.unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
        let head = answer.split("\r\n\r\n").next()?;
        head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn body(answer: &str) -> &str {
        answer.split_once("\r\n\r\n").map_or("", |(_, b)| b)
    }

    async fn serve_dir(dir: &Path) -> (SocketAddr, CancellationToken) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(l, dir.to_path_buf(), stop.clone()));
        (addr, stop)
    }

    #[tokio::test]
    async fn ranges_resume_and_dates_validate() {
        let dir = tempfile::tempdir().unwrap();
        let content: String = (0..1000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        std::fs::write(dir.path().join("f.txt"), &content).unwrap();
        let ten_secs_ago = SystemTime::now() - std::time::Duration::from_secs(10);
        let f = std::fs::File::options()
            .append(true)
            .open(dir.path().join("f.txt"))
            .unwrap();
        f.set_modified(ten_secs_ago).unwrap();
        drop(f);
        let (addr, stop) = serve_dir(dir.path()).await;

        let whole = get(addr, "/f.txt", "").await;
        assert!(whole.starts_with("HTTP/1.1 200"), "{whole}");
        assert_eq!(header(&whole, "accept-ranges"), Some("bytes"));
        assert_eq!(body(&whole), content);
        let lm = header(&whole, "last-modified")
            .expect("Last-Modified")
            .to_owned();

        let head = head_req(addr, "/f.txt").await;
        assert_eq!(header(&head, "content-length"), Some("1000"));
        assert_eq!(header(&head, "last-modified"), Some(lm.as_str()));
        assert_eq!(body(&head), "");

        let part = get(addr, "/f.txt", "Range: bytes=990-\r\n").await;
        assert!(part.starts_with("HTTP/1.1 206"), "{part}");
        assert_eq!(header(&part, "content-range"), Some("bytes 990-999/1000"));
        assert_eq!(header(&part, "content-length"), Some("10"));
        assert_eq!(body(&part), &content[990..]);

        let mid = get(addr, "/f.txt", "Range: bytes=100-199\r\n").await;
        assert_eq!(body(&mid), &content[100..200]);
        let tail = get(addr, "/f.txt", "Range: bytes=-3\r\n").await;
        assert_eq!(body(&tail), &content[997..]);

        let past = get(addr, "/f.txt", "Range: bytes=1000-\r\n").await;
        assert!(past.starts_with("HTTP/1.1 416"), "{past}");
        assert_eq!(header(&past, "content-range"), Some("bytes */1000"));
        assert_eq!(header(&past, "content-type"), None);

        // If-Range with the current date: the part; with another date: the whole file.
        let if_range = format!("Range: bytes=1-2\r\nIf-Range: {lm}\r\n");
        let same = get(addr, "/f.txt", &if_range).await;
        assert!(same.starts_with("HTTP/1.1 206"), "{same}");
        assert_eq!(body(&same), &content[1..3]);
        assert_eq!(header(&same, "content-range"), Some("bytes 1-2/1000"));
        let stale = "Thu, 01 Jan 1970 00:00:00 GMT";
        let other = get(
            addr,
            "/f.txt",
            &format!("Range: bytes=0-0\r\nIf-Range: {stale}\r\n"),
        )
        .await;
        assert!(other.starts_with("HTTP/1.1 200"), "{other}");
        assert_eq!(body(&other), content);

        let kept = get(addr, "/f.txt", &format!("If-Modified-Since: {lm}\r\n")).await;
        assert!(kept.starts_with("HTTP/1.1 304"), "{kept}");
        assert_eq!(body(&kept), "");
        let ranged = format!("If-Modified-Since: {lm}\r\nRange: bytes=0-1\r\n");
        assert!(get(addr, "/f.txt", &ranged)
            .await
            .starts_with("HTTP/1.1 304"));
        // If-None-Match takes precedence: `*` matches any version, no tag matches ours.
        let inm = format!("If-Modified-Since: {lm}\r\nIf-None-Match: \"x\"\r\n");
        assert!(get(addr, "/f.txt", &inm).await.starts_with("HTTP/1.1 200"));
        let any = "If-None-Match: *\r\n";
        assert!(get(addr, "/f.txt", any).await.starts_with("HTTP/1.1 304"));
        let old = get(addr, "/f.txt", &format!("If-Modified-Since: {stale}\r\n")).await;
        assert!(old.starts_with("HTTP/1.1 200"), "{old}");
        stop.cancel();
    }

    #[tokio::test]
    async fn listing_links_every_name_and_stops_at_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let odd = ["a b#1?.txt", "100%.txt", "<b>&.txt"];
        for n in odd {
            std::fs::write(dir.path().join(n), n).unwrap();
        }
        std::fs::create_dir(dir.path().join("sub dir")).unwrap();
        let (addr, stop) = serve_dir(dir.path()).await;
        let list = get(addr, "/", "").await;
        assert!(
            list.contains("<a href=\"/sub%20dir/\">sub dir/</a>"),
            "{list}"
        );
        assert!(list.contains("&lt;b&gt;&amp;.txt</a>"), "{list}");
        // Every link fetches the file it names.
        for n in odd {
            let href = format!("/{}", percent_encode(n.as_bytes()));
            assert!(list.contains(&format!("href=\"{}\"", href.replace('&', "&amp;"))));
            let got = get(addr, &href, "").await;
            assert!(got.starts_with("HTTP/1.1 200"), "{n}: {got}");
            assert_eq!(body(&got), n);
        }

        let big = dir.path().join("big");
        std::fs::create_dir(&big).unwrap();
        // Created last name first: a directory read back in creation order (tmpfs, btrfs)
        // must still list the first names in order.
        for i in (0..MAX_LISTING + 5).rev() {
            std::fs::File::create(big.join(format!("f{i:05}"))).unwrap();
        }
        let list = get(addr, "/big/", "").await;
        assert_eq!(list.matches("<li>").count(), MAX_LISTING);
        // The first names in order, whatever order the directory gave them in.
        assert!(list.contains(">f00000<") && list.contains(&format!(">f{:05}<", MAX_LISTING - 1)));
        assert!(!list.contains(&format!(">f{MAX_LISTING:05}<")));
        assert!(
            list.contains("<p>5 more entries not listed"),
            "{}",
            &list[list.len() - 200..]
        );

        // Links are built from the path, not echoed: `//` and 60 KB of slashes list the root
        // with one-slash links; through a gateway app they carry its stripped prefix.
        for target in ["//".to_owned(), "/".repeat(60_000), "/./".to_owned()] {
            let list = get(addr, &target, "").await;
            assert!(
                list.contains("<a href=\"/sub%20dir/\">"),
                "{}",
                &list[..list.len().min(300)]
            );
            assert!(list.len() < 200_000, "{} bytes", list.len());
        }
        let list = get(addr, "/sub%20dir/", "X-Forwarded-Prefix: /dfs\r\n").await;
        assert!(list.contains("<title>/dfs/sub dir/</title>"), "{list}");
        std::fs::write(dir.path().join("sub dir/x"), "x").unwrap();
        let list = get(addr, "/sub%20dir", "X-Forwarded-Prefix: /dfs\r\n").await;
        assert!(
            list.contains("<a href=\"/dfs/sub%20dir/x\">x</a>"),
            "{list}"
        );
        for bad in ["/a\"b", "//evil.example", "/\\evil.example"] {
            let list = get(
                addr,
                "/sub%20dir",
                &format!("X-Forwarded-Prefix: {bad}\r\n"),
            )
            .await;
            assert!(list.contains("<a href=\"/sub%20dir/x\">x</a>"), "{list}");
        }

        // HEAD answers as GET does, without the body.
        let got = get(addr, "/", "").await;
        let head = head_req(addr, "/").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(
            header(&head, "content-length"),
            Some(body(&got).len().to_string().as_str())
        );
        assert_eq!(body(&head), "");
        stop.cancel();
    }

    #[tokio::test]
    async fn files_dated_outside_http_dates_are_served_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let before_1970 = SystemTime::UNIX_EPOCH - std::time::Duration::from_secs(86_400);
        let f = std::fs::File::create(dir.path().join("old")).unwrap();
        std::io::Write::write_all(&mut &f, b"old").unwrap();
        f.set_modified(before_1970).unwrap();
        drop(f);
        let (addr, stop) = serve_dir(dir.path()).await;
        for extra in ["", "If-Modified-Since: Thu, 01 Jan 2026 00:00:00 GMT\r\n"] {
            let got = get(addr, "/old", extra).await;
            assert!(got.starts_with("HTTP/1.1 200"), "{got}");
            assert_eq!(header(&got, "last-modified"), None);
            assert_eq!(body(&got), "old");
        }
        stop.cancel();
    }

    #[tokio::test]
    async fn an_index_symlinked_outside_is_not_served() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "secret").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("secret"),
            dir.path().join("d/index.html"),
        )
        .unwrap();
        let (addr, stop) = serve_dir(dir.path()).await;
        let got = get(addr, "/d/", "").await;
        assert!(got.starts_with("HTTP/1.1 403"), "{got}");
        assert!(!body(&got).contains("secret"));
        stop.cancel();
    }
}
