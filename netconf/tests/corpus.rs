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
        ("portal check over HTTPS", edge("reachability = { portal_url = \"https://check.example/\" }", ""), "edge.reachability.portal_url", "expected an http:// URL with a host (a portal only shows on plain HTTP), got \"https://check.example/\""),
        ("HTTPS check without TLS", edge("reachability = { https_url = \"http://check.example/\" }", ""), "edge.reachability.https_url", "expected an https:// URL with a host, got \"http://check.example/\""),
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
        ("interface name too long", edge("", "").replace("wan0", "a-very-long-interface-name"), "edge.uplinks[0].interface", "expected an interface name of 1 to 15 characters"),
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
        ("upstream scheme", commerce("[commerce.upstream]\nurl = \"ftp://x/y\""), "commerce.upstream.url", "expected an https:// (or http://) URL, or nats:// (or tls://) for JetStream, got \"ftp://x/y\""),
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
    ]
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
    }
    // With --nocapture: the current (path, message) table, to review a wording change.
    eprintln!("{report}");
}
