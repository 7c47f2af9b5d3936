//! The last accepted policy's files, kept beside the policy directory (`DIR.accepted.json`).
//!
//! A running gateway refuses a bad edit and keeps serving the old policy, but the bad file
//! stays in the directory: without a copy of what served, the next start (a reboot, days
//! later) would find only the bad file and refuse to start at all. With it, the gateway
//! starts on the policy it served last and reports the directory's errors until they are
//! fixed ([`crate::PolicyStore::load_keeping_accepted`]).

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What the copy holds: each file's name in the directory and its text, as they compiled.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Saved {
    /// Unix seconds.
    saved_at: i64,
    files: Vec<SavedFile>,
}

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct SavedFile {
    name: String,
    text: String,
}

/// Where the copy of `dir`'s accepted policy is kept: `policies/` → `policies.accepted.json`
/// beside it. None for a directory without a name of its own (`/`, `..`).
pub fn path_for(dir: &Path) -> Option<PathBuf> {
    let name = dir.file_name()?.to_str()?;
    Some(dir.with_file_name(format!("{name}.accepted.json")))
}

/// Keeps `sources` (paths in the policy directory, texts) as the accepted copy at `path`,
/// written whole or not at all (a temporary file renamed over it). An unchanged copy is left
/// as it is: every start and reload would otherwise write it again.
pub fn save(path: &Path, sources: &[(PathBuf, String)], now: i64) -> std::io::Result<()> {
    let files: Vec<SavedFile> = sources
        .iter()
        .map(|(p, text)| SavedFile {
            name: p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            text: text.clone(),
        })
        .collect();
    if let Ok(old) = read(path) {
        if old.files == files {
            return Ok(());
        }
    }
    let json = serde_json::to_vec(&Saved {
        saved_at: now,
        files,
    })
    .map_err(std::io::Error::other)?;
    let tmp = path.with_extension(format!("json.tmp.{}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    // The rename itself must survive a power cut too.
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// The accepted copy at `path` as sources under `dir` (so messages and `explain` name the
/// files the user knows), and when it was saved (Unix seconds).
pub fn load(path: &Path, dir: &Path) -> Result<(crate::Sources, i64), String> {
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
    Ok((sources, saved.saved_at))
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

    #[test]
    fn the_copy_sits_beside_the_directory() {
        assert_eq!(
            path_for(Path::new("/etc/zg/policies")),
            Some(PathBuf::from("/etc/zg/policies.accepted.json"))
        );
        assert_eq!(
            path_for(Path::new("policies/")),
            Some(PathBuf::from("policies.accepted.json"))
        );
        assert_eq!(path_for(Path::new("/")), None);
    }

    #[test]
    fn saved_sources_load_under_the_directory_and_unchanged_ones_are_not_rewritten() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("policies");
        let path = path_for(&dir).unwrap();
        let sources = vec![
            (dir.join("a.toml"), "[app.a]\n".to_string()),
            (dir.join("b.toml"), "# b\n".to_string()),
        ];
        save(&path, &sources, 100).unwrap();
        assert_eq!(load(&path, &dir).unwrap(), (sources.clone(), 100));
        save(&path, &sources, 200).unwrap();
        assert_eq!(
            load(&path, &dir).unwrap().1,
            100,
            "unchanged: not written again"
        );
        save(&path, &sources[..1], 300).unwrap();
        assert_eq!(load(&path, &dir).unwrap(), (sources[..1].to_vec(), 300));
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
        assert!(load(&path, tmp.path())
            .unwrap_err()
            .contains("bad file name"));
        std::fs::write(&path, "not json").unwrap();
        assert!(load(&path, tmp.path()).is_err());
    }
}
