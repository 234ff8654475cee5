//! A corpus of bad configs: each is refused whole, with the position, the field path and
//! the exact message a field tech sees.

use std::path::Path;

const ID: &str = "sn1:0000000000000000000000000000000000000000000000000000000000000000";

fn edge(extra_edge: &str, tail: &str) -> String {
    format!(
        "role = \"edge\"\n[edge]\nlan = [\"10.1.0.0/24\"]\nhubs = [{{ address = \"192.0.2.1:4433\", identity = \"{ID}\" }}]\n{extra_edge}\n[[edge.uplinks]]\nname = \"wifi\"\ninterface = \"wan0\"\nkind = \"wifi\"\n{tail}"
    )
}

fn commerce(body: &str) -> String {
    edge(
        "",
        &format!("\n[commerce]\nlisten = \"10.1.0.1:8080\"\nclients = []\n{body}\n"),
    )
}

fn hub(extra_hub: &str, tail: &str) -> String {
    format!(
        "role = \"hub\"\n[hub]\nlisten = \"0.0.0.0:4433\"\npool = \"100.64.0.0/24\"\n{extra_hub}\n[[hub.devices]]\nname = \"stall-1\"\nidentity = \"{ID}\"\nlan = [\"10.1.0.0/24\"]\n{tail}"
    )
}

fn uplink(fields: &str) -> String {
    edge("", &format!("{fields}\n"))
}

fn lan(body: &str) -> String {
    edge(
        "",
        &format!("\n[lan]\ninterface = \"lan0\"\naddress = \"10.1.0.1/24\"\n{body}\n"),
    )
}

/// (what, config text, field path, exact message).
fn corpus() -> Vec<(&'static str, String, &'static str, &'static str)> {
    vec![
        ("unknown field in an uplink", format!("{}\nbogus = 1\n", edge("", "")).replace("\nbogus", "bogus"), "edge.uplinks[0].bogus", "unknown field `bogus`, expected one of `name`, `interface`, `kind`, `priority`, `gateway`, `metered`, `min_rate`, `max_rate`, `wifi`, `apn`, `cap`"),
        ("typo in a field", edge("mtuu = 1400", ""), "edge.mtuu", "unknown field `mtuu`, expected one of `hubs`, `lan`, `tun_name`, `mtu`, `fallback`, `mode`, `pos_sources`, `classes`, `rules`, `default_rules`, `dhcp_leases`, `table_base`, `uplinks`, `reachability`"),
        ("portal check over HTTPS", edge("reachability = { portal_url = \"https://check.example/\" }", ""), "edge.reachability.portal_url", "expected an http:// URL with a host and no spaces (a portal only shows on plain HTTP), got \"https://check.example/\""),
        ("HTTPS check without TLS", edge("reachability = { https_url = \"http://check.example/\" }", ""), "edge.reachability.https_url", "expected an https:// URL with a host and no spaces, got \"http://check.example/\""),
        ("checks too often", edge("reachability = { interval_s = 0 }", ""), "edge.reachability.interval_s", "expected 1 to 300 (seconds)"),
        ("missing reachability CA", edge("reachability = { ca_file = \"/nonexistent/ca.pem\" }", ""), "edge.reachability.ca_file", "no such file: /nonexistent/ca.pem"),
        ("wrong type", edge("mtu = \"big\"", ""), "edge.mtu", "invalid type: string \"big\", expected u16"),
        ("missing role", edge("", "").replace("role = \"edge\"\n", ""), "role", "missing field `role`"),
        ("unknown role", edge("", "").replace("role = \"edge\"", "role = \"router\""), "role", "unknown variant `router`, expected `edge` or `hub`"),
        ("hub role without [hub]", "role = \"hub\"\n".to_string(), "hub", "role = \"hub\" needs a [hub] section"),
        ("no hubs", edge("", "").replace(&format!("hubs = [{{ address = \"192.0.2.1:4433\", identity = \"{ID}\" }}]"), "hubs = []"), "edge.hubs", "expected at least one hub (or, to run without a hub until one is set up, fallback = \"direct\")"),
        ("bad hub identity", edge("", "").replace(ID, "sn1:nothex"), "edge.hubs[0].identity", "expected an identity printed by `stallnet id` (sn1: and 64 hex digits)"),
        ("bad hub address", edge("", "").replace("192.0.2.1:4433", "hub.example"), "edge.hubs", "invalid socket address syntax"),
        ("no LAN", edge("", "").replace("lan = [\"10.1.0.0/24\"]", "lan = []"), "edge.lan", "expected at least one LAN prefix"),
        ("bad LAN prefix", edge("", "").replace("10.1.0.0/24", "10.1.0.0/33"), "edge.lan", "invalid IP address syntax"),
        ("overlapping LAN prefixes", edge("", "").replace("lan = [\"10.1.0.0/24\"]", "lan = [\"10.1.0.0/16\", \"10.1.2.0/24\"]"), "edge.lan[1]", "10.1.2.0/24 overlaps edge.lan[0] (10.1.0.0/16)"),
        ("MTU too small", edge("mtu = 200", ""), "edge.mtu", "expected an MTU between 576 and 9000"),
        ("POS source outside the LAN", edge("pos_sources = [\"10.9.9.9/32\"]", ""), "edge.pos_sources[0]", "10.9.9.9/32 is not inside any LAN prefix"),
        ("no uplinks", edge("", "").split("[[edge.uplinks]]").next().unwrap_or("").to_string(), "edge.uplinks", "missing field `uplinks`"),
        ("duplicate uplink name", edge("", "[[edge.uplinks]]\nname = \"wifi\"\ninterface = \"wan1\"\nkind = \"wifi\"\n"), "edge.uplinks[1].name", "duplicate uplink name \"wifi\""),
        ("interface used twice", edge("", "[[edge.uplinks]]\nname = \"cell\"\ninterface = \"wan0\"\nkind = \"cellular\"\n"), "edge.uplinks[1].interface", "interface \"wan0\" is used by two uplinks"),
        ("bad uplink name", edge("", "").replace("name = \"wifi\"", "name = \"wi fi\""), "edge.uplinks[0].name", "expected 1 to 32 letters, digits, '-' or '_'"),
        ("interface name too long", edge("", "").replace("wan0", "a-very-long-interface-name"), "edge.uplinks[0].interface", "expected an interface name of 1 to 15 letters, digits, '-', '_' or '.', got \"a-very-long-interface-name\""),
        ("unknown uplink kind", edge("", "").replace("kind = \"wifi\"", "kind = \"satellite\""), "edge.uplinks[0].kind", "unknown variant `satellite`, expected one of `wifi`, `cellular`, `ethernet`"),
        ("unknown fallback", edge("fallback = \"maybe\"", ""), "edge.fallback", "unknown variant `maybe`, expected `none` or `direct`"),
        ("unknown class", edge("[edge.classes.vip]\nweight = 3", ""), "edge.classes.vip", "unknown field `vip`, expected one of `pos`, `stream`, `interactive`, `bulk`, `guest`"),
        ("bad rate", edge("[edge.classes.guest]\nmax_rate = \"fast\"", ""), "edge.classes.guest.max_rate", "expected a rate like \"4mbit\" or \"500kbit\", got \"fast\""),
        ("min above max", edge("[edge.classes.guest]\nmin_rate = \"6mbit\"\nmax_rate = \"2mbit\"", ""), "edge.classes.guest.min_rate", "min_rate 6mbit is above max_rate 2mbit"),
        ("class on an unknown uplink", edge("[edge.classes.guest]\nuplinks = [\"lte\"]", ""), "edge.classes.guest.uplinks", "no uplink is named \"lte\""),
        ("empty rule", edge("", "[[edge.rules]]\nclass = \"pos\"\n"), "edge.rules[0]", "expected at least one match field (mac, hostname, interface, src, dst, host, proto, src_port, dst_port, dscp)"),
        ("bad MAC in a rule", edge("", "[[edge.rules]]\nclass = \"pos\"\nmac = [\"00:11:22\"]\n"), "edge.rules[0].mac", "expected a MAC address like \"aa:bb:cc:dd:ee:ff\", got \"00:11:22\""),
        ("bad host pattern", edge("", "[[edge.rules]]\nclass = \"pos\"\nhost = [\"*.*\"]\n"), "edge.rules[0].host", "expected a host name or \"*.domain\", got \"*.*\""),
        ("DSCP out of range", edge("", "[[edge.rules]]\nclass = \"stream\"\ndscp = [64]\n"), "edge.rules[0].dscp", "expected a DSCP code point 0-63, got 64"),
        ("bad port range", edge("", "[[edge.rules]]\nclass = \"stream\"\ndst_port = [\"9000-80\"]\n"), "edge.rules[0].dst_port", "expected a port (0-65535) or a range like \"8000-8999\", got \"9000-80\""),
        ("commerce key not a hash", commerce("").replace("clients = []", "clients = [{ name = \"till\", key_sha256 = \"abc\" }]"), "commerce.clients[0].key_sha256", "expected 64 hex digits (the SHA-256 of the key; `stallnet hash-key`)"),
        ("commerce API off the LAN", commerce("").replace("10.1.0.1:8080", "192.168.5.1:8080"), "commerce.listen", "192.168.5.1 is not an address on the LAN (10.1.0.0/24)"),
        ("upstream scheme", commerce("[commerce.upstream]\nurl = \"ftp://x/y\""), "commerce.upstream.url", "expected an https:// (or http://) URL with a host and no spaces, or nats:// (or tls://) for JetStream, got \"ftp://x/y\""),
        ("NATS without subject", commerce("[commerce.upstream]\nurl = \"nats://x:4222\""), "commerce.upstream.subject", "a NATS upstream needs the JetStream subject for this stall's records"),
        ("body limit too small", commerce("[commerce.limits]\nmax_body_bytes = 10"), "commerce.limits.max_body_bytes", "expected 1024 to 16777216"),
        ("DHCP range off the LAN", lan("dhcp = { start = \"10.1.1.10\", end = \"10.1.0.200\" }"), "lan.dhcp.start", "10.1.1.10 is not a host address of 10.1.0.0/24"),
        ("DHCP range over the box's address", lan("dhcp = { start = \"10.1.0.1\", end = \"10.1.0.200\" }"), "lan.dhcp", "the range includes the box's own address 10.1.0.1"),
        ("bad lease time", lan("dhcp = { start = \"10.1.0.100\", end = \"10.1.0.200\", lease = \"1 day\" }"), "lan.dhcp.lease", "expected a lease time like \"12h\", \"30m\" or \"infinite\", got \"1 day\""),
        ("LAN address is the network", lan("").replace("10.1.0.1/24", "10.1.0.0/24"), "lan.address", "expected the box's address with the LAN prefix, like 10.1.0.1/24, got 10.1.0.0/24"),
        ("reservation off the LAN", lan("reservations = [{ mac = \"aa:bb:cc:dd:ee:ff\", address = \"192.168.1.5\" }]"), "lan.reservations[0].address", "192.168.1.5 is not a free host address of 10.1.0.0/24"),
        ("VLAN overlapping the LAN", lan("[[lan.segments]]\nname = \"guest\"\nvlan = 20\npurpose = \"guest\"\naddress = \"10.1.0.129/25\""), "lan.segments[0].address", "10.1.0.128/25 overlaps 10.1.0.0/24"),
        ("VLAN id out of range", lan("[[lan.segments]]\nname = \"pos\"\nvlan = 5000\npurpose = \"pos\"\naddress = \"10.3.0.1/24\""), "lan.segments[0].vlan", "expected a VLAN id 1-4094 used once, got 5000"),
        ("LAN outside edge.lan", lan("").replace("address = \"10.1.0.1/24\"", "address = \"10.7.0.1/24\""), "lan.address", "edge.lan must include 10.7.0.0/24 (this LAN) for its traffic to enter the tunnel"),
        ("cap without a reset day", edge("", "cap = { bytes = \"20GB\", period = \"monthly\" }\n"), "edge.uplinks[0].cap.reset_day", "a monthly cap needs the day of the month it resets (1-28)"),
        ("cap amount", edge("", "cap = { bytes = \"lots\", period = \"daily\" }\n"), "edge.uplinks[0].cap.bytes", "expected an amount like \"20GB\" or \"500MB\", got \"lots\""),
        ("wifi on a cellular uplink", edge("", "").replace("kind = \"wifi\"", "kind = \"cellular\"\nwifi = { ssid = \"venue\" }"), "edge.uplinks[0].wifi", "wifi applies to kind = \"wifi\" uplinks only"),
        ("short passphrase", edge("", "wifi = { ssid = \"venue\", passphrase = \"short\" }\n"), "edge.uplinks[0].wifi.passphrase", "expected a WPA passphrase of 8 to 63 printable ASCII characters"),
        ("APN on wifi", edge("", "apn = \"internet\"\n"), "edge.uplinks[0].apn", "apn applies to kind = \"cellular\" uplinks only"),
        ("bad device name", format!("device = \"stall 17\"\n{}", edge("", "")), "device", "expected a host name (letters, digits, '-'; 1 to 63), got \"stall 17\""),
        ("metrics address", format!("{}\n[metrics]\nlisten = \"nowhere\"\n", edge("", "")), "metrics.listen", "invalid socket address syntax"),
        // Bounds the runtime relies on: each found by a config that validated and then
        // crashed, misrouted or failed to start.
        ("a throttled SIM's ceiling under min_rate", uplink("min_rate = \"2mbit\"\nmax_rate = \"256kbit\""), "edge.uplinks[0].min_rate", "min_rate 2mbit is above max_rate 256kbit"),
        ("table_base on the main table", edge("table_base = 254", ""), "edge.table_base", "expected 1 to 219 or 256 to 2147483614 (the tunnel's table and one per uplink follow it; 0 and 253-255 are the kernel's own), got 254"),
        ("table_base overflowing", edge("table_base = 4294967295", ""), "edge.table_base", "expected 1 to 219 or 256 to 2147483614 (the tunnel's table and one per uplink follow it; 0 and 253-255 are the kernel's own), got 4294967295"),
        ("table_base zero", edge("table_base = 0", ""), "edge.table_base", "expected 1 to 219 or 256 to 2147483614 (the tunnel's table and one per uplink follow it; 0 and 253-255 are the kernel's own), got 0"),
        ("table_base reaching the default table", edge("table_base = 230", ""), "edge.table_base", "expected 1 to 219 or 256 to 2147483614 (the tunnel's table and one per uplink follow it; 0 and 253-255 are the kernel's own), got 230"),
        ("tun_name too long", edge("tun_name = \"stallnet-tunnel0\"", ""), "edge.tun_name", "expected an interface name of 1 to 15 letters, digits, '-', '_' or '.', got \"stallnet-tunnel0\""),
        ("empty tun_name", edge("tun_name = \"\"", ""), "edge.tun_name", "expected an interface name of 1 to 15 letters, digits, '-', '_' or '.', got \"\""),
        ("interface with a slash", edge("", "").replace("\"wan0\"", "\"wan/0\""), "edge.uplinks[0].interface", "expected an interface name of 1 to 15 letters, digits, '-', '_' or '.', got \"wan/0\""),
        ("interface with a space", edge("", "").replace("\"wan0\"", "\"wan 0\""), "edge.uplinks[0].interface", "expected an interface name of 1 to 15 letters, digits, '-', '_' or '.', got \"wan 0\""),
        ("interface with a quote", edge("", "").replace("\"wan0\"", "\"wan\\\"0\""), "edge.uplinks[0].interface", "expected an interface name of 1 to 15 letters, digits, '-', '_' or '.', got \"wan\\\"0\""),
        ("interface with a newline", edge("", "").replace("\"wan0\"", "\"wan\\n0\""), "edge.uplinks[0].interface", "expected an interface name of 1 to 15 letters, digits, '-', '_' or '.', got \"wan\\n0\""),
        ("interface with a NUL", edge("", "").replace("\"wan0\"", "\"wan\\u00000\""), "edge.uplinks[0].interface", "expected an interface name of 1 to 15 letters, digits, '-', '_' or '.', got \"wan\\00\""),
        ("rule on an interface with a quote", edge("", "[[edge.rules]]\nclass = \"guest\"\ninterface = [\"br0\\\" accept\"]\n"), "edge.rules[0].interface", "expected an interface name of 1 to 15 letters, digits, '-', '_' or '.', got \"br0\\\" accept\""),
        ("rule on an interface [lan] never creates", lan("ports = [\"eth0\"]\n[[lan.segments]]\nname = \"guest\"\nvlan = 20\npurpose = \"guest\"\naddress = \"10.2.0.1/24\"").replace("interface = \"lan0\"", "interface = \"br0\"") + "[[edge.rules]]\nclass = \"guest\"\ninterface = [\"br-guest\"]\n", "edge.rules[0].interface", "no LAN interface is named \"br-guest\": [lan] creates br0, eth0, br0.20 (a VLAN segment is the LAN interface, a dot and its id)"),
        ("HTTPS check without a host", edge("reachability = { https_url = \"https://\" }", ""), "edge.reachability.https_url", "expected an https:// URL with a host and no spaces, got \"https://\""),
        ("HTTPS check with a space", edge("reachability = { https_url = \"https://check example/\" }", ""), "edge.reachability.https_url", "expected an https:// URL with a host and no spaces, got \"https://check example/\""),
        ("upstream without a host", commerce("[commerce.upstream]\nurl = \"https:///sales\""), "commerce.upstream.url", "expected an https:// (or http://) URL with a host and no spaces, or nats:// (or tls://) for JetStream, got \"https:///sales\""),
        ("commerce on port 0", commerce("").replace("10.1.0.1:8080", "10.1.0.1:0"), "commerce.listen", "expected a port from 1 to 65535 (0 would be a different one at every start)"),
        ("metrics on the commerce port", format!("{}\n[metrics]\nlisten = \"0.0.0.0:8080\"\n", commerce("")), "metrics.listen", "0.0.0.0:8080 is already taken by commerce.listen: give each its own port"),
        ("one key for two clients (hex case)", commerce("").replace("clients = []", &format!("clients = [{{ name = \"till-1\", key_sha256 = \"{}\" }}, {{ name = \"till-2\", key_sha256 = \"{}\" }}]", "ab".repeat(32), "AB".repeat(32))), "commerce.clients[1].key_sha256", "the same key is listed twice (hex digits compare without case): each client needs a key of its own"),
        ("[commerce] in a hub config", format!("{}\n[commerce]\nlisten = \"127.0.0.1:8080\"\nclients = []\n", hub("", "")), "commerce", "[commerce] belongs to an edge config (the hub keeps no sales)"),
        ("dnsmasq injection through a reservation name", lan("reservations = [{ mac = \"aa:bb:cc:dd:ee:ff\", address = \"10.1.0.10\", name = \"till\\naddress=/#/6.6.6.6\" }]"), "lan.reservations[0].name", "expected a host name of 1 to 63 letters, digits and '-' (not first or last), got \"till\\naddress=/#/6.6.6.6\""),
        ("leases path with a newline", edge("dhcp_leases = \"/var/lib/x\\ndhcp-range=1\"", ""), "edge.dhcp_leases", "expected an absolute path without commas or control characters, got \"/var/lib/x\\ndhcp-range=1\""),
        ("protocol number out of range", edge("", "[[edge.rules]]\nclass = \"pos\"\nproto = [300]\n"), "edge.rules[0].proto", "expected tcp, udp, icmp, icmpv6 or a protocol number 0-255, got 300"),
        ("protocol of the wrong type", edge("", "[[edge.rules]]\nclass = \"pos\"\nproto = [true]\n"), "edge.rules[0].proto", "invalid type: boolean `true`, expected tcp, udp, icmp, icmpv6 or a protocol number 0-255"),
        ("IPv6 hub pool", hub("", "").replace("100.64.0.0/24", "fd00::/64"), "hub.pool", "expected an IPv4 prefix like 100.64.0.0/24 (tunnel addresses are IPv4 in this version), got fd00::/64"),
        ("hub MTU zero", hub("mtu = 0", ""), "hub.mtu", "expected an MTU between 576 and 9000"),
        ("hub tun_name too long", hub("tun_name = \"stallnet-hub-tun0\"", ""), "hub.tun_name", "expected an interface name of 1 to 15 letters, digits, '-', '_' or '.', got \"stallnet-hub-tun0\""),
        ("hub on port 0", hub("", "").replace("0.0.0.0:4433", "0.0.0.0:0"), "hub.listen", "expected a port from 1 to 65535 (0 would be a different one at every start)"),
        ("empty device name", hub("", "").replace("name = \"stall-1\"", "name = \"\""), "hub.devices[0].name", "expected 1 to 63 letters, digits, '-' or '_', got \"\""),
        ("device name with a NUL", hub("", "").replace("name = \"stall-1\"", "name = \"stall\\u0000\""), "hub.devices[0].name", "expected 1 to 63 letters, digits, '-' or '_', got \"stall\\0\""),
        ("overlapping IPv6 device LANs", hub("", &format!("[[hub.devices]]\nname = \"stall-2\"\nidentity = \"{}\"\nlan = [\"fd00::/48\"]\n", ID.replace("sn1:0", "sn1:1"))).replace("lan = [\"10.1.0.0/24\"]", "lan = [\"fd00::/64\"]"), "hub.devices[1].lan[0]", "fd00::/48 overlaps fd00::/64 of hub.devices[0]: the hub routes IPv6 downloads by LAN prefix, so each device needs its own"),
        ("one device's LANs overlapping", hub("", "").replace("lan = [\"10.1.0.0/24\"]", "lan = [\"10.1.0.0/24\", \"10.1.0.128/25\"]"), "hub.devices[0].lan[1]", "10.1.0.128/25 overlaps 10.1.0.0/24 of the same device: expected separate prefixes"),
        ("lan_map overlapping the pool", hub("lan_map = \"100.64.0.0/16\"", ""), "hub.lan_map", "100.64.0.0/16 overlaps hub.pool 100.64.0.0/24: expected a prefix of its own"),
        ("lan_map too narrow", hub("lan_map = \"10.100.0.0/24\"", &format!("[[hub.devices]]\nname = \"stall-2\"\nidentity = \"{}\"\nlan = [\"10.1.0.0/24\"]\n", ID.replace("sn1:0", "sn1:1"))), "hub.lan_map", "lan_map 10.100.0.0/24 has no room for 10.1.0.0/24 of device 1 (the devices before it take 256 addresses): expected a wider prefix"),
        ("a stall service on port 0", hub("stall_services = [4222, 0]", ""), "hub.stall_services[1]", "expected a TCP port from 1 to 65535"),
        ("IPv6 lan_map", hub("lan_map = \"fd00::/64\"", ""), "hub.lan_map", "expected an IPv4 prefix like 10.100.0.0/14, got fd00::/64"),
        ("too many uplinks", edge("", &(1..=16).map(|i| format!("[[edge.uplinks]]\nname = \"u{i}\"\ninterface = \"wan{i}\"\nkind = \"ethernet\"\n")).collect::<String>()), "edge.uplinks", "expected at most 16 uplinks, got 17"),
    ]
}

/// The line the field at `path` is written on, when its key appears exactly once in the
/// text (`mtu = …`, or inside an inline table); an error about it must point there, not
/// at its table's header.
fn field_line(text: &str, path: &str) -> Option<usize> {
    let key = path.rsplit('.').next()?;
    let key = key.split('[').next()?;
    let hits: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| {
            l.starts_with(&format!("{key} ="))
                || l.contains(&format!("{{ {key} ="))
                || l.contains(&format!(", {key} ="))
        })
        .map(|(i, _)| i + 1)
        .collect();
    (hits.len() == 1).then(|| hits[0])
}

#[test]
fn a_file_that_is_not_utf8_is_refused_at_the_bad_byte() {
    let dir = std::env::temp_dir().join(format!("stallnet-corpus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("latin1.toml");
    let mut bytes = edge("", "").into_bytes();
    bytes.extend_from_slice(b"# caf\xe9\n");
    std::fs::write(&file, &bytes).expect("write");
    let err = stallnet_netconf::load_file(&file).expect_err("not UTF-8");
    let _ = std::fs::remove_dir_all(&dir);
    let e = &err.0[0];
    assert_eq!((e.line, e.col), (10, 6), "{err}");
    assert!(
        e.message.contains("UTF-8") && e.message.contains("0xe9"),
        "{err}"
    );
}

#[test]
fn every_bad_config_is_refused_with_position_and_message() {
    let cases = corpus();
    assert!(cases.len() >= 30, "the corpus has {} cases", cases.len());
    let mut report = String::new();
    for (what, text, path, message) in cases {
        let err = match stallnet_netconf::parse_str(Path::new("stall.toml"), &text) {
            Ok(_) => panic!("{what}: accepted:\n{text}"),
            Err(e) => e,
        };
        let first = &err.0[0];
        assert!(first.line >= 1 && first.col >= 1, "{what}: no position");
        assert_eq!(first.file, Path::new("stall.toml"), "{what}");
        report.push_str(&format!(
            "(\"{what}\", \"{}\", \"{}\"),\n",
            first.path,
            first.message.replace('"', "\\\"")
        ));
        assert_eq!(first.path, path, "{what}: {err}");
        assert_eq!(first.message, message, "{what}: {err}");
        if let Some(line) = field_line(&text, path) {
            assert_eq!(
                first.line, line,
                "{what}: not at the field's own line: {err}"
            );
        }
    }
    // With --nocapture: the current (path, message) table, to review a wording change.
    eprintln!("{report}");
}
