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
    if text.chars().any(char::is_control) {
        return Err(ProtoError::ControlChar { field });
    }
    Ok(())
}
