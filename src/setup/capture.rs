//! Output capture of a running script, with memory bounded whatever it prints.
//!
//! Bytes read from the script's stdout and stderr are cut into pieces at line
//! boundaries (a line longer than [`MAX_LINE`], or a partial line idle for
//! half a second, becomes a fragment) and numbered. Each piece goes:
//! - to the head of the log file while the file is under
//!   `setup.log_head_bytes`;
//! - to an in-memory ring holding the last `setup.log_tail_bytes` (counted as
//!   they would take in the file), which feeds live readers, the run's
//!   `log_tail`, and, when the run ends, the tail of the file after a
//!   "[log truncated: N bytes dropped]" line.
//!
//! So the agent holds at most one read buffer per stream, one partial line per
//! stream and the ring per running script, and the log file is at most
//! head + tail bytes, whatever the script prints.
//!
//! Live readers ([`LiveLog::reader`]) read the head from the file, then pieces
//! from the ring by sequence number, waking on a watch channel. A reader that
//! falls behind the ring is told that output was skipped; it never blocks the
//! writer.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::logfile::{self, LogFileReader, LogPiece, LogStream};

/// A line is held back waiting for its newline up to this many bytes; longer
/// lines are recorded as fragments.
pub const MAX_LINE: usize = 8 * 1024;
/// Pieces are cut at a line boundary once they would take this much in the file.
const MAX_PIECE_ENCODED: usize = 16 * 1024;
/// Bytes read from a pipe at a time.
const READ_BUF: usize = 64 * 1024;
/// A partial line is recorded after this long without more output.
const IDLE_FLUSH: Duration = Duration::from_millis(500);
/// Bookkeeping per piece, counted against the ring's budget so that many tiny
/// pieces cannot exceed it.
const PIECE_OVERHEAD: usize = 128;
/// Longest line kept in a run's `log_tail`, in bytes.
const TAIL_LINE_MAX: usize = 512;

/// Size limits of a run's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// Bytes of the file kept from the start.
    pub head_bytes: u64,
    /// Bytes kept from the end (and held in memory).
    pub tail_bytes: u64,
    /// Lines in `log_tail`.
    pub tail_lines: usize,
}

/// A numbered piece of output.
#[derive(Debug)]
struct Piece {
    seq: u64,
    time: SystemTime,
    stream: LogStream,
    data: Vec<u8>,
    cost: usize,
}

#[derive(Debug, Default)]
struct LiveState {
    next_seq: u64,
    /// Pieces with a lower number are in the file, within `head_file_len` bytes.
    head_seq: u64,
    head_file_len: u64,
    ring: VecDeque<Arc<Piece>>,
    ring_cost: usize,
    /// Bytes of output that are neither in the head nor in the ring.
    dropped_bytes: u64,
    finished: bool,
}

/// The shared view of one run's log while it runs. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct LiveLog {
    path: PathBuf,
    limits: LogLimits,
    state: Mutex<LiveState>,
    progress: watch::Sender<u64>,
}

impl LiveLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, LiveState> {
        // Every mutation leaves the state consistent before it can panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.progress.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last `limits.tail_lines` lines of the script's output (agent
    /// lines left out), lossy UTF-8, empty lines skipped.
    pub fn tail_lines(&self) -> Vec<String> {
        let state = self.lock();
        let wanted = self.limits.tail_lines;
        let mut lines = Vec::new();
        'pieces: for piece in state.ring.iter().rev() {
            if piece.stream == LogStream::Agent {
                continue;
            }
            let data = piece.data.strip_suffix(b"\n").unwrap_or(&piece.data);
            for line in data.rsplit(|b| *b == b'\n') {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let cut = &line[..line.len().min(TAIL_LINE_MAX)];
                lines.push(String::from_utf8_lossy(cut).trim_end().to_owned());
                if lines.len() >= wanted {
                    break 'pieces;
                }
            }
        }
        lines.reverse();
        lines
    }

    /// Reads the log from its start: the head from the file, then the ring.
    /// With `follow`, waits for more until the run's log is finished or
    /// `cancel` fires.
    pub fn reader(
        self: &Arc<Self>,
        follow: bool,
        cancel: CancellationToken,
    ) -> impl tokio_stream::Stream<Item = std::io::Result<LogPiece>> + Send + 'static {
        let live = self.clone();
        let mut progress = self.progress.subscribe();
        async_stream::try_stream! {
            let (head_len, head_seq, finished) = {
                let s = live.lock();
                (s.head_file_len, s.head_seq, s.finished)
            };
            if finished {
                // Everything, truncation marker included, is in the file now.
                let mut file = LogFileReader::open(&live.path, None).await?;
                while let Some(piece) = file.next().await? {
                    yield piece;
                }
                return;
            }
            let mut file = LogFileReader::open(&live.path, Some(head_len)).await?;
            while let Some(piece) = file.next().await? {
                yield piece;
            }
            let mut next = head_seq;
            loop {
                progress.borrow_and_update();
                let (batch, finished) = {
                    let s = live.lock();
                    let batch: Vec<Arc<Piece>> =
                        s.ring.iter().filter(|p| p.seq >= next).cloned().collect();
                    (batch, s.finished)
                };
                if let Some(first) = batch.first()
                    && first.seq > next {
                        yield LogPiece {
                            stream: LogStream::Agent,
                            data: b"[agent] output skipped: it is no longer held in memory; \
                                    the file keeps the head and the tail\n"
                                .to_vec(),
                            time: first.time,
                        };
                    }
                for piece in &batch {
                    next = piece.seq + 1;
                    yield LogPiece {
                        stream: piece.stream,
                        data: piece.data.clone(),
                        time: piece.time,
                    };
                }
                if !follow || finished {
                    break;
                }
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    changed = progress.changed() => if changed.is_err() { break },
                }
            }
        }
    }
}

/// Writes one run's log. Owned by the capture task.
pub struct LogWriter {
    live: Arc<LiveLog>,
    file: Option<tokio::fs::File>,
    file_len: u64,
    head_full: bool,
    buf: Vec<u8>,
    write_error: Option<String>,
}

/// What the finished log says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedLog {
    /// The last lines of output.
    pub log_tail: Vec<String>,
    /// Bytes of output dropped from the middle.
    pub dropped_bytes: u64,
    /// Why the file is incomplete, if it is (e.g. the disk is full).
    pub write_error: Option<String>,
}

impl LogWriter {
    /// Creates (truncates) the log file at `path`, mode 0640.
    pub async fn create(path: &Path, limits: LogLimits) -> std::io::Result<Self> {
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o640)
            .open(path)
            .await?;
        Ok(Self {
            live: Arc::new(LiveLog {
                path: path.to_owned(),
                limits,
                state: Mutex::new(LiveState::default()),
                progress: watch::channel(0).0,
            }),
            file: Some(file),
            file_len: 0,
            head_full: false,
            buf: Vec::new(),
            write_error: None,
        })
    }

    /// The shared view for readers.
    pub fn live(&self) -> Arc<LiveLog> {
        self.live.clone()
    }

    /// Records a line written by the agent (prefixed `[agent] `).
    pub async fn note(&mut self, text: &str) {
        let mut data = format!("[agent] {text}").into_bytes();
        data.push(b'\n');
        self.push(LogStream::Agent, data, SystemTime::now()).await;
    }

    /// Records a piece of output.
    pub async fn push(&mut self, stream: LogStream, data: Vec<u8>, time: SystemTime) {
        if data.is_empty() {
            return;
        }
        let encoded = logfile::encoded_len(&data);
        let tail_budget = usize::try_from(self.live.limits.tail_bytes).unwrap_or(usize::MAX);
        let seq = {
            let mut s = self.live.lock();
            let seq = s.next_seq;
            s.next_seq += 1;
            let piece = Arc::new(Piece {
                seq,
                time,
                stream,
                data,
                cost: encoded + PIECE_OVERHEAD,
            });
            s.ring_cost += piece.cost;
            s.ring.push_back(piece);
            // Keep at least the newest piece, so that the tail is never empty.
            while s.ring_cost > tail_budget && s.ring.len() > 1 {
                let Some(old) = s.ring.pop_front() else { break };
                s.ring_cost -= old.cost;
                if old.seq >= s.head_seq {
                    s.dropped_bytes += old.data.len() as u64;
                }
            }
            seq
        };
        self.live.bump();
        if self.head_full || self.file.is_none() {
            return;
        }
        if self.file_len + encoded as u64 > self.live.limits.head_bytes {
            self.head_full = true;
            return;
        }
        self.buf.clear();
        {
            let s = self.live.lock();
            if let Some(piece) = s.ring.back().filter(|p| p.seq == seq) {
                logfile::encode(
                    &logfile::format_time(piece.time),
                    piece.stream,
                    &piece.data,
                    &mut self.buf,
                );
            }
        }
        if self.write(encoded as u64).await {
            let mut s = self.live.lock();
            s.head_seq = seq + 1;
            s.head_file_len = self.file_len;
        }
    }

    /// Writes `self.buf` to the file; false (and the file abandoned) on error.
    async fn write(&mut self, expected: u64) -> bool {
        let Some(file) = self.file.as_mut() else {
            return false;
        };
        let result = async {
            file.write_all(&self.buf).await?;
            file.flush().await
        }
        .await;
        match result {
            Ok(()) => {
                self.file_len += expected.max(self.buf.len() as u64);
                true
            }
            Err(error) => {
                tracing::warn!(path = %self.live.path.display(), %error, "setup log write failed; output is still captured in memory");
                self.write_error = Some(error.to_string());
                self.file = None;
                false
            }
        }
    }

    /// Appends the truncation marker and the tail, syncs the file and marks
    /// the log finished for readers.
    pub async fn finish(mut self) -> FinishedLog {
        let (tail, dropped) = {
            let s = self.live.lock();
            let tail: Vec<Arc<Piece>> = s
                .ring
                .iter()
                .filter(|p| p.seq >= s.head_seq)
                .cloned()
                .collect();
            (tail, s.dropped_bytes)
        };
        self.buf.clear();
        if dropped > 0 {
            let time = tail.first().map_or_else(SystemTime::now, |p| p.time);
            let marker = format!(
                "[agent] log truncated: {dropped} bytes of output dropped here \
                 (the first {} and the last {} bytes of the log are kept)\n",
                self.live.limits.head_bytes, self.live.limits.tail_bytes
            );
            logfile::encode(
                &logfile::format_time(time),
                LogStream::Agent,
                marker.as_bytes(),
                &mut self.buf,
            );
        }
        for piece in &tail {
            logfile::encode(
                &logfile::format_time(piece.time),
                piece.stream,
                &piece.data,
                &mut self.buf,
            );
        }
        if !self.buf.is_empty() {
            self.write(0).await;
        }
        if let Some(file) = self.file.take()
            && let Err(error) = file.sync_all().await
        {
            self.write_error.get_or_insert(error.to_string());
        }
        let log_tail = self.live.tail_lines();
        self.live.lock().finished = true;
        self.live.bump();
        FinishedLog {
            log_tail,
            dropped_bytes: dropped,
            write_error: self.write_error,
        }
    }
}

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
    use super::*;
    use tokio_stream::StreamExt;

    fn limits(head: u64, tail: u64) -> LogLimits {
        LogLimits {
            head_bytes: head,
            tail_bytes: tail,
            tail_lines: 3,
        }
    }

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
        let writer = LogWriter::create(&path, limits(1 << 20, 1 << 20))
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
        let writer = LogWriter::create(&path, limits(head, tail)).await.unwrap();
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

    #[tokio::test]
    async fn follower_sees_live_output_then_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.log");
        let mut writer = LogWriter::create(&path, limits(1 << 20, 1 << 20))
            .await
            .unwrap();
        let live = writer.live();
        writer
            .push(LogStream::Stdout, b"first\n".to_vec(), SystemTime::now())
            .await;
        let stream = live.reader(true, CancellationToken::new());
        tokio::pin!(stream);
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(first.data, b"first\n");
        writer
            .push(LogStream::Stderr, b"second\n".to_vec(), SystemTime::now())
            .await;
        let second = stream.next().await.unwrap().unwrap();
        assert_eq!(second.data, b"second\n");
        writer.note("exit status 0").await;
        writer.finish().await;
        let note = stream.next().await.unwrap().unwrap();
        assert_eq!(note.stream, LogStream::Agent);
        assert!(stream.next().await.is_none(), "stream ends with the run");
    }
}
