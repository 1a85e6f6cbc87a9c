//! Deterministic cohort planning: which host lands in which wave.
//!
//! [`plan`] is a pure function of the spec and a fleet snapshot. `serin rollout plan` shows its
//! output and `serin rollout start` runs exactly that output, so what an operator reviewed is
//! what happens (for the same snapshot).
//!
//! 1. **Select**: hosts whose labels match the selector and that manage the service.
//! 2. **Skip** (each with a reason): hosts not connected ("unreachable"), hosts whose current
//!    release reports unhealthy ("unhealthy"), and hosts already on the target release.
//!    A host with nothing installed yet is eligible (first install).
//! 3. **Order**: without `spread_label`, by host id. With it, hosts are grouped by the label's
//!    value (hosts without the label form the domain `""`), domains sorted by name, hosts inside a
//!    domain by id, and then taken round-robin — one host from each domain in turn — so the canary
//!    and every wave draw from as many failure domains as possible.
//! 4. **Cut** the ordered list at each wave's cumulative target (see [`super::spec`]); hosts
//!    beyond the last target form an extra final wave. A wave that adds no host (`1,5%,100%` on
//!    a small fleet, `10,5%,100%`) is recorded in [`Plan::empty`]: [`Plan::check`] refuses an
//!    operator's wave list that does not grow on this fleet, naming the wave; the default list
//!    (`1,25%,100%`) adapts to small fleets silently.

use std::collections::BTreeMap;

use serin_proto::{HostId, ReleaseId};

use super::spec::RolloutSpec;
use crate::fleet::HostSnapshot;

/// One host of a planned wave, with what the rollout needs to remember about it.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedHost {
    pub host_id: HostId,
    pub hostname: String,
    pub labels: BTreeMap<String, String>,
    /// Value of the spread label (`""` when absent); `None` without a spread label.
    pub domain: Option<String>,
    /// The release the host ran when planned: what a rollback restores.
    pub baseline: Option<ReleaseId>,
    /// The agent's last applied order sequence for the service.
    pub last_seq: u64,
}

/// One planned wave.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedWave {
    /// Position in the plan, from 0 (the canary).
    pub index: u32,
    /// The spec expression that produced it, e.g. `"10%"`; `"rest"` for the extra final wave.
    pub size_expr: String,
    pub hosts: Vec<PlannedHost>,
}

/// A selected host left out of the rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub host_id: HostId,
    pub reason: String,
}

/// The cohorts of a rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub waves: Vec<PlannedWave>,
    pub skipped: Vec<Skipped>,
    /// Spec waves that added no host on this fleet.
    pub empty: Vec<EmptyWave>,
    /// Eligible hosts the waves were cut from.
    pub eligible: u32,
}

/// A spec wave whose cumulative target adds no host to the waves before it.
#[derive(Debug, Clone, PartialEq)]
pub struct EmptyWave {
    /// Position in the spec's wave list.
    pub position: usize,
    pub expr: String,
    /// Its cumulative target on this fleet.
    pub target: u32,
    /// Hosts the earlier waves already cover.
    pub covered: u32,
}

impl Plan {
    /// Refuses an operator's wave list that does not grow on this fleet (a wave that would add
    /// no host), naming the wave, instead of silently running fewer waves than asked for.
    pub fn check(&self, spec: &RolloutSpec) -> Result<(), serin_proto::ValidationError> {
        if spec.default_waves || self.eligible == 0 {
            return Ok(());
        }
        match self.empty.first() {
            None => Ok(()),
            Some(e) => Err(serin_proto::ValidationError::new(
                format!("waves[{}]", e.position),
                format!(
                    "{:?} is {} of the {} eligible hosts in total, no more than the waves before it already cover ({}): the wave list does not grow on this fleet; make the wave larger or leave it out",
                    e.expr,
                    plural(e.target),
                    self.eligible,
                    e.covered
                ),
            )),
        }
    }

    /// Every planned host, wave by wave.
    pub fn hosts(&self) -> impl Iterator<Item = &PlannedHost> {
        self.waves.iter().flat_map(|w| w.hosts.iter())
    }
}

/// Whether a host is part of the rollout's selection at all (selector and service).
pub fn selected(spec: &RolloutSpec, host: &HostSnapshot) -> bool {
    spec.selector.matches(&host.labels) && host.services.contains_key(&spec.service)
}

/// Why a selected host cannot take part now, or `None` when it can.
pub fn skip_reason(spec: &RolloutSpec, host: &HostSnapshot) -> Option<String> {
    let svc = host.services.get(&spec.service)?;
    if !host.connected {
        return Some("unreachable: the agent is not connected".to_string());
    }
    if svc.current_release.as_ref() == Some(&spec.release) {
        return Some(format!("already on release {}", spec.release));
    }
    if svc.current_release.is_some() && svc.healthy == Some(false) {
        return Some(format!(
            "unhealthy: service {} on release {} fails its health checks",
            spec.service,
            svc.current_release
                .as_ref()
                .map(ReleaseId::as_str)
                .unwrap_or("-")
        ));
    }
    None
}

/// The planned-host record of a snapshot.
pub fn planned_host(spec: &RolloutSpec, host: &HostSnapshot) -> PlannedHost {
    let svc = host.services.get(&spec.service);
    PlannedHost {
        host_id: host.host_id.clone(),
        hostname: host.hostname.clone(),
        labels: host.labels.clone(),
        domain: spec
            .spread_label
            .as_ref()
            .map(|l| host.labels.get(l).cloned().unwrap_or_default()),
        baseline: svc.and_then(|s| s.current_release.clone()),
        last_seq: svc.map_or(0, |s| s.last_seq),
    }
}

/// Computes the plan for `spec` over a fleet snapshot.
pub fn plan(spec: &RolloutSpec, fleet: &[HostSnapshot]) -> Plan {
    let mut sorted: Vec<&HostSnapshot> = fleet.iter().filter(|h| selected(spec, h)).collect();
    sorted.sort_by(|a, b| a.host_id.cmp(&b.host_id));
    let mut eligible = Vec::new();
    let mut skipped = Vec::new();
    for h in sorted {
        match skip_reason(spec, h) {
            Some(reason) => skipped.push(Skipped {
                host_id: h.host_id.clone(),
                reason,
            }),
            None => eligible.push(planned_host(spec, h)),
        }
    }
    let ordered = if spec.spread_label.is_some() {
        let mut domains: BTreeMap<String, std::collections::VecDeque<PlannedHost>> =
            BTreeMap::new();
        for h in eligible {
            domains
                .entry(h.domain.clone().unwrap_or_default())
                .or_default()
                .push_back(h);
        }
        let mut out = Vec::new();
        while domains.values().any(|d| !d.is_empty()) {
            for d in domains.values_mut() {
                if let Some(h) = d.pop_front() {
                    out.push(h);
                }
            }
        }
        out
    } else {
        eligible
    };
    let n = ordered.len() as u32;
    let mut waves = Vec::new();
    let mut covered = 0u32;
    let mut rest = ordered.into_iter();
    let mut empty = Vec::new();
    for (position, size) in spec.waves.iter().enumerate() {
        let target = size.target(n);
        if target <= covered {
            empty.push(EmptyWave {
                position,
                expr: size.to_string(),
                target,
                covered,
            });
        }
        let target = target.max(covered);
        if target > covered {
            let hosts: Vec<PlannedHost> = rest.by_ref().take((target - covered) as usize).collect();
            waves.push(PlannedWave {
                index: waves.len() as u32,
                size_expr: size.to_string(),
                hosts,
            });
            covered = target;
        }
    }
    let remaining: Vec<PlannedHost> = rest.collect();
    if !remaining.is_empty() {
        waves.push(PlannedWave {
            index: waves.len() as u32,
            size_expr: "rest".to_string(),
            hosts: remaining,
        });
    }
    Plan {
        waves,
        skipped,
        empty,
        eligible: n,
    }
}

fn plural(n: u32) -> String {
    if n == 1 {
        "1 host".into()
    } else {
        format!("{n} hosts")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::testing::{host, spec};

    fn ids(w: &PlannedWave) -> Vec<&str> {
        w.hosts.iter().map(|h| h.host_id.as_str()).collect()
    }

    #[test]
    fn cohorts_follow_cumulative_targets_in_host_order() {
        let fleet: Vec<_> = (1..=10)
            .map(|i| host(&format!("h{i:02}"), "eu-1", "web-1"))
            .collect();
        let p = plan(&spec(&["1", "10%", "50%", "100%"]), &fleet);
        // 1 host, then ceil(10% of 10)=1 adds nothing (dropped), 5, 10.
        let sizes: Vec<_> = p
            .waves
            .iter()
            .map(|w| (w.size_expr.as_str(), w.hosts.len()))
            .collect();
        assert_eq!(sizes, vec![("1", 1), ("50%", 4), ("100%", 5)]);
        assert_eq!(ids(&p.waves[0]), vec!["h01"]);
        assert_eq!(
            p.waves.iter().map(|w| w.index).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn a_count_that_stops_short_gets_a_final_wave() {
        let fleet: Vec<_> = (1..=6)
            .map(|i| host(&format!("h{i}"), "eu-1", "web-1"))
            .collect();
        let p = plan(&spec(&["1", "3"]), &fleet);
        let sizes: Vec<_> = p
            .waves
            .iter()
            .map(|w| (w.size_expr.as_str(), w.hosts.len()))
            .collect();
        assert_eq!(sizes, vec![("1", 1), ("3", 2), ("rest", 3)]);
    }

    #[test]
    fn skips_unreachable_unhealthy_and_up_to_date_hosts_with_reasons() {
        let mut fleet = vec![
            host("a", "z", "web-1"),
            host("b", "z", "web-2"),
            host("c", "z", "web-1"),
            host("d", "z", "web-1"),
            host("e", "z", "web-1"),
        ];
        fleet[2].connected = false;
        fleet[3]
            .services
            .values_mut()
            .for_each(|s| s.healthy = Some(false));
        fleet[4].labels.insert("role".into(), "db".into());
        let p = plan(&spec(&["100%"]), &fleet);
        assert_eq!(ids(&p.waves[0]), vec!["a"]);
        let reasons: Vec<_> = p
            .skipped
            .iter()
            .map(|s| (s.host_id.as_str(), s.reason.as_str()))
            .collect();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(reasons[0].1.starts_with("already on release web-2"));
        assert!(reasons[1].1.starts_with("unreachable"));
        assert!(reasons[2].1.starts_with("unhealthy"));
    }

    #[test]
    fn spread_takes_the_canary_from_different_domains() {
        let mut fleet = Vec::new();
        for z in ["eu-2", "eu-1", "eu-3"] {
            for i in 1..=3 {
                fleet.push(host(&format!("{z}-h{i}"), z, "web-1"));
            }
        }
        let mut s = spec(&["3", "100%"]);
        s.spread_label = Some("zone".into());
        let p = plan(&s, &fleet);
        assert_eq!(ids(&p.waves[0]), vec!["eu-1-h1", "eu-2-h1", "eu-3-h1"]);
        assert_eq!(p.waves[1].hosts.len(), 6);
        // Same input, same plan.
        assert_eq!(plan(&s, &fleet), p);
    }

    #[test]
    fn no_eligible_host_gives_no_wave() {
        let p = plan(&spec(&["1", "100%"]), &[host("a", "z", "web-2")]);
        assert!(p.waves.is_empty());
        assert_eq!(p.skipped.len(), 1);
    }
}
