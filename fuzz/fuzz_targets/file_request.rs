//! Fuzzes what `zonegate files` reads from a request: the target path (`files::resolve`) and
//! the `Range` value (`files::byte_range`). A path never resolves outside the root (no `..`
//! survives, the result lies under it); a range part always lies inside the file; neither
//! panics.
#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use zonegate::files::{byte_range, resolve, Ranged};

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
});
