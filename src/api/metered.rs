//! A request body whose bytes count against the caller's budget of bytes
//! in flight ([`super::limits::InFlight`]) while the agent holds them, so
//! that no peer, and no set of peers, can make the agent buffer more than
//! `limits.max_inflight_bytes_per_peer` / `limits.max_inflight_bytes` of
//! requests at once, however many streams and connections it opens.
//!
//! Bytes are charged as h2 hands them over. A body read by tonic (every
//! call the guard passes on unread) is released message by message: the
//! body follows the gRPC framing (a 5-byte prefix with the length), and the
//! bytes of a complete message are given back when tonic polls for more,
//! by which time it has decoded it. A body the guard reads itself (to audit
//! a mutation or check a dry run) stays charged until the request is done
//! with it. Going over a limit fails the body with RESOURCE_EXHAUSTED
//! naming it; tonic answers that status.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use tonic::Status;
use tonic::body::Body;

use super::config::LimitsConfig;
use super::limits::Charge;

/// What the body does with the bytes it passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Charge them, and release each message once the reader polls past it.
    Streaming,
    /// Charge them and keep them charged until dropped.
    Buffered,
    /// Already charged (bytes the guard read): hold the charge until dropped.
    Held,
}

/// Where the body is in the gRPC framing of its messages.
#[derive(Debug, Default)]
struct Framing {
    prefix: [u8; 5],
    have: usize,
    left: usize,
    current: usize,
}

impl Framing {
    /// Walks `data`; returns the bytes of the messages it completes.
    fn walk(&mut self, mut data: &[u8]) -> usize {
        let mut complete = 0;
        while !data.is_empty() {
            if self.have < self.prefix.len() {
                let take = (self.prefix.len() - self.have).min(data.len());
                self.prefix[self.have..self.have + take].copy_from_slice(&data[..take]);
                self.have += take;
                self.current += take;
                data = &data[take..];
                if self.have == self.prefix.len() {
                    let [_, a, b, c, d] = self.prefix;
                    self.left = u32::from_be_bytes([a, b, c, d]) as usize;
                }
            } else {
                let take = self.left.min(data.len());
                self.left -= take;
                self.current += take;
                data = &data[take..];
            }
            if self.have == self.prefix.len() && self.left == 0 {
                complete += self.current;
                *self = Self::default();
            }
        }
        complete
    }
}

/// A request body counted against its peer's budget (see the module doc).
pub struct MeteredBody {
    inner: Body,
    charge: Charge,
    limits: LimitsConfig,
    mode: Mode,
    framing: Framing,
    /// Bytes of complete messages not yet released.
    decoded: usize,
    /// Bytes charged ahead of their arrival ([`MeteredBody::reserve`]).
    prepaid: usize,
}

impl MeteredBody {
    /// A body tonic reads: each message is released once read past.
    pub fn streaming(inner: Body, charge: Charge, limits: &LimitsConfig) -> Self {
        Self::new(inner, charge, limits, Mode::Streaming)
    }

    /// A body the guard reads whole: charged until dropped.
    pub fn buffered(inner: Body, charge: Charge, limits: &LimitsConfig) -> Self {
        Self::new(inner, charge, limits, Mode::Buffered)
    }

    fn new(inner: Body, charge: Charge, limits: &LimitsConfig, mode: Mode) -> Self {
        Self {
            inner,
            charge,
            limits: limits.clone(),
            mode,
            framing: Framing::default(),
            decoded: 0,
            prepaid: 0,
        }
    }

    /// Charges `bytes` still to come now, so that a message the budget
    /// cannot hold is refused before any more of it is read.
    pub fn reserve(&mut self, bytes: usize) -> Result<(), Status> {
        self.charge.add(bytes, &self.limits)?;
        self.prepaid += bytes;
        Ok(())
    }

    /// The bytes read from a buffered body, as a body that keeps them
    /// charged until the service is done with it.
    pub fn into_held(self, bytes: Bytes) -> Body {
        Body::new(Self {
            inner: Body::new(http_body_util::Full::new(bytes)),
            charge: self.charge,
            limits: self.limits,
            mode: Mode::Held,
            framing: Framing::default(),
            decoded: 0,
            prepaid: 0,
        })
    }
}

impl http_body::Body for MeteredBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.mode == Mode::Streaming && this.decoded > 0 {
            this.charge.release(this.decoded);
            this.decoded = 0;
        }
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if this.mode != Mode::Held
            && let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
        {
            let prepaid = this.prepaid.min(data.len());
            this.prepaid -= prepaid;
            if let Err(status) = this.charge.add(data.len() - prepaid, &this.limits) {
                return Poll::Ready(Some(Err(status)));
            }
            this.decoded += this.framing.walk(data);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::limits::InFlight;
    use http_body_util::BodyExt;

    fn message(len: usize) -> Vec<u8> {
        let mut out = vec![0u8];
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.extend(std::iter::repeat_n(7, len));
        out
    }

    #[test]
    fn framing_finds_message_ends_across_chunks() {
        let mut framing = Framing::default();
        let wire: Vec<u8> = [message(3), message(0), message(10)].concat();
        let mut complete = Vec::new();
        for chunk in wire.chunks(4) {
            complete.push(framing.walk(chunk));
        }
        assert_eq!(complete.iter().sum::<usize>(), wire.len());
        assert_eq!(complete[0], 0, "the first chunk holds no whole message");
        assert_eq!(complete[1], 8, "the first ends in the second chunk");
        assert_eq!(complete[3], 5, "the empty one in the fourth");
    }

    /// A body that yields `chunks` one per poll.
    fn chunked(chunks: Vec<Vec<u8>>) -> Body {
        let stream = tokio_stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, Status>(Frame::data(Bytes::from(c)))),
        );
        Body::new(http_body_util::StreamBody::new(stream))
    }

    #[tokio::test]
    async fn a_stream_of_messages_is_released_as_it_is_read() {
        let table = InFlight::new();
        let limits = LimitsConfig {
            max_inflight_bytes_per_peer: 64 << 10,
            max_inflight_bytes: 64 << 10,
            ..LimitsConfig::default()
        };
        // 100 messages of 40 KiB: 4 MB through a 64 KiB budget.
        let chunks = (0..100).map(|_| message(40 << 10)).collect();
        let mut body = MeteredBody::streaming(chunked(chunks), table.charge("uid:1"), &limits);
        let mut seen = 0;
        while let Some(frame) = body.frame().await {
            seen += frame.expect("within the budget").into_data().unwrap().len();
            assert!(table.total() <= 64 << 10);
        }
        assert_eq!(seen, 100 * ((40 << 10) + 5));
        drop(body);
        assert_eq!(table.total(), 0);
    }

    #[tokio::test]
    async fn a_buffered_body_over_the_budget_is_refused_naming_the_limit() {
        let table = InFlight::new();
        let limits = LimitsConfig {
            max_inflight_bytes_per_peer: 64 << 10,
            ..LimitsConfig::default()
        };
        let chunks = (0..3).map(|_| vec![0u8; 30 << 10]).collect();
        let body = MeteredBody::buffered(chunked(chunks), table.charge("uid:1"), &limits);
        let error = body.collect().await.expect_err("over the budget");
        assert_eq!(error.code(), tonic::Code::ResourceExhausted);
        assert!(
            error
                .message()
                .contains("limits.max_inflight_bytes_per_peer"),
            "{error:?}"
        );
        assert_eq!(table.total(), 0, "released when dropped");
    }
}
