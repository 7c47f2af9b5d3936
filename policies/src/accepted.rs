//! The last accepted policy's files, kept beside the policy directory (`DIR.accepted.json`),
//! with the edit a running gateway last refused.
//!
//! A running gateway refuses a bad edit and keeps serving the old policy, but the bad file
//! stays in the directory: without a copy of what served, the next start (a reboot, days
//! later) would find only the bad file and refuse to start at all. With it, a gateway that
//! finds the directory exactly as it refused it starts on the policy it served last and
//! reports that edit's errors ([`crate::PolicyStore::load_keeping_accepted`]). A directory in
//! any other state — edited while the gateway was stopped, a bundle copied in — is judged
//! as it is, as without a copy: its errors stop the start.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::Sources;

/// What the file holds.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Saved {
    /// Unix seconds.
    saved_at: i64,
    /// Each file's name in the directory and its text, as they served.
    files: Vec<SavedFile>,
    /// The directory as a running gateway last refused it, since `files` served.
    #[serde(default)]
    refused: Option<Refused>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SavedFile {
    name: String,
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Refused {
    /// Unix seconds.
    at: i64,
    files: Vec<SavedFile>,
    /// Policy files that were there but could not be read (too large, not a regular file).
    #[serde(default)]
    unreadable: Vec<String>,
    /// Why, as the reload reported it.
    errors: Vec<String>,
}

/// The copy as read back: the sources that served (as paths in the directory), when they
/// were saved, and the refused edit if the directory still holds exactly that.
#[derive(Debug)]
pub struct Copy {
    pub sources: Sources,
    pub saved_at: i64,
    /// (when, errors) of the refused edit the directory holds now.
    pub refused_now: Option<(i64, Vec<String>)>,
}

/// A policy directory as read: the files read, and the names of those that could not be.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    pub readable: &'a [(PathBuf, String)],
    pub unreadable: &'a [String],
}

/// The file names of read errors (the files that could not be read).
pub fn names_of(errs: &[crate::PolicyError]) -> Vec<String> {
    let mut v: Vec<String> = errs
        .iter()
        .filter_map(|e| e.path.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Where the copy of `dir`'s accepted policy is kept: `policies/` → `policies.accepted.json`
/// beside it. None for a directory without a name of its own (`/`). A path ending in `.` or
/// `..` is resolved; any other is made absolute without following links, so swapping a link
/// on the way (`current -> releases/v4`) keeps the copy where the running gateway wrote it.
pub fn path_for(dir: &Path) -> Option<PathBuf> {
    let dir = match dir.file_name() {
        Some(_) => std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()),
        None => std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()),
    };
    let name = dir.file_name()?.to_str()?;
    Some(dir.with_file_name(format!("{name}.accepted.json")))
}

fn files_of(sources: &[(PathBuf, String)]) -> Vec<SavedFile> {
    sources
        .iter()
        .map(|(p, text)| SavedFile {
            name: p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            text: text.clone(),
        })
        .collect()
}

/// Keeps `sources` (paths in the policy directory, texts) as the accepted copy at `path`,
/// with no refused edit, written whole or not at all. An unchanged copy is left as it is:
/// every start and reload would otherwise write it again.
pub fn save(path: &Path, sources: &[(PathBuf, String)], now: i64) -> std::io::Result<()> {
    let files = files_of(sources);
    if let Ok(old) = read(path) {
        if old.files == files && old.refused.is_none() {
            return Ok(());
        }
    }
    write(
        path,
        &Saved {
            saved_at: now,
            files,
            refused: None,
        },
    )
}

/// Records that a running gateway refused the directory as `refused` (what it read of it)
/// for `errors`, beside the `serving` files.
pub fn note_refused(
    path: &Path,
    serving: &[(PathBuf, String)],
    refused: &Seen<'_>,
    errors: &[String],
    now: i64,
) -> std::io::Result<()> {
    let files = files_of(serving);
    let refused_files = files_of(refused.readable);
    let saved_at = match read(path) {
        Ok(old) if old.files == files => {
            if old
                .refused
                .as_ref()
                .is_some_and(|r| r.files == refused_files && r.unreadable == refused.unreadable)
            {
                return Ok(());
            }
            old.saved_at
        }
        _ => now,
    };
    write(
        path,
        &Saved {
            saved_at,
            files,
            refused: Some(Refused {
                at: now,
                files: refused_files,
                unreadable: refused.unreadable.to_vec(),
                errors: errors.to_vec(),
            }),
        },
    )
}

/// Written whole or not at all, and synced, as the zone's own files are.
fn write(path: &Path, saved: &Saved) -> std::io::Result<()> {
    let json = serde_json::to_vec(saved).map_err(std::io::Error::other)?;
    zone_core::zonedir::write_atomic(path, &json, 0o644).map_err(std::io::Error::other)
}

/// The copy at `path`, its sources under `dir` (so messages and `explain` name the files the
/// user knows); `now_in_dir` is what the directory holds now (its readable files), compared
/// with the refused edit.
pub fn load(path: &Path, dir: &Path, now_in_dir: &Seen<'_>) -> Result<Copy, String> {
    let saved = read(path)?;
    let mut sources = Vec::with_capacity(saved.files.len());
    for f in saved.files {
        // Only plain file names: the copy is ours, but a hand-edited one must not make the
        // messages point outside the directory.
        if f.name.is_empty() || f.name.contains(['/', '\\']) || f.name.starts_with('.') {
            return Err(format!("{}: bad file name {:?}", path.display(), f.name));
        }
        sources.push((dir.join(f.name), f.text));
    }
    let now = files_of(now_in_dir.readable);
    let refused_now = saved
        .refused
        .filter(|r| r.files == now && r.unreadable == now_in_dir.unreadable)
        .map(|r| (r.at, r.errors));
    Ok(Copy {
        sources,
        saved_at: saved.saved_at,
        refused_now,
    })
}

/// Unix seconds as RFC 3339 (UTC), for messages.
pub(crate) fn when(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("at Unix time {secs}"))
}

fn read(path: &Path) -> Result<Saved, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(readable: &[(PathBuf, String)]) -> Seen<'_> {
        Seen {
            readable,
            unreadable: &[],
        }
    }

    #[test]
    fn the_copy_sits_beside_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("policies");
        std::fs::create_dir(&dir).unwrap();
        assert_eq!(
            path_for(&dir),
            Some(tmp.path().join("policies.accepted.json"))
        );
        // `.` names the directory it stands for.
        assert_eq!(path_for(&dir.join(".")), path_for(&dir));
        assert_eq!(
            path_for(Path::new("/nonexistent/zg/policies")),
            Some(PathBuf::from("/nonexistent/zg/policies.accepted.json"))
        );
        assert_eq!(path_for(Path::new("/")), None);
        // Links on the way are not followed (a deploy swaps them).
        let release = tmp.path().join("v3");
        std::fs::create_dir_all(release.join("policies")).unwrap();
        let link = tmp.path().join("current");
        std::os::unix::fs::symlink(&release, &link).unwrap();
        assert_eq!(
            path_for(&link.join("policies")),
            Some(link.join("policies.accepted.json"))
        );
        assert_eq!(
            path_for(&link),
            Some(tmp.path().join("current.accepted.json"))
        );
    }

    #[test]
    fn an_unreadable_file_is_part_of_the_refused_edit() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("policies");
        let path = path_for(&dir).unwrap();
        let good = vec![(dir.join("a.toml"), "[app.a]\n".to_string())];
        let big = ["big.toml".to_string()];
        save(&path, &good, 1).unwrap();
        let refused = Seen {
            readable: &good,
            unreadable: &big,
        };
        note_refused(&path, &good, &refused, &["big.toml: too large".into()], 2).unwrap();
        assert!(load(&path, &dir, &refused).unwrap().refused_now.is_some());
        // The large file gone: the directory is no longer the refused one.
        assert!(load(&path, &dir, &seen(&good))
            .unwrap()
            .refused_now
            .is_none());
    }

    #[test]
    fn the_refused_edit_is_recognised_only_while_the_directory_holds_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("policies");
        let path = path_for(&dir).unwrap();
        let good = vec![(dir.join("a.toml"), "[app.a]\n".to_string())];
        let bad = vec![(dir.join("a.toml"), "[app.a\n".to_string())];
        save(&path, &good, 100).unwrap();
        let c = load(&path, &dir, &seen(&bad)).unwrap();
        assert_eq!((c.sources.clone(), c.saved_at), (good.clone(), 100));
        assert!(c.refused_now.is_none(), "nothing was refused yet");
        note_refused(&path, &good, &seen(&bad), &["a.toml:1:7: bad".into()], 200).unwrap();
        let c = load(&path, &dir, &seen(&bad)).unwrap();
        assert_eq!(c.sources, good);
        assert_eq!(c.saved_at, 100, "the serving files' time is kept");
        assert_eq!(c.refused_now, Some((200, vec!["a.toml:1:7: bad".into()])));
        // Edited again (while stopped, say): no longer the refused edit.
        let other = vec![(dir.join("a.toml"), "[app.b\n".to_string())];
        assert!(load(&path, &dir, &seen(&other))
            .unwrap()
            .refused_now
            .is_none());
        // An accepted reload clears the record; unchanged copies are not rewritten.
        save(&path, &good, 300).unwrap();
        let c = load(&path, &dir, &seen(&bad)).unwrap();
        assert!(c.refused_now.is_none());
        assert_eq!(c.saved_at, 300);
        save(&path, &good, 400).unwrap();
        assert_eq!(load(&path, &dir, &seen(&good)).unwrap().saved_at, 300);
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "no temporary files left: {leftovers:?}");
    }

    #[test]
    fn a_copy_naming_files_elsewhere_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("p.accepted.json");
        std::fs::write(
            &path,
            r#"{"saved_at":1,"files":[{"name":"../../etc/x.toml","text":""}]}"#,
        )
        .unwrap();
        let e = load(&path, tmp.path(), &seen(&[])).unwrap_err();
        assert!(e.contains("bad file name"), "{e}");
        std::fs::write(&path, "not json").unwrap();
        assert!(load(&path, tmp.path(), &seen(&[])).is_err());
    }
}
