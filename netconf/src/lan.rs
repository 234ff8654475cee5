//! `[lan]`: the stall's side of the box — its interface (or a bridge of ports), address,
//! DHCP (range, lease time, reservations), DNS, and further segments for POS and guests
//! (a VLAN on the LAN interface, or a port of their own) — and the dnsmasq configuration
//! rendered from it (pure: the same config gives the same file).

use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::grammar::{
    is_conf_path_str, is_host_label, is_iface_name, is_one_line, require, Unwritable,
    IFACE_EXPECTED,
};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LanConfig {
    /// The LAN interface (`lan0`), or the bridge to create over `ports` (`br0`).
    pub interface: String,
    /// Ports joined into the bridge `interface` (empty: `interface` is a plain port).
    #[serde(default)]
    pub ports: Vec<String>,
    /// The box's address and the LAN's prefix, e.g. `10.1.0.1/24`.
    #[schemars(with = "String")]
    pub address: Ipv4Net,
    /// DHCP for the LAN (absent: no DHCP server).
    pub dhcp: Option<Dhcp>,
    /// Upstream DNS servers for the box's resolver (empty: the system's).
    #[serde(default)]
    pub dns_servers: Vec<IpAddr>,
    /// Fixed addresses by MAC (the card reader, the camera).
    #[serde(default)]
    pub reservations: Vec<Reservation>,
    /// Further networks: POS, guests.
    #[serde(default)]
    pub segments: Vec<Segment>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Dhcp {
    /// First address handed out.
    pub start: Ipv4Addr,
    /// Last address handed out.
    pub end: Ipv4Addr,
    /// `12h`, `30m`, `3600s` or `infinite`.
    #[serde(default = "default_lease")]
    pub lease: String,
}

fn default_lease() -> String {
    "12h".into()
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Reservation {
    /// The device's MAC address (`aa:bb:cc:dd:ee:ff`).
    pub mac: String,
    /// The address it always gets (inside the LAN, outside nobody else's).
    pub address: Ipv4Addr,
    /// Its host name on the LAN.
    pub name: Option<String>,
}

/// What a segment is for (the firewall uses it: guests reach the internet only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    Pos,
    Guest,
    Other,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    /// A unique name (letters, digits, '-' or '_').
    pub name: String,
    /// `pos`, `guest` (internet only) or `other`.
    pub purpose: Purpose,
    /// 802.1Q id (1–4094): the segment is the VLAN `<lan interface>.<id>` ...
    pub vlan: Option<u16>,
    /// ... or a port of its own (a second ethernet, a wifi access point).
    pub interface: Option<String>,
    /// The box's address and the segment's prefix, e.g. `10.2.0.1/24`.
    #[schemars(with = "String")]
    pub address: Ipv4Net,
    /// DHCP for the segment.
    pub dhcp: Option<Dhcp>,
}

impl Segment {
    /// The segment's interface name.
    pub fn interface(&self, lan: &LanConfig) -> String {
        match (&self.interface, self.vlan) {
            (Some(i), _) => i.clone(),
            (None, Some(id)) => format!("{}.{id}", lan.interface),
            (None, None) => String::new(),
        }
    }
}

/// Whether `s` is a lease time dnsmasq takes (`12h`, `30m`, `3600s`, `3600`, `infinite`),
/// at least its minimum of two minutes.
pub fn valid_lease(s: &str) -> bool {
    if s == "infinite" {
        return true;
    }
    let digits = s.trim_end_matches(['h', 'm', 's']);
    let unit: u64 = match &s[digits.len()..] {
        "h" => 3600,
        "m" => 60,
        "s" | "" => 1,
        _ => return false,
    };
    !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && digits
            .parse::<u64>()
            .is_ok_and(|n| n.saturating_mul(unit) >= 120)
}

/// Local host names of card readers that must resolve to LAN addresses (dnsmasq's
/// rebind protection would otherwise drop the answers).
pub const REBIND_OK: &[&str] = &[
    "stripe-terminal-local-reader.net",
    "local.sumup.com",
    "local.izettle.com",
];

/// The dnsmasq configuration for `lan` (leases in `leases_file`; `revision` names the
/// config it came from). Every value is checked against dnsmasq's grammar before it is
/// written: one that could end its line or add a directive is refused, never written.
pub fn dnsmasq_conf(
    lan: &LanConfig,
    leases_file: &str,
    revision: &str,
) -> Result<String, Unwritable> {
    const F: &str = "dnsmasq.conf";
    require(
        F,
        "leases file",
        leases_file,
        is_conf_path_str,
        "an absolute path without commas or control characters",
    )?;
    require(F, "revision", revision, is_one_line, "one line")?;
    require(
        F,
        "LAN interface",
        &lan.interface,
        is_iface_name,
        IFACE_EXPECTED,
    )?;
    require(
        F,
        "DHCP lease",
        lan.dhcp.as_ref().map_or("12h", |d| d.lease.as_str()),
        valid_lease,
        "a lease time like \"12h\"",
    )?;
    for v in &lan.segments {
        require(
            F,
            "segment name",
            &v.name,
            is_tag,
            "letters, digits, '-' or '_'",
        )?;
        require(
            F,
            "segment interface",
            &v.interface(lan),
            is_iface_name,
            IFACE_EXPECTED,
        )?;
        require(
            F,
            "DHCP lease",
            v.dhcp.as_ref().map_or("12h", |d| d.lease.as_str()),
            valid_lease,
            "a lease time like \"12h\"",
        )?;
    }
    for r in &lan.reservations {
        require(
            F,
            "reservation MAC",
            &r.mac,
            |m| crate::classes::parse_mac(m).is_some(),
            "a MAC address like aa:bb:cc:dd:ee:ff",
        )?;
        if let Some(n) = &r.name {
            require(
                F,
                "reservation name",
                n,
                is_host_label,
                "a host name of letters, digits and '-'",
            )?;
        }
    }
    let mut out = format!(
        "# Rendered by stallnet from config {revision}: do not edit, it is rewritten.\n\
         bind-dynamic\nno-hosts\ndomain-needed\nbogus-priv\nstop-dns-rebind\n\
         dhcp-authoritative\ndhcp-leasefile={leases_file}\n"
    );
    for name in REBIND_OK {
        out.push_str(&format!("rebind-domain-ok=/{name}/\n"));
    }
    if lan.dns_servers.is_empty() {
        out.push_str("# upstream DNS: the system's resolv.conf\n");
    } else {
        out.push_str("no-resolv\n");
        for s in &lan.dns_servers {
            out.push_str(&format!("server={s}\n"));
        }
    }
    let mut nets: Vec<(String, String, Ipv4Net, Option<&Dhcp>)> = vec![(
        "lan".into(),
        lan.interface.clone(),
        lan.address,
        lan.dhcp.as_ref(),
    )];
    for v in &lan.segments {
        nets.push((v.name.clone(), v.interface(lan), v.address, v.dhcp.as_ref()));
    }
    for (tag, iface, net, dhcp) in nets {
        out.push_str(&format!("\n# {tag}\ninterface={iface}\n"));
        if let Some(d) = dhcp {
            out.push_str(&format!(
                "dhcp-range=set:{tag},{},{},{},{}\n\
                 dhcp-option=tag:{tag},option:router,{}\n\
                 dhcp-option=tag:{tag},option:dns-server,{}\n",
                d.start,
                d.end,
                net.netmask(),
                d.lease,
                net.addr(),
                net.addr()
            ));
        }
    }
    if !lan.reservations.is_empty() {
        out.push('\n');
    }
    for r in &lan.reservations {
        match &r.name {
            Some(n) => out.push_str(&format!("dhcp-host={},{},{n}\n", r.mac, r.address)),
            None => out.push_str(&format!("dhcp-host={},{}\n", r.mac, r.address)),
        }
    }
    Ok(out)
}

/// A dnsmasq tag (a segment's name): letters, digits, '-' or '_'.
fn is_tag(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lan() -> LanConfig {
        LanConfig {
            interface: "br0".into(),
            ports: vec!["eth0".into()],
            address: "10.1.0.1/24".parse().expect("net"),
            dhcp: Some(Dhcp {
                start: Ipv4Addr::new(10, 1, 0, 100),
                end: Ipv4Addr::new(10, 1, 0, 199),
                lease: "12h".into(),
            }),
            dns_servers: vec!["1.1.1.1".parse().expect("ip")],
            reservations: vec![Reservation {
                mac: "aa:bb:cc:dd:ee:ff".into(),
                address: Ipv4Addr::new(10, 1, 0, 10),
                name: Some("reader".into()),
            }],
            segments: vec![Segment {
                name: "guest".into(),
                vlan: Some(20),
                interface: None,
                purpose: Purpose::Guest,
                address: "10.2.0.1/24".parse().expect("net"),
                dhcp: Some(Dhcp {
                    start: Ipv4Addr::new(10, 2, 0, 50),
                    end: Ipv4Addr::new(10, 2, 0, 250),
                    lease: "1h".into(),
                }),
            }],
        }
    }

    #[test]
    fn dnsmasq_serves_each_network_and_lets_card_readers_resolve_locally() {
        let c =
            dnsmasq_conf(&lan(), "/var/lib/misc/dnsmasq.leases", "revision 7").expect("renders");
        for line in [
            "interface=br0",
            "dhcp-range=set:lan,10.1.0.100,10.1.0.199,255.255.255.0,12h",
            "dhcp-option=tag:lan,option:router,10.1.0.1",
            "interface=br0.20",
            "dhcp-range=set:guest,10.2.0.50,10.2.0.250,255.255.255.0,1h",
            "dhcp-host=aa:bb:cc:dd:ee:ff,10.1.0.10,reader",
            "rebind-domain-ok=/stripe-terminal-local-reader.net/",
            "stop-dns-rebind",
            "no-resolv",
            "server=1.1.1.1",
            "dhcp-leasefile=/var/lib/misc/dnsmasq.leases",
        ] {
            assert!(c.lines().any(|l| l == line), "missing {line:?} in\n{c}");
        }
        assert_eq!(
            Ok(c),
            dnsmasq_conf(&lan(), "/var/lib/misc/dnsmasq.leases", "revision 7")
        );
    }

    #[test]
    fn hostile_values_cannot_add_a_line_to_dnsmasq_conf() {
        const HOSTILE: &str = "till\naddress=/#/6.6.6.6";
        type Spoil = Box<dyn Fn(&mut LanConfig)>;
        let cases: Vec<(&str, Spoil)> = vec![
            (
                "reservation name",
                Box::new(|l| l.reservations[0].name = Some(HOSTILE.into())),
            ),
            (
                "reservation MAC",
                Box::new(|l| l.reservations[0].mac = format!("aa:bb:cc:dd:ee:ff\n{HOSTILE}")),
            ),
            (
                "LAN interface",
                Box::new(|l| l.interface = "br0\nport=0".into()),
            ),
            (
                "segment name",
                Box::new(|l| l.segments[0].name = "g\nport=0".into()),
            ),
            (
                "segment interface",
                Box::new(|l| l.segments[0].interface = Some("wl\nport=0".into())),
            ),
            (
                "DHCP lease",
                Box::new(|l| {
                    if let Some(d) = l.dhcp.as_mut() {
                        d.lease = "12h\nport=0".into();
                    }
                }),
            ),
        ];
        for (what, spoil) in cases {
            let mut l = lan();
            spoil(&mut l);
            let err = dnsmasq_conf(&l, "/var/lib/misc/dnsmasq.leases", "r").expect_err(what);
            assert_eq!(err.what, what, "{err}");
        }
        for (leases, rev) in [
            ("/x\naddress=/#/1.2.3.4", "r"),
            ("/x", "r\naddress=/#/1.2.3.4"),
        ] {
            assert!(
                dnsmasq_conf(&lan(), leases, rev).is_err(),
                "{leases:?} {rev:?}"
            );
        }
    }

    #[test]
    fn lease_times() {
        for ok in ["12h", "1h", "30m", "2m", "3600s", "3600", "infinite"] {
            assert!(valid_lease(ok), "{ok}");
        }
        for bad in ["", "h", "12hh", "1d", "-5m", "1", "1m", "90s"] {
            assert!(!valid_lease(bad), "{bad}");
        }
    }
}
