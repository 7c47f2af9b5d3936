//! Zone identities and the signed zone config. Pure: no tokio, no sockets.
