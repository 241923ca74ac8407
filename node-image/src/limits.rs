//! What a peer that has not authenticated may cost the node, as plain data structures (no
//! sockets, no clock of their own: callers pass `now`), so the bounds are tested directly.
//!
//! Rules that must hold whatever unauthenticated peers send:
//! - at most [`PREAUTH_MAX`] bytes are read from a connection or datagram before its peer
//!   has proven the secret, and decoded messages materialize at most [`PREAUTH_BUDGET`];
//! - at most `per_source` connections from one address, and `total` in all, wait to
//!   authenticate at once ([`Gate`]); a connection that authenticates leaves the gate;
//! - an answer the node sends on a peer's behalf (a pong) is rate-limited per source and per
//!   destination ([`RateLimiter`]), so the node cannot be made to flood a third host, and the
//!   limiter's own memory is bounded however many sources there are.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The most bytes read from a peer before it has authenticated (a dispy request or a native
/// handshake message; a datagram).
pub const PREAUTH_MAX: usize = 4096;
/// The most bytes a message decoded before authentication may materialize.
pub const PREAUTH_BUDGET: usize = 64 * 1024;

/// Connections waiting to authenticate, counted per source address.
pub struct Gate {
    per_source: usize,
    total: usize,
    /// Per source, and in all.
    waiting: Mutex<(HashMap<IpAddr, usize>, usize)>,
}

/// A connection's place in the gate, given back when it authenticates or closes.
pub struct Permit {
    gate: Arc<Gate>,
    ip: IpAddr,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum GateFull {
    #[error("{0} connections from this address are already waiting to authenticate")]
    Source(usize),
    #[error("{0} connections are already waiting to authenticate")]
    Total(usize),
}

impl Gate {
    pub fn new(per_source: usize, total: usize) -> Arc<Gate> {
        Arc::new(Gate {
            per_source,
            total,
            waiting: Mutex::new((HashMap::new(), 0)),
        })
    }

    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, GateFull> {
        let mut guard = self.waiting.lock().unwrap();
        let (per_source, all) = &mut *guard;
        if *all >= self.total {
            return Err(GateFull::Total(*all));
        }
        let mine = per_source.entry(ip).or_insert(0);
        if *mine >= self.per_source {
            return Err(GateFull::Source(*mine));
        }
        *mine += 1;
        *all += 1;
        Ok(Permit {
            gate: self.clone(),
            ip,
        })
    }

    /// Connections waiting to authenticate now.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.waiting.lock().unwrap().1
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut guard = self.gate.waiting.lock().unwrap();
        let (per_source, all) = &mut *guard;
        if let Some(n) = per_source.get_mut(&self.ip) {
            *n -= 1;
            *all -= 1;
            if *n == 0 {
                per_source.remove(&self.ip);
            }
        }
    }
}

/// Token buckets keyed by address: `burst` at once, then `per_second`.
pub struct RateLimiter {
    burst: f64,
    per_second: f64,
    max_keys: usize,
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

impl RateLimiter {
    pub fn new(burst: u32, per_second: f64, max_keys: usize) -> RateLimiter {
        RateLimiter {
            burst: burst as f64,
            per_second,
            max_keys,
            buckets: HashMap::new(),
        }
    }

    /// Takes a token for `key` if it has one.
    pub fn allow(&mut self, key: IpAddr, now: Instant) -> bool {
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.max_keys {
            // Buckets that have filled up again are the same as no bucket: drop them. With
            // every key still busy, a new key waits (the limiter's memory stays bounded).
            let (burst, rate) = (self.burst, self.per_second);
            self.buckets
                .retain(|_, (tokens, at)| refill(*tokens, *at, now, burst, rate) < burst);
            if self.buckets.len() >= self.max_keys {
                return false;
            }
        }
        let (tokens, at) = self.buckets.entry(key).or_insert((self.burst, now));
        let available = refill(*tokens, *at, now, self.burst, self.per_second);
        *at = now;
        if available >= 1.0 {
            *tokens = available - 1.0;
            true
        } else {
            *tokens = available;
            false
        }
    }
}

fn refill(tokens: f64, at: Instant, now: Instant, burst: f64, per_second: f64) -> f64 {
    let elapsed = now.saturating_duration_since(at).as_secs_f64();
    (tokens + elapsed * per_second).min(burst)
}

/// A warning logged at most once per `every`, with how many were suppressed in between: a
/// flood of refused peers must not become a flood of log lines.
pub struct Throttled {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttled {
    pub const fn new(every: Duration) -> Throttled {
        Throttled {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(suppressed since the last one)` when this one should be logged.
    pub fn check(&self, now: Instant) -> Option<u64> {
        let mut st = self.state.lock().unwrap();
        match st.0 {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                st.1 += 1;
                None
            }
            _ => {
                let suppressed = st.1;
                *st = (Some(now), 0);
                Some(suppressed)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn gate_caps_each_source_and_the_total_and_frees_on_drop() {
        let gate = Gate::new(2, 3);
        let a1 = gate.enter(ip(1)).unwrap();
        let _a2 = gate.enter(ip(1)).unwrap();
        assert_eq!(gate.enter(ip(1)).err(), Some(GateFull::Source(2)));
        let _b1 = gate.enter(ip(2)).unwrap();
        assert_eq!(gate.enter(ip(3)).err(), Some(GateFull::Total(3)));
        drop(a1);
        assert_eq!(gate.waiting(), 2);
        let _a3 = gate.enter(ip(1)).unwrap();
        assert_eq!(gate.waiting(), 3);
    }

    #[test]
    fn rate_limiter_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(3, 1.0, 16);
        let allowed = (0..10).filter(|_| rl.allow(ip(1), t0)).count();
        assert_eq!(allowed, 3);
        // Another source has its own bucket.
        assert!(rl.allow(ip(2), t0));
        assert!(!rl.allow(ip(1), t0 + Duration::from_millis(500)));
        assert!(rl.allow(ip(1), t0 + Duration::from_millis(1600)));
        // Refills stop at the burst.
        let later = t0 + Duration::from_secs(100);
        assert_eq!((0..10).filter(|_| rl.allow(ip(1), later)).count(), 3);
    }

    #[test]
    fn rate_limiter_memory_is_bounded_by_max_keys() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(1, 0.1, 4);
        for i in 0..4 {
            assert!(rl.allow(ip(i), t0));
        }
        // Every bucket is empty and refilling: a fifth source waits.
        assert!(!rl.allow(ip(9), t0));
        assert_eq!(rl.buckets.len(), 4);
        // Once they have refilled they are forgotten, and the new source gets its turn.
        assert!(rl.allow(ip(9), t0 + Duration::from_secs(11)));
        assert!(rl.buckets.len() <= 4);
    }

    #[test]
    fn throttled_logs_once_per_period_and_counts_the_rest() {
        let t0 = Instant::now();
        let log = Throttled::new(Duration::from_secs(10));
        assert_eq!(log.check(t0), Some(0));
        assert_eq!(log.check(t0 + Duration::from_secs(1)), None);
        assert_eq!(log.check(t0 + Duration::from_secs(2)), None);
        assert_eq!(log.check(t0 + Duration::from_secs(11)), Some(2));
    }
}
