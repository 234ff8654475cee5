//! The typed configuration. Every struct refuses unknown fields so that a typo is an error,
//! not a silently ignored setting.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_spanned::Spanned;

use crate::classes::{ClassesConfig, Rate, Rule};

/// Which half of the bond this box is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The stall's router: LAN on one side, uplinks on the other.
    Edge,
    /// The concentrator on a cloud VM.
    Hub,
}

/// The whole file.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Which half of the bond this box is: `edge` or `hub`.
    pub role: Role,
    /// The box's name (letters, digits, '-'), shown on the dashboard and used as its host
    /// name; absent: derived from the device identity.
    pub device: Option<String>,
    /// Where keys, certificates and persistent state live.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Where the control socket lives.
    #[serde(default = "default_runtime_dir")]
    pub runtime_dir: PathBuf,
    /// The stall's box: hubs, LAN prefixes, uplinks, classes and rules (`role = "edge"`).
    #[schemars(with = "Option<EdgeConfig>")]
    pub edge: Option<Spanned<EdgeConfig>>,
    /// The concentrator on a cloud VM: listen address, tunnel pool, devices (`role = "hub"`).
    #[schemars(with = "Option<HubConfig>")]
    pub hub: Option<Spanned<HubConfig>>,
    /// The local commerce service (tokens, carts, receipts, outbox) on the edge.
    #[schemars(with = "Option<CommerceConfig>")]
    pub commerce: Option<Spanned<CommerceConfig>>,
    /// Prometheus metrics (both roles).
    pub metrics: Option<MetricsConfig>,
    /// The stall's LAN (edge): interface or bridge, address, DHCP, DNS, VLANs. Without
    /// it the LAN interface is set up by the system.
    #[schemars(with = "Option<crate::lan::LanConfig>")]
    pub lan: Option<Spanned<crate::lan::LanConfig>>,
}

/// `[metrics]`: where Prometheus scrapes `GET /metrics`.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address and port, e.g. `"10.1.0.1:9108"` (the LAN) or `"127.0.0.1:9108"`.
    pub listen: SocketAddr,
}

/// `[commerce]`: the LAN API for the shop's apps and the outbox's upstream.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommerceConfig {
    /// Address the API listens on: the edge's LAN address and a port.
    pub listen: SocketAddr,
    /// Source prefixes refused whatever key they show (the guest network).
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub deny_from: Vec<IpNet>,
    /// POS clients and their keys (only the SHA-256 of each key, hex).
    #[schemars(with = "Vec<CommerceClient>")]
    pub clients: Vec<Spanned<CommerceClient>>,
    /// Where outbox records are delivered; without it they wait on the box.
    #[schemars(with = "Option<Upstream>")]
    pub upstream: Option<Spanned<Upstream>>,
    /// Request size and per-client storage limits.
    #[serde(default)]
    pub limits: CommerceLimits,
    /// Ages (hours) of the oldest undelivered record that raise an alert.
    #[serde(default = "default_alert_hours")]
    pub alert_hours: Vec<u32>,
}

fn default_alert_hours() -> Vec<u32> {
    vec![12, 20]
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommerceClient {
    /// The client's name (1–64 letters, digits, '-' or '_'), shown in status and logs.
    pub name: String,
    /// Hex SHA-256 of the client's bearer key (`stallnet hash-key`).
    pub key_sha256: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// `https://…` (or `http://` for a backend on a trusted network): each record is
    /// POSTed with its `Idempotency-Key`. `nats://host:4222` (or `tls://…`, user and
    /// password in the URL if the server wants them): each record is published to a
    /// JetStream stream on `subject` with its key as `Nats-Msg-Id`.
    pub url: String,
    /// The JetStream subject for this stall's records (NATS upstreams only), e.g.
    /// `sales.market-square.stall-17`; a stream must capture it.
    pub subject: Option<String>,
    /// How long one delivery may take (connect, send, answer or acknowledgement).
    #[serde(default = "default_upstream_timeout")]
    pub timeout_ms: u64,
    /// HTTP: the `Authorization` header value (e.g. `Bearer …`). NATS: the server's token.
    pub authorization: Option<String>,
    /// PEM file of the CA that signed the upstream's certificate, for a backend on a
    /// private PKI (HTTPS or `tls://`); the public roots are trusted as well.
    pub ca_file: Option<PathBuf>,
    /// Which way deliveries leave the box: through the bonded tunnel (default: they
    /// survive an uplink dying and leave from the hub's address) or straight out of the
    /// box's own default route.
    #[serde(default)]
    pub via: UpstreamPath,
}

/// The path outbox deliveries take.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamPath {
    #[default]
    Tunnel,
    Direct,
}

impl Upstream {
    /// An upstream at `url` with the defaults (no subject, 10 s, no authorization, tunnel).
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            subject: None,
            timeout_ms: default_upstream_timeout(),
            authorization: None,
            ca_file: None,
            via: UpstreamPath::default(),
        }
    }

    /// Whether records go to NATS JetStream (rather than HTTP).
    pub fn is_nats(&self) -> bool {
        self.url.starts_with("nats://") || self.url.starts_with("tls://")
    }
}

fn default_upstream_timeout() -> u64 {
    10_000
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommerceLimits {
    /// Largest request body.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Entries (tokens + carts) one client may keep.
    #[serde(default = "default_max_entries")]
    pub max_entries_per_client: u64,
    /// Stored bytes one client may keep.
    #[serde(default = "default_max_client_bytes")]
    pub max_bytes_per_client: u64,
}

impl Default for CommerceLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: default_max_body(),
            max_entries_per_client: default_max_entries(),
            max_bytes_per_client: default_max_client_bytes(),
        }
    }
}

fn default_max_body() -> usize {
    64 * 1024
}
fn default_max_entries() -> u64 {
    200_000
}
fn default_max_client_bytes() -> u64 {
    64 * 1024 * 1024
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/stallnet")
}

fn default_runtime_dir() -> PathBuf {
    PathBuf::from("/run/stallnet")
}

/// What the edge does when no uplink reaches the hub.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// LAN traffic waits for the hub (nothing leaves untunnelled).
    #[default]
    None,
    /// LAN traffic goes straight out of the best uplink, NATed, until the hub is back.
    Direct,
}

/// How bulk traffic is spread across uplinks.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum SchedMode {
    /// Duplicate every packet on the two best usable uplinks.
    Redundant,
    /// Spread packets over all usable uplinks, weighted by capacity.
    #[default]
    Aggregate,
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// Hubs to connect to, in order of preference. Every uplink uses the same hub; the
    /// whole bond moves to the next one when its hub fails on every uplink (not when one
    /// uplink's path to it fails: that uplink is down), and stays there when the first
    /// returns. None: no tunnel yet (needs `fallback = "direct"`: the LAN goes straight
    /// out of the uplinks).
    #[serde(default)]
    pub hubs: Vec<HubEndpoint>,
    /// LAN prefixes whose traffic enters the tunnel.
    #[schemars(with = "Vec<String>")]
    pub lan: Vec<IpNet>,
    /// Name of the TUN device (1-15 letters, digits, '-', '_' or '.').
    #[serde(default = "default_edge_tun")]
    pub tun_name: String,
    /// MTU of the TUN device: the largest packet the tunnel carries. Below it the tunnel
    /// follows what its uplinks carry now (each uplink's path-MTU discovery): a larger
    /// packet is fragmented (IPv4 without "don't fragment") or answered with ICMP "too
    /// big", and TCP's MSS is clamped to fit. The default is what a 1500-byte IPv4 uplink
    /// carries inside the tunnel.
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// What LAN traffic does when no uplink reaches the hub.
    #[serde(default)]
    pub fallback: Fallback,
    /// Scheduling mode for traffic that is not POS.
    #[serde(default)]
    pub mode: SchedMode,
    /// LAN sources whose traffic is point-of-sale (a shortcut for a `pos` rule by `src`).
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub pos_sources: Vec<IpNet>,
    /// Per-class overrides of the built-in class settings.
    #[serde(default)]
    pub classes: ClassesConfig,
    /// Classification rules, tried in order before the built-in ones; first match wins.
    #[serde(default)]
    #[schemars(with = "Vec<Rule>")]
    pub rules: Vec<Spanned<Rule>>,
    /// Whether the built-in rules (payment hosts, stream and interactive ports) apply.
    #[serde(default = "yes")]
    pub default_rules: bool,
    /// dnsmasq's leases file (written by the dnsmasq the daemon runs for `[lan]`; read
    /// for rules by `hostname` and `mac`).
    #[serde(default = "default_leases")]
    pub dhcp_leases: PathBuf,
    /// First routing table number: the tunnel's table, then one per uplink from here
    /// (1-219, or 256 and above; 253-255 are the kernel's own).
    #[serde(default = "default_table_base")]
    pub table_base: u32,
    /// The uplinks (`[[edge.uplinks]]`), at least one.
    #[schemars(with = "Vec<Uplink>")]
    pub uplinks: Vec<Spanned<Uplink>>,
    /// Checks that an uplink really reaches the internet (captive portals, forged DNS,
    /// broken HTTPS), made through each uplink.
    #[serde(default)]
    pub reachability: Reachability,
}

/// `[edge.reachability]`: through each uplink, a plain-HTTP URL must answer `204` (a
/// redirect or a page means a captive portal: the uplink leaves the bond until it clears),
/// a made-up name must not resolve (an answer means forged DNS: likewise), and an HTTPS
/// URL must answer over a verified TLS session before the uplink carries point-of-sale
/// traffic (while another uplink is verified).
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Reachability {
    /// Run the checks at all.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `http://` URL that answers `204 No Content` when nothing is in the way.
    #[serde(default = "default_portal_url")]
    pub portal_url: String,
    /// `https://` URL that must answer (any HTTP status) over a verified TLS session.
    #[serde(default = "default_https_url")]
    pub https_url: String,
    /// DNS servers asked through each uplink (port 53); default: the uplink's gateway.
    #[serde(default)]
    pub dns: Vec<IpAddr>,
    /// Extra CA certificates (PEM) trusted for `https_url`, besides the public roots.
    pub ca_file: Option<PathBuf>,
    /// Seconds between portal checks on an uplink that carries traffic (1–300).
    #[serde(default = "default_reach_interval")]
    pub interval_s: u64,
    /// Seconds between HTTPS checks on a verified uplink that carries traffic (5–3600).
    #[serde(default = "default_https_interval")]
    pub https_interval_s: u64,
    /// Seconds between checks on an idle backup uplink (30–86400): it stays quiet.
    #[serde(default = "default_backup_interval")]
    pub backup_interval_s: u64,
}

impl Default for Reachability {
    fn default() -> Self {
        Self {
            enabled: true,
            portal_url: default_portal_url(),
            https_url: default_https_url(),
            dns: Vec::new(),
            ca_file: None,
            interval_s: default_reach_interval(),
            https_interval_s: default_https_interval(),
            backup_interval_s: default_backup_interval(),
        }
    }
}

fn default_portal_url() -> String {
    "http://connectivitycheck.gstatic.com/generate_204".into()
}
fn default_https_url() -> String {
    "https://www.gstatic.com/generate_204".into()
}
fn default_reach_interval() -> u64 {
    5
}
fn default_https_interval() -> u64 {
    60
}
fn default_backup_interval() -> u64 {
    300
}

fn yes() -> bool {
    true
}
fn default_leases() -> PathBuf {
    PathBuf::from("/var/lib/stallnet/dnsmasq.leases")
}

fn default_edge_tun() -> String {
    "stall0".into()
}
fn default_mtu() -> u16 {
    1424
}
fn default_table_base() -> u32 {
    200
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HubEndpoint {
    /// `host:port` of the hub's QUIC endpoint.
    pub address: SocketAddr,
    /// The hub's identity as printed by `stallnet id` on the hub (pinned).
    #[schemars(with = "String")]
    pub identity: Spanned<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum UplinkKind {
    Wifi,
    Cellular,
    Ethernet,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum UplinkPriority {
    #[default]
    Primary,
    Secondary,
    /// Carries traffic only when no other uplink is usable; sparse keep-alives otherwise.
    Backup,
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Uplink {
    /// Name (1–32 letters, digits, '-' or '_'), used by rules, the CLI and the dashboard.
    pub name: String,
    /// Kernel interface name (`wlan0`, `wwan0`, `eth1`).
    pub interface: String,
    /// What the uplink is: `wifi`, `cellular` or `ethernet`.
    pub kind: UplinkKind,
    /// `primary` carries traffic; `backup` only when no primary can (and stays quiet meanwhile).
    #[serde(default)]
    pub priority: UplinkPriority,
    /// Next hop; when absent, learned from the kernel's default route on the interface.
    pub gateway: Option<IpAddr>,
    /// Traffic costs money (a capped SIM): classes that avoid `metered` stay off it.
    #[serde(default)]
    pub metered: bool,
    /// The least the uplink's learned send rate may fall to when its queue grows
    /// (default 500 kbit/s, or `max_rate` when that is lower).
    pub min_rate: Option<Rate>,
    /// Never send faster than this on the uplink (a capped or throttled SIM); the learned
    /// rate also starts here. Without it a new uplink starts at 50 Mbit/s and, while
    /// traffic waits and the delay stays flat, grows by half per delay sample (ten a
    /// second) up to 1 Gbit/s: a fast line is found within about a second.
    pub max_rate: Option<Rate>,
    /// Wifi uplinks: the network to join (through wpa_supplicant).
    pub wifi: Option<WifiNetwork>,
    /// Cellular uplinks: the access point name (through ModemManager).
    pub apn: Option<String>,
    /// A data allowance and what happens when it is used up.
    pub cap: Option<DataCap>,
}

/// A wifi network to join.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WifiNetwork {
    pub ssid: String,
    /// WPA2/WPA3 passphrase, 8 to 63 characters; absent for an open network (a venue
    /// network behind a login page, usually).
    pub passphrase: Option<String>,
}

/// How often a data allowance starts again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CapPeriod {
    Monthly,
    Daily,
}

/// What an uplink does once its allowance is used up.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum CapAction {
    /// Carries traffic only when no other uplink can.
    #[default]
    BackupOnly,
    /// Carries nothing until the next period.
    Off,
}

/// A data allowance, counted in both directions including the tunnel's overhead.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataCap {
    /// The allowance: `"20GB"`, `"500MB"` (decimal units) or bytes.
    pub bytes: String,
    pub period: CapPeriod,
    /// Monthly caps: the day of the month (1–28) the allowance starts again.
    pub reset_day: Option<u8>,
    #[serde(default)]
    pub action: CapAction,
}

/// Bytes from `"20GB"`, `"500MB"`, `"1.5GB"`, `"750kB"` or a plain number.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        _ => return None,
    };
    let v = num.parse::<f64>().ok()? * mult;
    (1.0..1e16).contains(&v).then_some(v as u64)
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    /// Address the QUIC endpoint listens on.
    pub listen: SocketAddr,
    /// Name of the hub's TUN device.
    #[serde(default = "default_hub_tun")]
    pub tun_name: String,
    /// MTU of the hub's TUN device: the largest packet sent down the tunnel (as for the
    /// edges, each stall's tunnel follows what its uplinks carry below it).
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// Tunnel addresses: the hub takes the first, devices get the following ones.
    #[schemars(with = "String")]
    pub pool: IpNet,
    /// Where the devices' IPv4 LANs appear on the hub: each LAN prefix of each device gets
    /// a block of its size here, in device order, so that stalls with the same LAN (every
    /// box from the image has 10.1.0.0/24) work on one hub. The hub's kernel (its NAT,
    /// firewall, routes) sees these addresses; the stalls never do.
    #[serde(default = "default_lan_map")]
    #[schemars(with = "String")]
    pub lan_map: IpNet,
    /// TCP ports of the hub itself that stalls may reach through the tunnel (a sales
    /// broker on the hub's VM, e.g. 4222 for NATS). Nothing else on the hub answers a
    /// stall but ping.
    #[serde(default)]
    pub stall_services: Vec<u16>,
    /// Scheduling mode for download traffic that is not POS.
    #[serde(default)]
    pub mode: SchedMode,
    /// Devices allowed to connect. Nobody else gets anything.
    #[schemars(with = "Vec<Device>")]
    pub devices: Vec<Spanned<Device>>,
}

fn default_lan_map() -> IpNet {
    IpNet::V4(ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(10, 100, 0, 0), 14).unwrap_or_default())
}

fn default_hub_tun() -> String {
    "stallhub0".into()
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Device {
    pub name: String,
    /// The device's identity as printed by `stallnet id` on the device.
    pub identity: String,
    /// LAN prefixes behind this device (the only sources accepted from it; downloads to
    /// them reach this device only). Devices may share IPv4 prefixes (see `hub.lan_map`).
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub lan: Vec<IpNet>,
    /// LAN sources of this device whose download traffic is point-of-sale.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub pos_sources: Vec<IpNet>,
}

impl Config {
    /// The edge section; present whenever `role = "edge"` validated.
    pub fn edge(&self) -> Option<&EdgeConfig> {
        self.edge.as_ref().map(|s| s.get_ref())
    }
    /// The commerce section, when the box runs the local commerce service.
    pub fn commerce(&self) -> Option<&CommerceConfig> {
        self.commerce.as_ref().map(|s| s.get_ref())
    }
    /// The hub section; present whenever `role = "hub"` validated.
    pub fn hub(&self) -> Option<&HubConfig> {
        self.hub.as_ref().map(|s| s.get_ref())
    }
}

/// True when `s` looks like an identity printed by `stallnet id`.
pub fn is_identity(s: &str) -> bool {
    s.strip_prefix("sn1:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}
