//! Per-peer limits applied before any service runs: a token bucket of
//! requests (`limits.requests_per_second_per_peer`, burst
//! `limits.request_burst_per_peer`) and a count of open streaming RPCs
//! (`limits.max_streams_per_peer`). A peer is a uid on the Unix socket, a
//! certificate name on TCP (see [`super::peer::Who::limit_key`]).
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
