//! The answers of one zone, computed once from a [`SignedZone`] and then only looked up.
//!
//! Pure data: no sockets, no clock. [`ZoneRecords::new`] runs when the zone serial changes;
//! [`ZoneRecords::lookup`] runs per query and only reads maps and clones a few records.
//!
//! Names served for zone `DOMAIN`:
//! - `DOMAIN`: SOA, NS `ns1.DOMAIN`, A/AAAA of every gateway;
//! - `ns1.DOMAIN`: A/AAAA of every gateway (the NS target, also sent as glue);
//! - `*.DOMAIN`: A/AAAA of every gateway (app hostnames such as `dfs.DOMAIN` reach the HTTP front);
//! - `NAME.DOMAIN` per device not revoked: a gateway's own addresses for a gateway device, every
//!   gateway's for the others (devices are reached through a gateway);
//! - `_zonegate.DOMAIN`: one TXT record whose character-strings are exactly
//!   [`zone_core::txt::to_txt`], in order.
//!
//! The wildcard follows RFC 4592: it answers any name whose closest existing ancestor is the apex,
//! so `x.y.DOMAIN` gets the gateways but `x.home1.DOMAIN` (below a device) and `x._zonegate.DOMAIN`
//! are NXDOMAIN.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;

use hickory_proto::rr::rdata::{A, AAAA, NS, SOA, TXT};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::BinEncodable;
use zone_core::SignedZone;

use crate::error::RecordsError;

/// TTL of address and NS records: gateways move rarely, and five minutes bounds how long a resolver
/// keeps sending users to an address the owner has just removed.
pub const TTL_ADDR: u32 = 300;
/// TTL of the zone config TXT: a node re-fetching after an update sees it within a minute.
pub const TTL_TXT: u32 = 60;
/// TTL of the SOA record itself.
pub const TTL_SOA: u32 = 3600;
/// SOA MINIMUM, i.e. how long NXDOMAIN/NODATA is cached (RFC 2308): a device added to the zone
/// becomes resolvable everywhere within a minute.
pub const NEGATIVE_TTL: u32 = 60;
/// SOA REFRESH/RETRY/EXPIRE only matter to secondaries, which zonegate does not have; these are
/// the usual RFC 1912 values so that a secondary someone adds behaves sanely.
const SOA_REFRESH: i32 = 3600;
const SOA_RETRY: i32 = 600;
const SOA_EXPIRE: i32 = 1_209_600;
/// Largest TXT RDATA we publish. A DNS message is at most 65,535 bytes (the TCP length prefix);
/// this leaves room for the header, question and other sections. A zone.json above it (hundreds
/// of devices) cannot be published as one TXT record and is refused with a clear error.
pub const MAX_TXT_RDATA: usize = 60_000;

/// Label of the zone config TXT record.
pub const TXT_LABEL: &str = "_zonegate";
/// Label of the name server (the gateway itself).
pub const NS_LABEL: &str = "ns1";

/// Records of one type at one name, with what goes in the additional section when they are asked.
#[derive(Clone, Debug)]
struct RrSet {
    rtype: RecordType,
    records: Vec<Record>,
    /// Glue for NS answers; empty otherwise.
    additionals: Vec<Record>,
    /// Sum of the RDATA wire lengths, for the size bound of a response.
    rdata_len: usize,
}

impl RrSet {
    fn new(rtype: RecordType, records: Vec<Record>) -> Self {
        let rdata_len = records.iter().map(rdata_wire_len).sum();
        RrSet {
            rtype,
            records,
            additionals: Vec::new(),
            rdata_len,
        }
    }

    /// Upper bound of the answer section's size, glue included, and of what writing it needs
    /// on the way. The first owner name is written in full, the others as 2-byte pointers to
    /// it: hickory compresses a name against one it wrote before (not against the question,
    /// which it copies from the query as bytes). But it writes each name in full before it
    /// looks for the pointer, within the message's size limit: the last record needs room for
    /// its name in full for a moment, or it is rolled back and the answer cut short. Counting
    /// every owner in full made a 200-byte name's two A records look 660 bytes long, 450 on
    /// the wire, and truncated them for a client without EDNS. Glue owners are counted in full.
    fn wire_len(&self, owner: &LowerName) -> usize {
        let n = self.records.len();
        let full = name_wire_len(owner);
        let owners = match n {
            0 => 0,
            1 => full,
            _ => full + (n - 1) * 2 + (full - 2),
        };
        owners
            + n * 10
            + self.rdata_len
            + self.additionals.iter().map(record_wire_len).sum::<usize>()
    }
}

/// What a query finds.
#[derive(Debug, PartialEq)]
pub enum Lookup<'a> {
    /// Not a name of this zone, or a query we never answer (zone transfer): REFUSED.
    Refused,
    /// The name does not exist in the zone: NXDOMAIN (authoritative, with the SOA).
    NxDomain,
    /// The name exists but has no record of that type: NOERROR, no answer, with the SOA.
    NoData,
    /// Records to answer with.
    Found {
        answers: Cow<'a, [Record]>,
        additionals: Cow<'a, [Record]>,
        /// Upper bound of answers + additionals on the wire, to decide truncation up front.
        /// The additionals' part of it is theirs alone ([`record_wire_len`] each): glue may
        /// be left out to fit, without truncating (RFC 2181 §9).
        wire_len: usize,
    },
}

/// Precomputed records of one zone at one serial.
#[derive(Clone, Debug)]
pub struct ZoneRecords {
    origin: LowerName,
    wildcard: LowerName,
    serial: u64,
    soa: Record,
    /// The SOA as negative answers carry it: TTL min(SOA TTL, MINIMUM) (RFC 2308 §3, §5).
    negative_soa: Record,
    nodes: HashMap<LowerName, Vec<RrSet>>,
    /// Labels of the deepest node (`*` counted): no name below that depth exists.
    deepest: usize,
}

impl ZoneRecords {
    /// The records of `zone` without its TXT set (`_zonegate` answers NODATA): for a zone too
    /// large for DNS, whose addresses are still the zone's. Serving the last TXT that fitted
    /// instead would hand bootstrapping nodes a signed config without the newer revocations.
    pub fn without_txt(zone: &SignedZone) -> Result<Self, RecordsError> {
        Self::with_txt(zone, &[])
    }

    /// Builds the records of `zone`, publishing its own TXT strings.
    pub fn new(zone: &SignedZone) -> Result<Self, RecordsError> {
        // Refuse a zone that cannot fit before encoding it: base58 of n bytes (JSON has no zero
        // bytes) is at least n·log(256)/log(58) ≈ 1.3657·n characters, in one text or in
        // slices, and every string adds its header.
        let json = zone.to_json_compact();
        let at_least = json.len().saturating_mul(13_657) / 10_000;
        if at_least > MAX_TXT_RDATA {
            return Err(RecordsError::TxtTooLarge {
                bytes: at_least,
                max: MAX_TXT_RDATA,
            });
        }
        // `to_txt` is `chunk` of this same JSON: serialized once.
        Self::with_txt(zone, &zone_core::txt::chunk(&json))
    }

    /// Builds the records of `zone` but publishes `txt` at `_zonegate.DOMAIN`. The gateway never
    /// needs this; tests use it to serve a truncated or foreign TXT set.
    pub fn with_txt(zone: &SignedZone, txt: &[String]) -> Result<Self, RecordsError> {
        let c = &zone.config;
        let origin = Name::from_ascii(format!("{}.", c.domain))
            .map_err(|e| RecordsError::Name(c.domain.to_string(), e.to_string()))?;
        let child = |label: &str| -> Result<Name, RecordsError> {
            Name::from_ascii(label)
                .and_then(|l| l.append_domain(&origin))
                .map_err(|e| RecordsError::Name(format!("{label}.{}", c.domain), e.to_string()))
        };
        let ns1 = child(NS_LABEL)?;
        let all_gw = dedup_ips(
            c.gateways
                .iter()
                .flat_map(|g| g.addrs.iter().map(|a| a.ip())),
        );

        let mut nodes: HashMap<LowerName, Vec<RrSet>> = HashMap::new();

        // SOA serial is 32 bits; zone serials grow by one per change, so taking it modulo 2^32
        // keeps it growing in RFC 1982 serial arithmetic even past the (theoretical) wrap.
        let soa_serial = (c.serial % (1u64 << 32)) as u32;
        let soa = Record::from_rdata(
            origin.clone(),
            TTL_SOA,
            RData::SOA(SOA::new(
                ns1.clone(),
                child("hostmaster")?,
                soa_serial,
                SOA_REFRESH,
                SOA_RETRY,
                SOA_EXPIRE,
                NEGATIVE_TTL,
            )),
        );
        // Glue as whole RRsets, A then AAAA: answers that keep only the glue that fits keep or
        // drop a set at a time (handler.rs).
        let ns_glue: Vec<Record> = addr_sets(&ns1, &all_gw)
            .into_iter()
            .flat_map(|s| s.records)
            .collect();
        let mut ns = RrSet::new(
            RecordType::NS,
            vec![Record::from_rdata(
                origin.clone(),
                TTL_ADDR,
                RData::NS(NS(ns1.clone())),
            )],
        );
        ns.additionals = ns_glue;
        let mut apex = vec![RrSet::new(RecordType::SOA, vec![soa.clone()]), ns];
        apex.extend(addr_sets(&origin, &all_gw));
        nodes.insert(LowerName::new(&origin), apex);

        let wildcard = child("*")?;
        nodes.insert(LowerName::new(&wildcard), addr_sets(&wildcard, &all_gw));

        for d in c.devices.iter().filter(|d| !c.is_revoked(&d.name)) {
            // A name too long for DNS (`device add` refuses one, but a zone.json signed by
            // other means may hold it) gets no name of its own, the wildcard answers for it;
            // failing the whole zone kept an older TXT set served, and a restart refused.
            let Ok(name) = child(d.name.as_str()) else {
                continue;
            };
            let own = dedup_ips(
                c.gateways
                    .iter()
                    .filter(|g| g.device == d.name)
                    .flat_map(|g| g.addrs.iter().map(|a| a.ip())),
            );
            let ips = if own.is_empty() { &all_gw } else { &own };
            nodes.insert(LowerName::new(&name), addr_sets(&name, ips));
        }
        // After the devices: `ns1` is the name server's name, whose glue lists every gateway;
        // a device named `ns1` must not narrow it to its own address (resolvers replace glue
        // with the authoritative answer, and would send every query to that one gateway).
        nodes.insert(LowerName::new(&ns1), addr_sets(&ns1, &all_gw));

        let txt_name = child(TXT_LABEL)?;
        if txt.is_empty() {
            // The name stays, with nothing at it (NODATA for every type): left out, the
            // wildcard answered `_zonegate`'s A/AAAA queries and names below it.
            nodes.insert(LowerName::new(&txt_name), Vec::new());
            return Ok(Self::assemble(origin, wildcard, c.serial, soa, nodes));
        }
        let txt_len: usize = txt.iter().map(|s| s.len() + 1).sum();
        if txt_len > MAX_TXT_RDATA {
            return Err(RecordsError::TxtTooLarge {
                bytes: txt_len,
                max: MAX_TXT_RDATA,
            });
        }
        if let Some(s) = txt.iter().find(|s| s.len() > 255) {
            return Err(RecordsError::TxtString(s.len()));
        }
        let txt_rec = Record::from_rdata(
            txt_name.clone(),
            TTL_TXT,
            RData::TXT(TXT::new(txt.to_vec())),
        );
        nodes.insert(
            LowerName::new(&txt_name),
            vec![RrSet::new(RecordType::TXT, vec![txt_rec])],
        );
        Ok(Self::assemble(origin, wildcard, c.serial, soa, nodes))
    }

    fn assemble(
        origin: Name,
        wildcard: Name,
        serial: u64,
        soa: Record,
        nodes: HashMap<LowerName, Vec<RrSet>>,
    ) -> Self {
        ZoneRecords {
            origin: LowerName::new(&origin),
            wildcard: LowerName::new(&wildcard),
            serial,
            negative_soa: {
                let mut r = soa.clone();
                r.set_ttl(TTL_SOA.min(NEGATIVE_TTL));
                r
            },
            soa,
            deepest: nodes.keys().map(|n| n.iter().count()).max().unwrap_or(0),
            nodes,
        }
    }

    /// The zone serial these records were built from.
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// The zone apex (`DOMAIN.`).
    pub fn origin(&self) -> &LowerName {
        &self.origin
    }

    /// The SOA record, for the authority section of negative answers.
    pub fn soa(&self) -> &Record {
        &self.soa
    }

    /// The SOA record negative answers (NXDOMAIN, NODATA) carry in their authority section.
    pub fn negative_soa(&self) -> &Record {
        &self.negative_soa
    }

    /// The name an answer to `qname` comes from: `qname` itself where it is a name of the
    /// zone, else the wildcard (for the rate limiter, which must not give every random
    /// name under the wildcard an allowance of its own).
    pub fn answer_owner<'a>(&'a self, qname: &'a LowerName) -> &'a LowerName {
        match self.nodes.contains_key(qname) {
            true => qname,
            false => &self.wildcard,
        }
    }

    /// Finds the answer to a query of class IN.
    pub fn lookup(&self, qname: &LowerName, qtype: RecordType) -> Lookup<'_> {
        self.lookup_as(qname, None, qtype)
    }

    /// As [`Records::lookup`], with the query's name as it was sent (`asked`): a wildcard's
    /// answer is owned by it, case and all (RFC 4592 §3.4.3 makes the query name the owner,
    /// RFC 4343 keeps its case); it was the lowercased name.
    pub fn lookup_as(
        &self,
        qname: &LowerName,
        asked: Option<&Name>,
        qtype: RecordType,
    ) -> Lookup<'_> {
        if !self.origin.zone_of(qname) {
            return Lookup::Refused;
        }
        // Zone transfers are never offered: the zone config is public through TXT anyway, and a
        // transfer is a cheap amplification vector.
        if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
            return Lookup::Refused;
        }
        if let Some(sets) = self.nodes.get(qname) {
            return answer(sets, qtype, qname, None);
        }
        // RFC 4592: the closest encloser is the longest existing ancestor. The wildcard applies
        // only when that is the apex (the only name with a `*` child). The walk starts at the
        // deepest node's depth: one label at a time from a name of 127 labels rebuilt the name
        // 125 times, before any rate limit, on the socket's one task.
        let labels = qname.iter().count();
        let mut up = if labels > self.deepest + 1 {
            LowerName::new(&qname.trim_to(self.deepest))
        } else {
            qname.base_name()
        };
        while up != self.origin {
            if self.nodes.contains_key(&up) {
                return Lookup::NxDomain;
            }
            up = up.base_name();
        }
        let owner = match asked {
            Some(a) if LowerName::from(a) == *qname => a.clone(),
            _ => Name::from(qname),
        };
        match self.nodes.get(&self.wildcard) {
            Some(sets) => answer(sets, qtype, qname, Some(owner)),
            None => Lookup::NxDomain,
        }
    }
}

/// The answer from the RRsets of a node; `synth` renames records to the query name (wildcard).
fn answer<'a>(
    sets: &'a [RrSet],
    qtype: RecordType,
    qname: &LowerName,
    synth: Option<Name>,
) -> Lookup<'a> {
    let rename = |recs: &[Record]| -> Vec<Record> {
        let owner = synth.clone().unwrap_or_else(|| Name::from(qname));
        recs.iter()
            .map(|r| {
                let mut r = r.clone();
                r.set_name(owner.clone());
                r
            })
            .collect()
    };
    if qtype == RecordType::ANY {
        // A node of one RRset (`_zonegate`: its ~60 KB TXT) is answered without a copy: a
        // 40-byte spoofable UDP query used to clone it all, only to be truncated.
        if let ([set], None) = (sets, &synth) {
            if set.records.is_empty() {
                return Lookup::NoData;
            }
            return Lookup::Found {
                answers: Cow::Borrowed(set.records.as_slice()),
                additionals: Cow::Borrowed(&[]),
                wire_len: set.wire_len(qname),
            };
        }
        // Every RRset of the node (a handful at most); no glue.
        let all: Vec<Record> = sets
            .iter()
            .flat_map(|s| s.records.iter().cloned())
            .collect();
        if all.is_empty() {
            return Lookup::NoData;
        }
        let wire_len = sets.iter().map(|s| s.wire_len(qname)).sum();
        let answers = if synth.is_some() { rename(&all) } else { all };
        return Lookup::Found {
            answers: Cow::Owned(answers),
            additionals: Cow::Borrowed(&[]),
            wire_len,
        };
    }
    let Some(set) = sets.iter().find(|s| s.rtype == qtype) else {
        return Lookup::NoData;
    };
    let answers = match synth {
        Some(_) => Cow::Owned(rename(&set.records)),
        None => Cow::Borrowed(set.records.as_slice()),
    };
    Lookup::Found {
        answers,
        additionals: Cow::Borrowed(set.additionals.as_slice()),
        wire_len: set.wire_len(qname),
    }
}

/// Wire length of a name written without compression.
pub(crate) fn name_wire_len(name: &LowerName) -> usize {
    Name::from(name).iter().map(|l| l.len() + 1).sum::<usize>() + 1
}

/// Upper bound of one record's size on the wire (owner name in full).
pub(crate) fn record_wire_len(r: &Record) -> usize {
    name_wire_len(&LowerName::new(r.name())) + 10 + rdata_wire_len(r)
}

fn rdata_wire_len(r: &Record) -> usize {
    // Encoding records we built ourselves does not fail; if it ever did, assume the worst.
    r.data()
        .to_bytes()
        .map(|b| b.len())
        .unwrap_or(u16::MAX as usize)
}

fn dedup_ips(ips: impl Iterator<Item = IpAddr>) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for ip in ips {
        // An IPv4-mapped address is published as the IPv4 one it is (an A record): as an
        // AAAA it reached no IPv4-only client, and it could stand beside its IPv4 twin.
        let ip = ip.to_canonical();
        // An unspecified address (0.0.0.0) is a listen address, not one anybody can dial.
        if !ip.is_unspecified() && !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

fn addr_records(name: &Name, ips: &[IpAddr]) -> Vec<Record> {
    ips.iter()
        .map(|ip| {
            let rdata = match ip {
                IpAddr::V4(v4) => RData::A(A(*v4)),
                IpAddr::V6(v6) => RData::AAAA(AAAA(*v6)),
            };
            Record::from_rdata(name.clone(), TTL_ADDR, rdata)
        })
        .collect()
}

fn addr_sets(name: &Name, ips: &[IpAddr]) -> Vec<RrSet> {
    let recs = addr_records(name, ips);
    let (v4, v6): (Vec<Record>, Vec<Record>) = recs
        .into_iter()
        .partition(|r| r.record_type() == RecordType::A);
    let mut sets = Vec::new();
    if !v4.is_empty() {
        sets.push(RrSet::new(RecordType::A, v4));
    }
    if !v6.is_empty() {
        sets.push(RrSet::new(RecordType::AAAA, v6));
    }
    sets
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testzone::{zone, zone_with};

    fn lname(s: &str) -> LowerName {
        LowerName::new(&Name::from_ascii(s).unwrap())
    }

    fn found(l: Lookup<'_>) -> Vec<Record> {
        match l {
            Lookup::Found { answers, .. } => answers.into_owned(),
            other => panic!("expected records, got {other:?}"),
        }
    }

    fn ips(recs: &[Record]) -> Vec<String> {
        recs.iter().map(|r| r.data().to_string()).collect()
    }

    #[test]
    fn apex_and_wildcard_and_devices_point_at_gateways() {
        let (_, z) = zone();
        let r = ZoneRecords::new(&z).unwrap();
        let a = found(r.lookup(&lname("alice.example."), RecordType::A));
        assert_eq!(ips(&a), ["203.0.113.10", "203.0.113.11"]);
        let aaaa = found(r.lookup(&lname("alice.example."), RecordType::AAAA));
        assert_eq!(ips(&aaaa), ["2001:db8::10"]);
        // Wildcard: owner renamed to the query name, one or more labels deep.
        for q in ["dfs.alice.example.", "a.b.alice.example."] {
            let recs = found(r.lookup(&lname(q), RecordType::A));
            assert_eq!(ips(&recs), ["203.0.113.10", "203.0.113.11"]);
            assert!(recs.iter().all(|x| x.name().to_ascii() == q));
        }
        // A node device: every gateway. A gateway device: its own addresses.
        let home = found(r.lookup(&lname("home1.alice.example."), RecordType::A));
        assert_eq!(ips(&home), ["203.0.113.10", "203.0.113.11"]);
        let gw2 = found(r.lookup(&lname("gw2.alice.example."), RecordType::A));
        assert_eq!(ips(&gw2), ["203.0.113.11"]);
        // Case does not matter.
        assert!(matches!(
            r.lookup(&lname("HOME1.Alice.Example."), RecordType::A),
            Lookup::Found { .. }
        ));
        // A wildcard's answer is owned by the name as asked, case kept (it was lowercased).
        let asked = Name::from_ascii("DFS.Alice.Example.").unwrap();
        let recs = found(r.lookup_as(&LowerName::from(&asked), Some(&asked), RecordType::A));
        assert!(
            recs.iter()
                .all(|x| x.name().to_ascii() == "DFS.Alice.Example."),
            "{recs:?}"
        );
    }

    #[test]
    fn txt_is_exactly_the_dump_text_strings_in_order() {
        let (_, z) = zone();
        let r = ZoneRecords::new(&z).unwrap();
        let recs = found(r.lookup(&lname("_zonegate.alice.example."), RecordType::TXT));
        assert_eq!(recs.len(), 1);
        let RData::TXT(t) = recs[0].data() else {
            panic!("not TXT")
        };
        let got: Vec<String> = t
            .iter()
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
            .collect();
        assert_eq!(got, zone_core::txt::to_txt(&z));
        assert!(got.len() > 1, "the test zone should need several chunks");
        assert_eq!(zone_core::txt::from_txt(&got).unwrap(), z);
    }

    #[test]
    fn any_answers_every_set_and_the_zone_txt_without_a_copy() {
        let (_, z) = zone();
        let r = ZoneRecords::new(&z).unwrap();
        let txt = lname("_zonegate.alice.example.");
        let Lookup::Found {
            answers, wire_len, ..
        } = r.lookup(&txt, RecordType::ANY)
        else {
            panic!("no ANY answer at _zonegate")
        };
        assert!(matches!(answers, Cow::Borrowed(_)), "the TXT was copied");
        assert_eq!(
            answers.as_ref(),
            found(r.lookup(&txt, RecordType::TXT)).as_slice()
        );
        let Lookup::Found {
            wire_len: txt_len, ..
        } = r.lookup(&txt, RecordType::TXT)
        else {
            panic!("no TXT")
        };
        assert_eq!(wire_len, txt_len);
        // The apex has several sets (SOA, NS, A, …): all of them.
        let apex = found(r.lookup(&lname("alice.example."), RecordType::ANY));
        for t in [RecordType::SOA, RecordType::NS] {
            assert!(apex.iter().any(|rec| rec.record_type() == t), "{t} missing");
        }
    }

    /// A gateway device named `ns1` does not narrow the name server's name to its own
    /// address: resolvers replace the NS glue with the authoritative answer for `ns1`.
    #[test]
    fn a_device_named_ns1_keeps_every_gateway_behind_ns1() {
        let (_, z) = zone_with(1, |c| {
            let gw1 = zone_core::DeviceName::new("gw1").unwrap();
            let ns1 = zone_core::DeviceName::new("ns1").unwrap();
            for d in c.devices.iter_mut().filter(|d| d.name == gw1) {
                d.name = ns1.clone();
            }
            for g in c.gateways.iter_mut().filter(|g| g.device == gw1) {
                g.device = ns1.clone();
            }
        });
        let r = ZoneRecords::new(&z).unwrap();
        let ns1 = found(r.lookup(&lname("ns1.alice.example."), RecordType::A));
        assert_eq!(ips(&ns1), ["203.0.113.10", "203.0.113.11"]);
    }

    #[test]
    fn soa_ns_and_glue() {
        let (_, z) = zone();
        let r = ZoneRecords::new(&z).unwrap();
        let soa = found(r.lookup(&lname("alice.example."), RecordType::SOA));
        let RData::SOA(s) = soa[0].data() else {
            panic!("not SOA")
        };
        assert_eq!(u64::from(s.serial()), z.config.serial);
        assert_eq!(s.mname().to_ascii(), "ns1.alice.example.");
        assert_eq!(s.minimum(), NEGATIVE_TTL);
        let Lookup::Found {
            answers,
            additionals,
            ..
        } = r.lookup(&lname("alice.example."), RecordType::NS)
        else {
            panic!("no NS")
        };
        assert_eq!(ips(&answers), ["ns1.alice.example."]);
        // Whole RRsets, A then AAAA (what fits of them is kept a set at a time).
        assert_eq!(
            ips(&additionals),
            ["203.0.113.10", "203.0.113.11", "2001:db8::10"]
        );
        let ns1 = found(r.lookup(&lname("ns1.alice.example."), RecordType::A));
        assert_eq!(ips(&ns1), ["203.0.113.10", "203.0.113.11"]);
    }

    #[test]
    fn mapped_addresses_are_published_as_the_ipv4_ones_they_are() {
        let ips = [
            "::ffff:203.0.113.10",
            "203.0.113.10",
            "::ffff:0.0.0.0",
            "2001:db8::1",
        ]
        .map(|a| a.parse::<IpAddr>().unwrap());
        assert_eq!(
            dedup_ips(ips.into_iter()),
            ["203.0.113.10", "2001:db8::1"].map(|a| a.parse::<IpAddr>().unwrap())
        );
    }

    #[test]
    fn negative_answers_and_refusals() {
        let (_, z) = zone();
        let r = ZoneRecords::new(&z).unwrap();
        // Below an existing name: the wildcard does not apply (RFC 4592), however deep.
        let deep = "a.".repeat(100);
        for q in [
            "x.home1.alice.example.".to_owned(),
            "x._zonegate.alice.example.".to_owned(),
            format!("{deep}home1.alice.example."),
        ] {
            assert_eq!(r.lookup(&lname(&q), RecordType::A), Lookup::NxDomain, "{q}");
        }
        // Below no existing name, however deep: the wildcard's.
        assert!(matches!(
            r.lookup(
                &lname(&format!("{deep}nothing.alice.example.")),
                RecordType::A
            ),
            Lookup::Found { .. }
        ));
        // Existing names without that type.
        assert_eq!(
            r.lookup(&lname("home1.alice.example."), RecordType::TXT),
            Lookup::NoData
        );
        assert_eq!(
            r.lookup(&lname("dfs.alice.example."), RecordType::MX),
            Lookup::NoData
        );
        // Other domains, including a suffix look-alike, and zone transfers.
        for q in ["example.", "bob.example.", "xalice.example.", "."] {
            assert_eq!(r.lookup(&lname(q), RecordType::A), Lookup::Refused, "{q}");
        }
        assert_eq!(
            r.lookup(&lname("alice.example."), RecordType::AXFR),
            Lookup::Refused
        );
    }

    #[test]
    fn revoked_devices_have_no_own_name_and_serial_follows() {
        let (_, z) = zone_with(7, |c| {
            // As `zonegate device revoke` does: listed and revoked at once is refused.
            c.devices.retain(|d| d.name.as_str() != "home1");
            c.revoked.push(zone_core::Revocation {
                device: "home1".parse().unwrap(),
                revoked_at: c.issued_at,
                cert_serials: vec![],
            })
        });
        let r = ZoneRecords::new(&z).unwrap();
        assert_eq!(r.serial(), 7);
        // home1 no longer exists as a name, so names below it fall to the wildcard.
        assert!(matches!(
            r.lookup(&lname("x.home1.alice.example."), RecordType::A),
            Lookup::Found { .. }
        ));
    }

    /// A device whose name does not fit in DNS under the zone's domain is left out, and the
    /// zone still builds, TXT set included.
    #[test]
    fn a_device_name_too_long_for_dns_is_left_out() {
        let label = "a".repeat(60);
        let long = format!("{}.example", [label.as_str(); 3].join("."));
        let (_, z) = zone_with(3, |c| {
            c.domain = zone_core::Domain::new(&long).unwrap();
            let mut d = c.devices[2].clone();
            d.name = zone_core::DeviceName::new(&"n".repeat(63)).unwrap();
            c.devices.push(d);
        });
        let r = ZoneRecords::new(&z).unwrap();
        let home1 = lname(&format!("home1.{long}."));
        assert_eq!(r.answer_owner(&home1), &home1);
        let txt = lname(&format!("_zonegate.{long}."));
        assert!(matches!(
            r.lookup(&txt, RecordType::TXT),
            Lookup::Found { .. }
        ));
    }

    /// Answers made from the wildcard are the wildcard's, for the rate limiter: a flood of
    /// random names under it shares one allowance.
    #[test]
    fn wildcard_answers_are_the_wildcards() {
        let (_, z) = zone();
        let r = ZoneRecords::new(&z).unwrap();
        let random = lname("x7f3k.alice.example.");
        assert!(matches!(
            r.lookup(&random, RecordType::A),
            Lookup::Found { .. }
        ));
        assert_eq!(r.answer_owner(&random), &lname("*.alice.example."));
        let device = lname("home1.alice.example.");
        assert_eq!(r.answer_owner(&device), &device);
        let apex = lname("alice.example.");
        assert_eq!(r.answer_owner(&apex), &apex);
    }

    #[test]
    fn oversized_txt_is_refused_clearly() {
        let (_, z) = zone();
        let big = vec!["x".repeat(255); 300];
        let e = ZoneRecords::with_txt(&z, &big).unwrap_err().to_string();
        assert!(e.contains("too large"), "{e}");
        let e = ZoneRecords::with_txt(&z, &["y".repeat(256)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("255"), "{e}");
    }

    /// A zone too large for DNS still has its addresses served, at its serial, and no TXT set
    /// (the last one that fitted would lack the newer revocations).
    #[test]
    fn a_zone_without_its_txt_keeps_its_addresses() {
        let (_, z) = zone();
        let r = ZoneRecords::without_txt(&z).unwrap();
        // The name is there, with nothing at it: not the wildcard's.
        for t in [RecordType::TXT, RecordType::A, RecordType::AAAA] {
            assert!(
                matches!(
                    r.lookup(&lname("_zonegate.alice.example."), t),
                    Lookup::NoData
                ),
                "{t}"
            );
        }
        assert!(matches!(
            r.lookup(&lname("x._zonegate.alice.example."), RecordType::A),
            Lookup::NxDomain
        ));
        assert_eq!(r.serial(), z.config.serial);
        assert_eq!(
            ips(&found(r.lookup(&lname("alice.example."), RecordType::A))),
            ips(&found(
                ZoneRecords::new(&z)
                    .unwrap()
                    .lookup(&lname("alice.example."), RecordType::A)
            ))
        );
    }

    /// The bound against the answer as the server writes it (hickory-server's response
    /// path), whatever the case of the question: an upper bound, and not a loose one.
    #[test]
    fn wire_len_bounds_the_real_encoding() {
        use hickory_proto::op::{Header, Message, Query};
        use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncoder};
        use hickory_server::authority::{MessageRequest, MessageResponseBuilder};
        let (_, z) = zone();
        let r = ZoneRecords::new(&z).unwrap();
        let long = format!("{}.{}.alice.example.", "x".repeat(63), "y".repeat(63));
        for (q, t) in [
            ("_zonegate.alice.example.", RecordType::TXT),
            ("_ZoneGate.Alice.example.", RecordType::TXT),
            ("alice.example.", RecordType::NS),
            ("a.b.alice.example.", RecordType::A),
            ("A.B.ALICE.EXAMPLE.", RecordType::AAAA),
            (long.as_str(), RecordType::A),
        ] {
            let asked = Name::from_ascii(q).unwrap();
            let Lookup::Found {
                answers,
                additionals,
                wire_len,
            } = r.lookup(&LowerName::new(&asked), t)
            else {
                panic!("{q}")
            };
            let mut m = Message::new();
            m.add_query(Query::query(asked.clone(), t));
            let query = m.to_vec().unwrap();
            let req = MessageRequest::read(&mut BinDecoder::new(&query)).unwrap();
            let none: &[Record] = &[];
            let response = MessageResponseBuilder::from_message_request(&req).build(
                Header::response_from_request(req.header()),
                answers.iter(),
                none.iter(),
                none.iter(),
                additionals.iter(),
            );
            let bound = 12 + name_wire_len(&LowerName::new(&asked)) + 4 + wire_len;
            // Written within the bound as the size limit, as the UDP path writes it: nothing
            // rolled back, nothing truncated.
            let mut wire = Vec::new();
            let mut encoder = BinEncoder::new(&mut wire);
            encoder.set_max_size(u16::try_from(bound).unwrap());
            let info = response.destructive_emit(&mut encoder).unwrap();
            assert!(!info.truncated(), "{q}: cut short within {bound}");
            let back = Message::from_vec(&wire).unwrap();
            assert_eq!(back.answers().len(), answers.len(), "{q}");
            assert!(
                bound >= wire.len() && bound <= wire.len() + 2 * 256,
                "{q}: bound {bound}, written {}",
                wire.len()
            );
        }
    }
}
