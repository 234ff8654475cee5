//! End-to-end: `stallnet config` against a real edge in the netns topology: validate,
//! diff, apply with a confirmed commit that rolls back on time (also across a daemon
//! restart), confirm, history, get/set from scripts.

use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result};
use stallnet_tests::topo::{bin, wait_for, Options, Topology, UplinkSpec, LAN_CLIENT, SERVER};

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
