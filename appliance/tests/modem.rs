//! Modem facts from recorded `mmcli` JSON outputs (several modems: an LTE Quectel EC25,
//! a 5G Sierra EM9191 roaming, a Huawei E3372 still searching, a SIM-locked Telit), and
//! through a stand-in `mmcli` program that replays them as ModemManager would (there is
//! no modem on this machine).

use std::path::{Path, PathBuf};

use serde_json::Value;
use stallnet::modem::{self, ModemFacts};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mmcli")
}

fn load(name: &str) -> Value {
    let p = fixtures().join(name);
    serde_json::from_slice(&std::fs::read(&p).expect("fixture")).expect("JSON")
}

#[test]
fn an_lte_modem_reports_operator_technology_and_signal() {
    let doc = load("quectel-ec25-lte.json");
    assert!(modem::serves(&doc, "wwan0"));
    assert!(!modem::serves(&doc, "wwan1"));
    assert!(
        !modem::serves(&doc, "cdc-wdm0"),
        "only the network port counts"
    );
    let mut f = modem::parse_modem(&doc);
    let off = modem::add_signal(&mut f, &load("quectel-ec25-lte-signal.json"));
    assert!(!off, "refresh is on (10 s)");
    assert_eq!(
        f,
        ModemFacts {
            source: "modemmanager".into(),
            model: Some("QUECTEL Mobile Broadband Module".into()),
            state: Some("connected".into()),
            operator: Some("vodafone UK".into()),
            registration: Some("home".into()),
            access_technology: Some("lte".into()),
            signal_quality: Some(67),
            signal_radio: Some("lte".into()),
            rsrp_dbm: Some(-95.0),
            rsrq_db: Some(-11.0),
            sinr_db: Some(10.4),
            unlock_required: None,
        }
    );
    assert_eq!(
        modem::describe(&f),
        "vodafone UK, LTE, RSRP -95 dBm, RSRQ -11 dB, SINR 10.4 dB"
    );
}

#[test]
fn a_5g_modem_reports_the_nr_signal_and_the_best_technology() {
    let mut f = modem::parse_modem(&load("sierra-em9191-5g.json"));
    modem::add_signal(&mut f, &load("sierra-em9191-5g-signal.json"));
    assert_eq!(f.access_technology.as_deref(), Some("5gnr"));
    assert_eq!(f.registration.as_deref(), Some("roaming"));
    assert_eq!(f.operator.as_deref(), Some("Telekom.de"));
    assert_eq!(f.signal_radio.as_deref(), Some("5g"));
    assert_eq!(
        (f.rsrp_dbm, f.rsrq_db, f.sinr_db),
        (Some(-88.0), Some(-10.5), Some(17.0))
    );
}

#[test]
fn missing_fields_are_unknown_not_zero() {
    let mut f = modem::parse_modem(&load("huawei-e3372-searching.json"));
    let off = modem::add_signal(&mut f, &load("huawei-e3372-searching-signal.json"));
    assert!(off, "refresh rate 0: signal polling must be switched on");
    assert_eq!(f.state.as_deref(), Some("searching"));
    assert_eq!(f.operator, None, "operator \"--\" is unknown");
    assert_eq!(f.access_technology, None);
    assert_eq!(f.signal_quality, Some(0));
    assert_eq!(
        (f.signal_radio.as_deref(), f.rsrp_dbm, f.rsrq_db, f.sinr_db),
        (None, None, None, None)
    );
    assert_eq!(modem::describe(&f), "no operator");

    // No 3GPP section at all, SIM waiting for its PIN.
    let f = modem::parse_modem(&load("sim-locked.json"));
    assert_eq!(f.state.as_deref(), Some("locked"));
    assert_eq!(f.unlock_required.as_deref(), Some("sim-pin"));
    assert_eq!(f.registration, None);
    assert_eq!(f.signal_quality, None);
    assert_eq!(modem::describe(&f), "no operator, SIM needs sim-pin");

    // Not JSON from ModemManager at all.
    assert_eq!(
        modem::parse_list(&serde_json::json!({"x": 1})),
        Vec::<String>::new()
    );
    let f = modem::parse_modem(&serde_json::json!({}));
    assert_eq!(f.operator, None);
}

/// A stand-in `mmcli` replaying `modems` (object number, recorded file stem) with a
/// directory of its own; returns the program to run and the directory.
fn standin(modems: &[(u32, &str)]) -> (tempfile_dir::Dir, PathBuf) {
    let dir = tempfile_dir::Dir::new();
    let list: Vec<String> = modems
        .iter()
        .map(|(n, _)| format!("/org/freedesktop/ModemManager1/Modem/{n}"))
        .collect();
    std::fs::write(
        dir.0.join("list.json"),
        serde_json::json!({ "modem-list": list }).to_string(),
    )
    .expect("write");
    for (n, stem) in modems {
        for (suffix, out) in [
            ("", format!("modem{n}.json")),
            ("-signal", format!("modem{n}-signal.json")),
        ] {
            let src = fixtures().join(format!("{stem}{suffix}.json"));
            if src.exists() {
                std::fs::copy(src, dir.0.join(out)).expect("copy");
            }
        }
    }
    let program = dir.0.join("mmcli");
    std::fs::write(
        &program,
        format!(
            "#!/bin/sh\nMMCLI_FIXTURES='{}' exec '{}' \"$@\"\n",
            dir.0.display(),
            fixtures().join("mmcli-standin.sh").display()
        ),
    )
    .expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    (dir, program)
}

mod tempfile_dir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "stallnet-mmcli-{}-{}",
                std::process::id(),
                N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&p).expect("mkdir");
            Self(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[tokio::test]
async fn the_modem_behind_each_interface_is_found_through_mmcli() {
    let (dir, mmcli) = standin(&[(0, "huawei-e3372-searching"), (3, "quectel-ec25-lte")]);
    let f = modem::read_with(&mmcli, "wwan0").await;
    assert_eq!(f.operator.as_deref(), Some("vodafone UK"));
    assert_eq!(f.rsrp_dbm, Some(-95.0));
    let f = modem::read_with(&mmcli, "wwan1").await;
    assert_eq!(f.state.as_deref(), Some("searching"));
    let calls = std::fs::read_to_string(dir.0.join("calls.log")).expect("log");
    assert!(
        calls.contains("-m /org/freedesktop/ModemManager1/Modem/0 --signal-setup=10"),
        "signal polling switched on for the modem that had it off: {calls}"
    );
    assert!(!calls.contains("Modem/3 --signal-setup"), "{calls}");
    // The configured APN goes to the modem that is registered but not connected.
    let mut registered = modem::parse_modem(&load("quectel-ec25-lte.json"));
    assert!(!modem::wants_connect(&registered), "connected already");
    registered.state = Some("registered".into());
    assert!(modem::wants_connect(&registered));
    let locked = modem::parse_modem(&load("sim-locked.json"));
    assert!(
        !modem::wants_connect(&locked),
        "a SIM waiting for its PIN cannot connect"
    );
    modem::connect_with(&mmcli, "wwan0", "internet.example")
        .await
        .expect("connect");
    let calls = std::fs::read_to_string(dir.0.join("calls.log")).expect("log");
    assert!(
        calls.contains(
            "-m /org/freedesktop/ModemManager1/Modem/3 --simple-connect=apn=internet.example"
        ),
        "{calls}"
    );
    assert!(modem::connect_with(&mmcli, "wwan9", "x").await.is_err());
    // No modem on that interface; no modems; no ModemManager at all.
    assert_eq!(
        modem::read_with(&mmcli, "wwan9").await,
        ModemFacts::unknown()
    );
    let (_d, none) = standin(&[]);
    assert_eq!(
        modem::read_with(&none, "wwan0").await,
        ModemFacts::unknown()
    );
    let missing = dir.0.join("no-such-mmcli");
    assert_eq!(
        modem::read_with(&missing, "wwan0").await,
        ModemFacts::unknown()
    );
    assert_eq!(
        modem::describe(&ModemFacts::unknown()),
        "modem: unknown (no ModemManager modem on this interface)"
    );
}
