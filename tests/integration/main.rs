//! zonegate's integration tests, one binary (faster to build and link), one module per area.
//!
//! Tests that need root and network namespaces say so loudly and return when they cannot run.

mod cli;
mod common;
mod faults_lab;
mod hostile;
mod http_front;
mod inproc;
mod mesh;
mod mesh_lab;
mod netlab;
mod netlab_smoke;
mod quickstart_lab;
mod tunnel;
mod tunnel_lab;
mod zonefix;
