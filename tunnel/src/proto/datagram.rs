//! UDP flow datagrams: `flow id varint | payload` in one QUIC datagram.
//!
//! QUIC datagrams arrive whole, so these decoders have no "need more bytes" case: a short
//! datagram is an error. The payload is the rest of the datagram and may be empty (UDP allows
//! empty datagrams).

use bytes::{BufMut, Bytes};

use super::codec::{put_varint, Need, Reader};
use super::limits::MAX_DATAGRAM_PAYLOAD;
use super::{varint, ProtoError};

/// Bytes a datagram for `flow_id` adds before the payload, for sizing against the path's
/// `max_datagram_size`.
pub fn datagram_overhead(flow_id: u32) -> usize {
    varint::encoded_len(u64::from(flow_id))
}

/// Appends a flow datagram; on error nothing is written.
pub fn encode_datagram<B: BufMut>(
    flow_id: u32,
    payload: &[u8],
    out: &mut B,
) -> Result<(), ProtoError> {
    if payload.len() > MAX_DATAGRAM_PAYLOAD {
        return Err(ProtoError::FieldTooLong {
            field: "datagram payload",
            len: payload.len() as u64,
            max: MAX_DATAGRAM_PAYLOAD,
        });
    }
    put_varint(out, u64::from(flow_id))?;
    out.put_slice(payload);
    Ok(())
}

/// Splits a received datagram into flow id and payload (borrowed).
pub fn decode_datagram(buf: &[u8]) -> Result<(u32, &[u8]), ProtoError> {
    if buf.is_empty() {
        return Err(ProtoError::EmptyDatagram);
    }
    let mut r = Reader::new(buf);
    let flow_id = r.varint_u32("flow id").map_err(|need| match need {
        Need::More => ProtoError::Truncated { what: "datagram" },
        Need::Bad(e) => e,
    })?;
    let payload = r.rest();
    if payload.len() > MAX_DATAGRAM_PAYLOAD {
        return Err(ProtoError::FieldTooLong {
            field: "datagram payload",
            len: payload.len() as u64,
            max: MAX_DATAGRAM_PAYLOAD,
        });
    }
    Ok((flow_id, payload))
}

/// Like [`decode_datagram`] on quinn's `Bytes`, without copying the payload.
pub fn decode_datagram_bytes(datagram: Bytes) -> Result<(u32, Bytes), ProtoError> {
    let (flow_id, payload) = decode_datagram(&datagram)?;
    let start = datagram.len() - payload.len();
    Ok((flow_id, datagram.slice(start..)))
}
