//! Fuzzes what `zonegate files` reads from a request: the target path (`files::resolve`),
//! the `Range` value (`files::byte_range`) and the conditional headers (`If-Match`,
//! `If-None-Match`, `If-Range`, `If-(Un)Modified-Since`: `files::validate::evaluate`), and
//! the links it makes (`X-Forwarded-Prefix`, listed names). A path never resolves outside the
//! root (no `..` survives, the result lies under it) and one naming a hidden name is refused;
//! a directory's link stays on this site and leads back to it, a listed name's to the name; a
//! range part always lies inside the file; none of them panics.
#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use std::os::unix::ffi::OsStrExt;
use zonegate::files::fuzzing::{dir_link, name_link, refused_as_hidden};
use zonegate::files::validate::{evaluate, Validators, Verdict};
use zonegate::files::{byte_range, resolve, Ranged};

/// What the service does with the path `asked` (resolved from the request): a name starting
/// with `.` anywhere in it (but `.well-known` at the top) is refused without `--hidden`; the
/// directory's URL, as a listing's base and a redirect give it behind the input read as an
/// `X-Forwarded-Prefix` value, is a path on this site (one leading `/`, no `\`, no `?` or
/// `#`, nothing a `<base href>` or a `Location` would read otherwise) that resolves back to
/// `asked` once the gateway strips the prefix; a listed name, the input's last line, links to
/// itself from there.
fn links(root: &Path, asked: &Path, input: &[u8]) {
    let rel = asked.strip_prefix(root).expect("resolved under the root");
    let hidden = rel.components().enumerate().any(|(depth, c)| match c {
        Component::Normal(n) => {
            let n = n.as_encoded_bytes();
            n.starts_with(b".") && !(depth == 0 && n == b".well-known")
        }
        _ => false,
    });
    if hidden {
        assert!(
            refused_as_hidden(root, asked),
            "{asked:?} served as not hidden"
        );
    }
    let mut lines = input.split(|&b| b == b'\n');
    let prefix = lines.nth(1).unwrap_or_default();
    let (url, kept) = dir_link(prefix, rel);
    assert!(
        url.starts_with('/') && !url.starts_with("//"),
        "a link off this site: {url:?}"
    );
    assert!(
        url.bytes()
            .all(|b| b.is_ascii_graphic() && !b"\"<>\\?#".contains(&b)),
        "{url:?} has a byte a link must not"
    );
    let back = resolve(root, &url[kept..]);
    assert_eq!(back.as_deref(), Some(asked), "{url:?} leads elsewhere");
    let name = input.rsplit(|&b| b == b'\n').next().unwrap_or_default();
    if !name.is_empty()
        && !name.contains(&b'/')
        && !name.contains(&0)
        && name != b"."
        && name != b".."
    {
        let link = format!("{}{}", &url[kept..], name_link(name));
        let want = asked.join(std::ffi::OsStr::from_bytes(name));
        assert_eq!(resolve(root, &link), Some(want), "{link:?} leads elsewhere");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&len_byte, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let root = Path::new("/srv/files");
    if let Some(p) = resolve(root, text) {
        assert!(p.starts_with(root), "{p:?} left the root");
        assert!(
            p.components().all(|c| c != Component::ParentDir),
            "{p:?} climbs"
        );
        links(root, &p, rest);
    }
    // File lengths around the edges: empty, tiny, and near u64's end.
    let len = match len_byte % 4 {
        0 => 0,
        1 => u64::from(len_byte),
        2 => u64::MAX - u64::from(len_byte),
        _ => 1 << 40,
    };
    match byte_range(text, len) {
        Ranged::Part { start, end } => assert!(start <= end && end < len, "{text:?} {len}"),
        Ranged::Whole | Ranged::Unsatisfiable => {}
    }
    // The same text as every conditional header, against a file with and without validators.
    if let Ok(value) = http::header::HeaderValue::from_str(text) {
        use http::header;
        let mut h = header::HeaderMap::new();
        for name in [
            header::IF_MATCH,
            header::IF_NONE_MATCH,
            header::IF_RANGE,
            header::IF_MODIFIED_SINCE,
            header::IF_UNMODIFIED_SINCE,
        ] {
            h.insert(name.clone(), value.clone());
            let mut one = header::HeaderMap::new();
            one.insert(name.clone(), value.clone());
            for v in [
                Validators {
                    etag: Some("\"a-1.0-3\"".into()),
                    modified: Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1 << 30)),
                    changed: Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1 << 30)),
                },
                Validators {
                    etag: None,
                    modified: None,
                    changed: None,
                },
            ] {
                let verdict = evaluate(&one, &v);
                let _ = evaluate(&h, &v);
                if v.etag.is_none() && v.modified.is_none() && v.changed.is_none() {
                    // Nothing to compare with (a listing, a file too fresh): no 304 but for
                    // `If-None-Match: *`, and no `If-Range` keeps a range.
                    match verdict {
                        Verdict::NotModified => assert!(
                            name == header::IF_NONE_MATCH && text.trim() == "*",
                            "304 without validators for {name}: {text:?}"
                        ),
                        Verdict::Serve { range } => {
                            assert!(!range || name != header::IF_RANGE, "{text:?}")
                        }
                        Verdict::PreconditionFailed => {}
                    }
                }
            }
        }
    }
});
