//! The UDP socket under a QUIC endpoint: kernel buffers sized for bulk transfers, and GSO
//! batches kept within what one `sendmsg` can carry, so path MTU discovery may go past Ethernet.
//!
//! quinn asks for up to 10 datagrams of the path's MTU in one segmentation-offload (GSO) send.
//! The kernel refuses a send whose payload exceeds one IP packet's (65,507 bytes for IPv4) with
//! `EMSGSIZE`, which quinn-udp treats as a lost MTU probe and drops silently: with an MTU above
//! ~6.5 KB (jumbo Ethernet, loopback, containers on one host) whole batches vanished and the
//! connection crawled through loss recovery. [`GsoBounded`] splits such a batch at segment
//! boundaries into sends the kernel takes; the datagrams are not copied.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};

use crate::error::TunnelError;

/// Kernel buffer asked for each QUIC UDP socket, both directions. The common default (208 KiB)
/// overflows under a bulk transfer even on loopback (measured: ~4,700 `UdpRcvbufErrors` in
/// 16 s of iperf3 through the tunnel, none with 4 MiB), and every overflow is a lost packet the
/// congestion controller answers by slowing down. The kernel caps the request at
/// `net.core.rmem_max`/`wmem_max`. Memory stays bounded by the flow-control windows, not by
/// this: a sender may only have as much stream data in flight as the receiver granted.
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// The capped buffers were told ([`bind`]).
static BUFFERS_TOLD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Largest UDP payload one send may carry, all GSO segments together: an IPv4 packet's 65,535
/// bytes less its 20-byte header and the 8-byte UDP header (IPv6 allows 20 more; one bound
/// for both keeps it simple and costs nothing at the MTUs where batches are split).
pub const MAX_SEND_PAYLOAD: usize = 65_507;

/// Binds a UDP socket for a QUIC endpoint, with [`SOCKET_BUFFER`]-sized kernel buffers where
/// the system allows (best effort: a smaller buffer still works, only slower under load), and
/// wraps it for `runtime` in [`GsoBounded`].
pub fn bind(
    bind: SocketAddr,
    what: &'static str,
    runtime: &dyn Runtime,
) -> Result<Arc<dyn AsyncUdpSocket>, TunnelError> {
    let socket = crate::sockets::std_udp(bind).map_err(|error| TunnelError::Bind {
        what,
        addr: bind,
        error,
    })?;
    match quinn::udp::UdpSocketState::new((&socket).into()) {
        Ok(st) => {
            // Each on its own: a refused receive buffer must not leave the send one unset.
            let _ = st.set_recv_buffer_size((&socket).into(), SOCKET_BUFFER);
            let _ = st.set_send_buffer_size((&socket).into(), SOCKET_BUFFER);
            let recv = st.recv_buffer_size((&socket).into()).unwrap_or(0);
            let send = st.send_buffer_size((&socket).into()).unwrap_or(0);
            tracing::debug!(%bind, recv, send, "UDP socket buffers");
            // Linux caps the sizes at net.core.rmem_max/wmem_max without an error (and
            // reports double what it grants): capped, a burst overflows the receive buffer
            // and the drops read as loss to the congestion controller. Said once a process.
            if (recv < SOCKET_BUFFER || send < SOCKET_BUFFER)
                && !BUFFERS_TOLD.swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                tracing::warn!(%bind, recv, send, wanted = SOCKET_BUFFER, "UDP socket buffers capped by the kernel: raise them for bursts at full speed (sysctl -w net.core.rmem_max=4194304 net.core.wmem_max=4194304)");
            }
        }
        Err(e) => tracing::debug!(%bind, error = %e, "UDP socket buffers left at the default"),
    }
    let inner = runtime
        .wrap_udp_socket(socket)
        .map_err(|e| TunnelError::Config(format!("cannot {what} UDP {bind}: {e}")))?;
    Ok(Arc::new(GsoBounded { inner }))
}

/// A runtime's UDP socket whose sends never exceed [`MAX_SEND_PAYLOAD`] (module docs).
pub struct GsoBounded {
    inner: Arc<dyn AsyncUdpSocket>,
}

impl fmt::Debug for GsoBounded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("GsoBounded").field(&self.inner).finish()
    }
}

impl AsyncUdpSocket for GsoBounded {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    /// Sends the batch in as few sends as fit. Should a later part find the socket full, the
    /// error goes back to quinn, which offers the whole batch again once the socket is writable:
    /// the parts already sent arrive twice and the receiver drops them as duplicates, which is
    /// cheaper and kinder to congestion control than losing the rest.
    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let Some(segment) = transmit.segment_size else {
            return self.inner.try_send(transmit);
        };
        for part in send_parts(transmit.contents.len(), segment) {
            self.inner.try_send(&Transmit {
                contents: &transmit.contents[part],
                ..*transmit
            })?;
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// Splits `len` bytes of datagrams of `segment` bytes each (the last may be shorter) into byte
/// ranges of whole datagrams, each at most [`MAX_SEND_PAYLOAD`] long unless a single datagram
/// is longer (it then goes alone, and the kernel judges it against the path).
pub fn send_parts(len: usize, segment: usize) -> impl Iterator<Item = Range<usize>> {
    let step = (MAX_SEND_PAYLOAD / segment.max(1)).max(1) * segment.max(1);
    (0..len)
        .step_by(step)
        .map(move |start| start..len.min(start + step))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records each send's length and segment size; refuses the send numbered `full_at` as a
    /// full socket would.
    #[derive(Debug, Default)]
    struct Recorder {
        sent: Mutex<Vec<(usize, Option<usize>)>>,
        full_at: Option<usize>,
    }

    #[derive(Debug)]
    struct AlwaysWritable;

    impl UdpPoller for AlwaysWritable {
        fn poll_writable(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncUdpSocket for Recorder {
        fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
            Box::pin(AlwaysWritable)
        }
        fn try_send(&self, t: &Transmit<'_>) -> io::Result<()> {
            let mut sent = self.sent.lock().unwrap();
            if self.full_at == Some(sent.len()) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            sent.push((t.contents.len(), t.segment_size));
            Ok(())
        }
        fn poll_recv(
            &self,
            _: &mut Context<'_>,
            _: &mut [IoSliceMut<'_>],
            _: &mut [RecvMeta],
        ) -> Poll<io::Result<usize>> {
            Poll::Pending
        }
        fn local_addr(&self) -> io::Result<SocketAddr> {
            Ok(([127, 0, 0, 1], 4433).into())
        }
    }

    fn batch(contents: &[u8], segment_size: Option<usize>) -> Transmit<'_> {
        Transmit {
            destination: ([127, 0, 0, 1], 4434).into(),
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        }
    }

    #[test]
    fn oversized_batches_go_out_in_parts_and_a_full_socket_is_reported() {
        let rec = Arc::new(Recorder::default());
        let sock = GsoBounded { inner: rec.clone() };
        let data = vec![7u8; 10 * 8_952];
        sock.try_send(&batch(&data, Some(8_952))).unwrap();
        sock.try_send(&batch(&data[..14_520], Some(1_452))).unwrap();
        sock.try_send(&batch(&data[..1_200], None)).unwrap();
        assert_eq!(
            *rec.sent.lock().unwrap(),
            [
                (62_664, Some(8_952)),
                (26_856, Some(8_952)),
                (14_520, Some(1_452)),
                (1_200, None)
            ]
        );

        // The second part finds the socket full: quinn must hear it, to offer the batch again.
        let rec = Arc::new(Recorder {
            full_at: Some(1),
            ..Recorder::default()
        });
        let sock = GsoBounded { inner: rec.clone() };
        let err = sock.try_send(&batch(&data, Some(8_952))).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(*rec.sent.lock().unwrap(), [(62_664, Some(8_952))]);
    }

    fn parts(len: usize, segment: usize) -> Vec<(usize, usize)> {
        send_parts(len, segment).map(|r| (r.start, r.end)).collect()
    }

    #[test]
    fn batches_within_one_send_stay_whole() {
        assert_eq!(parts(14_520, 1_452), [(0, 14_520)]);
        assert_eq!(parts(13_100, 1_452), [(0, 13_100)]);
        assert_eq!(parts(900, 1_452), [(0, 900)]);
        assert_eq!(parts(0, 1_452), []);
    }

    #[test]
    fn larger_batches_split_at_datagram_boundaries() {
        // Jumbo frames: 10 datagrams of 8,952 bytes, 7 fit in one send.
        let parts: Vec<_> = send_parts(89_520, 8_952).collect();
        assert_eq!(parts, [0..62_664, 62_664..89_520]);
        // Loopback-sized datagrams go one per send; the short last one too.
        let parts: Vec<_> = send_parts(3 * 65_000 + 10, 65_000).collect();
        assert_eq!(
            parts,
            [
                0..65_000,
                65_000..130_000,
                130_000..195_000,
                195_000..195_010
            ]
        );
        for (len, seg) in [
            (100_000, 1),
            (65_508, 65_508),
            (200_000, 30_000),
            (65_507, 7),
        ] {
            let parts: Vec<_> = send_parts(len, seg).collect();
            assert_eq!(parts.first().map(|p| p.start), Some(0));
            assert_eq!(parts.last().map(|p| p.end), Some(len));
            for w in parts.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
            for p in &parts {
                assert!(p.start % seg == 0, "{len}/{seg}: {p:?} starts mid-datagram");
                assert!(
                    p.len() <= MAX_SEND_PAYLOAD.max(seg),
                    "{len}/{seg}: {p:?} too long"
                );
            }
        }
    }
}
