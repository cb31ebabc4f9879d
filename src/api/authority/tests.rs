//! The shim against hand-made and random HTTP/2 byte streams: every frame
//! but header blocks comes out unchanged, every header block decodes (with
//! a fresh decoder: no dynamic table) to the client's headers with
//! `:authority` fixed, and no frame is larger than h2 accepts, whatever the
//! client's fragmentation, padding, priority fields and read sizes.

use super::*;
use proptest::prelude::*;

/// Hands out `data` in reads of the given sizes (cycled), never pending.
struct Chunked {
    data: Vec<u8>,
    pos: usize,
    sizes: Vec<usize>,
    next: usize,
}

impl AsyncRead for Chunked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let size = self.sizes[self.next % self.sizes.len()].max(1);
        self.next += 1;
        let n = size.min(buf.remaining()).min(self.data.len() - self.pos);
        let start = self.pos;
        buf.put_slice(&self.data[start..start + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// Everything the shim outputs for `input` read in `sizes`-byte pieces and
/// consumed in reads of `out_size` bytes.
fn through_shim(input: &[u8], sizes: &[usize], out_size: usize) -> io::Result<Vec<u8>> {
    let mut shim = AuthorityFix::new(Chunked {
        data: input.to_vec(),
        pos: 0,
        sizes: sizes.to_vec(),
        next: 0,
    });
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut out = Vec::new();
    let mut chunk = vec![0u8; out_size.max(1)];
    loop {
        let mut buf = ReadBuf::new(&mut chunk);
        match Pin::new(&mut shim).poll_read(&mut cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => return Ok(out),
            Poll::Ready(Ok(())) => out.extend_from_slice(buf.filled()),
            Poll::Ready(Err(error)) => return Err(error),
            Poll::Pending => panic!("the reader never pends"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

fn frame_bytes(frame: &Frame) -> Vec<u8> {
    let mut out = BytesMut::new();
    put_frame_header(
        &mut out,
        frame.payload.len(),
        frame.kind,
        frame.flags,
        frame.stream,
    );
    out.put_slice(&frame.payload);
    out.to_vec()
}

fn parse(bytes: &[u8]) -> Vec<Frame> {
    assert!(bytes.starts_with(PREFACE), "the preface comes first");
    let mut rest = &bytes[PREFACE.len()..];
    let mut frames = Vec::new();
    while !rest.is_empty() {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        frames.push(Frame {
            kind: rest[3],
            flags: rest[4],
            stream: u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]),
            payload: rest[9..9 + len].to_vec(),
        });
        rest = &rest[9 + len..];
    }
    frames
}

/// One client request: its headers and how its block is framed.
#[derive(Debug, Clone)]
struct Request {
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    fragments: Vec<usize>,
    pad: Option<u8>,
    priority: Option<[u8; 5]>,
    end_stream: bool,
    data: Option<Vec<u8>>,
    settings_after: bool,
}

/// Frames the client would send for `requests`, with its encoder (dynamic
/// table on, as grpcio's is).
fn client_frames(requests: &[Request]) -> Vec<Frame> {
    let mut encoder = loona_hpack::Encoder::new();
    let mut frames = vec![Frame {
        kind: 0x4,
        flags: 0,
        stream: 0,
        payload: vec![],
    }];
    for (i, request) in requests.iter().enumerate() {
        let stream = 1 + 2 * i as u32;
        let block = encoder.encode(request.headers.iter().map(|(n, v)| (&n[..], &v[..])));
        let mut pieces = Vec::new();
        let mut rest = &block[..];
        for &size in &request.fragments {
            if rest.is_empty() {
                break;
            }
            let (piece, tail) = rest.split_at(size.min(rest.len()).min(8000));
            pieces.push(piece.to_vec());
            rest = tail;
        }
        while !rest.is_empty() {
            let (piece, tail) = rest.split_at(rest.len().min(8000));
            pieces.push(piece.to_vec());
            rest = tail;
        }
        if pieces.is_empty() {
            pieces.push(Vec::new());
        }
        let last = pieces.len() - 1;
        for (j, piece) in pieces.into_iter().enumerate() {
            let mut flags = if j == last { END_HEADERS } else { 0 };
            if j == 0 {
                let mut payload = Vec::new();
                if let Some(pad) = request.pad {
                    flags |= PADDED;
                    payload.push(pad);
                }
                if let Some(priority) = request.priority {
                    flags |= PRIORITY;
                    payload.extend_from_slice(&priority);
                }
                payload.extend_from_slice(&piece);
                payload.extend(std::iter::repeat_n(
                    0,
                    usize::from(request.pad.unwrap_or(0)),
                ));
                if request.end_stream {
                    flags |= END_STREAM;
                }
                frames.push(Frame {
                    kind: HEADERS,
                    flags,
                    stream,
                    payload,
                });
            } else {
                frames.push(Frame {
                    kind: CONTINUATION,
                    flags,
                    stream,
                    payload: piece,
                });
            }
        }
        if let Some(data) = &request.data {
            frames.push(Frame {
                kind: 0x0,
                flags: END_STREAM,
                stream,
                payload: data.clone(),
            });
        }
        if request.settings_after {
            frames.push(Frame {
                kind: 0x4,
                flags: 0x1,
                stream: 0,
                payload: vec![],
            });
        }
    }
    frames
}

fn wire(frames: &[Frame]) -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    for frame in frames {
        out.extend(frame_bytes(frame));
    }
    out
}

fn fixed(headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<(Vec<u8>, Vec<u8>)> {
    headers
        .iter()
        .map(|(n, v)| {
            if n == b":authority" && http::uri::Authority::try_from(&v[..]).is_err() {
                (n.clone(), REPLACEMENT.to_vec())
            } else {
                (n.clone(), v.clone())
            }
        })
        .collect()
}

/// Checks the shim's output against what the client sent.
fn check(requests: &[Request], sent: &[Frame], out: &[u8]) {
    let frames = parse(out);
    for frame in &frames {
        assert!(
            frame.payload.len() <= MAX_FRAME_SIZE,
            "frame too big for h2"
        );
    }
    let others = |frames: &[Frame]| -> Vec<Frame> {
        frames
            .iter()
            .filter(|f| f.kind != HEADERS && f.kind != CONTINUATION)
            .cloned()
            .collect()
    };
    assert_eq!(others(&frames), others(sent), "other frames pass unchanged");
    // Reassemble each output block and decode it on its own: a reference
    // to a dynamic table would fail or decode to something else.
    let mut blocks = Vec::new();
    for frame in frames
        .iter()
        .filter(|f| f.kind == HEADERS || f.kind == CONTINUATION)
    {
        if frame.kind == HEADERS {
            assert_eq!(frame.flags & PADDED, 0, "no padding is sent on");
            let skip = if frame.flags & PRIORITY != 0 { 5 } else { 0 };
            blocks.push((frame.clone(), frame.payload[skip..].to_vec()));
        } else {
            let (_, block) = blocks.last_mut().expect("CONTINUATION after HEADERS");
            block.extend_from_slice(&frame.payload);
        }
    }
    assert_eq!(blocks.len(), requests.len());
    for (i, ((head, block), request)) in blocks.iter().zip(requests).enumerate() {
        assert_eq!(head.stream, 1 + 2 * i as u32);
        assert_eq!(head.flags & END_STREAM != 0, request.end_stream);
        match request.priority {
            Some(priority) => assert_eq!(head.payload[..5], priority),
            None => assert_eq!(head.flags & PRIORITY, 0),
        }
        let decoded = loona_hpack::Decoder::new().decode(block).expect("decodes");
        assert_eq!(decoded, fixed(&request.headers), "request {i}");
    }
}

fn authority() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"localhost".to_vec()),
        Just(b"%2Frun%2Finstance-agent%2Fagent.sock".to_vec()),
        Just(b"unix:/tmp/x.sock".to_vec()),
        Just(b"/tmp/agent.sock".to_vec()),
        Just(b"example.com:443".to_vec()),
        Just(Vec::new()),
        proptest::collection::vec(any::<u8>(), 0..30),
    ]
}

fn header() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    let name = prop_oneof![
        Just("content-type".to_string()),
        Just("te".to_string()),
        Just("user-agent".to_string()),
        Just("grpc-timeout".to_string()),
        "[a-z][a-z0-9-]{0,12}",
    ];
    let value = prop_oneof![
        4 => "[ -~]{0,40}".prop_map(String::into_bytes),
        1 => proptest::collection::vec(b'v'..=b'z', 0..12_000),
    ];
    (name.prop_map(String::into_bytes), value)
}

fn request() -> impl Strategy<Value = Request> {
    (
        authority(),
        proptest::collection::vec(header(), 0..6),
        proptest::collection::vec(1usize..3000, 0..6),
        proptest::option::of(any::<u8>()),
        proptest::option::of(any::<[u8; 5]>()),
        any::<bool>(),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..200)),
        any::<bool>(),
    )
        .prop_map(
            |(authority, extra, fragments, pad, priority, end_stream, data, settings_after)| {
                let mut headers = vec![
                    (b":method".to_vec(), b"POST".to_vec()),
                    (b":scheme".to_vec(), b"http".to_vec()),
                    (
                        b":path".to_vec(),
                        b"/instance_agent.v1.AgentService/GetStatus".to_vec(),
                    ),
                    (b":authority".to_vec(), authority),
                ];
                headers.extend(extra);
                Request {
                    headers,
                    fragments,
                    pad,
                    priority,
                    end_stream,
                    data,
                    settings_after,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn header_blocks_decode_to_the_same_headers_with_authority_fixed(
        requests in proptest::collection::vec(request(), 1..5),
        sizes in proptest::collection::vec(1usize..20_000, 1..8),
        out_size in 1usize..20_000,
    ) {
        let sent = client_frames(&requests);
        let out = through_shim(&wire(&sent), &sizes, out_size).expect("a well-formed stream");
        check(&requests, &sent, &out);
    }
}

#[test]
fn a_grpcio_authority_becomes_localhost_and_a_valid_one_stays() {
    let request = |authority: &[u8]| Request {
        headers: vec![
            (b":method".to_vec(), b"POST".to_vec()),
            (b":authority".to_vec(), authority.to_vec()),
        ],
        fragments: vec![],
        pad: None,
        priority: None,
        end_stream: false,
        data: None,
        settings_after: false,
    };
    let requests = [
        request(b"%2Frun%2Finstance-agent%2Fagent.sock"),
        request(b"agent.local:80"),
    ];
    let sent = client_frames(&requests);
    let out = through_shim(&wire(&sent), &[7], 64).unwrap();
    check(&requests, &sent, &out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("localhost") && text.contains("agent.local:80"));
    assert!(!text.contains("%2Frun"), "{text}");
}

#[test]
fn a_huffman_coded_block_with_the_dynamic_table_is_decoded() {
    // RFC 7541 C.4.1 and C.4.2: Huffman strings, the second request
    // referring to the first one's dynamic table entry.
    let c41 = hex("828684418cf1e3c2e5f23a6ba0ab90f4ff");
    let c42 = hex("828684be5886a8eb10649cbf");
    let mut frames = vec![];
    for (i, block) in [c41, c42].into_iter().enumerate() {
        frames.push(Frame {
            kind: HEADERS,
            flags: END_HEADERS | END_STREAM,
            stream: 1 + 2 * i as u32,
            payload: block,
        });
    }
    let out = through_shim(&wire(&frames), &[3], 5).unwrap();
    let blocks = parse(&out);
    let second = loona_hpack::Decoder::new()
        .decode(&blocks[1].payload)
        .unwrap();
    assert!(second.contains(&(b":authority".to_vec(), b"www.example.com".to_vec())));
    assert!(second.contains(&(b"cache-control".to_vec(), b"no-cache".to_vec())));
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn a_big_block_is_split_into_continuations() {
    let requests = [Request {
        headers: vec![
            (b":authority".to_vec(), b"%2Fa.sock".to_vec()),
            (b"x-big".to_vec(), vec![b'b'; 40_000]),
        ],
        fragments: vec![],
        pad: Some(3),
        priority: Some([0, 0, 0, 0, 16]),
        end_stream: true,
        data: None,
        settings_after: false,
    }];
    let sent = client_frames(&requests);
    let out = through_shim(&wire(&sent), &[MAX_FRAME_SIZE], MAX_FRAME_SIZE).unwrap();
    let frames = parse(&out);
    // SETTINGS, HEADERS, then CONTINUATIONs.
    assert!(frames.len() >= 4, "{} frames", frames.len());
    assert_eq!(frames[1].kind, HEADERS);
    assert!(frames[2..].iter().all(|f| f.kind == CONTINUATION));
    check(&requests, &sent, &out);
}

#[test]
fn not_http2_passes_as_is() {
    let input = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    assert_eq!(through_shim(&input, &[4], 3).unwrap(), input);
}

#[test]
fn malformed_header_blocks_close_the_connection() {
    let headers = |stream, flags, payload: Vec<u8>| Frame {
        kind: HEADERS,
        flags,
        stream,
        payload,
    };
    let data = Frame {
        kind: 0,
        flags: 0,
        stream: 1,
        payload: vec![1, 2],
    };
    let cases = [
        ("interrupted block", vec![headers(1, 0, vec![0x82]), data]),
        (
            "continuation on another stream",
            vec![
                headers(1, 0, vec![0x82]),
                Frame {
                    kind: CONTINUATION,
                    flags: END_HEADERS,
                    stream: 3,
                    payload: vec![0x84],
                },
            ],
        ),
        ("bad index", vec![headers(1, END_HEADERS, vec![0xff, 0x7f])]),
        (
            "table size over the setting",
            vec![headers(1, END_HEADERS, vec![0x3f, 0xe1, 0x3f, 0x82])],
        ),
        (
            "padding too long",
            vec![headers(1, END_HEADERS | PADDED, vec![9, 0x82])],
        ),
    ];
    for (what, frames) in cases {
        let error = through_shim(&wire(&frames), &[100], 100).expect_err(what);
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{what}");
    }
    // A block growing past 64 KiB in CONTINUATIONs is refused too.
    let mut frames = vec![headers(1, 0, vec![0; 100])];
    for _ in 0..5 {
        frames.push(Frame {
            kind: CONTINUATION,
            flags: 0,
            stream: 1,
            payload: vec![0; MAX_FRAME_SIZE],
        });
    }
    assert!(through_shim(&wire(&frames), &[MAX_FRAME_SIZE], 1000).is_err());
}
