//! The zone config as DNS TXT strings for `_zonegate.DOMAIN`.
//!
//! Each string is `zg2:I/N:DATA`: the format version, this chunk's index (1-based) and the chunk
//! count, then the base58 of the I-th slice of [`CHUNK_BYTES`] bytes of the compact signed zone
//! JSON (the last slice may be shorter). Every string is at most 255 bytes (one TXT
//! character-string). Indexes make the chunks self-ordering, so it does not matter whether a DNS
//! host publishes them as one record or as several (an RRset has no order).
//!
//! Base58 is a big-number conversion whose cost grows with the square of its input, so each
//! chunk carries its own short base58 text. The earlier format `zg1`, one base58 text over the
//! whole zone cut into strings, took seconds for zones of a few dozen devices (5.3 s to encode
//! and 1.7 s to decode 64 KB) and let a forged DNS answer cost a node as much; it is refused
//! with a message that says to upgrade the gateway.

use crate::config::SignedZone;
use crate::error::ZoneError;

/// Version prefix of this chunk format.
pub const PREFIX: &str = "zg2:";
/// Prefix of the earlier whole-text format, recognized only to say what to do about it.
const OLD_PREFIX: &str = "zg1:";
/// One TXT character-string holds at most 255 bytes (RFC 1035 §3.3).
pub const MAX_STRING: usize = 255;
/// Bound on chunks: 9,999 × 176 bytes ≈ 1.7 MB, far above the zone.json limit, and the header
/// stays within 14 bytes ("zg2:9999/9999:").
pub const MAX_CHUNKS: usize = 9_999;
/// Payload bytes per chunk. Base58 of k bytes is at most ⌈k · 8 / log2 58⌉ characters (zero bytes
/// take one each, fewer); 176 bytes give at most 241 characters, which fits 255 less the
/// longest header.
pub const CHUNK_BYTES: usize = 176;

/// Splits a signed zone into TXT strings, in order.
pub fn to_txt(zone: &SignedZone) -> Vec<String> {
    chunk(&zone.to_json_compact())
}

/// Splits arbitrary bytes into TXT strings (the layer under [`to_txt`]).
pub fn chunk(payload: &[u8]) -> Vec<String> {
    let slices: Vec<&[u8]> = if payload.is_empty() {
        vec![&[]]
    } else {
        payload.chunks(CHUNK_BYTES).collect()
    };
    let n = slices.len();
    slices
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{PREFIX}{}/{n}:{}", i + 1, bs58::encode(p).into_string()))
        .collect()
}

/// Reassembles the payload from TXT strings in any order. Strings of other formats are skipped.
pub fn unchunk<S: AsRef<str>>(strings: &[S]) -> Result<Vec<u8>, ZoneError> {
    let err = |m: String| Err(ZoneError::Txt(m));
    let mut total: Option<usize> = None;
    let mut slots: Vec<Option<&str>> = Vec::new();
    let mut seen_old = false;
    let mut seen_other_version = false;
    for s in strings {
        let s = s.as_ref().trim();
        let Some(rest) = s.strip_prefix(PREFIX) else {
            if s.starts_with(OLD_PREFIX) {
                seen_old = true;
            } else if s.starts_with("zg") {
                seen_other_version = true;
            }
            continue;
        };
        // Ours only: another record's string may be anything, and one of non-UTF-8 bytes
        // grows past 255 in the lossy text the resolver hands over.
        if s.len() > MAX_STRING {
            return err(format!(
                "a string is {} bytes, more than {MAX_STRING}",
                s.len()
            ));
        }
        let (pos, data) = rest
            .split_once(':')
            .ok_or_else(|| ZoneError::Txt(format!("chunk {s:?} has no I/N: header")))?;
        let (i, n) = pos
            .split_once('/')
            .ok_or_else(|| ZoneError::Txt(format!("chunk header {pos:?} is not I/N")))?;
        let (i, n) = match (chunk_number(i), chunk_number(n)) {
            (Some(i), Some(n)) => (i, n),
            _ => return err(format!("chunk header {pos:?} is not I/N")),
        };
        // (`chunk_number` already refused 0.)
        if n > MAX_CHUNKS || i > n {
            return err(format!("chunk header {pos:?} is out of range"));
        }
        match total {
            None => {
                total = Some(n);
                slots = vec![None; n];
            }
            Some(t) if t != n => {
                return err(format!(
                "chunks disagree on the count ({t} and {n}): mixed records of two zone configs? Remove the old records, then publish the output of `zonegate zone dump-text`"
            ))
            }
            Some(_) => {}
        }
        if slots[i - 1].replace(data).is_some_and(|prev| prev != data) {
            return err(format!(
                "two different chunks numbered {i}: mixed records of two zone configs? Remove the old records, then publish the output of `zonegate zone dump-text`"
            ));
        }
    }
    let Some(n) = total else {
        return if seen_old {
            err(format!(
                "the zone config records are in format {OLD_PREFIX} of an older zonegate, which \
                 this version no longer reads: upgrade zonegate on the gateway that serves them \
                 (or, for a saved text, run `zonegate zone dump-text` again with this version)"
            ))
        } else if seen_other_version {
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
    let mut payload = Vec::with_capacity(n * CHUNK_BYTES);
    for (i, data) in slots.into_iter().flatten().enumerate() {
        let bytes = bs58::decode(data)
            .into_vec()
            .map_err(|e| ZoneError::Txt(format!("chunk {}: bad base58: {e}", i + 1)))?;
        // Only full slices before the last: one payload has exactly one chunking, and a chunk
        // cannot smuggle in more than its share.
        let fits = if i + 1 < n {
            bytes.len() == CHUNK_BYTES
        } else {
            bytes.len() <= CHUNK_BYTES && (n == 1 || !bytes.is_empty())
        };
        if !fits {
            return err(format!(
                "chunk {} of {n} holds {} bytes; every chunk but the last holds {CHUNK_BYTES} \
                 and the last 1 to {CHUNK_BYTES}",
                i + 1,
                bytes.len()
            ));
        }
        payload.extend_from_slice(&bytes);
    }
    Ok(payload)
}

/// A chunk index or count as [`chunk`] writes it: decimal digits without a sign or a leading
/// zero, so each chunk has exactly one spelling (`+1` or `01` would otherwise pass as a
/// second, different string for chunk 1).
fn chunk_number(s: &str) -> Option<usize> {
    let canonical = !s.is_empty()
        && s.len() <= 4
        && s.bytes().all(|c| c.is_ascii_digit())
        && !s.starts_with('0');
    canonical.then(|| s.parse().ok()).flatten()
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
            // Any order reassembles: a Fisher-Yates shuffle driven by an LCG from the seed
            // (`seed * (i + 1) % (i + 1)` was always 0: every swap was with the first chunk).
            let len = parts.len();
            let mut state = seed;
            for i in (1..len).rev() {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let j = ((state >> 33) % (i as u64 + 1)) as usize;
                parts.swap(i, j);
            }
            prop_assert_eq!(unchunk(&parts).unwrap(), payload);
        }

        #[test]
        fn never_panics(strings in proptest::collection::vec(".{0,300}", 0..8)) {
            let _ = unchunk(&strings);
        }

        /// Strings shaped like chunks (random text almost never starts `zg2:`, so the header,
        /// slot and base58 code went untried), and real chunks with their counts changed.
        #[test]
        fn chunk_shaped_strings_never_panic(
            strings in proptest::collection::vec(
                proptest::prop_oneof![
                    "zg2:[0-9]{0,5}/[0-9]{0,5}:[1-9A-HJ-NP-Za-km-z]{0,245}",
                    "zg2:[0-9/:]{0,12}[1-9A-HJ-NP-Za-km-z0OIl]{0,20}",
                ],
                0..6,
            ),
            payload in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
            index in 0usize..10,
            count in 0usize..10,
        ) {
            let _ = unchunk(&strings);
            let mut parts = chunk(&payload);
            let n = parts.len().max(1);
            if let Some(p) = parts.get_mut(index % n) {
                if let Some((_, data)) = p.rsplit_once(':') {
                    *p = format!("{PREFIX}{index}/{count}:{data}");
                }
            }
            parts.extend(strings);
            let _ = unchunk(&parts);
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
            .contains("no zg2:"));
        assert!(unchunk(&["zg3:1/1:abc"])
            .unwrap_err()
            .to_string()
            .contains("upgrade zonegate"));
        let e = unchunk(&["zg1:1/1:abc"]).unwrap_err().to_string();
        assert!(
            e.contains("older zonegate") && e.contains("dump-text"),
            "{e}"
        );
        assert!(unchunk(&["zg2:2/1:abc"]).is_err());
        // One spelling per header: no sign, no leading zero, no whitespace.
        let one = chunk(b"x").remove(0);
        assert_eq!(unchunk(&[&one]).unwrap(), b"x");
        for spelled in [
            "+1/1", "01/1", "1/01", "1/+1", " 1/1", "1/1 ", "0/1", "1/0", "1/00001",
        ] {
            let s = one.replacen("1/1", spelled, 1);
            let e = unchunk(&[&s]).unwrap_err().to_string();
            assert!(e.contains("chunk header"), "{spelled}: {e}");
        }
        assert!(unchunk(&["zg2:1/1:0OIl"]).is_err());
    }

    /// Another record's string at the name is skipped whatever its length: one of non-UTF-8
    /// bytes arrives as lossy text, three bytes for each.
    #[test]
    fn a_long_foreign_string_is_skipped() {
        let lossy = String::from_utf8_lossy(&[0xff; 90]).into_owned();
        assert_eq!(lossy.len(), 270);
        let mut strings = chunk(b"payload");
        strings.push(lossy);
        assert_eq!(unchunk(&strings).unwrap(), b"payload");
        let long_ours = format!("{PREFIX}1/1:{}", "2".repeat(260));
        let e = unchunk(&[long_ours]).unwrap_err().to_string();
        assert!(e.contains("more than 255"), "{e}");
    }

    #[test]
    fn every_string_fits_whatever_the_bytes() {
        // The longest base58 comes from the largest numbers; zeros are one character each.
        for fill in [0x00u8, 0x01, 0x80, 0xFF] {
            let payload = vec![fill; CHUNK_BYTES * 3 + 5];
            let parts = chunk(&payload);
            assert_eq!(parts.len(), 4);
            for p in &parts {
                assert!(p.len() <= MAX_STRING, "{} bytes: {p}", p.len());
            }
            assert_eq!(unchunk(&parts).unwrap(), payload);
        }
        // The widest header the decoder accepts leaves room for the widest chunk.
        let widest = format!(
            "{PREFIX}{MAX_CHUNKS}/{MAX_CHUNKS}:{}",
            bs58::encode([0xFF; CHUNK_BYTES]).into_string()
        );
        assert!(widest.len() <= MAX_STRING, "{}", widest.len());
        assert!(chunk(&[]) == vec![format!("{PREFIX}1/1:")]);
        assert_eq!(unchunk(&chunk(&[])).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn chunks_hold_exactly_their_share() {
        let payload: Vec<u8> = (0..400u32).map(|i| i as u8).collect();
        let mut parts = chunk(&payload);
        assert_eq!(parts.len(), 3);
        // A short chunk before the last would shift every byte after it.
        parts[0] = format!(
            "{PREFIX}1/3:{}",
            bs58::encode(&payload[..100]).into_string()
        );
        let e = unchunk(&parts).unwrap_err().to_string();
        assert!(e.contains("chunk 1 of 3 holds 100 bytes"), "{e}");
        // An empty last chunk is not the canonical chunking of any payload.
        let mut parts = chunk(&payload[..CHUNK_BYTES]);
        parts = vec![parts[0].replace("1/1:", "1/2:"), format!("{PREFIX}2/2:")];
        let e = unchunk(&parts).unwrap_err().to_string();
        assert!(e.contains("chunk 2 of 2 holds 0 bytes"), "{e}");
    }
}
