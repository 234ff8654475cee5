//! The kernel's routing state over rtnetlink: reading links, addresses and default
//! routes; installing per-uplink tables, policy rules and LAN routes; and a change feed.
//!
//! Every change is recorded so that [`Netlink::revert`] undoes it: routes and rules
//! added, links created, addresses added and removed, links set up or into a bridge.
//! After `revert` the instance refuses further changes, so a task still running cannot
//! put one back after the undo.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;

use anyhow::{Context, Result};
use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::LinkFlags;
use netlink_packet_route::neighbour::NeighbourState;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, RouteMessageBuilder};
use tokio::sync::mpsc;

/// What the kernel says of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    /// Administratively up and carrier present.
    pub carrier: bool,
    pub ipv4: Vec<Ipv4Addr>,
    /// The prefixes of every address on the interface (IPv4 and IPv6).
    pub prefixes: Vec<IpNet>,
}

/// One change to undo.
#[derive(Debug, Clone)]
enum Added {
    Route(RouteMessage),
    Rule(RuleMessage),
    /// A link this instance created (a bridge, a VLAN): deleted.
    Link(u32),
    /// An address this instance added: removed.
    Address(AddressMessage),
    /// An address this instance removed: added back.
    RemovedAddress(AddressMessage),
    /// A link this instance set up that was down: set down.
    Up(u32),
    /// A link this instance put into a bridge: taken out.
    Controller(u32),
}

/// The changes made, and whether changes are still taken.
#[derive(Default)]
struct Ledger {
    added: Vec<Added>,
    closed: bool,
}

pub struct Netlink {
    handle: Handle,
    added: Mutex<Ledger>,
    /// One request at a time: concurrent dumps on one socket fail with EBUSY.
    serial: tokio::sync::Mutex<()>,
}

impl Netlink {
    /// Opens a netlink connection (its IO task runs on the current runtime).
    pub fn new() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("netlink socket")?;
        tokio::spawn(conn);
        Ok(Self {
            handle,
            added: Mutex::new(Ledger::default()),
            serial: tokio::sync::Mutex::new(()),
        })
    }

    /// A feed that yields whenever links, addresses or routes change. The caller re-reads
    /// what it cares about (this also covers lost events after a buffer overrun).
    pub fn watch() -> Result<mpsc::Receiver<()>> {
        use futures::StreamExt;
        use rtnetlink::constants::{RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_LINK};
        use rtnetlink::sys::{AsyncSocket, SocketAddr};
        let (mut conn, _, mut messages) = rtnetlink::new_connection().context("netlink")?;
        conn.socket_mut()
            .socket_mut()
            .bind(&SocketAddr::new(
                0,
                RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE,
            ))
            .context("netlink multicast bind")?;
        tokio::spawn(conn);
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            while messages.next().await.is_some() {
                // A full channel already carries a pending wake-up; nothing is lost.
                if tx.try_send(()).is_err() && tx.is_closed() {
                    break;
                }
            }
        });
        Ok(rx)
    }

    pub async fn link(&self, name: &str) -> Result<Option<LinkInfo>> {
        let _serial = self.serial.lock().await;
        let mut req = self.handle.link().get().match_name(name).execute();
        let msg = match req.try_next().await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(None),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                return Ok(None)
            }
            Err(e) => return Err(e).context("link get"),
        };
        let index = msg.header.index;
        let flags = msg.header.flags;
        let carrier = flags.contains(LinkFlags::Up) && flags.contains(LinkFlags::LowerUp);
        let mut ipv4 = Vec::new();
        let mut prefixes = Vec::new();
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(a) = addrs.try_next().await.context("address get")? {
            for attr in &a.attributes {
                if let AddressAttribute::Local(IpAddr::V4(v4)) = attr {
                    ipv4.push(*v4);
                }
                // IPv4 carries its address as Local (and Address), IPv6 only as Address.
                if let AddressAttribute::Address(ip) = attr {
                    if let Ok(n) = IpNet::new(*ip, a.header.prefix_len) {
                        if !prefixes.contains(&n.trunc()) {
                            prefixes.push(n.trunc());
                        }
                    }
                }
            }
        }
        Ok(Some(LinkInfo {
            index,
            carrier,
            ipv4,
            prefixes,
        }))
    }

    /// The gateway of a main-table IPv4 default route through interface `index`.
    pub async fn default_gateway(&self, index: u32) -> Result<Option<Ipv4Addr>> {
        let _serial = self.serial.lock().await;
        let mut routes = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        while let Some(r) = routes.try_next().await.context("route dump")? {
            if r.header.destination_prefix_length != 0 {
                continue;
            }
            let oif = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            if oif != Some(index) || route_table(&r) != 254 {
                continue;
            }
            let gw = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => Some(*g),
                _ => None,
            });
            if gw.is_some() {
                return Ok(gw);
            }
        }
        Ok(None)
    }

    /// Makes `table` hold exactly one default route: via `gateway` (or on-link) out of `oif`.
    pub async fn set_default_route(
        &self,
        table: u32,
        oif: u32,
        gateway: Option<Ipv4Addr>,
    ) -> Result<()> {
        let _serial = self.serial.lock().await;
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .output_interface(oif)
            .table_id(table);
        if let Some(gw) = gateway {
            b = b.gateway(gw);
        }
        self.replace_route(b.build())
            .await
            .with_context(|| format!("default route in table {table}"))
    }

    /// Adds or replaces a route and records it for [`Self::revert`]. Call serialized.
    async fn replace_route(&self, msg: RouteMessage) -> Result<()> {
        self.check_open()?;
        self.handle
            .route()
            .add(msg.clone())
            .replace()
            .execute()
            .await?;
        self.record(Added::Route(msg));
        Ok(())
    }

    /// Routes `prefix` out of `oif` in `table` (254 = main).
    pub async fn route_prefix(&self, prefix: IpNet, oif: u32, table: u32) -> Result<()> {
        let _serial = self.serial.lock().await;
        let msg = match prefix {
            IpNet::V4(p) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(p.addr(), p.prefix_len())
                .output_interface(oif)
                .table_id(table)
                .build(),
            IpNet::V6(p) => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(p.addr(), p.prefix_len())
                .output_interface(oif)
                .table_id(table)
                .build(),
        };
        self.replace_route(msg)
            .await
            .with_context(|| format!("route {prefix} table {table}"))
    }

    /// Makes `addr` (with its prefix) the only IPv4 address of interface `index`; `None`
    /// removes them all (a bridge port).
    pub async fn set_only_prefix(&self, index: u32, addr: Option<ipnet::Ipv4Net>) -> Result<()> {
        let _serial = self.serial.lock().await;
        self.check_open()?;
        let old: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .context("reading addresses")?;
        let old_msgs = old.clone();
        for m in old {
            let is_v4 = m
                .attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(_))));
            let same = addr.is_some_and(|addr| {
                m.header.prefix_len == addr.prefix_len()
                    && m.attributes.iter().any(|a| {
                        matches!(a, AddressAttribute::Address(IpAddr::V4(a)) if *a == addr.addr())
                    })
            });
            if is_v4 && !same {
                // Removing a primary address takes its secondaries with it: one of them
                // may already be gone (EADDRNOTAVAIL), which is what we want anyway.
                match self.handle.address().del(m.clone()).execute().await {
                    Ok(()) => self.record(Added::RemovedAddress(m)),
                    Err(e) => {
                        let gone = matches!(&e, rtnetlink::Error::NetlinkError(m)
                            if m.raw_code() == -libc::EADDRNOTAVAIL);
                        if !gone {
                            return Err(e).context("removing a stale address");
                        }
                    }
                }
            }
        }
        let Some(addr) = addr else {
            return Ok(());
        };
        let had = old_has(&old_msgs, addr);
        let mut req = self
            .handle
            .address()
            .add(index, IpAddr::V4(addr.addr()), addr.prefix_len())
            .replace();
        let msg = req.message_mut().clone();
        req.execute()
            .await
            .with_context(|| format!("address {addr}"))?;
        if !had {
            self.record(Added::Address(msg));
        }
        Ok(())
    }

    /// Creates the bridge `name` if it does not exist; returns its index.
    pub async fn ensure_bridge(&self, name: &str) -> Result<u32> {
        if let Some(l) = self.link(name).await? {
            return Ok(l.index);
        }
        {
            let _serial = self.serial.lock().await;
            self.check_open()?;
            self.handle
                .link()
                .add(rtnetlink::LinkBridge::new(name).build())
                .execute()
                .await
                .with_context(|| format!("creating bridge {name}"))?;
        }
        let index = self
            .link(name)
            .await?
            .map(|l| l.index)
            .with_context(|| format!("bridge {name} vanished"))?;
        self.record(Added::Link(index));
        Ok(index)
    }

    /// Creates the VLAN `name` (id `id` on `parent`) if it does not exist; returns its index.
    pub async fn ensure_vlan(&self, name: &str, parent: u32, id: u16) -> Result<u32> {
        if let Some(l) = self.link(name).await? {
            return Ok(l.index);
        }
        {
            let _serial = self.serial.lock().await;
            self.check_open()?;
            self.handle
                .link()
                .add(rtnetlink::LinkVlan::new(name, parent, id).up().build())
                .execute()
                .await
                .with_context(|| format!("creating VLAN {name}"))?;
        }
        let index = self
            .link(name)
            .await?
            .map(|l| l.index)
            .with_context(|| format!("VLAN {name} vanished"))?;
        self.record(Added::Link(index));
        Ok(index)
    }

    /// Sets interface `index` up, and into bridge `controller` when given.
    pub async fn set_up(&self, index: u32, controller: Option<u32>) -> Result<()> {
        let _serial = self.serial.lock().await;
        self.check_open()?;
        let before = self
            .handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_next()
            .await
            .with_context(|| format!("reading link {index}"))?;
        let was_up = before
            .as_ref()
            .is_some_and(|m| m.header.flags.contains(LinkFlags::Up));
        let had_controller = before.as_ref().and_then(|m| {
            m.attributes.iter().find_map(|a| match a {
                netlink_packet_route::link::LinkAttribute::Controller(c) => Some(*c),
                _ => None,
            })
        });
        let mut b = rtnetlink::LinkUnspec::new_with_index(index).up();
        if let Some(c) = controller {
            b = b.controller(c);
        }
        self.handle
            .link()
            .set(b.build())
            .execute()
            .await
            .with_context(|| format!("setting link {index} up"))?;
        if !was_up {
            self.record(Added::Up(index));
        }
        if controller.is_some() && had_controller.is_none() {
            self.record(Added::Controller(index));
        }
        Ok(())
    }

    /// Routes `dst/32` out of `oif` with preferred source `src` in `table`.
    pub async fn route_host(
        &self,
        dst: Ipv4Addr,
        oif: u32,
        src: Ipv4Addr,
        table: u32,
    ) -> Result<()> {
        let _serial = self.serial.lock().await;
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, 32)
            .output_interface(oif)
            .pref_source(src)
            .table_id(table)
            .build();
        self.replace_route(msg)
            .await
            .with_context(|| format!("route {dst}/32 table {table}"))
    }

    /// Removes the route to `dst/32` out of `oif` in `table`, if there is one.
    pub async fn unroute_host(&self, dst: Ipv4Addr, oif: u32, table: u32) {
        let _serial = self.serial.lock().await;
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, 32)
            .output_interface(oif)
            .table_id(table)
            .build();
        if let Err(e) = self.handle.route().del(msg).execute().await {
            tracing::debug!("removing route {dst}/32: {e}");
        }
    }

    /// Policy rule: packets carrying `mark` look up `table`.
    pub async fn rule_fwmark(&self, mark: u32, table: u32, priority: u32) -> Result<()> {
        let req = self
            .handle
            .rule()
            .add()
            .v4()
            .fw_mark(mark)
            .table_id(table)
            .action(RuleAction::ToTable)
            .priority(priority);
        self.add_rule(req.message_mut_clone(), req).await
    }

    fn source_rule(
        &self,
        prefix: ipnet::Ipv4Net,
        table: u32,
        priority: u32,
    ) -> rtnetlink::RuleAddRequest<Ipv4Addr> {
        self.handle
            .rule()
            .add()
            .v4()
            .source_prefix(prefix.addr(), prefix.prefix_len())
            .table_id(table)
            .action(RuleAction::ToTable)
            .priority(priority)
    }

    /// Policy rule: packets from `prefix` look up `table`.
    pub async fn rule_from(&self, prefix: ipnet::Ipv4Net, table: u32, priority: u32) -> Result<()> {
        let req = self.source_rule(prefix, table, priority);
        self.add_rule(req.message_mut_clone(), req).await
    }

    /// Removes a rule added by [`Self::rule_from`] (gone already is fine).
    pub async fn unrule_from(&self, prefix: ipnet::Ipv4Net, table: u32, priority: u32) {
        let msg = self
            .source_rule(prefix, table, priority)
            .message_mut_clone();
        let _serial = self.serial.lock().await;
        let _ = self.handle.rule().del(msg.clone()).execute().await;
        if let Ok(mut v) = self.added.lock() {
            v.added
                .retain(|a| !matches!(a, Added::Rule(m) if *m == msg));
        }
    }

    /// Policy rule: packets to `prefix` look up `table`.
    pub async fn rule_to(&self, prefix: ipnet::Ipv4Net, table: u32, priority: u32) -> Result<()> {
        let req = self
            .handle
            .rule()
            .add()
            .v4()
            .destination_prefix(prefix.addr(), prefix.prefix_len())
            .table_id(table)
            .action(RuleAction::ToTable)
            .priority(priority);
        self.add_rule(req.message_mut_clone(), req).await
    }

    async fn add_rule(
        &self,
        msg: RuleMessage,
        req: rtnetlink::RuleAddRequest<Ipv4Addr>,
    ) -> Result<()> {
        let _serial = self.serial.lock().await;
        self.check_open()?;
        // Remove a leftover identical rule from an earlier run first: rules do not replace.
        let _ = self.handle.rule().del(msg.clone()).execute().await;
        req.execute().await.context("policy rule")?;
        self.record(Added::Rule(msg));
        Ok(())
    }

    fn record(&self, a: Added) {
        if let Ok(mut v) = self.added.lock() {
            v.added.push(a);
        }
    }

    /// Forgets the IPv4 neighbours of interface `index` that are still being resolved or
    /// were given up on (INCOMPLETE, FAILED). For an uplink whose carrier came back: an
    /// address resolution begun while it was down (the gateway's, for the packets sent
    /// meanwhile) retries on its own timer, a second apart, and every packet to the
    /// gateway waits behind it or fails: measured, 0.6 s more before a restored uplink
    /// reached the hub. Forgotten, the next packet asks at once. The kernel's cache
    /// refills itself, so there is nothing to undo.
    pub async fn forget_unresolved_neighbours(&self, index: u32) {
        let _serial = self.serial.lock().await;
        if self.check_open().is_err() {
            return;
        }
        let mut dump = self
            .handle
            .neighbours()
            .get()
            .set_address_family(netlink_packet_route::AddressFamily::Inet)
            .execute();
        let mut unresolved = Vec::new();
        loop {
            match dump.try_next().await {
                Ok(Some(m)) => {
                    if m.header.ifindex == index
                        && matches!(
                            m.header.state,
                            NeighbourState::Incomplete | NeighbourState::Failed
                        )
                    {
                        unresolved.push(m);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!("reading the neighbour table: {e}");
                    break;
                }
            }
        }
        for m in unresolved {
            if let Err(e) = self.handle.neighbours().del(m).execute().await {
                tracing::debug!("forgetting an unresolved neighbour: {e}");
            }
        }
    }

    /// Refuses a change once [`Self::revert`] has run. Call serialized (under `serial`,
    /// which `revert` holds while it closes), so no change slips in after the undo.
    fn check_open(&self) -> Result<()> {
        match self.added.lock() {
            Ok(v) if !v.closed => Ok(()),
            _ => anyhow::bail!("stopping: the kernel's state is being restored"),
        }
    }

    /// Removes what this instance added to routing table `table` and the rules that
    /// point at it (an uplink taken out of the config).
    pub async fn release_table(&self, table: u32) {
        self.release(|a| match a {
            Added::Route(m) => route_table(m) == table,
            Added::Rule(m) => rule_table(m) == table,
            _ => false,
        })
        .await;
    }

    /// Removes the rules this instance added at `priority` (rules rebuilt on a reload).
    pub async fn release_rules_at(&self, priority: u32) {
        self.release(|a| match a {
            Added::Rule(m) => m
                .attributes
                .iter()
                .any(|x| matches!(x, RuleAttribute::Priority(p) if *p == priority)),
            _ => false,
        })
        .await;
    }

    /// Removes what `pick` selects among the rules and routes added, newest first.
    async fn release(&self, pick: impl Fn(&Added) -> bool) {
        self.release_and(pick, false).await;
    }

    /// Undoes what `pick` selects, newest first; `close` refuses every later change.
    async fn release_and(&self, pick: impl Fn(&Added) -> bool, close: bool) {
        let _serial = self.serial.lock().await;
        let picked: Vec<Added> = match self.added.lock() {
            Ok(mut v) => {
                v.closed |= close;
                let (picked, kept): (Vec<Added>, Vec<Added>) = v.added.drain(..).partition(&pick);
                v.added = kept;
                picked
            }
            Err(_) => return,
        };
        for a in picked.into_iter().rev() {
            let r = match a {
                Added::Route(m) => self.handle.route().del(m).execute().await,
                Added::Rule(m) => self.handle.rule().del(m).execute().await,
                Added::Link(i) => self.handle.link().del(i).execute().await,
                Added::Address(m) => self.handle.address().del(m).execute().await,
                Added::RemovedAddress(m) => {
                    let mut req =
                        self.handle
                            .address()
                            .add(0, IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
                    *req.message_mut() = m;
                    req.execute().await
                }
                Added::Up(i) => {
                    let msg = rtnetlink::LinkUnspec::new_with_index(i).down().build();
                    self.handle.link().set(msg).execute().await
                }
                Added::Controller(i) => {
                    let msg = rtnetlink::LinkUnspec::new_with_index(i)
                        .nocontroller()
                        .build();
                    self.handle.link().set(msg).execute().await
                }
            };
            if let Err(e) = r {
                tracing::debug!("release: {e}");
            }
        }
    }

    /// Undoes every change this instance made, newest first, and refuses any later one.
    pub async fn revert(&self) {
        self.release_and(|_| true, true).await;
    }
}

/// Whether `old` (an address dump) already holds `addr` with its prefix length.
fn old_has(old: &[AddressMessage], addr: ipnet::Ipv4Net) -> bool {
    old.iter().any(|m| {
        m.header.prefix_len == addr.prefix_len()
            && m.attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(a)) if *a == addr.addr()))
    })
}

fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

fn rule_table(m: &RuleMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

/// Gives access to the message of a rule request before it is executed.
trait RuleMsg {
    fn message_mut_clone(&self) -> RuleMessage;
}

impl RuleMsg for rtnetlink::RuleAddRequest<Ipv4Addr> {
    fn message_mut_clone(&self) -> RuleMessage {
        let mut me = self.clone();
        me.message_mut().clone()
    }
}
