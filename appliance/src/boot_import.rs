//! Configuring a box by writing its SD card on a laptop: a `stallnet.toml` found on the
//! boot partition at start-up is validated, imported as a revision (the running config
//! before it is kept as one too), and renamed so it is not imported twice. A bad file is
//! left where it is, with `stallnet.toml.error.txt` beside it saying what is wrong (every
//! error with its line and column), and the running config is untouched.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use stallnet_netconf::revisions::{self, Store};

/// Where Raspberry Pi OS and Debian's raspi-firmware mount the boot partition.
pub const BOOT_DIR: &str = "/boot/firmware";
pub const FILE: &str = "stallnet.toml";

/// What happened at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No file on the boot partition.
    Nothing,
    /// Imported as this revision.
    Imported { revision: u64, renamed_to: PathBuf },
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
    let new = match stallnet_netconf::parse_str(&file, &text) {
        Ok(c) => c,
        Err(e) => return refuse(e.to_string()),
    };
    let running = stallnet_netconf::load_file(live).ok();
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
    let t = now();
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
    let renamed_to = boot_dir.join(format!("{FILE}.imported-{t}"));
    std::fs::rename(&file, &renamed_to).with_context(|| format!("renaming {}", file.display()))?;
    let _ = std::fs::remove_file(&error_file);
    Ok(Outcome::Imported {
        revision: rev.number,
        renamed_to,
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
}
