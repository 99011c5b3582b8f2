//! Endpoint choice for outbound connections to a Service: power of two choices over a
//! peak-sensitive EWMA of latency, weighted by the connections in flight (the cost Linkerd
//! and Finagle use). Two distinct endpoints are drawn at random and the cheaper one wins, so
//! a slow or overloaded endpoint gets less traffic without every proxy herding onto the one
//! that looked fastest a moment ago.
//!
//! The latency sample on this L4 path is what each connection's setup took (TCP connect
//! plus the TLS handshake with the peer's sidecar); a connection that failed counts as
//! [`FAILURE_PENALTY`]. A rise is taken at once (peak), a fall is averaged in over
//! [`DECAY`], and without samples the estimate decays toward zero, so an endpoint that was
//! slow a while ago is tried again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How fast old latency is forgotten (the EWMA's time constant).
pub const DECAY: Duration = Duration::from_secs(10);
/// The latency a failed connection counts as.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);
/// Endpoints remembered at most; the least recently used are forgotten past it.
pub const MAX_ENDPOINTS: usize = 16_384;

#[derive(Debug, Clone, Copy)]
struct Load {
    /// `None` until the first sample.
    ewma_ns: Option<f64>,
    pending: u32,
    stamp: Instant,
}

impl Load {
    fn new(now: Instant) -> Self {
        Self {
            ewma_ns: None,
            pending: 0,
            stamp: now,
        }
    }

    /// The EWMA decayed to `now`: without new samples it drifts toward zero, so an endpoint
    /// that was slow a while ago is tried again.
    fn decayed(&self, now: Instant) -> Option<f64> {
        let dt = now.saturating_duration_since(self.stamp).as_secs_f64();
        let w = (-dt / DECAY.as_secs_f64()).exp();
        self.ewma_ns.map(|e| e * w)
    }

    /// An endpoint never measured is tried first while idle (cost 0), and avoided while a
    /// connection to it is still being set up (as Finagle's and Linkerd's peak EWMA do).
    fn cost(&self, now: Instant) -> f64 {
        match self.decayed(now) {
            Some(e) => e * f64::from(self.pending + 1),
            None if self.pending == 0 => 0.0,
            None => FAILURE_PENALTY.as_nanos() as f64 + f64::from(self.pending),
        }
    }
}

/// Load per endpoint, shared by the connections of one proxy.
#[derive(Debug, Default)]
pub struct Balancer {
    loads: Mutex<HashMap<SocketAddr, Load>>,
}

/// An endpoint chosen for one connection: counted as in flight until dropped.
#[derive(Debug)]
pub struct Chosen {
    balancer: Arc<Balancer>,
    pub addr: SocketAddr,
    started: Instant,
}

impl Balancer {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Chooses among `candidates` (power of two choices by cost); `None` when there are none.
    pub fn pick(self: &Arc<Self>, candidates: &[SocketAddr]) -> Option<Chosen> {
        let now = Instant::now();
        let addr = match candidates.len() {
            0 => return None,
            1 => candidates[0],
            n => {
                let a = random_below(n);
                let mut b = random_below(n - 1);
                if b >= a {
                    b += 1;
                }
                let loads = self.lock();
                let cost = |ep: &SocketAddr| {
                    loads
                        .get(ep)
                        .map_or(Load::new(now).cost(now), |l| l.cost(now))
                };
                if cost(&candidates[b]) < cost(&candidates[a]) {
                    candidates[b]
                } else {
                    candidates[a]
                }
            }
        };
        let mut loads = self.lock();
        if loads.len() >= MAX_ENDPOINTS && !loads.contains_key(&addr) {
            // Forget the endpoint idle the longest.
            if let Some(oldest) = loads
                .iter()
                .filter(|(_, l)| l.pending == 0)
                .min_by_key(|(_, l)| l.stamp)
                .map(|(a, _)| *a)
            {
                loads.remove(&oldest);
            }
        }
        loads.entry(addr).or_insert_with(|| Load::new(now)).pending += 1;
        Some(Chosen {
            balancer: Arc::clone(self),
            addr,
            started: now,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Load>> {
        self.loads.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn observe(&self, addr: SocketAddr, rtt: Duration) {
        let now = Instant::now();
        let mut loads = self.lock();
        let l = loads.entry(addr).or_insert_with(|| Load::new(now));
        let sample = rtt.as_nanos() as f64;
        // Peak-sensitive: a rise is believed at once, a fall is averaged in over DECAY.
        l.ewma_ns = Some(match l.ewma_ns {
            Some(current) if sample < current => {
                let dt = now.saturating_duration_since(l.stamp).as_secs_f64();
                let w = (-dt / DECAY.as_secs_f64()).exp();
                current * w + sample * (1.0 - w)
            }
            _ => sample,
        });
        l.stamp = now;
    }

    /// The current cost of `addr` (for tests and the admin dump).
    pub fn cost(&self, addr: SocketAddr) -> Option<f64> {
        let now = Instant::now();
        self.lock().get(&addr).map(|l| l.cost(now))
    }
}

impl Chosen {
    /// The connection to this endpoint is set up: its setup time is a latency sample.
    pub fn connected(&self) {
        self.balancer.observe(self.addr, self.started.elapsed());
    }

    /// The connection failed: counted as a very slow sample.
    pub fn failed(&self) {
        self.balancer.observe(self.addr, FAILURE_PENALTY);
    }
}

impl Drop for Chosen {
    fn drop(&mut self) {
        if let Some(l) = self.balancer.lock().get_mut(&self.addr) {
            l.pending = l.pending.saturating_sub(1);
        }
    }
}

/// A random number below `n` (n > 0), from a per-thread xorshift seeded by the OS's
/// randomized hasher keys: choice needs no cryptographic quality.
fn random_below(n: usize) -> usize {
    use std::cell::Cell;
    use std::hash::{BuildHasher, Hasher};
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(0x9e37_79b9_7f4a_7c15);
            h.finish() | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x % n as u64) as usize
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([10, 244, 0, i], 8080)))
            .collect()
    }

    #[test]
    fn equal_endpoints_share_the_load_by_connections_in_flight() {
        let b = Balancer::new();
        let eps = eps(4);
        // Endpoints equally fast; 8 connections in flight at a time, as under steady load.
        let mut open = std::collections::VecDeque::new();
        let mut count = HashMap::new();
        for _ in 0..4000 {
            let c = b.pick(&eps).unwrap();
            b.observe(c.addr, Duration::from_micros(100));
            *count.entry(c.addr).or_insert(0u32) += 1;
            open.push_back(c);
            if open.len() > 8 {
                open.pop_front();
            }
        }
        assert_eq!(count.len(), 4);
        for (ep, n) in count {
            assert!((700..1300).contains(&n), "{ep}: {n} of 4000");
        }
    }

    #[test]
    fn a_slow_endpoint_gets_less_and_a_failing_one_almost_none() {
        let b = Balancer::new();
        let eps = eps(3);
        // eps[0] is slow (20 ms), eps[1] failed, eps[2] fast (0.2 ms).
        b.observe(eps[0], Duration::from_millis(20));
        b.observe(eps[1], FAILURE_PENALTY);
        b.observe(eps[2], Duration::from_micros(200));
        let mut count = [0u32; 3];
        for _ in 0..3000 {
            let c = b.pick(&eps).unwrap();
            count[eps.iter().position(|e| *e == c.addr).unwrap()] += 1;
        }
        // P2C: the worst of three wins no draw; the fast one wins every draw it is in.
        assert_eq!(count[1], 0, "{count:?}");
        assert!(count[2] > 1800, "{count:?}");
        assert!(count[0] > 0 && count[0] < 1200, "{count:?}");
    }

    #[test]
    fn connections_in_flight_count_against_an_endpoint() {
        let b = Balancer::new();
        let eps = eps(2);
        // Both equally fast; hold 10 connections open on the first.
        let held: Vec<Chosen> = (0..10)
            .map(|_| {
                let c = b.pick(&eps[..1]).unwrap();
                c.connected();
                c
            })
            .collect();
        for _ in 0..100 {
            assert_eq!(b.pick(&eps).unwrap().addr, eps[1]);
        }
        let loaded = b.cost(eps[0]).unwrap();
        drop(held);
        assert!(b.cost(eps[0]).unwrap() < loaded / 5.0);
    }

    #[test]
    fn no_candidates_no_choice() {
        assert!(Balancer::new().pick(&[]).is_none());
    }
}
