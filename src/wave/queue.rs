//! Which tenant starts next: a pure structure, no I/O and no clock of its own.
//!
//! Pending tenants wait per host in `seq` order; the next start is the lowest `seq` among
//! hosts below their per-host limit, while the whole wave is below its concurrency. Only
//! `seq < gate` may start (the canary stage: canaries have the lowest seqs). Retries
//! wait in a delay set until they are due. Picking costs O(hosts), not O(tenants).

use std::collections::{BTreeSet, HashMap};

use tokio::time::Instant;

/// The wave's pending tenants and its running counts.
#[derive(Debug, Default)]
pub struct Queue {
    ready: HashMap<String, BTreeSet<u32>>,
    delayed: BTreeSet<(Instant, u32)>,
    delayed_host: HashMap<u32, String>,
    running_by_host: HashMap<String, u32>,
    running: u32,
    /// Hosts whose health gate failed: nothing starts there until released.
    held: std::collections::HashSet<String>,
}

/// Limits a pick must respect.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub concurrency: u32,
    pub per_host: Option<u32>,
    /// Only `seq < gate` may start.
    pub gate: u32,
}

impl Queue {
    /// A tenant ready to start.
    pub fn push_ready(&mut self, seq: u32, host: &str) {
        self.ready.entry(host.to_string()).or_default().insert(seq);
    }

    /// A tenant to start again at `at`.
    pub fn push_delayed(&mut self, seq: u32, host: &str, at: Instant) {
        self.delayed.insert((at, seq));
        self.delayed_host.insert(seq, host.to_string());
    }

    /// Moves retries that are due into the ready sets.
    pub fn promote_due(&mut self, now: Instant) {
        while let Some(&(at, seq)) = self.delayed.first() {
            if at > now {
                break;
            }
            self.delayed.pop_first();
            if let Some(host) = self.delayed_host.remove(&seq) {
                self.push_ready(seq, &host);
            }
        }
    }

    /// When the next delayed retry is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.delayed.first().map(|(at, _)| *at)
    }

    /// Takes the next tenant to start, if the limits allow one, and counts it running.
    pub fn take_next(&mut self, limits: Limits) -> Option<(u32, String)> {
        if self.running >= limits.concurrency {
            return None;
        }
        let mut best: Option<(u32, &String)> = None;
        for (host, seqs) in &self.ready {
            let Some(&first) = seqs.first() else { continue };
            if first >= limits.gate || self.held.contains(host) {
                continue;
            }
            if let Some(limit) = limits.per_host
                && self.running_by_host.get(host).copied().unwrap_or(0) >= limit
            {
                continue;
            }
            if best.is_none_or(|(b, _)| first < b) {
                best = Some((first, host));
            }
        }
        let (seq, host) = best.map(|(s, h)| (s, h.clone()))?;
        if let Some(set) = self.ready.get_mut(&host) {
            set.remove(&seq);
        }
        *self.running_by_host.entry(host.clone()).or_default() += 1;
        self.running += 1;
        Some((seq, host))
    }

    /// A tenant that was already running when the queue was built (replayed state).
    pub fn resume_running(&mut self, host: &str) {
        *self.running_by_host.entry(host.to_string()).or_default() += 1;
        self.running += 1;
    }

    /// Tenants in flight on `host`.
    pub fn running_on(&self, host: &str) -> u32 {
        self.running_by_host.get(host).copied().unwrap_or(0)
    }

    /// A started tenant finished.
    pub fn finished(&mut self, host: &str) {
        if let Some(n) = self.running_by_host.get_mut(host) {
            *n = n.saturating_sub(1);
        }
        self.running = self.running.saturating_sub(1);
    }

    /// Holds `host`: its tenants wait. True when it was not held.
    pub fn hold(&mut self, host: &str) -> bool {
        self.held.insert(host.to_string())
    }

    /// Lets `host`'s tenants start again. True when it was held.
    pub fn release(&mut self, host: &str) -> bool {
        self.held.remove(host)
    }

    /// Hosts with tenants ready or delayed: the ones whose health matters now.
    pub fn waiting_hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self
            .ready
            .iter()
            .filter(|(_, seqs)| !seqs.is_empty())
            .map(|(h, _)| h.clone())
            .chain(self.delayed_host.values().cloned())
            .collect();
        hosts.sort_unstable();
        hosts.dedup();
        hosts
    }

    /// Tenants in flight.
    pub fn running(&self) -> u32 {
        self.running
    }

    /// Nothing waits, ready or delayed.
    pub fn is_empty(&self) -> bool {
        self.delayed.is_empty() && self.ready.values().all(BTreeSet::is_empty)
    }

    /// Empties the queue (cancel), returning every waiting seq.
    pub fn drain_waiting(&mut self) -> Vec<u32> {
        let mut out: Vec<u32> = self.ready.values_mut().flat_map(std::mem::take).collect();
        out.extend(self.delayed.iter().map(|(_, s)| *s));
        self.delayed.clear();
        self.delayed_host.clear();
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(concurrency: u32, per_host: Option<u32>) -> Limits {
        Limits {
            concurrency,
            per_host,
            gate: u32::MAX,
        }
    }

    #[test]
    fn lowest_seq_first_within_limits() {
        let mut q = Queue::default();
        for seq in 0..6 {
            q.push_ready(seq, if seq % 2 == 0 { "a" } else { "b" });
        }
        let l = limits(3, Some(1));
        assert_eq!(q.take_next(l), Some((0, "a".into())));
        assert_eq!(q.take_next(l), Some((1, "b".into())));
        assert_eq!(q.take_next(l), None, "both hosts at their limit");
        q.finished("a");
        assert_eq!(q.take_next(l), Some((2, "a".into())));
        q.finished("a");
        q.finished("b");
        let l = limits(1, None);
        assert_eq!(q.take_next(l), Some((3, "b".into())));
        assert_eq!(q.take_next(l), None, "global limit");
    }

    #[test]
    fn gate_holds_back_non_canaries() {
        let mut q = Queue::default();
        for seq in 0..4 {
            q.push_ready(seq, "a");
        }
        let gated = Limits {
            concurrency: 10,
            per_host: None,
            gate: 2,
        };
        assert_eq!(q.take_next(gated).map(|t| t.0), Some(0));
        assert_eq!(q.take_next(gated).map(|t| t.0), Some(1));
        assert_eq!(q.take_next(gated), None);
        assert_eq!(q.take_next(limits(10, None)).map(|t| t.0), Some(2));
    }

    #[test]
    fn delayed_retries_become_ready_when_due() {
        let mut q = Queue::default();
        let now = Instant::now();
        q.push_delayed(7, "a", now + Duration::from_secs(5));
        assert!(!q.is_empty());
        assert_eq!(q.take_next(limits(10, None)), None);
        assert_eq!(q.next_due(), Some(now + Duration::from_secs(5)));
        q.promote_due(now + Duration::from_secs(5));
        assert_eq!(q.take_next(limits(10, None)), Some((7, "a".into())));
        assert!(q.is_empty());
    }

    #[test]
    fn drain_returns_everything_waiting() {
        let mut q = Queue::default();
        q.push_ready(3, "a");
        q.push_ready(1, "b");
        q.push_delayed(2, "a", Instant::now());
        assert_eq!(q.drain_waiting(), [1, 2, 3]);
        assert!(q.is_empty());
    }
}
