//! One UDP flow datagram onto a QUIC connection: encoded with its flow id and sent, a datagram
//! larger than the path carries reported with the limit (quinn drops it; the caller counts it
//! and says so once per flow, where it used to vanish without a trace), and one that finds
//! the connection's datagram queue full dropped and reported alike.

use bytes::BytesMut;
use quinn::{Connection, SendDatagramError};

use crate::error::TunnelError;
use crate::proto;

/// Sends `payload` as a datagram of flow `flow_id` on `conn`.
pub fn send(conn: &Connection, flow_id: u32, payload: &[u8]) -> Result<(), TunnelError> {
    let mut b = BytesMut::with_capacity(payload.len() + 8);
    proto::encode_datagram(flow_id, payload, &mut b)?;
    let header = b.len() - payload.len();
    // The newest is dropped when the queue is full: quinn would drop the oldest, another
    // flow's, which was counted as sent.
    if conn.datagram_send_buffer_space() < b.len() {
        return Err(TunnelError::DatagramQueueFull);
    }
    conn.send_datagram(b.freeze()).map_err(|e| match e {
        SendDatagramError::TooLarge => TunnelError::DatagramTooLarge {
            len: payload.len(),
            max: conn
                .max_datagram_size()
                .map_or(0, |m| m.saturating_sub(header)),
        },
        other => TunnelError::Datagram(other.to_string()),
    })
}
