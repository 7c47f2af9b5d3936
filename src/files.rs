//! A read-only HTTP file service (`zonegate files`): the "file node" of the quick start.
//! GET and HEAD only; files stream from disk; directories get a plain HTML listing; paths
//! never leave the served directory.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

type Body = BoxBody<Bytes, std::io::Error>;

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

/// Decodes %XX escapes; `None` for invalid escapes or non-UTF-8 results.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Maps a URL path to a file under `root`, refusing anything that could climb out of it.
pub fn resolve(root: &Path, url_path: &str) -> Option<PathBuf> {
    let decoded = percent_decode(url_path.split('?').next().unwrap_or(""))?;
    let mut p = root.to_path_buf();
    for c in Path::new(&decoded).components() {
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

async fn listing(dir: &Path, url_path: &str) -> std::io::Result<String> {
    let mut names = Vec::new();
    let mut rd = tokio::fs::read_dir(dir).await?;
    while let Some(e) = rd.next_entry().await? {
        let mut n = e.file_name().to_string_lossy().into_owned();
        if e.file_type().await.map(|t| t.is_dir()).unwrap_or(false) {
            n.push('/');
        }
        names.push(n);
    }
    names.sort();
    let base = if url_path.ends_with('/') {
        url_path.to_owned()
    } else {
        format!("{url_path}/")
    };
    let mut html = format!(
        "<!doctype html><meta charset=utf-8><title>{0}</title><h1>{0}</h1><ul>\n",
        html_escape(&base)
    );
    for n in names {
        html.push_str(&format!(
            "<li><a href=\"{}{}\">{}</a></li>\n",
            html_escape(&base),
            html_escape(&n),
            html_escape(&n)
        ));
    }
    html.push_str("</ul>\n");
    Ok(html)
}

async fn handle(root: Arc<PathBuf>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "read-only file service: GET and HEAD only",
        );
        r.headers_mut()
            .insert("allow", "GET, HEAD".parse().expect("valid header"));
        return r;
    }
    let head = req.method() == Method::HEAD;
    let url_path = req.uri().path().to_owned();
    let Some(path) = resolve(&root, &url_path) else {
        return text(StatusCode::BAD_REQUEST, "bad path");
    };
    // `resolve` stops `..`; a symlink inside the directory could still point anywhere (a home
    // directory, /dev/zero): serve only what really lies under the root.
    match tokio::fs::canonicalize(&path).await {
        Ok(real) if real.starts_with(root.as_path()) => {}
        Ok(_) => return text(StatusCode::FORBIDDEN, "outside the shared directory"),
        Err(_) => return text(StatusCode::NOT_FOUND, "not found"),
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
            return file(&index, head).await;
        }
        return match listing(&path, &url_path).await {
            Ok(html) => Response::builder()
                .header("content-type", "text/html; charset=utf-8")
                .body(
                    if head {
                        Full::new(Bytes::new())
                    } else {
                        Full::new(Bytes::from(html))
                    }
                    .map_err(|never| match never {})
                    .boxed(),
                )
                .expect("valid response"),
            Err(_) => text(StatusCode::FORBIDDEN, "cannot list this directory"),
        };
    }
    file(&path, head).await
}

async fn file(path: &Path, head: bool) -> Response<Body> {
    let f = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(_) => return text(StatusCode::FORBIDDEN, "cannot read this file"),
    };
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    let ctype = match path.extension().and_then(|e| e.to_str()) {
        Some("html") | Some("htm") => "text/html; charset=utf-8",
        Some("txt") | Some("md") => "text/plain; charset=utf-8",
        Some("json") => "application/json",
        Some("png") => "image/png",
        Some("jpg") | Some("jpeg") => "image/jpeg",
        _ => "application/octet-stream",
    };
    let body: Body = if head {
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed()
    } else {
        // Streamed from disk: memory stays flat for any file size.
        let stream = tokio_util::io::ReaderStream::with_capacity(f, 64 * 1024).map_ok(Frame::data);
        BodyExt::boxed(StreamBody::new(stream))
    };
    Response::builder()
        .header("content-type", ctype)
        .header("content-length", len)
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
        assert_eq!(resolve(root, "/"), Some(PathBuf::from("/srv/files")));
    }
}
