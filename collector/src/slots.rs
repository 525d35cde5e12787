//! Upload slots: how many evidence uploads run at once, per agent (the
//! certificate name) and over all agents. One agent holding streams open
//! cannot take every slot: it gets its own share and no more.
//!
//! A slot is taken before the first message is read and given back when
//! the upload ends (the [`Slot`] guard's `Drop`), however it ends. The
//! stream deadlines that bound how long a slot can be held live in
//! `ingest` (idle time per message, total time per upload).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::gauge::Gauge;

/// Why a slot was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SlotRefusal {
    /// The agent already runs its share of uploads.
    #[error("agent {agent:?} already has {limit} uploads in progress (per-agent limit): finish one first")]
    Agent {
        /// The agent.
        agent: String,
        /// Its limit.
        limit: usize,
    },
    /// Every slot of the collector is taken.
    #[error("the collector runs {limit} uploads already (collector-wide limit): retry later")]
    Global {
        /// The limit.
        limit: usize,
    },
}

impl SlotRefusal {
    /// Short label for metrics: `agent_uploads` or `uploads`.
    pub fn reason(&self) -> &'static str {
        match self {
            SlotRefusal::Agent { .. } => "agent_uploads",
            SlotRefusal::Global { .. } => "uploads",
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_agent: HashMap<String, usize>,
}

/// Upload slots, per agent and collector-wide.
#[derive(Debug)]
pub struct UploadSlots {
    per_agent: usize,
    global: usize,
    counts: Arc<Mutex<Counts>>,
    in_use: Gauge,
}

impl UploadSlots {
    /// At most `per_agent` uploads per agent and `global` in all (each at
    /// least 1); `in_use` follows the slots taken.
    pub fn new(per_agent: usize, global: usize, in_use: Gauge) -> UploadSlots {
        UploadSlots {
            per_agent: per_agent.max(1),
            global: global.max(1),
            counts: Arc::default(),
            in_use,
        }
    }

    /// Takes a slot for `agent`, or says why not. Never waits.
    pub fn try_acquire(&self, agent: &str) -> Result<Slot, SlotRefusal> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let mine = c.per_agent.get(agent).copied().unwrap_or(0);
        if mine >= self.per_agent {
            return Err(SlotRefusal::Agent {
                agent: agent.to_string(),
                limit: self.per_agent,
            });
        }
        if c.total >= self.global {
            return Err(SlotRefusal::Global { limit: self.global });
        }
        c.total += 1;
        *c.per_agent.entry(agent.to_string()).or_insert(0) += 1;
        self.in_use.inc();
        Ok(Slot {
            agent: agent.to_string(),
            counts: Arc::clone(&self.counts),
            in_use: self.in_use.clone(),
        })
    }

    /// Uploads in progress: (all agents, this agent).
    pub fn in_use(&self, agent: &str) -> (usize, usize) {
        let c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        (c.total, c.per_agent.get(agent).copied().unwrap_or(0))
    }
}

/// One upload slot, given back on drop.
#[derive(Debug)]
pub struct Slot {
    agent: String,
    counts: Arc<Mutex<Counts>>,
    in_use: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.in_use.dec();
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_agent.get_mut(&self.agent) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                // Bounded by the agents uploading now, not by every agent
                // ever seen.
                c.per_agent.remove(&self.agent);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_agent_share_and_global_cap() {
        let s = UploadSlots::new(2, 3, Gauge::default());
        let a1 = s.try_acquire("a").unwrap();
        let _a2 = s.try_acquire("a").unwrap();
        assert!(matches!(
            s.try_acquire("a"),
            Err(SlotRefusal::Agent { limit: 2, .. })
        ));
        let _b1 = s.try_acquire("b").unwrap();
        assert_eq!(
            s.try_acquire("c").unwrap_err(),
            SlotRefusal::Global { limit: 3 }
        );
        assert_eq!(s.in_use("a"), (3, 2));
        drop(a1);
        assert_eq!(s.in_use("a"), (2, 1));
        let _c1 = s.try_acquire("c").unwrap();
        assert_eq!(s.in_use("c"), (3, 1));
        assert_eq!(s.in_use.get(), 3);
    }

    #[test]
    fn released_agents_leave_no_entry() {
        let s = UploadSlots::new(1, 8, Gauge::default());
        for i in 0..100 {
            drop(s.try_acquire(&format!("agent-{i}")).unwrap());
        }
        assert!(s.counts.lock().unwrap().per_agent.is_empty());
    }
}
