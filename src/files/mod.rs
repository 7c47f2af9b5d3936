//! A read-only HTTP file service (`zonegate files`): the "file node" of the quick start.
//! GET and HEAD only; files stream from disk, whole or as one byte range (`Range`, so a
//! download resumes and a video seeks); `ETag` and `Last-Modified` with the conditional
//! requests on them let a client keep what it has; directories get a plain HTML listing of
//! at most [`MAX_LISTING`] entries in [`MAX_LISTING_BYTES`]; nothing outside the served
//! directory is ever opened, nor a name starting with `.` unless asked (`--hidden`); the file
//! system is given [`FS_TIMEOUT`] per call; a stop lets answers under way finish for
//! [`STOP_GRACE`].
//!
//! - `names`: request paths to file names and names back to links;
//! - `beneath`: opening beneath the served directory (openat2), reading a directory;
//! - `range`: the `Range` header;
//! - `slow_reader`: cutting a client that takes too little of an answer;
//! - `validate`: validators and conditional requests.

mod beneath;
mod names;
mod range;
mod slow_reader;
pub mod validate;

use std::collections::BinaryHeap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use tunnel::log_budget::LogBudget;

pub use beneath::{Refused, Root, Share};
pub use names::resolve;
pub use range::{byte_range, Ranged};

use beneath::Opened;

/// What the files that can run script in a browser (HTML, SVG, XML) may do when opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pages {
    /// Sandboxed (`Content-Security-Policy: sandbox`): they show, but run no script and
    /// count as no site. A share holds files others wrote (downloads, synced folders, mail
    /// attachments); served plainly, a link to one would run its script as the zone's site,
    /// reading the cookies of every app under that name and calling them as the visitor.
    #[default]
    Sandboxed,
    /// The directory is a web site (`zonegate files --site`): its pages run as the site's.
    Site,
}

/// How a directory is served: `zonegate files`' flags.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub pages: Pages,
    /// Serve and list names starting with `.` (`--hidden`). Off by default: a project or home
    /// directory shared as it is holds `.git/config`, `.env` or `.ssh/`, which its owner did
    /// not mean to publish with the rest.
    pub hidden: bool,
    /// Peers besides loopback whose `X-Forwarded-For` is believed (`--proxy`: a node agent on
    /// another machine).
    pub proxies: Vec<std::net::IpAddr>,
}

/// Whether the URL path names something under a name starting with `.` (a hidden file, or
/// one inside a hidden directory). `..` never reaches here ([`resolve`] refuses it).
fn names_hidden(root: &Path, asked: &Path) -> bool {
    asked
        .strip_prefix(root)
        .unwrap_or(asked)
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(n) => Some(n.as_encoded_bytes()),
            _ => None,
        })
        .enumerate()
        .any(|(depth, n)| is_hidden(n, depth == 0) || is_short_alias(n))
}

/// A name shaped like a DOS 8.3 alias with a numeric tail (`GIT~1`, `ENV~1.TXT`): on FAT
/// (a USB stick, an SD card), NTFS or an SMB share the file system opens the long name it
/// stands for, case-insensitively, and a hidden name's alias drops its dot — `/GIT~1/config`
/// served `.git/config`. Refused like hidden names, and left out of listings with them (a
/// real file named so needs `--hidden`).
fn is_short_alias(name: &[u8]) -> bool {
    // vfat ignores trailing dots in a lookup (`GIT~1..` is `GIT~1`), SMB trailing spaces too.
    let end = name
        .iter()
        .rposition(|&b| b != b'.' && b != b' ')
        .map_or(0, |i| i + 1);
    let name = &name[..end];
    let (base, ext) = match name.iter().rposition(|&b| b == b'.') {
        Some(dot) => (&name[..dot], &name[dot + 1..]),
        None => (name, &b""[..]),
    };
    let Some(tilde) = base.iter().rposition(|&b| b == b'~') else {
        return false;
    };
    let (stem, tail) = (&base[..tilde], &base[tilde + 1..]);
    base.len() <= 8
        && !stem.is_empty()
        && !tail.is_empty()
        && tail.iter().all(u8::is_ascii_digit)
        && ext.len() <= 3
}

/// A name starting with `.`, but `.well-known` at the top (`at_top`; RFC 8615: public by
/// design — a site's `security.txt`, its app links; only the site's own, at its root).
fn is_hidden(name: &[u8], at_top: bool) -> bool {
    name.starts_with(b".") && !(at_top && name == b".well-known")
}

impl Pages {
    /// The header value that confines a file of type `ctype`, if it needs one.
    fn policy(self, ctype: &str) -> Option<&'static str> {
        let active = ctype.starts_with("text/html")
            || ctype.starts_with("image/svg+xml")
            || ctype.starts_with("application/xml");
        (self == Pages::Sandboxed && active).then_some("sandbox")
    }
}
use names::{dir_url, forwarded_prefix, html_escape, percent_decode, percent_encode};

/// The request path's rules for hidden names and for links, as the service applies them, for
/// the `file_request` fuzz target.
#[doc(hidden)]
pub mod fuzzing {
    use std::path::Path;

    use hyper::header::{HeaderMap, HeaderValue};

    /// Whether a request for `asked` (as [`super::resolve`] gave it under `root`) is refused
    /// as hidden when the service runs without `--hidden`.
    pub fn refused_as_hidden(root: &Path, asked: &Path) -> bool {
        super::names_hidden(root, asked)
    }

    /// The URL of the directory `rel` (under the root), as a listing's base and a redirect
    /// to it give it, behind the `X-Forwarded-Prefix` value `prefix`; with the length of the
    /// prefix it kept (what the gateway strips before the request reaches the service).
    pub fn dir_link(prefix: &[u8], rel: &Path) -> (String, usize) {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_bytes(prefix) {
            h.insert("x-forwarded-prefix", v);
        }
        let kept = super::forwarded_prefix(&h);
        (super::dir_url(kept, rel), kept.trim_end_matches('/').len())
    }

    /// A listed name's link, relative to its directory's URL.
    pub fn name_link(name: &[u8]) -> String {
        super::percent_encode(name)
    }
}
use validate::{Validators, Verdict};

/// Entries a directory listing shows at most. A directory of a million files must not become
/// a response (and names held in memory) of a hundred megabytes; the rest are counted, not held.
pub const MAX_LISTING: usize = 10_000;
/// Bytes of a listing's entries (with the page's head) at most, past which they are counted,
/// not shown: names that escape long (255 bytes of `&` are ~2 KB as a link) made 10,000
/// entries a page of 20 MB, held in memory for as long as a slow client took to read it.
pub const MAX_LISTING_BYTES: usize = 1 << 20;
/// Listings built at once at most: each holds up to [`MAX_LISTING`] names (some 3 MB) while
/// it is built, and 256 clients asking for a large directory at once took a gigabyte, more
/// than a small node has. Past this a listing is answered 503, to be asked again.
const MAX_LISTINGS_BUILT: usize = 16;

/// The listings a service is building now, at most `max`.
#[derive(Debug)]
struct Listings {
    built: std::sync::atomic::AtomicUsize,
    max: usize,
}

/// One of a service's [`Listings`] being built, given back on drop.
struct ListingSlot(Arc<Listings>);

impl Listings {
    fn new(max: usize) -> Arc<Listings> {
        Arc::new(Listings {
            built: std::sync::atomic::AtomicUsize::new(0),
            max,
        })
    }

    /// A slot for one more listing, if fewer than `max` are being built.
    fn take(self: &Arc<Self>) -> Option<ListingSlot> {
        use std::sync::atomic::Ordering;
        self.built
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| ListingSlot(self.clone()))
    }
}

impl Drop for ListingSlot {
    fn drop(&mut self) {
        self.0
            .built
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

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

/// The HTML listing of the opened directory `dir`, whose URL path is `url` (from
/// [`names::dir_url`]); names starting with `.` only if `hidden`. Stops reading past
/// `deadline` (an error): by then the request has been answered [`stuck`], and a huge or slow
/// directory read on would keep its blocking thread and its client's share. Blocking.
fn listing(
    dir: &std::fs::File,
    url: &str,
    (hidden, at_root): (bool, bool),
    deadline: std::time::Instant,
) -> std::io::Result<String> {
    use std::ops::ControlFlow;
    // The first MAX_LISTING names in sorted order, whatever order the directory yields them
    // in: a max-heap that drops its largest past the cap.
    let mut heap: BinaryHeap<(Vec<u8>, bool)> = BinaryHeap::new();
    let mut left_out = 0usize;
    let mut read = 0u32;
    beneath::read_names(dir, |name, is_dir| {
        // The clock now and then: a name is read in well under a microsecond.
        read = read.wrapping_add(1);
        if read.is_multiple_of(1024) && std::time::Instant::now() >= deadline {
            return ControlFlow::Break(());
        }
        if !hidden && (is_hidden(name, at_root) || is_short_alias(name)) {
            return ControlFlow::Continue(());
        }
        if heap.len() == MAX_LISTING {
            left_out += 1;
            if heap.peek().is_some_and(|(last, _)| last.as_slice() <= name) {
                return ControlFlow::Continue(());
            }
            heap.pop();
        }
        heap.push((name.to_vec(), is_dir()));
        ControlFlow::Continue(())
    })?;
    if std::time::Instant::now() >= deadline {
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the listing took longer than the file system's time per request",
        ));
    }
    let names = heap.into_sorted_vec();
    let base = html_escape(url);
    let title = html_escape(&String::from_utf8_lossy(
        &percent_decode(url).unwrap_or_default(),
    ));
    // The directory's URL once, as the base of every link: repeated in each of up to
    // MAX_LISTING links, a long URL (a 1 KiB `X-Forwarded-Prefix` of `&`, 5 KiB escaped)
    // made a listing of 50 MB from one small request. `./`: a name with a `:` is not a scheme.
    let mut html = format!(
        "<!doctype html><meta charset=utf-8><base href=\"{base}\"><title>{title}</title><h1>{title}</h1><ul>\n"
    );
    for (shown, (name, is_dir)) in names.iter().enumerate() {
        let slash = if *is_dir { "/" } else { "" };
        let line = format!(
            "<li><a href=\"./{}{slash}\">{}{slash}</a></li>\n",
            percent_encode(name),
            html_escape(&String::from_utf8_lossy(name)),
        );
        if html.len() + line.len() > MAX_LISTING_BYTES {
            left_out += names.len() - shown;
            break;
        }
        html.push_str(&line);
    }
    html.push_str("</ul>\n");
    if left_out > 0 {
        html.push_str(&format!(
            "<p>{left_out} more entries not listed: a listing shows at most {MAX_LISTING}, in at most {} KiB.</p>\n",
            MAX_LISTING_BYTES / 1024
        ));
    }
    Ok(html)
}

/// What a request names, opened beneath the root; for a directory with an `index.html` that
/// is a file, the index instead. `slash`: the URL path ends with `/`, which only a directory's
/// does (without it, relative links in its page would resolve one level up). Unless `hidden`,
/// what a symlink leads to must not be hidden either: `pub/cfg -> ../.git` served `.git/config`
/// as `/pub/cfg/config`, and the request's own names said nothing of it. Blocking.
fn open_target(root: &Root, asked: &Path, slash: bool, hidden: bool) -> Result<Target, Refused> {
    let shown = |o: &Opened| hidden || !names_hidden(root.path(), &o.path);
    let opened = root.open_beneath(asked)?;
    if !shown(&opened) {
        return Err(Refused::NotFound);
    }
    if !opened.meta.is_dir() {
        // `/f.txt/` names a directory `f.txt`, which is not there.
        if slash {
            return Err(Refused::NotFound);
        }
        return Ok(Target::File(opened));
    }
    if !slash {
        let rel = asked.strip_prefix(root.path()).unwrap_or(Path::new(""));
        return Ok(Target::Slash(rel.to_path_buf()));
    }
    // The index may be a symlink too: skipped if it leads outside, is not a file or is not
    // there — the same listing either way, so the answer tells nothing of what exists
    // outside the share.
    match root.open_beneath(&asked.join("index.html")) {
        Ok(index) if index.meta.is_file() && shown(&index) => Ok(Target::File(index)),
        // There but not opened (its mode, out of descriptors): why, not the listing the page
        // stood in front of — an index left unreadable by an upload listed every file beside it.
        Err(Refused::Unreadable(e)) if !gone(&e) => Err(Refused::Unreadable(e)),
        _ => {
            let rel = asked.strip_prefix(root.path()).unwrap_or(Path::new(""));
            Ok(Target::Dir(opened, rel.to_path_buf()))
        }
    }
}

enum Target {
    File(Opened),
    /// A directory, with its path relative to the root as asked (for its URL).
    Dir(Opened, PathBuf),
    /// A directory asked for without its trailing slash: redirected to its URL.
    Slash(PathBuf),
}

/// Answers one request; `hold` (the client's share of answers in flight) is kept by the
/// file system calls too, for as long as they run: past [`FS_TIMEOUT`] the answer is sent,
/// but a call stuck in a hung mount still counts against its client.
async fn handle(
    share: Arc<Share>,
    opts: Arc<Options>,
    req: Request<hyper::body::Incoming>,
    hold: Arc<InFlightSlot>,
) -> Response<Body> {
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
    // Resolved under the directory as last looked up; looked up again (blocking) below.
    let root = share.last();
    let Some(asked) = resolve(root.path(), req.uri().path()) else {
        return text(
            StatusCode::BAD_REQUEST,
            "bad path: it has a `..` part, a NUL, a malformed %-escape or a `;` (write a name's `;` as %3B)",
        );
    };
    // As a name that is not there: the answer tells nothing of what the share holds.
    if !opts.hidden && names_hidden(root.path(), &asked) {
        return text(StatusCode::NOT_FOUND, "not found");
    }
    let (pages, hidden) = (opts.pages, opts.hidden);
    let prefix = forwarded_prefix(req.headers()).to_owned();
    let slash = req.uri().path().ends_with('/');
    // Resolving, opening and listing are file system calls: on a blocking thread, and given
    // up on past FS_TIMEOUT (see there).
    if STUCK.load(std::sync::atomic::Ordering::Relaxed) >= MAX_STUCK {
        return stuck();
    }
    let held = hold.clone();
    let listings = hold.table.listings.clone();
    let deadline = std::time::Instant::now() + FS_TIMEOUT;
    let found = blocking_within(FS_TIMEOUT, move || -> Result<Found, Refused> {
        let _hold = held;
        let now = share.now().map_err(Refused::Unreadable)?;
        // The path now names another directory (mounted, swapped in): the same path in it.
        let asked = match asked.strip_prefix(root.path()) {
            Ok(rel) if now.path() != root.path() => now.path().join(rel),
            _ => asked,
        };
        let root = now;
        Ok(match open_target(&root, &asked, slash, hidden)? {
            Target::File(f) => Found::File(f),
            Target::Dir(dir, rel) => match listings.take() {
                Some(_building) => Found::Listing(
                    listing(
                        &dir.file,
                        &dir_url(&prefix, &rel),
                        (hidden, rel.as_os_str().is_empty()),
                        deadline,
                    )
                    .map_err(Refused::Unreadable)?,
                ),
                None => Found::ListingsBusy,
            },
            // Built from the path's parts, not the request's text: `//host` must not become
            // a redirect to another site.
            Target::Slash(rel) => Found::Redirect(dir_url(&prefix, &rel)),
        })
    })
    .await;
    let Some(found) = found else {
        return stuck();
    };
    match found {
        Ok(Ok(Found::File(f))) => file(f, head, req.headers(), pages, hold).await,
        Ok(Ok(Found::Redirect(mut to))) => {
            if let Some(q) = req.uri().query() {
                to.push('?');
                to.push_str(q);
            }
            match HeaderValue::from_str(&to) {
                Ok(v) => {
                    let mut r = text(
                        StatusCode::PERMANENT_REDIRECT,
                        "a directory: its URL ends with /",
                    );
                    r.headers_mut().insert(header::LOCATION, v);
                    // Browsers keep a 308 for good unless told: a directory later replaced by
                    // a file of its name would stay redirected to a 404.
                    r.headers_mut()
                        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                    r
                }
                Err(_) => text(
                    StatusCode::BAD_REQUEST,
                    "bad path: no redirect to its directory can be made of it",
                ),
            }
        }
        Ok(Ok(Found::ListingsBusy)) => {
            let mut r = text(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many directory listings are being built at once; try again in a moment",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        Ok(Ok(Found::Listing(html))) => {
            // A listing has no validators (no tag, no date), and its preconditions are
            // answered all the same (RFC 9110 §13.1): an `If-Match` naming a tag fails,
            // `If-None-Match: *` is a 304.
            let none = Validators {
                etag: None,
                modified: None,
                changed: None,
            };
            let status = match validate::evaluate(req.headers(), &none) {
                Verdict::NotModified => StatusCode::NOT_MODIFIED,
                Verdict::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
                Verdict::Serve { .. } => StatusCode::OK,
            };
            let r = Response::builder().status(status);
            if status != StatusCode::OK {
                return r.body(empty()).expect("valid response");
            }
            r.header("content-type", "text/html; charset=utf-8")
                .header(header::CONTENT_LENGTH, html.len())
                .body(if head { empty() } else { full(html) })
                .expect("valid response")
        }
        // Outside: the same answer as a path that is not there, or a link leading out would
        // tell which files exist beyond the shared directory.
        Ok(Err(Refused::NotFound | Refused::Outside)) => text(StatusCode::NOT_FOUND, "not found"),
        Ok(Err(Refused::Unreadable(e))) => unreadable(&e),
        Err(e) => {
            error!(error = %e, "file task failed");
            text(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
        }
    }
}

/// How long the file system may take over one call of a request (resolving, opening and
/// listing together; a seek; one read of a download). A symlink in the share leading to a hung
/// network mount blocks `stat` for ever, and the request with it held its connection slot for
/// ever. Past this the request is answered [`stuck`] (or its download cut), freeing the slot;
/// the blocking thread itself stays stuck in the kernel until the mount answers, which nothing
/// in user space can end.
const FS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// File system calls past [`FS_TIMEOUT`] and still running (stuck in a hung mount), each
/// holding one of tokio's blocking threads (512): past [`MAX_STUCK`] of them, requests are
/// answered 504 at once instead of taking more, so the threads the service's other work
/// needs are never all stuck.
static STUCK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
const MAX_STUCK: usize = 128;

/// `work` on a blocking thread, or None once it has taken `limit`: the request is answered
/// then, while the thread stays stuck in its call (see [`FS_TIMEOUT`]), counted in [`STUCK`]
/// until it returns — as it is when the request is dropped first (its client hung up).
async fn blocking_within<T: Send + 'static>(
    limit: std::time::Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Option<Result<T, tokio::task::JoinError>> {
    let mut call = BlockingCall(Some(tokio::task::spawn_blocking(work)));
    let task = call.0.as_mut()?;
    let r = tokio::time::timeout(limit, task).await.ok();
    if r.is_some() {
        call.0 = None;
    }
    r
}

/// A blocking call's handle: dropped while the call still runs (timed out, or its request
/// dropped), the call is counted in [`STUCK`] until it returns.
struct BlockingCall<T: Send + 'static>(Option<tokio::task::JoinHandle<T>>);

impl<T: Send + 'static> Drop for BlockingCall<T> {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(task) = self.0.take().filter(|t| !t.is_finished()) else {
            return;
        };
        // No runtime (the process ending): nothing left to protect.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        STUCK.fetch_add(1, Relaxed);
        rt.spawn(async move {
            let _ = task.await;
            STUCK.fetch_sub(1, Relaxed);
        });
    }
}

/// Warnings of a file system that did not answer in time, a line a second at most: while a
/// mount hangs, every request that touches it says so.
static STUCK_LINES: std::sync::LazyLock<std::sync::Mutex<LogBudget>> =
    std::sync::LazyLock::new(|| std::sync::Mutex::new(LogBudget::new(1)));

/// Says at warn that the file system did not answer within [`FS_TIMEOUT`] (`what` did not):
/// the share's owner has a mount to look at.
fn warn_stuck(what: &str) {
    if let Some(unlogged) = LogBudget::take_shared(&STUCK_LINES) {
        warn!(
            unlogged,
            "{what}: the file system did not answer within {} s (a hung network mount a symlink in the share leads to?); check the share's mounts",
            FS_TIMEOUT.as_secs()
        );
    }
}

/// The answer when the file system did not answer within [`FS_TIMEOUT`].
fn stuck() -> Response<Body> {
    warn_stuck("a request was answered 504");
    text(
        StatusCode::GATEWAY_TIMEOUT,
        "the file system holding this file did not answer in time; try again later",
    )
}

/// Whether an open failed because the name went away between the check and the open
/// (deleted, or a part of its path swapped for a symlink).
fn gone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)
    )
}

/// The answer for a file or directory that could not be opened, by why: out of descriptors
/// or memory is this service's trouble (503, said at warn: every request fails alike), gone
/// meanwhile is not found (deleted, or a link swapped, between the path's check and its
/// open), anything else the reader may not have (403).
fn unreadable(e: &std::io::Error) -> Response<Body> {
    // The listing's own deadline (no OS error: a network file system's ETIMEDOUT has one).
    if e.kind() == std::io::ErrorKind::TimedOut && e.raw_os_error().is_none() {
        warn!(error = %e, "a directory too large (or too slow) to list in time was asked for; split it into smaller ones");
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "this directory is too large to list in time; its owner could split it into smaller ones",
        );
    }
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM) => {
            warn!(error = %e, "cannot open a file: out of open files or memory; allow more (ulimit -n, LimitNOFILE=)");
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the file service is out of resources; try again",
            )
        }
        _ if gone(e) => text(StatusCode::NOT_FOUND, "not found"),
        _ => {
            debug!(error = %e, "cannot open");
            text(StatusCode::FORBIDDEN, "cannot read this file or directory")
        }
    }
}

/// What a request finds: a file to serve, a directory's listing, or where the directory is.
enum Found {
    File(Opened),
    Listing(String),
    /// A listing, with [`MAX_LISTINGS_BUILT`] being built already.
    ListingsBusy,
    Redirect(String),
}

/// The answer for an opened file: whole, a part, or a conditional answer (304, 412, 416).
async fn file(
    opened: Opened,
    head: bool,
    headers: &HeaderMap,
    pages: Pages,
    hold: Arc<InFlightSlot>,
) -> Response<Body> {
    let Opened { file, meta, path } = opened;
    if !meta.is_file() {
        return text(StatusCode::FORBIDDEN, "not a regular file");
    }
    let len = meta.len();
    let validators = Validators::of(&meta, SystemTime::now());
    let ctype = content_type(&path);
    // `no-cache`: kept, but asked about again each time (a 304 when unchanged). Without it,
    // browsers reuse a file for a tenth of its age unasked — a report replaced after 100
    // days was served stale for 10.
    let mut r = Response::builder()
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CACHE_CONTROL, "no-cache");
    if let Some(h) = r.headers_mut() {
        validators.write(h);
    }
    if let Some(csp) = pages.policy(ctype) {
        r = r.header(header::CONTENT_SECURITY_POLICY, csp);
    }
    let range_ok = match validate::evaluate(headers, &validators) {
        Verdict::NotModified => {
            return r
                .status(StatusCode::NOT_MODIFIED)
                .body(empty())
                .expect("valid response")
        }
        Verdict::PreconditionFailed => {
            return r
                .status(StatusCode::PRECONDITION_FAILED)
                .body(empty())
                .expect("valid response")
        }
        Verdict::Serve { range } => range,
    };
    // A part only of the version the client already holds (`If-Range`); otherwise the whole.
    // HEAD answers as GET would without a range (RFC 9110 §14.2: only GET has ranges).
    let ranged = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .filter(|_| range_ok && !head)
        .map_or(Ranged::Whole, |v| byte_range(v, len));
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
        // Streamed from disk: memory stays flat for any file size. Sent with a strong tag, the
        // bytes must be that version's: a file rewritten in place while it was sent (same
        // inode and length, `cp new old`) gave old bytes, then new, under the old tag, and a
        // client kept the mix as that version. The file is looked at again before its last
        // chunk goes; rewritten ([`rewritten`]), the download fails (the connection is cut, as
        // for a file that got shorter) and the client asks again.
        let (end, tagged) = (start + count, validators.etag.is_some());
        let read = move |at: u64, buf: &mut [u8]| {
            let n = std::os::unix::fs::FileExt::read_at(&file, buf, at)?;
            if tagged && at + n as u64 == end && rewritten(&meta, &file.metadata()?) {
                return Err(std::io::Error::other("the file changed while being sent"));
            }
            Ok(n)
        };
        let stream = file_reads(read, start, count, hold, FS_TIMEOUT);
        BodyExt::boxed(StreamBody::new(stream.map_ok(Frame::data)))
    };
    r.status(status)
        .header(header::CONTENT_TYPE, ctype)
        // The type goes by the name's extension: a browser must not read a file named
        // `notes.bin` as the HTML (and script) it may hold.
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::CONTENT_LENGTH, count)
        .body(body)
        .expect("valid response")
}

/// Whether the opened file, looked at again (`now`), was rewritten since it was `was`: its
/// times or length changed, and not by growing (a log appended to while it is sent keeps the
/// bytes sent, which are that version's; cutting it would fail every long download of a file
/// that grows now and then). A rewrite that also makes the file longer looks like growth and
/// is not told.
///
/// The change time alone counts (a writer that set the modification time back leaves only
/// it) unless the file's link count changed with it: the file was renamed over (a deploy
/// moving `site.new` to `site`), deleted or hard-linked (a backup's `cp -al`), which leave its
/// bytes as they were; cut, a complete download of them failed at its last chunk.
fn rewritten(was: &std::fs::Metadata, now: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    let modified = |m: &std::fs::Metadata| (m.mtime(), m.mtime_nsec());
    let changed = |m: &std::fs::Metadata| (m.ctime(), m.ctime_nsec());
    now.ino() != was.ino()
        || now.len() < was.len()
        || (now.len() == was.len()
            && (modified(now) != modified(was)
                || (changed(now) != changed(was) && now.nlink() == was.nlink())))
}

/// How much one read of a download asks for.
const READ_CHUNK: usize = 64 * 1024;

/// `count` bytes from `start`, read by `read` (`pread` on the file) a chunk at a time, each on
/// a blocking thread given up on past `limit` ([`FS_TIMEOUT`]) like every other file system
/// call: a read stuck in a hung mount ends the download in a `TimedOut` error (hyper then cuts
/// the connection; the length was promised), is counted in [`STUCK`] until it returns, and
/// keeps `hold` (the client's answer slot) till then, so a client retrying a stuck download
/// cannot tie up the blocking threads past its share. Before, tokio's file reads ran outside
/// that count: 64 retries at a time every 30 s could take all 512 threads. A file that got
/// shorter than promised ends in an `UnexpectedEof` error.
fn file_reads<H: Send + Sync + 'static>(
    read: impl Fn(u64, &mut [u8]) -> std::io::Result<usize> + Send + Sync + 'static,
    start: u64,
    count: u64,
    hold: Arc<H>,
    limit: std::time::Duration,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + Sync + 'static {
    use std::io::{Error, ErrorKind};
    let read = Arc::new(read);
    futures_util::stream::unfold(Some((start, count)), move |state| {
        let (read, hold) = (read.clone(), hold.clone());
        async move {
            let (at, left) = state?;
            if left == 0 {
                return None;
            }
            if STUCK.load(std::sync::atomic::Ordering::Relaxed) >= MAX_STUCK {
                warn_stuck("a download was cut");
                let e = Error::new(ErrorKind::TimedOut, "the file system is not answering");
                return Some((Err(e), None));
            }
            let want = usize::try_from(left).unwrap_or(usize::MAX).min(READ_CHUNK);
            let got = blocking_within(limit, move || {
                let _hold = hold;
                let mut buf = vec![0; want];
                let n = read(at, &mut buf)?;
                buf.truncate(n);
                Ok::<_, Error>(buf)
            })
            .await;
            let buf = match got {
                None => {
                    warn_stuck("a download was cut");
                    Err(Error::new(ErrorKind::TimedOut, "file read timed out"))
                }
                Some(Err(join)) => Err(Error::other(join)),
                Some(Ok(Err(e))) => Err(e),
                Some(Ok(Ok(buf))) if buf.is_empty() => Err(Error::new(
                    ErrorKind::UnexpectedEof,
                    "the file got shorter while being sent",
                )),
                Some(Ok(Ok(buf))) => Ok(buf),
            };
            Some(match buf {
                Ok(buf) => {
                    let n = buf.len() as u64;
                    (Ok(Bytes::from(buf)), Some((at + n, left - n)))
                }
                Err(e) => (Err(e), None),
            })
        }
    })
}

/// The type a file is served as, by its name's extension (case aside). Served with
/// `nosniff`, so a browser takes it at its word: a script or style sheet of a static site
/// under any other type is refused.
fn content_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("txt" | "md" | "log" | "conf" | "toml" | "yaml" | "yml" | "ini") => {
            "text/plain; charset=utf-8"
        }
        Some("css") => "text/css; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("json" | "map") => "application/json",
        Some("xml") => "application/xml",
        Some("csv") => "text/csv; charset=utf-8",
        Some("wasm") => "application/wasm",
        Some("pdf") => "application/pdf",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("avif") => "image/avif",
        Some("svg") => "image/svg+xml",
        Some("ico") => "image/x-icon",
        Some("mp4" | "m4v") => "video/mp4",
        Some("webm") => "video/webm",
        Some("mp3") => "audio/mpeg",
        Some("ogg" | "oga") => "audio/ogg",
        Some("flac") => "audio/flac",
        Some("wav") => "audio/wav",
        Some("woff") => "font/woff",
        Some("woff2") => "font/woff2",
        Some("zip") => "application/zip",
        Some("gz") => "application/gzip",
        _ => "application/octet-stream",
    }
}

/// Time a client has to send a request's headers (hyper's default, which it applies only
/// with a timer).
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Connections served at once (as many more may wait [`SLOT_WAIT`] for room).
pub const MAX_CONNECTIONS: usize = 256;
/// How long a connection waits for room before it is closed.
const SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Answers being sent at once to each client: through the tunnel every request comes from the
/// node's loopback, so the connection slots have no client to share them out by; this does,
/// by the address the gateway forwarded for. One client reading 256 downloads at 1 KiB/s each
/// held every slot; now it holds a quarter of them, and its next request is answered 503.
struct InFlight {
    per: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    most: usize,
    /// IPv6 sites' (/48s') answers in flight, all their /64s together, at most `site_most`: a
    /// home is often given a /56 or a /48, and four of its /64s took every answer slot.
    sites: std::sync::Mutex<std::collections::HashMap<std::net::Ipv6Addr, usize>>,
    site_most: usize,
    /// The service's listings being built (of all clients).
    listings: Arc<Listings>,
}

/// One answer of a client in flight: dropped with the answer's body.
struct InFlightSlot {
    table: Arc<InFlight>,
    ip: std::net::IpAddr,
    site: Option<std::net::Ipv6Addr>,
}

impl InFlight {
    /// A slot for an answer to `client` (any address: counted by [`counted_as`] and, for
    /// IPv6, by its /48), unless that client or its site has its most in flight already.
    fn take(table: &Arc<Self>, client: std::net::IpAddr) -> Option<InFlightSlot> {
        let (ip, site) = (counted_as(client), site_of(client));
        // Sites before clients, both held to the end: the same order everywhere.
        let mut sites = table.sites.lock().unwrap_or_else(|p| p.into_inner());
        let mut per = table.per.lock().unwrap_or_else(|p| p.into_inner());
        if site.is_some_and(|s| sites.get(&s).copied().unwrap_or(0) >= table.site_most) {
            return None;
        }
        let n = per.entry(ip).or_default();
        if *n >= table.most {
            return None;
        }
        *n += 1;
        if let Some(s) = site {
            *sites.entry(s).or_default() += 1;
        }
        Some(InFlightSlot {
            table: table.clone(),
            ip,
            site,
        })
    }
}

/// Takes one from `key`'s count in `map`, forgetting the key at zero.
fn count_down<K: std::hash::Hash + Eq>(map: &mut std::collections::HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl Drop for InFlightSlot {
    fn drop(&mut self) {
        let mut sites = self.table.sites.lock().unwrap_or_else(|p| p.into_inner());
        let mut per = self.table.per.lock().unwrap_or_else(|p| p.into_inner());
        count_down(&mut per, &self.ip);
        if let Some(s) = &self.site {
            count_down(&mut sites, s);
        }
    }
}

/// What a request's one log line says of it, written as its answer's body ends ([`Logged`]).
struct Line {
    peer: SocketAddr,
    forwarded_for: String,
    method: String,
    path: String,
    status: u16,
    started: std::time::Instant,
}

/// An answer's body that writes its request's line as it ends, with the bytes passed to the
/// connection, the time taken and how it ended: the line was written with the head, before the
/// first byte, and a download cut by a failing disk (EIO), a file that shrank or a client that
/// left read as a 200 (the body's error went to hyper, logged at debug without a path). hyper
/// takes up to ~400 KB ahead of the socket, so an answer that small counts as passed on whole
/// even if its client then leaves. It also holds its client's [`InFlightSlot`] until it ends
/// or is dropped unsent. Not `map_frame`: that hides the body's size, and hyper then sends even
/// a short text answer chunked, which an HTTP/1.0 client can only read to the connection's
/// close.
struct Logged {
    body: Body,
    _slot: Option<Arc<InFlightSlot>>,
    line: Line,
    sent: u64,
    /// The answer's length when known (its `Content-Length`): hyper stops polling the body
    /// once that much is sent, and reads no end.
    length: Option<u64>,
    /// `Some(None)` once the body ended whole, `Some(Some(error))` once it failed.
    end: Option<Option<String>>,
}

impl hyper::body::Body for Logged {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        let r = hyper::body::Body::poll_frame(std::pin::Pin::new(&mut this.body), cx);
        match &r {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                this.sent += frame.data_ref().map_or(0, |d| d.len() as u64);
            }
            std::task::Poll::Ready(Some(Err(e))) => this.end = Some(Some(e.to_string())),
            std::task::Poll::Ready(None) => this.end = Some(None),
            std::task::Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        hyper::body::Body::is_end_stream(&self.body)
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::Body::size_hint(&self.body)
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let l = &self.line;
        let ms = l.started.elapsed().as_millis() as u64;
        // hyper stops polling a body of a known length once that much is sent (no end is
        // read), and a HEAD's body it never polls: those are whole.
        let whole = self.end.is_some()
            || self.line.method == "HEAD"
            || hyper::body::Body::is_end_stream(&self.body)
            || self.length == Some(self.sent);
        match (&self.end, whole) {
            (Some(Some(error)), _) => {
                warn!(client = %l.peer, forwarded_for = %l.forwarded_for, method = %l.method, path = %l.path, status = l.status, bytes = self.sent, ms, %error, "file request failed part way")
            }
            (_, true) => {
                info!(client = %l.peer, forwarded_for = %l.forwarded_for, method = %l.method, path = %l.path, status = l.status, bytes = self.sent, ms, "file request")
            }
            // The client left, or was cut (reading too slowly, the stop's grace over).
            (_, false) => {
                info!(client = %l.peer, forwarded_for = %l.forwarded_for, method = %l.method, path = %l.path, status = l.status, bytes = self.sent, ms, "file request cut before the answer's end")
            }
        }
    }
}

/// Serves `root` read-only on `listener` as `opts` says until `shutdown`, then lets the
/// answers under way finish for [`STOP_GRACE`].
pub async fn serve(
    listener: TcpListener,
    share: Share,
    opts: Options,
    shutdown: CancellationToken,
) {
    serve_at_most(listener, share, opts, MAX_CONNECTIONS, shutdown).await
}

/// How long a stopping service lets the answers under way finish (a download, a listing)
/// before it cuts them: the node agent's drain default, so a restart does not truncate what
/// the agent's drain let finish.
pub const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// [`serve`], with at most `most` connections served at once.
async fn serve_at_most(
    listener: TcpListener,
    share: Share,
    mut opts: Options,
    most: usize,
    shutdown: CancellationToken,
) {
    let share = Arc::new(share);
    for ip in &mut opts.proxies {
        *ip = ip.to_canonical();
    }
    let opts = Arc::new(opts);
    if let Ok(a) = listener.local_addr() {
        let pages = match opts.pages {
            Pages::Sandboxed => "sandboxed",
            Pages::Site => "site",
        };
        info!(addr = %a, dir = %share.last().path().display(), pages, hidden = opts.hidden, "read-only file service listening");
    }
    // Every connection served holds a task and may hold an open file or a listing (a client
    // through the tunnel comes from the node's loopback: there is no client address to share
    // them out by). As many again may wait, for SLOT_WAIT: a burst (a gallery of thumbnails
    // over HTTP/2, a gateway's pool) is served late rather than refused; past that, closed.
    let served = Arc::new(tokio::sync::Semaphore::new(most));
    let admitted = Arc::new(tokio::sync::Semaphore::new(2 * most));
    let lines = Arc::new(std::sync::Mutex::new(LogBudget::new(10)));
    let in_flight = Arc::new(InFlight {
        per: Default::default(),
        most: (most / 4).max(1),
        sites: Default::default(),
        site_most: (most / 2).max(1),
        listings: Listings::new(MAX_LISTINGS_BUILT),
    });
    let tasks = tokio_util::task::TaskTracker::new();
    // Fired when the grace is over: the answers still under way are cut.
    let cut = CancellationToken::new();
    while let Some((tcp, peer)) = tunnel::sockets::accept_until(&listener, &shutdown).await {
        let Ok(admit) = admitted.clone().try_acquire_owned() else {
            if let Some(unlogged) = LogBudget::take_shared(&lines) {
                info!(client = %peer, most, unlogged, "file connection refused: the service is full (as many more waiting)");
            }
            continue;
        };
        let (share, served, lines, in_flight, opts, shutdown, cut) = (
            share.clone(),
            served.clone(),
            lines.clone(),
            in_flight.clone(),
            opts.clone(),
            shutdown.clone(),
            cut.clone(),
        );
        tasks.spawn(async move {
            let _admit = admit;
            let slot = tokio::select! {
                s = tokio::time::timeout(SLOT_WAIT, served.acquire_owned()) => s,
                // Not served yet: nothing under way to finish.
                _ = shutdown.cancelled() => return,
            };
            let Ok(Ok(_slot)) = slot else {
                if let Some(unlogged) = LogBudget::take_shared(&lines) {
                    info!(client = %peer, most, unlogged, "file connection closed: no room for it within {} s", SLOT_WAIT.as_secs());
                }
                return;
            };
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (share, in_flight, opts) = (share.clone(), in_flight.clone(), opts.clone());
                async move {
                    let started = std::time::Instant::now();
                    let (m, p) = (req.method().clone(), req.uri().path().to_owned());
                    let forwarded_for = believed_forwarded_for(peer, &opts.proxies, req.headers());
                    let client = forwarded_for.unwrap_or(peer.ip());
                    let (r, slot) = match InFlight::take(&in_flight, client) {
                        // Held by the body: until the answer is sent, or dropped unsent.
                        Some(slot) => {
                            let slot = Arc::new(slot);
                            (handle(share, opts, req, slot.clone()).await, Some(slot))
                        }
                        None => (text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "too many answers to your address at once (or file system calls of yours stuck in a mount that does not answer): finish some first",
                        ), None),
                    };
                    let path = gateway::http::proxy::loggable(&p);
                    let method = gateway::http::proxy::loggable_method(&m);
                    // `forwarded_for`: only as believed (from loopback or a `--proxy`), so a log reader
                    // never takes a remote client's own header for its address.
                    let forwarded_for =
                        forwarded_for.map_or_else(|| "-".to_owned(), |ip| ip.to_string());
                    let status = r.status().as_u16();
                    let line = Line {
                        peer,
                        forwarded_for,
                        method: method.into_owned(),
                        path: path.into_owned(),
                        status,
                        started,
                    };
                    // As the head says it: hyper stops polling a body once that much is sent.
                    let length = r
                        .headers()
                        .get(header::CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok()?.parse().ok())
                        .or_else(|| hyper::body::Body::size_hint(r.body()).exact());
                    Ok::<_, Infallible>(r.map(|body| Logged {
                        body,
                        _slot: slot,
                        line,
                        sent: 0,
                        length,
                        end: None,
                    }))
                }
            });
            let io = hyper_util::rt::TokioIo::new(slow_reader::SlowReaderCut::tcp(tcp));
            // A timer, or hyper leaves its 30 s limit on a request's headers unset and a
            // client sending half a request holds its connection for ever.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(io, svc);
            tokio::pin!(conn);
            let r = tokio::select! {
                r = conn.as_mut() => r,
                // The answer under way finishes, then the connection closes (at once if idle).
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    tokio::select! {
                        r = conn => r,
                        _ = cut.cancelled() => return,
                    }
                }
            };
            if let Err(e) = r {
                debug!(error = %e, "file connection ended");
            }
        });
    }
    // Not accepting any more: a client dialing now is refused at once rather than left
    // connected, unanswered, for the grace.
    drop(listener);
    tasks.close();
    if !tasks.is_empty() {
        info!(
            connections = tasks.len(),
            grace_secs = STOP_GRACE.as_secs(),
            "file service stopping: answers under way may finish"
        );
        if tokio::time::timeout(STOP_GRACE, tasks.wait())
            .await
            .is_err()
        {
            info!(
                connections = tasks.len(),
                "file service stopped: answers still under way were cut"
            );
            cut.cancel();
            tasks.wait().await;
        }
    }
}

/// The client a gateway forwarded the request for (its `X-Forwarded-For`, which the gateway
/// sets to the one address it saw): through the tunnel every request comes from the node's
/// loopback. Believed only from a loopback peer or one of `proxies` (`--proxy`: a node agent
/// on another machine): with `--listen 0.0.0.0` anyone can send the header, and a client
/// naming a new address in each request would never reach its share of the answers in
/// flight. None when not believed, absent or no address.
fn believed_forwarded_for(
    peer: SocketAddr,
    proxies: &[std::net::IpAddr],
    headers: &HeaderMap,
) -> Option<std::net::IpAddr> {
    // A dual-stack listener sees 127.0.0.1 as ::ffff:127.0.0.1, which is_loopback denies.
    let ip = peer.ip().to_canonical();
    if !ip.is_loopback() && !proxies.contains(&ip) {
        return None;
    }
    headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<std::net::IpAddr>().ok())
}

/// The address a client's answers in flight are counted under: an IPv6 client by its /64 (one
/// host is handed a whole /64 and can send from any of its 2^64 addresses, each of which
/// would otherwise get a share of its own), an IPv4-mapped one as the IPv4 address it is.
fn counted_as(client: std::net::IpAddr) -> std::net::IpAddr {
    match client.to_canonical() {
        std::net::IpAddr::V6(v6) => {
            std::net::Ipv6Addr::from(v6.to_bits() & !u128::from(u64::MAX)).into()
        }
        v4 => v4,
    }
}

/// The IPv6 site (/48) a client's answers in flight also count under; none for IPv4.
fn site_of(client: std::net::IpAddr) -> Option<std::net::Ipv6Addr> {
    match client.to_canonical() {
        std::net::IpAddr::V6(v6) => {
            Some(std::net::Ipv6Addr::from(v6.to_bits() & !(u128::MAX >> 48)))
        }
        std::net::IpAddr::V4(_) => None,
    }
}

/// Binds and serves (for `zonegate files`).
pub async fn run(
    share: Share,
    listen: SocketAddr,
    opts: Options,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    // As the gateway's listeners bind: `[::]` dual-stack whatever `bindv6only` says.
    let l = tunnel::sockets::tcp(listen)?;
    serve(l, share, opts, shutdown).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    /// A file renamed over or deleted while sent is the same bytes: not told as rewritten.
    /// Rewritten in place, with its modification time set back to what it was, it is.
    #[test]
    fn a_file_renamed_over_or_deleted_is_not_rewritten() {
        use std::io::Write;
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("site");
        std::fs::write(&path, b"version one").unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let was = file.metadata().unwrap();
        // The change time is the kernel's coarse clock: let it tick.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(d.path().join("site.new"), b"version two").unwrap();
        std::fs::rename(d.path().join("site.new"), &path).unwrap();
        let now = file.metadata().unwrap();
        assert_ne!(
            (now.ctime(), now.ctime_nsec()),
            (was.ctime(), was.ctime_nsec())
        );
        assert!(!super::rewritten(&was, &now), "renamed over");

        let other = d.path().join("other");
        std::fs::write(&other, b"version one").unwrap();
        let file = std::fs::File::open(&other).unwrap();
        let was = file.metadata().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mtime = std::fs::FileTimes::new().set_modified(was.modified().unwrap());
        let mut w = std::fs::OpenOptions::new()
            .write(true)
            .open(&other)
            .unwrap();
        w.write_all(b"version 1!!").unwrap();
        w.set_times(mtime).unwrap();
        assert!(
            super::rewritten(&was, &file.metadata().unwrap()),
            "rewritten in place"
        );
        std::fs::remove_file(&other).unwrap();
    }

    use super::*;
    use tokio::io::AsyncReadExt;

    /// A request's line is written as its answer ends, with the bytes sent and how it ended:
    /// a download whose disk failed part way was logged as a 200 before its first byte.
    #[tokio::test]
    async fn a_download_that_fails_part_way_says_so_in_its_line() {
        #[derive(Clone, Default)]
        struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Captured {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let logs = Captured::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);
        let line = |path: &str| Line {
            peer: "127.0.0.1:5000".parse().unwrap(),
            forwarded_for: "-".into(),
            method: "GET".into(),
            path: path.into(),
            status: 200,
            started: std::time::Instant::now(),
        };
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Err(std::io::Error::other("Input/output error")),
        ];
        let failing = BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames)));
        let mut body = Logged {
            body: failing,
            _slot: None,
            line: line("/broken.iso"),
            sent: 0,
            length: None,
            end: None,
        };
        while let Some(f) = body.frame().await {
            if f.is_err() {
                break;
            }
        }
        drop(body);
        let whole = Logged {
            body: full(Bytes::from_static(b"hello")),
            _slot: None,
            line: line("/fine.txt"),
            sent: 0,
            length: None,
            end: None,
        };
        let mut whole = whole;
        while whole.frame().await.is_some() {}
        drop(whole);
        // A HEAD's body hyper never polls (a 404's text): whole.
        let mut head = line("/missing");
        head.method = "HEAD".into();
        drop(Logged {
            body: full(Bytes::from_static(b"not found\n")),
            _slot: None,
            line: head,
            sent: 0,
            length: Some(10),
            end: None,
        });
        // A body of a known length: hyper stops polling once it is sent, and reads no end.
        for (path, length) in [("/sent.bin", 5), ("/left.bin", 10)] {
            use futures_util::StreamExt;
            let first: Result<Frame<Bytes>, std::io::Error> =
                Ok(Frame::data(Bytes::from_static(b"12345")));
            let endless =
                futures_util::stream::iter([first]).chain(futures_util::stream::pending());
            let mut b = Logged {
                body: BodyExt::boxed(StreamBody::new(endless)),
                _slot: None,
                line: line(path),
                sent: 0,
                length: Some(length),
                end: None,
            };
            b.frame().await.expect("a frame").expect("data");
        }
        let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        let failed = text
            .lines()
            .find(|l| l.contains("/broken.iso"))
            .expect("a line for the failed download");
        assert!(
            failed.contains("file request failed part way")
                && failed.contains("bytes=3")
                && failed.contains("Input/output error"),
            "{failed}"
        );
        let fine = text
            .lines()
            .find(|l| l.contains("/fine.txt"))
            .expect("a line for the whole answer");
        assert!(
            fine.contains("file request") && fine.contains("bytes=5") && !fine.contains("failed"),
            "{fine}"
        );
        let line_of = |path: &str| {
            text.lines()
                .find(|l| l.contains(path))
                .unwrap_or_else(|| panic!("no line for {path}: {text}"))
                .to_owned()
        };
        let missing = line_of("/missing");
        assert!(!missing.contains("cut"), "{missing}");
        let sent = line_of("/sent.bin");
        assert!(!sent.contains("cut") && sent.contains("bytes=5"), "{sent}");
        let left = line_of("/left.bin");
        assert!(
            left.contains("cut before the answer's end") && left.contains("bytes=5"),
            "{left}"
        );
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
        serve_pages(dir, Pages::Sandboxed).await
    }

    async fn serve_pages(dir: &Path, pages: Pages) -> (SocketAddr, CancellationToken) {
        let opts = Options {
            pages,
            ..Options::default()
        };
        let (addr, stop, _) = serve_with(dir, opts).await;
        (addr, stop)
    }

    async fn serve_with(
        dir: &Path,
        opts: Options,
    ) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stop = CancellationToken::new();
        let served = tokio::spawn(serve(l, Share::open(dir).unwrap(), opts, stop.clone()));
        (addr, stop, served)
    }

    /// The share is what its path names at each request: a directory swapped in by rename,
    /// or by re-pointing a symlink, is served at once (the one there at the start was served
    /// until a restart: its new pages not found, its old ones served).
    #[tokio::test]
    async fn a_directory_swapped_in_is_served() {
        let d = tempfile::tempdir().unwrap();
        let site = |name: &str, text: &str| {
            let p = d.path().join(name);
            std::fs::create_dir(&p).unwrap();
            std::fs::write(p.join("a.txt"), text).unwrap();
            p
        };
        let v1 = site("v1", "first");
        let live = d.path().join("live");
        std::os::unix::fs::symlink(&v1, &live).unwrap();
        let (addr, stop) = serve_dir(&live).await;
        assert!(get(addr, "/a.txt", "").await.ends_with("first"));
        // A symlink pointed elsewhere (`ln -sfn`: a new link renamed over the old one).
        let v2 = site("v2", "second");
        std::fs::write(v2.join("new.txt"), "only in v2").unwrap();
        let next = d.path().join("live.next");
        std::os::unix::fs::symlink(&v2, &next).unwrap();
        std::fs::rename(&next, &live).unwrap();
        assert!(get(addr, "/a.txt", "").await.ends_with("second"));
        assert!(get(addr, "/new.txt", "").await.ends_with("only in v2"));
        stop.cancel();
        // A directory renamed into the place of the one served.
        let (addr, stop) = serve_dir(&v1).await;
        assert!(get(addr, "/a.txt", "").await.ends_with("first"));
        std::fs::rename(&v1, d.path().join("v1.old")).unwrap();
        std::fs::rename(&v2, &v1).unwrap();
        assert!(get(addr, "/a.txt", "").await.ends_with("second"));
        stop.cancel();
    }

    /// A listing's preconditions are answered though it has no validators: `If-Match` with a
    /// tag fails (412), `If-None-Match: *` is a 304; without them, the listing. Both were 200
    /// with the whole listing.
    #[tokio::test]
    async fn a_listings_preconditions_are_answered() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.txt"), "a").unwrap();
        let (addr, stop) = serve_dir(d.path()).await;
        let got = get(addr, "/", "If-Match: \"x\"\r\n").await;
        assert!(got.starts_with("HTTP/1.1 412"), "{got}");
        let got = get(addr, "/", "If-None-Match: *\r\n").await;
        assert!(got.starts_with("HTTP/1.1 304"), "{got}");
        let got = get(addr, "/", "If-Match: *\r\n").await;
        assert!(
            got.starts_with("HTTP/1.1 200") && got.contains("a.txt"),
            "{got}"
        );
        stop.cancel();
    }

    /// DOS 8.3 aliases of hidden names (`.git` is `GIT~1` on FAT, NTFS and SMB shares) are
    /// refused as the names they stand for; long names with a `~` are not.
    #[test]
    fn short_aliases_count_as_hidden() {
        let root = Path::new("/share");
        for alias in [
            "GIT~1/config",
            "GIT~1../config",
            "env~1. ",
            "env~1",
            "SSH~1/id_ed25519",
            "pub/FOO~12.TXT",
            "a~1.b",
        ] {
            assert!(names_hidden(root, &root.join(alias)), "{alias}");
        }
        for name in [
            "notes~draft.txt",
            "~1",
            "photos~1999/a.jpg",
            "report~1.html.gz",
            "a.txt~1",
            "pub/a.txt",
        ] {
            assert!(!names_hidden(root, &root.join(name)), "{name}");
        }
    }

    /// Names starting with `.` are not served or listed unless asked for (`--hidden`): a
    /// project or home directory shared as it is holds `.git/config`, `.env`, `.ssh/`.
    #[tokio::test]
    async fn hidden_names_are_neither_served_nor_listed_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(".git")).unwrap();
        std::fs::create_dir_all(dir.path().join("pub/.ssh")).unwrap();
        std::fs::write(dir.path().join(".git/config"), "secret").unwrap();
        std::fs::write(dir.path().join(".env"), "secret").unwrap();
        std::fs::write(dir.path().join("pub/.ssh/id"), "secret").unwrap();
        std::fs::write(dir.path().join("pub/a.txt"), "shown").unwrap();
        std::fs::write(dir.path().join("pub/b..c"), "shown").unwrap();
        std::fs::create_dir_all(dir.path().join(".well-known")).unwrap();
        std::fs::write(dir.path().join(".well-known/security.txt"), "shown").unwrap();
        // Only the site's own, at its root.
        std::fs::create_dir_all(dir.path().join("pub/.well-known")).unwrap();
        std::fs::write(dir.path().join("pub/.well-known/x"), "secret").unwrap();
        // Symlinks of plain names to hidden ones: hidden too.
        std::os::unix::fs::symlink("../.git", dir.path().join("pub/cfg")).unwrap();
        std::os::unix::fs::symlink("../.env", dir.path().join("pub/env.txt")).unwrap();
        std::fs::create_dir_all(dir.path().join("site")).unwrap();
        std::os::unix::fs::symlink("../.env", dir.path().join("site/index.html")).unwrap();
        let (addr, stop) = serve_dir(dir.path()).await;
        for hidden in [
            "/.env",
            "/.git/config",
            "/.git/",
            "/%2egit/config",
            "/pub/.ssh/id",
            "/pub//.ssh/id",
            "/pub/.well-known/x",
            "/pub/cfg/config",
            "/pub/cfg/",
            "/pub/env.txt",
            "/site/index.html",
        ] {
            let got = get(addr, hidden, "").await;
            assert!(got.starts_with("HTTP/1.1 404"), "{hidden}: {got}");
            assert!(!got.contains("secret"), "{hidden}: {got}");
        }
        assert!(get(addr, "/pub/b..c", "").await.ends_with("shown"));
        // A hidden index is no index: the directory is listed instead.
        let site = get(addr, "/site/", "").await;
        assert!(site.starts_with("HTTP/1.1 200"), "{site}");
        assert!(!site.contains("secret"), "{site}");
        // RFC 8615's public directory is served and listed.
        assert!(get(addr, "/.well-known/security.txt", "")
            .await
            .ends_with("shown"));
        let root = get(addr, "/", "").await;
        assert!(
            root.contains("pub/") && root.contains(".well-known/"),
            "{root}"
        );
        assert!(!root.contains(".env") && !root.contains(".git"), "{root}");
        let sub = get(addr, "/pub/", "").await;
        assert!(sub.contains("a.txt") && sub.contains("b..c"), "{sub}");
        assert!(
            !sub.contains(".ssh") && !sub.contains(".well-known"),
            "{sub}"
        );
        stop.cancel();
        let opts = Options {
            hidden: true,
            ..Options::default()
        };
        let (addr, stop, _) = serve_with(dir.path(), opts).await;
        assert!(get(addr, "/.git/config", "").await.ends_with("secret"));
        assert!(get(addr, "/", "").await.contains(".env"));
        stop.cancel();
    }

    /// A stop lets a download under way finish (a restart of the service does not truncate
    /// it) and closes idle connections at once; the service returns when they are done.
    #[tokio::test]
    async fn a_stop_lets_answers_under_way_finish() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let big = vec![b'x'; 8 << 20];
        std::fs::write(dir.path().join("big"), &big).unwrap();
        let (addr, stop, served) = serve_with(dir.path(), Options::default()).await;
        // An idle keep-alive connection, and a download read only in part.
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET /nothing HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 12];
        idle.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 404");
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut start = vec![0u8; 64 << 10];
        c.read_exact(&mut start).await.unwrap();
        stop.cancel();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!served.is_finished(), "the stop cut the download");
        // No longer listening: a new client is refused at once, not left unanswered (the
        // accept loop lets go of the socket as it sees the stop).
        let refused = async {
            while tokio::net::TcpStream::connect(addr).await.is_ok() {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), refused)
            .await
            .expect("still listening after the stop");
        let mut rest = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(10), c.read_to_end(&mut rest))
            .await
            .expect("the download did not end")
            .unwrap();
        start.extend_from_slice(&rest);
        let got = String::from_utf8_lossy(&start);
        assert!(got.starts_with("HTTP/1.1 200"), "{}", &got[..100]);
        assert_eq!(body(&got).len(), big.len());
        // The idle one was closed: it reads its answer's end, then nothing.
        let mut left = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            idle.read_to_end(&mut left),
        )
        .await
        .expect("the idle connection stayed open")
        .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), served)
            .await
            .expect("the service did not return")
            .unwrap();
    }

    /// A share's HTML, SVG and XML show but run no script as the site (a file someone else
    /// put there would read the cookies of every app under the zone's name); `--site` serves
    /// them as its pages. Other types need no sandbox.
    #[tokio::test]
    async fn pages_that_can_run_script_are_sandboxed_unless_the_share_is_a_site() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a.html", "b.svg", "c.xml", "d.png", "e.txt", "f.js"] {
            std::fs::write(dir.path().join(name), "<script>alert(1)</script>").unwrap();
        }
        let csp = |answer: &str| {
            answer
                .lines()
                .find_map(|l| l.strip_prefix("content-security-policy: "))
                .map(str::to_owned)
        };
        let (addr, stop) = serve_dir(dir.path()).await;
        for name in ["a.html", "b.svg", "c.xml"] {
            let got = get(addr, &format!("/{name}"), "").await;
            assert_eq!(csp(&got).as_deref(), Some("sandbox"), "{got}");
            let got = head_req(addr, &format!("/{name}")).await;
            assert_eq!(csp(&got).as_deref(), Some("sandbox"), "{got}");
        }
        for name in ["d.png", "e.txt", "f.js"] {
            let got = get(addr, &format!("/{name}"), "").await;
            assert_eq!(csp(&got), None, "{got}");
        }
        stop.cancel();
        let (addr, stop) = serve_pages(dir.path(), Pages::Site).await;
        for name in ["a.html", "b.svg", "c.xml"] {
            let got = get(addr, &format!("/{name}"), "").await;
            assert!(got.starts_with("HTTP/1.1 200"), "{got}");
            assert_eq!(csp(&got), None, "{got}");
        }
        stop.cancel();
    }

    /// Out of descriptors is the service's trouble, not the reader's: 503 (said at warn), not
    /// 403; a file gone between check and open is not found.
    #[test]
    fn open_failures_are_answered_by_their_cause() {
        let status = |errno| unreadable(&std::io::Error::from_raw_os_error(errno)).status();
        assert_eq!(status(libc::EMFILE), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(status(libc::ENFILE), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(status(libc::ENOENT), StatusCode::NOT_FOUND);
        assert_eq!(status(libc::ELOOP), StatusCode::NOT_FOUND);
        assert_eq!(status(libc::EACCES), StatusCode::FORBIDDEN);
    }

    #[test]
    fn the_log_names_the_client_the_gateway_forwarded_for() {
        let loopback: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert("x-forwarded-for", HeaderValue::from_str(v).unwrap());
            believed_forwarded_for(loopback, &[], &m).map(|ip| ip.to_string())
        };
        assert_eq!(h("203.0.113.9").as_deref(), Some("203.0.113.9"));
        assert_eq!(h(" 2001:db8::1 ").as_deref(), Some("2001:db8::1"));
        assert_eq!(h("evil\" injected=1"), None);
        assert_eq!(
            believed_forwarded_for(loopback, &[], &HeaderMap::new()),
            None
        );
    }

    /// `X-Forwarded-For` is the gateway's word only from the node's loopback: a client that
    /// reaches a `--listen 0.0.0.0` service directly names any address it likes, and would
    /// get a share of the answers in flight for each. IPv6 clients are counted by their /64,
    /// which one host holds whole.
    #[test]
    fn clients_are_counted_by_an_address_they_cannot_choose() {
        let mut m = HeaderMap::new();
        m.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let forwarded = Some(ip("203.0.113.9"));
        for peer in [
            "127.0.0.1:1",
            "127.8.9.10:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
        ] {
            let peer: SocketAddr = peer.parse().unwrap();
            assert_eq!(believed_forwarded_for(peer, &[], &m), forwarded, "{peer}");
        }
        for peer in [
            "198.51.100.7:1",
            "[2001:db8::1]:1",
            "[::ffff:198.51.100.7]:1",
        ] {
            let peer: SocketAddr = peer.parse().unwrap();
            assert_eq!(believed_forwarded_for(peer, &[], &m), None, "{peer}");
        }
        // A node agent on another machine, named with --proxy: believed.
        let agent: SocketAddr = "192.168.1.20:40000".parse().unwrap();
        let proxies = [ip("192.168.1.20")];
        assert_eq!(believed_forwarded_for(agent, &proxies, &m), forwarded);
        // One /64 is one client; the next /64 another.
        assert_eq!(counted_as(ip("2001:db8:0:1::1")), ip("2001:db8:0:1::"));
        assert_eq!(
            counted_as(ip("2001:db8:0:1:ffff:ffff:ffff:ffff")),
            ip("2001:db8:0:1::")
        );
        assert_eq!(counted_as(ip("2001:db8:0:2::1")), ip("2001:db8:0:2::"));
        assert_eq!(counted_as(ip("::ffff:203.0.113.9")), ip("203.0.113.9"));
        assert_eq!(counted_as(ip("203.0.113.9")), ip("203.0.113.9"));
    }

    /// An IPv6 client's answers in flight count by its /64 and, all its /64s together, by its
    /// /48: four /64s of one home took every slot. Slots given back count down both.
    #[test]
    fn answers_in_flight_count_by_client_and_by_ipv6_site() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let table = Arc::new(InFlight {
            per: Default::default(),
            most: 2,
            sites: Default::default(),
            site_most: 3,
            listings: Listings::new(1),
        });
        let a = [
            InFlight::take(&table, ip("2001:db8:0:1::1")),
            InFlight::take(&table, ip("2001:db8:0:1::2")),
        ];
        assert!(a.iter().all(Option::is_some));
        assert!(
            InFlight::take(&table, ip("2001:db8:0:1::3")).is_none(),
            "a /64 past its most"
        );
        let b = InFlight::take(&table, ip("2001:db8:0:2::1"));
        assert!(b.is_some());
        assert!(
            InFlight::take(&table, ip("2001:db8:0:3::1")).is_none(),
            "a /48 past its most"
        );
        assert!(
            InFlight::take(&table, ip("2001:db8:1::1")).is_some(),
            "another /48"
        );
        assert!(InFlight::take(&table, ip("203.0.113.9")).is_some());
        drop(b);
        assert!(
            InFlight::take(&table, ip("2001:db8:0:3::1")).is_some(),
            "room given back"
        );
    }

    /// Long names make long links: past MAX_LISTING_BYTES the listing stops adding entries and
    /// says how many it left out, as past MAX_LISTING.
    #[test]
    fn a_listing_of_long_names_stops_at_its_byte_cap() {
        let dir = tempfile::tempdir().unwrap();
        // ~2 KB a link (each `&` is `%26` in the link and `&amp;` in its text): ~2 MB in all.
        let total = 1000;
        for i in 0..total {
            let name = format!("{}{i:04}", "&".repeat(240));
            std::fs::File::create(dir.path().join(name)).unwrap();
        }
        let f = std::fs::File::open(dir.path()).unwrap();
        let later = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let html = listing(&f, "/", (false, true), later).unwrap();
        // Past its deadline (the request answered 504 already) a listing stops reading.
        let late = listing(&f, "/", (false, true), std::time::Instant::now()).unwrap_err();
        assert_eq!(late.kind(), std::io::ErrorKind::TimedOut);
        let (entries, tail) = html.split_once("</ul>\n").unwrap();
        assert!(
            entries.len() <= MAX_LISTING_BYTES,
            "{} bytes",
            entries.len()
        );
        assert!(tail.len() < 200, "{tail}");
        let shown = entries.matches("<li>").count();
        assert!(shown > 400 && shown < total, "{shown} shown");
        // The first names in order.
        assert!(entries.contains("&amp;0000</a>"));
        assert!(
            tail.starts_with(&format!("<p>{} more entries not listed", total - shown)),
            "{tail}"
        );
    }

    /// A request stuck in the file system (a hung mount) is given up on, freeing its slot;
    /// the work's answer is not waited for.
    #[tokio::test]
    async fn blocking_work_past_its_limit_is_given_up_on() {
        let _one = STUCK_TESTS.lock().await;
        let stuck = || STUCK.load(std::sync::atomic::Ordering::Relaxed);
        // Counted from what other tests left: one whose runtime ended while a call of its
        // was still running never takes that call off the count.
        let base = stuck();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let started = std::time::Instant::now();
        let got = blocking_within(std::time::Duration::from_millis(100), move || {
            held.recv_timeout(std::time::Duration::from_secs(10)).ok()
        })
        .await;
        assert!(got.is_none(), "{got:?}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // Counted as stuck until the call returns.
        assert_eq!(stuck(), base + 1);
        drop(release);
        let done = blocking_within(std::time::Duration::from_secs(10), || 7).await;
        assert_eq!(done.map(Result::unwrap), Some(7));
        let settled = || async {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while stuck() != base {
                assert!(
                    std::time::Instant::now() < deadline,
                    "still counted as stuck"
                );
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        };
        settled().await;
        // A request dropped before the limit (its client hung up) leaves its call counted
        // too: it went uncounted, and clients hanging up could take every blocking thread.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let asking = tokio::spawn(blocking_within(
            std::time::Duration::from_secs(30),
            move || held.recv_timeout(std::time::Duration::from_secs(10)).ok(),
        ));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        asking.abort();
        let _ = asking.await;
        assert_eq!(stuck(), base + 1, "a dropped request's call not counted");
        drop(release);
        settled().await;
    }

    /// A file rewritten in place (same inode, same length) while it is sent under a strong
    /// tag is not delivered whole as that version: the download is cut before its end, and
    /// the client asks again. A file left alone is delivered whole.
    #[tokio::test]
    async fn a_file_rewritten_while_sent_under_its_tag_is_cut() {
        use std::io::{Seek, Write};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const LEN: usize = 32 << 20;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        std::fs::write(&path, vec![b'a'; LEN]).unwrap();
        // Settled (a file changed within the last seconds gets no tag).
        tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
        let (addr, stop) = serve_dir(dir.path()).await;
        // What happens to the file once its download is under way.
        #[derive(Clone, Copy)]
        enum Meanwhile {
            Nothing,
            Appended,
            Rewritten,
        }
        let download = |meanwhile: Meanwhile| {
            let path = path.clone();
            async move {
                let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
                c.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .await
                    .unwrap();
                let mut got = vec![0u8; 64 * 1024];
                c.read_exact(&mut got).await.unwrap();
                let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
                assert!(head.contains("etag: \""), "{head}");
                match meanwhile {
                    Meanwhile::Nothing => {}
                    Meanwhile::Appended => {
                        let mut f = std::fs::OpenOptions::new()
                            .append(true)
                            .open(&path)
                            .unwrap();
                        f.write_all(b"one more line\n").unwrap();
                    }
                    Meanwhile::Rewritten => {
                        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                        f.seek(std::io::SeekFrom::Start(0)).unwrap();
                        f.write_all(&vec![b'b'; LEN]).unwrap();
                    }
                }
                let mut rest = Vec::new();
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(60),
                    c.read_to_end(&mut rest),
                )
                .await
                .expect("the download ends");
                let body_at = head.find("\r\n\r\n").unwrap() + 4;
                got.len() - body_at + rest.len()
            }
        };
        assert_eq!(
            download(Meanwhile::Nothing).await,
            LEN,
            "a file left alone is cut"
        );
        // Appended to meanwhile (a log): what was sent is that version, whole.
        assert_eq!(
            download(Meanwhile::Appended).await,
            LEN,
            "a file appended to is cut"
        );
        // Back to its length, settled, for the rewrite.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(LEN as u64)
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
        let n = download(Meanwhile::Rewritten).await;
        assert!(n < LEN, "the rewritten file went whole ({n} bytes)");
        stop.cancel();
    }

    /// At most `max` listings are built at once; a slot given back is taken again.
    #[test]
    fn listings_built_at_once_are_bounded() {
        let listings = Listings::new(2);
        let (a, b) = (listings.take(), listings.take());
        assert!(a.is_some() && b.is_some());
        assert!(listings.take().is_none(), "a third listing at once");
        drop(a);
        assert!(
            listings.take().is_some(),
            "a slot given back is not taken again"
        );
    }

    /// Tests that count [`STUCK`] (a process-wide count), or may raise it, run one at a time.
    static STUCK_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// A download reads what was asked, a chunk at a time from its offset; a file that got
    /// shorter meanwhile ends it in an error (hyper then cuts the connection: the length was
    /// promised).
    #[tokio::test]
    async fn a_download_reads_its_range_and_a_shrunk_file_ends_it() {
        use futures_util::StreamExt;
        let data: Arc<Vec<u8>> = Arc::new((0..200_000u32).map(|i| (i % 251) as u8).collect());
        let pread = |data: Arc<Vec<u8>>| {
            move |at: u64, buf: &mut [u8]| {
                let tail = data.get(at as usize..).unwrap_or_default();
                let n = tail.len().min(buf.len());
                buf[..n].copy_from_slice(&tail[..n]);
                Ok(n)
            }
        };
        let limit = std::time::Duration::from_secs(10);
        let reads = file_reads(pread(data.clone()), 1000, 150_000, Arc::new(()), limit);
        let chunks: Vec<Bytes> = reads.map(Result::unwrap).collect().await;
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks.concat(), data[1000..151_000]);
        let mut reads = Box::pin(file_reads(
            pread(data.clone()),
            199_990,
            20,
            Arc::new(()),
            limit,
        ));
        assert_eq!(reads.next().await.unwrap().unwrap(), data[199_990..]);
        let e = reads.next().await.unwrap().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        assert!(reads.next().await.is_none());
    }

    /// A download whose read hangs (a hung mount) ends in an error past its limit rather than
    /// holding its connection for ever; the stuck read counts in STUCK and keeps its client's
    /// slot until it returns.
    #[tokio::test]
    async fn a_stalled_read_ends_the_download_and_keeps_its_slot() {
        use futures_util::StreamExt;
        let _one = STUCK_TESTS.lock().await;
        let stuck = || STUCK.load(std::sync::atomic::Ordering::Relaxed);
        // Counted from what other tests left (see `blocking_work_past_its_limit_is_given_up_on`).
        let base = stuck();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let held = std::sync::Mutex::new(held);
        let read = move |at: u64, buf: &mut [u8]| {
            if at > 0 {
                let _ = held.lock().unwrap().recv();
            }
            buf[..2].copy_from_slice(b"ab");
            Ok(2)
        };
        let slot = Arc::new(());
        // Room for the first (instant) read, on a fresh blocking thread, on a loaded machine;
        // well within the 10 s the stalled read is given below.
        let limit = std::time::Duration::from_secs(3);
        let mut reads = Box::pin(file_reads(read, 0, 10, slot.clone(), limit));
        assert_eq!(reads.next().await.unwrap().unwrap(), "ab");
        let started = std::time::Instant::now();
        let e = reads.next().await.unwrap().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        assert!(reads.next().await.is_none());
        drop(reads);
        assert_eq!(stuck(), base + 1);
        assert_eq!(
            Arc::strong_count(&slot),
            2,
            "the stuck read let its slot go"
        );
        drop(release);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while stuck() != base || Arc::strong_count(&slot) != 1 {
            assert!(std::time::Instant::now() < deadline, "still held");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Short answers carry their length, whatever holds their client's slot: sent chunked, an
    /// HTTP/1.0 client could only read one to the connection's close.
    #[tokio::test]
    async fn text_answers_carry_their_length() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, stop) = serve_dir(dir.path()).await;
        let got = get(addr, "/nothing", "").await;
        assert!(got.starts_with("HTTP/1.1 404"), "{got}");
        assert_eq!(header(&got, "content-length"), Some("10"), "{got}");
        assert_eq!(header(&got, "transfer-encoding"), None, "{got}");
        // HTTP/1.0: the length, not a close, ends the answer.
        use tokio::io::AsyncWriteExt;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /nothing HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await
            .unwrap();
        let mut got = vec![0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), c.read(&mut got))
            .await
            .expect("an answer")
            .unwrap();
        let got = String::from_utf8_lossy(&got[..n]).into_owned();
        assert_eq!(header(&got, "content-length"), Some("10"), "{got}");
        assert_eq!(body(&got), "not found\n");
        stop.cancel();
    }

    #[test]
    fn types_follow_the_extension_whatever_its_case() {
        for (name, want) in [
            ("app.js", "text/javascript; charset=utf-8"),
            ("Style.CSS", "text/css; charset=utf-8"),
            ("logo.svg", "image/svg+xml"),
            ("film.MP4", "video/mp4"),
            ("index.htm", "text/html; charset=utf-8"),
            ("blob", "application/octet-stream"),
            ("notes.bin", "application/octet-stream"),
        ] {
            assert_eq!(content_type(Path::new(name)), want, "{name}");
        }
    }

    /// Past the connections served, as many more wait for room and are served when some
    /// closes; past those, a newcomer is closed at once.
    #[tokio::test]
    async fn connections_past_the_cap_wait_then_are_closed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f.txt"), "x").unwrap();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve_at_most(
            l,
            Share::open(dir.path()).unwrap(),
            Options::default(),
            4,
            stop.clone(),
        ));
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Waiting: its request is answered once a served connection closes.
        let mut waiting = tokio::net::TcpStream::connect(addr).await.unwrap();
        waiting
            .write_all(b"GET /f.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        for _ in 0..3 {
            held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // The ninth: closed at once.
        let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), extra.read(&mut b))
            .await
            .expect("closed at once");
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        let mut answer = Vec::new();
        let early =
            tokio::time::timeout(std::time::Duration::from_millis(300), waiting.read(&mut b)).await;
        assert!(early.is_err(), "answered while all were served: {early:?}");
        drop(held.remove(0));
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            waiting.read_to_end(&mut answer),
        )
        .await
        .expect("served once there was room")
        .unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
        stop.cancel();
    }

    /// One client (by the address the gateway forwarded for) has at most a quarter of the
    /// answers in flight: its next request is answered 503 while another client is served,
    /// and its own once an answer of its ends.
    #[tokio::test]
    async fn one_client_holds_at_most_a_quarter_of_the_answers_in_flight() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // The download dropped mid-answer may leave a read counted in STUCK for a moment.
        let _one = STUCK_TESTS.lock().await;
        let stuck_before = STUCK.load(std::sync::atomic::Ordering::Relaxed);
        let dir = tempfile::tempdir().unwrap();
        // Larger than the socket buffers hold: its answer stays in flight while unread.
        std::fs::write(dir.path().join("big"), vec![b'x'; 32 << 20]).unwrap();
        std::fs::write(dir.path().join("small"), "s").unwrap();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stop = CancellationToken::new();
        // Four connections served: one answer in flight per client.
        tokio::spawn(serve_at_most(
            l,
            Share::open(dir.path()).unwrap(),
            Options::default(),
            4,
            stop.clone(),
        ));
        let ask = |who: &'static str, path: &'static str| async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            let head = format!(
                "GET {path} HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: {who}\r\nConnection: close\r\n\r\n"
            );
            c.write_all(head.as_bytes()).await.unwrap();
            let mut first = [0u8; 12];
            tokio::time::timeout(std::time::Duration::from_secs(5), c.read_exact(&mut first))
                .await
                .expect("an answer in time")
                .unwrap();
            (c, String::from_utf8_lossy(&first).into_owned())
        };
        // A short answer's status, read to its end: not cut mid-answer, which could leave a
        // read of its file counted in STUCK (see the STUCK tests).
        let ask_small = |who: &'static str| async move {
            let (mut c, status) = ask(who, "/small").await;
            tokio::time::timeout(
                std::time::Duration::from_secs(5),
                c.read_to_end(&mut Vec::new()),
            )
            .await
            .expect("the rest of the answer in time")
            .unwrap();
            status
        };
        let (slow, status) = ask("203.0.113.1", "/big").await;
        assert_eq!(status, "HTTP/1.1 200");
        let status = ask_small("203.0.113.1").await;
        assert_eq!(
            status, "HTTP/1.1 503",
            "a second answer in flight to one client"
        );
        let status = ask_small("203.0.113.2").await;
        assert_eq!(status, "HTTP/1.1 200", "another client was not served");
        drop(slow);
        // The dropped download's answer ends (its write fails) and frees the client's share.
        let mut again = String::new();
        for _ in 0..50 {
            again = ask_small("203.0.113.1").await;
            if again == "HTTP/1.1 200" {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(again, "HTTP/1.1 200", "the client's share never came back");
        stop.cancel();
        // The dropped download's last read has returned (its share came back): let its count
        // come off before the STUCK tests run, rather than end this runtime before it does.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while STUCK.load(std::sync::atomic::Ordering::Relaxed) > stuck_before
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn ranges_resume_and_dates_validate() {
        let dir = tempfile::tempdir().unwrap();
        let content: String = (0..1000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        std::fs::write(dir.path().join("f.txt"), &content).unwrap();
        // Validators come once a file has been left alone for a while (setting its time back
        // would not do: the change time tells, and withholds the date).
        tokio::time::sleep(validate::SETTLE + std::time::Duration::from_millis(100)).await;
        let (addr, stop) = serve_dir(dir.path()).await;

        let whole = get(addr, "/f.txt", "").await;
        assert!(whole.starts_with("HTTP/1.1 200"), "{whole}");
        assert_eq!(header(&whole, "accept-ranges"), Some("bytes"));
        // Kept by browsers, but asked about again: a replaced file is seen at once.
        assert_eq!(header(&whole, "cache-control"), Some("no-cache"));
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

        // The entity tag: a current copy (304, tag and date given again), a part of the
        // version held, and a version the client does not have (412).
        let tag = header(&whole, "etag").expect("ETag").to_owned();
        assert!(tag.starts_with('"') && tag.ends_with('"'), "{tag}");
        let cur = get(addr, "/f.txt", &format!("If-None-Match: \"x\", {tag}\r\n")).await;
        assert!(cur.starts_with("HTTP/1.1 304"), "{cur}");
        assert_eq!(header(&cur, "etag"), Some(tag.as_str()));
        assert_eq!(header(&cur, "last-modified"), Some(lm.as_str()));
        let part = get(
            addr,
            "/f.txt",
            &format!("Range: bytes=5-6\r\nIf-Range: {tag}\r\n"),
        )
        .await;
        assert!(part.starts_with("HTTP/1.1 206"), "{part}");
        assert_eq!(body(&part), &content[5..7]);
        let weak = get(
            addr,
            "/f.txt",
            &format!("Range: bytes=5-6\r\nIf-Range: W/{tag}\r\n"),
        )
        .await;
        assert!(weak.starts_with("HTTP/1.1 200"), "{weak}");
        let gone = get(addr, "/f.txt", "If-Match: \"other\"\r\n").await;
        assert!(gone.starts_with("HTTP/1.1 412"), "{gone}");
        assert_eq!(body(&gone), "");
        let held = get(addr, "/f.txt", &format!("If-Match: {tag}\r\n")).await;
        assert!(held.starts_with("HTTP/1.1 200"), "{held}");
        assert_eq!(header(&held, "x-content-type-options"), Some("nosniff"));
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
            list.contains("<base href=\"/\">")
                && list.contains("<a href=\"./sub%20dir/\">sub dir/</a>"),
            "{list}"
        );
        assert!(list.contains("&lt;b&gt;&amp;.txt</a>"), "{list}");
        // Every link fetches the file it names.
        for n in odd {
            let href = format!("/{}", percent_encode(n.as_bytes()));
            assert!(list.contains(&format!("href=\".{}\"", href.replace('&', "&amp;"))));
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
                list.contains("<base href=\"/\">") && list.contains("<a href=\"./sub%20dir/\">"),
                "{}",
                &list[..list.len().min(300)]
            );
            assert!(list.len() < 200_000, "{} bytes", list.len());
        }
        let list = get(addr, "/sub%20dir/", "X-Forwarded-Prefix: /dfs\r\n").await;
        assert!(list.contains("<title>/dfs/sub dir/</title>"), "{list}");
        std::fs::write(dir.path().join("sub dir/x"), "x").unwrap();
        let list = get(addr, "/sub%20dir/", "X-Forwarded-Prefix: /dfs\r\n").await;
        assert!(
            list.contains("<base href=\"/dfs/sub%20dir/\">")
                && list.contains("<a href=\"./x\">x</a>"),
            "{list}"
        );
        // A long prefix stands once in the page, not in every link.
        let long = format!("/{}", "&".repeat(1000));
        let list = get(addr, "/big/", &format!("X-Forwarded-Prefix: {long}\r\n")).await;
        assert!(
            list.contains(&long.replace('&', "&amp;")),
            "{}",
            &list[..300]
        );
        assert!(list.len() < 1_000_000, "{} bytes", list.len());
        for bad in [
            "/a\"b",
            "//evil.example",
            "/\\evil.example",
            "/app?x",
            "/app#x",
        ] {
            let list = get(
                addr,
                "/sub%20dir/",
                &format!("X-Forwarded-Prefix: {bad}\r\n"),
            )
            .await;
            assert!(list.contains("<base href=\"/sub%20dir/\">"), "{list}");
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
        // The same answer as an index leading to nothing outside: the directory's listing.
        std::fs::create_dir(dir.path().join("e")).unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("nothing"),
            dir.path().join("e/index.html"),
        )
        .unwrap();
        let (addr, stop) = serve_dir(dir.path()).await;
        let got = get(addr, "/d/", "").await;
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        assert!(!body(&got).contains("secret"), "{got}");
        let other = get(addr, "/e/", "").await;
        assert!(other.starts_with("HTTP/1.1 200"), "{other}");
        assert_eq!(
            body(&got).replace("/d/", "/e/"),
            body(&other),
            "an index leading out told whether its target exists"
        );
        stop.cancel();
    }

    /// A link leading out of the share answers as a path that is not there (it used to answer
    /// 403 for files that exist out there and 404 for others, telling which ones exist).
    #[tokio::test]
    async fn links_out_of_the_share_do_not_tell_what_exists_there() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "secret").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("out")).unwrap();
        let (addr, stop) = serve_dir(dir.path()).await;
        let there = get(addr, "/out/secret", "").await;
        let not_there = get(addr, "/out/nothing", "").await;
        assert!(there.starts_with("HTTP/1.1 404"), "{there}");
        assert!(not_there.starts_with("HTTP/1.1 404"), "{not_there}");
        assert_eq!(body(&there), body(&not_there));
        stop.cancel();
    }

    /// A directory asked for without its slash is redirected to it (its page's relative
    /// links would otherwise resolve one level up), query and forwarded prefix kept; a file
    /// asked for with one is not there; `//name` stays on this site.
    #[tokio::test]
    async fn directories_are_redirected_to_their_slash() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("site/a b")).unwrap();
        std::fs::write(dir.path().join("site/index.html"), "<img src=a.png>").unwrap();
        std::fs::write(dir.path().join("f.txt"), "f").unwrap();
        let (addr, stop) = serve_dir(dir.path()).await;
        let got = get(addr, "/site?x=1", "X-Forwarded-Prefix: /dfs\r\n").await;
        assert!(got.starts_with("HTTP/1.1 308"), "{got}");
        assert_eq!(header(&got, "location"), Some("/dfs/site/?x=1"));
        assert_eq!(
            header(&got, "cache-control"),
            Some("no-cache"),
            "not kept for good"
        );
        let got = get(addr, "/site/a%20b", "").await;
        assert_eq!(header(&got, "location"), Some("/site/a%20b/"));
        let got = get(addr, "//site", "").await;
        assert_eq!(header(&got, "location"), Some("/site/"));
        assert!(get(addr, "/site/", "").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/f.txt/", "").await.starts_with("HTTP/1.1 404"));
        assert!(get(addr, "/", "").await.starts_with("HTTP/1.1 200"));
        stop.cancel();
    }

    /// Only GET has ranges: HEAD with one answers as GET without it would.
    #[tokio::test]
    async fn head_with_a_range_answers_the_whole() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f.txt"), "0123456789").unwrap();
        let (addr, stop) = serve_dir(dir.path()).await;
        let got = request(addr, "HEAD", "/f.txt", "Range: bytes=0-0\r\n").await;
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        assert_eq!(header(&got, "content-length"), Some("10"));
        let got = get(addr, "/f.txt", "Range: bytes=0-0\r\n").await;
        assert!(got.starts_with("HTTP/1.1 206"), "{got}");
        stop.cancel();
    }
}
