//! QUIC variable-length integers (RFC 9000 §16), minimal encodings only.
//!
//! The two high bits of the first byte give the length (00→1, 01→2, 10→4, 11→8 bytes), the
//! rest is the value, big-endian, so values reach 2^62-1. We picked the QUIC form over LEB128
//! because the length is known from the first byte (no byte-by-byte scan), and because it is
//! what every QUIC implementer already reads. Encoders always use the shortest form; decoders
//! reject longer forms so each value has exactly one encoding (fuzzers can then check that
//! re-encoding reproduces the input byte for byte).

use bytes::BufMut;

use super::ProtoError;

/// Largest value a varint carries.
pub const MAX_VARINT: u64 = (1 << 62) - 1;

/// Number of bytes `value` takes (1, 2, 4 or 8). Values above [`MAX_VARINT`] are a caller bug;
/// they are reported by [`encode`].
pub fn encoded_len(value: u64) -> usize {
    if value < (1 << 6) {
        1
    } else if value < (1 << 14) {
        2
    } else if value < (1 << 30) {
        4
    } else {
        8
    }
}

/// Appends the minimal encoding of `value`.
///
/// Every length and count in this protocol is bounded far below 2^62, so callers inside
/// `proto` only pass in-range values; the check protects external callers.
pub fn encode<B: BufMut>(value: u64, out: &mut B) -> Result<(), ProtoError> {
    match encoded_len(value) {
        1 => out.put_u8(value as u8),
        2 => out.put_u16(0x4000 | value as u16),
        4 => out.put_u32(0x8000_0000 | value as u32),
        _ if value <= MAX_VARINT => out.put_u64(0xc000_0000_0000_0000 | value),
        _ => {
            return Err(ProtoError::VarintTooLarge {
                field: "varint",
                value,
            })
        }
    }
    Ok(())
}

/// Decodes one varint from the start of `buf`: `Ok(None)` if `buf` is too short,
/// `Ok(Some((value, consumed)))`, or `VarintNonMinimal` for an overlong form.
pub fn decode(buf: &[u8]) -> Result<Option<(u64, usize)>, ProtoError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let len = 1usize << (first >> 6);
    let Some(bytes) = buf.get(..len) else {
        return Ok(None);
    };
    let mut value = u64::from(first & 0x3f);
    for &b in &bytes[1..] {
        value = (value << 8) | u64::from(b);
    }
    if encoded_len(value) != len {
        return Err(ProtoError::VarintNonMinimal);
    }
    Ok(Some((value, len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 9000 Appendix A.1 examples, except 0x4025 which is the RFC's own non-minimal form of 37.
    #[test]
    fn rfc_vectors() {
        let cases: &[(&[u8], u64)] = &[
            (
                &[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c],
                151_288_809_941_952_652,
            ),
            (&[0x9d, 0x7f, 0x3e, 0x7d], 494_878_333),
            (&[0x7b, 0xbd], 15_293),
            (&[0x25], 37),
        ];
        for &(bytes, value) in cases {
            assert_eq!(decode(bytes), Ok(Some((value, bytes.len()))));
            let mut out = Vec::new();
            encode(value, &mut out).unwrap();
            assert_eq!(out, bytes);
        }
        assert_eq!(decode(&[0x40, 0x25]), Err(ProtoError::VarintNonMinimal));
    }

    #[test]
    fn bounds() {
        for v in [
            0,
            63,
            64,
            16_383,
            16_384,
            (1 << 30) - 1,
            1 << 30,
            MAX_VARINT,
        ] {
            let mut out = Vec::new();
            encode(v, &mut out).unwrap();
            assert_eq!(out.len(), encoded_len(v));
            assert_eq!(decode(&out), Ok(Some((v, out.len()))));
            for cut in 0..out.len() {
                assert_eq!(decode(&out[..cut]), Ok(None));
            }
        }
        assert!(encode(MAX_VARINT + 1, &mut Vec::new()).is_err());
    }
}
