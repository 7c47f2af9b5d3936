//! Cost of the sans-IO wire protocol on the hot paths: the stream header and reply every
//! proxied connection starts with, control frames (one Hello per connection, Pings all the
//! time, Welcome), the incremental control-stream decoder, UDP flow datagrams, and the control
//! session state machine.

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::net::SocketAddr;
use tunnel::proto::{
    decode_control, decode_datagram, decode_datagram_bytes, decode_stream_header,
    decode_stream_reply, encode_control, encode_datagram, encode_stream_header,
    encode_stream_reply, varint, ControlMsg, ControlSession, FrameDecoder, Hello, Origin,
    RefuseCode, ServiceInfo, ServiceProto, StreamHeader, StreamReply, Welcome, CONTROL_VERSION,
};

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn open_public() -> StreamHeader {
    StreamHeader::Open {
        app: "website".into(),
        service: "web".into(),
        origin: Origin::Public(addr("203.0.113.77:51234")),
    }
}

fn open_device_v6() -> StreamHeader {
    StreamHeader::Open {
        app: "etcd-peers".into(),
        service: "etcd-peer".into(),
        origin: Origin::Device {
            name: "home1".into(),
            addr: Some(addr("[2001:db8::1]:4433")),
        },
    }
}

fn relay() -> StreamHeader {
    StreamHeader::Relay {
        app: "mesh".into(),
        to_device: "home2".into(),
        service: "etcd-peer".into(),
    }
}

fn hello(services: usize, zone_config: Option<usize>) -> ControlMsg {
    ControlMsg::Hello(Hello {
        proto_version: CONTROL_VERSION,
        device: "home1".into(),
        services: (0..services)
            .map(|i| ServiceInfo {
                name: format!("service-{i}"),
                proto: if i % 4 == 3 {
                    ServiceProto::Udp
                } else {
                    ServiceProto::Tcp
                },
            })
            .collect(),
        zone_serial: 42,
        zone_config: zone_config.map(|n| vec![b'z'; n]),
        agent_version: "0.1.0".into(),
    })
}

fn welcome() -> ControlMsg {
    ControlMsg::Welcome(Welcome {
        session_id: 7,
        observed_addr: addr("198.51.100.9:40001"),
        zone_serial: 42,
        zone_config: None,
        keepalive_ms: 10_000,
    })
}

fn encoded_header(h: &StreamHeader) -> Vec<u8> {
    let mut v = Vec::new();
    encode_stream_header(h, &mut v).expect("valid header");
    v
}

fn encoded_control(m: &ControlMsg) -> Vec<u8> {
    let mut v = Vec::new();
    encode_control(m, &mut v).expect("valid message");
    v
}

fn stream_header(c: &mut Criterion) {
    let mut g = c.benchmark_group("stream header");
    g.throughput(Throughput::Elements(1));
    for (name, h) in [
        ("open, public v4 origin", open_public()),
        ("open, device v6 origin", open_device_v6()),
        ("relay", relay()),
    ] {
        let mut out = BytesMut::with_capacity(256);
        g.bench_function(BenchmarkId::new("encode", name), |b| {
            b.iter(|| {
                out.clear();
                encode_stream_header(black_box(&h), &mut out).expect("encode");
                black_box(out.len())
            })
        });
        let bytes = encoded_header(&h);
        g.bench_function(BenchmarkId::new("decode", name), |b| {
            b.iter(|| black_box(decode_stream_header(black_box(&bytes)).expect("decode")))
        });
    }
    // The header arrives in pieces: the decoder is re-run on a growing prefix (as
    // `stream::read_header` does) until it completes.
    let bytes = encoded_header(&open_public());
    g.bench_function("decode, open, fed 8 bytes at a time", |b| {
        b.iter(|| {
            let mut end = 0;
            loop {
                end = (end + 8).min(bytes.len());
                if let Some(done) = decode_stream_header(black_box(&bytes[..end])).expect("ok") {
                    break black_box(done);
                }
            }
        })
    });

    let refused = StreamReply::Refused {
        code: RefuseCode::PolicyDenied,
        reason: "app website: denied by policy (rule 2: hours 07:00-22:00)".into(),
    };
    for (name, r) in [("accepted", StreamReply::Accepted), ("refused", refused)] {
        let mut out = BytesMut::with_capacity(300);
        g.bench_function(BenchmarkId::new("reply encode", name), |b| {
            b.iter(|| {
                out.clear();
                encode_stream_reply(black_box(&r), &mut out).expect("encode");
                black_box(out.len())
            })
        });
        let mut bytes = Vec::new();
        encode_stream_reply(&r, &mut bytes).expect("encode");
        g.bench_function(BenchmarkId::new("reply decode", name), |b| {
            b.iter(|| black_box(decode_stream_reply(black_box(&bytes)).expect("decode")))
        });
    }
    g.finish();
}

fn control_frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("control frame");
    let msgs = [
        ("ping", ControlMsg::Ping { nonce: 0x1234_5678 }),
        ("welcome", welcome()),
        ("hello, 8 services", hello(8, None)),
        (
            "hello, 8 services + 16 KiB zone.json",
            hello(8, Some(16 * 1024)),
        ),
    ];
    for (name, m) in &msgs {
        let bytes = encoded_control(m);
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        let mut out = BytesMut::with_capacity(bytes.len() + 16);
        g.bench_function(BenchmarkId::new("encode", name), |b| {
            b.iter(|| {
                out.clear();
                encode_control(black_box(m), &mut out).expect("encode");
                black_box(out.len())
            })
        });
        g.bench_function(BenchmarkId::new("decode", name), |b| {
            b.iter(|| black_box(decode_control(black_box(&bytes)).expect("decode")))
        });
    }
    g.finish();

    // The control stream as the I/O loop sees it: 100 frames (mostly pings, a few bigger
    // messages) arriving in 1,200-byte reads, pushed into a FrameDecoder and drained.
    let mut g = c.benchmark_group("FrameDecoder");
    let mut stream = Vec::new();
    for i in 0..100 {
        let m = match i % 10 {
            0 => hello(4, None),
            5 => welcome(),
            _ => ControlMsg::Ping { nonce: i },
        };
        encode_control(&m, &mut stream).expect("encode");
    }
    g.throughput(Throughput::Elements(100));
    g.bench_function("100 frames in 1,200-byte reads", |b| {
        b.iter(|| {
            let mut d = FrameDecoder::new();
            let mut n = 0;
            for chunk in stream.chunks(1200) {
                d.push(black_box(chunk)).expect("push");
                while let Some(m) = d.next_msg().expect("frame") {
                    black_box(&m);
                    n += 1;
                }
            }
            assert_eq!(n, 100);
        })
    });
    g.finish();
}

fn session(c: &mut Criterion) {
    let mut g = c.benchmark_group("control session");
    g.throughput(Throughput::Elements(1));
    // An established gateway-side session answering a keep-alive Ping with a Pong.
    let mut s = ControlSession::gateway();
    s.handle(hello(2, None)).expect("hello");
    while s.poll_event().is_some() {}
    if let ControlMsg::Welcome(w) = welcome() {
        s.welcome(w).expect("welcome");
    }
    while s.poll_transmit().is_some() {}
    let mut nonce = 0u64;
    g.bench_function("gateway: handle Ping -> Pong", |b| {
        b.iter(|| {
            nonce += 1;
            s.handle(ControlMsg::Ping { nonce }).expect("ping");
            while let Some(ev) = s.poll_event() {
                black_box(ev);
            }
            black_box(s.poll_transmit())
        })
    });
    g.finish();
}

fn datagrams(c: &mut Criterion) {
    let mut g = c.benchmark_group("datagram");
    for size in [64usize, 1200] {
        let payload = vec![0xabu8; size];
        g.throughput(Throughput::Bytes(size as u64));
        let mut out = BytesMut::with_capacity(size + 8);
        g.bench_with_input(BenchmarkId::new("encode", size), &payload, |b, p| {
            b.iter(|| {
                out.clear();
                encode_datagram(black_box(70_000), p, &mut out).expect("encode");
                black_box(out.len())
            })
        });
        let mut enc = BytesMut::new();
        encode_datagram(70_000, &payload, &mut enc).expect("encode");
        let enc = enc.freeze();
        g.bench_with_input(BenchmarkId::new("decode (slice)", size), &enc, |b, d| {
            b.iter(|| black_box(decode_datagram(black_box(d)).expect("decode")))
        });
        g.bench_with_input(BenchmarkId::new("decode (Bytes)", size), &enc, |b, d| {
            b.iter(|| {
                let d: Bytes = d.clone();
                black_box(decode_datagram_bytes(black_box(d)).expect("decode"))
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("varint");
    g.throughput(Throughput::Elements(1));
    for v in [37u64, 15_293, 494_878_333, 151_288_809_941_952_652] {
        let mut out = Vec::with_capacity(8);
        varint::encode(v, &mut out).expect("encode");
        let len = out.len();
        g.bench_with_input(BenchmarkId::new("encode", len), &v, |b, &v| {
            b.iter(|| {
                out.clear();
                varint::encode(black_box(v), &mut out).expect("encode");
                black_box(out.len())
            })
        });
        let enc = {
            let mut e = Vec::new();
            varint::encode(v, &mut e).expect("encode");
            e
        };
        g.bench_with_input(BenchmarkId::new("decode", len), &enc, |b, e| {
            b.iter(|| black_box(varint::decode(black_box(e)).expect("decode")))
        });
    }
    g.finish();
}

criterion_group!(benches, stream_header, control_frames, session, datagrams);
criterion_main!(benches);
