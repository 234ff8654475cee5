//! Pumps one bond: moves bytes between the TUN device, the uplinks' QUIC connections and
//! the [`BondState`] that decides everything (see [`crate::core::bond`]). Used by both
//! roles, for both directions.
//!
//! Tasks: per connection a sender (asks the state for the next datagram, sends it, sleeps
//! until woken or until the time the state named) and a receiver (feeds datagrams in);
//! per bond a timer that sleeps until the state's `poll_timeout`, feeds the transport's
//! totals and calls `handle_timeout`, and a TUN writer. After every call into the state
//! its events are applied here: senders woken, connections closed, the peer's view of an
//! uplink published, released packets handed to the TUN writer in release order.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use ipnet::IpNet;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::core::bond::{BondEvent, BondState, LinkEvent, Transmit, TransportStats};
pub use crate::core::bond::{
    BondStatus, FlowStatus, Held, LinkCondition, LinkStatus, PeerView, Sent, Side,
};
use crate::core::classify::{Classifier, Malformed};
use crate::core::lan_map::LanMap;
use crate::core::qos::ClassMask;
use crate::core::rate::RateConfig;
use crate::core::scheduler::{LinkId, SchedulerConfig};

/// Where released packets go (the TUN device).
pub type Tun = Arc<super::tun_io::TunDevice>;

/// Released packets waiting for the TUN writer.
const TUN_QUEUE: usize = 4096;

/// The most datagrams one connection's receiver feeds in under one lock.
const RECV_BATCH: usize = 64;

/// What a bond is built from.
pub struct BondConfig {
    pub side: Side,
    pub sched: SchedulerConfig,
    pub classifier: Classifier,
    /// The hub's: where the device's LAN appears on the hub; released packets from the
    /// LAN get their source moved into the device's block on their way to the TUN.
    pub lan_map: Option<LanMap>,
    /// The TUN device's MTU: the largest packet handed in.
    pub mtu: u16,
}

/// The driver's side of one uplink: its connection and the handles of its tasks.
struct Pipe {
    conn: Option<quinn::Connection>,
    generation: u64,
    wake: Arc<Notify>,
    peer: watch::Sender<PeerView>,
}

struct Inner {
    st: BondState,
    pipes: Vec<Option<Pipe>>,
    next_generation: u64,
    /// The deadline the timer task sleeps until.
    armed: Option<Instant>,
}

pub struct Bond {
    inner: Mutex<Inner>,
    /// The state's [`BondState::path_mtu`] after the last call into it, for the TUN
    /// readers' MSS clamp without taking the lock.
    path_mtu: AtomicUsize,
    lan_map: Option<LanMap>,
    to_tun: tokio::sync::mpsc::Sender<Bytes>,
    timer: Notify,
    cancel: CancellationToken,
}

impl Bond {
    pub fn new(
        tun: Tun,
        cfg: BondConfig,
        accept_src: Option<Vec<IpNet>>,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        let now = Instant::now();
        let (to_tun, mut from_bond) = tokio::sync::mpsc::channel::<Bytes>(TUN_QUEUE);
        // Writes what is waiting in one batch, coalesced per flow.
        tokio::spawn(async move {
            let mut w = super::tun_io::Writer::default();
            let mut batch = Vec::with_capacity(super::tun_io::MAX_SEGMENTS);
            while from_bond
                .recv_many(&mut batch, super::tun_io::MAX_SEGMENTS)
                .await
                > 0
            {
                if let Err(e) = tun.write(&mut w, &batch).await {
                    tracing::debug!("tun write: {e}");
                }
                batch.clear();
            }
        });
        let st = BondState::new(
            crate::core::bond::BondConfig {
                side: cfg.side,
                sched: cfg.sched,
                classifier: cfg.classifier,
                accept_src,
                mtu: usize::from(cfg.mtu),
            },
            now,
        );
        let bond = Arc::new(Self {
            inner: Mutex::new(Inner {
                st,
                pipes: Vec::new(),
                next_generation: 1,
                armed: None,
            }),
            path_mtu: AtomicUsize::new(usize::from(cfg.mtu)),
            to_tun,
            lan_map: cfg.lan_map,
            timer: Notify::new(),
            cancel,
        });
        let b = bond.clone();
        tokio::spawn(async move { b.timer().await });
        bond
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock would be a bug in a core; keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies what the state asks for after a call into it (with the lock held, so
    /// released packets reach the TUN writer in release order).
    fn settle(&self, g: &mut Inner) {
        while let Some(p) = g.st.poll_tun() {
            let p = match &self.lan_map {
                Some(m) => to_hub(m, p),
                None => p,
            };
            if self.to_tun.try_send(p).is_err() {
                g.st.tun_overflowed();
            }
        }
        while let Some(ev) = g.st.poll_event() {
            match ev {
                BondEvent::Wake(id) => {
                    if let Some(Some(p)) = g.pipes.get(id) {
                        p.wake.notify_one();
                    }
                }
                BondEvent::Close(id, why) => {
                    if let Some(Some(p)) = g.pipes.get_mut(id) {
                        if let Some(c) = &p.conn {
                            c.close(0u32.into(), why.text().as_bytes());
                        }
                        p.wake.notify_one();
                    }
                }
                BondEvent::PeerView(id, view) => {
                    if let Some(Some(p)) = g.pipes.get(id) {
                        p.peer
                            .send_if_modified(|v| std::mem::replace(v, view) != view);
                    }
                }
            }
        }
        self.path_mtu.store(g.st.path_mtu(), Ordering::Relaxed);
        if !g.st.take_timers_moved() {
            return;
        }
        let t = g.st.poll_timeout();
        if t.is_some_and(|t| g.armed.is_none_or(|a| t < a)) {
            g.armed = t;
            self.timer.notify_one();
        }
    }

    /// Runs `f` on the state with the lock held, then applies what it asked for.
    fn with<R>(&self, f: impl FnOnce(&mut BondState, Instant) -> R) -> R {
        let mut g = self.lock();
        let r = f(&mut g.st, Instant::now());
        self.settle(&mut g);
        r
    }

    pub fn set_icmp_source(&self, addr: IpAddr) {
        self.with(|st, _| st.set_icmp_source(addr));
    }

    /// Adds an uplink slot that may carry `classes`, with bounds for its rate control; it
    /// carries nothing until a connection is attached.
    pub fn add_link(
        &self,
        name: &str,
        backup: bool,
        classes: ClassMask,
        rate: Option<RateConfig>,
    ) -> LinkId {
        let mut g = self.lock();
        let id = g.st.add_link(name, backup, classes, rate, Instant::now());
        let view = g.st.peer_view(id).unwrap_or(PeerView { backup, classes });
        if g.pipes.len() <= id {
            g.pipes.resize_with(id + 1, || None);
        }
        g.pipes[id] = Some(Pipe {
            conn: None,
            generation: 0,
            wake: Arc::new(Notify::new()),
            peer: watch::Sender::new(view),
        });
        self.settle(&mut g);
        id
    }

    /// Removes an uplink slot and closes its connection.
    pub fn remove_link(&self, id: LinkId) {
        let mut g = self.lock();
        g.st.remove_link(id, Instant::now());
        self.settle(&mut g);
        if let Some(Some(p)) = g.pipes.get_mut(id).map(Option::take) {
            if let Some(c) = p.conn {
                c.close(0u32.into(), b"removed");
            }
            p.wake.notify_one();
        }
    }

    /// Closes every connection of the bond (a revoked device) and stops its timer.
    pub fn close_all(&self, why: &[u8]) {
        let g = self.lock();
        for p in g.pipes.iter().flatten() {
            if let Some(c) = &p.conn {
                c.close(2u32.into(), why);
            }
            p.wake.notify_one();
        }
        drop(g);
        self.cancel.cancel();
    }

    /// The peer's sequence space starts anew when its epoch changes.
    pub fn peer_epoch(&self, epoch: u64) {
        if self.with(|st, _| st.peer_epoch(epoch)) {
            tracing::info!("peer restarted; reorder state reset");
        }
    }

    /// Interface presence and carrier, from netlink.
    pub fn set_carrier(&self, id: LinkId, present: bool, carrier: bool) {
        self.with(|st, now| st.handle_link_event(now, id, LinkEvent::Carrier { present, carrier }));
    }

    /// Switches uplink `id` off (it carries nothing and its connection is closed) or on.
    pub fn set_disabled(&self, id: LinkId, disabled: bool) {
        self.with(|st, now| st.set_disabled(id, disabled, now));
    }

    /// Keeps uplink `id` out of the bond for `reason` (its connection is closed, as for
    /// [`Self::set_disabled`]), or lets it back (`None`).
    pub fn set_held(&self, id: LinkId, reason: Option<Held>) {
        self.with(|st, now| st.set_held(id, reason, now));
    }

    /// Why uplink `id` is kept out of the bond, if it is.
    pub fn held(&self, id: LinkId) -> Option<Held> {
        self.lock().st.held(id)
    }

    /// Whether uplink `id` is a backup (configured or imposed) idling while a primary
    /// carries the tunnel.
    pub fn idle_backup(&self, id: LinkId) -> bool {
        self.lock().st.idle_backup(id)
    }

    /// Whether uplink `id`'s HTTPS check currently succeeds.
    pub fn set_verified(&self, id: LinkId, verified: bool) {
        self.with(|st, now| st.set_verified(id, verified, now));
    }

    /// Whether uplink `id` only carries traffic when no other uplink can.
    pub fn set_backup(&self, id: LinkId, backup: bool) {
        self.with(|st, now| st.set_backup(id, backup, now));
    }

    /// New classes for uplink `id`, and new rate bounds when `rate` is given.
    pub fn set_link_config(&self, id: LinkId, classes: ClassMask, rate: Option<RateConfig>) {
        self.with(|st, now| st.set_link_config(id, classes, rate, now));
    }

    /// Follows what the peer should hear of uplink `id` (see [`PeerView`]).
    pub fn peer_view(&self, id: LinkId) -> Option<watch::Receiver<PeerView>> {
        self.lock()
            .pipes
            .get(id)
            .and_then(Option::as_ref)
            .map(|p| p.peer.subscribe())
    }

    /// A connection on uplink `id` is established: start its sender and receiver.
    pub fn attach(self: &Arc<Self>, id: LinkId, conn: quinn::Connection) {
        let generation = {
            let mut g = self.lock();
            let generation = g.next_generation;
            g.next_generation += 1;
            let Some(Some(p)) = g.pipes.get_mut(id) else {
                return;
            };
            if let Some(old) = p.conn.replace(conn.clone()) {
                old.close(0u32.into(), b"replaced");
            }
            p.generation = generation;
            let peer_reads_delivered = super::session::version(&conn) >= 3;
            g.st.handle_link_event(
                Instant::now(),
                id,
                LinkEvent::Connected {
                    peer_reads_delivered,
                },
            );
            self.settle(&mut g);
            generation
        };
        let (b, c) = (self.clone(), conn.clone());
        tokio::spawn(async move { b.sender(id, generation, c).await });
        let (b, c) = (self.clone(), conn);
        tokio::spawn(async move { b.receiver(id, generation, c).await });
    }

    /// The pipe of uplink `id` if `generation` is still its connection.
    fn current(g: &Inner, id: LinkId, generation: u64) -> Option<&Pipe> {
        g.pipes
            .get(id)
            .and_then(Option::as_ref)
            .filter(|p| p.generation == generation)
    }

    fn detach(&self, id: LinkId, generation: u64) {
        let mut g = self.lock();
        let Some(Some(p)) = g.pipes.get_mut(id) else {
            return;
        };
        if p.generation != generation {
            return;
        }
        p.conn = None;
        g.st.handle_link_event(Instant::now(), id, LinkEvent::Disconnected);
        self.settle(&mut g);
    }

    /// The connection of uplink `id`, if one is attached.
    pub fn connection(&self, id: LinkId) -> Option<quinn::Connection> {
        self.lock()
            .pipes
            .get(id)
            .and_then(Option::as_ref)
            .and_then(|p| p.conn.clone())
    }

    /// The tunnel's MTU now (see [`BondState::path_mtu`]): what a TCP SYN's MSS is
    /// clamped to on its way in.
    pub fn path_mtu(&self) -> u16 {
        u16::try_from(self.path_mtu.load(Ordering::Relaxed)).unwrap_or(u16::MAX)
    }

    pub fn online(&self) -> bool {
        self.lock().st.online()
    }

    /// Packets read from the TUN so far (see [`BondState::tun_packets`]).
    pub fn tun_packets(&self) -> u64 {
        self.lock().st.tun_packets()
    }

    /// What the uplinks together have delivered at most lately, bytes per second.
    pub fn capacity(&self) -> f64 {
        self.lock().st.capacity()
    }

    /// Classifies an IP packet read from the TUN device and queues it for the peer (see
    /// [`BondState::handle_tun_packet`]).
    pub fn send(&self, packet: Bytes, fail_fast: bool) -> Result<Sent, Malformed> {
        self.with(|st, now| st.handle_tun_packet(now, packet, fail_fast))
    }

    /// [`Self::send`] for the packets of one TUN read, under one lock and one round of
    /// wake-ups; returns the indices of the POS packets to answer at once (see
    /// [`Sent::Offline`]). Malformed packets are counted by the state and dropped.
    pub fn send_batch(&self, packets: &[Bytes], fail_fast: bool) -> Vec<usize> {
        self.with(|st, now| {
            let mut offline = Vec::new();
            for (i, p) in packets.iter().enumerate() {
                if let Ok(Sent::Offline(_)) = st.handle_tun_packet(now, p.clone(), fail_fast) {
                    offline.push(i);
                }
            }
            offline
        })
    }

    /// New class settings (the edge's, on the hub).
    pub fn configure(&self, sched: SchedulerConfig) {
        self.with(|st, _| st.configure(sched));
    }

    /// New classification rules.
    pub fn set_rules(&self, rules: &[crate::core::classify::Rule]) {
        self.with(|st, _| st.set_rules(rules));
    }

    /// The driver's current addresses for the devices classification rule `index` names.
    pub fn set_resolved(
        &self,
        index: usize,
        devices: &crate::core::classify::DeviceRef,
        prefixes: Vec<IpNet>,
    ) {
        self.with(|st, _| st.set_resolved(index, devices, prefixes));
    }

    /// Sleeps until the state's next deadline; feeds the transport's totals, then the time.
    async fn timer(self: Arc<Self>) {
        loop {
            let deadline = self.lock().armed;
            let sleep = async {
                match deadline {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = sleep => {}
                _ = self.timer.notified() => continue,
                _ = self.cancel.cancelled() => return,
            }
            let mut g = self.lock();
            let now = Instant::now();
            let stats: Vec<(LinkId, TransportStats)> = g
                .pipes
                .iter()
                .enumerate()
                .filter_map(|(id, p)| Some((id, transport_stats(p.as_ref()?.conn.as_ref()?))))
                .collect();
            for (id, s) in stats {
                g.st.handle_link_event(now, id, LinkEvent::Stats(s));
            }
            g.st.handle_timeout(now);
            g.armed = None;
            self.settle(&mut g);
        }
    }

    async fn sender(self: Arc<Self>, id: LinkId, generation: u64, conn: quinn::Connection) {
        loop {
            let (next, wake) = {
                let mut g = self.lock();
                let Some(wake) = Self::current(&g, id, generation).map(|p| p.wake.clone()) else {
                    return;
                };
                let max = conn.max_datagram_size().unwrap_or(0);
                let t = g.st.poll_transmit(Instant::now(), id, max);
                self.settle(&mut g);
                (t, wake)
            };
            match next {
                Transmit::Datagram(d) => {
                    if let Err(e) = conn.send_datagram_wait(d).await {
                        tracing::debug!(link = id, "send: {e}");
                        self.detach(id, generation);
                        return;
                    }
                }
                Transmit::Idle { until } => {
                    let pause = async {
                        match until {
                            Some(t) => tokio::time::sleep_until(t.into()).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = wake.notified() => {}
                        _ = pause => {}
                        _ = conn.closed() => { self.detach(id, generation); return; }
                    }
                }
            }
        }
    }

    /// Feeds the connection's datagrams in: after waiting for one, takes those already
    /// waiting too (up to [`RECV_BATCH`]), under one lock.
    async fn receiver(self: Arc<Self>, id: LinkId, generation: u64, conn: quinn::Connection) {
        use futures::FutureExt;
        let mut batch = Vec::with_capacity(RECV_BATCH);
        loop {
            let mut next = conn.read_datagram().await;
            loop {
                match next {
                    Ok(d) => batch.push(d),
                    Err(e) => {
                        self.take_datagrams(id, generation, &mut batch);
                        tracing::info!(link = id, "connection ended: {e}");
                        self.detach(id, generation);
                        return;
                    }
                }
                if batch.len() == RECV_BATCH {
                    break;
                }
                match conn.read_datagram().now_or_never() {
                    Some(r) => next = r,
                    None => break,
                }
            }
            if !self.take_datagrams(id, generation, &mut batch) {
                return;
            }
        }
    }

    /// Feeds `batch` (emptied) to the state; false once `generation` is no longer
    /// uplink `id`'s connection.
    fn take_datagrams(&self, id: LinkId, generation: u64, batch: &mut Vec<Bytes>) -> bool {
        let mut g = self.lock();
        if Self::current(&g, id, generation).is_none() {
            return false;
        }
        let now = Instant::now();
        for d in batch.drain(..) {
            g.st.handle_datagram(now, id, d);
        }
        self.settle(&mut g);
        true
    }

    pub fn status(&self) -> BondStatus {
        self.lock().st.status(Instant::now())
    }
}

fn transport_stats(c: &quinn::Connection) -> TransportStats {
    let s = c.stats();
    TransportStats {
        rtt: s.path.rtt,
        udp_tx_bytes: s.udp_tx.bytes,
        udp_rx_bytes: s.udp_rx.bytes,
        lost_bytes: s.path.lost_bytes,
        udp_tx_datagrams: s.udp_tx.datagrams,
        udp_tx_ios: s.udp_tx.ios,
    }
}

/// `p` with its source moved into the device's block (one copy, only for a packet from
/// the device's LAN or an ICMP message, whose quote may name the LAN; anything else
/// passes as it is).
fn to_hub(m: &LanMap, p: Bytes) -> Bytes {
    let from_lan =
        matches!(crate::core::packet::addrs(&p), Some((IpAddr::V4(s), _)) if m.mapped(s).is_some());
    let icmp = p.first().is_some_and(|b| b >> 4 == 4) && p.get(9) == Some(&1);
    if !from_lan && !icmp {
        return p;
    }
    let mut b = bytes::BytesMut::from(&p[..]);
    m.to_hub(&mut b);
    b.freeze()
}
