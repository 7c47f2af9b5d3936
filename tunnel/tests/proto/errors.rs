//! Garbage, oversized and invalid inputs give specific errors (never panics, never Ok).

use tunnel::proto::limits::{
    MAX_CONTROL_FRAME, MAX_DECODER_BUFFER, MAX_NAME_LEN, MAX_PUSH_CHUNK, MAX_SERVICES,
    MAX_VERSION_LEN, MAX_ZONE_CONFIG, WORST_CASE_HELLO,
};
use tunnel::proto::{
    decode_control, decode_datagram, decode_stream_header, decode_stream_reply, encode_control,
    encode_datagram, encode_stream_header, ControlMsg, FrameDecoder, Hello, Origin, ProtoError,
    ServiceInfo, ServiceProto, StreamHeader,
};

use super::vectors::hex;

fn header_err(bytes: &str) -> ProtoError {
    decode_stream_header(&hex(bytes)).unwrap_err()
}

fn control_err(bytes: &str) -> ProtoError {
    decode_control(&hex(bytes)).unwrap_err()
}

#[test]
fn foreign_protocols_fail_at_first_byte() {
    assert_eq!(decode_stream_header(b"G"), Err(ProtoError::BadMagic(b'G')));
    assert_eq!(
        decode_stream_header(b"GET / HTTP/1.1\r\n"),
        Err(ProtoError::BadMagic(b'G'))
    );
    assert_eq!(decode_stream_header(b"Zx"), Err(ProtoError::BadMagic(b'x')));
    assert_eq!(header_err("5a47 02"), ProtoError::UnsupportedVersion(2));
}

#[test]
fn header_lengths_checked_before_body() {
    // Only the prefix is present: the length alone is enough to refuse.
    assert_eq!(
        header_err("5a47 01 0000"),
        ProtoError::HeaderLength { len: 0, max: 1024 }
    );
    assert_eq!(
        header_err("5a47 01 0401"),
        ProtoError::HeaderLength {
            len: 1025,
            max: 1024
        }
    );
    assert_eq!(
        header_err("5a47 01 ffff"),
        ProtoError::HeaderLength {
            len: 65535,
            max: 1024
        }
    );
}

#[test]
fn header_body_errors() {
    assert_eq!(
        header_err("5a47 01 0001 09"),
        ProtoError::UnknownStreamKind(9)
    );
    assert_eq!(
        header_err("5a47 01 0002 03 00"),
        ProtoError::TrailingBytes {
            what: "stream header",
            extra: 1
        }
    );
    assert_eq!(
        header_err("5a47 01 0003 02 0461"),
        ProtoError::Truncated {
            what: "stream header"
        }
    );
    // Uppercase name.
    assert!(matches!(
        header_err("5a47 01 0010 02 0453594e43 05686f6d6531 03646673"),
        ProtoError::InvalidName { field: "app", .. }
    ));
    // Name starting with '-'.
    assert!(matches!(
        header_err("5a47 01 0010 02 042d796e63 05686f6d6531 03646673"),
        ProtoError::InvalidName {
            field: "app",
            why: "must not start or end with '-'"
        }
    ));
    // Name length 64, refused at the length.
    assert_eq!(
        header_err("5a47 01 0003 02 4040"),
        ProtoError::FieldTooLong {
            field: "app",
            len: 64,
            max: MAX_NAME_LEN
        }
    );
    // Empty name.
    assert!(matches!(
        header_err("5a47 01 0006 02 00 0161 0161"),
        ProtoError::InvalidName {
            field: "app",
            why: "empty"
        }
    ));
    // Bad origin tag and bad address family.
    assert_eq!(
        header_err("5a47 01 0006 01 0161 0161 07"),
        ProtoError::InvalidTag {
            field: "origin",
            tag: 7
        }
    );
    assert_eq!(
        header_err("5a47 01 000c 01 0161 0161 01 05 00000000 00"),
        ProtoError::InvalidTag {
            field: "origin address",
            tag: 5
        }
    );
}

#[test]
fn encoders_refuse_invalid_names_and_write_nothing() {
    for bad in ["", "Web", "-web", "web-", "w_b", "wéb", &"a".repeat(64)] {
        let h = StreamHeader::Open {
            app: "ok".into(),
            service: bad.into(),
            origin: Origin::Device {
                name: "home1".into(),
                addr: None,
            },
        };
        let mut out = Vec::new();
        assert!(encode_stream_header(&h, &mut out).is_err(), "{bad:?}");
        assert!(out.is_empty());
    }
    let ok = "a".repeat(MAX_NAME_LEN);
    let h = StreamHeader::Relay {
        app: ok.clone(),
        to_device: ok.clone(),
        service: ok,
    };
    encode_stream_header(&h, &mut Vec::new()).unwrap();
}

#[test]
fn reply_errors() {
    assert_eq!(
        decode_stream_reply(&hex("02")),
        Err(ProtoError::InvalidTag {
            field: "stream reply",
            tag: 2
        })
    );
    assert_eq!(
        decode_stream_reply(&hex("01 02 4101")),
        Err(ProtoError::FieldTooLong {
            field: "refusal reason",
            len: 257,
            max: 256
        })
    );
    assert_eq!(
        decode_stream_reply(&hex("01 02 02 0a41")),
        Err(ProtoError::ControlChar {
            field: "refusal reason"
        })
    );
    assert_eq!(
        decode_stream_reply(&hex("01 02 02 c328")),
        Err(ProtoError::InvalidUtf8 {
            field: "refusal reason"
        })
    );
}

#[test]
fn oversized_frame_refused_from_prefix_alone() {
    // type Ping, length MAX_CONTROL_FRAME + 1 as a 4-byte varint; no payload follows.
    let len = (MAX_CONTROL_FRAME + 1) as u32 | 0x8000_0000;
    let mut buf = vec![0x0a];
    buf.extend_from_slice(&len.to_be_bytes());
    let want = ProtoError::FrameTooLarge {
        ty: 10,
        len: MAX_CONTROL_FRAME as u64 + 1,
        max: MAX_CONTROL_FRAME,
    };
    assert_eq!(decode_control(&buf), Err(want.clone()));
    // Unknown types are bounded too.
    buf[0] = 0x3f;
    assert!(matches!(
        decode_control(&buf),
        Err(ProtoError::FrameTooLarge { ty: 0x3f, .. })
    ));
    let mut dec = FrameDecoder::new();
    dec.push(&[0x0a]).unwrap();
    assert_eq!(dec.next_msg(), Ok(None));
    dec.push(&len.to_be_bytes()).unwrap();
    assert_eq!(dec.next_msg(), Err(want));
    assert_eq!(dec.next_msg(), Err(ProtoError::DecoderFailed));
    assert_eq!(dec.push(&[0]), Err(ProtoError::DecoderFailed));
}

#[test]
fn control_payload_errors() {
    assert_eq!(
        control_err("40 0a 08 0000000000000000"),
        ProtoError::VarintNonMinimal
    );
    assert_eq!(
        control_err("0a 04 00000000"),
        ProtoError::Truncated {
            what: "control message"
        }
    );
    assert_eq!(
        control_err("0a 09 000000000000000000"),
        ProtoError::TrailingBytes {
            what: "control message",
            extra: 1
        }
    );
    // ServicesUpdate with 257 entries, refused at the count.
    assert_eq!(
        control_err("04 02 4101"),
        ProtoError::TooMany {
            field: "services",
            count: 257,
            max: MAX_SERVICES
        }
    );
    assert_eq!(
        control_err("04 07 02 0161 01 0161 02"),
        ProtoError::DuplicateService
    );
    assert_eq!(
        control_err("04 04 01 0161 03"),
        ProtoError::InvalidTag {
            field: "service proto",
            tag: 3
        }
    );
    // ConfigUpdate announcing 60 KiB + 1.
    assert_eq!(
        control_err("03 0c 0000000000000001 8000f001"),
        ProtoError::FieldTooLong {
            field: "zone config",
            len: MAX_ZONE_CONFIG as u64 + 1,
            max: MAX_ZONE_CONFIG
        }
    );
    // Welcome with presence byte 2.
    assert_eq!(
        control_err("02 1c 0000000000000001 04c6336402 9c40 0000000000000007 02 00003a98"),
        ProtoError::InvalidTag {
            field: "zone config",
            tag: 2
        }
    );
    // UdpFlowClose with a flow id above u32::MAX.
    assert_eq!(
        control_err("07 08 c000000100000000"),
        ProtoError::VarintTooLarge {
            field: "flow id",
            value: 1 << 32
        }
    );
    // PeerAddr with 9 addresses.
    assert!(matches!(
        control_err("08 03 0161 09"),
        ProtoError::TooMany { count: 9, .. }
    ));
    // Drain reason with a newline (log injection).
    assert_eq!(
        control_err("05 07 00000000 02 410a"),
        ProtoError::ControlChar {
            field: "drain reason"
        }
    );
}

#[test]
fn unknown_types_are_skipped() {
    // Unknown type 0x3f with 3 bytes, unknown 2-byte type 0x4100 empty, then a Ping.
    let buf = hex("3f 03 aabbcc 4100 00 0a 08 0000000000000009");
    assert_eq!(
        decode_control(&buf),
        Ok(Some((ControlMsg::Unknown { ty: 0x3f }, 5)))
    );
    assert_eq!(
        decode_control(&buf[5..]),
        Ok(Some((ControlMsg::Unknown { ty: 0x100 }, 3)))
    );
    let mut dec = FrameDecoder::new();
    dec.push(&buf).unwrap();
    assert_eq!(dec.next_msg(), Ok(Some(ControlMsg::Unknown { ty: 0x3f })));
    assert_eq!(dec.next_msg(), Ok(Some(ControlMsg::Unknown { ty: 0x100 })));
    assert_eq!(dec.next_msg(), Ok(Some(ControlMsg::Ping { nonce: 9 })));
    assert_eq!(dec.next_msg(), Ok(None));
    assert_eq!(
        encode_control(&ControlMsg::Unknown { ty: 0x3f }, &mut Vec::new()),
        Err(ProtoError::EncodeUnknown(0x3f))
    );
}

/// A Hello of another control version is refused as that, whatever follows its version (a
/// newer one may add fields): it read as trailing bytes, a mere protocol violation.
#[test]
fn a_hello_of_another_version_is_told_as_such() {
    let mut hello = Hello {
        proto_version: 2,
        device: "laptop".into(),
        services: vec![],
        zone_serial: 1,
        zone_config: None,
        agent_version: "9.0".into(),
    };
    let mut buf = Vec::new();
    encode_control(&ControlMsg::Hello(hello.clone()), &mut buf).unwrap();
    assert_eq!(decode_control(&buf), Err(ProtoError::HelloVersion(2)));
    // With a field this version does not know (the frame's one-byte length grown by one).
    assert!(buf[1] < 63, "{buf:?}");
    let mut longer = buf.clone();
    longer.push(0xab);
    longer[1] += 1;
    assert_eq!(decode_control(&longer), Err(ProtoError::HelloVersion(2)));
    hello.proto_version = tunnel::proto::CONTROL_VERSION;
    let mut ours = Vec::new();
    encode_control(&ControlMsg::Hello(hello.clone()), &mut ours).unwrap();
    assert_eq!(
        decode_control(&ours),
        Ok(Some((ControlMsg::Hello(hello), ours.len())))
    );
}

#[test]
fn worst_case_hello_fits_and_round_trips() {
    let services = (0..MAX_SERVICES)
        .map(|i| ServiceInfo {
            name: format!("{i:0>63}"),
            proto: ServiceProto::Udp,
        })
        .collect();
    let hello = ControlMsg::Hello(Hello {
        proto_version: 1,
        device: "d".repeat(MAX_NAME_LEN),
        services,
        zone_serial: u64::MAX,
        zone_config: Some(vec![0x7b; MAX_ZONE_CONFIG]),
        agent_version: "v".repeat(MAX_VERSION_LEN),
    });
    let mut buf = Vec::new();
    encode_control(&hello, &mut buf).unwrap();
    assert!(
        buf.len() <= WORST_CASE_HELLO + 8,
        "{} > {}",
        buf.len(),
        WORST_CASE_HELLO
    );
    assert_eq!(decode_control(&buf), Ok(Some((hello.clone(), buf.len()))));

    // One service more, or a byte more of config, is refused by the encoder.
    let ControlMsg::Hello(mut h) = hello else {
        unreachable!()
    };
    h.zone_config = Some(vec![0; MAX_ZONE_CONFIG + 1]);
    assert!(matches!(
        encode_control(&ControlMsg::Hello(h.clone()), &mut Vec::new()),
        Err(ProtoError::FieldTooLong {
            field: "zone config",
            ..
        })
    ));
    h.zone_config = None;
    h.services.push(ServiceInfo {
        name: "extra".into(),
        proto: ServiceProto::Tcp,
    });
    assert!(matches!(
        encode_control(&ControlMsg::Hello(h), &mut Vec::new()),
        Err(ProtoError::TooMany {
            field: "services",
            ..
        })
    ));
}

#[test]
fn frame_decoder_buffer_is_bounded() {
    let mut dec = FrameDecoder::new();
    let chunk = vec![0u8; MAX_PUSH_CHUNK];
    // Zero bytes are empty frames of unknown type 0, but we never drain.
    let mut pushed = 0;
    while pushed + chunk.len() <= MAX_DECODER_BUFFER {
        dec.push(&chunk).unwrap();
        pushed += chunk.len();
    }
    assert!(matches!(
        dec.push(&chunk),
        Err(ProtoError::DecoderFull { .. })
    ));
}

#[test]
fn datagram_errors() {
    assert_eq!(decode_datagram(&[]), Err(ProtoError::EmptyDatagram));
    assert_eq!(
        decode_datagram(&hex("41")),
        Err(ProtoError::Truncated { what: "datagram" })
    );
    assert_eq!(
        decode_datagram(&hex("4005")),
        Err(ProtoError::VarintNonMinimal)
    );
    assert_eq!(
        decode_datagram(&hex("c000000100000000")),
        Err(ProtoError::VarintTooLarge {
            field: "flow id",
            value: 1 << 32
        })
    );
    let mut out = Vec::new();
    assert!(encode_datagram(1, &vec![0; 65_528], &mut out).is_err());
    assert!(out.is_empty());
}
