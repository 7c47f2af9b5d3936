//! The file format as serde types: what a user writes, before validation.
//!
//! Every struct refuses unknown keys (`deny_unknown_fields`) so that a typo such as `methds`
//! is an error rather than a silently missing restriction. Values that need a semantic check
//! later (names, CIDRs, rates ...) are wrapped in [`Spanned`] so the error can point at them.

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_spanned::Spanned;
use std::fmt;

/// One `[app.NAME]` table.
/// Read by hand: serde's own message listed `device` among the values to write, which every
/// app then refuses (only mesh apps know devices, and they take no limits).
impl TryFrom<String> for Per {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "client-ip" => Ok(Per::ClientIp),
            "app" => Ok(Per::App),
            // Refused where it is written, with why (compile).
            "device" => Ok(Per::Device),
            _ => Err(format!(
                "unknown `per` {s:?}: write \"client-ip\" (each client address; the default) or \"app\" (the app as a whole)"
            )),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AppSpec {
    pub http: Option<Spanned<HttpSpec>>,
    pub tcp: Option<Spanned<ListenSpec>>,
    pub udp: Option<Spanned<ListenSpec>>,
    pub mesh: Option<Spanned<bool>>,
    pub to: Spanned<String>,
    /// Absent means nobody is allowed: deny by default.
    pub allow: Option<Spanned<OneOrMany<RuleSpec>>>,
    pub limits: Option<Spanned<LimitsSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HttpSpec {
    pub host: Spanned<String>,
    pub path: Option<Spanned<String>>,
    #[serde(default)]
    pub strip_prefix: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListenSpec {
    pub listen: Spanned<String>,
    /// tcp apps: send the service a PROXY protocol v2 header with the client's address.
    pub proxy_protocol: Option<Spanned<bool>>,
}

/// One allow rule: every present condition must hold.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RuleSpec {
    pub from: Spanned<Vec<Spanned<String>>>,
    pub methods: Option<Spanned<Vec<Spanned<String>>>>,
    pub paths: Option<Spanned<Vec<Spanned<String>>>>,
    pub hours: Option<Spanned<String>>,
    pub days: Option<Spanned<Vec<Day>>>,
    pub tz: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Day {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl Day {
    /// Monday = 0, as in ISO 8601.
    pub fn index(self) -> u8 {
        self as u8
    }
}

/// What a rate limit counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case", try_from = "String")]
pub enum Per {
    /// Each client address (IPv6 clients by /64, see `limits`).
    ClientIp,
    /// Each zone device; public clients fall back to their address.
    Device,
    /// The app as a whole.
    App,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitsSpec {
    pub rate: Option<Spanned<String>>,
    pub burst: Option<Spanned<u32>>,
    pub per: Option<Spanned<Per>>,
    pub bandwidth: Option<Spanned<String>>,
    pub bandwidth_per_connection: Option<Spanned<String>>,
    pub max_connections: Option<Spanned<u32>>,
    pub max_connections_per_client: Option<Spanned<u32>>,
    pub max_body: Option<Spanned<String>>,
}

/// `allow = { ... }` or `allow = [{ ... }, { ... }]` (or `[[app.x.allow]]` tables).
#[derive(Debug)]
pub(crate) struct OneOrMany<T>(pub Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = OneOrMany<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a rule table or an array of rule tables")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                // Deserializing straight from the map keeps deny_unknown_fields and spans.
                let one = T::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(OneOrMany(vec![one]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut all = Vec::new();
                while let Some(x) = seq.next_element()? {
                    all.push(x);
                }
                Ok(OneOrMany(all))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}
