//! From the config's classes, rules and uplinks to what the cores run with: the
//! scheduler's per-class modes and QoS parameters, each uplink's class mask and rate
//! bounds, and the ordered rule list (configured rules, the POS-source shortcut, then the
//! built-in ones).

use stallnet_netconf::classes::{default_rules, effective_classes, ClassSpec};
use stallnet_netconf::UplinkPriority;
use stallnet_netconf::{ClassMode, ClassName, EdgeConfig, Rule, SchedMode, Uplink, UplinkKind};

use crate::core::qos::{bit, ClassMask, ClassParams, QosConfig, CLASSES};
use crate::core::rate::RateConfig;
use crate::core::scheduler::{Mode, SchedulerConfig};
use crate::core::Class;

/// The scheduler for these classes; `all_redundant` (mode = "redundant") duplicates every
/// class.
pub fn sched_config(specs: &[ClassSpec], mode: SchedMode) -> SchedulerConfig {
    let mut cfg = SchedulerConfig::default();
    let mut qos = QosConfig::default();
    for s in specs {
        let i = Class::from_name(s.name) as usize;
        if i >= CLASSES {
            continue;
        }
        cfg.modes[i] = match (mode, s.mode) {
            (SchedMode::Redundant, _) | (_, ClassMode::Redundant) => Mode::Redundant,
            (_, ClassMode::LowestLatency) => Mode::LowestLatency,
            (_, ClassMode::Aggregate) => Mode::Aggregate,
        };
        qos.classes[i] = ClassParams {
            weight: s.weight,
            min_rate: s.min_rate.map(|r| r as f64 / 8.0),
            max_rate: s.max_rate.map(|r| r as f64 / 8.0),
        };
    }
    cfg.qos = qos;
    cfg
}

/// The classes an uplink may carry.
pub fn link_mask(specs: &[ClassSpec], u: &Uplink) -> ClassMask {
    let backup = u.priority == UplinkPriority::Backup;
    let cellular = u.kind == UplinkKind::Cellular;
    mask_for(specs, &u.name, backup, u.metered, cellular)
}

pub fn mask_for(
    specs: &[ClassSpec],
    name: &str,
    backup: bool,
    metered: bool,
    cellular: bool,
) -> ClassMask {
    specs
        .iter()
        .filter(|s| s.allows(name, backup, metered, cellular))
        .fold(0, |m, s| m | bit(Class::from_name(s.name)))
}

/// Rate-control bounds of an uplink.
pub fn rate_config(u: &Uplink) -> RateConfig {
    let mut r = RateConfig::default();
    if let Some(min) = u.min_rate {
        r.min = min.0 as f64 / 8.0;
    }
    if let Some(max) = u.max_rate {
        r.max = max.0 as f64 / 8.0;
        r.initial = r.max;
    }
    r.initial = r.initial.clamp(r.min, r.max);
    r
}

/// The edge's classes with its overrides.
pub fn specs(e: &EdgeConfig) -> Vec<ClassSpec> {
    effective_classes(&e.classes)
}

/// The rules in the order they are tried.
pub fn rules(e: &EdgeConfig) -> Vec<Rule> {
    let mut v: Vec<Rule> = e.rules.iter().map(|r| r.get_ref().clone()).collect();
    if !e.pos_sources.is_empty() {
        v.push(Rule {
            class: ClassName::Pos,
            src: e.pos_sources.clone(),
            ..Default::default()
        });
    }
    if e.default_rules {
        v.extend(default_rules());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use stallnet_netconf::classes::ClassesConfig;

    #[test]
    fn masks_follow_the_classes_allowed_uplinks() {
        let specs = effective_classes(&ClassesConfig::default());
        let m = mask_for(&specs, "lte", false, true, true);
        assert_eq!(m & bit(Class::Bulk), 0, "bulk avoids metered");
        assert_ne!(m & bit(Class::Pos), 0);
        let cfg = sched_config(&specs, SchedMode::Aggregate);
        assert_eq!(cfg.modes[Class::Pos as usize], Mode::Redundant);
        assert_eq!(cfg.modes[Class::Stream as usize], Mode::LowestLatency);
        assert_eq!(
            cfg.qos.classes[Class::Stream as usize].min_rate,
            Some(500_000.0)
        );
        let all = sched_config(&specs, SchedMode::Redundant);
        assert!(all.modes.iter().all(|m| *m == Mode::Redundant));
    }
}
