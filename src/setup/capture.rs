//! Output capture of a running script: reading its stdout and stderr into
//! the run's log ([`super::run_log`]) with the agent's notes in order.
//!
//! Bytes read from the script's stdout and stderr are cut into pieces at line
//! boundaries (a line longer than [`MAX_LINE`], or a partial line idle for
//! half a second, becomes a fragment) and handed to the [`LogWriter`], which
//! keeps memory bounded whatever the script prints. So capture holds at most
//! one read buffer and one partial line per stream.

use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::logfile::{self, LogStream};
use super::run_log::LogWriter;

/// A line is held back waiting for its newline up to this many bytes; longer
/// lines are recorded as fragments.
pub const MAX_LINE: usize = 8 * 1024;
/// Pieces are cut at a line boundary once they would take this much in the file.
const MAX_PIECE_ENCODED: usize = 16 * 1024;
/// Bytes read from a pipe at a time.
const READ_BUF: usize = 64 * 1024;
/// A partial line is recorded after this long without more output.
const IDLE_FLUSH: Duration = Duration::from_millis(500);

/// Cuts a stream's bytes into pieces at line boundaries.
#[derive(Debug, Default)]
struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Adds bytes; appends finished pieces to `out`.
    fn feed(&mut self, data: &[u8], out: &mut Vec<Vec<u8>>) {
        self.pending.extend_from_slice(data);
        if let Some(last) = memchr::memrchr(b'\n', &self.pending) {
            split_lines(&self.pending[..=last], out);
            self.pending.drain(..=last);
        }
        if self.pending.len() > MAX_LINE {
            self.flush(out);
        }
    }

    /// Handles the result of a read into `buf`; returns whether the stream
    /// is still open (end of file and errors close it, flushing the rest).
    fn take(&mut self, read: std::io::Result<usize>, buf: &[u8], out: &mut Vec<Vec<u8>>) -> bool {
        match read {
            Ok(n) if n > 0 => {
                self.feed(&buf[..n], out);
                true
            }
            _ => {
                self.flush(out);
                false
            }
        }
    }

    /// Emits the partial line as fragments.
    fn flush(&mut self, out: &mut Vec<Vec<u8>>) {
        for chunk in self.pending.chunks(MAX_LINE) {
            out.push(chunk.to_vec());
        }
        self.pending.clear();
    }
}

/// Cuts whole lines into pieces of at most [`MAX_PIECE_ENCODED`] file bytes;
/// lines longer than [`MAX_LINE`] become fragments.
fn split_lines(bytes: &[u8], out: &mut Vec<Vec<u8>>) {
    let mut start = 0;
    let mut cost = 0;
    let mut cursor = 0;
    for newline in memchr::memchr_iter(b'\n', bytes) {
        let line_len = newline + 1 - cursor;
        if line_len > MAX_LINE {
            if cursor > start {
                out.push(bytes[start..cursor].to_vec());
            }
            for chunk in bytes[cursor..=newline].chunks(MAX_LINE) {
                out.push(chunk.to_vec());
            }
            start = newline + 1;
            cost = 0;
        } else {
            if cost + line_len + logfile::HEADER_LEN > MAX_PIECE_ENCODED && cursor > start {
                out.push(bytes[start..cursor].to_vec());
                start = cursor;
                cost = 0;
            }
            cost += line_len + logfile::HEADER_LEN;
        }
        cursor = newline + 1;
    }
    if cursor > start {
        out.push(bytes[start..cursor].to_vec());
    }
}

/// Reads both streams into the writer, with the agent's notes in order,
/// until both streams have ended and the notes' sender is dropped, or `stop`
/// fires. Returns the writer.
pub async fn capture(
    mut stdout: impl AsyncRead + Unpin,
    mut stderr: impl AsyncRead + Unpin,
    mut writer: LogWriter,
    mut notes: mpsc::Receiver<String>,
    stop: CancellationToken,
) -> LogWriter {
    let mut out_buf = vec![0u8; READ_BUF];
    let mut err_buf = vec![0u8; READ_BUF];
    let (mut out_open, mut err_open, mut notes_open) = (true, true, true);
    let mut out_split = LineSplitter::default();
    let mut err_split = LineSplitter::default();
    let mut pieces = Vec::new();
    while out_open || err_open || notes_open {
        let idle = out_split.has_pending() || err_split.has_pending();
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            note = notes.recv(), if notes_open => match note {
                Some(note) => writer.note(&note).await,
                None => notes_open = false,
            },
            read = stdout.read(&mut out_buf), if out_open => {
                out_open = out_split.take(read, &out_buf, &mut pieces);
                push_all(&mut writer, LogStream::Stdout, &mut pieces).await;
            }
            read = stderr.read(&mut err_buf), if err_open => {
                err_open = err_split.take(read, &err_buf, &mut pieces);
                push_all(&mut writer, LogStream::Stderr, &mut pieces).await;
            }
            _ = tokio::time::sleep(IDLE_FLUSH), if idle => {
                out_split.flush(&mut pieces);
                push_all(&mut writer, LogStream::Stdout, &mut pieces).await;
                err_split.flush(&mut pieces);
                push_all(&mut writer, LogStream::Stderr, &mut pieces).await;
            }
        }
    }
    out_split.flush(&mut pieces);
    push_all(&mut writer, LogStream::Stdout, &mut pieces).await;
    err_split.flush(&mut pieces);
    push_all(&mut writer, LogStream::Stderr, &mut pieces).await;
    while let Ok(note) = notes.try_recv() {
        writer.note(&note).await;
    }
    writer
}

async fn push_all(writer: &mut LogWriter, stream: LogStream, pieces: &mut Vec<Vec<u8>>) {
    if pieces.is_empty() {
        return;
    }
    let time = SystemTime::now();
    for data in pieces.drain(..) {
        writer.push(stream, data, time).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::setup::logfile::LogPiece;
    use crate::setup::run_log::{LiveLog, LogLimits};
    use tokio_stream::StreamExt;

    async fn read_back(live: &Arc<LiveLog>) -> Vec<LogPiece> {
        let stream = live.reader(false, CancellationToken::new());
        tokio::pin!(stream);
        let mut out = Vec::new();
        while let Some(piece) = stream.next().await {
            out.push(piece.unwrap());
        }
        out
    }

    fn bytes_of(pieces: &[LogPiece], stream: LogStream) -> Vec<u8> {
        pieces
            .iter()
            .filter(|p| p.stream == stream)
            .flat_map(|p| p.data.clone())
            .collect()
    }

    #[test]
    fn splitter_keeps_bytes_and_cuts_long_lines() {
        let mut split = LineSplitter::default();
        let mut out = Vec::new();
        split.feed(b"a\nb", &mut out);
        assert_eq!(out, vec![b"a\n".to_vec()]);
        split.feed(b"c\n", &mut out);
        assert_eq!(out.last().unwrap(), b"bc\n");
        let long = vec![b'x'; MAX_LINE * 2 + 10];
        split.feed(&long, &mut out);
        split.feed(b"\n", &mut out);
        let all: Vec<u8> = out.concat();
        let mut expected = b"a\nbc\n".to_vec();
        expected.extend_from_slice(&long);
        expected.push(b'\n');
        assert_eq!(all, expected);
        assert!(out.iter().all(|p| p.len() <= MAX_LINE + 1));
    }

    #[test]
    fn pieces_stay_under_the_encoded_limit() {
        let lines = b"y\n".repeat(20_000);
        let mut out = Vec::new();
        split_lines(&lines, &mut out);
        assert!(out.len() > 1);
        assert!(
            out.iter()
                .all(|p| logfile::encoded_len(p) <= MAX_PIECE_ENCODED)
        );
        assert_eq!(out.concat(), lines);
    }

    #[tokio::test]
    async fn small_output_is_all_in_the_file_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.log");
        let writer = LogWriter::create(&path, LogLimits::of(1 << 20, 1 << 20))
            .await
            .unwrap();
        let live = writer.live();
        let rx = mpsc::channel::<String>(1).1;
        let stdout: &[u8] = b"hello\n\xff\xfe raw\nno newline";
        let stderr: &[u8] = b"warn\n";
        let writer = capture(stdout, stderr, writer, rx, CancellationToken::new()).await;
        let finished = writer.finish().await;
        assert_eq!(finished.dropped_bytes, 0);
        assert_eq!(
            finished.log_tail,
            vec!["\u{fffd}\u{fffd} raw", "no newline", "warn"]
        );
        let pieces = read_back(&live).await;
        assert_eq!(bytes_of(&pieces, LogStream::Stdout), stdout);
        assert_eq!(bytes_of(&pieces, LogStream::Stderr), stderr);
    }

    #[tokio::test]
    async fn overflow_keeps_head_and_tail_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.log");
        let (head, tail) = (64 * 1024, 64 * 1024);
        let writer = LogWriter::create(&path, LogLimits::of(head, tail))
            .await
            .unwrap();
        let live = writer.live();
        let rx = mpsc::channel::<String>(1).1;
        let mut text = Vec::new();
        for i in 0..100_000 {
            text.extend_from_slice(format!("line {i}\n").as_bytes());
        }
        let writer = capture(&text[..], &b""[..], writer, rx, CancellationToken::new()).await;
        let finished = writer.finish().await;
        assert!(finished.dropped_bytes > 0);
        assert_eq!(
            finished.log_tail,
            vec!["line 99997", "line 99998", "line 99999"]
        );
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size <= head + tail + 1024, "file is {size} bytes");
        let pieces = read_back(&live).await;
        let out = bytes_of(&pieces, LogStream::Stdout);
        assert!(out.starts_with(b"line 0\nline 1\n"));
        assert!(out.ends_with(b"line 99999\n"));
        let agent = String::from_utf8(bytes_of(&pieces, LogStream::Agent)).unwrap();
        assert!(agent.contains("log truncated"), "{agent}");
    }
}
