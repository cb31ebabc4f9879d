//! Admission of control-plane connections before their TLS handshake, so
//! that silent or slow connections from a few hosts cannot lock the control
//! plane out:
//!
//! - pending handshakes are counted per [`Source`]: an IPv4 address, or the
//!   /64 of an IPv6 address (one host is routinely given a whole /64, so
//!   counting per IPv6 address would give it billions of slots);
//! - a connection must send its first byte within [`FIRST_BYTE_TIMEOUT`]
//!   (a TLS client speaks first), or it is closed;
//! - [`RESERVED_FOR_KNOWN`] of the [`MAX_PENDING`] handshake slots are kept
//!   for sources that completed a handshake before (the control plane
//!   itself), so unknown sources, however many, leave it room.

use std::collections::{HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::limits::{Held, KeyedCounter};

/// Handshakes pending at once, all sources together.
pub const MAX_PENDING: usize = 64;
/// Of those, the slots only known sources may take.
pub const RESERVED_FOR_KNOWN: usize = 16;
/// Handshakes pending from one source.
pub const MAX_PENDING_PER_SOURCE: u32 = 8;
/// How long a new connection may stay silent.
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(2);
/// Sources remembered as known (the oldest is forgotten first).
const MAX_KNOWN: usize = 1024;

/// Where a connection comes from, as handshakes are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// An IPv4 address (also an IPv4-mapped IPv6 one).
    V4(Ipv4Addr),
    /// The first 64 bits of an IPv6 address.
    V6Prefix(u64),
}

impl Source {
    /// The source of `ip`.
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Self::V4(v4),
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) >> 64;
                Self::V6Prefix(u64::try_from(prefix).expect("64 bits"))
            }
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::V4(ip) => write!(f, "{ip}"),
            Self::V6Prefix(prefix) => {
                let net = std::net::Ipv6Addr::from(u128::from(*prefix) << 64);
                write!(f, "{net}/64")
            }
        }
    }
}

/// Why a connection was not admitted to a handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Its source has [`MAX_PENDING_PER_SOURCE`] pending already.
    PerSource(u32),
    /// Unknown sources hold every slot they may take.
    UnknownShare(u32),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PerSource(n) => write!(f, "{n} handshakes from this source are already pending"),
            Self::UnknownShare(n) => write!(
                f,
                "{n} handshakes from sources never seen before are pending, the most they may hold \
                 ({RESERVED_FOR_KNOWN} of {MAX_PENDING} are kept for known ones)"
            ),
        }
    }
}

/// The pending handshakes and the known sources.
#[derive(Debug, Default)]
pub struct Handshakes {
    per_source: Arc<KeyedCounter<Source>>,
    unknown: Arc<KeyedCounter<()>>,
    known: Mutex<Known>,
}

#[derive(Debug, Default)]
struct Known {
    set: HashSet<Source>,
    order: VecDeque<Source>,
}

/// One admitted handshake; counted until dropped.
#[derive(Debug)]
pub struct Pending {
    _source: Held<Source>,
    _unknown: Option<Held<()>>,
}

impl Handshakes {
    /// Nothing pending, nothing known.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Admits one handshake from `source`, or says why not.
    pub fn admit(&self, source: Source) -> Result<Pending, Refused> {
        let unknown = if self.is_known(source) {
            None
        } else {
            let share = (MAX_PENDING - RESERVED_FOR_KNOWN) as u32;
            Some(
                self.unknown
                    .enter((), share)
                    .map_err(Refused::UnknownShare)?,
            )
        };
        let held = self
            .per_source
            .enter(source, MAX_PENDING_PER_SOURCE)
            .map_err(Refused::PerSource)?;
        Ok(Pending {
            _source: held,
            _unknown: unknown,
        })
    }

    /// Remembers that `source` completed a handshake.
    pub fn completed(&self, source: Source) {
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        if !known.set.insert(source) {
            return;
        }
        known.order.push_back(source);
        if known.order.len() > MAX_KNOWN
            && let Some(oldest) = known.order.pop_front()
        {
            known.set.remove(&oldest);
        }
    }

    /// Whether `source` completed a handshake before.
    pub fn is_known(&self, source: Source) -> bool {
        self.known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .set
            .contains(&source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(text: &str) -> Source {
        Source::of(text.parse().unwrap())
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(source("2001:db8:1:2::1"), source("2001:db8:1:2:ffff::9"));
        assert_ne!(source("2001:db8:1:2::1"), source("2001:db8:1:3::1"));
        assert_eq!(source("::ffff:127.0.0.2"), source("127.0.0.2"));
        assert_ne!(source("127.0.0.2"), source("127.0.0.3"));
        assert_eq!(source("2001:db8:1:2::1").to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn one_64_holds_eight_handshakes_whatever_its_addresses() {
        let table = Handshakes::new();
        let held: Vec<_> = (1..=MAX_PENDING_PER_SOURCE)
            .map(|i| table.admit(source(&format!("2001:db8::{i:x}"))).unwrap())
            .collect();
        assert_eq!(
            table.admit(source("2001:db8::ffff")).unwrap_err(),
            Refused::PerSource(MAX_PENDING_PER_SOURCE)
        );
        assert!(table.admit(source("2001:db8:0:1::1")).is_ok());
        drop(held);
        assert!(table.admit(source("2001:db8::ffff")).is_ok());
    }

    #[test]
    fn known_sources_keep_a_share_that_unknown_ones_cannot_take() {
        let table = Handshakes::new();
        let known = source("10.0.0.1");
        table.completed(known);
        let unknown_share = MAX_PENDING - RESERVED_FOR_KNOWN;
        let held: Vec<_> = (0..unknown_share)
            .map(|i| {
                let ip = format!("10.1.{}.{}", i / MAX_PENDING_PER_SOURCE as usize, i % 8);
                table.admit(source(&ip)).unwrap()
            })
            .collect();
        let refused = table.admit(source("10.2.0.1")).unwrap_err();
        assert_eq!(refused, Refused::UnknownShare(unknown_share as u32));
        assert!(refused.to_string().contains("kept for known ones"));
        let known_pending: Vec<_> = (0..MAX_PENDING_PER_SOURCE)
            .map(|_| table.admit(known).expect("a known source gets in"))
            .collect();
        assert_eq!(held.len() + known_pending.len(), 56);
    }

    #[test]
    fn the_known_set_is_bounded() {
        let table = Handshakes::new();
        for i in 0..(MAX_KNOWN as u32 + 10) {
            table.completed(Source::V4(Ipv4Addr::from(i)));
        }
        assert!(!table.is_known(Source::V4(Ipv4Addr::from(0))));
        assert!(table.is_known(Source::V4(Ipv4Addr::from(MAX_KNOWN as u32 + 9))));
    }
}
