//! Configuring a box by writing its SD card on a laptop: a `stallnet.toml` found on the
//! boot partition at start-up is validated, imported as a revision (the running config
//! before it is kept as one too), and renamed so it is not imported twice. A bad file is
//! left where it is, with `stallnet.toml.error.txt` beside it saying what is wrong (every
//! error with its line and column), and the running config is untouched.
//!
//! The file may also carry an invite code, `enroll = "SN-…"`, on its own or beside a
//! whole config: the code is checked here (a typo is refused like any error, with its
//! line and column), kept for the edge to redeem ([`crate::enroll::pending`]), and the
//! rest imported as above.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use stallnet_netconf::revisions::{self, Store};
use stallnet_netconf::Role;

use crate::enroll::code::Code;

/// Where Raspberry Pi OS and Debian's raspi-firmware mount the boot partition.
pub const BOOT_DIR: &str = "/boot/firmware";
pub const FILE: &str = "stallnet.toml";

/// What happened at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No file on the boot partition.
    Nothing,
    /// Imported as this revision (and an invite code kept for the edge, when `enroll`).
    Imported {
        revision: u64,
        renamed_to: PathBuf,
        enroll: bool,
    },
    /// The file held only an invite code: kept for the edge to redeem.
    Enroll { renamed_to: PathBuf },
    /// Refused; the reason (also written next to the file).
    Refused(String),
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Imports `boot_dir/stallnet.toml` into `live` (the file the daemon runs with).
pub fn import(boot_dir: &Path, live: &Path) -> Result<Outcome> {
    let file = boot_dir.join(FILE);
    let error_file = boot_dir.join(format!("{FILE}.error.txt"));
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Outcome::Nothing),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    let refuse = |why: String| -> Result<Outcome> {
        std::fs::write(
            &error_file,
            format!("stallnet did not import {FILE} and kept its running config:\n{why}\n"),
        )
        .with_context(|| format!("writing {}", error_file.display()))?;
        Ok(Outcome::Refused(why))
    };
    let running = stallnet_netconf::load_file(live).ok();
    // An invite code: checked now, kept once the rest is good.
    let (text, code) = match stallnet_netconf::edit::take_string(&text, "enroll") {
        None => (text, None),
        Some(taken) => {
            let at = format!("{}:{}:{}: enroll: ", file.display(), taken.line, taken.col);
            let Some(value) = taken.value else {
                return refuse(format!("{at}expected an invite code in quotes (\"SN-…\")"));
            };
            if let Err(e) = Code::decode(&value) {
                return refuse(format!("{at}{e}"));
            }
            (taken.rest, Some(value))
        }
    };
    let t = now();
    let renamed_to = boot_dir.join(format!("{FILE}.imported-{t}"));
    let only_code = text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
    if let (Some(code), true) = (&code, only_code) {
        let Some(r) = running.as_ref().filter(|r| r.role == Role::Edge) else {
            return refuse(format!(
                "{}: enroll: an invite code is for a box (role = \"edge\"), and this one's config is not an edge's",
                file.display()
            ));
        };
        crate::enroll::pending::save(&r.state_dir, code)?;
        std::fs::rename(&file, &renamed_to)
            .with_context(|| format!("renaming {}", file.display()))?;
        let _ = std::fs::remove_file(&error_file);
        return Ok(Outcome::Enroll { renamed_to });
    }
    let new = match stallnet_netconf::parse_str(&file, &text) {
        Ok(c) => c,
        Err(e) => return refuse(e.to_string()),
    };
    if code.is_some() && new.role != Role::Edge {
        return refuse(format!(
            "{}: enroll: an invite code is for a box (role = \"edge\"), not a hub",
            file.display()
        ));
    }
    if let Some(r) = &running {
        if r.state_dir != new.state_dir {
            return refuse(format!(
                "state_dir cannot change this way ({} -> {})",
                r.state_dir.display(),
                new.state_dir.display()
            ));
        }
    }
    let store = Store::open(&Store::dir_for(&new.state_dir))?;
    if store.active()?.is_none() {
        if let Ok(current) = std::fs::read_to_string(live) {
            let r = store.add(
                &current,
                "import",
                "the config before the SD-card import",
                t,
            )?;
            store.set_active(r.number)?;
        }
    }
    let rev = store.add(&text, "sd-card", "imported from the boot partition", t)?;
    if let Some(dir) = live.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    revisions::write_atomic(live, text.as_bytes())?;
    store.set_active(rev.number)?;
    store.set_pending(None)?;
    if let Some(code) = &code {
        crate::enroll::pending::save(&new.state_dir, code)?;
    }
    std::fs::rename(&file, &renamed_to).with_context(|| format!("renaming {}", file.display()))?;
    let _ = std::fs::remove_file(&error_file);
    Ok(Outcome::Imported {
        revision: rev.number,
        renamed_to,
        enroll: code.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sn-boot-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    fn hub(state: &Path, listen: &str) -> String {
        format!(
            "role = \"hub\"\nstate_dir = \"{}\"\n[hub]\nlisten = \"{listen}\"\npool = \"10.99.0.0/24\"\ndevices = []\n",
            state.display()
        )
    }

    #[test]
    fn a_good_card_config_is_imported_once_and_a_bad_one_explained() {
        let d = dir("card");
        let (boot, state, live) = (d.join("boot"), d.join("state"), d.join("etc/stallnet.toml"));
        std::fs::create_dir_all(&boot).expect("boot");
        std::fs::create_dir_all(d.join("etc")).expect("etc");
        std::fs::write(&live, hub(&state, "0.0.0.0:4433")).expect("live");
        assert_eq!(import(&boot, &live).expect("nothing"), Outcome::Nothing);

        // A bad file: left in place, an error file beside it, the running config kept.
        std::fs::write(boot.join(FILE), "role = \"hub\"\n[hub]\nlisten = 4433\n").expect("bad");
        let Outcome::Refused(why) = import(&boot, &live).expect("refused") else {
            panic!("a bad file was imported");
        };
        assert!(why.contains("stallnet.toml:3:"), "{why}");
        let err =
            std::fs::read_to_string(boot.join("stallnet.toml.error.txt")).expect("error file");
        assert!(
            err.contains("kept its running config") && err.contains(":3:"),
            "{err}"
        );
        assert!(boot.join(FILE).exists());
        assert_eq!(
            std::fs::read_to_string(&live).expect("live"),
            hub(&state, "0.0.0.0:4433")
        );

        // Fixed on the laptop: imported, renamed, the error file gone, both in history.
        std::fs::write(boot.join(FILE), hub(&state, "0.0.0.0:5555")).expect("good");
        let Outcome::Imported {
            revision,
            renamed_to,
            enroll: false,
        } = import(&boot, &live).expect("import")
        else {
            panic!("not imported");
        };
        assert_eq!(revision, 2);
        assert!(renamed_to.exists() && !boot.join(FILE).exists());
        assert!(!boot.join("stallnet.toml.error.txt").exists());
        assert_eq!(
            std::fs::read_to_string(&live).expect("live"),
            hub(&state, "0.0.0.0:5555")
        );
        let store = Store::open(&Store::dir_for(&state)).expect("store");
        assert_eq!(store.active().expect("active"), Some(2));
        assert_eq!(store.text(1).expect("rev 1"), hub(&state, "0.0.0.0:4433"));
        // The next start finds nothing to import.
        assert_eq!(import(&boot, &live).expect("again"), Outcome::Nothing);
        let _ = std::fs::remove_dir_all(&d);
    }

    fn edge(state: &Path) -> String {
        format!(
            "role = \"edge\"\nstate_dir = \"{}\"\n[edge]\nlan = [\"10.1.0.0/24\"]\nhubs = []\n\
             fallback = \"direct\"\n[[edge.uplinks]]\nname = \"wifi\"\ninterface = \"wlan0\"\nkind = \"wifi\"\n",
            state.display()
        )
    }

    fn code() -> String {
        Code::encode(
            [7; 16],
            &format!("sn1:{}", "ab".repeat(32)),
            &["192.0.2.1:4433".parse().expect("addr")],
        )
        .expect("code")
    }

    /// An invite code on the card: alone, it is kept for the edge and the config stays;
    /// beside a config, both are taken; a typo, a non-string or a hub's card is refused
    /// whole with its line and column, and nothing is kept.
    #[test]
    fn an_invite_code_on_the_card_is_checked_and_kept_for_the_edge() {
        let d = dir("code");
        let (boot, state, live) = (d.join("boot"), d.join("state"), d.join("etc/stallnet.toml"));
        std::fs::create_dir_all(&boot).expect("boot");
        std::fs::create_dir_all(d.join("etc")).expect("etc");
        std::fs::write(&live, edge(&state)).expect("live");
        let pending = || crate::enroll::pending::load(&state);

        // A typo: refused where it is, nothing kept.
        let mut typo = code();
        typo.replace_range(10..11, if &typo[10..11] == "A" { "B" } else { "A" });
        std::fs::write(
            boot.join(FILE),
            format!("# from the organiser\nenroll = \"{typo}\"\n"),
        )
        .expect("typo");
        let Outcome::Refused(why) = import(&boot, &live).expect("refused") else {
            panic!("a bad code was taken");
        };
        assert!(
            why.contains("stallnet.toml:2:1: enroll: the code has a typo"),
            "{why}"
        );
        assert!(pending().is_none());
        std::fs::write(boot.join(FILE), "enroll = 5\n").expect("number");
        let Outcome::Refused(why) = import(&boot, &live).expect("refused") else {
            panic!("a number was taken");
        };
        assert!(
            why.contains(":1:1: enroll: expected an invite code"),
            "{why}"
        );

        // The code alone: kept, the config untouched, the file renamed.
        std::fs::write(boot.join(FILE), format!("enroll = \"{}\"\n", code())).expect("code");
        let out = import(&boot, &live).expect("enroll");
        let Outcome::Enroll { renamed_to } = out else {
            panic!("not kept: {out:?}");
        };
        assert!(renamed_to.exists() && !boot.join(FILE).exists());
        assert_eq!(pending().map(|c| c.secret), Some([7; 16]));
        assert_eq!(std::fs::read_to_string(&live).expect("live"), edge(&state));
        let _ = std::fs::remove_file(state.join("enroll-pending"));

        // Beside a config: an error in the config still points at its own line.
        let with = |cfg: &str| format!("enroll = \"{}\"\n{cfg}", code());
        std::fs::write(
            boot.join(FILE),
            with(&edge(&state).replace("wifi\"\n", "radio\"\n")),
        )
        .expect("bad kind");
        let Outcome::Refused(why) = import(&boot, &live).expect("refused") else {
            panic!("a bad config was imported");
        };
        assert!(why.contains("stallnet.toml:11:"), "{why}");
        assert!(pending().is_none());
        // A hub's card cannot enroll.
        std::fs::write(boot.join(FILE), with(&hub(&state, "0.0.0.0:4433"))).expect("hub");
        assert!(matches!(import(&boot, &live), Ok(Outcome::Refused(w)) if w.contains("not a hub")));
        // Good: the config (without the code) is in force, the code kept.
        std::fs::write(boot.join(FILE), with(&edge(&state))).expect("good");
        let Outcome::Imported { enroll: true, .. } = import(&boot, &live).expect("import") else {
            panic!("not imported with its code");
        };
        let now = std::fs::read_to_string(&live).expect("live");
        assert!(!now.contains("enroll") && now.contains("wlan0"), "{now}");
        assert!(stallnet_netconf::load_file(&live).is_ok());
        assert_eq!(pending().map(|c| c.secret), Some([7; 16]));
        let _ = std::fs::remove_dir_all(&d);
    }
}
