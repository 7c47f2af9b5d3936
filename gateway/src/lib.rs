//! The public edge: HTTP(S) front, TCP/UDP listeners, routing, admin API and status page.
