//! dig and kdig against a running server: the answers an ordinary DNS client sees.

use name_resolver::testzone;
use time::OffsetDateTime;

use crate::common::{flags, quoted, run_tool, short_lines, status, Running};

#[tokio::test]
async fn dig_a_and_aaaa_for_apex_wildcard_and_devices() {
    let (_, zone) = testzone::zone();
    let s = Running::start(zone).await;
    let both = ["203.0.113.10", "203.0.113.11"];
    for name in [
        "alice.example",
        "dfs.alice.example",
        "deep.app.alice.example",
        "home1.alice.example",
        "ns1.alice.example",
        "HOME2.Alice.Example",
    ] {
        let Some(out) = run_tool("dig", "dig A", s.addr, &["+short", "A", name]).await else {
            return;
        };
        assert_eq!(short_lines(&out), both, "{name}");
    }
    let Some(out) = run_tool(
        "dig",
        "dig A gw2",
        s.addr,
        &["+short", "A", "gw2.alice.example"],
    )
    .await
    else {
        return;
    };
    assert_eq!(short_lines(&out), ["203.0.113.11"]);
    let Some(out) = run_tool(
        "dig",
        "dig AAAA",
        s.addr,
        &["+short", "AAAA", "alice.example"],
    )
    .await
    else {
        return;
    };
    assert_eq!(short_lines(&out), ["2001:db8::10"]);
    s.stop().await;
}

#[tokio::test]
async fn dig_txt_over_tcp_reassembles_and_verifies() {
    let (key, zone) = testzone::zone();
    let want = zone_core::txt::to_txt(&zone);
    let s = Running::start(zone.clone()).await;
    let Some(out) = run_tool(
        "dig",
        "dig +tcp TXT",
        s.addr,
        &["+tcp", "+short", "TXT", "_zonegate.alice.example"],
    )
    .await
    else {
        return;
    };
    let got = quoted(&out);
    assert_eq!(got, want, "exactly the dump-text strings, in order");
    let back = zone_core::txt::from_txt(&got).unwrap();
    back.verify(&key.verifying_key(), OffsetDateTime::now_utc())
        .unwrap();
    assert_eq!(back, zone);
    s.stop().await;
}

#[tokio::test]
async fn dig_txt_over_udp_is_truncated_then_retried_over_tcp() {
    let (_, zone) = testzone::zone();
    let want = zone_core::txt::to_txt(&zone);
    let s = Running::start(zone).await;
    // +ignore: show the truncated UDP answer instead of retrying.
    let Some(out) = run_tool(
        "dig",
        "dig UDP TXT truncation",
        s.addr,
        &["+ignore", "+bufsize=4096", "TXT", "_zonegate.alice.example"],
    )
    .await
    else {
        return;
    };
    assert!(flags(&out).contains(&"tc".to_string()), "{out}");
    assert_eq!(status(&out), "NOERROR");
    // Without EDNS the limit is 512 bytes (RFC 1035): truncated too, and small answers still fit.
    let Some(out) = run_tool(
        "dig",
        "dig UDP TXT no EDNS",
        s.addr,
        &["+ignore", "+noedns", "TXT", "_zonegate.alice.example"],
    )
    .await
    else {
        return;
    };
    assert!(flags(&out).contains(&"tc".to_string()), "{out}");
    let Some(out) = run_tool(
        "dig",
        "dig A no EDNS",
        s.addr,
        &["+noedns", "+ignore", "A", "alice.example"],
    )
    .await
    else {
        return;
    };
    assert!(!flags(&out).contains(&"tc".to_string()), "{out}");
    assert!(out.contains("ANSWER: 2"), "{out}");
    // Without +ignore dig retries over TCP on TC and gets everything.
    let Some(out) = run_tool(
        "dig",
        "dig TXT retry",
        s.addr,
        &["+short", "TXT", "_zonegate.alice.example"],
    )
    .await
    else {
        return;
    };
    assert_eq!(quoted(&out), want);
    s.stop().await;
}

#[tokio::test]
async fn dig_soa_is_authoritative_and_carries_the_zone_serial() {
    let (_, zone) = testzone::zone_with(42, |_| {});
    let s = Running::start(zone).await;
    let Some(out) = run_tool("dig", "dig SOA", s.addr, &["SOA", "alice.example"]).await else {
        return;
    };
    assert_eq!(status(&out), "NOERROR");
    let f = flags(&out);
    assert!(f.contains(&"aa".to_string()), "{out}");
    assert!(
        !f.contains(&"ra".to_string()),
        "never offers recursion: {out}"
    );
    let Some(out) = run_tool(
        "dig",
        "dig SOA +short",
        s.addr,
        &["+short", "SOA", "alice.example"],
    )
    .await
    else {
        return;
    };
    let fields: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(fields[0], "ns1.alice.example.");
    assert_eq!(fields[1], "hostmaster.alice.example.");
    assert_eq!(fields[2], "42");
    s.stop().await;
}

/// Glue that does not fit a 512-byte answer is left out, not a reason to truncate (RFC 2181
/// §9): a zone with many dual-stack gateways used to answer NS without EDNS empty with TC.
#[tokio::test]
async fn glue_that_does_not_fit_is_left_out_without_truncating() {
    let (_, zone) = testzone::zone_with(1, |c| {
        for g in &mut c.gateways {
            g.addrs = (1..=12u16)
                .map(|i| {
                    if i % 2 == 0 {
                        format!("[2001:db8::{i:x}]:4433").parse().unwrap()
                    } else {
                        format!("203.0.113.{i}:4433").parse().unwrap()
                    }
                })
                .collect();
        }
    });
    let s = Running::start(zone).await;
    let Some(out) = run_tool(
        "dig",
        "dig NS +noedns",
        s.addr,
        &["NS", "alice.example", "+noedns", "+ignore"],
    )
    .await
    else {
        return;
    };
    assert_eq!(status(&out), "NOERROR");
    assert!(!flags(&out).contains(&"tc".to_string()), "{out}");
    assert!(out.contains("IN\tNS\tns1.alice.example."), "{out}");
    let additional = out.split("ADDITIONAL SECTION:").nth(1).expect("some glue");
    // Whole RRsets or none: ns1's six A records all, its AAAA records (which do not fit
    // after them) none.
    let a = additional.matches("\tA\t").count();
    let aaaa = additional.matches("\tAAAA\t").count();
    assert_eq!((a, aaaa), (6, 0), "{out}");
    s.stop().await;
}

#[tokio::test]
async fn dig_ns_with_glue() {
    let (_, zone) = testzone::zone();
    let s = Running::start(zone).await;
    let Some(out) = run_tool("dig", "dig NS", s.addr, &["NS", "alice.example"]).await else {
        return;
    };
    assert_eq!(status(&out), "NOERROR");
    assert!(flags(&out).contains(&"aa".to_string()));
    assert!(out.contains("IN\tNS\tns1.alice.example."), "{out}");
    // Glue in the additional section.
    let additional = out
        .split("ADDITIONAL SECTION:")
        .nth(1)
        .expect("additional section");
    assert!(
        additional.contains("ns1.alice.example.\t300\tIN\tA\t203.0.113.10"),
        "{out}"
    );
    assert!(additional.contains("2001:db8::10"), "{out}");
    s.stop().await;
}

#[tokio::test]
async fn dig_nxdomain_inside_the_zone_and_nodata() {
    let (_, zone) = testzone::zone();
    let s = Running::start(zone).await;
    let Some(out) = run_tool(
        "dig",
        "dig NXDOMAIN",
        s.addr,
        &["A", "nope.home1.alice.example"],
    )
    .await
    else {
        return;
    };
    assert_eq!(status(&out), "NXDOMAIN");
    assert!(flags(&out).contains(&"aa".to_string()));
    let authority = out
        .split("AUTHORITY SECTION:")
        .nth(1)
        .expect("SOA in authority");
    assert!(authority.contains("SOA"), "{out}");
    // Carried with the negative-caching TTL (RFC 2308 §3), not the SOA's own hour.
    let soa_line = authority
        .lines()
        .find(|l| l.contains("SOA"))
        .expect("SOA line");
    assert_eq!(
        soa_line.split_whitespace().nth(1),
        Some(name_resolver::records::NEGATIVE_TTL.to_string().as_str()),
        "{soa_line}"
    );
    // An existing name without that type: NOERROR, no answer, SOA.
    let Some(out) = run_tool("dig", "dig NODATA", s.addr, &["MX", "home1.alice.example"]).await
    else {
        return;
    };
    assert_eq!(status(&out), "NOERROR");
    assert!(out.contains("ANSWER: 0"), "{out}");
    s.stop().await;
}

#[tokio::test]
async fn dig_refused_for_every_other_domain() {
    let (_, zone) = testzone::zone();
    let s = Running::start(zone).await;
    for args in [
        &["A", "example.com"][..],
        &["A", "bob.example"],
        &["A", "xalice.example"],
        &["NS", "."],
        &["CH", "TXT", "version.bind"],
    ] {
        let Some(out) = run_tool("dig", "dig REFUSED", s.addr, args).await else {
            return;
        };
        assert_eq!(status(&out), "REFUSED", "{args:?}: {out}");
        assert!(!flags(&out).contains(&"aa".to_string()), "{args:?}");
        assert!(!out.contains("ANSWER SECTION"), "{args:?}");
    }
    // No zone transfer (dig prints no status for AXFR, only the failure).
    let Some(out) = run_tool("dig", "dig AXFR", s.addr, &["AXFR", "alice.example"]).await else {
        return;
    };
    assert!(out.contains("Transfer failed"), "{out}");
    assert!(!out.contains("SOA"), "{out}");
    s.stop().await;
}

#[tokio::test]
async fn kdig_answers_match() {
    let (key, zone) = testzone::zone_with(9, |_| {});
    let s = Running::start(zone).await;
    let Some(out) = run_tool("kdig", "kdig SOA", s.addr, &["SOA", "alice.example"]).await else {
        return;
    };
    assert_eq!(status(&out), "NOERROR");
    assert!(flags(&out).contains(&"aa".to_string()), "{out}");
    let Some(out) = run_tool(
        "kdig",
        "kdig +tcp TXT",
        s.addr,
        &["+tcp", "+short", "TXT", "_zonegate.alice.example"],
    )
    .await
    else {
        return;
    };
    let z = zone_core::txt::from_txt(&quoted(&out)).unwrap();
    z.verify(&key.verifying_key(), OffsetDateTime::now_utc())
        .unwrap();
    assert_eq!(z.config.serial, 9);
    let Some(out) = run_tool(
        "kdig",
        "kdig A",
        s.addr,
        &["+short", "A", "www.alice.example"],
    )
    .await
    else {
        return;
    };
    assert_eq!(short_lines(&out), ["203.0.113.10", "203.0.113.11"]);
    let Some(out) = run_tool(
        "kdig",
        "kdig NXDOMAIN",
        s.addr,
        &["A", "a._zonegate.alice.example"],
    )
    .await
    else {
        return;
    };
    assert_eq!(status(&out), "NXDOMAIN");
    let Some(out) = run_tool("kdig", "kdig REFUSED", s.addr, &["A", "example.org"]).await else {
        return;
    };
    assert_eq!(status(&out), "REFUSED");
    s.stop().await;
}

/// ANY over UDP gets an empty truncated answer (RFC 8482 §4: no amplification from spoofed
/// sources), and the DO bit of a query comes back in the response's OPT (RFC 3225 §3).
#[tokio::test]
async fn dig_any_over_udp_is_truncated_and_do_is_echoed() {
    let (_, zone) = testzone::zone();
    let s = Running::start(zone).await;
    let Some(out) = run_tool(
        "dig",
        "dig ANY over UDP",
        s.addr,
        &["ANY", "alice.example", "+ignore", "+notcp"],
    )
    .await
    else {
        return;
    };
    assert!(flags(&out).contains(&"tc".to_string()), "{out}");
    assert!(out.contains("ANSWER: 0"), "{out}");
    // Not our zone: refused as any other query for it would be, not truncated.
    let Some(out) = run_tool(
        "dig",
        "dig ANY elsewhere",
        s.addr,
        &["ANY", "example.com", "+ignore", "+notcp"],
    )
    .await
    else {
        return;
    };
    assert_eq!(status(&out), "REFUSED");
    assert!(!flags(&out).contains(&"tc".to_string()), "{out}");
    // A name that is not there: its negative answer, not a truncation sending the client to
    // TCP for nothing.
    let Some(out) = run_tool(
        "dig",
        "dig ANY of a name not there",
        s.addr,
        &["ANY", "nope.home1.alice.example", "+ignore", "+notcp"],
    )
    .await
    else {
        return;
    };
    assert_eq!(status(&out), "NXDOMAIN", "{out}");
    assert!(!flags(&out).contains(&"tc".to_string()), "{out}");
    // QCLASS * is answered as IN.
    let Some(out) = run_tool(
        "dig",
        "dig class ANY",
        s.addr,
        &["-c", "ANY", "-t", "SOA", "alice.example"],
    )
    .await
    else {
        return;
    };
    assert_eq!(status(&out), "NOERROR", "{out}");
    assert!(out.contains("ANSWER: 1"), "{out}");
    let Some(out) = run_tool(
        "dig",
        "dig +dnssec",
        s.addr,
        &["SOA", "alice.example", "+dnssec"],
    )
    .await
    else {
        return;
    };
    let opt = out
        .split("OPT PSEUDOSECTION:")
        .nth(1)
        .expect("an OPT record");
    assert!(
        opt.lines()
            .find(|l| l.contains("EDNS"))
            .is_some_and(|l| l.contains("flags: do")),
        "{out}"
    );
    s.stop().await;
}
