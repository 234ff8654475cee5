//! Snapshot tests of every screen state (online, degraded, offline with a backlog, the
//! daemon missing, the help overlay, a confirmation) at 80×24 and 120×40, drawn with
//! ratatui's TestBackend from status documents shaped like the control API's.

use std::time::Duration;

use serde_json::{json, Value};
use stallnet_tui::model::Model;
use stallnet_tui::render_text;
use stallnet_tui::view::Ui;

fn link(name: &str, kind: &str, state: &str, rtt: Option<f64>, bytes: u64) -> Value {
    json!({ "name": name, "kind": kind, "state": state, "degraded": false, "rtt_ms": rtt,
            "jitter_ms": 2.0, "loss": 0.0, "tx_bytes": bytes, "rx_bytes": 3 * bytes,
            "backup": false, "preferred": false })
}

fn class(name: &str, bytes: u64, p99: f64) -> Value {
    json!({ "class": name, "packets": bytes / 100, "bytes": bytes, "delay_p99_ms": p99,
            "dropped_full": 0, "dropped_codel": 0, "dropped_sojourn": 0, "idle_ms": 4200 })
}

fn status(state: &str, links: Vec<Value>, step: u64, commerce: Value) -> Value {
    json!({
        "version": 1, "role": "edge", "state": state, "fallback_active": false,
        "uptime_s": 8000, "peer": "203.0.113.10:4433", "clock": "synced",
        "bonds": { "hub": {
            "links": links,
            "classes": [
                class("pos", 2_000 * step, 22.0),
                class("stream", 500_000 * step, 35.0),
                class("interactive", 10_000 * step, 25.0),
                class("bulk", 1_500_000 * step, 80.0),
                class("guest", 50_000 * step, 90.0),
            ],
        }},
        "commerce": commerce,
    })
}

fn events(m: &mut Model, list: &[(&str, &str)]) {
    let evs: Vec<Value> = list
        .iter()
        .enumerate()
        .map(|(i, (level, msg))| {
            json!({ "seq": i + 1, "at_ms": 1_795_000_000_000i64 + i as i64 * 61_000,
                    "level": level, "kind": "x", "message": msg })
        })
        .collect();
    m.add_events(&json!({ "version": 1, "events": evs }));
}

/// Two polls a second apart: rates come from the byte counters' change.
fn model(state: &str, links: impl Fn(u64) -> Vec<Value>, commerce: Value) -> Model {
    let mut m = Model::default();
    m.update(
        &status(state, links(1), 1, commerce.clone()),
        Duration::from_secs(100),
    );
    // Offline, nothing moves.
    let second = if state == "offline" { 1 } else { 2 };
    m.update(
        &status(state, links(second), second, commerce),
        Duration::from_secs(101),
    );
    m
}

fn online() -> Model {
    let mut m = model(
        "online",
        |s| {
            vec![
                link("wifi", "wifi", "up", Some(21.3), 400_000 * s),
                link("cell", "cellular", "up", Some(48.9), 150_000 * s),
            ]
        },
        json!({ "online": true, "undelivered": 0, "dead_letters": 0 }),
    );
    events(
        &mut m,
        &[
            ("info", "stallnet edge started"),
            ("info", "the hub is reachable"),
        ],
    );
    m
}

fn degraded() -> Model {
    let mut m = model(
        "degraded",
        |s| {
            let mut cell = link("cell", "cellular", "up", Some(52.0), 300_000 * s);
            cell["cap"] =
                json!({ "used_bytes": 16_400_000_000u64, "limit_bytes": 20_000_000_000u64 });
            vec![link("wifi", "wifi", "down", None, 400_000), cell]
        },
        json!({ "online": true, "undelivered": 3, "oldest_undelivered_age_s": 40, "dead_letters": 0 }),
    );
    events(
        &mut m,
        &[
            ("info", "the hub is reachable"),
            ("warning", "wifi is down"),
        ],
    );
    m
}

fn offline() -> Model {
    let mut m = model(
        "offline",
        |_| {
            vec![
                link("wifi", "wifi", "down", None, 400_000),
                link("cell", "cellular", "disabled", None, 300_000),
            ]
        },
        json!({ "online": false, "undelivered": 12,
                "oldest_undelivered_age_s": 2 * 3600 + 13 * 60, "dead_letters": 0 }),
    );
    events(
        &mut m,
        &[
            (
                "warning",
                "cell is disabled until `stallnet uplink enable cell` or a restart",
            ),
            ("warning", "wifi is down"),
            (
                "critical",
                "offline: no uplink reaches the hub; sales are kept on the box",
            ),
        ],
    );
    m
}

/// Offline with the SD card full: new sales are refused.
fn storage_full() -> Model {
    model(
        "offline",
        |_| vec![link("wifi", "wifi", "down", None, 400_000)],
        json!({ "online": false, "undelivered": 3, "oldest_undelivered_age_s": 600,
                "dead_letters": 0, "storage": { "ok": false, "free_bytes": 1_000_000 } }),
    )
}

fn missing() -> Model {
    let mut m = Model::default();
    m.unreachable("No such file or directory (os error 2)".into());
    m
}

fn ui() -> Ui {
    Ui {
        socket: "/run/stallnet/control.sock".into(),
        ..Ui::default()
    }
}

#[test]
fn every_state_at_both_sizes() {
    for (name, m) in [
        ("online", online()),
        ("degraded", degraded()),
        ("offline_backlog", offline()),
        ("daemon_missing", missing()),
    ] {
        for (w, h) in [(80, 24), (120, 40)] {
            insta::assert_snapshot!(format!("{name}_{w}x{h}"), render_text(&m, &ui(), w, h));
        }
    }
}

#[test]
fn overlays_and_the_console_font() {
    let help = Ui { help: true, ..ui() };
    insta::assert_snapshot!("help_80x24", render_text(&online(), &help, 80, 24));
    let confirm = Ui {
        confirm: Some(("disable".into(), "wifi".into())),
        ..ui()
    };
    insta::assert_snapshot!("confirm_80x24", render_text(&online(), &confirm, 80, 24));
    let ascii = Ui {
        ascii: true,
        ..ui()
    };
    let text = render_text(&online(), &ascii, 120, 40);
    assert!(
        !text.contains(['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█']),
        "the Linux console font has no bar glyphs:\n{text}"
    );
}

#[test]
fn the_words_say_it_without_colour() {
    assert!(render_text(&online(), &ui(), 80, 24).contains("(+) ONLINE"));
    assert!(render_text(&degraded(), &ui(), 80, 24).contains("(!) DEGRADED"));
    let off = render_text(&offline(), &ui(), 80, 24);
    assert!(off.contains("(X) OFFLINE"));
    assert!(off.contains("12 sales saved on this box"), "{off}");
    assert!(render_text(&missing(), &ui(), 80, 24).contains("stallnet is not running, retrying"));
    let full = render_text(&storage_full(), &ui(), 80, 24);
    assert!(full.contains("STORAGE FULL"), "{full}");
    assert!(!off.contains("STORAGE FULL"), "{off}");
}

/// A hub with three stalls, one of them offline: the fleet view lists it first.
fn hub_fleet() -> Model {
    let bond = |s: u64, cell: &str| {
        json!({
            "links": [
                link("wifi", "wifi", "up", Some(21.3), 400_000 * s),
                link("cell", "cellular", cell, Some(48.9), 150_000 * s),
            ],
            "classes": [class("pos", 2_000 * s, 22.0), class("bulk", 1_500_000 * s, 80.0)],
            "online": true,
        })
    };
    let doc = |s: u64| {
        json!({
            "version": 1, "role": "hub", "state": "online", "fallback_active": false,
            "uptime_s": 90_000, "clock": "synced",
            "bonds": { "fish": { "links": [], "classes": [], "online": false },
                       "bread": bond(s, "down"), "flowers": bond(s, "up") },
            "stalls": [
                { "name": "fish", "state": "offline", "last_heard_s": 300, "uplinks": [],
                  "sales_waiting": 12 },
                { "name": "bread", "state": "degraded", "last_heard_s": 0, "sales_waiting": 0,
                  "uplinks": [ { "name": "wifi", "state": "up" }, { "name": "cell", "state": "down" } ] },
                { "name": "flowers", "state": "online", "last_heard_s": 0,
                  "uplinks": [ { "name": "wifi", "state": "up" }, { "name": "cell", "state": "up" } ] },
            ],
        })
    };
    let mut m = Model::default();
    m.focus(Some("bread".into()));
    m.update(&doc(1), Duration::from_secs(100));
    m.update(&doc(2), Duration::from_secs(101));
    events(
        &mut m,
        &[
            ("info", "device bread enrolled"),
            ("warning", "device fish: lost (no uplink reaches the hub)"),
        ],
    );
    m
}

#[test]
fn a_hub_shows_its_fleet_offline_first() {
    let m = hub_fleet();
    let ui = Ui {
        selected: 1,
        ..Ui::default()
    };
    let text = render_text(&m, &ui, 80, 24);
    let fish = text
        .lines()
        .position(|l| l.contains("fish"))
        .unwrap_or(usize::MAX);
    let flowers = text
        .lines()
        .position(|l| l.contains("flowers"))
        .unwrap_or(0);
    assert!(fish < flowers, "{text}");
    assert!(
        text.contains("x offline") && text.contains("5 min ago"),
        "{text}"
    );
    assert!(text.contains("Uplinks of bread"), "{text}");
    // Sales waiting per stall; a stall whose box reports none shows a dash.
    let row = |name: &str| text.lines().find(|l| l.contains(name)).unwrap_or("");
    assert!(row("fish").contains(" 12 "), "{text}");
    assert!(row("bread").contains(" 0 "), "{text}");
    assert!(row("flowers").contains(" - "), "{text}");
    insta::assert_snapshot!("hub_fleet_80x24", text);
}
