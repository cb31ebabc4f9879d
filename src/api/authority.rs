//! Lets any stock gRPC client use the Unix socket. grpcio ≥ 1.57, grpc-java
//! and grpc-swift send the socket path (URL-encoded, `%2Frun%2F…`) as
//! `:authority`, which h2 refuses as malformed (RST_STREAM PROTOCOL_ERROR,
//! hyperium/h2 pull request 487, open as of this writing), so every such
//! client failed unless its author set `grpc.default_authority`.
//!
//! [`AuthorityFix`] is an I/O shim under h2, on Unix-socket connections only
//! (the TCP listener keeps h2's strict validation). It reads the client's
//! side of the connection frame by frame: the preface and every frame but
//! HEADERS and CONTINUATION pass byte for byte. Each header block is
//! reassembled (padding and the PRIORITY fields parsed off), decoded with
//! the client's HPACK context (`loona-hpack`, which tracks the dynamic table
//! the client's encoder fills), an `:authority` that is not a valid URI
//! authority is replaced by `localhost`, and the block is encoded again with
//! literals only. Never using the dynamic table keeps h2's decoder, which
//! sees only this output, in the same (empty) state whatever the client's
//! table holds. The new block is split into a HEADERS frame and
//! CONTINUATION frames of at most [`MAX_FRAME_SIZE`], the frame size h2 is
//! configured to accept.
//!
//! Limits, so that the shim itself cannot be made to buffer much: a header
//! block is at most [`MAX_BLOCK_BYTES`] compressed and [`MAX_LIST_BYTES`]
//! decoded (RFC 7541 sizes: name + value + 32 per header), and the client's
//! table at most [`HEADER_TABLE_SIZE`], h2's advertised default. A
//! connection breaking these rules, or sending a malformed header block, is
//! closed with an I/O error (h2 would close it too, with a GOAWAY).
//!
//! Drop this module once h2 accepts such authorities (or tonic exposes an
//! option to ignore `:authority`), and the `AuthorityFix` wrapping in
//! [`super::listen::unix`] with it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The largest frame payload sent to h2: its SETTINGS_MAX_FRAME_SIZE, which
/// the daemon sets on the server to this value.
pub const MAX_FRAME_SIZE: usize = 16 * 1024;
/// The client's HPACK table may not grow past this (h2's
/// SETTINGS_HEADER_TABLE_SIZE, the protocol default, which hyper keeps).
pub const HEADER_TABLE_SIZE: usize = 4096;
/// Largest compressed header block accepted (HEADERS plus CONTINUATIONs).
pub const MAX_BLOCK_BYTES: usize = 64 * 1024;
/// Largest decoded header list accepted (h2 itself allows 16 KiB and
/// refuses the stream above; this bounds what the shim decodes).
pub const MAX_LIST_BYTES: usize = 64 * 1024;
/// What replaces a malformed `:authority` (what grpc-go sends).
pub const REPLACEMENT: &[u8] = b"localhost";

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Bytes read from the client at a time.
const READ_CHUNK: usize = 16 * 1024;

/// Where the parser is in the client's byte stream.
#[derive(Debug)]
enum State {
    /// Expecting the 24-byte client preface.
    Preface,
    /// Expecting a 9-byte frame header.
    FrameHeader,
    /// Copying `left` more payload bytes of a frame passed as is.
    Passthrough { left: usize },
    /// Not HTTP/2 with prior knowledge: everything passes (h2 refuses it).
    Raw,
}

/// A header block being reassembled from HEADERS and CONTINUATION frames.
#[derive(Debug)]
struct Pending {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
}

/// The client's half of an HTTP/2 connection with every malformed
/// `:authority` replaced; writes pass through untouched. See the module doc.
pub struct AuthorityFix<S> {
    inner: S,
    /// Bytes read from the client, not yet processed.
    input: BytesMut,
    /// Processed bytes for h2 to read.
    output: BytesMut,
    state: State,
    pending: Option<Pending>,
    decoder: loona_hpack::Decoder<'static>,
    eof: bool,
    rewrites: u64,
}

impl<S> AuthorityFix<S> {
    /// Wraps the client's stream of a freshly accepted connection.
    pub fn new(inner: S) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Self {
            inner,
            input: BytesMut::new(),
            output: BytesMut::new(),
            state: State::Preface,
            pending: None,
            decoder,
            eof: false,
            rewrites: 0,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// How many `:authority` values were replaced so far.
    pub fn rewrites(&self) -> u64 {
        self.rewrites
    }

    /// Processes as much buffered input as possible into `output`. Returns
    /// `Ok(false)` when more input is needed.
    fn step(&mut self) -> io::Result<bool> {
        match self.state {
            State::Raw => {
                if self.input.is_empty() {
                    return Ok(false);
                }
                let all = self.input.split();
                self.output.unsplit(all);
                Ok(true)
            }
            State::Preface => {
                let n = self.input.len().min(PREFACE.len());
                if self.input[..n] != PREFACE[..n] {
                    self.state = State::Raw;
                    return Ok(true);
                }
                if n < PREFACE.len() {
                    return Ok(false);
                }
                let preface = self.input.split_to(PREFACE.len());
                self.output.unsplit(preface);
                self.state = State::FrameHeader;
                Ok(true)
            }
            State::Passthrough { left } => {
                if left == 0 {
                    self.state = State::FrameHeader;
                    return Ok(true);
                }
                let n = left.min(self.input.len());
                if n == 0 {
                    return Ok(false);
                }
                let chunk = self.input.split_to(n);
                self.output.unsplit(chunk);
                self.state = if n == left {
                    State::FrameHeader
                } else {
                    State::Passthrough { left: left - n }
                };
                Ok(true)
            }
            State::FrameHeader => self.frame(),
        }
    }

    /// Handles the frame whose header starts `input`.
    fn frame(&mut self) -> io::Result<bool> {
        if self.input.len() < FRAME_HEADER {
            return Ok(false);
        }
        let head = &self.input[..FRAME_HEADER];
        let length = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let stream_id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let header_frame = kind == HEADERS || (kind == CONTINUATION && self.pending.is_some());
        if !header_frame || length > MAX_FRAME_SIZE {
            if self.pending.is_some() {
                return Err(protocol(
                    "a header block was interrupted by another frame (CONTINUATION expected)",
                ));
            }
            // Passed as is: h2 answers an oversized or stray frame itself.
            let head = self.input.split_to(FRAME_HEADER);
            self.output.unsplit(head);
            self.state = State::Passthrough { left: length };
            return Ok(true);
        }
        if self.input.len() < FRAME_HEADER + length {
            self.input.reserve(FRAME_HEADER + length - self.input.len());
            return Ok(false);
        }
        self.input.advance(FRAME_HEADER);
        let payload = self.input.split_to(length);
        if kind == HEADERS {
            self.start_block(flags, stream_id, &payload)?;
        } else {
            self.continue_block(stream_id, &payload)?;
        }
        if flags & END_HEADERS != 0 {
            self.finish_block()?;
        }
        Ok(true)
    }

    fn start_block(&mut self, flags: u8, stream_id: u32, payload: &[u8]) -> io::Result<()> {
        if self.pending.is_some() {
            return Err(protocol("HEADERS while a header block is still open"));
        }
        let mut rest = payload;
        let mut pad = 0;
        if flags & PADDED != 0 {
            let (&len, tail) = rest
                .split_first()
                .ok_or_else(|| protocol("PADDED HEADERS without a pad length"))?;
            pad = usize::from(len);
            rest = tail;
        }
        let mut priority = None;
        if flags & PRIORITY != 0 {
            if rest.len() < 5 {
                return Err(protocol("HEADERS too short for its PRIORITY fields"));
            }
            let (fields, tail) = rest.split_at(5);
            priority = Some(fields.try_into().expect("five bytes"));
            rest = tail;
        }
        if pad > rest.len() {
            return Err(protocol("HEADERS padding longer than the frame"));
        }
        self.pending = Some(Pending {
            stream_id,
            end_stream: flags & END_STREAM != 0,
            priority,
            block: rest[..rest.len() - pad].to_vec(),
        });
        Ok(())
    }

    fn continue_block(&mut self, stream_id: u32, fragment: &[u8]) -> io::Result<()> {
        let pending = self.pending.as_mut().expect("checked by the caller");
        if pending.stream_id != stream_id {
            return Err(protocol("CONTINUATION on another stream"));
        }
        if pending.block.len() + fragment.len() > MAX_BLOCK_BYTES {
            return Err(protocol("header block over 64 KiB"));
        }
        pending.block.extend_from_slice(fragment);
        Ok(())
    }

    /// Decodes the complete block, fixes `:authority`, and writes it as
    /// HEADERS and CONTINUATION frames to `output`.
    fn finish_block(&mut self) -> io::Result<()> {
        let pending = self.pending.take().expect("a block is open");
        let (headers, rewrote) = decode_fixed(&mut self.decoder, &pending.block)?;
        if rewrote {
            self.rewrites += 1;
            if self.rewrites == 1 {
                tracing::debug!(
                    stream = pending.stream_id,
                    "replaced a malformed :authority with localhost (a stock gRPC client on the Unix socket)"
                );
            }
        }
        let block = encode_literals(&headers);
        write_block(&mut self.output, &pending, &block);
        Ok(())
    }
}

/// A decoded header list: (name, value) pairs in order.
type HeaderList = Vec<(Vec<u8>, Vec<u8>)>;

fn protocol(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("HTTP/2 protocol error from the client: {what}"),
    )
}

/// Decodes `block` with the client's context and replaces a malformed
/// `:authority`; returns the headers and whether one was replaced.
fn decode_fixed(
    decoder: &mut loona_hpack::Decoder<'static>,
    block: &[u8],
) -> io::Result<(HeaderList, bool)> {
    let mut headers = Vec::new();
    let mut size = 0usize;
    let mut rewrote = false;
    decoder
        .decode_with_cb(block, |name, value| {
            size += name.len() + value.len() + 32;
            if size > MAX_LIST_BYTES {
                return;
            }
            let value = if name.as_ref() == b":authority"
                && http::uri::Authority::try_from(value.as_ref()).is_err()
            {
                rewrote = true;
                REPLACEMENT.to_vec()
            } else {
                value.into_owned()
            };
            headers.push((name.into_owned(), value));
        })
        .map_err(|error| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("HTTP/2 header block from the client does not decode (HPACK): {error}"),
            )
        })?;
    if size > MAX_LIST_BYTES {
        return Err(protocol("decoded header list over 64 KiB"));
    }
    Ok((headers, rewrote))
}

/// Encodes headers as "literal without indexing, new name" (RFC 7541
/// 6.2.2): no table reference, no table insertion.
fn encode_literals(headers: &HeaderList) -> Vec<u8> {
    let mut out = Vec::with_capacity(headers.iter().map(|(n, v)| n.len() + v.len() + 8).sum());
    for (name, value) in headers {
        out.push(0x00);
        for string in [name, value] {
            loona_hpack::encoder::encode_integer_into(string.len(), 7, 0, &mut out)
                .expect("writing to a Vec cannot fail");
            out.extend_from_slice(string);
        }
    }
    out
}

/// Writes `block` as one HEADERS frame (with the block's END_STREAM and
/// PRIORITY, no padding) and as many CONTINUATION frames as it needs.
fn write_block(out: &mut BytesMut, pending: &Pending, block: &[u8]) {
    let priority_len = if pending.priority.is_some() { 5 } else { 0 };
    let first_len = block.len().min(MAX_FRAME_SIZE - priority_len);
    let (first, mut rest) = block.split_at(first_len);
    let mut flags = 0;
    if pending.end_stream {
        flags |= END_STREAM;
    }
    if pending.priority.is_some() {
        flags |= PRIORITY;
    }
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    put_frame_header(
        out,
        priority_len + first.len(),
        HEADERS,
        flags,
        pending.stream_id,
    );
    if let Some(priority) = &pending.priority {
        out.put_slice(priority);
    }
    out.put_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME_SIZE));
        let flags = if tail.is_empty() { END_HEADERS } else { 0 };
        put_frame_header(out, chunk.len(), CONTINUATION, flags, pending.stream_id);
        out.put_slice(chunk);
        rest = tail;
    }
}

fn put_frame_header(out: &mut BytesMut, length: usize, kind: u8, flags: u8, stream_id: u32) {
    let length = u32::try_from(length).expect("frames are at most MAX_FRAME_SIZE");
    out.put_slice(&length.to_be_bytes()[1..]);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream_id);
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output[..n]);
                this.output.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.step()? {
                continue;
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            // A frame passed as is goes straight from the client into h2's
            // buffer, without a copy through `output`.
            if let State::Passthrough { left } = this.state
                && this.input.is_empty()
                && left > 0
            {
                let want = left.min(buf.remaining());
                let dst = buf.initialize_unfilled_to(want);
                let mut direct = ReadBuf::new(dst);
                std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, &mut direct))?;
                let n = direct.filled().len();
                if n == 0 {
                    this.eof = true;
                    return Poll::Ready(Ok(()));
                }
                buf.advance(n);
                this.state = if n == left {
                    State::FrameHeader
                } else {
                    State::Passthrough { left: left - n }
                };
                return Poll::Ready(Ok(()));
            }
            this.input.reserve(READ_CHUNK);
            let len = this.input.len();
            this.input.resize(len + READ_CHUNK, 0);
            let mut read = ReadBuf::new(&mut this.input[len..]);
            let polled = Pin::new(&mut this.inner).poll_read(cx, &mut read);
            let n = read.filled().len();
            this.input.truncate(len + n);
            std::task::ready!(polled)?;
            if n == 0 {
                this.eof = true;
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests;
