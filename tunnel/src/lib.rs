//! Wire protocol (sans-IO `proto`), QUIC transport, node agent, gateway hub, relay and mesh.
