//! The run log file format, and reading it back.
//!
//! One record per line of output:
//!
//! ```text
//! 2026-05-01T12:00:00.123456Z O data of a line of stdout
//! 2026-05-01T12:00:00.123457Z E a line of stderr
//! 2026-05-01T12:00:00.200000Z o a piece without a newline (a prompt, a progress bar)
//! 2026-05-01T12:00:01.000000Z A [agent] a line written by the agent
//! ```
//!
//! The timestamp (UTC, microseconds, fixed width) is when the agent read the
//! bytes. The tag is `O`/`E`/`A` for stdout, stderr and the agent; lowercase
//! means that the original bytes did not end with a newline (the line was
//! longer than the capture's line limit, or output paused mid-line), so the
//! `\n` that ends the record is not part of the output. The data between the
//! header and the record's `\n` are the script's bytes, unchanged and not
//! necessarily UTF-8: the original streams can be rebuilt exactly.

use std::path::Path;
use std::time::SystemTime;

use chrono::{DateTime, Utc};
use tokio::io::AsyncReadExt;

/// Bytes of `2026-05-01T12:00:00.123456Z`.
const TIME_LEN: usize = 27;
/// Bytes of a record header: time, space, tag, space.
pub const HEADER_LEN: usize = TIME_LEN + 3;
/// Pieces returned by the reader are coalesced up to this size.
const CHUNK_BYTES: usize = 64 * 1024;

/// Which stream bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// A line written by the agent itself.
    Agent,
}

impl LogStream {
    fn tag(self, complete: bool) -> u8 {
        let tag = match self {
            LogStream::Stdout => b'O',
            LogStream::Stderr => b'E',
            LogStream::Agent => b'A',
        };
        if complete {
            tag
        } else {
            tag.to_ascii_lowercase()
        }
    }

    fn from_tag(tag: u8) -> Option<(Self, bool)> {
        let stream = match tag.to_ascii_uppercase() {
            b'O' => LogStream::Stdout,
            b'E' => LogStream::Stderr,
            b'A' => LogStream::Agent,
            _ => return None,
        };
        Some((stream, tag.is_ascii_uppercase()))
    }
}

/// Output as the API streams it: bytes exactly as written, not necessarily
/// whole lines or UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPiece {
    /// The stream.
    pub stream: LogStream,
    /// The bytes.
    pub data: Vec<u8>,
    /// When the agent captured them.
    pub time: SystemTime,
}

/// Formats a capture time as the fixed-width record timestamp.
pub fn format_time(time: SystemTime) -> [u8; TIME_LEN] {
    let text = DateTime::<Utc>::from(time)
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string();
    let mut out = [b'0'; TIME_LEN];
    // Years before 10000 always give exactly TIME_LEN bytes.
    let n = text.len().min(TIME_LEN);
    out[..n].copy_from_slice(&text.as_bytes()[..n]);
    out
}

fn parse_time(bytes: &[u8]) -> Option<SystemTime> {
    let text = std::str::from_utf8(bytes).ok()?;
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| SystemTime::from(t.with_timezone(&Utc)))
}

/// The size `data` takes in the file: a header per line, plus the record
/// end of a trailing piece without newline.
pub fn encoded_len(data: &[u8]) -> usize {
    let newlines = memchr::memchr_iter(b'\n', data).count();
    let fragment = usize::from(!data.is_empty() && !data.ends_with(b"\n"));
    data.len() + (newlines + fragment) * HEADER_LEN + fragment
}

/// Appends the records of `data` to `out`.
pub fn encode(time: &[u8; TIME_LEN], stream: LogStream, data: &[u8], out: &mut Vec<u8>) {
    let mut rest = data;
    while !rest.is_empty() {
        let (line, complete) = match memchr::memchr(b'\n', rest) {
            Some(i) => (&rest[..=i], true),
            None => (rest, false),
        };
        out.extend_from_slice(time);
        out.push(b' ');
        out.push(stream.tag(complete));
        out.push(b' ');
        out.extend_from_slice(line);
        if !complete {
            out.push(b'\n');
        }
        rest = &rest[line.len()..];
    }
}

/// Decodes one record (a file line without its `\n`). A line that is not a
/// record (a damaged file) is returned whole as agent output, so nothing in
/// the file is hidden.
pub fn decode(line: &[u8]) -> (LogStream, SystemTime, Vec<u8>) {
    let parsed = (line.len() >= HEADER_LEN && line[TIME_LEN] == b' ' && line[TIME_LEN + 2] == b' ')
        .then(|| {
            let (stream, complete) = LogStream::from_tag(line[TIME_LEN + 1])?;
            let time = parse_time(&line[..TIME_LEN])?;
            Some((stream, complete, time))
        })
        .flatten();
    match parsed {
        Some((stream, complete, time)) => {
            let mut data = line[HEADER_LEN..].to_vec();
            if complete {
                data.push(b'\n');
            }
            (stream, time, data)
        }
        None => {
            let mut data = line.to_vec();
            data.push(b'\n');
            (LogStream::Agent, SystemTime::UNIX_EPOCH, data)
        }
    }
}

/// Reads a log file from the start, up to a byte limit, as pieces coalesced
/// per stream up to 64 KiB. Memory is bounded by the read buffer and one
/// piece, whatever the file size.
pub struct LogFileReader {
    file: tokio::io::Take<tokio::fs::File>,
    buf: Vec<u8>,
    carry: Vec<u8>,
    carry_start: usize,
    pending: Option<LogPiece>,
    ready: std::collections::VecDeque<LogPiece>,
    eof: bool,
}

impl LogFileReader {
    /// Opens `path`, to read at most `limit` bytes (all when `None`).
    pub async fn open(path: &Path, limit: Option<u64>) -> std::io::Result<Self> {
        let file = tokio::fs::File::open(path).await?;
        Ok(Self {
            file: file.take(limit.unwrap_or(u64::MAX)),
            buf: vec![0u8; CHUNK_BYTES],
            carry: Vec::new(),
            carry_start: 0,
            pending: None,
            ready: std::collections::VecDeque::new(),
            eof: false,
        })
    }

    /// The next piece; `None` at the end.
    pub async fn next(&mut self) -> std::io::Result<Option<LogPiece>> {
        loop {
            if let Some(piece) = self.ready.pop_front() {
                return Ok(Some(piece));
            }
            if self.eof {
                return Ok(self.pending.take());
            }
            let n = self.file.read(&mut self.buf).await?;
            if n == 0 {
                self.eof = true;
                if self.carry_start < self.carry.len() {
                    // A record cut short by a crash mid-write: shown as it is.
                    let (stream, time, data) = decode(&self.carry[self.carry_start..]);
                    self.push(stream, time, data);
                }
                continue;
            }
            self.carry.drain(..self.carry_start);
            self.carry_start = 0;
            self.carry.extend_from_slice(&self.buf[..n]);
            while let Some(i) = memchr::memchr(b'\n', &self.carry[self.carry_start..]) {
                let end = self.carry_start + i;
                let (stream, time, data) = decode(&self.carry[self.carry_start..end]);
                self.carry_start = end + 1;
                self.push(stream, time, data);
            }
        }
    }

    fn push(&mut self, stream: LogStream, time: SystemTime, data: Vec<u8>) {
        if let Some(done) = coalesce(&mut self.pending, stream, time, data) {
            self.ready.push_back(done);
        }
    }
}

/// Adds a record to the pending piece; returns the previous piece when the
/// record cannot join it.
fn coalesce(
    pending: &mut Option<LogPiece>,
    stream: LogStream,
    time: SystemTime,
    data: Vec<u8>,
) -> Option<LogPiece> {
    if let Some(piece) = pending
        && piece.stream == stream
        && piece.data.len() + data.len() <= CHUNK_BYTES
    {
        piece.data.extend_from_slice(&data);
        return None;
    }
    pending.replace(LogPiece { stream, data, time })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> SystemTime {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_777_000_000_123_456)
    }

    #[test]
    fn time_is_fixed_width_utc() {
        let text = format_time(t());
        assert_eq!(&text, b"2026-04-24T03:06:40.123456Z");
        assert_eq!(parse_time(&text), Some(t()));
    }

    #[test]
    fn records_round_trip_exactly_including_non_utf8_and_fragments() {
        let time = format_time(t());
        let data: &[u8] = b"one\n\xff\xfe binary\n\ntail without newline";
        let mut out = Vec::new();
        encode(&time, LogStream::Stderr, data, &mut out);
        assert_eq!(out.len(), encoded_len(data));
        let mut rebuilt = Vec::new();
        for line in out.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let (stream, when, bytes) = decode(line);
            assert_eq!(stream, LogStream::Stderr);
            assert_eq!(when, t());
            rebuilt.extend_from_slice(&bytes);
        }
        assert_eq!(rebuilt, data);
        assert!(out.starts_with(b"2026-04-24T03:06:40.123456Z E one\n"));
        assert!(out.ends_with(b" e tail without newline\n"));
    }

    #[test]
    fn damaged_lines_are_shown_not_hidden() {
        let (stream, _, data) = decode(b"garbage");
        assert_eq!(stream, LogStream::Agent);
        assert_eq!(data, b"garbage\n");
    }

    async fn read_all(path: &Path, limit: Option<u64>) -> Vec<LogPiece> {
        let mut reader = LogFileReader::open(path, limit).await.unwrap();
        let mut out = Vec::new();
        while let Some(piece) = reader.next().await.unwrap() {
            out.push(piece);
        }
        out
    }

    #[tokio::test]
    async fn reader_coalesces_per_stream_and_honours_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        let time = format_time(t());
        let mut out = Vec::new();
        encode(&time, LogStream::Stdout, b"a\nb\n", &mut out);
        encode(&time, LogStream::Stderr, b"c\n", &mut out);
        let first_two = out.len() as u64;
        encode(&time, LogStream::Stdout, b"d\n", &mut out);
        std::fs::write(&path, &out).unwrap();

        let pieces = read_all(&path, None).await;
        let got: Vec<(LogStream, &[u8])> = pieces
            .iter()
            .map(|p| (p.stream, p.data.as_slice()))
            .collect();
        assert_eq!(
            got,
            vec![
                (LogStream::Stdout, &b"a\nb\n"[..]),
                (LogStream::Stderr, &b"c\n"[..]),
                (LogStream::Stdout, &b"d\n"[..]),
            ]
        );

        let limited = read_all(&path, Some(first_two)).await;
        assert_eq!(limited.len(), 2);
    }
}
