//! Per-agent storage quotas: how many events and detections, and how many
//! bytes of evidence, one agent (certificate name) may hold in the
//! collector. A stolen agent certificate can then fill only its own share,
//! never the disk the other agents need.
//!
//! What each agent holds is read from the store at start
//! ([`Store::usage`]), kept here as items are stored (a batch reserves its
//! items before it is written and gives them back when it turns out a
//! duplicate or fails), and read again after retention deleted events.
//! Over quota, a batch or an upload is refused with `RESOURCE_EXHAUSTED`
//! before anything of it is stored (the agent keeps it and retries), and
//! counted in `vigil_collector_refusals_total{reason="quota_*"}`; nothing
//! stored before is touched and every other agent carries on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tonic::Status;
use tracing::warn;

use crate::metrics::Metrics;
use crate::store::{AgentUsage, Store, StoreError};

/// The quotas; 0 means unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaLimits {
    /// Events one agent may hold.
    pub events: u64,
    /// Detections one agent may hold.
    pub detections: u64,
    /// Bytes of evidence bundles one agent may hold.
    pub evidence_bytes: u64,
}

impl Default for QuotaLimits {
    fn default() -> Self {
        QuotaLimits {
            events: 20_000_000,
            detections: 1_000_000,
            evidence_bytes: 50 << 30,
        }
    }
}

/// What a quota counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Events (rows).
    Events,
    /// Detections (rows).
    Detections,
    /// Evidence (bytes).
    Evidence,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Events => "events",
            Kind::Detections => "detections",
            Kind::Evidence => "evidence",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Kind::Events => "--max-agent-events",
            Kind::Detections => "--max-agent-detections",
            Kind::Evidence => "--max-agent-evidence-bytes",
        }
    }

    fn get(self, u: &AgentUsage) -> u64 {
        match self {
            Kind::Events => u.events,
            Kind::Detections => u.detections,
            Kind::Evidence => u.evidence_bytes,
        }
    }

    fn get_mut(self, u: &mut AgentUsage) -> &mut u64 {
        match self {
            Kind::Events => &mut u.events,
            Kind::Detections => &mut u.detections,
            Kind::Evidence => &mut u.evidence_bytes,
        }
    }
}

/// Per-agent usage against [`QuotaLimits`].
#[derive(Debug)]
pub struct Quotas {
    limits: QuotaLimits,
    usage: Mutex<HashMap<String, AgentUsage>>,
    metrics: Arc<Metrics>,
}

impl Quotas {
    /// Quotas with what every agent holds now, read from `store`.
    pub async fn load(
        store: &dyn Store,
        limits: QuotaLimits,
        metrics: Arc<Metrics>,
    ) -> Result<Quotas, StoreError> {
        let q = Quotas {
            limits,
            usage: Mutex::default(),
            metrics,
        };
        q.reload(store).await?;
        Ok(q)
    }

    /// Reads what every agent holds again (after retention).
    pub async fn reload(&self, store: &dyn Store) -> Result<(), StoreError> {
        let fresh = store.usage().await?;
        let mut map = self.lock();
        map.clear();
        for (agent, u) in fresh {
            self.publish(&agent, &u);
            map.insert(agent, u);
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, AgentUsage>> {
        self.usage.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn limit(&self, kind: Kind) -> u64 {
        match kind {
            Kind::Events => self.limits.events,
            Kind::Detections => self.limits.detections,
            Kind::Evidence => self.limits.evidence_bytes,
        }
    }

    fn publish(&self, agent: &str, u: &AgentUsage) {
        for kind in [Kind::Events, Kind::Detections] {
            self.metrics
                .agent_items(agent, kind.name())
                .set(kind.get(u) as i64);
        }
        self.metrics
            .agent_bytes(agent, Kind::Evidence.name())
            .set(u.evidence_bytes as i64);
    }

    /// What `agent` holds (as counted here).
    pub fn usage(&self, agent: &str) -> AgentUsage {
        self.lock().get(agent).copied().unwrap_or_default()
    }

    /// Checks that `agent` may store `n` more of `kind`; with `reserve`,
    /// counts them at once (give them back with [`Quotas::release`] when
    /// they were not stored). Over quota: `RESOURCE_EXHAUSTED`, counted.
    pub fn admit(&self, agent: &str, kind: Kind, n: u64, reserve: bool) -> Result<(), Status> {
        let limit = self.limit(kind);
        let mut map = self.lock();
        let u = map.entry(agent.to_string()).or_default();
        let held = kind.get(u);
        if limit != 0 && held.saturating_add(n) > limit {
            drop(map);
            self.metrics.refused(&format!("quota_{}", kind.name()));
            let unit = if kind == Kind::Evidence { " bytes" } else { "" };
            warn!(
                agent,
                kind = kind.name(),
                held,
                more = n,
                limit,
                "per-agent storage quota reached: refused"
            );
            return Err(Status::resource_exhausted(format!(
                "storage quota of agent {agent}: it holds {held}{unit} of {} and {n}{unit} more would pass its quota of {limit}{unit} (collector {}); nothing of this was stored, what was stored before is kept; retention or an operator raising the quota makes room",
                kind.name(),
                kind.flag()
            )));
        }
        if reserve {
            *kind.get_mut(u) = held.saturating_add(n);
            let u = *u;
            drop(map);
            self.publish(agent, &u);
        }
        Ok(())
    }

    /// Counts `n` of `kind` stored by `agent` (not reserved before).
    pub fn add(&self, agent: &str, kind: Kind, n: u64) {
        let mut map = self.lock();
        let u = map.entry(agent.to_string()).or_default();
        *kind.get_mut(u) = kind.get(u).saturating_add(n);
        let u = *u;
        drop(map);
        self.publish(agent, &u);
    }

    /// Gives back `n` of `kind` reserved by [`Quotas::admit`] and not
    /// stored.
    pub fn release(&self, agent: &str, kind: Kind, n: u64) {
        let mut map = self.lock();
        let u = map.entry(agent.to_string()).or_default();
        *kind.get_mut(u) = kind.get(u).saturating_sub(n);
        let u = *u;
        drop(map);
        self.publish(agent, &u);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quotas(limits: QuotaLimits) -> Quotas {
        Quotas {
            limits,
            usage: Mutex::default(),
            metrics: Arc::new(Metrics::default()),
        }
    }

    #[test]
    fn quota_is_per_agent_and_released_reservations_count_no_more() {
        let q = quotas(QuotaLimits {
            events: 10,
            detections: 0,
            evidence_bytes: 100,
        });
        q.admit("a", Kind::Events, 6, true).unwrap();
        let e = q.admit("a", Kind::Events, 5, true).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("agent a"), "{}", e.message());
        assert!(
            e.message().contains("--max-agent-events"),
            "{}",
            e.message()
        );
        // Another agent is not affected.
        q.admit("b", Kind::Events, 10, true).unwrap();
        // A reservation given back (duplicate batch) frees its room.
        q.release("a", Kind::Events, 6);
        q.admit("a", Kind::Events, 10, true).unwrap();
        assert_eq!(q.usage("a").events, 10);
        // 0: unlimited.
        q.admit("a", Kind::Detections, u64::MAX / 2, true).unwrap();
        // Evidence: checked without reserving, counted once stored.
        q.admit("a", Kind::Evidence, 100, false).unwrap();
        q.add("a", Kind::Evidence, 60);
        assert!(q.admit("a", Kind::Evidence, 41, false).is_err());
        q.admit("a", Kind::Evidence, 40, false).unwrap();
        let refused = q
            .metrics
            .refusals
            .get_or_create(&crate::metrics::ReasonLabel {
                reason: "quota_events".into(),
            })
            .get();
        assert_eq!(refused, 1);
    }
}
