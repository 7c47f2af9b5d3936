//! End-to-end encryption of relayed mesh streams: Noise IK between the two devices, so the
//! gateway that relays the stream forwards ciphertext only (DESIGN.md, "Device↔device").
//!
//! # Keys
//!
//! A device's Noise static key is its ed25519 device key mapped to X25519 (the standard
//! birational map: the secret is the clamped-on-use SHA-512 half of the seed,
//! [`SigningKey::to_scalar_bytes`]; the public key is the Montgomery form of the ed25519 point,
//! [`VerifyingKey::to_montgomery`]). So anyone holding the signed zone config, which lists every
//! device's ed25519 public key, knows every device's Noise public key; nothing new is
//! distributed and nothing new can go stale.
//!
//! # Handshake
//!
//! `Noise_IK_25519_ChaChaPoly_BLAKE2s`. After the stream reply `Accepted`, the opener (device A,
//! initiator) knows the target B's static key from zone.json and sends IK message 1; B (the
//! responder) learns A's static key from it and checks it against zone.json's entry for the
//! device the gateway named as the stream's origin. Either mismatch closes the stream: A fails
//! to read message 2 if B's key is not the one zone.json lists, B refuses a key that is not the
//! origin's. The prologue binds both names and the service, so a relay that re-routes a stream
//! to another device or service makes the handshake fail.
//!
//! # Framing (after the handshake, both directions)
//!
//! ```text
//! frame = u16 len (16..=65535) | len bytes Noise transport message (ciphertext + 16-byte tag)
//! ```
//! Handshake messages use the same `u16 len | bytes` framing. A frame whose plaintext is empty
//! is the *end* frame: the writer has no more data (half-close). A stream that ends without it
//! was cut by someone in the middle and is reported as an error, never as a clean end.
//!
//! [`NoiseFramer`] is the sans-IO part (fuzzed: `fuzz/fuzz_targets/noise_frame.rs`);
//! [`E2eStream`] wraps any `AsyncRead + AsyncWrite` with it.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ed25519_dalek::{SigningKey, VerifyingKey};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use zeroize::Zeroizing;

/// The one Noise pattern of the mesh.
pub const NOISE_PARAMS: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
/// Largest Noise message (Noise spec limit), hence the u16 frame length.
pub const MAX_FRAME: usize = 65_535;
/// ChaChaPoly tag appended to every transport message.
pub const TAG_LEN: usize = 16;
/// Largest plaintext in one frame.
pub const MAX_PLAINTEXT: usize = MAX_FRAME - TAG_LEN;
/// Frame length prefix.
pub const LEN_PREFIX: usize = 2;
/// The handshake's two messages, whole: IK with X25519 and empty payloads — the initiator's
/// ephemeral key (32), its static key sealed (32 + tag) and the payload's tag; the responder's
/// ephemeral key and the payload's tag. A frame of any other length is refused before it is
/// read (a peer declaring 64 KiB made each stream allocate that much).
pub const FIRST_MESSAGE: usize = 32 + (32 + TAG_LEN) + TAG_LEN;
pub const SECOND_MESSAGE: usize = 32 + TAG_LEN;
const PROLOGUE_LABEL: &[u8] = b"zonegate/e2e/v1";

/// Why an end-to-end session failed. Every variant closes the stream.
#[derive(Debug, thiserror::Error)]
pub enum E2eError {
    #[error("frame length {0} is below the {TAG_LEN}-byte tag")]
    ShortFrame(usize),
    #[error("handshake message of {got} bytes, where it has {want}")]
    HandshakeLength { got: usize, want: usize },
    #[error("frame does not decrypt (tampered, replayed or wrong key)")]
    Decrypt,
    #[error("Noise: {0}")]
    Noise(#[from] snow::Error),
    #[error("no end-to-end encryption to {device}: {why}")]
    UnknownPeer { device: String, why: String },
    #[error("peer's static key is not the zone config's key of {device}")]
    PeerKeyMismatch { device: String },
    #[error("stream ended during the Noise handshake")]
    Truncated,
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
}

impl From<E2eError> for io::Error {
    fn from(e: E2eError) -> io::Error {
        match e {
            E2eError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

/// A device's Noise static secret (X25519 form of its ed25519 key).
pub fn static_secret(device_key: &SigningKey) -> Zeroizing<[u8; 32]> {
    Zeroizing::new(device_key.to_scalar_bytes())
}

/// A device's Noise static public key, from its ed25519 public key.
pub fn static_public(device_key: &VerifyingKey) -> [u8; 32] {
    device_key.to_montgomery().to_bytes()
}

/// The Noise public key zone.json implies for `device`, which must be neither revoked nor past
/// its certificate's end at `now`: TLS refuses such a device on every connection it makes, and
/// the key here is what a relayed stream's ends trust instead of the gateway.
pub fn peer_public(
    zone: &zone_core::ZoneConfig,
    device: &str,
    now: time::OffsetDateTime,
) -> Result<[u8; 32], E2eError> {
    let unknown = |why: String| E2eError::UnknownPeer {
        device: device.to_owned(),
        why,
    };
    let name = zone_core::DeviceName::new(device).map_err(|e| unknown(e.to_string()))?;
    if zone.is_revoked(&name) {
        return Err(unknown(format!("{device} is revoked in the zone config")));
    }
    let entry = zone.device(&name).ok_or_else(|| {
        unknown(format!(
            "{device} is not listed in this device's zone config (copy the newest zone.json here)"
        ))
    })?;
    if entry.cert_expires_at <= now {
        return Err(unknown(format!(
            "{device}'s certificate ended at {} (zonegate device renew {device})",
            entry.cert_expires_at
        )));
    }
    let vk = zone_core::keys::parse_public_text(&entry.public_key)
        .map_err(|e| unknown(e.to_string()))?;
    Ok(static_public(&vk))
}

fn prologue(initiator: &str, responder: &str, service: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(PROLOGUE_LABEL.len() + 3 + initiator.len() + responder.len());
    p.extend_from_slice(PROLOGUE_LABEL);
    for part in [initiator, responder, service] {
        p.push(0);
        p.extend_from_slice(part.as_bytes());
    }
    p
}

fn params() -> snow::params::NoiseParams {
    NOISE_PARAMS.parse().expect("a valid Noise pattern name")
}

/// Decodes the frame at the start of `buf`: `Ok(None)` = need more bytes,
/// `Ok(Some((body, consumed)))`, or an error for a length no Noise message can have.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(&[u8], usize)>, E2eError> {
    let Some(len) = buf.get(..LEN_PREFIX) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    if len < TAG_LEN {
        return Err(E2eError::ShortFrame(len));
    }
    Ok(buf
        .get(LEN_PREFIX..LEN_PREFIX + len)
        .map(|body| (body, LEN_PREFIX + len)))
}

/// What one frame carried.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    Data(Bytes),
    /// The peer's end frame: no more data in this direction.
    End,
}

/// Sans-IO transport framing of an established Noise session. Holds no buffer of its own:
/// frames are sealed into the output and opened into a buffer of the plaintext's size (a
/// 64 KiB scratch buffer per framer was half of an idle relayed mesh stream's ~128 KiB).
pub struct NoiseFramer {
    noise: snow::TransportState,
}

impl std::fmt::Debug for NoiseFramer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoiseFramer").finish_non_exhaustive()
    }
}

impl NoiseFramer {
    fn new(noise: snow::TransportState) -> Self {
        NoiseFramer { noise }
    }

    /// Encrypts `plaintext` (any length) into frames appended to `out`.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut BytesMut) -> Result<(), E2eError> {
        for chunk in plaintext.chunks(MAX_PLAINTEXT) {
            self.seal_one(chunk, out)?;
        }
        Ok(())
    }

    /// Appends the end frame.
    pub fn seal_end(&mut self, out: &mut BytesMut) -> Result<(), E2eError> {
        self.seal_one(&[], out)
    }

    fn seal_one(&mut self, chunk: &[u8], out: &mut BytesMut) -> Result<(), E2eError> {
        // Sealed in place: the length prefix, then the ciphertext written behind it.
        let at = out.len();
        out.resize(at + LEN_PREFIX + chunk.len() + TAG_LEN, 0);
        let n = match self.noise.write_message(chunk, &mut out[at + LEN_PREFIX..]) {
            Ok(n) => n,
            Err(e) => {
                out.truncate(at);
                return Err(e.into());
            }
        };
        out.truncate(at + LEN_PREFIX + n);
        out[at..at + LEN_PREFIX].copy_from_slice(&(n as u16).to_be_bytes());
        Ok(())
    }

    /// Decrypts the next complete frame of `buf` and consumes it; `Ok(None)` when `buf` holds
    /// no complete frame yet (nothing consumed).
    pub fn open(&mut self, buf: &mut BytesMut) -> Result<Option<Opened>, E2eError> {
        let Some((body, used)) = decode_frame(buf)? else {
            return Ok(None);
        };
        // The plaintext is the body less the tag: opened straight into its own buffer.
        let mut plain = vec![0u8; body.len().saturating_sub(TAG_LEN)];
        let n = self
            .noise
            .read_message(body, &mut plain)
            .map_err(|_| E2eError::Decrypt)?;
        let out = if n == 0 {
            Opened::End
        } else {
            plain.truncate(n);
            Opened::Data(Bytes::from(plain))
        };
        buf.advance(used);
        Ok(Some(out))
    }
}

/// The initiator's side of the handshake, sans-IO.
pub struct Initiator(snow::HandshakeState);

impl Initiator {
    /// `me` opens a stream to `service` on `peer`, whose static key is `peer_public`.
    pub fn new(
        secret: &[u8; 32],
        peer_public: &[u8; 32],
        me: &str,
        peer: &str,
        service: &str,
    ) -> Result<Self, E2eError> {
        let p = prologue(me, peer, service);
        let hs = snow::Builder::new(params())
            .local_private_key(secret)?
            .remote_public_key(peer_public)?
            .prologue(&p)?
            .build_initiator()?;
        Ok(Initiator(hs))
    }
    /// Message 1, framed.
    pub fn write_first(&mut self, out: &mut BytesMut) -> Result<(), E2eError> {
        let mut m = [0u8; FIRST_MESSAGE];
        let n = self.0.write_message(&[], &mut m)?;
        out.put_u16(n as u16);
        out.put_slice(&m[..n]);
        Ok(())
    }
    /// Reads message 2 (frame body); a responder with another static key fails here.
    pub fn read_second(mut self, body: &[u8]) -> Result<NoiseFramer, E2eError> {
        // The payload is empty: the message's own length is room enough.
        let mut p = [0u8; SECOND_MESSAGE];
        self.0
            .read_message(body, &mut p)
            .map_err(|_| E2eError::Decrypt)?;
        Ok(NoiseFramer::new(self.0.into_transport_mode()?))
    }
}

/// The responder's side of the handshake, sans-IO.
pub struct Responder(snow::HandshakeState);

impl Responder {
    /// `me` accepts a stream for `service` that the relay says comes from `origin`.
    pub fn new(secret: &[u8; 32], origin: &str, me: &str, service: &str) -> Result<Self, E2eError> {
        let p = prologue(origin, me, service);
        let hs = snow::Builder::new(params())
            .local_private_key(secret)?
            .prologue(&p)?
            .build_responder()?;
        Ok(Responder(hs))
    }
    /// Reads message 1 (frame body), checks the initiator's static key against `expected`
    /// (the origin's key from zone.json), and writes message 2 framed into `out`.
    pub fn answer(
        mut self,
        body: &[u8],
        origin: &str,
        expected: &[u8; 32],
        out: &mut BytesMut,
    ) -> Result<NoiseFramer, E2eError> {
        let mut p = [0u8; FIRST_MESSAGE];
        self.0
            .read_message(body, &mut p)
            .map_err(|_| E2eError::Decrypt)?;
        if self.0.get_remote_static() != Some(&expected[..]) {
            return Err(E2eError::PeerKeyMismatch {
                device: origin.to_owned(),
            });
        }
        let n = self.0.write_message(&[], &mut p)?;
        out.put_u16(n as u16);
        out.put_slice(&p[..n]);
        Ok(NoiseFramer::new(self.0.into_transport_mode()?))
    }
}

/// Reads one handshake frame, which must be `want` bytes long.
async fn read_frame<S: AsyncRead + Unpin>(s: &mut S, want: usize) -> Result<Vec<u8>, E2eError> {
    let mut len = [0u8; LEN_PREFIX];
    s.read_exact(&mut len).await.map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => E2eError::Truncated,
        _ => E2eError::Io(e),
    })?;
    let len = usize::from(u16::from_be_bytes(len));
    if len != want {
        return Err(E2eError::HandshakeLength { got: len, want });
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => E2eError::Truncated,
        _ => E2eError::Io(e),
    })?;
    Ok(body)
}

/// Runs the initiator's handshake on `s` and returns the encrypted stream. The caller bounds
/// it with a timeout.
pub async fn initiate<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    secret: &[u8; 32],
    peer_public: &[u8; 32],
    me: &str,
    peer: &str,
    service: &str,
) -> Result<E2eStream<S>, E2eError> {
    let mut hs = Initiator::new(secret, peer_public, me, peer, service)?;
    let mut out = BytesMut::new();
    hs.write_first(&mut out)?;
    s.write_all(&out).await?;
    s.flush().await?;
    let body = read_frame(&mut s, SECOND_MESSAGE).await?;
    Ok(E2eStream::new(s, hs.read_second(&body)?))
}

/// Runs the responder's handshake on `s`: the initiator must hold `origin`'s key
/// (`origin_public`, from zone.json).
pub async fn respond<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    secret: &[u8; 32],
    origin_public: &[u8; 32],
    origin: &str,
    me: &str,
    service: &str,
) -> Result<E2eStream<S>, E2eError> {
    let hs = Responder::new(secret, origin, me, service)?;
    let body = read_frame(&mut s, FIRST_MESSAGE).await?;
    let mut out = BytesMut::new();
    let framer = hs.answer(&body, origin, origin_public, &mut out)?;
    s.write_all(&out).await?;
    s.flush().await?;
    Ok(E2eStream::new(s, framer))
}

/// Bytes read from the inner stream per call: one full frame fits.
const READ_CHUNK: usize = MAX_FRAME + LEN_PREFIX;

/// A partial frame at most this long is moved to a buffer of its own size while the stream
/// waits (a copy this small costs nothing next to the frame's decryption).
const PARTIAL_KEPT: usize = 4096;

/// An encrypted stream over `S`. Writes are sealed into frames (buffered: at most one
/// write's worth of ciphertext waits for `S`); reads open frames. `poll_shutdown` sends the end
/// frame before shutting `S` down.
pub struct E2eStream<S> {
    inner: S,
    framer: NoiseFramer,
    /// Ciphertext received, not yet a complete frame.
    rbuf: BytesMut,
    /// Plaintext opened, not yet read.
    plain: Bytes,
    /// The peer's end frame was read: only the stream's own end may follow.
    read_end: bool,
    /// ...and that end was read too: reads return 0 from now on.
    inner_ended: bool,
    /// Ciphertext sealed, not yet written to `inner`.
    wbuf: BytesMut,
    end_sealed: bool,
    /// Run once the first frame from the peer opens ([`E2eStream::on_first_frame`]).
    first_frame: Option<Box<dyn FnOnce() + Send>>,
}

impl<S> std::fmt::Debug for E2eStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("E2eStream").finish_non_exhaustive()
    }
}

impl<S> E2eStream<S> {
    pub fn new(inner: S, framer: NoiseFramer) -> Self {
        E2eStream {
            inner,
            framer,
            rbuf: BytesMut::new(),
            plain: Bytes::new(),
            read_end: false,
            inner_ended: false,
            wbuf: BytesMut::new(),
            end_sealed: false,
            first_frame: None,
        }
    }
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Runs `f` once the first frame from the peer opens. A responder's handshake proves
    /// nothing fresh: the initiator's first message can be replayed (by a relay that
    /// recorded it) and is answered all the same. A frame that opens was sealed with keys
    /// from this session's fresh ephemeral, so only the initiator can have made it.
    pub fn on_first_frame(&mut self, f: impl FnOnce() + Send + 'static) {
        self.first_frame = Some(Box::new(f));
    }
}

impl<S: crate::splice::End> crate::splice::End for E2eStream<S> {
    fn abort(&mut self) {
        self.inner.abort()
    }
    fn abort_receiving(&mut self) {
        self.inner.abort_receiving()
    }
    fn cut_signal(&self) -> Option<std::sync::Arc<crate::holds::Watched>> {
        self.inner.cut_signal()
    }
    fn accepted(&self) -> Option<bool> {
        self.inner.accepted()
    }
}

impl<S: AsyncWrite + Unpin> E2eStream<S> {
    /// Writes out `wbuf` completely (or returns Pending).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.wbuf.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.wbuf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wbuf.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> E2eStream<S> {
    /// After the peer's end frame: reads the inner stream to its own end (the peer finishes
    /// it right after the frame) before saying "end". Left unread, a relayed QUIC stream kept
    /// its held-stream mark from the read that brought the end frame, and past
    /// [`crate::holds::HELD_BUDGET`] such half-closed streams, still sending the other way,
    /// the oldest were cut as held.
    /// Bytes after the end frame are an error, as a cut before it is.
    fn poll_inner_end(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let after_end = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "bytes after the encrypted stream's end frame",
            )
        };
        if self.inner_ended {
            return Poll::Ready(Ok(()));
        }
        if !self.rbuf.is_empty() {
            return Poll::Ready(Err(after_end()));
        }
        // Room for one byte is enough to tell the end from more data.
        self.rbuf = BytesMut::with_capacity(1);
        match ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.inner),
            cx,
            &mut self.rbuf
        ))? {
            0 => {
                self.inner_ended = true;
                self.rbuf = BytesMut::new();
                Poll::Ready(Ok(()))
            }
            _ => Poll::Ready(Err(after_end())),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for E2eStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.plain.is_empty() {
                let n = this.plain.len().min(buf.remaining());
                buf.put_slice(&this.plain[..n]);
                this.plain.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.read_end {
                return this.poll_inner_end(cx);
            }
            let opened = this.framer.open(&mut this.rbuf)?;
            if opened.is_some() {
                if let Some(f) = this.first_frame.take() {
                    f();
                }
            }
            match opened {
                Some(Opened::Data(b)) => {
                    this.plain = b;
                    continue;
                }
                Some(Opened::End) => {
                    this.read_end = true;
                    continue;
                }
                None => {}
            }
            // Read into the buffer's spare room (it was zero-filled, 64 KiB per read). Room
            // grows with what is buffered, up to a whole frame: a peer's frame declares its
            // length, and a fixed 64 KiB (doubled by the reserve's growth once a part was
            // there) pinned 128 KiB for 4 KiB sent on each of thousands of relayed streams.
            // A stream moving whole frames keeps its grown buffer; one waiting with a few
            // bytes gives it up (below).
            this.rbuf
                .reserve(READ_CHUNK.min(this.rbuf.len().max(PARTIAL_KEPT)));
            let got = match tokio_util::io::poll_read_buf(
                Pin::new(&mut this.inner),
                cx,
                &mut this.rbuf,
            ) {
                Poll::Ready(r) => r?,
                Poll::Pending => {
                    // Waiting with nothing buffered: an idle stream keeps no buffer. With a
                    // few bytes of a frame, it keeps about them: a peer sending 3 bytes on
                    // each of thousands of streams pinned 64 KiB (and more) per stream.
                    if this.rbuf.is_empty() {
                        this.rbuf = BytesMut::new();
                    } else if this.rbuf.len() <= PARTIAL_KEPT
                        && this.rbuf.capacity() > 2 * PARTIAL_KEPT
                    {
                        this.rbuf = BytesMut::from(&this.rbuf[..]);
                    }
                    return Poll::Pending;
                }
            };
            if got == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "encrypted stream cut before its end frame",
                )));
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for E2eStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        if this.end_sealed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let n = buf.len().min(MAX_PLAINTEXT);
        this.framer.seal(&buf[..n], &mut this.wbuf)?;
        // Start sending now; what does not fit yet goes out on the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        // Flushed (a splice flushes when its reader waits): an idle stream keeps no buffer.
        this.wbuf = BytesMut::new();
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.end_sealed {
            ready!(this.poll_drain(cx))?;
            this.framer.seal_end(&mut this.wbuf)?;
            this.end_sealed = true;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// A fresh handshake between devices `a` (initiator) and `b` (responder, service `svc`) from
/// fixed keys, for tests and the fuzz targets, with `a`'s public key (what `b` expects).
/// Never used on the wire.
pub fn handshake_pair_for_tests() -> (Initiator, Responder, [u8; 32]) {
    let a = SigningKey::from_bytes(&[1u8; 32]);
    let b = SigningKey::from_bytes(&[2u8; 32]);
    let (sa, sb) = (static_secret(&a), static_secret(&b));
    let (pa, pb) = (
        static_public(&a.verifying_key()),
        static_public(&b.verifying_key()),
    );
    let i = Initiator::new(&sa, &pb, "a", "b", "svc").expect("valid keys");
    let r = Responder::new(&sb, "a", "b", "svc").expect("valid keys");
    (i, r, pa)
}

/// Deterministic framers for tests and the fuzz target: an initiator/responder pair from fixed
/// keys. Never used on the wire.
pub fn framer_pair_for_tests() -> (NoiseFramer, NoiseFramer) {
    let (mut i, r, pa) = handshake_pair_for_tests();
    let mut m1 = BytesMut::new();
    i.write_first(&mut m1).expect("message 1");
    let (body, _) = decode_frame(&m1).expect("framed").expect("complete");
    let mut m2 = BytesMut::new();
    let rf = r.answer(body, "a", &pa, &mut m2).expect("message 2");
    let (body, _) = decode_frame(&m2).expect("framed").expect("complete");
    let inf = i.read_second(body).expect("handshake");
    (inf, rf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn montgomery_map_matches_x25519_of_the_derived_secret() {
        for seed in [[7u8; 32], [0x42; 32], [0xff; 32]] {
            let k = SigningKey::from_bytes(&seed);
            let secret = static_secret(&k);
            let via_secret = curve25519_mul_base(&secret);
            assert_eq!(via_secret, static_public(&k.verifying_key()));
        }
    }

    /// X25519(secret, 9) through snow's own DH (no extra crate).
    fn curve25519_mul_base(secret: &[u8; 32]) -> [u8; 32] {
        // snow exposes no scalar multiplication; derive via a responder reading an IK message
        // from an initiator that uses `secret` as its static key.
        let r_key = SigningKey::from_bytes(&[3u8; 32]);
        let r_sec = static_secret(&r_key);
        let r_pub = static_public(&r_key.verifying_key());
        let mut init = snow::Builder::new(params())
            .local_private_key(secret)
            .unwrap()
            .remote_public_key(&r_pub)
            .unwrap()
            .build_initiator()
            .unwrap();
        let mut resp = snow::Builder::new(params())
            .local_private_key(&*r_sec)
            .unwrap()
            .build_responder()
            .unwrap();
        let mut m = vec![0u8; 1024];
        let mut p = vec![0u8; 1024];
        let n = init.write_message(&[], &mut m).unwrap();
        resp.read_message(&m[..n], &mut p).unwrap();
        resp.get_remote_static().unwrap().try_into().unwrap()
    }

    #[test]
    fn frames_round_trip_and_end_is_explicit() {
        let (mut a, mut b) = framer_pair_for_tests();
        let mut wire = BytesMut::new();
        let big = vec![0x5au8; MAX_PLAINTEXT + 10];
        a.seal(b"hello", &mut wire).unwrap();
        a.seal(&big, &mut wire).unwrap();
        a.seal_end(&mut wire).unwrap();
        let mut got = Vec::new();
        // Byte by byte: the decoder must wait for whole frames.
        let mut partial = BytesMut::new();
        let mut ended = false;
        for byte in wire.iter() {
            partial.put_u8(*byte);
            while let Some(o) = b.open(&mut partial).unwrap() {
                match o {
                    Opened::Data(d) => got.extend_from_slice(&d),
                    Opened::End => ended = true,
                }
            }
        }
        assert!(ended);
        assert_eq!(got.len(), 5 + big.len());
        assert_eq!(&got[..5], b"hello");
        // And the other direction works too.
        let mut back = BytesMut::new();
        b.seal(b"pong", &mut back).unwrap();
        assert_eq!(
            a.open(&mut back).unwrap(),
            Some(Opened::Data(Bytes::from_static(b"pong")))
        );
    }

    #[test]
    fn tampered_short_and_replayed_frames_are_refused() {
        let (mut a, mut b) = framer_pair_for_tests();
        let mut wire = BytesMut::new();
        a.seal(b"secret", &mut wire).unwrap();
        let copy = wire.clone();
        let mut t = wire.clone();
        t[5] ^= 1;
        assert!(matches!(b.open(&mut t), Err(E2eError::Decrypt)));
        // A refused frame does not move the receiving nonce: the genuine one still opens.
        assert!(b.open(&mut wire).unwrap().is_some());
        let mut replay = copy;
        assert!(matches!(b.open(&mut replay), Err(E2eError::Decrypt)));
        let mut short = BytesMut::from(&[0u8, 15][..]);
        assert!(matches!(b.open(&mut short), Err(E2eError::ShortFrame(15))));
    }

    #[test]
    fn responder_refuses_an_initiator_whose_key_is_not_the_origins() {
        let a = SigningKey::from_bytes(&[1u8; 32]);
        let mallory = SigningKey::from_bytes(&[6u8; 32]);
        let b = SigningKey::from_bytes(&[2u8; 32]);
        let pb = static_public(&b.verifying_key());
        let mut i = Initiator::new(&static_secret(&mallory), &pb, "a", "b", "svc").unwrap();
        let r = Responder::new(&static_secret(&b), "a", "b", "svc").unwrap();
        let mut m1 = BytesMut::new();
        i.write_first(&mut m1).unwrap();
        let (body, _) = decode_frame(&m1).unwrap().unwrap();
        let expected_a = static_public(&a.verifying_key());
        let err = r
            .answer(body, "a", &expected_a, &mut BytesMut::new())
            .unwrap_err();
        assert!(matches!(err, E2eError::PeerKeyMismatch { .. }), "{err}");
    }

    #[test]
    fn initiator_refuses_a_responder_with_another_key_or_context() {
        let a = SigningKey::from_bytes(&[1u8; 32]);
        let b = SigningKey::from_bytes(&[2u8; 32]);
        let not_b = SigningKey::from_bytes(&[5u8; 32]);
        let pa = static_public(&a.verifying_key());
        // Responder holds another key than the one zone.json lists for b.
        let mut i = Initiator::new(
            &static_secret(&a),
            &static_public(&b.verifying_key()),
            "a",
            "b",
            "svc",
        )
        .unwrap();
        let r = Responder::new(&static_secret(&not_b), "a", "b", "svc").unwrap();
        let mut m1 = BytesMut::new();
        i.write_first(&mut m1).unwrap();
        let (body, _) = decode_frame(&m1).unwrap().unwrap();
        assert!(r.answer(body, "a", &pa, &mut BytesMut::new()).is_err());
        // Right key, but the relay re-routed the stream to another service.
        let mut i = Initiator::new(
            &static_secret(&a),
            &static_public(&b.verifying_key()),
            "a",
            "b",
            "svc",
        )
        .unwrap();
        let r = Responder::new(&static_secret(&b), "a", "b", "other").unwrap();
        let mut m1 = BytesMut::new();
        i.write_first(&mut m1).unwrap();
        let (body, _) = decode_frame(&m1).unwrap().unwrap();
        assert!(r.answer(body, "a", &pa, &mut BytesMut::new()).is_err());
    }

    #[tokio::test]
    async fn e2e_stream_round_trip_over_a_duplex() {
        let a = SigningKey::from_bytes(&[1u8; 32]);
        let b = SigningKey::from_bytes(&[2u8; 32]);
        let (x, y) = tokio::io::duplex(4096);
        let (sa, sb) = (static_secret(&a), static_secret(&b));
        let pa = static_public(&a.verifying_key());
        let pb = static_public(&b.verifying_key());
        let resp = tokio::spawn(async move {
            let mut s = respond(y, &sb, &pa, "a", "b", "svc").await.unwrap();
            let mut all = Vec::new();
            s.read_to_end(&mut all).await.unwrap();
            s.write_all(&all).await.unwrap();
            s.shutdown().await.unwrap();
            all.len()
        });
        let mut s = initiate(x, &sa, &pb, "a", "b", "svc").await.unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (mut r, mut w) = tokio::io::split(&mut s);
        let write = async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut back = Vec::new();
        let read = r.read_to_end(&mut back);
        let (_, n) = tokio::join!(write, read);
        n.unwrap();
        assert_eq!(back, data);
        assert_eq!(resp.await.unwrap(), data.len());
    }

    /// A replayed first handshake message is answered (Noise IK's first message carries
    /// nothing fresh from the responder), but the replayer cannot make a frame that opens:
    /// `on_first_frame` runs for the real initiator only. The agent grants direct-path
    /// permits there (it granted them on the handshake, so a relay could renew them).
    #[tokio::test]
    async fn only_the_real_initiator_proves_itself_with_a_first_frame() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let a = SigningKey::from_bytes(&[1u8; 32]);
        let b = SigningKey::from_bytes(&[2u8; 32]);
        let (sa, sb) = (static_secret(&a), static_secret(&b));
        let pa = static_public(&a.verifying_key());
        let pb = static_public(&b.verifying_key());
        let proven = Arc::new(AtomicUsize::new(0));
        let counter = proven.clone();
        let responder = move |y: tokio::io::DuplexStream| {
            let (proven, sb) = (counter.clone(), sb.clone());
            tokio::spawn(async move {
                let mut s = respond(y, &sb, &pa, "a", "b", "svc").await.unwrap();
                s.on_first_frame(move || {
                    proven.fetch_add(1, Ordering::Relaxed);
                });
                let mut buf = [0u8; 64];
                s.read(&mut buf).await
            })
        };
        // The real initiator, its first message and first frame recorded.
        let mut hs = Initiator::new(&sa, &pb, "a", "b", "svc").unwrap();
        let mut first = BytesMut::new();
        hs.write_first(&mut first).unwrap();
        let (mut x, y) = tokio::io::duplex(4096);
        let resp = responder(y);
        x.write_all(&first).await.unwrap();
        let body = read_frame(&mut x, SECOND_MESSAGE).await.unwrap();
        let mut framer = hs.read_second(&body).unwrap();
        let mut hello = BytesMut::new();
        framer.seal(b"hello", &mut hello).unwrap();
        x.write_all(&hello).await.unwrap();
        assert_eq!(resp.await.unwrap().unwrap(), 5);
        assert_eq!(proven.load(Ordering::Relaxed), 1);

        // Both replayed to a new responder: the handshake is answered, the frame does not open.
        let (mut x, y) = tokio::io::duplex(4096);
        let resp = responder(y);
        x.write_all(&first).await.unwrap();
        read_frame(&mut x, SECOND_MESSAGE)
            .await
            .expect("a replayed first message is answered");
        x.write_all(&hello).await.unwrap();
        assert!(resp.await.unwrap().is_err(), "a replayed frame opened");
        assert_eq!(
            proven.load(Ordering::Relaxed),
            1,
            "the replay proved itself"
        );
    }

    /// Handshake messages have one length each: a frame declaring any other is refused before
    /// its body is read (a declared 64 KiB was allocated and awaited per stream). A partial
    /// frame waiting for its rest keeps about its own size, not the 64 KiB read buffer.
    #[tokio::test]
    async fn peer_declared_lengths_cost_no_more_than_the_bytes_sent() {
        let (mut i, r, pa) = handshake_pair_for_tests();
        let mut m1 = BytesMut::new();
        i.write_first(&mut m1).unwrap();
        assert_eq!(m1.len(), LEN_PREFIX + FIRST_MESSAGE);
        let (body, _) = decode_frame(&m1).unwrap().unwrap();
        let mut m2 = BytesMut::new();
        r.answer(body, "a", &pa, &mut m2).unwrap();
        assert_eq!(m2.len(), LEN_PREFIX + SECOND_MESSAGE);

        let (mut x, y) = tokio::io::duplex(1024);
        let sb = static_secret(&SigningKey::from_bytes(&[2u8; 32]));
        let resp = tokio::spawn(async move { respond(y, &sb, &pa, "a", "b", "svc").await });
        x.write_all(&[0xff, 0xff, 1, 2, 3]).await.unwrap();
        let e = resp.await.unwrap().map(drop).unwrap_err();
        assert!(
            matches!(
                e,
                E2eError::HandshakeLength {
                    got: 65_535,
                    want: FIRST_MESSAGE
                }
            ),
            "{e}"
        );

        let (_, b) = framer_pair_for_tests();
        let (x, mut y) = tokio::io::duplex(1024);
        let mut s = E2eStream::new(x, b);
        y.write_all(&[0x10, 0x00, 9]).await.unwrap();
        let mut buf = [0u8; 16];
        let wait = std::time::Duration::from_millis(100);
        let pending = tokio::time::timeout(wait, s.read(&mut buf)).await;
        assert!(pending.is_err(), "a partial frame read as something");
        assert!(
            s.rbuf.len() == 3 && s.rbuf.capacity() <= 2 * PARTIAL_KEPT,
            "{} bytes kept in {}",
            s.rbuf.len(),
            s.rbuf.capacity()
        );

        // Past the size moved to a buffer of its own: a frame declaring 64 KiB, 5,000 bytes of
        // it sent in pieces, keeps a few times what was sent, not 64 KiB or more.
        let (_, b) = framer_pair_for_tests();
        let (x, mut y) = tokio::io::duplex(64 * 1024);
        let mut s = E2eStream::new(x, b);
        y.write_all(&[0xff, 0xff]).await.unwrap();
        for _ in 0..5 {
            y.write_all(&[7u8; 1000]).await.unwrap();
            let pending = tokio::time::timeout(wait, s.read(&mut buf)).await;
            assert!(pending.is_err(), "a partial frame read as something");
        }
        assert!(
            s.rbuf.len() == 5002 && s.rbuf.capacity() <= 4 * 5002,
            "{} bytes kept in {}",
            s.rbuf.len(),
            s.rbuf.capacity()
        );
    }

    #[tokio::test]
    async fn a_cut_stream_is_an_error_not_an_end() {
        let (mut a, b) = framer_pair_for_tests();
        let mut wire = BytesMut::new();
        a.seal(b"part", &mut wire).unwrap();
        let (x, mut y) = tokio::io::duplex(1024);
        y.write_all(&wire).await.unwrap();
        drop(y);
        let mut s = E2eStream::new(x, b);
        let mut out = Vec::new();
        let err = s.read_to_end(&mut out).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(out, b"part");
    }

    /// The end frame ends the plaintext only once the inner stream ends too: it is read to
    /// its end (a relayed QUIC stream left unread after the end frame counted as held by a
    /// stopped reader, and was cut while its other direction still carried an answer).
    /// Bytes after the end frame are an error.
    #[tokio::test]
    async fn the_end_frame_is_followed_by_the_inner_streams_end_and_nothing_else() {
        let (mut a, b) = framer_pair_for_tests();
        let mut wire = BytesMut::new();
        a.seal(b"ask", &mut wire).unwrap();
        a.seal_end(&mut wire).unwrap();
        let (x, mut y) = tokio::io::duplex(1024);
        y.write_all(&wire).await.unwrap();
        let mut s = E2eStream::new(x, b);
        let mut buf = [0u8; 16];
        assert_eq!(s.read(&mut buf).await.unwrap(), 3);
        let wait = std::time::Duration::from_millis(100);
        assert!(
            tokio::time::timeout(wait, s.read(&mut buf)).await.is_err(),
            "said the end before the inner stream ended"
        );
        drop(y);
        assert_eq!(s.read(&mut buf).await.unwrap(), 0);
        assert_eq!(s.read(&mut buf).await.unwrap(), 0, "the end, again");

        let (mut a, b) = framer_pair_for_tests();
        let mut wire = BytesMut::new();
        a.seal_end(&mut wire).unwrap();
        wire.extend_from_slice(b"x");
        let (x, mut y) = tokio::io::duplex(1024);
        y.write_all(&wire).await.unwrap();
        let mut s = E2eStream::new(x, b);
        let err = s.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }
}
