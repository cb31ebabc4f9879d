//! Per-peer limits applied before any service runs: a token bucket of
//! requests (`limits.requests_per_second_per_peer`, burst
//! `limits.request_burst_per_peer`), a count of open streaming RPCs
//! (`limits.max_streams_per_peer`), of open connections
//! (`limits.max_connections_per_peer`, `limits.max_connections`:
//! [`ConnectionLimiter`]) and of request bytes held in the agent's buffers
//! (`limits.max_inflight_bytes_per_peer`, `limits.max_inflight_bytes`:
//! [`InFlight`]). A peer is a uid on the Unix socket, a certificate name on
//! TCP (see [`super::peer::Who::limit_key`]).
//!
//! Time comes from `tokio::time`, so tests pause and advance it.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::time::Instant;
use tonic::Status;

use super::config::LimitsConfig;

/// Buckets idle longer than this are forgotten once the map grows large.
const IDLE_BUCKET_SECONDS: f64 = 60.0;
/// Map size above which idle buckets are pruned.
const PRUNE_ABOVE: usize = 1024;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

/// The counters of every peer.
#[derive(Debug, Default)]
pub struct PeerLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
    streams: Arc<KeyedCounter<String>>,
}

impl PeerLimiter {
    /// An empty limiter.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Takes one request token for `key`, or answers RESOURCE_EXHAUSTED
    /// naming the limit.
    pub fn take_request(&self, key: &str, limits: &LimitsConfig) -> Result<(), Status> {
        let rate = f64::from(limits.requests_per_second_per_peer);
        let burst = f64::from(limits.request_burst_per_peer.max(1));
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() > PRUNE_ABOVE {
            buckets
                .retain(|_, b| now.duration_since(b.refilled).as_secs_f64() < IDLE_BUCKET_SECONDS);
        }
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: burst,
            refilled: now,
        });
        let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Status::resource_exhausted(format!(
                "too many requests from {key}: over limits.requests_per_second_per_peer = {} \
                 (burst limits.request_burst_per_peer = {}); retry later",
                limits.requests_per_second_per_peer, limits.request_burst_per_peer
            )))
        }
    }

    /// Opens one streaming RPC for `key`, or answers RESOURCE_EXHAUSTED
    /// naming the limit. The slot is given back when the returned value is
    /// dropped (the stream ended or the client went away).
    pub fn open_stream(&self, key: &str, limits: &LimitsConfig) -> Result<StreamSlot, Status> {
        self.streams
            .enter(key.to_owned(), limits.max_streams_per_peer)
            .map_err(|open| {
                Status::resource_exhausted(format!(
                    "{key} already holds {open} open streams: limits.max_streams_per_peer = {}; \
                     close one first",
                    limits.max_streams_per_peer
                ))
            })
    }

    /// Streams currently open for `key`.
    pub fn open_streams(&self, key: &str) -> u32 {
        self.streams.count(&key.to_owned())
    }
}

/// One open streaming RPC; counted until dropped.
pub type StreamSlot = Held<String>;

/// Open connections, per peer and in total.
#[derive(Debug, Default)]
pub struct ConnectionLimiter {
    per_peer: Arc<KeyedCounter<String>>,
    total: Arc<KeyedCounter<()>>,
}

/// One open connection; counted until dropped (when the connection ends).
#[derive(Debug)]
pub struct ConnectionSlot {
    _peer: Held<String>,
    _total: Held<()>,
}

impl ConnectionLimiter {
    /// An empty table.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Counts one more connection for `key`, or says which limit it is over.
    pub fn admit(&self, key: &str, limits: &LimitsConfig) -> Result<ConnectionSlot, Status> {
        let total = self.total.enter((), limits.max_connections).map_err(|open| {
            Status::resource_exhausted(format!(
                "the agent already serves {open} connections: limits.max_connections = {}; retry later",
                limits.max_connections
            ))
        })?;
        let peer = self
            .per_peer
            .enter(key.to_owned(), limits.max_connections_per_peer)
            .map_err(|open| {
                Status::resource_exhausted(format!(
                    "{key} already holds {open} connections: limits.max_connections_per_peer = {}; \
                     close one first",
                    limits.max_connections_per_peer
                ))
            })?;
        Ok(ConnectionSlot {
            _peer: peer,
            _total: total,
        })
    }

    /// Connections open for `key`.
    pub fn open(&self, key: &str) -> u32 {
        self.per_peer.count(&key.to_owned())
    }
}

/// Bytes of request bodies held in the agent's buffers, per peer and in
/// total, each capped. A [`Charge`] holds some of them until released or
/// dropped.
#[derive(Debug, Default)]
pub struct InFlight {
    held: Mutex<InFlightCounts>,
}

#[derive(Debug, Default)]
struct InFlightCounts {
    total: u64,
    per_peer: HashMap<String, u64>,
}

impl InFlight {
    /// Nothing held.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// An empty charge for `key`'s bytes.
    pub fn charge(self: &Arc<Self>, key: &str) -> Charge {
        Charge {
            table: self.clone(),
            key: key.to_owned(),
            bytes: 0,
        }
    }

    /// Bytes held in total.
    pub fn total(&self) -> u64 {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

/// Bytes one request holds in the agent's buffers.
#[derive(Debug)]
pub struct Charge {
    table: Arc<InFlight>,
    key: String,
    bytes: u64,
}

impl Charge {
    /// Adds `n` bytes, or answers RESOURCE_EXHAUSTED naming the limit it
    /// would pass (nothing is added then).
    pub fn add(&mut self, n: usize, limits: &LimitsConfig) -> Result<(), Status> {
        let n = n as u64;
        let mut held = self
            .table
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let peer = held.per_peer.get(&self.key).copied().unwrap_or(0);
        if peer + n > u64::from(limits.max_inflight_bytes_per_peer) {
            return Err(Status::resource_exhausted(format!(
                "{} already has {peer} request bytes in flight: limits.max_inflight_bytes_per_peer = {}; \
                 send fewer or smaller requests at once",
                self.key, limits.max_inflight_bytes_per_peer
            )));
        }
        if held.total + n > u64::from(limits.max_inflight_bytes) {
            return Err(Status::resource_exhausted(format!(
                "the agent already holds {} request bytes in flight: limits.max_inflight_bytes = {}; retry later",
                held.total, limits.max_inflight_bytes
            )));
        }
        held.total += n;
        *held.per_peer.entry(self.key.clone()).or_insert(0) += n;
        self.bytes += n;
        Ok(())
    }

    /// Gives back `n` of the bytes held (at most all of them).
    pub fn release(&mut self, n: usize) {
        let n = (n as u64).min(self.bytes);
        if n == 0 {
            return;
        }
        self.bytes -= n;
        let mut held = self
            .table
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        held.total = held.total.saturating_sub(n);
        if let Some(peer) = held.per_peer.get_mut(&self.key) {
            *peer = peer.saturating_sub(n);
            if *peer == 0 {
                held.per_peer.remove(&self.key);
            }
        }
    }

    /// Bytes held by this charge.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.release(usize::try_from(self.bytes).unwrap_or(usize::MAX));
    }
}

/// Things in progress per key (open streams per peer, pending handshakes
/// per address), each capped.
#[derive(Debug)]
pub struct KeyedCounter<K>(Mutex<HashMap<K, u32>>);

impl<K> Default for KeyedCounter<K> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

impl<K: Hash + Eq + Clone> KeyedCounter<K> {
    /// Counts one more for `key` unless `max` are already held; then the
    /// count held is returned as the error.
    pub fn enter(self: &Arc<Self>, key: K, max: u32) -> Result<Held<K>, u32> {
        let mut counts = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let count = counts.entry(key.clone()).or_insert(0);
        if *count >= max {
            return Err(*count);
        }
        *count += 1;
        Ok(Held {
            counter: self.clone(),
            key,
        })
    }

    /// How many are held for `key`.
    pub fn count(&self, key: &K) -> u32 {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .copied()
            .unwrap_or(0)
    }
}

/// One unit counted by a [`KeyedCounter`] until dropped.
#[derive(Debug)]
pub struct Held<K: Hash + Eq> {
    counter: Arc<KeyedCounter<K>>,
    key: K,
}

impl<K: Hash + Eq> Drop for Held<K> {
    fn drop(&mut self) {
        let mut counts = self
            .counter
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(rate: u32, burst: u32, streams: u32) -> LimitsConfig {
        LimitsConfig {
            requests_per_second_per_peer: rate,
            request_burst_per_peer: burst,
            max_streams_per_peer: streams,
            ..LimitsConfig::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_allows_a_burst_then_the_rate() {
        let limiter = PeerLimiter::new();
        let l = limits(2, 3, 1);
        for _ in 0..3 {
            limiter.take_request("uid:1", &l).unwrap();
        }
        let refused = limiter.take_request("uid:1", &l).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused
                .message()
                .contains("limits.requests_per_second_per_peer = 2"),
            "{refused:?}"
        );
        // Another peer has its own bucket.
        limiter.take_request("uid:2", &l).unwrap();
        tokio::time::advance(Duration::from_millis(500)).await;
        limiter.take_request("uid:1", &l).unwrap();
        assert!(limiter.take_request("uid:1", &l).is_err());
        // A long pause refills only up to the burst.
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..3 {
            limiter.take_request("uid:1", &l).unwrap();
        }
        assert!(limiter.take_request("uid:1", &l).is_err());
    }

    #[test]
    fn connections_are_capped_per_peer_and_in_total() {
        let table = ConnectionLimiter::new();
        let l = LimitsConfig {
            max_connections_per_peer: 2,
            max_connections: 3,
            ..LimitsConfig::default()
        };
        let a = table.admit("uid:1", &l).unwrap();
        let _b = table.admit("uid:1", &l).unwrap();
        let refused = table.admit("uid:1", &l).unwrap_err();
        assert!(
            refused
                .message()
                .contains("limits.max_connections_per_peer = 2"),
            "{refused:?}"
        );
        let _c = table.admit("uid:2", &l).unwrap();
        let refused = table.admit("uid:3", &l).unwrap_err();
        assert!(
            refused.message().contains("limits.max_connections = 3"),
            "{refused:?}"
        );
        drop(a);
        assert_eq!(table.open("uid:1"), 1);
        table.admit("uid:3", &l).unwrap();
    }

    #[test]
    fn bytes_in_flight_are_capped_per_peer_and_in_total() {
        let table = InFlight::new();
        let l = LimitsConfig {
            max_inflight_bytes_per_peer: 100,
            max_inflight_bytes: 150,
            ..LimitsConfig::default()
        };
        let mut a = table.charge("uid:1");
        a.add(60, &l).unwrap();
        let mut b = table.charge("uid:1");
        let refused = b.add(41, &l).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused
                .message()
                .contains("limits.max_inflight_bytes_per_peer = 100"),
            "{refused:?}"
        );
        b.add(40, &l).unwrap();
        let mut c = table.charge("uid:2");
        let refused = c.add(51, &l).unwrap_err();
        assert!(
            refused
                .message()
                .contains("limits.max_inflight_bytes = 150"),
            "{refused:?}"
        );
        a.release(30);
        c.add(51, &l).unwrap();
        assert_eq!(table.total(), 121);
        drop((a, b, c));
        assert_eq!(table.total(), 0);
    }

    #[test]
    fn streams_are_counted_until_dropped() {
        let limiter = PeerLimiter::new();
        let l = limits(1, 1, 2);
        let a = limiter.open_stream("cert:cp", &l).unwrap();
        let _b = limiter.open_stream("cert:cp", &l).unwrap();
        let refused = limiter.open_stream("cert:cp", &l).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused
                .message()
                .contains("limits.max_streams_per_peer = 2"),
            "{refused:?}"
        );
        limiter.open_stream("uid:0", &l).unwrap();
        drop(a);
        assert_eq!(limiter.open_streams("cert:cp"), 1);
        let _c = limiter.open_stream("cert:cp", &l).unwrap();
    }
}
