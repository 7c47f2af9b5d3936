//! Tests of the sans-IO wire protocol `tunnel::proto`, one binary with one module per file.

mod proto {
    pub mod errors;
    pub mod roundtrip;
    pub mod seeds;
    pub mod session;
    pub mod strategies;
    pub mod vectors;
}
