//! End-to-end: the real dashboard (`stallnet-tui`) in tmux against a real edge in the
//! netns topology: it shows a black-holed uplink within 2 s, disables and enables an
//! uplink from the keyboard (with confirmation), says when the daemon is gone and comes
//! back by itself when it returns, and quits on `q`.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use stallnet_tests::topo::{bin, Options, Topology, UplinkSpec};

/// A tmux server of its own (so tests never share one), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(socket: String, cmd: &str) -> Result<Self> {
        let t = Self { socket };
        let st = t
            .cmd(&[
                "new-session",
                "-d",
                "-s",
                "dash",
                "-x",
                "100",
                "-y",
                "30",
                cmd,
            ])
            .status()?;
        anyhow::ensure!(st.success(), "tmux new-session failed (is tmux installed?)");
        Ok(t)
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.socket]).args(args);
        c
    }

    fn screen(&self) -> String {
        self.cmd(&["capture-pane", "-p", "-t", "dash"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    }

    fn keys(&self, keys: &[&str]) -> Result<()> {
        let mut args = vec!["send-keys", "-t", "dash"];
        args.extend_from_slice(keys);
        anyhow::ensure!(self.cmd(&args).status()?.success(), "send-keys");
        Ok(())
    }

    /// Waits until the screen satisfies `pred`; returns how long it took.
    fn wait(&self, limit: Duration, what: &str, pred: impl Fn(&str) -> bool) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let s = self.screen();
            if pred(&s) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > limit {
                bail!("screen did not show {what} within {limit:?}:\n{s}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn alive(&self) -> bool {
        self.cmd(&["has-session", "-t", "dash"])
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]).status();
    }
}

/// The uplink's row on the screen.
fn row<'a>(screen: &'a str, name: &str) -> &'a str {
    screen
        .lines()
        .find(|l| l.contains(&format!(" {name} ")) && (l.contains("ms") || l.contains(" - ")))
        .unwrap_or("")
}

#[test]
fn the_dashboard_follows_a_real_edge() -> Result<()> {
    let mut t = Topology::build(
        vec![UplinkSpec::wifi(), UplinkSpec::cell()],
        Options::default(),
    )?;
    t.start()?;
    let tui = bin("stallnet-tui");
    let cmd = format!(
        "{} --runtime-dir {}",
        tui.display(),
        t.dir.join("edge-run").display()
    );
    let tmux = Tmux::start(format!("{}-tmux", t.prefix), &cmd)?;
    tmux.wait(Duration::from_secs(5), "ONLINE", |s| {
        s.contains("(+) ONLINE")
            && row(s, "wifi").contains("+ up")
            && row(s, "cell").contains("+ up")
    })?;

    // A silent black hole on wifi: on screen within 2 s.
    t.isp_blackhole(1, true)?;
    let took = tmux.wait(Duration::from_secs(2), "wifi failing", |s| {
        !row(s, "wifi").contains("+ up")
    })?;
    eprintln!("black hole on screen after {took:?}");
    t.isp_blackhole(1, false)?;
    // Back in use (marked degraded for a while after its losses).
    tmux.wait(Duration::from_secs(15), "wifi back", |s| {
        row(s, "wifi").contains("+ up") || row(s, "wifi").contains("! degraded")
    })?;

    // Disable cell from the keyboard: it asks first.
    tmux.keys(&["Down", "d"])?;
    tmux.wait(Duration::from_secs(2), "the confirmation", |s| {
        s.contains("Disable uplink cell?")
    })?;
    tmux.keys(&["y"])?;
    tmux.wait(Duration::from_secs(3), "cell disabled", |s| {
        row(s, "cell").contains("disabled")
    })?;
    tmux.keys(&["e", "y"])?;
    tmux.wait(Duration::from_secs(15), "cell enabled again", |s| {
        row(s, "cell").contains("+ up")
    })?;

    // The daemon goes away and comes back: the dashboard says so and reconnects.
    t.stop("edge");
    tmux.wait(Duration::from_secs(3), "not running", |s| {
        s.contains("stallnet is not running, retrying")
    })?;
    t.start_edge()?;
    tmux.wait(Duration::from_secs(20), "ONLINE again", |s| {
        s.contains("(+) ONLINE")
    })?;

    tmux.keys(&["q"])?;
    let start = Instant::now();
    while tmux.alive() && start.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!tmux.alive(), "q did not quit");
    Ok(())
}

#[test]
fn once_prints_a_snapshot_and_fails_without_a_daemon() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("sn-tui-once-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let out = Command::new(bin("stallnet-tui"))
        .args(["--once", "--runtime-dir"])
        .arg(&dir)
        .output()?;
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("stallnet is not running"), "{text}");
    Ok(())
}

/// The dashboard on a hub: the fleet of three stalls from one image, one of them
/// black-holed (its box's tunnel packets dropped at the box), listed first as offline;
/// the arrows choose whose uplinks are shown.
#[test]
fn the_dashboard_shows_a_hubs_fleet() -> Result<()> {
    let mut t = Topology::build(
        vec![UplinkSpec::wifi()],
        Options {
            extra_stalls: 2,
            ..Options::default()
        },
    )?;
    t.start()?;
    let cmd = format!(
        "{} --runtime-dir {}",
        bin("stallnet-tui").display(),
        t.dir.join("hub-run").display()
    );
    let tmux = Tmux::start(format!("{}-tmux", t.prefix), &cmd)?;
    tmux.wait(Duration::from_secs(5), "all stalls online", |s| {
        s.contains("ALL STALLS ONLINE") && s.contains("3 stalls: 3 online")
    })?;
    t.nft(
        "edge3",
        "table inet hole { chain out { type filter hook output priority 0; udp dport 4433 drop; }\n}",
    )?;
    let s = tmux.wait(Duration::from_secs(15), "stall3 offline, first", |s| {
        let first = s
            .lines()
            .find(|l| {
                ["+ online", "! degraded", "x offline"]
                    .iter()
                    .any(|w| l.contains(w))
            })
            .unwrap_or("");
        s.contains("STALLS OFFLINE") && first.contains("stall3") && first.contains("x offline")
    });
    s.with_context(|| tmux.screen())?;
    // The first row is selected: its uplinks are shown; Down moves to the next stall.
    tmux.wait(Duration::from_secs(2), "stall3's uplinks", |s| {
        s.contains("Uplinks of stall3")
    })?;
    tmux.keys(&["Down"])?;
    tmux.wait(Duration::from_secs(2), "the next stall's uplinks", |s| {
        s.contains("Uplinks of stall ") && s.contains("> stall ")
    })?;
    Ok(())
}
