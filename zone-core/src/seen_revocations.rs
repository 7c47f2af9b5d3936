//! The revocations a device has seen in verified zone configs, kept in its bundle beside
//! zone.json ([`FILE_NAME`]), so that a restart cannot forget them.
//!
//! A zone directory restored from a backup made before a revocation signs configs without it,
//! and their serial (the clock: [`crate::zonedir::next_serial`]) outranks the one that revoked.
//! Running devices refuse such a config; a device restarted with it in its bundle would load it
//! (only its signature is checked then) and let the revoked device back in. With this file it
//! keeps refusing that device: a revoked name never comes back.
//!
//! The format is a list of device names, one per line; `#` starts a comment.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::error::ZoneError;
use crate::names::DeviceName;
use crate::zonedir::write_atomic;

/// The file's name in a device's bundle.
pub const FILE_NAME: &str = "zone-revoked.txt";

const HEADER: &str = "# Devices this device has seen revoked in a signed zone.json. zonegate keeps this file:\n# a revoked name never comes back, whatever zone.json a restart loads. Do not edit.\n";

/// Where the file is for the bundle whose zone.json is `zone_json`.
pub fn path_beside(zone_json: &Path) -> PathBuf {
    zone_json.with_file_name(FILE_NAME)
}

/// The names the file lists, or the first line that is no device name.
pub fn parse(text: &str) -> Result<BTreeSet<DeviceName>, String> {
    let mut out = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let name = DeviceName::new(line).map_err(|e| format!("line {}: {e}", i + 1))?;
        out.insert(name);
    }
    Ok(out)
}

/// The file's text for `names`.
pub fn render(names: &BTreeSet<DeviceName>) -> String {
    let mut s = String::from(HEADER);
    for n in names {
        s.push_str(n.as_str());
        s.push('\n');
    }
    s
}

/// The names in the file at `path`; none when there is no file.
pub fn read(path: &Path) -> Result<BTreeSet<DeviceName>, ZoneError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(ZoneError::io(path, e)),
    };
    parse(&text).map_err(|why| ZoneError::BadFile {
        path: path.to_owned(),
        what: "list of revoked devices",
        why,
    })
}

/// Writes `names` to `path` (atomically: a crash leaves the old list or the new one).
pub fn write(path: &Path, names: &BTreeSet<DeviceName>) -> Result<(), ZoneError> {
    write_atomic(path, render(names).as_bytes(), 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_reads_back_what_was_written_and_refuses_what_is_no_name() {
        let names: BTreeSet<DeviceName> = ["laptop", "old-nas"]
            .iter()
            .map(|n| DeviceName::new(n).unwrap())
            .collect();
        assert_eq!(parse(&render(&names)).unwrap(), names);
        assert_eq!(parse("laptop  # stolen\n\n  old-nas\n").unwrap(), names);
        let e = parse("laptop\nNot A Name\n").unwrap_err();
        assert!(e.starts_with("line 2:"), "{e}");
    }

    #[test]
    fn a_missing_file_is_an_empty_list() {
        let dir = tempfile::tempdir().unwrap();
        let p = path_beside(&dir.path().join("zone.json"));
        assert_eq!(p.file_name().unwrap(), FILE_NAME);
        assert!(read(&p).unwrap().is_empty());
        let names = BTreeSet::from([DeviceName::new("laptop").unwrap()]);
        write(&p, &names).unwrap();
        assert_eq!(read(&p).unwrap(), names);
        std::fs::write(&p, "laptop\n-bad-\n").unwrap();
        assert!(read(&p).unwrap_err().to_string().contains("line 2"));
    }
}
