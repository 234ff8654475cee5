//! The `stallnet` command as a field tech meets it: identities, config checks, refusals.
//! No root needed.

use std::process::Command;

use anyhow::Result;
use stallnet_tests::topo::bin;

fn stallnet(args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new(bin("stallnet")).args(args).output()?)
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("stallnet-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tmp dir");
    d
}

#[test]
fn keygen_then_id_prints_the_same_identity() -> Result<()> {
    let d = tmp("id");
    let state = d.join("state");
    let state = state.to_str().expect("utf-8");
    let k = stallnet(&["keygen", "--state-dir", state])?;
    assert!(k.status.success(), "{k:?}");
    let id = stallnet(&["id", "--state-dir", state, "--json"])?;
    let doc: serde_json::Value = serde_json::from_slice(&id.stdout)?;
    assert_eq!(
        doc["identity"].as_str(),
        Some(String::from_utf8(k.stdout)?.trim())
    );
    // A second keygen refuses to change the identity silently.
    let again = stallnet(&["keygen", "--state-dir", state])?;
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    Ok(())
}

#[test]
fn a_bad_config_is_refused_with_positions_and_nothing_starts() -> Result<()> {
    let d = tmp("bad");
    let f = d.join("stall.toml");
    std::fs::write(
        &f,
        "role = \"edge\"\n[edge]\nlan = [\"10.1.0.0/24\"]\nhubs = []\nmtu = 100\n[[edge.uplinks]]\nname = \"wifi\"\ninterface = \"wan0\"\nkind = \"wifi\"\n",
    )?;
    let path = f.to_str().expect("utf-8");
    let check = stallnet(&["check", path, "--json"])?;
    assert_eq!(check.status.code(), Some(2));
    let doc: serde_json::Value = serde_json::from_slice(&check.stdout)?;
    let paths: Vec<&str> = doc["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["path"].as_str())
        .collect();
    assert_eq!(paths, ["edge.hubs", "edge.mtu"], "{doc}");
    let run = stallnet(&["run", "--config", path])?;
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        // At the field itself (line 4, `hubs = []`), not at its table's header.
        err.contains(&format!("{path}:4:1: edge.hubs: expected at least one hub")),
        "{err}"
    );
    // A typo is a parse error with its line and column.
    std::fs::write(&f, "role = \"edge\"\nstate_dri = \"/tmp\"\n")?;
    let run = stallnet(&["run", "--config", path])?;
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains(&format!("{path}:2:1:")) && err.contains("unknown field `state_dri`"),
        "{err}"
    );
    Ok(())
}

#[test]
fn status_without_a_daemon_says_so() -> Result<()> {
    let d = tmp("status");
    let out = stallnet(&["status", "--runtime-dir", d.to_str().expect("utf-8")])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stallnet is not running"));
    // Scripts get the error as JSON on stderr, nothing on stdout, and a failure exit.
    let out = stallnet(&[
        "uplinks",
        "--json",
        "--runtime-dir",
        d.to_str().expect("utf-8"),
    ])?;
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err: serde_json::Value = serde_json::from_slice(&out.stderr)?;
    assert_eq!(err["version"], 1);
    assert_eq!(err["error"]["code"], "not_running");
    Ok(())
}

/// The client commands find the daemon the way `stallnet run --config` placed it: from
/// the config's `runtime_dir`; and the first key of a device is made from a config that
/// cannot validate yet (it lacks the hub's identity, which needs the hub's key first).
#[test]
fn commands_find_the_daemon_and_the_state_from_the_config() -> Result<()> {
    let d = tmp("by-config");
    let run_dir = d.join("elsewhere-run");
    let state = d.join("elsewhere-state");
    let f = d.join("stall.toml");
    std::fs::write(
        &f,
        format!(
            "role = \"edge\"\nstate_dir = \"{}\"\nruntime_dir = \"{}\"\n[edge]\nlan = [\"10.1.0.0/24\"]\n",
            state.display(),
            run_dir.display()
        ),
    )?;
    let path = f.to_str().expect("utf-8");
    let out = stallnet(&["status", "--config", path])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}", run_dir.join("control.sock").display())),
        "looked elsewhere: {err}"
    );
    let k = stallnet(&["keygen", "--config", path])?;
    assert!(k.status.success(), "{}", String::from_utf8_lossy(&k.stderr));
    assert!(state.join("device.key").exists() || std::fs::read_dir(&state)?.count() > 0);
    Ok(())
}

#[test]
fn receipts_verify_offline_and_tampering_is_reported() -> Result<()> {
    use ring::signature::{Ed25519KeyPair, KeyPair};
    use stallnet::commerce::model::{Order, Receipt};
    use stallnet::commerce::receipt;
    let d = tmp("receipts");
    let doc = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
        .map_err(|_| anyhow::anyhow!("keygen"))?;
    let key = Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|_| anyhow::anyhow!("key"))?;
    let pk = hex::encode(key.public_key().as_ref());
    let mut chain: Vec<Receipt> = Vec::new();
    for i in 1..=4u64 {
        let prev = chain
            .last()
            .map_or(receipt::GENESIS.to_string(), receipt::hash);
        let order = Order {
            order_id: format!("o{i}"),
            client: "till".into(),
            cart_id: format!("c{i}"),
            cart_version: 1,
            currency: "EUR".into(),
            items: vec![],
            total: 500,
            payment: "cash".into(),
            created_at: 1_700_000_000,
        };
        chain.push(receipt::sign(&key, i, &prev, order));
    }
    let good = d.join("good.json");
    std::fs::write(&good, serde_json::to_vec(&chain)?)?;
    let out = stallnet(&[
        "verify-receipts",
        good.to_str().unwrap_or(""),
        "--public-key",
        &pk,
    ])?;
    assert!(out.status.success(), "{out:?}");
    // A missing receipt and an edited total.
    chain.remove(1);
    chain[1].order.total = 1;
    let bad = d.join("bad.json");
    std::fs::write(&bad, serde_json::to_vec(&chain)?)?;
    let out = stallnet(&[
        "verify-receipts",
        bad.to_str().unwrap_or(""),
        "--public-key",
        &pk,
        "--json",
    ])?;
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let errors = v["errors"].to_string();
    assert!(
        errors.contains("gap") && errors.contains("bad signature"),
        "{v}"
    );
    // A key that is not an Ed25519 public key is refused, not taken to verify nothing.
    let empty = d.join("empty.json");
    std::fs::write(&empty, "[]")?;
    let out = stallnet(&[
        "verify-receipts",
        empty.to_str().unwrap_or(""),
        "--public-key",
        "00",
    ])?;
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("64 hex digits"),
        "{out:?}"
    );
    // Keys are configured by their hash.
    let out = stallnet(&["hash-key", "till-1-secret-key-0123456789"])?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ea3ead670e15fc93d299c1c33a258df4bc9ea135cb4f44d06d3a034914966531"
    );
    let _ = std::fs::remove_dir_all(&d);
    Ok(())
}

/// Eight techs apply at once: the applies run one after another (a lock on the live
/// config), each gets its own revision with exactly its text, and the live file is the
/// active revision. Before the lock, 5 of 8 failed with "No such file" and two reported
/// the same revision number.
#[test]
fn parallel_applies_are_serialized_and_none_is_lost() -> Result<()> {
    let d = tmp("parallel-apply");
    let live = d.join("stallnet.toml");
    let base = |device: &str| {
        format!(
            "role = \"edge\"\ndevice = \"{device}\"\nstate_dir = \"{s}\"\nruntime_dir = \"{r}\"\n[edge]\n\
             lan = [\"10.1.0.0/24\"]\nfallback = \"direct\"\n[[edge.uplinks]]\nname = \"wifi\"\n\
             interface = \"wan0\"\nkind = \"wifi\"\n",
            s = d.join("state").display(),
            r = d.join("run").display()
        )
    };
    std::fs::write(&live, base("stall-0"))?;
    let mut texts = Vec::new();
    for i in 1..=8 {
        let f = d.join(format!("new-{i}.toml"));
        let t = base(&format!("stall-{i}"));
        std::fs::write(&f, &t)?;
        texts.push(t);
    }
    let live_s = live.to_str().expect("utf-8").to_string();
    let handles: Vec<_> = (1..=8)
        .map(|i| {
            let f = d.join(format!("new-{i}.toml"));
            let live_s = live_s.clone();
            std::thread::spawn(move || {
                stallnet(&[
                    "config",
                    "apply",
                    f.to_str().expect("utf-8"),
                    "--config",
                    &live_s,
                    "--confirm",
                    "0",
                ])
            })
        })
        .collect();
    for h in handles {
        let out = h.join().map_err(|_| anyhow::anyhow!("apply thread"))??;
        assert!(
            out.status.success(),
            "an apply failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let h = stallnet(&["config", "history", "--config", &live_s, "--json"])?;
    let doc: serde_json::Value = serde_json::from_slice(&h.stdout)?;
    let revs = doc["revisions"].as_array().cloned().unwrap_or_default();
    assert_eq!(revs.len(), 9, "the import and eight applies: {doc}");
    let sums: std::collections::HashSet<String> = revs
        .iter()
        .filter_map(|r| r["sha256"].as_str().map(str::to_string))
        .collect();
    for t in &texts {
        let sum = hex::encode(ring::digest::digest(&ring::digest::SHA256, t.as_bytes()));
        assert!(
            sums.contains(&sum),
            "an applied config has no revision: {doc}"
        );
    }
    // The live file is the active revision.
    let active = doc["active"].as_u64().expect("active");
    let shown = stallnet(&["config", "get", "device", "--config", &live_s])?;
    let device = String::from_utf8_lossy(&shown.stdout).trim().to_string();
    let active_rev = revs
        .iter()
        .find(|r| r["number"].as_u64() == Some(active))
        .expect("active listed");
    let live_sum = hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        std::fs::read_to_string(&live)?.as_bytes(),
    ));
    assert_eq!(
        active_rev["sha256"].as_str(),
        Some(live_sum.as_str()),
        "{device}"
    );
    Ok(())
}
