//! Network-namespace topologies for end-to-end tests, benchmarks and the lab.
//!
//! ```text
//!  lan ── edge ─ wan1 ═ emu1 ═ isp1 ─┐
//!             └─ wan2 ═ emu2 ═ isp2 ─┼─ inet (servers 198.18.0.1) ─ hub
//!  (═ : the userspace link emulator)  ┘
//! ```
//!
//! Names are unique per topology (a short prefix), so tests run in parallel. Everything is
//! removed on drop, also when a test panics. The ISPs NAT (carrier-grade NAT), the hub
//! NATs tunnel traffic to the internet namespace. Edge and hub run the real `stallnet`
//! binary with configs and keys written into a temporary directory.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub const SERVER: &str = "198.18.0.1";
pub const HUB_ADDR: &str = "172.31.0.2";
/// The second hub's address (with [`Options::second_hub`]).
pub const HUB2_ADDR: &str = "172.31.1.2";
pub const LAN_CLIENT: &str = "10.1.0.2";
pub const POS_CLIENT: &str = "10.1.0.10";
/// A LAN address the tests may classify as they like (a guest device).
pub const GUEST_CLIENT: &str = "10.1.0.20";

/// Path of a binary built by this workspace (`STALLNET_BIN_DIR` overrides).
/// What runs `args` at the harness's priority: everything but stallnet itself (the link
/// emulators, the servers, iperf3, the traffic tools) is other hardware in the field — a
/// modem, a phone, a till, the internet — and must not be slowed by the CPU load the
/// product is tested under (a test's CPU hog, a busy CI machine), or a timing test
/// measures its own harness. So those run at nice -20. The daemon runs at nice -10, as
/// its systemd units start it (`Nice=-10`), sharing the CPU with whatever else runs, as
/// on a Pi; the dashboard at the default 0.
fn harness_priority(args: &[&str]) -> &'static [&'static str] {
    let Some(p) = args.first().map(Path::new) else {
        return &[];
    };
    if p == bin("stallnet") {
        &["nice", "-n", "-10"]
    } else if p == bin("stallnet-tui") {
        &[]
    } else {
        &["nice", "-n", "-20"]
    }
}

/// A till's `POST /v1/outbox` from namespace `ns` to the commerce API at `api`
/// (`host:port`) with `bearer` and idempotency `key`: the HTTP status ("201", or "000"
/// when nothing answered).
pub fn post_outbox(ns: &str, api: &str, bearer: &str, key: &str, body: &str) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(harness_priority(&["curl"]))
        .args(["curl", "-sS", "--max-time", "5", "-o", "/dev/null"])
        .args([
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            &format!("http://{api}/v1/outbox"),
        ])
        .args(["-H", &format!("authorization: Bearer {bearer}")])
        .args(["-H", &format!("idempotency-key: {key}")])
        .args(["-H", "content-type: application/json", "-d", body])
        .output()
        .context("running curl")?;
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

pub fn bin(name: &str) -> PathBuf {
    if let Ok(d) = std::env::var("STALLNET_BIN_DIR") {
        return Path::new(&d).join(name);
    }
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| here.join("../target"));
    for profile in ["debug", "release"] {
        let p = target.join(profile).join(name);
        if p.exists() {
            return p;
        }
    }
    target.join("debug").join(name)
}

/// Fails loudly when the environment cannot host a topology (not root, no `ip`).
pub fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("network-namespace tests need root (CI runs them as root)");
    }
    Ok(())
}

/// Runs `cmd` with `input` on its standard input, failing on a non-zero exit.
pub fn run_with_input(cmd: &mut Command, input: &[u8]) -> Result<Output> {
    let mut c = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    c.stdin.take().context("stdin")?.write_all(input)?;
    let out = c.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Link shape of one emulated uplink.
#[derive(Debug, Clone)]
pub struct UplinkSpec {
    pub name: &'static str,
    pub kind: &'static str,
    pub rate_kbit: u64,
    pub delay_ms: f64,
    pub queue_ms: u64,
}

impl UplinkSpec {
    pub fn wifi() -> Self {
        Self {
            name: "wifi",
            kind: "wifi",
            rate_kbit: 20_000,
            delay_ms: 10.0,
            queue_ms: 100,
        }
    }
    pub fn cell() -> Self {
        Self {
            name: "cell",
            kind: "cellular",
            rate_kbit: 10_000,
            delay_ms: 22.5,
            queue_ms: 100,
        }
    }
}

/// Traffic-class shape: wifi and cell as above, both with 500 ms bottleneck queues
/// (a modem's deep buffer).
pub fn deep_links() -> Vec<UplinkSpec> {
    let mut wifi = UplinkSpec::wifi();
    wifi.queue_ms = 500;
    let mut cell = UplinkSpec::cell();
    cell.queue_ms = 500;
    vec![wifi, cell]
}

#[derive(Debug, Clone, Default)]
pub struct Options {
    pub fallback_direct: bool,
    /// Leave uplink N's edge-side interface out at start (added later by the test).
    pub missing_uplink: Option<usize>,
    pub edge_mode: Option<&'static str>,
    /// TUN MTU of the edge (default: the config's default).
    pub edge_mtu: Option<u16>,
    /// TOML tables appended to the edge's config (`[edge.classes.guest]`, `[[edge.rules]]`).
    pub edge_extra: Option<String>,
    /// Fields added to the edge's `[edge]` table (`dhcp_leases = "…"`).
    pub edge_fields: Option<String>,
    /// A further LAN-side prefix (a guest segment) tunnelled by the edge and routed by the hub.
    pub extra_lan: Option<&'static str>,
    /// The edge's `reachability` (an inline table); default: checks off (the test
    /// internet has no check server unless the test starts one).
    pub reachability: Option<String>,
    /// Kernel links instead of the userspace emulator: each `emuN` namespace bridges its
    /// two sides and, when the uplink has a rate, shapes each direction with `tbf` (a
    /// `queue_ms`-deep buffer; no added delay, no emulator commands).
    pub kernel_links: bool,
    /// A second hub (`hub2`, [`HUB2_ADDR`], its own identity and tunnel pool) after the
    /// first in the edge's list of hubs.
    pub second_hub: bool,
    /// Further stalls on the same hub, each flashed alike: stall K (2, 3, …) is
    /// namespaces `edgeK` and `lanK` with the same LAN as the first (10.1.0.0/24, the
    /// image's) and one wired uplink `wan1` straight to the internet (172.20.K.2/24), its
    /// own identity, and device `stallK` on the hub.
    pub extra_stalls: usize,
    /// The last extra stall is fresh from the image: not on the hub, no hub in its
    /// config (`hubs = []`, `fallback = "direct"`), to be enrolled by the test.
    pub unlisted_stall: bool,
    /// The hub's tunnel pool (default 10.99.0.0/24: room for 253 devices).
    pub hub_pool: Option<&'static str>,
    /// Text appended to the hub's config (more `[[hub.devices]]`).
    pub hub_extra: Option<String>,
    /// Fields added to the hub's `[hub]` table (`stall_services = [7301]`).
    pub hub_fields: Option<String>,
}

pub struct Topology {
    pub prefix: String,
    pub dir: PathBuf,
    pub uplinks: Vec<UplinkSpec>,
    namespaces: Vec<String>,
    children: Vec<(String, Child)>,
    pub edge_id: String,
    pub hub_id: String,
    /// The second hub's identity (empty without [`Options::second_hub`]).
    pub hub2_id: String,
    /// The identities of stalls 2, 3, … ([`Options::extra_stalls`]).
    pub stall_ids: Vec<String>,
    /// [`Options::unlisted_stall`].
    pub unlisted_stall: bool,
    /// [`Options::kernel_links`].
    pub kernel_links: bool,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Topology {
    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    /// Runs a command in namespace `role`, failing on a non-zero exit.
    pub fn exec(&self, role: &str, args: &[&str]) -> Result<Output> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.ns(role)])
            .args(harness_priority(args))
            .args(args))
    }

    /// Starts a long-running process in namespace `role`; killed on drop.
    pub fn spawn(&mut self, label: &str, role: &str, args: &[&str]) -> Result<()> {
        let log = std::fs::File::create(self.dir.join(format!("{label}.log")))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(role)])
            .args(harness_priority(args))
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {label}"))?;
        self.children.push((label.to_string(), child));
        Ok(())
    }

    /// Stops a process started with [`Self::spawn`] (SIGTERM, then SIGKILL).
    pub fn stop(&mut self, label: &str) {
        if let Some(i) = self.children.iter().position(|(l, _)| l == label) {
            let (_, mut c) = self.children.remove(i);
            terminate(&mut c);
        }
    }

    /// Waits up to `limit` for a process started with [`Self::spawn`] to exit by itself
    /// (after `sigterm`, when set); its exit status. A process still running after
    /// `limit` is an error (and is left to [`Self::stop`] or the drop).
    pub fn wait_exit(
        &mut self,
        label: &str,
        sigterm: bool,
        limit: Duration,
    ) -> Result<std::process::ExitStatus> {
        let i = self
            .children
            .iter()
            .position(|(l, _)| l == label)
            .with_context(|| format!("no process {label}"))?;
        let child = &mut self.children[i].1;
        if sigterm {
            let pid = i32::try_from(child.id()).context("pid")?;
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            )?;
        }
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait()? {
                self.children.remove(i);
                return Ok(st);
            }
            anyhow::ensure!(
                start.elapsed() < limit,
                "{label} still running after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Process id of a process started with [`Self::spawn`].
    pub fn pid(&self, label: &str) -> Option<u32> {
        self.children
            .iter()
            .find(|(l, _)| l == label)
            .map(|(_, c)| c.id())
    }

    pub fn log(&self, label: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{label}.log"))).unwrap_or_default()
    }

    /// Builds the namespaces and links; starts emulators; writes keys and configs.
    pub fn build(specs: Vec<UplinkSpec>, opts: Options) -> Result<Self> {
        require_root()?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("sn{}x{n}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("stallnet-{prefix}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut t = Topology {
            prefix,
            dir,
            uplinks: specs.clone(),
            namespaces: Vec::new(),
            children: Vec::new(),
            edge_id: String::new(),
            hub_id: String::new(),
            hub2_id: String::new(),
            stall_ids: Vec::new(),
            unlisted_stall: opts.unlisted_stall,
            kernel_links: opts.kernel_links,
        };
        t.wire(&opts)?;
        t.keys_and_configs(&opts)?;
        Ok(t)
    }

    /// Adds a host namespace `role` wired to the edge: `edge_dev` on the edge's side,
    /// `dev` in the host with address `cidr` and a default route via `gateway`. Call
    /// before starting the edge when its config names `edge_dev`.
    pub fn add_host(
        &mut self,
        role: &str,
        edge_dev: &str,
        dev: &str,
        cidr: &str,
        gateway: &str,
    ) -> Result<()> {
        self.add_ns(role)?;
        self.veth(("edge", edge_dev), (role, dev))?;
        self.addr(role, dev, cidr)?;
        self.exec(role, &["ip", "route", "add", "default", "via", gateway])?;
        Ok(())
    }

    fn add_ns(&mut self, role: &str) -> Result<()> {
        let name = self.ns(role);
        run(Command::new("ip").args(["netns", "add", &name]))?;
        self.namespaces.push(name);
        self.exec(role, &["ip", "link", "set", "lo", "up"])?;
        self.exec(role, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        Ok(())
    }

    /// A veth pair between two namespaces, offloads off (the emulator sees real frames).
    pub fn veth(&self, a: (&str, &str), b: (&str, &str)) -> Result<()> {
        run(Command::new("ip").args([
            "link",
            "add",
            a.1,
            "netns",
            &self.ns(a.0),
            "type",
            "veth",
            "peer",
            "name",
            b.1,
            "netns",
            &self.ns(b.0),
        ]))?;
        for (role, dev) in [a, b] {
            let _ = self.exec(
                role,
                &[
                    "ethtool",
                    "-K",
                    dev,
                    "tx",
                    "off",
                    "gro",
                    "off",
                    "gso",
                    "off",
                    "tso",
                    "off",
                    "tx-udp-segmentation",
                    "off",
                ],
            );
            self.exec(role, &["ip", "link", "set", "dev", dev, "up"])?;
        }
        Ok(())
    }

    fn addr(&self, role: &str, dev: &str, cidr: &str) -> Result<()> {
        self.exec(role, &["ip", "addr", "add", cidr, "dev", dev])?;
        Ok(())
    }

    fn wire(&mut self, opts: &Options) -> Result<()> {
        for role in ["lan", "edge", "inet", "hub"] {
            self.add_ns(role)?;
        }
        // LAN: an ordinary client and a POS terminal address on the same segment.
        self.veth(("lan", "eth0"), ("edge", "lan0"))?;
        self.addr("lan", "eth0", "10.1.0.2/24")?;
        self.addr("lan", "eth0", "10.1.0.10/24")?;
        self.addr("lan", "eth0", "10.1.0.20/24")?;
        self.addr("edge", "lan0", "10.1.0.1/24")?;
        self.exec("lan", &["ip", "route", "add", "default", "via", "10.1.0.1"])?;
        // Internet: servers on loopback; the hub on its own segment, NATing tunnel traffic.
        self.exec("inet", &["ip", "addr", "add", "198.18.0.1/32", "dev", "lo"])?;
        self.veth(("inet", "hub"), ("hub", "eth0"))?;
        self.addr("inet", "hub", "172.31.0.1/24")?;
        self.addr("hub", "eth0", "172.31.0.2/24")?;
        self.exec(
            "hub",
            &["ip", "route", "add", "default", "via", "172.31.0.1"],
        )?;
        self.nft(
            "hub",
            "table ip nat { chain post { type nat hook postrouting priority srcnat; oifname \"eth0\" masquerade; }\n}",
        )?;
        if opts.second_hub {
            self.add_ns("hub2")?;
            self.veth(("inet", "hub2"), ("hub2", "eth0"))?;
            self.addr("inet", "hub2", "172.31.1.1/24")?;
            self.addr("hub2", "eth0", &format!("{HUB2_ADDR}/24"))?;
            self.exec(
                "hub2",
                &["ip", "route", "add", "default", "via", "172.31.1.1"],
            )?;
            self.nft(
                "hub2",
                "table ip nat { chain post { type nat hook postrouting priority srcnat; oifname \"eth0\" masquerade; }\n}",
            )?;
        }
        for k in 2..2 + opts.extra_stalls {
            let (lan, edge) = (format!("lan{k}"), format!("edge{k}"));
            self.add_ns(&lan)?;
            self.add_ns(&edge)?;
            self.veth((&lan, "eth0"), (&edge, "lan0"))?;
            for a in ["10.1.0.2/24", "10.1.0.10/24", "10.1.0.20/24"] {
                self.addr(&lan, "eth0", a)?;
            }
            self.addr(&edge, "lan0", "10.1.0.1/24")?;
            self.exec(&lan, &["ip", "route", "add", "default", "via", "10.1.0.1"])?;
            self.veth((&edge, "wan1"), ("inet", &format!("st{k}")))?;
            self.addr("inet", &format!("st{k}"), &format!("172.20.{k}.1/24"))?;
            self.addr(&edge, "wan1", &format!("172.20.{k}.2/24"))?;
            let gw = format!("172.20.{k}.1");
            self.exec(
                &edge,
                &[
                    "ip", "route", "add", "default", "via", &gw, "dev", "wan1", "metric", "100",
                ],
            )?;
        }
        for i in 1..=self.uplinks.len() {
            let (emu, isp) = (format!("emu{i}"), format!("isp{i}"));
            self.add_ns(&emu)?;
            self.add_ns(&isp)?;
            let wan = format!("wan{i}");
            if opts.missing_uplink != Some(i) {
                self.veth(("edge", &wan), (&emu, "toedge"))?;
                self.edge_uplink_addr(i)?;
            }
            self.veth((&emu, "toisp"), (&isp, "cust"))?;
            self.addr(&isp, "cust", &format!("100.64.{i}.1/24"))?;
            self.veth((&isp, "wan"), ("inet", &isp))?;
            self.addr(&isp, "wan", &format!("172.16.{i}.2/30"))?;
            self.addr("inet", &isp, &format!("172.16.{i}.1/30"))?;
            self.exec(
                &isp,
                &[
                    "ip",
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("172.16.{i}.1"),
                ],
            )?;
            self.nft(
                &isp,
                "table ip nat { chain post { type nat hook postrouting priority srcnat; oifname \"wan\" masquerade; }\n}",
            )?;
            if opts.kernel_links {
                self.kernel_link(i)?;
            } else if opts.missing_uplink != Some(i) {
                self.start_emulator(i)?;
            }
        }
        Ok(())
    }

    /// Addresses and a default route (as DHCP would give) on the edge's uplink `i`.
    fn edge_uplink_addr(&self, i: usize) -> Result<()> {
        let wan = format!("wan{i}");
        self.addr("edge", &wan, &format!("100.64.{i}.2/24"))?;
        self.exec(
            "edge",
            &[
                "ip",
                "route",
                "add",
                "default",
                "via",
                &format!("100.64.{i}.1"),
                "dev",
                &wan,
                "metric",
                &format!("{}", 100 * i),
            ],
        )?;
        Ok(())
    }

    /// Plugs in uplink `i` that was left out at build time (a USB dongle arriving).
    pub fn plug_uplink(&mut self, i: usize) -> Result<()> {
        self.veth(("edge", &format!("wan{i}")), (&format!("emu{i}"), "toedge"))?;
        self.start_emulator(i)?;
        self.edge_uplink_addr(i)
    }

    fn start_emulator(&mut self, i: usize) -> Result<()> {
        let s = self.uplinks[i - 1].clone();
        let sock = self.emu_socket(i);
        let emu = bin("stallnet-linkemu");
        let args = [
            format!("rate_kbit={}", s.rate_kbit),
            format!("delay_ms={}", s.delay_ms),
            format!("queue_ms={}", s.queue_ms),
        ];
        let mut argv: Vec<&str> = vec![
            emu.to_str().context("path")?,
            "toedge",
            "toisp",
            sock.to_str().context("path")?,
        ];
        argv.extend(args.iter().map(String::as_str));
        self.spawn(&format!("emu{i}"), &format!("emu{i}"), &argv)?;
        wait_for(Duration::from_secs(5), || Ok(sock.exists()))
            .context("link emulator did not start")?;
        Ok(())
    }

    /// Uplink `i` as the kernel carries it: a bridge in `emuN`, `tbf` on both egresses
    /// when the uplink has a rate (see [`Options::kernel_links`]).
    fn kernel_link(&mut self, i: usize) -> Result<()> {
        let s = self.uplinks[i - 1].clone();
        let emu = format!("emu{i}");
        self.exec(&emu, &["ip", "link", "add", "br0", "type", "bridge"])?;
        for dev in ["toedge", "toisp"] {
            self.exec(&emu, &["ip", "link", "set", dev, "master", "br0"])?;
        }
        self.exec(&emu, &["ip", "link", "set", "br0", "up"])?;
        if s.rate_kbit > 0 {
            self.tbf(i, "replace", s.rate_kbit, s.queue_ms)?;
        }
        Ok(())
    }

    /// `tc qdisc VERB … tbf` on both egresses of kernel link `i`: `rate_kbit`, and a
    /// buffer of `queue_ms` at that rate (at least two full frames).
    fn tbf(&self, i: usize, verb: &str, rate_kbit: u64, queue_ms: u64) -> Result<()> {
        let emu = format!("emu{i}");
        let limit = (rate_kbit * 1000 / 8 * queue_ms / 1000).max(3028);
        let burst = (rate_kbit * 1000 / 8 / 250).max(3028);
        for dev in ["toedge", "toisp"] {
            self.exec(
                &emu,
                &[
                    "tc",
                    "qdisc",
                    verb,
                    "dev",
                    dev,
                    "root",
                    "tbf",
                    "rate",
                    &format!("{rate_kbit}kbit"),
                    "burst",
                    &burst.to_string(),
                    "limit",
                    &limit.to_string(),
                ],
            )?;
        }
        Ok(())
    }

    /// Changes uplink `i`'s capacity to `rate_kbit` both ways, its buffer still
    /// `queue_ms` deep at the new rate: `tbf` on kernel links, the emulator otherwise.
    pub fn set_uplink_rate(&self, i: usize, rate_kbit: u64) -> Result<()> {
        let queue_ms = self
            .uplinks
            .get(i.checked_sub(1).context("uplinks count from 1")?)
            .map(|s| s.queue_ms)
            .context("no such uplink")?;
        if self.kernel_links {
            self.tbf(i, "change", rate_kbit, queue_ms)
        } else {
            self.emu(i, &format!("set rate_kbit={rate_kbit}")).map(drop)
        }
    }

    fn emu_socket(&self, i: usize) -> PathBuf {
        self.dir.join(format!("emu{i}.sock"))
    }

    /// Sends a command to uplink `i`'s emulator (`set blackhole=1`, `outage 500`, …).
    pub fn emu(&self, i: usize, cmd: &str) -> Result<String> {
        let mut s = UnixStream::connect(self.emu_socket(i)).context("emulator control")?;
        writeln!(s, "{cmd}")?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        let line = line.trim().to_string();
        if line.starts_with("error") {
            bail!("emulator: {line}");
        }
        Ok(line)
    }

    pub fn nft(&self, role: &str, script: &str) -> Result<()> {
        run_with_input(
            Command::new("ip").args(["netns", "exec", &self.ns(role), "nft", "-f", "-"]),
            script.as_bytes(),
        )
        .with_context(|| format!("nft in {role} (apt-get install nftables): {script}"))?;
        Ok(())
    }

    /// A silent black hole inside ISP `i` (carrier stays up): an nft drop.
    pub fn isp_blackhole(&self, i: usize, on: bool) -> Result<()> {
        let isp = format!("isp{i}");
        if on {
            self.nft(
                &isp,
                "table inet hole { chain f { type filter hook forward priority 0; policy drop; }\n}",
            )
        } else {
            self.nft(&isp, "delete table inet hole")
        }
    }

    /// Carrier loss on uplink `i` (the emulator's edge-facing end goes down).
    pub fn carrier(&self, i: usize, up: bool) -> Result<()> {
        self.exec(
            &format!("emu{i}"),
            &[
                "ip",
                "link",
                "set",
                "dev",
                "toedge",
                if up { "up" } else { "down" },
            ],
        )?;
        Ok(())
    }

    /// Changes the ISP's NAT mapping for uplink `i` (a carrier-NAT rebinding): the
    /// masquerade moves to a different port range and existing mappings are flushed.
    pub fn rebind_nat(&self, i: usize) -> Result<()> {
        let isp = format!("isp{i}");
        self.nft(
            &isp,
            "flush table ip nat\ntable ip nat { chain post { type nat hook postrouting priority srcnat; oifname \"wan\" meta l4proto { tcp, udp } masquerade to :40000-40999; oifname \"wan\" masquerade; }\n}",
        )?;
        self.exec(&isp, &["conntrack", "-F"])?;
        Ok(())
    }

    fn keys_and_configs(&mut self, opts: &Options) -> Result<()> {
        let stallnet = bin("stallnet");
        let keygen = |dir: &Path| -> Result<String> {
            let out = run(Command::new(&stallnet)
                .arg("keygen")
                .arg("--state-dir")
                .arg(dir))?;
            Ok(String::from_utf8(out.stdout)?.trim().to_string())
        };
        self.edge_id = keygen(&self.dir.join("edge-state"))?;
        self.hub_id = keygen(&self.dir.join("hub-state"))?;
        let second = if opts.second_hub {
            self.hub2_id = keygen(&self.dir.join("hub2-state"))?;
            format!(
                ", {{ address = \"{HUB2_ADDR}:4433\", identity = \"{}\" }}",
                self.hub2_id
            )
        } else {
            String::new()
        };
        let mut uplinks = String::new();
        for (i, u) in self.uplinks.iter().enumerate() {
            uplinks.push_str(&format!(
                "[[edge.uplinks]]\nname = \"{}\"\ninterface = \"wan{}\"\nkind = \"{}\"\n\n",
                u.name,
                i + 1,
                u.kind
            ));
        }
        let edge = format!(
            "role = \"edge\"\nstate_dir = \"{d}/edge-state\"\nruntime_dir = \"{d}/edge-run\"\n\n[edge]\n\
             hubs = [{{ address = \"{HUB_ADDR}:4433\", identity = \"{hub}\" }}{second}]\n\
             lan = [\"10.1.0.0/24\"{more}]\npos_sources = [\"{POS_CLIENT}/32\"]\nfallback = \"{fb}\"\nmode = \"{mode}\"\n{mtu}\nreachability = {reach}\n{fields}\n{uplinks}{extra}",
            d = self.dir.display(),
            hub = self.hub_id,
            fb = if opts.fallback_direct { "direct" } else { "none" },
            mode = opts.edge_mode.unwrap_or("aggregate"),
            mtu = opts.edge_mtu.map(|m| format!("mtu = {m}\n")).unwrap_or_default(),
            extra = opts.edge_extra.clone().unwrap_or_default(),
            fields = opts.edge_fields.clone().unwrap_or_default(),
            more = opts.extra_lan.map(|p| format!(", \"{p}\"")).unwrap_or_default(),
            reach = opts
                .reachability
                .clone()
                .unwrap_or_else(|| "{ enabled = false }".into()),
        );
        std::fs::write(self.dir.join("edge.toml"), edge)?;
        let hub = format!(
            "role = \"hub\"\nstate_dir = \"{d}/hub-state\"\nruntime_dir = \"{d}/hub-run\"\n\n[hub]\n\
             listen = \"0.0.0.0:4433\"\npool = \"10.99.0.0/24\"\n\n[[hub.devices]]\nname = \"stall\"\n\
             identity = \"{edge}\"\nlan = [\"10.1.0.0/24\"{more}]\npos_sources = [\"{POS_CLIENT}/32\"]\n",
            d = self.dir.display(),
            edge = self.edge_id,
            more = opts.extra_lan.map(|p| format!(", \"{p}\"")).unwrap_or_default(),
        );
        let mut hub = hub;
        if let Some(pool) = opts.hub_pool {
            hub = hub.replace("pool = \"10.99.0.0/24\"", &format!("pool = \"{pool}\""));
        }
        for k in 2..2 + opts.extra_stalls {
            let id = keygen(&self.dir.join(format!("edge{k}-state")))?;
            let fresh = opts.unlisted_stall && k == 1 + opts.extra_stalls;
            let hubs = if fresh {
                String::new()
            } else {
                format!(
                    "{{ address = \"{HUB_ADDR}:4433\", identity = \"{}\" }}",
                    self.hub_id
                )
            };
            let edge = format!(
                "role = \"edge\"\nstate_dir = \"{d}/edge{k}-state\"\nruntime_dir = \"{d}/edge{k}-run\"\n\n[edge]\n\
                 hubs = [{hubs}]\n\
                 lan = [\"10.1.0.0/24\"]\npos_sources = [\"{POS_CLIENT}/32\"]\nfallback = \"{fb}\"\n\
                 reachability = {{ enabled = false }}\n\n\
                 [[edge.uplinks]]\nname = \"wired\"\ninterface = \"wan1\"\nkind = \"ethernet\"\n",
                d = self.dir.display(),
                fb = if fresh { "direct" } else { "none" },
            );
            std::fs::write(self.dir.join(format!("edge{k}.toml")), edge)?;
            self.stall_ids.push(id.clone());
            if fresh {
                continue;
            }
            hub.push_str(&format!(
                "\n[[hub.devices]]\nname = \"stall{k}\"\nidentity = \"{id}\"\nlan = [\"10.1.0.0/24\"]\npos_sources = [\"{POS_CLIENT}/32\"]\n"
            ));
        }
        if let Some(f) = &opts.hub_fields {
            hub = hub.replacen(
                "\n\n[[hub.devices]]",
                &format!("\n{f}\n\n[[hub.devices]]"),
                1,
            );
        }
        if let Some(extra) = &opts.hub_extra {
            hub.push('\n');
            hub.push_str(extra);
        }
        if opts.second_hub {
            // The same device on a second hub with its own state and tunnel pool.
            let hub2 = hub
                .replace("/hub-state\"", "/hub2-state\"")
                .replace("/hub-run\"", "/hub2-run\"")
                .replace("10.99.0.0/24", "10.98.0.0/24");
            std::fs::write(self.dir.join("hub2.toml"), hub2)?;
        }
        std::fs::write(self.dir.join("hub.toml"), hub)?;
        Ok(())
    }

    /// Runs `stallnet run --config <role>.toml` in namespace `role`, labelled `role`; its
    /// SD card's boot partition is the directory [`Self::boot_dir`] (never the machine's).
    pub fn run_daemon(&mut self, role: &str) -> Result<()> {
        let cfg = self.dir.join(format!("{role}.toml"));
        let boot = self.boot_dir(role);
        std::fs::create_dir_all(&boot)?;
        let b = bin("stallnet");
        self.spawn(
            role,
            role,
            &[
                b.to_str().context("path")?,
                "run",
                "--config",
                cfg.to_str().context("path")?,
                "--boot-dir",
                boot.to_str().context("path")?,
            ],
        )
    }

    /// What daemon `role` takes for its SD card's boot partition.
    pub fn boot_dir(&self, role: &str) -> PathBuf {
        self.dir.join(format!("{role}-boot"))
    }

    pub fn start_hub(&mut self) -> Result<()> {
        self.run_daemon("hub")
    }

    /// Starts the second hub (see [`Options::second_hub`]).
    pub fn start_hub2(&mut self) -> Result<()> {
        self.run_daemon("hub2")
    }

    pub fn start_edge(&mut self) -> Result<()> {
        self.run_daemon("edge")
    }

    /// Starts hub and edge and waits until every present uplink is up.
    pub fn start(&mut self) -> Result<()> {
        self.start_hub()?;
        if self.dir.join("hub2.toml").exists() {
            self.start_hub2()?;
        }
        self.start_edge()?;
        let stalls = 2..2 + self.stall_ids.len();
        for k in stalls.clone() {
            self.run_daemon(&format!("edge{k}"))?;
        }
        let fresh = self.unlisted_stall.then_some(1 + self.stall_ids.len());
        for k in stalls.filter(|k| Some(*k) != fresh) {
            let role = format!("edge{k}");
            self.wait_status(&role, Duration::from_secs(20), |s| up_links(s, "hub") == 1)
                .with_context(|| {
                    format!("{role} did not come up; its log:\n{}", self.log(&role))
                })?;
        }
        let want = self.uplinks.len();
        self.wait_status("edge", Duration::from_secs(20), |s| {
            up_links(s, "hub") == want
        })
        .with_context(|| {
            format!(
                "edge did not come up; edge log:\n{}\nhub log:\n{}",
                self.log("edge"),
                self.log("hub")
            )
        })?;
        Ok(())
    }

    /// The status document of `edge` or `hub`.
    pub fn status(&self, role: &str) -> Result<serde_json::Value> {
        let p = self.dir.join(format!("{role}-run")).join("status.json");
        let text = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        Ok(serde_json::from_slice(&text)?)
    }

    /// Waits until `pred` holds for the status of `role`.
    pub fn wait_status(
        &self,
        role: &str,
        limit: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let start = Instant::now();
        loop {
            if let Ok(s) = self.status(role) {
                if pred(&s) {
                    return Ok(s);
                }
            }
            if start.elapsed() > limit {
                bail!(
                    "{role} status condition not met within {limit:?}; last: {}",
                    self.status(role).map(|s| s.to_string()).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts the UDP echo server in the internet namespace on `port`.
    pub fn start_echo(&mut self, port: u16) -> Result<()> {
        let t = bin("stallnet-traffic");
        self.spawn(
            &format!("echo{port}"),
            "inet",
            &[
                t.to_str().context("path")?,
                "udp-echo",
                &format!("{SERVER}:{port}"),
            ],
        )?;
        // Bound before anything is sent to it (a busy machine starts it late, and a
        // flow's first packet would meet a closed port).
        wait_for(Duration::from_secs(10), || {
            let out = self.exec("inet", &["ss", "-Hlun", &format!("sport = :{port}")])?;
            Ok(!out.stdout.is_empty())
        })
        .with_context(|| format!("the echo server on port {port} did not start"))
    }

    /// Starts an HTTP upstream for the outbox in the internet namespace on `port`
    /// (`stallnet-traffic http-sink`): it answers every POST with 201 and logs each
    /// request's idempotency key and source to `log`, one JSON line each.
    pub fn start_http_sink(&mut self, port: u16, log: &Path) -> Result<()> {
        let t = bin("stallnet-traffic");
        self.spawn(
            &format!("upstream{port}"),
            "inet",
            &[
                t.to_str().context("path")?,
                "http-sink",
                &format!("{SERVER}:{port}"),
                log.to_str().context("path")?,
            ],
        )
    }

    /// Runs a UDP flow from the LAN (source `from`) to the echo server; returns its summary.
    pub fn udp_flow(
        &self,
        from: &str,
        port: u16,
        pps: u32,
        secs: f64,
    ) -> Result<serde_json::Value> {
        self.udp_flow_sized(from, port, pps, secs, 200)
    }

    /// [`Self::udp_flow`] with datagrams of `size` bytes.
    pub fn udp_flow_sized(
        &self,
        from: &str,
        port: u16,
        pps: u32,
        secs: f64,
        size: usize,
    ) -> Result<serde_json::Value> {
        let t = bin("stallnet-traffic");
        let out = self.exec(
            "lan",
            &[
                t.to_str().context("path")?,
                "udp-flow",
                &format!("{SERVER}:{port}"),
                &format!("{from}:0"),
                &pps.to_string(),
                &secs.to_string(),
                &size.to_string(),
            ],
        )?;
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Runs a UDP flow from namespace `role`, bound to `bind` (`addr:port`), to `to`;
    /// returns its summary.
    pub fn udp_flow_in(
        &self,
        role: &str,
        to: &str,
        bind: &str,
        pps: u32,
        secs: f64,
    ) -> Result<serde_json::Value> {
        let t = bin("stallnet-traffic");
        self.json(
            role,
            &[
                t.to_str().context("path")?,
                "udp-flow",
                to,
                bind,
                &pps.to_string(),
                &secs.to_string(),
            ],
        )
    }

    /// Starts an iperf3 server in the internet namespace on `port`.
    pub fn start_iperf_server(&mut self, port: u16) -> Result<()> {
        self.spawn(
            &format!("iperf-server{port}"),
            "inet",
            &["iperf3", "-s", "-B", SERVER, "-p", &port.to_string()],
        )
    }

    /// Starts `streams` cubic TCP flows from LAN address `from` to the iperf3 server on
    /// `port` for `secs` (downloads with `reverse`), in the background as `label`.
    pub fn start_iperf_load(
        &mut self,
        label: &str,
        from: &str,
        port: u16,
        reverse: bool,
        secs: u32,
        streams: u32,
    ) -> Result<()> {
        let (port, secs, streams) = (port.to_string(), secs.to_string(), streams.to_string());
        let mut args = vec![
            "iperf3", "-c", SERVER, "-p", &port, "-B", from, "-t", &secs, "-P", &streams, "-C",
            "cubic", "-J",
        ];
        if reverse {
            args.push("-R");
        }
        self.spawn(label, "lan", &args)
    }

    /// Runs a one-shot command in `role` and parses its JSON output.
    pub fn json(&self, role: &str, args: &[&str]) -> Result<serde_json::Value> {
        let out = self.exec(role, args)?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "{args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Starts dnsmasq in the internet namespace as the DNS server on `SERVER`, answering
    /// each `(name, address)` (and nothing else).
    pub fn start_dns(&mut self, names: &[(&str, &str)]) -> Result<()> {
        let pid = self.dir.join("dnsmasq.pid");
        let mut args: Vec<String> = vec![
            "dnsmasq".into(),
            "--keep-in-foreground".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--bind-interfaces".into(),
            format!("--listen-address={SERVER}"),
            "--port=53".into(),
            format!("--pid-file={}", pid.display()),
            "--local-ttl=60".into(),
        ];
        for (n, a) in names {
            args.push(format!("--address=/{n}/{a}"));
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn("dnsmasq", "inet", &refs)?;
        std::thread::sleep(Duration::from_millis(300));
        Ok(())
    }
}

/// The kinds of the edge's events about `uplink`, oldest first (`stallnet events`).
pub fn uplink_events(t: &Topology, uplink: &str) -> Result<Vec<String>> {
    let out = Command::new(bin("stallnet"))
        .args(["events", "--json", "--runtime-dir"])
        .arg(t.dir.join("edge-run"))
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["uplink"] == uplink)
        .map(|e| e["kind"].as_str().unwrap_or("").to_string())
        .collect())
}

/// Number of uplinks in state `up` in bond `bond` of a status document.
pub fn up_links(s: &serde_json::Value, bond: &str) -> usize {
    s["bonds"][bond]["links"]
        .as_array()
        .map_or(0, |l| l.iter().filter(|l| l["state"] == "up").count())
}

/// The link named `name` in any bond of a status document (the hub's bonds are named
/// for their devices), or null.
pub fn any_link(s: &serde_json::Value, name: &str) -> serde_json::Value {
    s["bonds"]
        .as_object()
        .into_iter()
        .flat_map(|b| b.values())
        .flat_map(|b| b["links"].as_array().cloned().unwrap_or_default())
        .find(|l| l["name"] == name)
        .unwrap_or_default()
}

/// Data packets the hub has sent down uplink `name` (0 when it has no such link).
pub fn hub_tx(t: &Topology, name: &str) -> Result<u64> {
    Ok(any_link(&t.status("hub")?, name)["tx_packets"]
        .as_u64()
        .unwrap_or(0))
}

/// State of the uplink named `name` in an edge status document.
pub fn link_state(s: &serde_json::Value, name: &str) -> String {
    s["bonds"]["hub"]["links"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["name"] == name))
        .and_then(|l| l["state"].as_str())
        .unwrap_or("missing")
        .to_string()
}

/// User + system CPU seconds process `pid` has used so far (USER_HZ is 100 on Linux).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after ')'.
    let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Resident memory of process `pid`, kB.
pub fn rss_kb(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

pub fn wait_for(limit: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("condition not met within {limit:?}")
}

fn terminate(c: &mut Child) {
    if let Ok(pid) = i32::try_from(c.id()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Debugging aid: STALLNET_HOLD_SECS=N keeps the topology up N seconds before
        // teardown so it can be inspected (`ip netns exec …`).
        if let Some(secs) = std::env::var("STALLNET_HOLD_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            eprintln!("holding topology {} for {secs} s", self.prefix);
            std::thread::sleep(Duration::from_secs(secs));
        }
        for (_, c) in self.children.iter_mut().rev() {
            terminate(c);
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        if std::thread::panicking() {
            eprintln!(
                "topology {} kept its logs in {}",
                self.prefix,
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
