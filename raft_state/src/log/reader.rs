//! Reading the ring: a read-ahead window (streamed by a helper thread where the device
//! wants it), and the reads of one record header or one whole record.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::device::{AlignedBuf, Device, DeviceError, BLOCK, BLOCK_SIZE};
use crate::hash;

use super::format::{gather, parse_header, tag_of, Header, HeaderProblem, HEADER_SIZE, MAX_RECORD_BLOCKS};
use super::recovery::RecordProblem;
use super::{LogError, LogRegion};

/// Reads the ring through a read-ahead window, so a replay issues few large reads. On a
/// device that wants it (`Device::read_ahead`), a helper thread streams the ring in windows
/// while the records already read are checked and decoded.
pub(super) struct RingReader {
    region: LogRegion,
    buf: AlignedBuf,
    /// vblock of `buf[0]` and how many blocks of it are valid.
    at: u64,
    valid: u64,
    stream: Option<Stream>,
}

/// Windows a helper thread reads ahead, in ring order.
struct Stream {
    rx: std::sync::mpsc::Receiver<Result<AlignedBuf, DeviceError>>,
    /// Windows received and still needed: (first vblock, blocks).
    windows: VecDeque<(u64, AlignedBuf)>,
    /// Where the next window from the thread starts.
    next: u64,
    /// A request that spans two windows is copied together here.
    joined: Vec<u8>,
    /// Windows done with go back to the thread for reuse (no fresh pages per window).
    spent: std::sync::mpsc::Sender<AlignedBuf>,
}

pub(super) const READ_AHEAD_BLOCKS: u64 = 2 * MAX_RECORD_BLOCKS;
/// Windows the helper thread reads before it waits for the reader to catch up.
const STREAM_AHEAD: usize = 2;

impl RingReader {
    pub(super) fn new(region: LogRegion) -> Self {
        let cap = READ_AHEAD_BLOCKS.min(region.blocks);
        Self { region, buf: AlignedBuf::blocks(cap as usize), at: 0, valid: 0, stream: None }
    }

    /// A reader whose helper thread streams the ring from `from` up to `limit` (vblocks).
    pub(super) fn streaming(region: LogRegion, dev: Arc<dyn Device>, from: u64, limit: u64) -> Self {
        let mut reader = Self::new(region);
        if !dev.read_ahead() || limit <= from {
            return reader;
        }
        let cap = READ_AHEAD_BLOCKS.min(region.blocks);
        let (tx, rx) = std::sync::mpsc::sync_channel(STREAM_AHEAD);
        let (spent, reuse) = std::sync::mpsc::channel::<AlignedBuf>();
        let spawned = std::thread::Builder::new().name("rblk-log-scan".into()).spawn(move || {
            let mut at = from;
            while at < limit {
                let mut window = reuse.try_recv().unwrap_or_else(|_| AlignedBuf::blocks(cap as usize));
                let read = read_window(&*dev, region, &mut window, at, cap).map(|()| window);
                let failed = read.is_err();
                // The reader went away (it found the end) or the read failed: stop.
                if tx.send(read).is_err() || failed {
                    return;
                }
                at += cap;
            }
        });
        if spawned.is_ok() {
            reader.stream = Some(Stream { rx, windows: VecDeque::new(), next: from, joined: Vec::new(), spent });
        }
        reader
    }

    /// The bytes of blocks `vblock .. vblock + count` (`count` ≤ the window size).
    pub(super) fn blocks(&mut self, dev: &dyn Device, vblock: u64, count: u64) -> Result<&[u8], DeviceError> {
        let covered = match &mut self.stream {
            Some(stream) => Some(stream.cover(vblock, count)?),
            None => None,
        };
        match covered {
            Some(true) => {
                if let Some(stream) = &mut self.stream {
                    return Ok(stream.slice(vblock, count));
                }
            }
            // A jump back, or past the end of the stream: read the plain way from now on.
            Some(false) => self.stream = None,
            None => {}
        }
        if !(vblock >= self.at && vblock + count <= self.at + self.valid) {
            let cap = self.buf.len() as u64 / BLOCK;
            let want = cap.max(count);
            if want > cap {
                self.buf = AlignedBuf::blocks(want as usize);
            }
            read_window(dev, self.region, &mut self.buf, vblock, want)?;
            self.at = vblock;
            self.valid = want;
        }
        let from = ((vblock - self.at) * BLOCK) as usize;
        Ok(&self.buf[from..from + (count * BLOCK) as usize])
    }
}

impl Stream {
    /// Makes the windows in hand cover `vblock .. vblock + count`, dropping the ones before
    /// it; false if they cannot (it lies before them, or the stream ended first).
    fn cover(&mut self, vblock: u64, count: u64) -> Result<bool, DeviceError> {
        let start = self.windows.front().map_or(self.next, |(at, _)| *at);
        if vblock < start {
            return Ok(false);
        }
        while self.windows.front().is_some_and(|(at, w)| at + w.len() as u64 / BLOCK <= vblock) {
            if let Some((_, window)) = self.windows.pop_front() {
                // The thread may be gone (end of the ring): then the window is just freed.
                let _ = self.spent.send(window);
            }
        }
        while self.next < vblock + count {
            match self.rx.recv() {
                Ok(Ok(window)) => {
                    let blocks = window.len() as u64 / BLOCK;
                    if self.next + blocks > vblock {
                        self.windows.push_back((self.next, window));
                    } else {
                        let _ = self.spent.send(window);
                    }
                    self.next += blocks;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(false),
            }
        }
        Ok(true)
    }

    /// The bytes `cover` made sure of: a slice of one window, or joined from two or more.
    fn slice(&mut self, vblock: u64, count: u64) -> &[u8] {
        let len = (count * BLOCK) as usize;
        let (at, first) = &self.windows[0];
        let from = ((vblock - at) * BLOCK) as usize;
        if from + len <= first.len() {
            return &self.windows[0].1[from..from + len];
        }
        self.joined.clear();
        let mut pos = vblock;
        for (at, window) in &self.windows {
            let end = at + window.len() as u64 / BLOCK;
            if pos >= vblock + count {
                break;
            }
            let upto = end.min(vblock + count);
            self.joined.extend_from_slice(&window[((pos - at) * BLOCK) as usize..((upto - at) * BLOCK) as usize]);
            pos = upto;
        }
        &self.joined
    }
}

/// Reads `want` blocks of the ring from `vblock` on into `buf`, wrapping at its end.
fn read_window(dev: &dyn Device, region: LogRegion, buf: &mut [u8], vblock: u64, want: u64) -> Result<(), DeviceError> {
    let n = region.blocks;
    let pos = vblock % n;
    let first = (n - pos).min(want);
    dev.read_at((region.start + pos) * BLOCK, &mut buf[..(first * BLOCK) as usize])?;
    if want > first {
        let rest = (want - first) as usize * BLOCK_SIZE;
        dev.read_at(region.start * BLOCK, &mut buf[(first * BLOCK) as usize..][..rest])?;
    }
    Ok(())
}

/// Reads and checks the header at `vblock`. Device errors are real errors; a bad header is not.
pub(super) fn read_header(
    dev: &dyn Device,
    reader: &mut RingReader,
    vblock: u64,
    volume_id: [u8; 16],
) -> Result<Result<Header, HeaderProblem>, LogError> {
    let bytes = reader.blocks(dev, vblock, 1).map_err(|source| LogError::Device { what: "read log header", source })?;
    Ok(parse_header(bytes, vblock, volume_id))
}

/// Reads and checks the whole record at `vblock`.
pub(super) fn read_record(
    dev: &dyn Device,
    reader: &mut RingReader,
    vblock: u64,
    limit: u64,
) -> Result<Result<(Header, Vec<u8>), RecordProblem>, LogError> {
    let header = match read_header(dev, reader, vblock, reader.region.volume_id)? {
        Ok(h) => h,
        Err(HeaderProblem::Version(version)) => return Err(LogError::UnsupportedVersion { vblock, version }),
        Err(p) => return Ok(Err(RecordProblem::Header(p))),
    };
    if vblock + header.blocks > limit {
        // It would overlap retained records: it cannot be one we wrote in this lap.
        return Ok(Err(RecordProblem::Header(HeaderProblem::Shape("runs past the ring".into()))));
    }
    let volume_id = reader.region.volume_id;
    let bytes = reader
        .blocks(dev, vblock, header.blocks)
        .map_err(|source| LogError::Device { what: "read log record", source })?;
    let payload = gather(bytes, HEADER_SIZE, header.payload_len);
    if hash::log_payload_checksum(&volume_id, vblock, &payload) != header.payload_checksum {
        return Ok(Err(RecordProblem::Payload { blocks: header.blocks, tag: tag_of(&header.checksum) }));
    }
    Ok(Ok((header, payload)))
}
