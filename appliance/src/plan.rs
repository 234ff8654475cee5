//! From a validated config to everything the daemon runs with, built without a kernel:
//! the classes, the scheduler and its QoS, the classifier, each uplink's class mask, rate
//! bounds, cap and routing table, the reachability checks' timing, the rendered dnsmasq,
//! firewall and wpa_supplicant files, and the hub's tunnel addresses. Each core is also
//! constructed once, as the daemon constructs it.
//!
//! Both roles build their plan first at start, before anything in the kernel changes, so
//! a config the daemon cannot run is refused with a reason instead of half-applied; the
//! property test (`tests/plan.rs`) builds it from arbitrary configs that validate, which
//! is the proof of "every config that validates can start".

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use stallnet_netconf::classes::ClassSpec;
use stallnet_netconf::{Config, EdgeConfig, Rule};

use crate::classes;
use crate::core::cap::{CapSpec, CapState};
use crate::core::classify::{Classifier, ClassifyConfig};
use crate::core::lan_map::{LanMap, Routes};
use crate::core::qos::ClassMask;
use crate::core::rate::{RateConfig, RateControl};
use crate::core::reach::{Reach, ReachConfig};
use crate::core::scheduler::{Scheduler, SchedulerConfig};

/// Why a config that validated cannot run: a bug in validation, said plainly.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("config has no [{0}] section")]
    Missing(&'static str),
    #[error("{0}")]
    Unwritable(#[from] stallnet_netconf::grammar::Unwritable),
    #[error(
        "routing table {base} + {slot} is out of range or one of the kernel's own (0, 253-255)"
    )]
    Table { base: u32, slot: u32 },
    #[error("hub.pool {0} is not an IPv4 prefix with room for the hub and every device")]
    Pool(IpNet),
    #[error("hub.lan_map {0} is not an IPv4 prefix")]
    LanMapSpace(IpNet),
    #[error("hub.lan_map: {0}")]
    LanMapRoom(#[from] stallnet_netconf::lan_map::NoRoom),
    #[error("hub.lan_map: {0}")]
    LanMapSize(#[from] crate::core::lan_map::SizeMismatch),
    #[error("hub routes: {0}")]
    Routes(#[from] crate::core::lan_map::Overlap),
}

/// One uplink as the edge runs it.
#[derive(Debug, Clone)]
pub struct UplinkPlan {
    pub name: String,
    pub classes: ClassMask,
    pub rate: RateConfig,
    pub cap: Option<CapSpec>,
    /// Its routing table (and socket mark) while it holds bond slot = its position.
    pub table: u32,
}

/// The edge's runtime parameters.
#[derive(Debug, Clone)]
pub struct EdgePlan {
    pub specs: Vec<ClassSpec>,
    pub sched: SchedulerConfig,
    pub rules: Vec<crate::core::classify::Rule>,
    pub uplinks: Vec<UplinkPlan>,
    pub reach: ReachConfig,
    /// The rendered dnsmasq file and firewall script (with `[lan]`).
    pub dnsmasq: Option<String>,
    pub firewall: Option<String>,
    /// The rendered wpa_supplicant file of each wifi uplink with a network.
    pub wifi: Vec<String>,
}

/// The hub's runtime parameters.
#[derive(Debug, Clone)]
pub struct HubPlan {
    pub hub_address: Ipv4Addr,
    pub prefix_len: u8,
    /// The tunnel pool and the LAN map space.
    pub pool: ipnet::Ipv4Net,
    pub lan_map: ipnet::Ipv4Net,
    /// Each device's tunnel address, in config order.
    pub device_addresses: Vec<Ipv4Addr>,
    /// Each device's download rules (its POS sources, then the built-in rules).
    pub device_rules: Vec<Vec<crate::core::classify::Rule>>,
    /// Each device's IPv4 LAN prefixes and where they appear on the hub.
    pub device_maps: Vec<LanMap>,
    /// Which device a packet read from the TUN is for (tunnel addresses, blocks, IPv6
    /// LAN prefixes), by index.
    pub routes: Routes,
    /// The nft script isolating stalls from one another and from the hub.
    pub isolation: String,
    pub sched: SchedulerConfig,
}

/// The routing table of the uplink in bond slot `slot` (the tunnel's is `base`): never
/// one of the kernel's own (0 unspecified, 253 default, 254 main, 255 local).
pub fn uplink_table(base: u32, slot: u32) -> Result<u32, PlanError> {
    base.checked_add(1)
        .and_then(|t| t.checked_add(slot))
        .filter(|t| !matches!(t, 0 | 253..=255))
        .ok_or(PlanError::Table { base, slot })
}

/// The reachability checks' timing from `[edge.reachability]`.
pub fn reach_config(r: &stallnet_netconf::Reachability) -> ReachConfig {
    ReachConfig {
        interval: Duration::from_secs(r.interval_s),
        https_interval: Duration::from_secs(r.https_interval_s),
        backup_interval: Duration::from_secs(r.backup_interval_s),
        https_failures: 2,
    }
}

/// The edge's plan, with every core constructed once.
pub fn edge(cfg: &Config) -> Result<EdgePlan, PlanError> {
    let e: &EdgeConfig = cfg.edge().ok_or(PlanError::Missing("edge"))?;
    let specs = classes::specs(e);
    let sched = classes::sched_config(&specs, e.mode);
    let rules = classes::rules(e);
    let now = Instant::now();
    let _ = Scheduler::new(sched.clone());
    let _ = Classifier::new(&rules, ClassifyConfig::default());
    // The highest table in use: while a reload starts new uplinks before it stops the
    // ones they replace, twice as many slots are held for a moment.
    let slots = u32::try_from(e.uplinks.len().saturating_mul(2)).unwrap_or(u32::MAX);
    if matches!(e.table_base, 0 | 253..=255) {
        return Err(PlanError::Table {
            base: e.table_base,
            slot: 0,
        });
    }
    for slot in 0..=slots {
        uplink_table(e.table_base, slot)?;
    }
    let mut uplinks = Vec::new();
    for (slot, u) in (0u32..).zip(e.uplinks.iter()) {
        let u = u.get_ref();
        let rate = classes::rate_config(u);
        let _ = RateControl::new(rate.clone());
        let cap = crate::cap_meter::spec(u);
        if let Some(c) = &cap {
            // The first observation of the interface's counters.
            let _ = CapState::default().observe(c, 0, 0);
        }
        uplinks.push(UplinkPlan {
            name: u.name.clone(),
            classes: classes::link_mask(&specs, u),
            rate,
            cap,
            table: uplink_table(e.table_base, slot)?,
        });
    }
    let reach = reach_config(&e.reachability);
    let _ = Reach::new(reach.clone(), now);
    let (dnsmasq, firewall) = match cfg.lan.as_ref().map(|l| l.get_ref()) {
        Some(lan) => (
            Some(stallnet_netconf::lan::dnsmasq_conf(
                lan,
                &e.dhcp_leases.display().to_string(),
                "the running config",
            )?),
            Some(stallnet_netconf::firewall::render(
                lan,
                &firewall_inputs(cfg),
            )?),
        ),
        None => (None, None),
    };
    let wifi = e
        .uplinks
        .iter()
        .filter_map(|u| u.get_ref().wifi.as_ref())
        .map(|w| stallnet_netconf::wifi::wpa_supplicant_conf(w, "/run/stallnet/wpa"))
        .collect();
    Ok(EdgePlan {
        specs,
        sched,
        rules,
        uplinks,
        reach,
        dnsmasq,
        firewall,
        wifi,
    })
}

/// What the firewall needs besides `[lan]`, from the rest of the config.
pub fn firewall_inputs(cfg: &Config) -> stallnet_netconf::firewall::Inputs {
    stallnet_netconf::firewall::Inputs {
        api: cfg.commerce().map(|c| c.listen),
        metrics: cfg.metrics.as_ref().map(|m| m.listen),
        guest_prefixes: cfg
            .commerce()
            .map(|c| c.deny_from.clone())
            .unwrap_or_default(),
    }
}

/// The hub's plan.
pub fn hub(cfg: &Config) -> Result<HubPlan, PlanError> {
    let h = cfg.hub().ok_or(PlanError::Missing("hub"))?;
    let IpNet::V4(pool) = h.pool else {
        return Err(PlanError::Pool(h.pool));
    };
    let mut hosts = pool.hosts();
    let hub_address = hosts.next().ok_or(PlanError::Pool(h.pool))?;
    let device_addresses: Vec<Ipv4Addr> = hosts.by_ref().take(h.devices.len()).collect();
    if device_addresses.len() < h.devices.len() {
        return Err(PlanError::Pool(h.pool));
    }
    let specs = stallnet_netconf::classes::effective_classes(&Default::default());
    let sched = classes::sched_config(&specs, h.mode);
    let _ = Scheduler::new(sched.clone());
    let mut device_rules = Vec::new();
    for d in &h.devices {
        // Downloads follow the class the edge gave each flow; flows the edge did not
        // start are classified by the device's POS sources and the built-in rules.
        let mut rules = Vec::new();
        if !d.get_ref().pos_sources.is_empty() {
            rules.push(Rule {
                class: stallnet_netconf::ClassName::Pos,
                dst: d.get_ref().pos_sources.clone(),
                ..Default::default()
            });
        }
        rules.extend(stallnet_netconf::classes::default_rules());
        let rules = classes::core_rules(&rules);
        let _ = Classifier::new(&rules, ClassifyConfig::default());
        device_rules.push(rules);
    }
    let IpNet::V4(space) = h.lan_map else {
        return Err(PlanError::LanMapSpace(h.lan_map));
    };
    let lans: Vec<&[IpNet]> = h
        .devices
        .iter()
        .map(|d| d.get_ref().lan.as_slice())
        .collect();
    let device_maps = stallnet_netconf::lan_map::blocks(space, &lans)?
        .into_iter()
        .map(|b| LanMap::new(b.into_iter().map(|b| (b.lan, b.mapped))))
        .collect::<Result<Vec<_>, _>>()?;
    let mut entries = Vec::new();
    for (i, ((a, m), d)) in device_addresses
        .iter()
        .zip(&device_maps)
        .zip(&h.devices)
        .enumerate()
    {
        entries.push((IpNet::from(IpAddr::V4(*a)), i));
        entries.extend(m.blocks().map(|b| (IpNet::V4(b), i)));
        entries.extend(
            d.get_ref()
                .lan
                .iter()
                .filter(|p| p.network().is_ipv6())
                .map(|p| (*p, i)),
        );
    }
    let routes = Routes::new(entries)?;
    let isolation = crate::hub_isolation::render(&h.tun_name, &h.stall_services)?;
    Ok(HubPlan {
        hub_address,
        prefix_len: pool.prefix_len(),
        pool,
        lan_map: space,
        device_addresses,
        device_rules,
        device_maps,
        routes,
        isolation,
        sched,
    })
}
