//! Traffic classification: an IP packet plus the config's rules → a class and a flow.
//!
//! The first packet of a flow (protocol, addresses, ports, direction as seen on the LAN
//! side) is matched against the rules in order; the first match decides the flow's class
//! and the flow keeps it for its lifetime in a bounded flow table with idle expiry. A few
//! per-packet refinements follow: pure TCP control packets (SYN, ACK, FIN without data) of
//! a `bulk` flow travel as `interactive`, so downloads get their ACKs through a saturated
//! upload; large packets of an `interactive` flow (an `scp` inside SSH) travel as `bulk`.
//!
//! Host-name rules (`*.sumup.com`) match addresses learned from the DNS answers that cross
//! the box ([`Classifier::learn_dns`]); each entry expires with its TTL and the cache is
//! bounded. Device rules (MAC, DHCP host name, interface) match source prefixes that the
//! driver resolves and keeps current ([`Classifier::set_resolved`]).
//!
//! The hub has no rules of the edge: it mirrors the class the edge gave each upload flow
//! ([`Classifier::mirror`]) so downloads of that flow get the same class.
//!
//! Malformed or truncated packets are an error (counted by the caller), never a panic.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etherparse::{IpHeadersSlice, IpSlice, TcpSlice, UdpSlice};
use ipnet::IpNet;

use super::Class;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

/// What the classifier reads from a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    /// Ports for TCP and UDP (not for later fragments); 0 otherwise.
    pub sport: u16,
    pub dport: u16,
    pub dscp: u8,
    /// TCP flags (SYN, ACK, FIN, RST) when TCP.
    pub tcp: Option<TcpFlags>,
    /// Transport payload length (IP payload length when not TCP/UDP).
    pub payload_len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

/// Why a packet could not be classified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed packet: {0}")]
pub struct Malformed(String);

impl Malformed {
    pub(crate) fn new(why: impl Into<String>) -> Self {
        Self(why.into())
    }
}

/// Parses the headers the rules look at.
pub fn facts(packet: &[u8]) -> Result<Facts, Malformed> {
    let ip = IpSlice::from_slice(packet).map_err(|e| Malformed(e.to_string()))?;
    let dscp = match ip.header() {
        IpHeadersSlice::Ipv4(h, _) => h.dcp().value(),
        IpHeadersSlice::Ipv6(h, _) => h.dscp().value(),
    };
    let p = ip.payload();
    let proto = p.ip_number.0;
    let mut f = Facts {
        src: ip.source_addr(),
        dst: ip.destination_addr(),
        proto,
        sport: 0,
        dport: 0,
        dscp,
        tcp: None,
        payload_len: p.payload.len(),
    };
    if p.fragmented {
        return Ok(f);
    }
    match proto {
        TCP => {
            let t = TcpSlice::from_slice(p.payload).map_err(|e| Malformed(e.to_string()))?;
            f.sport = t.source_port();
            f.dport = t.destination_port();
            f.payload_len = t.payload().len();
            f.tcp = Some(TcpFlags {
                syn: t.syn(),
                ack: t.ack(),
                fin: t.fin(),
                rst: t.rst(),
            });
        }
        UDP => {
            let u = UdpSlice::from_slice(p.payload).map_err(|e| Malformed(e.to_string()))?;
            f.sport = u.source_port();
            f.dport = u.destination_port();
            f.payload_len = u.payload().len();
        }
        _ => {}
    }
    Ok(f)
}

/// A flow as its first packet saw it (source = the side that sent that packet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
}

impl FlowKey {
    pub fn of(f: &Facts) -> Self {
        Self {
            proto: f.proto,
            src: f.src,
            dst: f.dst,
            sport: f.sport,
            dport: f.dport,
        }
    }
    pub fn reversed(self) -> Self {
        Self {
            proto: self.proto,
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
        }
    }
    fn hash64(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }
}

impl std::fmt::Display for FlowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = match self.proto {
            TCP => "tcp".to_string(),
            UDP => "udp".to_string(),
            1 => "icmp".to_string(),
            58 => "icmpv6".to_string(),
            n => format!("ip{n}"),
        };
        let ep = |a: IpAddr, p: u16| match (a, self.proto) {
            (IpAddr::V6(a), TCP | UDP) => format!("[{a}]:{p}"),
            (a, TCP | UDP) => format!("{a}:{p}"),
            (a, _) => a.to_string(),
        };
        write!(
            f,
            "{proto} {} -> {}",
            ep(self.src, self.sport),
            ep(self.dst, self.dport)
        )
    }
}

/// A host pattern: `api.stripe.com` exactly, or `*.sumup.com` for the domain and below.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    domain: String,
    subdomains: bool,
}

impl HostPattern {
    pub fn new(p: &str) -> Self {
        let p = p.trim_end_matches('.').to_ascii_lowercase();
        match p.strip_prefix("*.") {
            Some(d) => Self {
                domain: d.to_string(),
                subdomains: true,
            },
            None => Self {
                domain: p,
                subdomains: false,
            },
        }
    }
    /// `name` is lower case without a trailing dot.
    pub fn matches(&self, name: &str) -> bool {
        if name == self.domain {
            return true;
        }
        self.subdomains
            && name.len() > self.domain.len()
            && name.ends_with(&self.domain)
            && name.as_bytes()[name.len() - self.domain.len() - 1] == b'.'
    }
}

/// An inclusive port range (`443..=443`, `8000..=8999`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange(pub u16, pub u16);

impl PortRange {
    pub fn contains(self, p: u16) -> bool {
        self.0 <= p && p <= self.1
    }
}

/// One classification rule in the core's own terms (the daemon builds these from its
/// config): every field given must match; within a field, any value may. The first rule
/// a flow's first packet matches decides the flow's class.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    pub class: Class,
    /// LAN devices by MAC address, DHCP host name or interface: resolved by the driver
    /// into source prefixes ([`Classifier::set_resolved`]).
    pub macs: Vec<[u8; 6]>,
    pub hostnames: Vec<String>,
    pub interfaces: Vec<String>,
    pub src: Vec<IpNet>,
    pub dst: Vec<IpNet>,
    /// Destination host names learned from DNS: `api.stripe.com` or `*.sumup.com`.
    pub hosts: Vec<String>,
    /// IP protocol numbers.
    pub proto: Vec<u8>,
    pub src_port: Vec<PortRange>,
    pub dst_port: Vec<PortRange>,
    /// DSCP code points.
    pub dscp: Vec<u8>,
}

/// A rule ready to match.
#[derive(Debug, Clone)]
pub struct CompiledRule {
    pub class: Class,
    src: Vec<IpNet>,
    dst: Vec<IpNet>,
    hosts: Vec<HostPattern>,
    proto: Vec<u8>,
    sport: Vec<PortRange>,
    dport: Vec<PortRange>,
    dscp: Vec<u8>,
    /// For rules by MAC, DHCP host name or interface: what they name, to be resolved.
    pub devices: Option<DeviceRef>,
    /// The source prefixes those devices have now (empty until resolved).
    resolved: Vec<IpNet>,
}

/// The LAN devices a rule names, for the driver to resolve into addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceRef {
    pub macs: Vec<[u8; 6]>,
    pub hostnames: Vec<String>,
    pub interfaces: Vec<String>,
}

impl CompiledRule {
    pub fn new(r: &Rule) -> Self {
        let devices = (!r.macs.is_empty() || !r.hostnames.is_empty() || !r.interfaces.is_empty())
            .then(|| DeviceRef {
                macs: r.macs.clone(),
                hostnames: r.hostnames.iter().map(|h| h.to_ascii_lowercase()).collect(),
                interfaces: r.interfaces.clone(),
            });
        Self {
            class: r.class,
            src: r.src.clone(),
            dst: r.dst.clone(),
            hosts: r.hosts.iter().map(|h| HostPattern::new(h)).collect(),
            proto: r.proto.clone(),
            sport: r.src_port.clone(),
            dport: r.dst_port.clone(),
            dscp: r.dscp.clone(),
            devices,
            resolved: Vec::new(),
        }
    }

    fn matches(&self, f: &Facts, names: &[Arc<str>]) -> bool {
        let ports = |ranges: &[PortRange], p: u16| {
            ranges.is_empty()
                || (matches!(f.proto, TCP | UDP) && ranges.iter().any(|r| r.contains(p)))
        };
        (self.src.is_empty() || self.src.iter().any(|n| n.contains(&f.src)))
            && (self.devices.is_none() || self.resolved.iter().any(|n| n.contains(&f.src)))
            && (self.dst.is_empty() || self.dst.iter().any(|n| n.contains(&f.dst)))
            && (self.proto.is_empty() || self.proto.contains(&f.proto))
            && ports(&self.sport, f.sport)
            && ports(&self.dport, f.dport)
            && (self.dscp.is_empty() || self.dscp.contains(&f.dscp))
            && (self.hosts.is_empty()
                || names
                    .iter()
                    .any(|n| self.hosts.iter().any(|h| h.matches(n))))
    }
}

/// Bounds and timeouts of the classifier's tables.
#[derive(Debug, Clone)]
pub struct ClassifyConfig {
    pub max_flows: usize,
    pub tcp_idle: Duration,
    pub other_idle: Duration,
    pub max_dns_addrs: usize,
    /// Larger packets of an `interactive` flow travel as `bulk`.
    pub interactive_max_payload: usize,
}

impl Default for ClassifyConfig {
    fn default() -> Self {
        Self {
            max_flows: 16_384,
            tcp_idle: Duration::from_secs(300),
            other_idle: Duration::from_secs(60),
            max_dns_addrs: 4096,
            interactive_max_payload: 512,
        }
    }
}

#[derive(Debug, Clone)]
pub struct FlowEntry {
    pub id: u64,
    pub class: Class,
    pub first: Instant,
    pub last: Instant,
    pub packets: u64,
    pub bytes: u64,
}

/// The class a packet travels in, and its flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub class: Class,
    /// The flow's class (a packet may travel in another, see the module doc).
    pub flow_class: Class,
    pub flow: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ClassifyStats {
    pub flows: u64,
    pub flows_expired: u64,
    /// Flows classified without a table entry because the table was full.
    pub flow_table_full: u64,
    pub dns_answers: u64,
    pub dns_addresses: u64,
    pub dns_malformed: u64,
}

#[derive(Debug, Clone)]
struct DnsName {
    name: Arc<str>,
    expires: Instant,
}

/// The classifier: rules, the flow table and the DNS-learned host names.
#[derive(Debug)]
pub struct Classifier {
    cfg: ClassifyConfig,
    rules: Vec<CompiledRule>,
    flows: HashMap<FlowKey, FlowEntry>,
    dns: HashMap<IpAddr, Vec<DnsName>>,
    next_id: u64,
    stats: ClassifyStats,
    /// When a full flow table was last swept: at most once per [`FULL_SWEEP_EVERY`], so
    /// a flood of new flows costs a hash lookup per packet, not a walk of the table.
    full_swept: Option<Instant>,
}

/// How often a full flow table is swept for idle flows.
const FULL_SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Most names remembered per address (CDNs put many names on one address).
const NAMES_PER_ADDR: usize = 8;

impl Classifier {
    pub fn new(rules: &[Rule], cfg: ClassifyConfig) -> Self {
        Self {
            cfg,
            rules: rules.iter().map(CompiledRule::new).collect(),
            flows: HashMap::new(),
            dns: HashMap::new(),
            next_id: 1,
            stats: ClassifyStats::default(),
            full_swept: None,
        }
    }

    pub fn stats(&self) -> ClassifyStats {
        let mut s = self.stats;
        s.dns_addresses = self.dns.len() as u64;
        s
    }

    pub fn rules(&self) -> &[CompiledRule] {
        &self.rules
    }

    /// Replaces the rules (a config reload): flows already classified keep their class;
    /// new flows meet the new rules.
    /// A rule naming the same devices as an old one keeps the addresses the driver
    /// resolved for it, so device rules hold across a reload.
    pub fn set_rules(&mut self, rules: &[Rule]) {
        let old = std::mem::take(&mut self.rules);
        self.rules = rules
            .iter()
            .map(|r| {
                let mut new = CompiledRule::new(r);
                if let Some(o) = old
                    .iter()
                    .find(|o| o.devices.is_some() && o.devices == new.devices)
                {
                    new.resolved = o.resolved.clone();
                }
                new
            })
            .collect();
    }

    /// The driver's current addresses for `devices`, named by rule `index` (ignored when
    /// that rule names other devices: the rules changed meanwhile).
    pub fn set_resolved(&mut self, index: usize, devices: &DeviceRef, prefixes: Vec<IpNet>) {
        if let Some(r) = self.rules.get_mut(index) {
            if r.devices.as_ref() == Some(devices) {
                r.resolved = prefixes;
            }
        }
    }

    /// Classifies a packet leaving the LAN (edge) or arriving for it (hub).
    pub fn classify(&mut self, packet: &[u8], now: Instant) -> Result<Verdict, Malformed> {
        let f = facts(packet)?;
        Ok(self.classify_facts(&f, packet.len(), now))
    }

    /// Hub side: [`Self::classify`] a packet going down to the LAN, learning host names
    /// first if it is a DNS answer (the headers are parsed once).
    pub fn classify_and_learn(
        &mut self,
        packet: &[u8],
        now: Instant,
    ) -> Result<Verdict, Malformed> {
        let f = facts(packet)?;
        if f.proto == UDP && f.sport == 53 {
            self.learn_dns_answer(packet, now);
        }
        Ok(self.classify_facts(&f, packet.len(), now))
    }

    fn classify_facts(&mut self, f: &Facts, len: usize, now: Instant) -> Verdict {
        let key = FlowKey::of(f);
        let len = len as u64;
        // A flow is known in the direction it started in, or mirrored from the other side.
        let known = if self.flows.contains_key(&key) {
            Some(key)
        } else {
            let r = key.reversed();
            self.flows.contains_key(&r).then_some(r)
        };
        let (flow_class, flow) = match known.and_then(|k| self.flows.get_mut(&k)) {
            Some(e) => {
                e.last = now;
                e.packets += 1;
                e.bytes += len;
                (e.class, e.id)
            }
            None => {
                let class = self.match_rules(f, now);
                let id = self.insert(key, class, now, len);
                (class, id)
            }
        };
        Verdict {
            class: self.refine(flow_class, f),
            flow_class,
            flow,
        }
    }

    /// Hub side: the edge sent this upload packet as `class`; downloads of its flow follow.
    pub fn mirror(&mut self, packet: &[u8], class: Class, now: Instant) {
        let Ok(f) = facts(packet) else {
            return;
        };
        // Refinements (pure ACKs as interactive) are per packet, not the flow's class.
        if class == Class::Interactive && self.refine(Class::Bulk, &f) == Class::Interactive {
            return;
        }
        if class == Class::Bulk && f.payload_len > self.cfg.interactive_max_payload {
            // May be a large packet of an interactive flow; do not demote the flow.
            if self
                .flows
                .get(&FlowKey::of(&f))
                .is_some_and(|e| e.class == Class::Interactive)
            {
                return;
            }
        }
        let key = FlowKey::of(&f);
        match self.flows.get_mut(&key) {
            Some(e) => {
                e.class = class;
                e.last = now;
            }
            None => {
                self.insert(key, class, now, 0);
            }
        }
    }

    fn insert(&mut self, key: FlowKey, class: Class, now: Instant, len: u64) -> u64 {
        if self.flows.len() >= self.cfg.max_flows
            && self
                .full_swept
                .is_none_or(|t| now.saturating_duration_since(t) >= FULL_SWEEP_EVERY)
        {
            self.full_swept = Some(now);
            self.sweep(now);
        }
        if self.flows.len() >= self.cfg.max_flows {
            self.stats.flow_table_full += 1;
            return key.hash64() | 1 << 63;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.stats.flows += 1;
        self.flows.insert(
            key,
            FlowEntry {
                id,
                class,
                first: now,
                last: now,
                packets: u64::from(len > 0),
                bytes: len,
            },
        );
        id
    }

    fn match_rules(&self, f: &Facts, now: Instant) -> Class {
        let names: Vec<Arc<str>> = self
            .dns
            .get(&f.dst)
            .map(|v| {
                v.iter()
                    .filter(|n| n.expires > now)
                    .map(|n| n.name.clone())
                    .collect()
            })
            .unwrap_or_default();
        self.rules
            .iter()
            .find(|r| r.matches(f, &names))
            .map_or(Class::Bulk, |r| r.class)
    }

    fn refine(&self, class: Class, f: &Facts) -> Class {
        match class {
            Class::Bulk if f.tcp.is_some() && f.payload_len == 0 => Class::Interactive,
            Class::Interactive if f.payload_len > self.cfg.interactive_max_payload => Class::Bulk,
            c => c,
        }
    }

    /// Expires idle flows and DNS entries.
    pub fn sweep(&mut self, now: Instant) {
        let (tcp_idle, other_idle) = (self.cfg.tcp_idle, self.cfg.other_idle);
        let before = self.flows.len();
        self.flows.retain(|k, e| {
            let idle = if k.proto == TCP { tcp_idle } else { other_idle };
            now.saturating_duration_since(e.last) < idle
        });
        self.stats.flows_expired += (before - self.flows.len()) as u64;
        self.dns.retain(|_, v| {
            v.retain(|n| n.expires > now);
            !v.is_empty()
        });
    }

    /// Edge side: a packet that came down the tunnel for the LAN. Counts it to its flow
    /// (so the busiest flows include downloads) and learns host names from DNS answers.
    pub fn observe_download(&mut self, packet: &[u8], now: Instant) {
        let Ok(f) = facts(packet) else {
            return;
        };
        if let Some(e) = self.flows.get_mut(&FlowKey::of(&f).reversed()) {
            e.last = now;
            e.packets += 1;
            e.bytes += packet.len() as u64;
        }
        if f.proto == UDP && f.sport == 53 {
            self.learn_dns_answer(packet, now);
        }
    }

    /// Learns host names from a DNS answer (UDP from port 53) headed for the LAN. Anything
    /// else is ignored; a malformed answer is counted.
    pub fn learn_dns(&mut self, packet: &[u8], now: Instant) {
        if facts(packet).is_ok_and(|f| f.proto == UDP && f.sport == 53) {
            self.learn_dns_answer(packet, now);
        }
    }

    /// [`Self::learn_dns`] for a packet already known to be UDP from port 53.
    fn learn_dns_answer(&mut self, packet: &[u8], now: Instant) {
        let Ok(ip) = IpSlice::from_slice(packet) else {
            return;
        };
        let Ok(udp) = UdpSlice::from_slice(ip.payload().payload) else {
            return;
        };
        let Ok(msg) = simple_dns::Packet::parse(udp.payload()) else {
            self.stats.dns_malformed += 1;
            return;
        };
        if !msg.has_flags(simple_dns::PacketFlag::RESPONSE) {
            return;
        }
        self.stats.dns_answers += 1;
        let questions: Vec<String> = msg
            .questions
            .iter()
            .map(|q| normalize(&q.qname.to_string()))
            .collect();
        for rr in &msg.answers {
            let addr = match &rr.rdata {
                simple_dns::rdata::RData::A(a) => IpAddr::from(a.address.to_be_bytes()),
                simple_dns::rdata::RData::AAAA(a) => IpAddr::from(a.address.to_be_bytes()),
                _ => continue,
            };
            let ttl = Duration::from_secs(u64::from(rr.ttl.max(1)));
            let owner = normalize(&rr.name.to_string());
            for name in questions.iter().chain(std::iter::once(&owner)) {
                self.remember(addr, name, now + ttl, now);
            }
        }
    }

    fn remember(&mut self, addr: IpAddr, name: &str, expires: Instant, now: Instant) {
        if !self.dns.contains_key(&addr) && self.dns.len() >= self.cfg.max_dns_addrs {
            self.dns.retain(|_, v| {
                v.retain(|n| n.expires > now);
                !v.is_empty()
            });
            if self.dns.len() >= self.cfg.max_dns_addrs {
                // Still full: forget the address whose names expire first.
                let victim = self
                    .dns
                    .iter()
                    .min_by_key(|(_, v)| v.iter().map(|n| n.expires).max())
                    .map(|(a, _)| *a);
                if let Some(v) = victim {
                    self.dns.remove(&v);
                }
            }
        }
        let names = self.dns.entry(addr).or_default();
        if let Some(n) = names.iter_mut().find(|n| &*n.name == name) {
            n.expires = n.expires.max(expires);
            return;
        }
        if names.len() >= NAMES_PER_ADDR {
            names.sort_by_key(|n| n.expires);
            names.remove(0);
        }
        names.push(DnsName {
            name: Arc::from(name),
            expires,
        });
    }

    /// Host names currently known for `addr`.
    pub fn names_of(&self, addr: IpAddr, now: Instant) -> Vec<String> {
        self.dns
            .get(&addr)
            .map(|v| {
                v.iter()
                    .filter(|n| n.expires > now)
                    .map(|n| n.name.to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The busiest flows by bytes, with their key.
    pub fn top_flows(&self, n: usize) -> Vec<(FlowKey, FlowEntry)> {
        let mut v: Vec<(FlowKey, FlowEntry)> =
            self.flows.iter().map(|(k, e)| (*k, e.clone())).collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1.bytes));
        v.truncate(n);
        v
    }

    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;
    use proptest::prelude::*;

    fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, syn: bool, data: &[u8]) -> Vec<u8> {
        let mut b = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, 1, 1000);
        if syn {
            b = b.syn();
        } else {
            b = b.ack(1);
        }
        let mut out = Vec::new();
        b.write(&mut out, data).expect("build");
        out
    }

    fn udp6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv6(src, dst, 64)
            .udp(sport, dport)
            .write(&mut out, data)
            .expect("build");
        out
    }

    fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4(src, dst, 64)
            .udp(sport, dport)
            .write(&mut out, data)
            .expect("build");
        out
    }

    fn rule(class: Class) -> Rule {
        Rule {
            class,
            ..Default::default()
        }
    }

    /// A rule set like the shipped defaults (payment hosts, stream ports, DNS and SSH)
    /// without depending on the config crate.
    fn default_rules() -> Vec<Rule> {
        vec![
            Rule {
                hosts: ["*.sumup.com", "api.stripe.com", "*.stripe.com"]
                    .map(String::from)
                    .to_vec(),
                ..rule(Class::Pos)
            },
            Rule {
                proto: vec![TCP],
                dst_port: vec![PortRange(1935, 1935)],
                ..rule(Class::Stream)
            },
            Rule {
                proto: vec![UDP],
                dst_port: vec![PortRange(53, 53), PortRange(123, 123)],
                ..rule(Class::Interactive)
            },
            Rule {
                dscp: vec![46],
                ..rule(Class::Interactive)
            },
        ]
    }

    fn dns_answer(name: &str, addr: [u8; 4], ttl: u32) -> Vec<u8> {
        use simple_dns::rdata::{RData, A};
        use simple_dns::{
            Name, Packet, PacketFlag, Question, ResourceRecord, CLASS, QCLASS, QTYPE, TYPE,
        };
        let mut p = Packet::new_reply(7);
        p.set_flags(PacketFlag::RECURSION_AVAILABLE);
        let qn = Name::new_unchecked(name);
        p.questions.push(Question::new(
            qn.clone(),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        let cdn = Name::new_unchecked("edge.cdn.example");
        p.answers.push(ResourceRecord::new(
            qn,
            CLASS::IN,
            ttl,
            RData::CNAME(simple_dns::rdata::CNAME(cdn.clone())),
        ));
        p.answers.push(ResourceRecord::new(
            cdn,
            CLASS::IN,
            ttl,
            RData::A(A {
                address: u32::from_be_bytes(addr),
            }),
        ));
        let payload = p.build_bytes_vec().expect("dns");
        udp4([10, 0, 0, 53], [10, 1, 0, 7], 53, 40000, &payload)
    }

    const LAN: [u8; 4] = [10, 1, 0, 7];
    const NET: [u8; 4] = [198, 51, 100, 9];

    #[test]
    fn every_rule_kind_matches_and_the_first_match_wins() {
        let t = Instant::now();
        let rules = vec![
            Rule {
                dscp: vec![46],
                ..rule(Class::Stream)
            },
            Rule {
                src: vec!["10.1.0.99/32".parse().expect("net")],
                ..rule(Class::Pos)
            },
            Rule {
                dst: vec!["203.0.113.0/24".parse().expect("net")],
                proto: vec![TCP],
                ..rule(Class::Guest)
            },
            Rule {
                dst_port: vec![PortRange(8000, 8999)],
                ..rule(Class::Stream)
            },
            Rule {
                src_port: vec![PortRange(5000, 5000)],
                ..rule(Class::Interactive)
            },
            Rule {
                macs: vec![[0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]],
                ..rule(Class::Guest)
            },
        ];
        let mut c = Classifier::new(&rules, ClassifyConfig::default());
        let class = |c: &mut Classifier, p: &[u8]| c.classify(p, t).expect("ok").flow_class;
        let data = [1u8; 100];
        assert_eq!(
            class(&mut c, &tcp4([10, 1, 0, 99], NET, 1, 443, false, &data)),
            Class::Pos
        );
        assert_eq!(
            class(&mut c, &tcp4(LAN, [203, 0, 113, 5], 2, 80, false, &data)),
            Class::Guest
        );
        // Same destination over UDP: the protocol does not match.
        assert_eq!(
            class(&mut c, &udp4(LAN, [203, 0, 113, 5], 2, 80, &data)),
            Class::Bulk
        );
        assert_eq!(
            class(&mut c, &udp4(LAN, NET, 3, 8500, &data)),
            Class::Stream
        );
        assert_eq!(
            class(&mut c, &udp4(LAN, NET, 5000, 9, &data)),
            Class::Interactive
        );
        // DSCP EF (46) comes first and wins over the POS source rule.
        let mut ef = tcp4([10, 1, 0, 99], NET, 4, 443, false, &data);
        ef[1] = 46 << 2;
        let sum = etherparse::Ipv4HeaderSlice::from_slice(&ef)
            .expect("hdr")
            .to_header()
            .calc_header_checksum();
        ef[10..12].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(class(&mut c, &ef), Class::Stream);
        // A MAC rule matches nothing until the driver resolves it, then its addresses.
        let dev = udp4([10, 1, 0, 50], NET, 7, 7, &data);
        assert_eq!(class(&mut c, &dev), Class::Bulk);
        let dev5 = c.rules()[5].devices.clone().expect("rule 5 names devices");
        c.set_resolved(5, &dev5, vec!["10.1.0.51/32".parse().expect("net")]);
        assert_eq!(
            class(&mut c, &udp4([10, 1, 0, 51], NET, 7, 7, &data)),
            Class::Guest
        );
        // A reload keeps what was resolved for a rule naming the same devices (now at
        // another index); an answer for the old index and other devices is ignored.
        let mut fresh = rules.clone();
        let moved = fresh.remove(5);
        fresh.insert(0, moved);
        c.set_rules(&fresh);
        assert_eq!(
            class(&mut c, &udp4([10, 1, 0, 52], NET, 9, 7, &data)),
            Class::Bulk
        );
        c.set_resolved(5, &dev5, vec!["10.1.0.52/32".parse().expect("net")]);
        assert_eq!(
            class(&mut c, &udp4([10, 1, 0, 51], NET, 8, 7, &data)),
            Class::Guest,
            "kept across the reload"
        );
        assert_eq!(
            class(&mut c, &udp4([10, 1, 0, 52], NET, 10, 7, &data)),
            Class::Bulk,
            "a stale answer changes nothing"
        );
    }

    #[test]
    fn ipv6_flows_are_classified() {
        let t = Instant::now();
        let rules = vec![Rule {
            dst: vec!["2001:db8::/32".parse().expect("net")],
            proto: vec![UDP],
            dst_port: vec![PortRange(443, 443)],
            ..rule(Class::Pos)
        }];
        let mut c = Classifier::new(&rules, ClassifyConfig::default());
        let mut a = [0u8; 16];
        a[0] = 0xfd;
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        let v = c.classify(&udp6(a, b, 5555, 443, &[0; 40]), t).expect("ok");
        assert_eq!(v.class, Class::Pos);
        let v = c.classify(&udp6(a, b, 5555, 444, &[0; 40]), t).expect("ok");
        assert_eq!(v.class, Class::Bulk);
    }

    #[test]
    fn pure_acks_of_bulk_travel_as_interactive_and_big_interactive_packets_as_bulk() {
        let t = Instant::now();
        let rules = vec![Rule {
            dst_port: vec![PortRange(22, 22)],
            ..rule(Class::Interactive)
        }];
        let mut c = Classifier::new(&rules, ClassifyConfig::default());
        let syn = c
            .classify(&tcp4(LAN, NET, 40000, 443, true, &[]), t)
            .expect("ok");
        assert_eq!(
            (syn.class, syn.flow_class),
            (Class::Interactive, Class::Bulk)
        );
        let data = c
            .classify(&tcp4(LAN, NET, 40000, 443, false, &[0; 1000]), t)
            .expect("ok");
        assert_eq!((data.class, data.flow), (Class::Bulk, syn.flow));
        let ssh = c
            .classify(&tcp4(LAN, NET, 40001, 22, false, &[0; 48]), t)
            .expect("ok");
        assert_eq!(ssh.class, Class::Interactive);
        let scp = c
            .classify(&tcp4(LAN, NET, 40001, 22, false, &[0; 1200]), t)
            .expect("ok");
        assert_eq!(
            (scp.class, scp.flow_class),
            (Class::Bulk, Class::Interactive)
        );
    }

    #[test]
    fn a_flow_keeps_its_class_until_it_idles_out() {
        let t = Instant::now();
        let rules = vec![Rule {
            src: vec!["10.1.0.7/32".parse().expect("net")],
            ..rule(Class::Pos)
        }];
        let mut c = Classifier::new(&rules, ClassifyConfig::default());
        let up = udp4(LAN, NET, 1000, 2000, &[0; 10]);
        let down = udp4(NET, LAN, 2000, 1000, &[0; 10]);
        let v = c.classify(&up, t).expect("ok");
        // The answer belongs to the same flow (and class), even though no rule matches it.
        assert_eq!(c.classify(&down, t).expect("ok"), v);
        c.sweep(t + Duration::from_secs(59));
        assert_eq!(c.flow_count(), 1);
        c.sweep(t + Duration::from_secs(61));
        assert_eq!(c.flow_count(), 0);
        assert_eq!(c.stats().flows_expired, 1);
    }

    #[test]
    fn host_rules_match_names_learned_from_dns_until_the_ttl_runs_out() {
        let t = Instant::now();
        let mut c = Classifier::new(&default_rules(), ClassifyConfig::default());
        let pay = |port| tcp4(LAN, [203, 0, 113, 80], port, 443, true, &[]);
        // Before any DNS answer: nothing is known about the address.
        assert_eq!(c.classify(&pay(1), t).expect("ok").flow_class, Class::Bulk);
        c.learn_dns(&dns_answer("api.sumup.com", [203, 0, 113, 80], 30), t);
        assert_eq!(c.stats().dns_answers, 1);
        assert_eq!(c.names_of(IpAddr::from([203, 0, 113, 80]), t).len(), 2);
        assert_eq!(c.classify(&pay(2), t).expect("ok").flow_class, Class::Pos);
        // After the TTL, a new flow to that address is no longer known as a payment host.
        let later = t + Duration::from_secs(31);
        assert_eq!(
            c.classify(&pay(3), later).expect("ok").flow_class,
            Class::Bulk
        );
        // The flow that started while the name was valid keeps its class.
        assert_eq!(
            c.classify(&pay(2), later).expect("ok").flow_class,
            Class::Pos
        );
        // Names that merely end like a pattern do not match.
        c.learn_dns(&dns_answer("notsumup.com", [203, 0, 113, 81], 30), t);
        let other = tcp4(LAN, [203, 0, 113, 81], 4, 443, true, &[]);
        assert_eq!(c.classify(&other, t).expect("ok").flow_class, Class::Bulk);
    }

    #[test]
    fn the_dns_cache_and_the_flow_table_are_bounded() {
        let t = Instant::now();
        let mut c = Classifier::new(
            &default_rules(),
            ClassifyConfig {
                max_flows: 10,
                max_dns_addrs: 5,
                ..Default::default()
            },
        );
        for i in 0..20u8 {
            c.learn_dns(
                &dns_answer("x.example", [192, 0, 2, i], 300 + u32::from(i)),
                t,
            );
            c.classify(&udp4(LAN, NET, 1000 + u16::from(i), 9, &[0; 8]), t)
                .expect("ok");
        }
        assert!(c.stats().dns_addresses <= 5);
        assert_eq!(c.flow_count(), 10);
        assert_eq!(c.stats().flow_table_full, 10);
        // The newest answers were kept.
        assert!(!c.names_of(IpAddr::from([192, 0, 2, 19]), t).is_empty());
        // A full table is swept at most once a second, however many new flows arrive:
        // idle flows make room then, not on every packet.
        let later = t + Duration::from_secs(600);
        c.classify(&udp4(LAN, NET, 3000, 9, &[0; 8]), later)
            .expect("ok");
        assert_eq!(c.flow_count(), 1, "the idle flows were swept");
    }

    #[test]
    fn downloads_count_to_their_flow_on_the_edge() {
        let t = Instant::now();
        let mut c = Classifier::new(&default_rules(), ClassifyConfig::default());
        c.classify(&tcp4(LAN, NET, 40000, 443, true, &[]), t)
            .expect("ok");
        let down = tcp4(NET, LAN, 443, 40000, false, &[0; 1000]);
        for _ in 0..10 {
            c.observe_download(&down, t);
        }
        let top = c.top_flows(1);
        assert_eq!(top[0].1.packets, 11);
        assert!(top[0].1.bytes > 10_000);
        c.observe_download(&dns_answer("api.stripe.com", [203, 0, 113, 7], 60), t);
        assert_eq!(c.stats().dns_answers, 1);
    }

    #[test]
    fn the_hub_mirrors_the_class_the_edge_gave_a_flow() {
        let t = Instant::now();
        let mut hub = Classifier::new(&[], ClassifyConfig::default());
        let up = tcp4(LAN, NET, 40000, 443, false, &[0; 300]);
        hub.mirror(&up, Class::Pos, t);
        // A pure ACK sent as interactive does not reclassify the flow.
        hub.mirror(
            &tcp4(LAN, NET, 40000, 443, false, &[]),
            Class::Interactive,
            t,
        );
        let down = tcp4(NET, LAN, 443, 40000, false, &[0; 1200]);
        assert_eq!(hub.classify(&down, t).expect("ok").class, Class::Pos);
    }

    #[test]
    fn malformed_and_truncated_packets_are_errors() {
        let t = Instant::now();
        let mut c = Classifier::new(&default_rules(), ClassifyConfig::default());
        let good = tcp4(LAN, NET, 1, 2, false, &[0; 20]);
        for cut in 0..good.len() {
            assert!(c.classify(&good[..cut], t).is_err(), "cut at {cut}");
        }
        assert!(c.classify(&[0x45; 60], t).is_err());
        assert!(c.classify(&[], t).is_err());
        // learn_dns never panics on junk either.
        c.learn_dns(&udp4([10, 0, 0, 53], LAN, 53, 1, &[0xff; 30]), t);
        assert_eq!(c.stats().dns_malformed, 1);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let t = Instant::now();
            let mut c = Classifier::new(&default_rules(), ClassifyConfig::default());
            let _ = c.classify(&data, t);
            c.learn_dns(&data, t);
            c.mirror(&data, Class::Pos, t);
        }

        #[test]
        fn a_dns_payload_of_arbitrary_bytes_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let t = Instant::now();
            let mut c = Classifier::new(&default_rules(), ClassifyConfig::default());
            c.learn_dns(&udp4([10, 0, 0, 53], LAN, 53, 1, &data), t);
        }

        #[test]
        fn port_rules_match_exactly_their_range(lo in 1u16..60000, len in 0u16..1000, port in 1u16..65535) {
            let t = Instant::now();
            let hi = lo.saturating_add(len);
            let rules = vec![Rule { dst_port: vec![PortRange(lo, hi)], ..rule(Class::Stream) }];
            let mut c = Classifier::new(&rules, ClassifyConfig::default());
            let v = c.classify(&udp4(LAN, NET, 1, port, &[0; 4]), t).expect("ok");
            prop_assert_eq!(v.class == Class::Stream, (lo..=hi).contains(&port));
        }
    }
}
