//! "Every config that validates can start": configs are generated from every field's
//! interesting values (the bounds, one past them, hostile strings, overlaps), and each one
//! that `stallnet config validate` accepts must give a runtime plan — classes, scheduler
//! and QoS, classifier, each uplink's rates, cap and table, the reachability checks,
//! the rendered dnsmasq, firewall and wpa_supplicant files, the hub's addresses — without
//! an error or a panic. The plan is what both roles build first at start and on reload.
//! No kernel is needed.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config as RunConfig, TestRunner};

const ID: &str = "sn1:0000000000000000000000000000000000000000000000000000000000000000";

fn pick(values: &'static [&'static str]) -> impl Strategy<Value = &'static str> {
    prop::sample::select(values)
}

/// One of `valid` (its bounds included) nine times in ten, else one of `invalid`: every
/// field is mostly valid, so that many whole configs validate and reach the plan.
fn mostly(
    valid: &'static [&'static str],
    invalid: &'static [&'static str],
) -> impl Strategy<Value = &'static str> {
    prop_oneof![19 => pick(valid), 1 => pick(invalid)]
}

fn iface() -> impl Strategy<Value = &'static str> {
    mostly(
        &[
            "wan0",
            "wlan0",
            "wwan0",
            "eth1",
            "x",
            "abcdefghijklmno",
            "wan.2",
        ],
        &["abcdefghijklmnop", "", "we/0", "we 0", "we\\\"0", "we\\n0"],
    )
}

fn rate() -> impl Strategy<Value = Option<&'static str>> {
    prop::option::of(mostly(
        &[
            "\"1kbit\"",
            "\"256kbit\"",
            "\"499kbit\"",
            "\"500kbit\"",
            "\"10mbit\"",
            "\"1gbit\"",
            "\"2gbit\"",
            "\"1000gbit\"",
            "1000",
        ],
        &["\"0.5kbit\"", "0", "-5"],
    ))
}

fn opt_line(key: &'static str, v: Option<&str>) -> String {
    v.map(|v| format!("{key} = {v}\n")).unwrap_or_default()
}

fn uplink() -> impl Strategy<Value = String> {
    (
        mostly(&["wifi", "cell", "eth", "w-1", "w_2"], &["bad name", ""]),
        iface(),
        pick(&["wifi", "cellular", "ethernet"]),
        pick(&["primary", "secondary", "backup"]),
        rate(),
        rate(),
        prop::option::of(mostly(
            &[
                "{ bytes = \"20GB\", period = \"monthly\", reset_day = 28 }",
                "{ bytes = \"1\", period = \"daily\", action = \"off\" }",
                "{ bytes = \"9999TB\", period = \"monthly\", reset_day = 1 }",
            ],
            &["{ bytes = \"500MB\", period = \"monthly\", reset_day = 29 }"],
        )),
        prop::option::of(pick(&[
            "{ ssid = \"Market \\\"Hall\\\"\\nx\", passphrase = \"12345678\" }",
            "{ ssid = \"venue\" }",
        ])),
        any::<bool>(),
    )
        .prop_map(|(name, ifc, kind, prio, min, max, cap, wifi, metered)| {
            format!(
                "[[edge.uplinks]]\nname = \"{name}\"\ninterface = \"{ifc}\"\nkind = \"{kind}\"\npriority = \"{prio}\"\nmetered = {metered}\n{}{}{}{}",
                opt_line("min_rate", min),
                opt_line("max_rate", max),
                opt_line("cap", cap),
                opt_line("wifi", wifi),
            )
        })
}

fn class() -> impl Strategy<Value = String> {
    (
        pick(&["pos", "stream", "interactive", "bulk", "guest"]),
        prop::option::of(prop_oneof![1 => Just(0u32), 3 => Just(1), 3 => Just(1000), 1 => Just(1001), 10 => 1u32..50]),
        rate(),
        rate(),
        prop::option::of(pick(&["redundant", "lowest-latency", "aggregate"])),
    )
        .prop_map(|(name, weight, min, max, mode)| {
            format!(
                "[edge.classes.{name}]\n{}{}{}{}",
                weight.map(|w| format!("weight = {w}\n")).unwrap_or_default(),
                opt_line("min_rate", min),
                opt_line("max_rate", max),
                mode.map(|m| format!("mode = \"{m}\"\n")).unwrap_or_default(),
            )
        })
}

fn rule() -> impl Strategy<Value = String> {
    (
        pick(&["pos", "stream", "interactive", "bulk", "guest"]),
        mostly(
            &[
                "interface = [\"br0\"]",
                "proto = [\"udp\", 6, 255]",
                "dst_port = [0, 65535, \"1000-2000\"]",
                "dscp = [0, 63]",
                "src = [\"10.1.0.0/24\", \"0.0.0.0/0\"]",
                "host = [\"*.example.com\"]",
                "mac = [\"aa:bb:cc:dd:ee:ff\"]",
                "hostname = [\"till\"]",
            ],
            &["interface = [\"br-guest\"]", "proto = [300]", "dscp = [64]"],
        ),
    )
        .prop_map(|(class, m)| format!("[[edge.rules]]\nclass = \"{class}\"\n{m}\n"))
}

fn lan() -> impl Strategy<Value = String> {
    (
        mostly(&["br0"], &["lan 0"]),
        mostly(&["ports = [\"eth0\"]", ""], &["ports = [\"br0\"]"]),
        mostly(&["10.1.0.1/24", "10.1.0.1/30"], &["10.1.0.0/24", "10.1.0.1/31"]),
        mostly(
            &[
                "",
                "dhcp = { start = \"10.1.0.2\", end = \"10.1.0.2\", lease = \"infinite\" }",
            ],
            &["dhcp = { start = \"10.1.0.100\", end = \"10.1.0.200\", lease = \"1m\" }"],
        ),
        mostly(
            &[
                "",
                "reservations = [{ mac = \"aa:bb:cc:dd:ee:01\", address = \"10.1.0.2\", name = \"card-reader\" }]",
            ],
            &[
                "reservations = [{ mac = \"aa:bb:cc:dd:ee:01\", address = \"10.1.0.2\", name = \"till\\naddress=/#/6.6.6.6\" }]",
                "reservations = [{ mac = \"aa:bb:cc:dd:ee:01\", address = \"10.1.0.2\", name = \"-x\" }]",
            ],
        ),
        mostly(
            &[
                "",
                "[[lan.segments]]\nname = \"guest\"\ninterface = \"wlan1\"\npurpose = \"guest\"\naddress = \"10.2.0.1/24\"\n",
                "[[lan.segments]]\nname = \"pos\"\nvlan = 20\npurpose = \"pos\"\naddress = \"10.3.0.1/24\"\n",
            ],
            &["[[lan.segments]]\nname = \"g\"\nvlan = 4094\npurpose = \"guest\"\naddress = \"10.1.0.129/25\"\n"],
        ),
    )
        .prop_map(|(ifc, ports, addr, dhcp, res, seg)| {
            format!("[lan]\ninterface = \"{ifc}\"\n{ports}\naddress = \"{addr}\"\n{dhcp}\n{res}\n{seg}")
        })
}

fn edge() -> impl Strategy<Value = String> {
    (
        mostly(&["stall0", "abcdefghijklmno", "tun.1"], &["", "abcdefghijklmnop", "st/0"]),
        prop_oneof![
            19 => pick(&["576", "1280", "9000"]).prop_map(String::from),
            1 => pick(&["0", "575", "9001", "65535"]).prop_map(String::from),
            1 => any::<u16>().prop_map(|v| v.to_string()),
        ],
        prop_oneof![
            19 => pick(&["1", "200", "219", "256", "2147483614"]).prop_map(String::from),
            1 => pick(&["0", "220", "252", "253", "254", "255", "4294967295", "2147483615"]).prop_map(String::from),
            1 => any::<u32>().prop_map(|v| v.to_string()),
        ],
        prop::collection::vec(uplink(), 1..4),
        prop::collection::vec(class(), 0..3),
        prop::collection::vec(rule(), 0..3),
        prop::option::of(lan()),
        prop::option::of(mostly(&["10.1.0.1:8080", "127.0.0.1:8080"], &["10.1.0.1:0"])),
        prop::option::of(mostly(&["10.1.0.1:9108", "127.0.0.1:9108"], &["0.0.0.0:8080", "127.0.0.1:0"])),
        (
            prop_oneof![9 => 1u64..=300, 1 => Just(0u64)],
            prop_oneof![9 => 5u64..=3600, 1 => Just(4u64)],
            prop_oneof![9 => 30u64..=86_400, 1 => Just(86_401u64)],
        ),
        pick(&["aggregate", "redundant"]),
    )
        .prop_map(
            |(tun, mtu, table, uplinks, classes, rules, lan, commerce, metrics, (iv, hiv, biv), mode)| {
                let mut t = format!(
                    "role = \"edge\"\n[edge]\nlan = [\"10.1.0.0/16\"]\nfallback = \"direct\"\nmode = \"{mode}\"\n\
                     hubs = [{{ address = \"192.0.2.1:4433\", identity = \"{ID}\" }}]\n\
                     tun_name = \"{tun}\"\nmtu = {mtu}\ntable_base = {table}\npos_sources = [\"10.1.0.10/32\"]\n\
                     reachability = {{ interval_s = {iv}, https_interval_s = {hiv}, backup_interval_s = {biv} }}\n"
                );
                for c in classes {
                    t.push_str(&c);
                }
                for u in uplinks {
                    t.push_str(&u);
                }
                for r in rules {
                    t.push_str(&r);
                }
                if let Some(l) = lan {
                    t.push_str(&l);
                }
                if let Some(c) = commerce {
                    t.push_str(&format!("[commerce]\nlisten = \"{c}\"\nclients = []\n"));
                }
                if let Some(m) = metrics {
                    t.push_str(&format!("[metrics]\nlisten = \"{m}\"\n"));
                }
                t
            },
        )
}

fn hub() -> impl Strategy<Value = String> {
    (
        mostly(
            &["100.64.0.0/24", "100.64.0.0/29", "100.64.0.0/30", "10.99.0.0/16"],
            &["100.64.0.0/31", "100.64.0.0/32", "fd00::/64"],
        ),
        mostly(&["576", "1280", "9000"], &["0", "9001"]),
        mostly(&["stallhub0", "abcdefghijklmno"], &["", "abcdefghijklmnop"]),
        mostly(&["0.0.0.0:4433", "127.0.0.1:1"], &["0.0.0.0:0"]),
        prop::collection::vec(
            (
                mostly(&["stall", "s-1", "s_2"], &["", "a b", "x\\u0000"]),
                mostly(&["10.1.0.0/24", "10.2.0.0/24"], &["10.0.0.0/8"]),
                mostly(&["", "pos_sources = [\"10.1.0.10/32\"]"], &["pos_sources = [\"192.168.0.1/32\"]"]),
            ),
            0..5,
        ),
    )
        .prop_map(|(pool, mtu, tun, listen, devices)| {
            let mut t = format!(
                "role = \"hub\"\n[hub]\nlisten = \"{listen}\"\npool = \"{pool}\"\nmtu = {mtu}\ntun_name = \"{tun}\"\n"
            );
            for (i, (name, lan, pos)) in devices.into_iter().enumerate() {
                // Each device its own identity and a LAN that moves with its index (the
                // overlaps come from the "invalid" choices).
                let lan = lan.replace("10.1.", &format!("10.{}.", 1 + 2 * i)).replace("10.2.", &format!("10.{}.", 2 + 2 * i));
                let pos = pos.replace("10.1.", &format!("10.{}.", 1 + 2 * i));
                t.push_str(&format!(
                    "[[hub.devices]]\nname = \"{name}{i}\"\nidentity = \"sn1:{i:064x}\"\nlan = [\"{lan}\"]\n{pos}\n"
                ));
            }
            t
        })
}

/// Runs `cases` generated configs of one role; every accepted one must plan. Returns how
/// many validated (so the test can check it explored valid configs, not only bad ones).
fn every_valid_config_plans(strategy: impl Strategy<Value = String>, cases: u32) -> usize {
    let accepted = AtomicUsize::new(0);
    let mut runner = TestRunner::new(RunConfig {
        cases,
        failure_persistence: None,
        ..RunConfig::default()
    });
    let result = runner.run(&strategy, |text| {
        let Ok(cfg) = stallnet_netconf::parse_str(Path::new("gen.toml"), &text) else {
            return Ok(());
        };
        accepted.fetch_add(1, Ordering::Relaxed);
        let planned = match cfg.role {
            stallnet_netconf::Role::Edge => stallnet::plan::edge(&cfg).map(|_| ()),
            stallnet_netconf::Role::Hub => stallnet::plan::hub(&cfg).map(|_| ()),
        };
        prop_assert!(
            planned.is_ok(),
            "validated but cannot run: {:?}\n{text}",
            planned.err()
        );
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    accepted.into_inner()
}

#[test]
fn every_edge_config_that_validates_can_start() {
    let ok = every_valid_config_plans(edge(), 6000);
    eprintln!("{ok} of 6000 generated edge configs validated and planned");
    // The generator reaches valid configs often enough for the property to mean something.
    assert!(
        ok >= 30,
        "only {ok} of 6000 generated edge configs validated"
    );
}

#[test]
fn every_hub_config_that_validates_can_start() {
    let ok = every_valid_config_plans(hub(), 2000);
    eprintln!("{ok} of 2000 generated hub configs validated and planned");
    assert!(
        ok >= 50,
        "only {ok} of 2000 generated hub configs validated"
    );
}

/// Regression: a throttled SIM (`max_rate = "256kbit"`, under the default 500 kbit/s
/// floor) validated and then panicked in `f64::clamp` at start (exit 101, a restart loop).
#[test]
fn a_throttled_sim_validates_and_starts() {
    let text = format!(
        "role = \"edge\"\n[edge]\nlan = [\"10.1.0.0/24\"]\nhubs = [{{ address = \"192.0.2.1:4433\", identity = \"{ID}\" }}]\n\
         [[edge.uplinks]]\nname = \"sim\"\ninterface = \"wwan0\"\nkind = \"cellular\"\nmax_rate = \"256kbit\"\n"
    );
    let cfg = stallnet_netconf::parse_str(Path::new("sim.toml"), &text).expect("validates");
    let plan = stallnet::plan::edge(&cfg).expect("plans");
    let rate = &plan.uplinks[0].rate;
    assert_eq!((rate.bounds.min(), rate.bounds.max()), (32_000.0, 32_000.0));
    assert_eq!(plan.uplinks[0].table, 201);
}
