//! The zone config as DNS TXT strings for `_zonegate.DOMAIN`.
//!
//! Each string is `zg1:I/N:DATA`: the format version, this chunk's index (1-based) and the chunk
//! count, then a slice of the base58 text of the compact signed zone JSON. Every string is at
//! most 255 bytes (one TXT character-string). Indexes make the chunks self-ordering, so it does
//! not matter whether a DNS host publishes them as one record or as several (an RRset has no order).

use crate::config::SignedZone;
use crate::error::ZoneError;

/// Version prefix of this chunk format.
pub const PREFIX: &str = "zg1:";
/// One TXT character-string holds at most 255 bytes (RFC 1035 §3.3).
pub const MAX_STRING: usize = 255;
/// Bound on chunks: 999 × ~245 bytes ≈ 240 KB of base58, above the zone.json limit.
pub const MAX_CHUNKS: usize = 999;

/// Splits a signed zone into TXT strings, in order.
pub fn to_txt(zone: &SignedZone) -> Vec<String> {
    chunk(&zone.to_json_compact())
}

/// Splits arbitrary bytes into TXT strings (the layer under [`to_txt`]).
pub fn chunk(payload: &[u8]) -> Vec<String> {
    let b58 = bs58::encode(payload).into_string();
    // Header is at most "zg1:999/999:" = 12 bytes; base58 is ASCII so byte slicing is safe.
    let room = MAX_STRING - (PREFIX.len() + 8);
    let parts: Vec<&str> = if b58.is_empty() {
        vec![""]
    } else {
        b58.as_bytes()
            .chunks(room)
            .map(|c| std::str::from_utf8(c).expect("base58 is ASCII"))
            .collect()
    };
    let n = parts.len();
    parts
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{PREFIX}{}/{n}:{p}", i + 1))
        .collect()
}

/// Reassembles the payload from TXT strings in any order. Strings of other formats are skipped.
pub fn unchunk<S: AsRef<str>>(strings: &[S]) -> Result<Vec<u8>, ZoneError> {
    let err = |m: String| Err(ZoneError::Txt(m));
    let mut total: Option<usize> = None;
    let mut slots: Vec<Option<&str>> = Vec::new();
    let mut seen_other_version = false;
    for s in strings {
        let s = s.as_ref().trim();
        if s.len() > MAX_STRING {
            return err(format!(
                "a string is {} bytes, more than {MAX_STRING}",
                s.len()
            ));
        }
        let Some(rest) = s.strip_prefix(PREFIX) else {
            if s.starts_with("zg") {
                seen_other_version = true;
            }
            continue;
        };
        let (pos, data) = rest
            .split_once(':')
            .ok_or_else(|| ZoneError::Txt(format!("chunk {s:?} has no I/N: header")))?;
        let (i, n) = pos
            .split_once('/')
            .ok_or_else(|| ZoneError::Txt(format!("chunk header {pos:?} is not I/N")))?;
        let (i, n): (usize, usize) = match (i.parse(), n.parse()) {
            (Ok(i), Ok(n)) => (i, n),
            _ => return err(format!("chunk header {pos:?} is not I/N")),
        };
        if n == 0 || n > MAX_CHUNKS || i == 0 || i > n {
            return err(format!("chunk header {pos:?} is out of range"));
        }
        match total {
            None => {
                total = Some(n);
                slots = vec![None; n];
            }
            Some(t) if t != n => {
                return err(format!(
                "chunks disagree on the count ({t} and {n}): mixed records of two zone configs?"
            ))
            }
            Some(_) => {}
        }
        if slots[i - 1].replace(data).is_some_and(|prev| prev != data) {
            return err(format!("two different chunks numbered {i}"));
        }
    }
    let Some(n) = total else {
        return if seen_other_version {
            err("only zone config records of another format version: upgrade zonegate".into())
        } else {
            err(format!("no {PREFIX} strings found"))
        };
    };
    let missing: Vec<usize> = (1..=n).filter(|i| slots[i - 1].is_none()).collect();
    if !missing.is_empty() {
        return err(format!(
            "truncated: {} of {n} chunks missing (first missing: {})",
            missing.len(),
            missing[0]
        ));
    }
    let b58: String = slots.into_iter().flatten().collect();
    bs58::decode(&b58)
        .into_vec()
        .map_err(|e| ZoneError::Txt(format!("bad base58: {e}")))
}

/// Reassembles and parses a signed zone (verification is the caller's next step).
pub fn from_txt<S: AsRef<str>>(strings: &[S]) -> Result<SignedZone, ZoneError> {
    SignedZone::from_json(&unchunk(strings)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip_any_order(payload in proptest::collection::vec(any::<u8>(), 0..4000), seed in any::<u64>()) {
            let mut parts = chunk(&payload);
            for p in &parts {
                prop_assert!(p.len() <= MAX_STRING);
                prop_assert!(p.starts_with(PREFIX));
            }
            // Any order reassembles (a deterministic shuffle from the seed).
            let len = parts.len();
            for i in (1..len).rev() {
                let j = (seed.wrapping_mul(i as u64 + 1) % (i as u64 + 1)) as usize;
                parts.swap(i, j);
            }
            prop_assert_eq!(unchunk(&parts).unwrap(), payload);
        }

        #[test]
        fn never_panics(strings in proptest::collection::vec(".{0,300}", 0..8)) {
            let _ = unchunk(&strings);
        }
    }

    #[test]
    fn truncation_and_mixing_are_refused() {
        let parts = chunk(&[7u8; 1000]);
        assert!(parts.len() > 2);
        let e = unchunk(&parts[..parts.len() - 1]).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        let mut other = chunk(&[8u8; 3000]);
        other.truncate(1);
        let mut mixed = parts.clone();
        mixed.extend(other);
        assert!(unchunk(&mixed).is_err());
        assert!(unchunk(&["v=spf1 -all"])
            .unwrap_err()
            .to_string()
            .contains("no zg1:"));
        assert!(unchunk(&["zg2:1/1:abc"])
            .unwrap_err()
            .to_string()
            .contains("upgrade"));
        assert!(unchunk(&["zg1:2/1:abc"]).is_err());
        assert!(unchunk(&["zg1:1/1:0OIl"]).is_err());
    }
}
