//! Traffic classes and classification rules: the config types, the built-in defaults
//! (payment providers' hosts, stream ports, interactive services) and the effective class
//! table that the appliance runs with.

use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_spanned::Spanned;

/// The five classes, most important first.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Deserialize,
    Serialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ClassName {
    Pos,
    Stream,
    Interactive,
    #[default]
    Bulk,
    Guest,
}

impl ClassName {
    pub const ALL: [ClassName; 5] = [
        Self::Pos,
        Self::Stream,
        Self::Interactive,
        Self::Bulk,
        Self::Guest,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pos => "pos",
            Self::Stream => "stream",
            Self::Interactive => "interactive",
            Self::Bulk => "bulk",
            Self::Guest => "guest",
        }
    }
}

/// How a class's packets are spread over the uplinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ClassMode {
    /// A copy on each of the two best uplinks.
    Redundant,
    /// One uplink per flow, the lowest-RTT one with room, kept while it stays healthy.
    LowestLatency,
    /// Spread over every usable uplink by capacity.
    Aggregate,
}

/// Where a class's traffic goes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ClassPath {
    /// Through the bonded tunnel (the default).
    #[default]
    Tunnel,
    /// Straight out of the best uplink, NATed, never through the hub.
    Direct,
}

/// Kinds of uplink a class may be kept off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum UplinkTag {
    Backup,
    Metered,
    Cellular,
}

/// A value written as an integer or as a string.
enum IntOrStr {
    Int(i64),
    Str(String),
}

/// Reads an integer or a string; anything else is refused with `expected` (serde's
/// untagged enums would only say that no variant matched).
fn int_or_str<'de, D: Deserializer<'de>>(
    d: D,
    expected: &'static str,
) -> Result<IntOrStr, D::Error> {
    struct V(&'static str);
    impl serde::de::Visitor<'_> for V {
        type Value = IntOrStr;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<IntOrStr, E> {
            Ok(IntOrStr::Int(v))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<IntOrStr, E> {
            i64::try_from(v)
                .map(IntOrStr::Int)
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<IntOrStr, E> {
            Ok(IntOrStr::Str(v.to_owned()))
        }
    }
    d.deserialize_any(V(expected))
}

/// A rate in bits per second, written `"4mbit"`, `"500kbit"`, `"1gbit"` or a number of bit/s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rate(pub u64);

impl Rate {
    pub fn bytes_per_sec(self) -> u64 {
        self.0 / 8
    }
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim().to_ascii_lowercase();
        let t = t.strip_suffix("/s").unwrap_or(&t);
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let mult = match unit.trim() {
            "" | "bit" | "bps" => 1.0,
            "kbit" | "kbps" => 1e3,
            "mbit" | "mbps" => 1e6,
            "gbit" | "gbps" => 1e9,
            _ => {
                return Err(format!(
                    "expected a rate like \"4mbit\" or \"500kbit\", got {s:?}"
                ))
            }
        };
        let n: f64 = num
            .parse()
            .map_err(|_| format!("expected a rate like \"4mbit\" or \"500kbit\", got {s:?}"))?;
        let v = n * mult;
        if !(1000.0..=1e12).contains(&v) {
            return Err(format!("rate {s:?} is outside 1kbit..1000gbit"));
        }
        Ok(Rate(v as u64))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        if v % 1_000_000_000 == 0 {
            write!(f, "{}gbit", v / 1_000_000_000)
        } else if v % 1_000_000 == 0 {
            write!(f, "{}mbit", v / 1_000_000)
        } else if v % 1000 == 0 {
            write!(f, "{}kbit", v / 1000)
        } else {
            write!(f, "{v}bit")
        }
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match int_or_str(
            d,
            "a rate like \"4mbit\" or \"500kbit\", or bit/s as a number",
        )? {
            IntOrStr::Int(n) => Rate::from_str(&n.to_string()).map_err(serde::de::Error::custom),
            IntOrStr::Str(s) => Rate::from_str(&s).map_err(serde::de::Error::custom),
        }
    }
}

impl schemars::JsonSchema for Rate {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Rate".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A rate: \"4mbit\", \"500kbit\", \"1gbit\", or bit/s as a number.",
            "type": ["string", "integer"],
            "pattern": "^[0-9.]+ *([kmg]?bit|[kmg]?bps|bit|bps)?(/s)?$"
        })
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// A port or an inclusive range, written `443` or `"8000-8999"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange(pub u16, pub u16);

impl PortRange {
    pub fn contains(self, p: u16) -> bool {
        self.0 <= p && p <= self.1
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bad = |s: &str| {
            serde::de::Error::custom(format!(
                "expected a port (0-65535) or a range like \"8000-8999\", got {s:?}"
            ))
        };
        match int_or_str(d, "a port (0-65535) or a range like \"8000-8999\"")? {
            IntOrStr::Int(n) => u16::try_from(n)
                .map(|p| PortRange(p, p))
                .map_err(|_| bad(&n.to_string())),
            IntOrStr::Str(s) => {
                let (a, b) = s.split_once('-').unwrap_or((&s, &s));
                let a: u16 = a.trim().parse().map_err(|_| bad(&s))?;
                let b: u16 = b.trim().parse().map_err(|_| bad(&s))?;
                if a > b {
                    return Err(bad(&s));
                }
                Ok(PortRange(a, b))
            }
        }
    }
}

impl schemars::JsonSchema for PortRange {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PortRange".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A port (443) or an inclusive range (\"8000-8999\").",
            "oneOf": [
                { "type": "integer", "minimum": 0, "maximum": 65535 },
                { "type": "string", "pattern": "^[0-9]{1,5}-[0-9]{1,5}$" }
            ]
        })
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 == self.1 {
            s.serialize_u16(self.0)
        } else {
            s.serialize_str(&format!("{}-{}", self.0, self.1))
        }
    }
}

/// An IP protocol: `tcp`, `udp`, `icmp`, `icmpv6` or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proto(pub u8);

impl<'de> Deserialize<'de> for Proto {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match int_or_str(d, "tcp, udp, icmp, icmpv6 or a protocol number 0-255")? {
            IntOrStr::Int(n) => u8::try_from(n).map(Proto).map_err(|_| {
                serde::de::Error::custom(format!(
                    "expected tcp, udp, icmp, icmpv6 or a protocol number 0-255, got {n}"
                ))
            }),
            IntOrStr::Str(s) => match s.to_ascii_lowercase().as_str() {
                "tcp" => Ok(Proto(6)),
                "udp" => Ok(Proto(17)),
                "icmp" => Ok(Proto(1)),
                "icmpv6" => Ok(Proto(58)),
                _ => Err(serde::de::Error::custom(format!(
                    "expected tcp, udp, icmp, icmpv6 or a protocol number, got {s:?}"
                ))),
            },
        }
    }
}

impl schemars::JsonSchema for Proto {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Proto".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "tcp, udp, icmp, icmpv6 or a protocol number.",
            "oneOf": [
                { "enum": ["tcp", "udp", "icmp", "icmpv6"] },
                { "type": "integer", "minimum": 0, "maximum": 255, "description": "a protocol number, 0-255" }
            ]
        })
    }
}

impl Serialize for Proto {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            6 => s.serialize_str("tcp"),
            17 => s.serialize_str("udp"),
            1 => s.serialize_str("icmp"),
            58 => s.serialize_str("icmpv6"),
            n => s.serialize_u8(n),
        }
    }
}

/// Overrides for one class; anything left out keeps the default.
#[derive(Debug, Clone, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClassConfig {
    /// Share below `pos` when classes compete (`pos` is always served first).
    pub weight: Option<u32>,
    /// How the class's packets are spread over the uplinks.
    pub mode: Option<ClassMode>,
    /// Guaranteed rate: served ahead of the weighted classes up to this rate.
    pub min_rate: Option<Rate>,
    /// Never more than this, summed over all uplinks.
    pub max_rate: Option<Rate>,
    /// Only these uplinks (by name); absent means all.
    pub uplinks: Option<Vec<String>>,
    /// Never on uplinks of these kinds (a backup uplink otherwise carries every class
    /// while no other uplink is usable).
    pub avoid: Option<Vec<UplinkTag>>,
    /// Through the tunnel (default) or directly out of an uplink.
    pub path: Option<ClassPath>,
}

/// `[edge.classes]`: one optional table per class.
#[derive(Debug, Clone, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClassesConfig {
    /// Card payments.
    #[schemars(with = "Option<ClassConfig>")]
    pub pos: Option<Spanned<ClassConfig>>,
    /// Live video (RTMP, SRT, WebRTC).
    #[schemars(with = "Option<ClassConfig>")]
    pub stream: Option<Spanned<ClassConfig>>,
    /// DNS, NTP, SSH, and the small packets of everything else.
    #[schemars(with = "Option<ClassConfig>")]
    pub interactive: Option<Spanned<ClassConfig>>,
    /// Everything else (the default class).
    #[schemars(with = "Option<ClassConfig>")]
    pub bulk: Option<Spanned<ClassConfig>>,
    /// Guests' devices.
    #[schemars(with = "Option<ClassConfig>")]
    pub guest: Option<Spanned<ClassConfig>>,
}

impl ClassesConfig {
    pub fn get(&self, c: ClassName) -> Option<&Spanned<ClassConfig>> {
        match c {
            ClassName::Pos => self.pos.as_ref(),
            ClassName::Stream => self.stream.as_ref(),
            ClassName::Interactive => self.interactive.as_ref(),
            ClassName::Bulk => self.bulk.as_ref(),
            ClassName::Guest => self.guest.as_ref(),
        }
    }
}

/// One classification rule: every field given must match (within a field, any value
/// may); the first matching rule decides a flow's class for the flow's lifetime.
#[derive(Debug, Clone, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// The class a matching flow gets.
    pub class: ClassName,
    /// LAN device by MAC address (`aa:bb:cc:dd:ee:ff`), resolved through the neighbour
    /// table and the DHCP leases.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mac: Vec<String>,
    /// LAN device by DHCP host name, resolved through the DHCP leases.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostname: Vec<String>,
    /// LAN interface or VLAN interface (`br-guest`, `eth0.20`): its prefixes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interface: Vec<String>,
    /// Source prefix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Vec<String>")]
    pub src: Vec<IpNet>,
    /// Destination prefix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Vec<String>")]
    pub dst: Vec<IpNet>,
    /// Destination host name learned from DNS answers: `api.stripe.com`, or `*.sumup.com`
    /// (the domain and every name below it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host: Vec<String>,
    /// IP protocols.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proto: Vec<Proto>,
    /// Source ports or ranges.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub src_port: Vec<PortRange>,
    /// Destination ports or ranges (`443`, `"8000-8999"`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dst_port: Vec<PortRange>,
    /// DSCP code points (0-63).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dscp: Vec<u8>,
}

impl Rule {
    pub fn is_empty(&self) -> bool {
        self.mac.is_empty()
            && self.hostname.is_empty()
            && self.interface.is_empty()
            && self.src.is_empty()
            && self.dst.is_empty()
            && self.host.is_empty()
            && self.proto.is_empty()
            && self.src_port.is_empty()
            && self.dst_port.is_empty()
            && self.dscp.is_empty()
    }
}

/// Card-payment providers' API hosts: their flows are `pos` out of the box.
pub const DEFAULT_POS_HOSTS: &[&str] = &[
    "*.squareup.com",
    "*.squareupsandbox.com",
    "api.stripe.com",
    "*.stripe.com",
    "*.stripe.network",
    "*.sumup.com",
    "*.sumup.io",
    "*.zettle.com",
    "*.izettle.com",
    "*.paypal.com",
    "*.adyen.com",
    "*.adyenpayments.com",
    "*.mollie.com",
    "*.worldpay.com",
    "*.globalpay.com",
    "*.clover.com",
    "*.shopify.com",
    "*.viva.com",
    "*.vivapayments.com",
    "*.paymentsense.com",
    "*.teya.com",
    "*.ingenico.com",
    "*.verifone.com",
];

/// The built-in rules, after the configured ones: payment hosts, live-stream protocols
/// (RTMP, RTMPS, SRT, WHIP/WebRTC media) and interactive services (DNS, NTP, SSH).
pub fn default_rules() -> Vec<Rule> {
    let ports = |class, proto: u8, ranges: &[(u16, u16)]| Rule {
        class,
        proto: vec![Proto(proto)],
        dst_port: ranges.iter().map(|&(a, b)| PortRange(a, b)).collect(),
        ..Default::default()
    };
    vec![
        Rule {
            class: ClassName::Pos,
            host: DEFAULT_POS_HOSTS.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        },
        // RTMP and RTMPS ingest.
        ports(ClassName::Stream, 6, &[(1935, 1935), (443, 443)])
            .with_host(&["*.rtmp.youtube.com", "*.contribute.live-video.net"]),
        ports(ClassName::Stream, 6, &[(1935, 1936)]),
        // SRT (common defaults), WebRTC/WHIP media (TURN, and the usual RTP ranges).
        ports(
            ClassName::Stream,
            17,
            &[(9000, 9001), (3478, 3478), (19302, 19309)],
        ),
        ports(ClassName::Interactive, 17, &[(53, 53), (123, 123)]),
        ports(ClassName::Interactive, 6, &[(53, 53), (22, 22), (853, 853)]),
    ]
}

impl Rule {
    fn with_host(mut self, hosts: &[&str]) -> Self {
        self.host = hosts.iter().map(|s| s.to_string()).collect();
        self
    }
}

/// A class as the appliance runs it: defaults with the config's overrides applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassSpec {
    pub name: ClassName,
    pub weight: u32,
    pub mode: ClassMode,
    pub min_rate: Option<u64>,
    pub max_rate: Option<u64>,
    pub uplinks: Option<Vec<String>>,
    pub avoid: Vec<UplinkTag>,
    pub path: ClassPath,
}

impl ClassSpec {
    /// The built-in settings of a class.
    pub fn default_for(name: ClassName) -> Self {
        let (weight, mode, min_rate, max_rate, avoid) = match name {
            ClassName::Pos => (100, ClassMode::Redundant, None, None, vec![]),
            ClassName::Stream => (8, ClassMode::LowestLatency, Some(4_000_000), None, vec![]),
            ClassName::Interactive => (4, ClassMode::LowestLatency, None, None, vec![]),
            ClassName::Bulk => (
                2,
                ClassMode::Aggregate,
                None,
                None,
                vec![UplinkTag::Metered],
            ),
            ClassName::Guest => (
                1,
                ClassMode::Aggregate,
                None,
                Some(5_000_000),
                vec![UplinkTag::Backup, UplinkTag::Metered],
            ),
        };
        Self {
            name,
            weight,
            mode,
            min_rate,
            max_rate,
            uplinks: None,
            avoid,
            path: ClassPath::Tunnel,
        }
    }

    fn apply(&mut self, c: &ClassConfig) {
        if let Some(w) = c.weight {
            self.weight = w;
        }
        if let Some(m) = c.mode {
            self.mode = m;
        }
        if let Some(r) = c.min_rate {
            self.min_rate = Some(r.0);
        }
        if let Some(r) = c.max_rate {
            self.max_rate = Some(r.0);
        }
        if let Some(u) = &c.uplinks {
            self.uplinks = Some(u.clone());
        }
        if let Some(a) = &c.avoid {
            self.avoid = a.clone();
        }
        if let Some(p) = c.path {
            self.path = p;
        }
    }

    /// May this class use an uplink with these properties at all?
    pub fn allows(&self, name: &str, backup: bool, metered: bool, cellular: bool) -> bool {
        if let Some(u) = &self.uplinks {
            if !u.iter().any(|n| n == name) {
                return false;
            }
        }
        !self.avoid.iter().any(|t| match t {
            UplinkTag::Backup => backup,
            UplinkTag::Metered => metered,
            UplinkTag::Cellular => cellular,
        })
    }
}

/// The five classes with the config's overrides, in [`ClassName::ALL`] order.
pub fn effective_classes(cfg: &ClassesConfig) -> Vec<ClassSpec> {
    ClassName::ALL
        .iter()
        .map(|&n| {
            let mut s = ClassSpec::default_for(n);
            if let Some(c) = cfg.get(n) {
                s.apply(c.get_ref());
            }
            s
        })
        .collect()
}

/// True for `name.example`, `*.example.com` style host patterns.
pub fn is_host_pattern(p: &str) -> bool {
    let rest = p.strip_prefix("*.").unwrap_or(p);
    !rest.is_empty()
        && rest.len() <= 253
        && rest.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with `-`).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for b in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_units_and_refuse_nonsense() {
        assert_eq!("4mbit".parse::<Rate>(), Ok(Rate(4_000_000)));
        assert_eq!("500kbit".parse::<Rate>(), Ok(Rate(500_000)));
        assert_eq!("1.5Mbit/s".parse::<Rate>(), Ok(Rate(1_500_000)));
        assert!("4 furlongs".parse::<Rate>().is_err());
        assert!("0mbit".parse::<Rate>().is_err());
        assert_eq!(Rate(4_000_000).to_string(), "4mbit");
    }

    #[test]
    fn host_patterns_and_macs() {
        assert!(is_host_pattern("*.squareup.com"));
        assert!(is_host_pattern("api.stripe.com"));
        assert!(!is_host_pattern("*."));
        assert!(!is_host_pattern("a..b"));
        assert!(!is_host_pattern("http://x"));
        assert_eq!(
            parse_mac("aa:BB:cc:00:11:22"),
            Some([0xaa, 0xbb, 0xcc, 0, 0x11, 0x22])
        );
        assert_eq!(parse_mac("aa:bb:cc:00:11"), None);
        assert_eq!(parse_mac("aa:bb:cc:00:11:22:33"), None);
    }

    #[test]
    fn defaults_keep_bulk_off_backup_and_metered_uplinks() {
        let c = effective_classes(&ClassesConfig::default());
        let bulk = &c[ClassName::Bulk as usize];
        assert!(!bulk.allows("cell", false, true, true));
        assert!(bulk.allows("lte", true, false, true));
        assert!(!c[ClassName::Guest as usize].allows("lte", true, false, true));
        assert!(bulk.allows("wifi", false, false, false));
        assert!(c[ClassName::Pos as usize].allows("lte", true, true, true));
        assert!(default_rules()
            .iter()
            .all(|r| r.host.iter().all(|h| is_host_pattern(h))));
    }
}
