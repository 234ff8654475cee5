//! `docs/CONFIG.md` is generated from the config's types: it must match them.

#[test]
fn the_config_reference_matches_the_code() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/CONFIG.md");
    let want = stallnet_netconf::docs::config_md();
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "docs/CONFIG.md is out of date: run `stallnet config docs > docs/CONFIG.md`"
    );
}

#[test]
fn the_json_schema_describes_every_section() {
    let s = stallnet_netconf::docs::json_schema();
    for top in ["role", "edge", "hub", "commerce", "metrics", "lan"] {
        assert!(s["properties"][top].is_object(), "{top} missing");
    }
    let defs = s["$defs"].as_object().expect("defs");
    for d in [
        "EdgeConfig",
        "Uplink",
        "LanConfig",
        "Segment",
        "Rule",
        "Upstream",
        "Rate",
    ] {
        assert!(defs.contains_key(d), "{d} missing");
    }
}

#[test]
fn every_example_config_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("docs/examples") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            if let Err(e) = stallnet_netconf::load_file(&path) {
                panic!("{} does not validate:\n{e}", path.display());
            }
            seen += 1;
        }
    }
    assert!(seen >= 2, "only {seen} examples");
}
