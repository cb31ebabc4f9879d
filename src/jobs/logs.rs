//! Per-job output files under the state dir, capped per job, readable after
//! the container is gone, and followable while the job runs.
//!
//! Each job has two files, `<id>.0.log` (being written) and `<id>.1.log`
//! (the previous half). When the current file passes half the cap it becomes
//! the previous one and the old previous one is dropped, so at most the cap
//! is kept and the newest output always survives. The count of dropped bytes
//! lives in `<id>.meta`; a reader starts with a marker saying so.
//!
//! A file is a sequence of frames: a 16-byte header (stream, length, capture
//! time) and the bytes exactly as the container wrote them.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::Stream;

use super::engine::OutputStream;

const HEADER: usize = 16;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const AGENT: u8 = 3;
/// How often a follower looks for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// Where a log record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSource {
    /// The container's stdout.
    Stdout,
    /// The container's stderr.
    Stderr,
    /// The agent (e.g. a truncation marker).
    Agent,
}

/// One piece of captured output.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRecord {
    /// Where it came from.
    pub source: LogSource,
    /// Capture time, nanoseconds since the epoch.
    pub time_nanos: i64,
    /// The bytes.
    pub data: Bytes,
}

/// The directory of job logs.
#[derive(Debug, Clone)]
pub struct JobLogs {
    dir: PathBuf,
}

impl JobLogs {
    /// Logs kept in `dir` (created on first write).
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn current(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.0.log"))
    }

    fn previous(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.1.log"))
    }

    fn meta(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.meta"))
    }

    /// Opens the writer of a job's log, continuing an existing one (after an
    /// agent restart). Also returns the capture time of the last frame kept,
    /// so that capture resumes where it stopped.
    pub async fn writer(&self, id: &str, cap: u64) -> std::io::Result<(LogWriter, i64)> {
        tokio::fs::create_dir_all(&self.dir).await?;
        let current = self.current(id);
        let last_time = last_frame_time(&current).await?;
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&current)
            .await?;
        let size = file.metadata().await?.len();
        let dropped = read_dropped(&self.meta(id)).await;
        Ok((
            LogWriter {
                logs: self.clone(),
                id: id.to_owned(),
                file,
                size,
                half_cap: (cap / 2).max(1),
                dropped,
            },
            last_time,
        ))
    }

    /// Removes a job's log files.
    pub async fn remove(&self, id: &str) {
        for path in [self.current(id), self.previous(id), self.meta(id)] {
            let _ = tokio::fs::remove_file(path).await;
        }
    }

    /// Bytes a job's logs take on disk.
    pub async fn size(&self, id: &str) -> u64 {
        let mut total = 0;
        for path in [self.current(id), self.previous(id)] {
            total += tokio::fs::metadata(path)
                .await
                .map(|m| m.len())
                .unwrap_or(0);
        }
        total
    }

    /// Streams a job's log from the oldest output kept. With `follow`, keeps
    /// going until `finished()` is true and everything written was sent.
    pub fn read(
        &self,
        id: &str,
        follow: bool,
        finished: impl Fn() -> bool + Send + 'static,
    ) -> impl Stream<Item = std::io::Result<LogRecord>> + Send + 'static {
        let logs = self.clone();
        let id = id.to_owned();
        async_stream::try_stream! {
            let dropped = read_dropped(&logs.meta(&id)).await;
            if dropped > 0 {
                yield LogRecord {
                    source: LogSource::Agent,
                    time_nanos: 0,
                    data: Bytes::from(format!("[log truncated: {dropped} bytes of older output dropped]\n")),
                };
            }
            if let Some(mut file) = open_if_exists(&logs.previous(&id)).await? {
                let mut buf = BytesMut::new();
                while read_more(&mut file, &mut buf).await? > 0 {
                    while let Some(record) = next_frame(&mut buf) {
                        yield record;
                    }
                }
            }
            let mut file = None;
            let mut inode = 0;
            let mut buf = BytesMut::new();
            loop {
                // Checked before reading, so that output written just before
                // the job finished is still read below.
                let done = finished();
                // (Not a let-chain: the stream macro expands in an older edition.)
                let reopen = if file.is_none() { open_if_exists(&logs.current(&id)).await? } else { None };
                if let Some(f) = reopen {
                    inode = inode_of(&f).await?;
                    file = Some(f);
                }
                if let Some(f) = file.as_mut() {
                    while read_more(f, &mut buf).await? > 0 {
                        while let Some(record) = next_frame(&mut buf) {
                            yield record;
                        }
                    }
                    // Rotated: the file we hold became the previous one and
                    // is complete; continue with the new current file.
                    let now = tokio::fs::metadata(logs.current(&id)).await.map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap_or(0);
                    if now != 0 && now != inode {
                        file = None;
                        buf.clear();
                        continue;
                    }
                }
                if !follow || done {
                    break;
                }
                tokio::time::sleep(FOLLOW_POLL).await;
            }
        }
    }
}

/// Appends frames to one job's log, rotating at half the cap.
pub struct LogWriter {
    logs: JobLogs,
    id: String,
    file: tokio::fs::File,
    size: u64,
    half_cap: u64,
    dropped: u64,
}

impl LogWriter {
    /// Appends one frame of container output.
    pub async fn write(
        &mut self,
        stream: OutputStream,
        time_nanos: i64,
        data: &[u8],
    ) -> std::io::Result<()> {
        let code = match stream {
            OutputStream::Stdout => STDOUT,
            OutputStream::Stderr => STDERR,
        };
        self.write_frame(code, time_nanos, data).await
    }

    /// Appends a line from the agent itself (e.g. why capture stopped).
    pub async fn note(&mut self, text: &str) -> std::io::Result<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        self.write_frame(AGENT, now, format!("[instance-agent] {text}\n").as_bytes())
            .await
    }

    async fn write_frame(&mut self, code: u8, time_nanos: i64, data: &[u8]) -> std::io::Result<()> {
        if self.size > 0 && self.size + (HEADER + data.len()) as u64 > self.half_cap {
            self.rotate().await?;
        }
        let mut frame = Vec::with_capacity(HEADER + data.len());
        frame.push(code);
        frame.extend_from_slice(&[0; 3]);
        frame.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_le_bytes());
        frame.extend_from_slice(&time_nanos.to_le_bytes());
        frame.extend_from_slice(data);
        self.file.write_all(&frame).await?;
        self.size += frame.len() as u64;
        Ok(())
    }

    async fn rotate(&mut self) -> std::io::Result<()> {
        self.file.flush().await?;
        let previous = self.logs.previous(&self.id);
        if let Ok(meta) = tokio::fs::metadata(&previous).await {
            self.dropped += meta.len();
            write_dropped(&self.logs.meta(&self.id), self.dropped).await?;
        }
        tokio::fs::rename(self.logs.current(&self.id), &previous).await?;
        self.file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.current(&self.id))
            .await?;
        self.size = 0;
        Ok(())
    }

    /// Flushes buffered output to the file.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush().await
    }
}

async fn open_if_exists(path: &Path) -> std::io::Result<Option<tokio::fs::File>> {
    match tokio::fs::File::open(path).await {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

async fn inode_of(file: &tokio::fs::File) -> std::io::Result<u64> {
    Ok(std::os::unix::fs::MetadataExt::ino(&file.metadata().await?))
}

async fn read_more(file: &mut tokio::fs::File, buf: &mut BytesMut) -> std::io::Result<usize> {
    buf.reserve(64 << 10);
    file.read_buf(buf).await
}

/// Takes one whole frame off the front of `buf`, if it holds one.
fn next_frame(buf: &mut BytesMut) -> Option<LogRecord> {
    if buf.len() < HEADER {
        return None;
    }
    let len = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
    if buf.len() < HEADER + len {
        return None;
    }
    let code = buf[0];
    let mut time = [0u8; 8];
    time.copy_from_slice(&buf[8..16]);
    buf.advance(HEADER);
    let data = buf.split_to(len).freeze();
    let source = match code {
        STDOUT => LogSource::Stdout,
        STDERR => LogSource::Stderr,
        _ => LogSource::Agent,
    };
    Some(LogRecord {
        source,
        time_nanos: i64::from_le_bytes(time),
        data,
    })
}

async fn last_frame_time(path: &Path) -> std::io::Result<i64> {
    let Some(mut file) = open_if_exists(path).await? else {
        return Ok(0);
    };
    let mut buf = BytesMut::new();
    let mut last = 0;
    while read_more(&mut file, &mut buf).await? > 0 {
        while let Some(record) = next_frame(&mut buf) {
            if record.source != LogSource::Agent {
                last = record.time_nanos;
            }
        }
    }
    Ok(last)
}

async fn read_dropped(path: &Path) -> u64 {
    tokio::fs::read_to_string(path)
        .await
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

async fn write_dropped(path: &Path, dropped: u64) -> std::io::Result<()> {
    let tmp = path.with_extension("meta.tmp");
    tokio::fs::write(&tmp, dropped.to_string()).await?;
    tokio::fs::rename(&tmp, path).await
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio_stream::StreamExt;

    use super::*;

    async fn collect(logs: &JobLogs, id: &str) -> Vec<LogRecord> {
        logs.read(id, false, || true)
            .collect::<Result<Vec<_>, _>>()
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn frames_round_trip_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let logs = JobLogs::new(dir.path().to_owned());
        let (mut w, last) = logs.writer("j", 1 << 20).await.unwrap();
        assert_eq!(last, 0);
        w.write(OutputStream::Stdout, 10, b"out\n").await.unwrap();
        w.write(OutputStream::Stderr, 11, b"\xff\xfe not utf-8\n")
            .await
            .unwrap();
        w.flush().await.unwrap();
        let records = collect(&logs, "j").await;
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].source, LogSource::Stdout);
        assert_eq!(records[1].data.as_ref(), b"\xff\xfe not utf-8\n");
        let (_, last) = logs.writer("j", 1 << 20).await.unwrap();
        assert_eq!(last, 11, "resume point is the last frame's time");
    }

    #[tokio::test]
    async fn over_the_cap_the_oldest_part_is_dropped_with_a_marker() {
        let dir = tempfile::tempdir().unwrap();
        let logs = JobLogs::new(dir.path().to_owned());
        let (mut w, _) = logs.writer("j", 64 << 10).await.unwrap();
        let line = vec![b'x'; 1023];
        for i in 0..400 {
            let mut data = format!("{i:05}").into_bytes();
            data.extend_from_slice(&line);
            w.write(OutputStream::Stdout, i, &data).await.unwrap();
        }
        w.flush().await.unwrap();
        assert!(logs.size("j").await <= 64 << 10);
        let records = collect(&logs, "j").await;
        assert_eq!(records[0].source, LogSource::Agent);
        assert!(
            String::from_utf8_lossy(&records[0].data).contains("bytes of older output dropped")
        );
        let last = records.last().unwrap();
        assert!(last.data.starts_with(b"00399"), "the newest output is kept");
        let first_kept = &records[1];
        assert!(
            !first_kept.data.starts_with(b"00000"),
            "the oldest output is gone"
        );
    }

    #[tokio::test]
    async fn follow_sees_new_output_across_rotation_and_ends_when_finished() {
        let dir = tempfile::tempdir().unwrap();
        let logs = JobLogs::new(dir.path().to_owned());
        let (mut w, _) = logs.writer("j", 32 << 10).await.unwrap();
        let finished = Arc::new(AtomicBool::new(false));
        let done = finished.clone();
        let reader = logs.read("j", true, move || done.load(Ordering::SeqCst));
        let collector = tokio::spawn(async move { reader.collect::<Result<Vec<_>, _>>().await });
        for i in 0..20 {
            w.write(OutputStream::Stdout, i, &[b'a'; 1000])
                .await
                .unwrap();
            w.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        finished.store(true, Ordering::SeqCst);
        let records = tokio::time::timeout(Duration::from_secs(5), collector)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let times: Vec<i64> = records
            .iter()
            .filter(|r| r.source == LogSource::Stdout)
            .map(|r| r.time_nanos)
            .collect();
        assert_eq!(
            times,
            (0..20).collect::<Vec<_>>(),
            "every frame once, in order"
        );
    }
}
