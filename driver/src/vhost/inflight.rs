//! The inflight region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): shared memory the front-end
//! keeps across backend restarts, in which the backend marks every request it took from a
//! ring until it has put it in the used ring. A new driver incarnation reads it back and
//! resubmits exactly the requests that were taken and not completed, in the order they were
//! taken; nothing else in the rings tells them apart once completions went out of order.
//!
//! The region is the backend's own format (the front-end only keeps it: QEMU allocates
//! nothing, it asks the backend for it with GET_INFLIGHT_FD and hands the same descriptor back
//! with SET_INFLIGHT_FD after each reconnection, and drops it when the guest resets the
//! device). rblk uses libvhost-user's split-ring layout, one area per queue:
//!
//! ```text
//!  0  u64 features   8 u16 version (0: never used)   10 u16 desc_num (ring size)
//! 12  u16 last_batch_head   14 u16 used_idx (the used ring's idx after the last completion)
//! 16  desc_num × { u8 inflight, 5 bytes padding, u16 next, u64 counter }   (16 bytes each)
//! ```
//!
//! A completion is ordered so that a crash at any instant is told apart on restart:
//! `last_batch_head = head`; used element and used idx written (virtio-queue); then
//! `desc[head].inflight = 0`; then `used_idx = idx`. If the used ring's idx differs from
//! `used_idx` on restart, the crash fell between the two: `last_batch_head`'s request was
//! completed and its mark is cleared.

use std::fs::File;
use std::sync::atomic::Ordering;

use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory, VolatileSlice};

/// The region's format version rblk writes into a fresh queue area.
const VERSION: u16 = 1;
const HEADER: usize = 16;
const DESC: usize = 16;
const ALIGN: usize = 64;

/// Bytes of one queue's area for a ring of `queue_size` descriptors.
pub fn queue_area(queue_size: u16) -> usize {
    (HEADER + DESC * usize::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("inflight region for {queues} queues of {size} descriptors is {got} bytes, not {want}")]
    Size { queues: u16, size: u16, got: u64, want: u64 },
    #[error("inflight region: {0}")]
    Io(#[from] std::io::Error),
    #[error("inflight region cannot be mapped: {0}")]
    Map(String),
    #[error("inflight area of queue {queue} is for {found} descriptors, the ring has {ring}")]
    RingSize { queue: u16, found: u16, ring: u16 },
    #[error("inflight area of queue {queue} has format version {found}, not {VERSION}")]
    Version { queue: u16, found: u16 },
}

/// A new, zeroed region for `queues` rings of `queue_size` descriptors (GET_INFLIGHT_FD):
/// the file and its length.
pub fn create(queues: u16, queue_size: u16) -> Result<(File, u64), InflightError> {
    use std::os::fd::FromRawFd;
    let len = (queue_area(queue_size) * usize::from(queues)) as u64;
    // SAFETY: memfd_create reads a NUL-terminated name and returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"rblk-inflight".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)?;
    Ok((file, len))
}

/// The region the front-end handed over (SET_INFLIGHT_FD), mapped.
#[derive(Debug)]
pub struct Region {
    map: MmapRegion<()>,
    queues: u16,
    queue_size: u16,
}

impl Region {
    pub fn map(file: File, offset: u64, size: u64, queues: u16, queue_size: u16) -> Result<Region, InflightError> {
        let want = (queue_area(queue_size) * usize::from(queues)) as u64;
        let bad = || InflightError::Size { queues, size: queue_size, got: size, want };
        if size != want || queues == 0 || queue_size == 0 {
            return Err(bad());
        }
        let end = offset.checked_add(size).ok_or_else(bad)?;
        if file.metadata()?.len() < end {
            return Err(bad());
        }
        let map = MmapRegion::from_file(FileOffset::new(file, offset), size as usize)
            .map_err(|e| InflightError::Map(e.to_string()))?;
        Ok(Region { map, queues, queue_size })
    }

    /// Queue `index`'s area, for a ring of `ring_size` descriptors.
    pub fn queue(&self, index: u16, ring_size: u16) -> Result<QueueArea<'_>, InflightError> {
        let area = queue_area(self.queue_size);
        if index >= self.queues || ring_size > self.queue_size {
            return Err(InflightError::RingSize { queue: index, found: self.queue_size, ring: ring_size });
        }
        let slice = self
            .map
            .as_volatile_slice()
            .subslice(usize::from(index) * area, area)
            .map_err(|e| InflightError::Map(e.to_string()))?;
        Ok(QueueArea { slice, ring_size })
    }
}

/// One queue's area.
#[derive(Debug, Clone, Copy)]
pub struct QueueArea<'a> {
    slice: VolatileSlice<'a, ()>,
    ring_size: u16,
}

/// What a queue's area says at ring start.
#[derive(Debug, PartialEq, Eq)]
pub enum Recovered {
    /// Never used: nothing was in flight.
    Fresh,
    /// Requests taken and not completed, in the order they were taken (descriptor heads),
    /// and the counter to go on with.
    Inflight { heads: Vec<u16>, counter: u64 },
}

// Every offset below lies inside the queue's area (checked by `Region::queue`), so the
// accesses cannot fail; a failure would be a bug, and is ignored rather than panicking.
impl QueueArea<'_> {
    fn store<T: vm_memory::AtomicAccess>(&self, at: usize, v: T) {
        let _ = self.slice.store(v, at, Ordering::Release);
    }

    fn load<T: vm_memory::AtomicAccess + Default>(&self, at: usize) -> T {
        self.slice.load(at, Ordering::Acquire).unwrap_or_default()
    }

    fn desc(head: u16) -> usize {
        HEADER + DESC * usize::from(head)
    }

    /// Reads the area at ring start (before any request is taken). `used_idx` is the used
    /// ring's idx in guest memory now. A fresh area is initialised for this ring.
    pub fn recover(&self, used_idx: u16, queue: u16) -> Result<Recovered, InflightError> {
        match self.load::<u16>(8) {
            0 => {
                self.store(10, self.ring_size);
                self.store(14, used_idx);
                self.store(8, VERSION);
                return Ok(Recovered::Fresh);
            }
            VERSION => {}
            // Not rblk's layout: nothing in it can be trusted to say what was in flight.
            found => return Err(InflightError::Version { queue, found }),
        }
        let found = self.load::<u16>(10);
        if found != self.ring_size {
            return Err(InflightError::RingSize { queue, found, ring: self.ring_size });
        }
        if self.load::<u16>(14) != used_idx {
            // The crash fell between a used-ring update and clearing its mark.
            let last = self.load::<u16>(12);
            if last < self.ring_size {
                self.store(Self::desc(last), 0u8);
            }
            self.store(14, used_idx);
        }
        let mut taken: Vec<(u64, u16)> = (0..self.ring_size)
            .filter(|&h| self.load::<u8>(Self::desc(h)) == 1)
            .map(|h| (self.load::<u64>(Self::desc(h) + 8), h))
            .collect();
        taken.sort_unstable();
        let counter = taken.last().map_or(0, |&(c, _)| c + 1);
        Ok(Recovered::Inflight { heads: taken.into_iter().map(|(_, h)| h).collect(), counter })
    }

    /// A request was taken from the avail ring (before anything of it is done).
    pub fn taken(&self, head: u16, counter: u64) {
        self.store(Self::desc(head) + 8, counter);
        self.store(Self::desc(head), 1u8);
    }

    /// Before the used ring gets `head`.
    pub fn completing(&self, head: u16) {
        self.store(12, head);
    }

    /// After the used ring got `head` and its idx is now `used_idx`.
    pub fn completed(&self, head: u16, used_idx: u16) {
        self.store(Self::desc(head), 0u8);
        self.store(14, used_idx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(queues: u16, size: u16) -> Region {
        let (file, len) = create(queues, size).expect("memfd");
        Region::map(file, 0, len, queues, size).expect("map")
    }

    /// Taken requests come back in the order they were taken, whatever their heads;
    /// completed ones do not; a fresh area is fresh once.
    #[test]
    fn taken_requests_come_back_in_order() {
        let r = region(2, 8);
        let q = r.queue(1, 8).expect("queue");
        assert_eq!(q.recover(0, 1).expect("recover"), Recovered::Fresh);
        for (counter, head) in [5u16, 2, 7, 0].into_iter().enumerate() {
            q.taken(head, counter as u64);
        }
        q.completing(2);
        q.completed(2, 1);
        let again = r.queue(1, 8).expect("queue");
        assert_eq!(again.recover(1, 1).expect("recover"), Recovered::Inflight { heads: vec![5, 7, 0], counter: 4 });
        // The other queue's area is untouched.
        assert_eq!(r.queue(0, 8).expect("queue").recover(0, 0).expect("recover"), Recovered::Fresh);
    }

    /// A crash after the used ring took a request but before its mark was cleared: the
    /// used ring's idx says so, and the request is not resubmitted.
    #[test]
    fn a_crash_between_used_ring_and_mark_completes_the_request() {
        // Two requests taken, the second being completed when the driver died.
        let died_completing = || {
            let r = region(1, 4);
            r.queue(0, 4).expect("queue").recover(0, 0).expect("fresh");
            let q = r.queue(0, 4).expect("queue");
            q.taken(3, 0);
            q.taken(1, 1);
            q.completing(1);
            r
        };
        // The used ring's idx became 1 before the driver died.
        let r = died_completing();
        let q = r.queue(0, 4).expect("queue");
        assert_eq!(q.recover(1, 0).expect("recover"), Recovered::Inflight { heads: vec![3], counter: 1 });
        // Without the used ring moving, the same marks mean both are in flight.
        let r = died_completing();
        let q = r.queue(0, 4).expect("queue");
        assert_eq!(q.recover(0, 0).expect("recover"), Recovered::Inflight { heads: vec![3, 1], counter: 2 });
    }

    #[test]
    fn sizes_are_checked() {
        let (file, len) = create(2, 8).expect("memfd");
        assert!(Region::map(file, 0, len + 64, 2, 8).is_err(), "a size that does not match");
        let (file, len) = create(2, 8).expect("memfd");
        assert!(Region::map(file, 64, len, 2, 8).is_err(), "beyond the file");
        let r = region(2, 8);
        assert!(r.queue(2, 8).is_err(), "a queue out of range");
        assert!(r.queue(0, 16).is_err(), "a ring larger than the region's");
        let q = r.queue(0, 8).expect("queue");
        q.recover(0, 0).expect("fresh");
        assert!(r.queue(0, 4).expect("queue").recover(0, 0).is_err(), "ring size changed under a used area");
        let r = region(1, 8);
        let q = r.queue(0, 8).expect("queue");
        q.store(8, 7u16);
        assert!(matches!(q.recover(0, 0), Err(InflightError::Version { found: 7, .. })), "an unknown layout");
    }
}
