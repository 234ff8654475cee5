//! The hub's devices while it runs: who is admitted, which bond a download goes to, and
//! where each device's tunnel address and LAN blocks are. Devices come and go one at a
//! time (enrolled, revoked) without touching the others: the table is rebuilt on each
//! change and swapped in under a write lock; the TUN reader takes a read lock per packet.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use ipnet::{IpNet, Ipv4Net};
use tokio_util::sync::CancellationToken;

use crate::core::classify::{Classifier, ClassifyConfig, Rule};
use crate::core::lan_map::{LanMap, Overlap, Routes};
use crate::core::scheduler::SchedulerConfig;
use crate::driver::bond::{Bond, BondConfig, Side, Tun};
use crate::driver::session::BoxReport;
use crate::identity::AllowList;

/// One admitted device and its bond.
pub struct Device {
    pub name: String,
    pub identity: String,
    /// Its tunnel address.
    pub address: IpAddr,
    /// Its IPv4 LAN and where that appears on the hub.
    pub map: LanMap,
    /// Its IPv6 LAN prefixes (routed as they are; config devices only).
    pub lan6: Vec<IpNet>,
    pub bond: Arc<Bond>,
    /// Listed in the config (not enrolled): revoked by editing the config only.
    pub from_config: bool,
    /// What the box last reported of itself (sales waiting), and when (session version
    /// 2; `None` until a report came).
    pub report: Mutex<Option<(BoxReport, Instant)>>,
}

/// Where a device sits on the hub: its tunnel address and its LAN's blocks.
pub struct Place {
    pub address: Ipv4Addr,
    pub map: LanMap,
}

/// What every device's bond is made from.
pub struct Maker {
    pub tun: Tun,
    /// The TUN device's MTU.
    pub mtu: u16,
    pub sched: SchedulerConfig,
    pub hub_address: Ipv4Addr,
    pub pool: Ipv4Net,
    pub space: Ipv4Net,
    pub cancel: CancellationToken,
}

/// A device that cannot be placed.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error("hub.pool {0} has no tunnel address left")]
    Pool(Ipv4Net),
    #[error("hub.lan_map {0} has no room left for a /{1}")]
    Space(Ipv4Net, u8),
    #[error("{0}")]
    Overlap(#[from] Overlap),
    #[error("{0}")]
    Size(#[from] crate::core::lan_map::SizeMismatch),
}

impl Maker {
    /// A device with its bond (`rules` classify its downloads).
    pub fn make(
        &self,
        name: &str,
        identity: &str,
        place: Place,
        lan6: Vec<IpNet>,
        rules: &[Rule],
        from_config: bool,
    ) -> Arc<Device> {
        let Place { address, map } = place;
        let mut accept: Vec<IpNet> = map.lans().map(IpNet::V4).collect();
        accept.extend(lan6.iter().copied());
        accept.push(IpNet::from(IpAddr::V4(address)));
        let bond = Bond::new(
            self.tun.clone(),
            BondConfig {
                side: Side::Hub,
                sched: self.sched.clone(),
                classifier: Classifier::new(rules, ClassifyConfig::default()),
                lan_map: Some(map.clone()),
                mtu: self.mtu,
            },
            Some(accept),
            self.cancel.child_token(),
        );
        bond.set_icmp_source(IpAddr::V4(self.hub_address));
        Arc::new(Device {
            name: name.into(),
            identity: identity.into(),
            address: IpAddr::V4(address),
            map,
            lan6,
            bond,
            from_config,
            report: Mutex::new(None),
        })
    }
}

struct Table {
    devices: Vec<Arc<Device>>,
    routes: Routes,
}

pub struct Fleet {
    table: RwLock<Table>,
    allow: AllowList,
}

fn routes_of(devices: &[Arc<Device>]) -> Result<Routes, Overlap> {
    let mut entries = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        entries.push((IpNet::from(d.address), i));
        entries.extend(d.map.blocks().map(|b| (IpNet::V4(b), i)));
        entries.extend(d.lan6.iter().map(|p| (*p, i)));
    }
    Routes::new(entries)
}

impl Fleet {
    pub fn new(devices: Vec<Arc<Device>>, allow: AllowList) -> Result<Self, Overlap> {
        let routes = routes_of(&devices)?;
        if let Ok(mut a) = allow.write() {
            *a = devices.iter().map(|d| d.identity.clone()).collect();
        }
        Ok(Self {
            table: RwLock::new(Table { devices, routes }),
            allow,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn list(&self) -> Vec<Arc<Device>> {
        self.read().devices.clone()
    }

    pub fn by_identity(&self, id: &str) -> Option<Arc<Device>> {
        self.read()
            .devices
            .iter()
            .find(|d| d.identity == id)
            .cloned()
    }

    pub fn by_name(&self, name: &str) -> Option<Arc<Device>> {
        self.read().devices.iter().find(|d| d.name == name).cloned()
    }

    /// The device a packet read from the TUN is for.
    pub fn for_destination(&self, dst: IpAddr) -> Option<Arc<Device>> {
        let t = self.read();
        t.routes.lookup(dst).and_then(|i| t.devices.get(i)).cloned()
    }

    /// Adds a device with `lan` at the first free tunnel address and blocks, made by
    /// `make` (its identity passes the handshake from then on). Placing and admitting
    /// happen under one write lock, so two devices added at once never share a place.
    pub fn add(
        &self,
        m: &Maker,
        lan: &[Ipv4Net],
        make: impl FnOnce(Place) -> Arc<Device>,
    ) -> Result<Arc<Device>, PlaceError> {
        let mut t = self.write();
        let used: Vec<IpAddr> = t.devices.iter().map(|d| d.address).collect();
        let address = m
            .pool
            .hosts()
            .filter(|a| *a != m.hub_address)
            .find(|a| !used.contains(&IpAddr::V4(*a)))
            .ok_or(PlaceError::Pool(m.pool))?;
        let mut taken: Vec<Ipv4Net> = t.devices.iter().flat_map(|d| d.map.blocks()).collect();
        let mut pairs = Vec::new();
        for l in lan {
            let b = stallnet_netconf::lan_map::first_free(m.space, &taken, l.prefix_len())
                .ok_or(PlaceError::Space(m.space, l.prefix_len()))?;
            taken.push(b);
            pairs.push((l.trunc(), b));
        }
        let dev = make(Place {
            address,
            map: LanMap::new(pairs)?,
        });
        let mut devices = t.devices.clone();
        devices.push(dev.clone());
        t.routes = match routes_of(&devices) {
            Ok(r) => r,
            Err(e) => {
                // Not placed after all: its bond's tasks stop.
                dev.bond.close_all(b"not placed");
                return Err(e.into());
            }
        };
        t.devices = devices;
        drop(t);
        if let Ok(mut a) = self.allow.write() {
            a.insert(dev.identity.clone());
        }
        Ok(dev)
    }

    /// Takes device `name` out: refused in the handshake from now on, its connections
    /// closed, its bond stopped.
    pub fn remove(&self, name: &str) -> Option<Arc<Device>> {
        let mut t = self.write();
        let i = t.devices.iter().position(|d| d.name == name)?;
        let mut devices = t.devices.clone();
        let dev = devices.remove(i);
        // Removing never makes ranges overlap.
        t.routes = routes_of(&devices).unwrap_or_default();
        t.devices = devices;
        drop(t);
        if let Ok(mut a) = self.allow.write() {
            a.remove(&dev.identity);
        }
        dev.bond.close_all(b"revoked");
        Some(dev)
    }
}
