//! Fuzz seed corpus (`fuzz/seeds/<target>/`), generated from the known-answer vectors.
//!
//! The committed files must equal what this test generates, so a format change cannot leave
//! the corpus stale. Regenerate with:
//! `ZONEGATE_WRITE_FUZZ_SEEDS=1 cargo test -p tunnel --test proto seeds`

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::vectors::{control_vectors, datagram_vectors, header_vectors, hex, reply_vectors};

fn seeds() -> BTreeMap<(&'static str, String), Vec<u8>> {
    let mut out = BTreeMap::new();
    for (name, _, bytes) in header_vectors() {
        out.insert(("stream_header", format!("header_{name}")), bytes);
    }
    for (name, _, bytes) in reply_vectors() {
        out.insert(("stream_header", format!("reply_{name}")), bytes);
    }
    // control_frame inputs: one byte choosing the chunk size, then the stream.
    let mut all = vec![7u8];
    for (name, _, bytes) in control_vectors() {
        all.extend_from_slice(&bytes);
        let mut seed = vec![0u8];
        seed.extend_from_slice(&bytes);
        out.insert(("control_frame", name.to_string()), seed);
    }
    all.extend_from_slice(&hex("3f 03 aabbcc"));
    out.insert(("control_frame", "all_with_unknown".into()), all);
    for (name, _, _, bytes) in datagram_vectors() {
        out.insert(("datagram", name.to_string()), bytes);
    }
    out
}

#[test]
fn fuzz_seeds_are_current() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
    let seeds = seeds();
    assert!(
        seeds.len() >= 25,
        "expected a seed per vector, got {}",
        seeds.len()
    );
    let write = std::env::var_os("ZONEGATE_WRITE_FUZZ_SEEDS").is_some();
    for ((target, name), bytes) in &seeds {
        let path = root.join(target).join(name);
        if write {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, bytes).unwrap();
        } else {
            let on_disk = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("{}: {e}; regenerate the seeds", path.display()));
            assert_eq!(
                &on_disk,
                bytes,
                "{} is stale; regenerate the seeds",
                path.display()
            );
        }
    }
}
