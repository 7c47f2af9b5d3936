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

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

fn text(status: StatusCode, msg: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(
            Full::new(Bytes::from(format!("{msg}\n")))
                .map_err(|never| match never {})
                .boxed(),
        )
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

/// The HTML listing of `dir`, which the client asked for as `url_path` (as sent: already
/// percent-encoded, so it is only HTML-escaped here).
async fn listing(dir: &Path, url_path: &str) -> std::io::Result<String> {
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
    let base = if url_path.ends_with('/') {
        url_path.to_owned()
    } else {
        format!("{url_path}/")
    };
    let base = html_escape(&base);
    let mut html =
        format!("<!doctype html><meta charset=utf-8><title>{base}</title><h1>{base}</h1><ul>\n");
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

/// Whether `path` really lies under `root` once symlinks are followed: `resolve` stops `..`,
/// but a symlink inside the directory could still point anywhere (a home directory,
/// /dev/zero). `Err` is the answer to give instead.
async fn inside(root: &Path, path: &Path) -> Result<(), Response<Body>> {
    match tokio::fs::canonicalize(path).await {
        Ok(real) if real.starts_with(root) => Ok(()),
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
    let Some(path) = resolve(&root, &url_path) else {
        return text(StatusCode::BAD_REQUEST, "bad path");
    };
    if let Err(answer) = inside(&root, &path).await {
        return answer;
    }
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
            if let Err(answer) = inside(&root, &index).await {
                return answer;
            }
            return file(&index, head, req.headers()).await;
        }
        return match listing(&path, &url_path).await {
            Ok(html) => Response::builder()
                .header("content-type", "text/html; charset=utf-8")
                .body(if head {
                    empty()
                } else {
                    Full::new(Bytes::from(html))
                        .map_err(|never| match never {})
                        .boxed()
                })
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
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
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
            Some(_) if len == 0 => Ranged::Unsatisfiable,
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

/// Whether a `If-Modified-Since` date covers `modified` (HTTP dates have whole seconds).
fn not_modified(headers: &HeaderMap, modified: Option<SystemTime>) -> bool {
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

async fn file(path: &Path, head: bool, headers: &HeaderMap) -> Response<Body> {
    let mut f = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(_) => return text(StatusCode::FORBIDDEN, "cannot read this file"),
    };
    let meta = f.metadata().await.ok();
    let len = meta.as_ref().map(|m| m.len()).unwrap_or(0);
    let modified = meta.and_then(|m| m.modified().ok());
    let last_modified = modified.map(httpdate::fmt_http_date);
    let ctype = match path.extension().and_then(|e| e.to_str()) {
        Some("html") | Some("htm") => "text/html; charset=utf-8",
        Some("txt") | Some("md") => "text/plain; charset=utf-8",
        Some("json") => "application/json",
        Some("png") => "image/png",
        Some("jpg") | Some("jpeg") => "image/jpeg",
        _ => "application/octet-stream",
    };
    let mut r = Response::builder()
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_TYPE, ctype);
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
    // one validator this service gives); otherwise the whole new file.
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
        assert_eq!(byte_range("bytes=-5", 0), Unsatisfiable);
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

    /// One request over a fresh connection; the whole answer as text (head and body).
    async fn get(addr: SocketAddr, target: &str, extra: &str) -> String {
        use tokio::io::AsyncWriteExt;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(
            format!("GET {target} HTTP/1.1\r\nHost: t\r\n{extra}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
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
        let (addr, stop) = serve_dir(dir.path()).await;

        let whole = get(addr, "/f.txt", "").await;
        assert!(whole.starts_with("HTTP/1.1 200"), "{whole}");
        assert_eq!(header(&whole, "accept-ranges"), Some("bytes"));
        assert_eq!(body(&whole), content);
        let lm = header(&whole, "last-modified")
            .expect("Last-Modified")
            .to_owned();

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

        // If-Range with the current date: the part; with another date: the whole file.
        let same = get(
            addr,
            "/f.txt",
            &format!("Range: bytes=0-0\r\nIf-Range: {lm}\r\n"),
        )
        .await;
        assert!(same.starts_with("HTTP/1.1 206"), "{same}");
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
        for i in 0..MAX_LISTING + 5 {
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
