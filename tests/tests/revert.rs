//! End-to-end: every change the daemon makes to the kernel is undone on every way out.
//! A real edge in the netns topology (a bridged `[lan]` with its firewall, two uplinks,
//! commerce) is started twice: once so that it fails half-way (its commerce store cannot
//! be opened, after the TUN, the routes, the rules, the LAN and the uplinks are in
//! place), once normally and then stopped with SIGTERM. Each time the edge namespace's
//! rules, routes (every table), nft ruleset, addresses, links and forwarding are
//! compared with what they were before the start. A hub whose start fails (its port is
//! taken) is checked the same way. Needs root; fails loudly without it.

use std::time::Duration;

use anyhow::{Context, Result};
use stallnet_tests::topo::{Options, Topology, UplinkSpec};

/// What the kernel holds in namespace `role`, as text to compare, once the kernel's own
/// IPv6 duplicate address detection on new links is over (it adds link-local routes and
/// clears "tentative" by itself, a second or two after a link comes up).
fn kernel_state(t: &Topology, role: &str) -> Result<String> {
    for _ in 0..100 {
        let o = t.exec(role, &["ip", "-o", "addr", "show"])?;
        if !String::from_utf8_lossy(&o.stdout).contains("tentative") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    state_now(t, role)
}

fn state_now(t: &Topology, role: &str) -> Result<String> {
    let mut out = String::new();
    for cmd in [
        &["ip", "-4", "rule", "show"][..],
        &["ip", "-6", "rule", "show"],
        &["ip", "-4", "route", "show", "table", "all"],
        &["ip", "-6", "route", "show", "table", "all"],
        &["nft", "list", "ruleset"],
        &["ip", "-o", "addr", "show"],
        &["ip", "-br", "link", "show"],
        &["cat", "/proc/sys/net/ipv4/ip_forward"],
    ] {
        let o = t.exec(role, cmd)?;
        // The kernel lists routes of one table in an order of its own (IPv6 link-local
        // routes move when a link goes down and up): compare sets of lines. Rules carry
        // their priority, so nothing is lost.
        let text = String::from_utf8_lossy(&o.stdout);
        let mut lines: Vec<&str> = text.lines().collect();
        if cmd[0] == "ip" {
            lines.sort_unstable();
        }
        out.push_str(&format!("## {}\n{}\n", cmd.join(" "), lines.join("\n")));
    }
    Ok(out)
}

fn assert_same(before: &str, after: &str, when: &str) {
    if before != after {
        let b: Vec<&str> = before.lines().collect();
        let a: Vec<&str> = after.lines().collect();
        let gone: Vec<&&str> = b.iter().filter(|l| !a.contains(l)).collect();
        let added: Vec<&&str> = a.iter().filter(|l| !b.contains(l)).collect();
        let order: Vec<String> = b
            .iter()
            .zip(a.iter())
            .filter(|(x, y)| x != y)
            .map(|(x, y)| format!("before: {x}\n after: {y}"))
            .collect();
        panic!("{when}: the kernel differs from before the start\nmissing: {gone:#?}\nleft behind: {added:#?}\nfirst differing lines:\n{}", order.first().cloned().unwrap_or_default());
    }
}

#[test]
fn a_failed_start_and_a_sigterm_leave_the_kernel_as_before() -> Result<()> {
    let lan = "\n[lan]\ninterface = \"br0\"\nports = [\"lan0\"]\naddress = \"10.1.0.1/24\"\n\
        \n[commerce]\nlisten = \"10.1.0.1:8080\"\nclients = []\n";
    let mut t = Topology::build(
        vec![UplinkSpec::wifi(), UplinkSpec::cell()],
        Options {
            edge_extra: Some(lan.into()),
            ..Options::default()
        },
    )?;
    let before = kernel_state(&t, "edge")?;

    // 1. A start that fails half-way: the commerce store's directory is a file.
    let store = t.dir.join("edge-state/commerce");
    std::fs::write(&store, "not a directory")?;
    t.start_hub()?;
    t.start_edge()?;
    let st = t.wait_exit("edge", false, Duration::from_secs(30))?;
    let log = t.log("edge");
    assert!(!st.success(), "the edge started without its store: {log}");
    assert!(
        log.contains("commerce"),
        "the failure is not the store's: {log}"
    );
    assert_same(&before, &kernel_state(&t, "edge")?, "after a failed start");

    // 2. A normal start changes the kernel (the comparison can see it)...
    std::fs::remove_file(&store)?;
    t.start_edge()?;
    let want = t.uplinks.len();
    t.wait_status("edge", Duration::from_secs(30), |s| {
        stallnet_tests::topo::up_links(s, "hub") == want
    })
    .with_context(|| format!("edge did not come up: {}", t.log("edge")))?;
    let running = kernel_state(&t, "edge")?;
    assert_ne!(
        before, running,
        "a running edge changed nothing the test can see"
    );
    for wanted in ["lookup 200", "br0", "stallnet_fw", "stall0"] {
        assert!(
            running.contains(wanted),
            "{wanted} missing while running:\n{running}"
        );
    }
    // ... and SIGTERM undoes all of it.
    let st = t.wait_exit("edge", true, Duration::from_secs(15))?;
    assert!(st.success(), "SIGTERM: {st}: {}", t.log("edge"));
    assert_same(&before, &kernel_state(&t, "edge")?, "after SIGTERM");

    // 3. A hub whose port is taken fails after its routes are in: they go too.
    t.stop("hub");
    let hub_before = kernel_state(&t, "hub")?;
    t.spawn(
        "squatter",
        "hub",
        &[
            "python3",
            "-c",
            "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',4433))\ntime.sleep(60)",
        ],
    )?;
    std::thread::sleep(Duration::from_millis(500));
    t.start_hub()?;
    let st = t.wait_exit("hub", false, Duration::from_secs(30))?;
    assert!(
        !st.success(),
        "the hub started on a taken port: {}",
        t.log("hub")
    );
    assert_same(
        &hub_before,
        &kernel_state(&t, "hub")?,
        "after a failed hub start",
    );
    Ok(())
}
