//! Name and text rules shared by every message: DNS-label names and log-safe free text.

use super::limits::MAX_NAME_LEN;
use super::ProtoError;

/// Checks a device, service or app name: 1..=63 bytes of `[a-z0-9-]`, not starting or ending
/// with `-` (one DNS label, the same rule as `zone_core::names::DeviceName`). `field` names the
/// field in the error.
pub fn validate_name(field: &'static str, name: &str) -> Result<(), ProtoError> {
    validate_name_bytes(field, name.as_bytes())
}

pub(crate) fn validate_name_bytes(field: &'static str, name: &[u8]) -> Result<(), ProtoError> {
    let why = if name.is_empty() {
        "empty"
    } else if name.len() > MAX_NAME_LEN {
        "longer than 63 bytes"
    } else if !name
        .iter()
        .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        "only a-z, 0-9 and '-' are allowed"
    } else if name.first() == Some(&b'-') || name.last() == Some(&b'-') {
        "must not start or end with '-'"
    } else {
        return Ok(());
    };
    Err(ProtoError::InvalidName { field, why })
}

/// Local text (an error's message, a reason) made fit for a text field of at most `max` bytes:
/// control characters become spaces and the text is cut at a character boundary, so it
/// passes [`validate_text`] instead of failing the encoder and leaving nothing sent.
pub fn wire_text(text: &str, max: usize) -> String {
    let mut text: String = text
        .chars()
        .map(|c| if unfit_for_logs(c) { ' ' } else { c })
        .collect();
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

/// Checks free text (reasons, messages, versions): at most `max` bytes, and no control
/// characters, because these strings are written into log lines and a peer must not be able
/// to forge or split lines.
pub fn validate_text(field: &'static str, text: &str, max: usize) -> Result<(), ProtoError> {
    if text.len() > max {
        return Err(ProtoError::FieldTooLong {
            field,
            len: text.len() as u64,
            max,
        });
    }
    if text.chars().any(unfit_for_logs) {
        return Err(ProtoError::ControlChar { field });
    }
    Ok(())
}

/// Control characters, and the format characters that rearrange or split a line where it is
/// shown — Unicode's line and paragraph separators and the bidirectional overrides, embeddings,
/// isolates and marks (a version string holding U+202E read backwards in a log viewer; one
/// holding U+2028 showed as a second, forged line).
pub fn unfit_for_logs(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
        )
}

#[cfg(test)]
mod wire_text_tests {
    use super::*;
    use crate::proto::{encode_stream_reply, RefuseCode, StreamReply};

    /// A refusal's reason is an error's message: long, multi-byte, multi-line. Cut by
    /// characters (as it once was) 200 × "é" stayed 400 bytes and failed the encoder.
    #[test]
    fn any_local_text_fits_a_reason() {
        let texts = [
            "é".repeat(200),
            "x".repeat(300),
            "line one\nline two\r\tthree\u{7f}".to_owned(),
            format!("{}€", "a".repeat(254)),
            String::new(),
        ];
        for text in texts {
            let t = wire_text(&text, 256);
            assert!(
                t.len() <= 256 && validate_text("reason", &t, 256).is_ok(),
                "{t:?}"
            );
            assert!(text.starts_with(&t) || text.chars().any(char::is_control));
            let reply = StreamReply::Refused {
                code: RefuseCode::NoSuchService,
                reason: t,
            };
            encode_stream_reply(&reply, &mut bytes::BytesMut::new()).expect("encodes");
        }
        assert_eq!(wire_text("a\nb", 10), "a b");
        assert_eq!(wire_text("a\u{2028}b\u{202e}c", 20), "a b c");
        for forged in [
            "1.0\u{2028}INFO tunnel up",
            "\u{202e}0.1",
            "x\u{2066}y",
            "\u{200f}",
        ] {
            assert!(
                validate_text("agent_version", forged, 64).is_err(),
                "{forged:?}"
            );
        }
        assert!(validate_text("agent_version", "0.1.0 (é, ü)", 64).is_ok());
    }
}
