//! Shipping: the unit files pass `systemd-analyze verify` with exposure scores under
//! target (`systemd/check.sh`), and the .deb holds what it should and installs and purges
//! cleanly in a fresh Debian chroot (`image-build/build-deb.sh`, `image-build/test-deb.sh`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use stallnet_tests::topo::{bin, require_root};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("{cmd:?} failed:\n{text}");
    }
    Ok(text)
}

#[test]
fn unit_files_verify_and_stay_under_their_exposure_targets() -> Result<()> {
    let bindir = bin("stallnet").parent().context("bin dir")?.to_path_buf();
    let report = run(Command::new(repo().join("systemd/check.sh")).arg(&bindir))?;
    println!("{report}");
    assert!(
        report.contains("ok   systemd-analyze verify: clean"),
        "{report}"
    );
    assert!(!report.contains("FAIL"), "{report}");
    Ok(())
}

#[test]
fn the_deb_holds_the_product_and_installs_and_purges_cleanly() -> Result<()> {
    require_root()?;
    let bindir = bin("stallnet").parent().context("bin dir")?.to_path_buf();
    let out = std::env::temp_dir().join(format!("stallnet-deb-{}", std::process::id()));
    let deb = run(Command::new(repo().join("image-build/build-deb.sh"))
        .args(["amd64"])
        .arg(&bindir)
        .arg(&out))?;
    let deb = PathBuf::from(deb.trim());
    let contents = run(Command::new("dpkg-deb").arg("-c").arg(&deb))?;
    for path in [
        "./usr/bin/stallnet",
        "./usr/bin/stallnet-tui",
        "./lib/systemd/system/stallnet.service",
        "./lib/systemd/system/stallnet-hub.service",
        "./lib/systemd/system/stallnet-tui@.service",
        "./lib/systemd/system/stallnet-clock.service",
        "./usr/lib/sysctl.d/60-stallnet.conf",
        "./usr/share/stallnet/stallnet.toml",
        "./usr/share/doc/stallnet/copyright",
    ] {
        assert!(
            contents.lines().any(|l| l.ends_with(&format!(" {path}"))),
            "{path} missing from the .deb:\n{contents}"
        );
    }
    assert!(
        !contents.contains("./etc/"),
        "the package writes no config: a box stays inert until configured\n{contents}"
    );
    let fields = run(Command::new("dpkg-deb").arg("-f").arg(&deb).args([
        "Package",
        "Architecture",
        "Depends",
    ]))?;
    assert!(fields.contains("Package: stallnet"), "{fields}");
    assert!(fields.contains("Architecture: amd64"), "{fields}");
    assert!(fields.contains("nftables"), "{fields}");
    let report = run(Command::new(repo().join("image-build/test-deb.sh")).arg(&deb));
    let _ = std::fs::remove_dir_all(&out);
    let report = report?;
    println!("{report}");
    assert!(report.contains("ok   nothing left after purge"), "{report}");
    assert!(!report.contains("FAIL"), "{report}");
    Ok(())
}
