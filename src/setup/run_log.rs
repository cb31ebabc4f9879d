//! A running script's log, with memory bounded whatever it prints.
//!
//! Pieces of output (cut by [`super::capture`]) are numbered. Each piece goes:
//! - to the head of the log file while the file is under
//!   `setup.log_head_bytes`;
//! - to an in-memory ring holding the last `setup.log_tail_bytes` (counted as
//!   they would take in the file), which feeds live readers, the run's
//!   `log_tail`, and, when the run ends, the tail of the file after a
//!   "[log truncated: N bytes dropped]" line.
//!
//! So the agent holds at most the ring per running script, and the log file
//! is at most head + tail bytes.
//!
//! Live readers ([`LiveLog::reader`]) read the head from the file, then pieces
//! from the ring by sequence number, waking on a watch channel. A reader that
//! falls behind the ring is told that output was skipped; it never blocks the
//! writer.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::logfile::{self, LogFileReader, LogPiece, LogStream};

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

#[cfg(test)]
impl LogLimits {
    /// For tests: `head` and `tail` bytes and three tail lines.
    pub(crate) fn of(head: u64, tail: u64) -> Self {
        Self {
            head_bytes: head,
            tail_bytes: tail,
            tail_lines: 3,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn follower_sees_live_output_then_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.log");
        let mut writer = LogWriter::create(&path, LogLimits::of(1 << 20, 1 << 20))
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
