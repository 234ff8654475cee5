//! End-to-end: `stallnet config` against a real edge in the netns topology: validate,
//! diff, apply with a confirmed commit that rolls back on time (also across a daemon
//! restart), confirm, history, get/set from scripts.

use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result};
use stallnet_tests::topo::{
    bin, uplink_events, wait_for, Options, Topology, UplinkSpec, LAN_CLIENT, SERVER,
};

fn config(t: &Topology, args: &[&str]) -> Result<Output> {
    let live = t.dir.join("edge.toml");
    let mut cmd = Command::new(bin("stallnet"));
    cmd.arg("config").args(args);
    // Commands that act on the running config are pointed at the edge's file.
    if !matches!(args.first(), Some(&"validate")) {
        cmd.arg("--config").arg(&live);
    }
    Ok(cmd.output()?)
}

fn ok_json(out: &Output) -> Result<serde_json::Value> {
    anyhow::ensure!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[test]
fn apply_rolls_back_unless_confirmed_also_across_a_restart() -> Result<()> {
    let mut t = Topology::build(
        vec![UplinkSpec::wifi(), UplinkSpec::cell()],
        Options::default(),
    )?;
    t.start()?;
    let live = t.dir.join("edge.toml");
    let original = std::fs::read_to_string(&live)?;
    let changed = format!("{original}\n[edge.classes.guest]\nmax_rate = \"3mbit\"\n");
    let new = t.dir.join("new.toml");
    std::fs::write(&new, &changed)?;
    let bad = t.dir.join("bad.toml");
    std::fs::write(
        &bad,
        format!("{original}\n[edge.classes.guest]\nmax_rate = \"fast\"\n"),
    )?;

    // validate: several files, all errors, exit 1, JSON on stdout for scripts.
    let out = config(
        &t,
        &[
            "validate",
            new.to_str().context("p")?,
            bad.to_str().context("p")?,
            "--json",
        ],
    )?;
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(doc["valid"], false);
    let e = &doc["errors"][0];
    assert!(
        e["file"].as_str().unwrap_or("").ends_with("bad.toml"),
        "{doc}"
    );
    assert!(
        e["line"].as_u64().is_some() && e["path"] == "edge.classes.guest.max_rate",
        "{doc}"
    );

    // diff: the one field.
    let d = ok_json(&config(
        &t,
        &["diff", new.to_str().context("p")?, "--json"],
    )?)?;
    let paths: Vec<&str> = d["changes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["path"].as_str())
        .collect();
    assert_eq!(paths, ["edge.classes.guest.max_rate"], "{d}");

    // apply with a 3 s window, not confirmed: the daemon restores the previous revision.
    let a = ok_json(&config(
        &t,
        &[
            "apply",
            new.to_str().context("p")?,
            "--confirm",
            "3",
            "-m",
            "guest cap",
            "--json",
        ],
    )?)?;
    assert_eq!(
        (a["revision"].as_u64(), a["previous"].as_u64()),
        (Some(2), Some(1)),
        "{a}"
    );
    assert_eq!(std::fs::read_to_string(&live)?, changed);
    let refused = config(&t, &["apply", new.to_str().context("p")?, "--json"])?;
    assert_eq!(
        refused.status.code(),
        Some(1),
        "a second apply waits for the first"
    );
    wait_for(Duration::from_secs(8), || {
        Ok(std::fs::read_to_string(&live)? == original)
    })?;
    let h = ok_json(&config(&t, &["history", "--json"])?)?;
    assert_eq!(h["active"], 1, "{h}");
    assert!(h["pending"].is_null(), "{h}");
    let ev = Command::new(bin("stallnet"))
        .args(["events", "--json", "--runtime-dir"])
        .arg(t.dir.join("edge-run"))
        .output()?;
    let ev: serde_json::Value = serde_json::from_slice(&ev.stdout)?;
    assert!(
        ev["events"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["kind"] == "config_rolled_back"),
        "{ev}"
    );

    // apply and confirm: it stays; diff is then empty.
    ok_json(&config(
        &t,
        &[
            "apply",
            new.to_str().context("p")?,
            "--confirm",
            "3",
            "--json",
        ],
    )?)?;
    ok_json(&config(&t, &["confirm", "--json"])?)?;
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(std::fs::read_to_string(&live)?, changed);
    let d = ok_json(&config(
        &t,
        &["diff", live.to_str().context("p")?, "--json"],
    )?)?;
    assert_eq!(d["changes"].as_array().map(Vec::len), Some(0), "{d}");

    // Scripts: set applies a field (comments and layout kept), get reads it back.
    ok_json(&config(
        &t,
        &[
            "set",
            "edge.classes.guest.weight=3",
            "--confirm",
            "0",
            "--json",
        ],
    )?)?;
    let g = ok_json(&config(
        &t,
        &["get", "edge.classes.guest.weight", "--json"],
    )?)?;
    assert_eq!(g["value"], "3");
    let bad_set = config(&t, &["set", "edge.mtu=tiny", "--json"])?;
    assert_eq!(bad_set.status.code(), Some(1), "an invalid edit is refused");
    let g = ok_json(&config(
        &t,
        &["get", "edge.classes.guest.weight", "--json"],
    )?)?;
    assert_eq!(g["value"], "3", "nothing changed by the refused edit");

    // Rules apply in place, without a restart: a new flow to port 7009 meets the new rule
    // (before it, such a flow is not `guest`).
    t.start_echo(7009)?;
    let flow_class = |t: &Topology| -> Result<Option<String>> {
        let out = Command::new(bin("stallnet"))
            .args(["flows", "--json", "--runtime-dir"])
            .arg(t.dir.join("edge-run"))
            .output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["flows"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|f| f["flow"].as_str().is_some_and(|s| s.contains(":7009")))
            .and_then(|f| f["class"].as_str().map(str::to_string)))
    };
    t.udp_flow(LAN_CLIENT, 7009, 20, 1.0)?;
    let before = flow_class(&t)?.context("the flow is listed")?;
    assert_ne!(before, "guest");
    let pid = t.pid("edge");
    let ruled = t.dir.join("ruled.toml");
    std::fs::write(
        &ruled,
        format!(
            "{}\n[[edge.rules]]\nclass = \"guest\"\ndst = [\"{SERVER}/32\"]\ndst_port = [\"7009\"]\n",
            std::fs::read_to_string(&live)?
        ),
    )?;
    let r = ok_json(&config(
        &t,
        &[
            "apply",
            ruled.to_str().context("p")?,
            "--confirm",
            "0",
            "--json",
        ],
    )?)?;
    assert!(!r.to_string().contains("need a restart"), "{r}");
    // The old flow keeps its class until it idles out; wait for that, then a new one.
    wait_for(Duration::from_secs(90), || {
        t.udp_flow(LAN_CLIENT, 7009, 20, 0.5)?;
        Ok(flow_class(&t)?.as_deref() == Some("guest"))
    })
    .context("a new flow meets the new rule")?;
    assert_eq!(t.pid("edge"), pid, "no restart");

    // Across a restart: apply, stop the daemon at once, let the deadline pass, start it:
    // the previous revision is back before the config is read.
    let before = std::fs::read_to_string(&live)?;
    let third = t.dir.join("third.toml");
    std::fs::write(
        &third,
        format!("{before}\n[edge.classes.bulk]\nweight = 5\n"),
    )?;
    ok_json(&config(
        &t,
        &[
            "apply",
            third.to_str().context("p")?,
            "--confirm",
            "2",
            "--json",
        ],
    )?)?;
    t.stop("edge");
    std::thread::sleep(Duration::from_secs(3));
    assert_ne!(
        std::fs::read_to_string(&live)?,
        before,
        "nobody rolled back while stopped"
    );
    t.start_edge()?;
    wait_for(Duration::from_secs(5), || {
        Ok(std::fs::read_to_string(&live)? == before)
    })?;
    let h = ok_json(&config(&t, &["history", "--json"])?)?;
    assert!(h["pending"].is_null(), "{h}");
    assert!(t.log("edge").contains("was not confirmed in time"));
    Ok(())
}

/// The third uplink of [`uplinks_and_hubs_change_without_a_restart`].
fn wired() -> UplinkSpec {
    UplinkSpec {
        name: "wired",
        kind: "ethernet",
        rate_kbit: 20_000,
        delay_ms: 5.0,
        queue_ms: 100,
    }
}

/// The `[[edge.uplinks]]` table the topology writes for uplink `name`.
fn block(t: &Topology, name: &str) -> Result<String> {
    let (i, u) = t
        .uplinks
        .iter()
        .enumerate()
        .find(|(_, u)| u.name == name)
        .context("no such uplink")?;
    Ok(format!(
        "[[edge.uplinks]]\nname = \"{name}\"\ninterface = \"wan{}\"\nkind = \"{}\"\n",
        i + 1,
        u.kind
    ))
}

/// (fwmark rules, the routes in tables other than main and local).
fn uplink_tables(t: &Topology) -> Result<(usize, String)> {
    let rules = t.exec("edge", &["ip", "rule"])?;
    let rules = String::from_utf8_lossy(&rules.stdout).to_string();
    let fwmark = rules.lines().filter(|l| l.contains("fwmark")).count();
    let routes = t.exec("edge", &["ip", "route", "show", "table", "all"])?;
    let routes = String::from_utf8_lossy(&routes.stdout)
        .lines()
        .filter(|l| l.contains(" table ") && !l.contains("table local"))
        .collect::<Vec<_>>()
        .join("\n");
    Ok((fwmark, routes))
}

/// (name, state, backup) of every link of the status's bonds.
fn links(s: &serde_json::Value) -> Vec<(String, String, bool)> {
    s["bonds"]
        .as_object()
        .into_iter()
        .flat_map(|b| b.values())
        .flat_map(|b| b["links"].as_array().cloned().unwrap_or_default())
        .map(|l| {
            (
                l["name"].as_str().unwrap_or("").to_string(),
                l["state"].as_str().unwrap_or("").to_string(),
                l["backup"] == true,
            )
        })
        .collect()
}

/// Runs a 6 s UDP flow (100 packets/s) and calls `change` after 2 s; the flow's summary.
fn flow_across(
    t: &Topology,
    port: u16,
    change: impl FnOnce() -> Result<()>,
) -> Result<serde_json::Value> {
    std::thread::scope(|s| {
        let flow = s.spawn(move || t.udp_flow(LAN_CLIENT, port, 100, 6.0));
        std::thread::sleep(Duration::from_secs(2));
        let changed = change();
        let flow = flow
            .join()
            .map_err(|_| anyhow::anyhow!("flow thread panicked"))?;
        changed?;
        flow
    })
}

fn assert_whole(flow: &serde_json::Value, what: &str) {
    let sent = flow["sent"].as_u64().unwrap_or(0);
    let lost = flow["lost"].as_u64().unwrap_or(u64::MAX);
    assert!(sent >= 500, "{what}: {flow}");
    assert!(lost * 100 <= sent, "{what}: at most 1 % lost: {flow}");
}

/// Uplinks and hubs change under a running daemon: the uplink carrying a flow is removed
/// (tunnel, table and rule go) and the flow goes on elsewhere; one retuned (primary →
/// backup) keeps carrying until the hub has heard it; one added comes up; one whose
/// interface-level settings change is replaced alone; a hub that is no longer trusted
/// drops the tunnel and the right one brings it back. The daemon never restarts.
#[test]
fn uplinks_and_hubs_change_without_a_restart() -> Result<()> {
    let mut t = Topology::build(
        vec![UplinkSpec::wifi(), UplinkSpec::cell(), wired()],
        Options::default(),
    )?;
    t.start()?;
    t.start_echo(7011)?;
    let pid = t.pid("edge");
    let live = t.dir.join("edge.toml");
    let original = std::fs::read_to_string(&live)?;
    for u in ["wifi", "cell", "wired"] {
        anyhow::ensure!(original.contains(&block(&t, u)?), "config shape changed");
    }
    let (fwmark, routes) = uplink_tables(&t)?;
    assert_eq!(fwmark, 3, "one fwmark rule per uplink");
    assert_eq!(
        routes.lines().count(),
        4,
        "the tunnel's table and one per uplink: {routes}"
    );
    let apply = |text: &str, name: &str| -> Result<()> {
        let f = t.dir.join(name);
        std::fs::write(&f, text)?;
        let r = ok_json(&config(
            &t,
            &[
                "apply",
                f.to_str().context("p")?,
                "--confirm",
                "0",
                "--json",
            ],
        )?)?;
        eprintln!("{name}: {r}");
        assert!(!r.to_string().contains("need a restart"), "{r}");
        Ok(())
    };

    // 1. The uplink carrying most of a flow is removed and another made a backup,
    // mid-flow.
    let tx = |t: &Topology| -> Result<Vec<(String, u64)>> {
        Ok(t.status("edge")?["bonds"]["hub"]["links"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| {
                (
                    l["name"].as_str().unwrap_or("").to_string(),
                    l["tx_packets"].as_u64().unwrap_or(0),
                )
            })
            .collect())
    };
    let before = tx(&t)?;
    let probe = t.udp_flow(LAN_CLIENT, 7011, 100, 1.0)?;
    anyhow::ensure!(probe["received"].as_u64() > Some(0), "{probe}");
    std::thread::sleep(Duration::from_millis(600));
    let carrier = tx(&t)?
        .into_iter()
        .map(|(n, after)| {
            let was = before.iter().find(|(b, _)| *b == n).map_or(0, |b| b.1);
            (after.saturating_sub(was), n)
        })
        .max()
        .map(|(_, n)| n)
        .context("no links")?;
    let kept: Vec<&str> = ["wifi", "cell", "wired"]
        .into_iter()
        .filter(|n| *n != carrier)
        .collect();
    let (backup, other) = (kept[0], kept[1]);
    let first = original.replace(&block(&t, &carrier)?, "").replace(
        &block(&t, backup)?,
        &format!("{}priority = \"backup\"\n", block(&t, backup)?),
    );
    let flow = flow_across(&t, 7011, || apply(&first, "first.toml"))?;
    eprintln!("flow across removing {carrier}, the uplink it used: {flow}");
    assert_whole(&flow, "removing the flow's uplink");
    let s = t.wait_status("edge", Duration::from_secs(10), |s| {
        let l = links(s);
        l.len() == 2
            && l.contains(&(backup.into(), "up".into(), true))
            && l.contains(&(other.into(), "up".into(), false))
    })?;
    assert_eq!(s["state"], "online", "{s}");
    // The hub heard it: the removed uplink's link is gone, the backup is one.
    t.wait_status("hub", Duration::from_secs(10), |s| {
        let l = links(s);
        l.iter().any(|(n, _, b)| n == backup && *b) && !l.iter().any(|(n, _, _)| *n == carrier)
    })?;
    let (fwmark, routes) = uplink_tables(&t)?;
    assert_eq!(fwmark, 2, "the removed uplink's rule is gone");
    assert_eq!(routes.lines().count(), 3, "its table is empty: {routes}");

    // 2. It comes back, the backup is primary again (retuned), and the third uplink's
    // gateway is set (an interface-level change: that uplink alone is replaced) —
    // again mid-flow.
    let gw = format!(
        "{}gateway = \"100.64.{}.1\"\n",
        block(&t, other)?,
        ["wifi", "cell", "wired"]
            .iter()
            .position(|n| *n == other)
            .map_or(0, |i| i + 1)
    );
    let second = original.replace(&block(&t, other)?, &gw);
    let flow = flow_across(&t, 7011, || apply(&second, "second.toml"))?;
    eprintln!("flow across adding {carrier} and replacing {other}: {flow}");
    assert_whole(&flow, "adding and replacing uplinks");
    t.wait_status("edge", Duration::from_secs(15), |s| {
        let l = links(s);
        l.len() == 3 && l.iter().all(|(_, st, backup)| st == "up" && !backup)
    })?;
    assert_eq!(uplink_tables(&t)?.0, 3);
    for (kind, uplink) in [
        ("uplink_removed", carrier.as_str()),
        ("uplink_retuned", backup),
        ("uplink_added", carrier.as_str()),
        ("uplink_replaced", other),
    ] {
        let ev = uplink_events(&t, uplink)?;
        assert!(
            ev.iter().any(|k| k == kind),
            "{kind} for {uplink} in {ev:?}"
        );
    }

    // 3. A hub identity the edge does not know: every tunnel closes (the edge trusts the
    // hub no more); the right one back: online again.
    let wrong = t.edge_id.clone();
    anyhow::ensure!(wrong != t.hub_id, "two identities");
    apply(&second.replace(&t.hub_id, &wrong), "third.toml")?;
    t.wait_status("edge", Duration::from_secs(10), |s| s["state"] == "offline")?;
    apply(&second, "fourth.toml")?;
    t.wait_status("edge", Duration::from_secs(15), |s| {
        s["state"] == "online" && links(s).iter().all(|(_, st, _)| st == "up")
    })?;
    let flow = t.udp_flow(LAN_CLIENT, 7011, 100, 2.0)?;
    assert_eq!(flow["lost"], 0, "{flow}");
    assert_eq!(t.pid("edge"), pid, "no restart");
    Ok(())
}
