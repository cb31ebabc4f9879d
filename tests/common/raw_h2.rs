//! A hand-made HTTP/2 client over any blocking stream, for what the stock
//! Rust clients refuse to send: an `:authority` that is not a valid URI
//! authority (what grpcio, grpc-java and grpc-swift send on a Unix
//! socket). HPACK with loona-hpack (dynamic table on, as those clients do).

use std::io::{self, Read, Write};

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const GOAWAY: u8 = 0x7;
pub const CONTINUATION: u8 = 0x9;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// What grpcio sends as `:authority` for `unix:///run/instance-agent/agent.sock`.
pub fn grpcio_authority(socket: &std::path::Path) -> String {
    socket.display().to_string().replace('/', "%2F")
}

/// One frame.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

pub fn frame_bytes(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// How a request ended.
#[derive(Debug, Default)]
pub struct Response {
    pub headers: Vec<(String, String)>,
    pub data: Vec<u8>,
    pub trailers: Vec<(String, String)>,
    /// The RST_STREAM error code, when the stream was reset.
    pub reset: Option<u32>,
    /// The GOAWAY error code, when the connection was closed.
    pub goaway: Option<u32>,
}

impl Response {
    /// A header of the response or its trailers.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .chain(&self.trailers)
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

pub struct RawH2<S> {
    stream: S,
    encoder: loona_hpack::Encoder<'static>,
    decoder: loona_hpack::Decoder<'static>,
    /// The server's SETTINGS (identifier, value), as received.
    pub server_settings: Vec<(u16, u32)>,
}

impl<S: Read + Write> RawH2<S> {
    /// Sends the preface and an empty SETTINGS.
    pub fn handshake(mut stream: S) -> io::Result<Self> {
        stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")?;
        stream.write_all(&frame_bytes(SETTINGS, 0, 0, &[]))?;
        Ok(Self {
            stream,
            encoder: loona_hpack::Encoder::new(),
            decoder: loona_hpack::Decoder::new(),
            server_settings: Vec::new(),
        })
    }

    /// Sends a gRPC call: HEADERS with `authority`, then `message` framed
    /// as one gRPC message with END_STREAM.
    pub fn call(
        &mut self,
        stream: u32,
        path: &str,
        authority: &str,
        message: &[u8],
    ) -> io::Result<()> {
        let headers: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.as_bytes()),
            (b":authority", authority.as_bytes()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (
                b"user-agent",
                b"grpc-python/1.85.3 grpc-c/50.0.0 (linux; chttp2)",
            ),
        ];
        let block = self.encoder.encode(headers);
        self.stream
            .write_all(&frame_bytes(HEADERS, END_HEADERS, stream, &block))?;
        let mut body = vec![0u8];
        body.extend_from_slice(&(message.len() as u32).to_be_bytes());
        body.extend_from_slice(message);
        self.stream
            .write_all(&frame_bytes(DATA, END_STREAM, stream, &body))
    }

    pub fn read_frame(&mut self) -> io::Result<Frame> {
        let mut head = [0u8; 9];
        self.stream.read_exact(&mut head)?;
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        self.stream.read_exact(&mut payload)?;
        Ok(Frame {
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
            payload,
        })
    }

    /// Reads until `stream` ends (END_STREAM, RST_STREAM or GOAWAY),
    /// acknowledging the server's SETTINGS.
    pub fn response(&mut self, stream: u32) -> io::Result<Response> {
        let mut response = Response::default();
        let mut block: Option<(u32, u8, Vec<u8>)> = None;
        loop {
            let frame = self.read_frame()?;
            match frame.kind {
                SETTINGS if frame.flags & 0x1 == 0 => {
                    for entry in frame.payload.chunks(6) {
                        let id = u16::from_be_bytes([entry[0], entry[1]]);
                        let value = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]);
                        self.server_settings.push((id, value));
                    }
                    self.stream.write_all(&frame_bytes(SETTINGS, 0x1, 0, &[]))?;
                }
                HEADERS | CONTINUATION => {
                    let (id, flags, mut bytes) =
                        block
                            .take()
                            .unwrap_or((frame.stream, frame.flags, Vec::new()));
                    let mut payload = &frame.payload[..];
                    if frame.kind == HEADERS {
                        if frame.flags & 0x8 != 0 {
                            let pad = usize::from(payload[0]);
                            payload = &payload[1..payload.len() - pad];
                        }
                        if frame.flags & 0x20 != 0 {
                            payload = &payload[5..];
                        }
                    }
                    bytes.extend_from_slice(payload);
                    if frame.flags & END_HEADERS == 0 {
                        block = Some((id, flags, bytes));
                        continue;
                    }
                    let decoded = self
                        .decoder
                        .decode(&bytes)
                        .map_err(|e| io::Error::other(format!("HPACK: {e:?}")))?;
                    if id != stream {
                        continue;
                    }
                    let list = decoded
                        .into_iter()
                        .map(|(n, v)| {
                            (
                                String::from_utf8_lossy(&n).into_owned(),
                                String::from_utf8_lossy(&v).into_owned(),
                            )
                        })
                        .collect();
                    if response.headers.is_empty() {
                        response.headers = list;
                    } else {
                        response.trailers = list;
                    }
                    if flags & END_STREAM != 0 {
                        return Ok(response);
                    }
                }
                DATA if frame.stream == stream => {
                    response.data.extend_from_slice(&frame.payload);
                    if frame.flags & END_STREAM != 0 {
                        return Ok(response);
                    }
                }
                RST_STREAM if frame.stream == stream => {
                    let code = u32::from_be_bytes(frame.payload[..4].try_into().expect("4 bytes"));
                    response.reset = Some(code);
                    return Ok(response);
                }
                GOAWAY => {
                    let code = u32::from_be_bytes(frame.payload[4..8].try_into().expect("4 bytes"));
                    response.goaway = Some(code);
                    return Ok(response);
                }
                _ => {}
            }
        }
    }

    /// The first gRPC message of a response's data.
    pub fn message(response: &Response) -> &[u8] {
        let data = &response.data;
        if data.len() < 5 {
            return &[];
        }
        let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
        &data[5..5 + len.min(data.len() - 5)]
    }
}
