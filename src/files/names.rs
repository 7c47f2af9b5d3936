//! URL paths and file names for `zonegate files`: a request's path to a file under the root
//! (never outside it), and a name back to a link. File names need not be UTF-8. Sans-IO.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use hyper::header::HeaderMap;

/// Decodes %XX escapes into bytes (file names need not be UTF-8); `None` for an invalid
/// escape or a NUL byte, which no file name holds.
pub(super) fn percent_decode(s: &str) -> Option<Vec<u8>> {
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
pub(super) fn percent_encode(name: &[u8]) -> String {
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

/// Maps a URL path to a file under `root`, refusing anything that could climb out of it, and
/// a raw `;`: the gateway reads `/pub;x/f` as `/pub/f` (Tomcat's path parameters, so a
/// policy's `paths` cannot be got around on such services) and would allow it under `/pub`,
/// while here it named the directory `pub;x`. A name with a `;` is asked for as `%3B`, as
/// listings link it.
pub fn resolve(root: &Path, url_path: &str) -> Option<PathBuf> {
    let url_path = url_path.split('?').next().unwrap_or("");
    if url_path.contains(';') {
        return None;
    }
    let decoded = percent_decode(url_path)?;
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

pub(super) fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The URL path of `rel` (a directory under the root), as links in a listing use it:
/// built from the path's components rather than echoed from the request, so it is canonical
/// (`//`, `/./` gone) and no longer than the path; `prefix` is what a gateway app stripped
/// (`X-Forwarded-Prefix`), so links work through it.
pub(super) fn dir_url(prefix: &str, rel: &Path) -> String {
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
pub(super) fn forwarded_prefix(headers: &HeaderMap) -> &str {
    headers
        .get("x-forwarded-prefix")
        .and_then(|v| v.to_str().ok())
        // One leading slash: `//host` would make every link lead to another site.
        .filter(|p| p.starts_with('/') && !p.starts_with("//") && p.len() <= 1024)
        // No `\` either: browsers read `/\host` as `//host`; no `?` or `#`, which would end
        // the path of the page's base and send every link to the prefix's root.
        .filter(|p| {
            p.bytes()
                .all(|b| b.is_ascii_graphic() && !b"\"<>\\?#".contains(&b))
        })
        .unwrap_or("")
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
        assert_eq!(resolve(root, "/pub;old/secret.txt"), None);
        assert_eq!(resolve(root, "/;/pub/x"), None);
        assert_eq!(
            resolve(root, "/a%3Bb"),
            Some(PathBuf::from("/srv/files/a;b"))
        );
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
}
