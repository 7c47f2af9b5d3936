//! Copying bytes both ways between two ends of a proxied connection, counting them.

use tokio::io::{AsyncRead, AsyncWrite};

/// Per-direction copy buffer: 64 KiB keeps syscalls and QUIC frames large without holding much
/// memory per idle connection (buffers are only allocated while copying).
pub const COPY_BUF: usize = 64 * 1024;

/// Bytes moved by a finished splice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    /// From `a` to `b`.
    pub a_to_b: u64,
    /// From `b` to `a`.
    pub b_to_a: u64,
}

/// Copies until both directions are done (each EOF is passed on as a half-close).
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> std::io::Result<Moved>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (a_to_b, b_to_a) =
        tokio::io::copy_bidirectional_with_sizes(a, b, COPY_BUF, COPY_BUF).await?;
    Ok(Moved { a_to_b, b_to_a })
}
