//! A raw FUSE client that is its own vhost-user-fs frontend. It drives a real `virtiofsd` over
//! its vhost-user socket the way a guest kernel does, so a test can send the FUSE requests that
//! root in a hostile guest can craft (absolute or `..` names in MKDIR, SYMLINK, RENAME, UNLINK,
//! LINK) and see what virtiofsd does with them, with no VM and no kernel FUSE mount.
//!
//! It owns the shared guest memory (a memfd, as QEMU's `memory-backend-memfd,share=on`), the
//! vhost-user handshake, a hand-built split virtqueue per queue (virtio-fs: queue 0 = hiprio,
//! queue 1 = requests) and the FUSE wire format. One request is in flight at a time.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rustix::fs::MemfdFlags;
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, Le16, Le32};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Entries per virtqueue (a power of two; virtiofsd accepts up to 32768).
pub const QUEUE_SIZE: u16 = 16;
/// virtio-fs queues: 0 = hiprio (FORGET, INTERRUPT), 1 = the one request queue.
pub const HIPRIO_QUEUE: usize = 0;
/// The request queue every FUSE request here goes to.
pub const REQUEST_QUEUE: usize = 1;
const NUM_QUEUES: usize = 2;
/// Guest-physical room per queue: its rings, then its request and reply buffers.
const QUEUE_STRIDE: u64 = 0x1_0000;
/// The guest memory: one memfd-backed region at GPA 0 holding both queues.
pub const GUEST_MEM_SIZE: usize = NUM_QUEUES * QUEUE_STRIDE as usize;
/// Room for one request (headers and names) and for one reply.
pub const REQUEST_BUF_LEN: u32 = 0x4000;
/// Room for one reply (out header and payload).
pub const REPLY_BUF_LEN: u32 = 0x8000;
/// virtio 1.x descriptor flags (§2.7.5).
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
/// virtio feature bit 32: the device speaks virtio 1.x (little-endian rings).
const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Where one split virtqueue and its buffers live in guest memory (virtio 1.x §2.7):
///
/// | offset   | what                                                          | align |
/// |----------|---------------------------------------------------------------|-------|
/// | `0x0000` | descriptor table: `QUEUE_SIZE` × {addr u64, len u32, flags u16, next u16} | 16 |
/// | `0x0100` | avail ring: flags u16, idx u16, ring [u16; QUEUE_SIZE], used_event u16 | 2 |
/// | `0x0200` | used ring: flags u16, idx u16, ring [{id u32, len u32}; QUEUE_SIZE], avail_event u16 | 4 |
/// | `0x1000` | request buffer (device-readable), `REQUEST_BUF_LEN`           |       |
/// | `0x8000` | reply buffer (device-writable), `REPLY_BUF_LEN`               |       |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub request: u64,
    pub reply: u64,
}

impl RingLayout {
    pub const fn for_queue(index: usize) -> Self {
        let base = index as u64 * QUEUE_STRIDE;
        RingLayout {
            desc: base,
            avail: base + 0x100,
            used: base + 0x200,
            request: base + 0x1000,
            reply: base + 0x8000,
        }
    }

    /// Each part's (start, length), in the order of the table above.
    pub const fn parts(&self) -> [(u64, u64); 5] {
        let n = QUEUE_SIZE as u64;
        [
            (self.desc, 16 * n),
            (self.avail, 4 + 2 * n + 2),
            (self.used, 4 + 8 * n + 2),
            (self.request, REQUEST_BUF_LEN as u64),
            (self.reply, REPLY_BUF_LEN as u64),
        ]
    }
}

/// The driver's side of one split virtqueue: it posts a request as a two-descriptor chain
/// (descriptor 0: the request, device-readable; descriptor 1: the reply buffer, device-writable)
/// and reads back what the device put in the used ring. One chain is in flight at a time, so
/// descriptors 0 and 1 are reused for every request.
#[derive(Debug)]
pub struct DriverRing {
    layout: RingLayout,
    next_avail: u16,
    next_used: u16,
}

impl DriverRing {
    pub fn new(layout: RingLayout) -> Self {
        DriverRing {
            layout,
            next_avail: 0,
            next_used: 0,
        }
    }

    /// Writes `request` and its chain, then publishes head 0 in the avail ring (the idx store
    /// is a release, so the device sees the chain before the new index).
    pub fn post(&mut self, mem: &GuestMemoryMmap, request: &[u8]) -> io::Result<()> {
        let l = self.layout;
        let len = u32::try_from(request.len())
            .ok()
            .filter(|n| *n <= REQUEST_BUF_LEN)
            .ok_or_else(|| io::Error::other(format!("request of {} bytes", request.len())))?;
        let head = Descriptor::new(l.request, len, VRING_DESC_F_NEXT, 1);
        let reply = Descriptor::new(l.reply, REPLY_BUF_LEN, VRING_DESC_F_WRITE, 0);
        let slot = u64::from(self.next_avail % QUEUE_SIZE);
        mem.write_slice(request, GuestAddress(l.request))
            .and_then(|()| mem.write_obj(head, GuestAddress(l.desc)))
            .and_then(|()| mem.write_obj(reply, GuestAddress(l.desc + 16)))
            .and_then(|()| mem.write_obj(Le16::from(0u16), GuestAddress(l.avail + 4 + 2 * slot)))
            .map_err(io::Error::other)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        mem.store(
            self.next_avail,
            GuestAddress(l.avail + 2),
            Ordering::Release,
        )
        .map_err(io::Error::other)
    }

    /// The next element the device put in the used ring, as (head, bytes written), or None.
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> io::Result<Option<(u32, u32)>> {
        let l = self.layout;
        let idx: u16 = mem
            .load(GuestAddress(l.used + 2), Ordering::Acquire)
            .map_err(io::Error::other)?;
        if idx == self.next_used {
            return Ok(None);
        }
        let elem = l.used + 4 + 8 * u64::from(self.next_used % QUEUE_SIZE);
        let id: Le32 = mem.read_obj(GuestAddress(elem)).map_err(io::Error::other)?;
        let len: Le32 = mem
            .read_obj(GuestAddress(elem + 4))
            .map_err(io::Error::other)?;
        self.next_used = self.next_used.wrapping_add(1);
        Ok(Some((id.into(), len.into())))
    }

    /// The first `len` bytes of the reply buffer.
    pub fn reply(&self, mem: &GuestMemoryMmap, len: u32) -> io::Result<Vec<u8>> {
        let mut buf = vec![0; len.min(REPLY_BUF_LEN) as usize];
        mem.read_slice(&mut buf, GuestAddress(self.layout.reply))
            .map_err(io::Error::other)?;
        Ok(buf)
    }
}

/// Shared guest memory the way a VMM makes it for vhost-user: a memfd, mapped MAP_SHARED here
/// and handed to the backend with SET_MEM_TABLE.
pub fn shared_guest_memory() -> io::Result<GuestMemoryMmap> {
    let file = File::from(rustix::fs::memfd_create(
        "cocoon-fuse-client",
        MemfdFlags::CLOEXEC,
    )?);
    file.set_len(GUEST_MEM_SIZE as u64)?;
    let region = (
        GuestAddress(0),
        GUEST_MEM_SIZE,
        Some(FileOffset::new(file, 0)),
    );
    GuestMemoryMmap::<()>::from_ranges_with_files([region]).map_err(io::Error::other)
}

/// The FUSE opcodes this client sends (linux/fuse.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Lookup = 1,
    Symlink = 6,
    Mkdir = 9,
    Unlink = 10,
    Rename = 12,
    Link = 13,
    Init = 26,
}

/// The root directory's node id.
pub const FUSE_ROOT_ID: u64 = 1;
/// `struct fuse_in_header`: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding.
pub const IN_HEADER_LEN: usize = 40;
/// `struct fuse_out_header`: len, error, unique.
pub const OUT_HEADER_LEN: usize = 16;

/// One FUSE request: `fuse_in_header` (as root: uid = gid = 0) followed by `args` back to back.
pub fn encode(opcode: Opcode, unique: u64, nodeid: u64, args: &[&[u8]]) -> Vec<u8> {
    let len = IN_HEADER_LEN + args.iter().map(|a| a.len()).sum::<usize>();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    m.extend_from_slice(&(opcode as u32).to_le_bytes());
    m.extend_from_slice(&unique.to_le_bytes());
    m.extend_from_slice(&nodeid.to_le_bytes());
    m.extend_from_slice(&[0; 16]); // uid, gid, pid, total_extlen, padding
    for a in args {
        m.extend_from_slice(a);
    }
    m
}

/// A name as FUSE carries it: its bytes and a NUL.
pub fn cstr(name: &[u8]) -> Vec<u8> {
    [name, b"\0"].concat()
}

/// A decoded `fuse_out_header` and what followed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// 0, or a negated errno.
    pub error: i32,
    pub unique: u64,
    pub payload: Vec<u8>,
}

impl Reply {
    pub fn parse(bytes: &[u8]) -> io::Result<Reply> {
        let bad = |why: &str| io::Error::other(format!("bad FUSE reply ({why}): {bytes:?}"));
        let header = bytes.get(..OUT_HEADER_LEN).ok_or_else(|| bad("short"))?;
        let u32_at =
            |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        let len = u32_at(0) as usize;
        if len < OUT_HEADER_LEN || len > bytes.len() {
            return Err(bad("length"));
        }
        let mut unique = [0; 8];
        unique.copy_from_slice(&header[8..16]);
        Ok(Reply {
            error: u32_at(4) as i32,
            unique: u64::from_le_bytes(unique),
            payload: bytes[OUT_HEADER_LEN..len].to_vec(),
        })
    }

    /// The errno the request failed with, or None when it succeeded.
    pub fn errno(&self) -> Option<io::Error> {
        (self.error != 0).then(|| io::Error::from_raw_os_error(-self.error))
    }

    /// The node id of a successful LOOKUP/MKDIR/SYMLINK/LINK (`fuse_entry_out.nodeid`).
    pub fn nodeid(&self) -> Option<u64> {
        let b = self.payload.get(..8).filter(|_| self.error == 0)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }
}

/// A vhost-user-fs frontend connected to one virtiofsd, with FUSE initialised by [`init`].
///
/// [`init`]: FsFrontend::init
pub struct FsFrontend {
    frontend: Frontend,
    mem: GuestMemoryMmap,
    ring: DriverRing,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    epoll: Epoll,
    unique: u64,
    timeout: Duration,
}

impl std::fmt::Debug for FsFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsFrontend")
            .field("ring", &self.ring)
            .field("unique", &self.unique)
            .finish_non_exhaustive()
    }
}

fn vu(what: &'static str) -> impl Fn(vhost::Error) -> io::Error {
    move |e| io::Error::other(format!("vhost-user {what}: {e}"))
}

impl FsFrontend {
    /// Connects to the backend listening on `socket` and sets the device up as a VMM does:
    /// owner, features (VERSION_1 + PROTOCOL_FEATURES), protocol features (MQ, REPLY_ACK: every
    /// later message is acknowledged, so the rings are live when this returns), the memfd as the
    /// memory table, then for both queues num/base/addr/call/kick, and enables them. Each
    /// request waits at most `timeout` for its reply.
    pub fn connect(socket: &Path, timeout: Duration) -> io::Result<FsFrontend> {
        let mem = shared_guest_memory()?;
        let mut fe = Frontend::connect(socket, NUM_QUEUES as u64).map_err(vu("connect"))?;
        fe.set_owner().map_err(vu("SET_OWNER"))?;
        let offered = fe.get_features().map_err(vu("GET_FEATURES"))?;
        let want = VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if offered & want != want {
            return Err(io::Error::other(format!(
                "backend features {offered:#x} lack {want:#x}"
            )));
        }
        fe.set_features(want).map_err(vu("SET_FEATURES"))?;
        let proto = fe
            .get_protocol_features()
            .map_err(vu("GET_PROTOCOL_FEATURES"))?
            & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK);
        fe.set_protocol_features(proto)
            .map_err(vu("SET_PROTOCOL_FEATURES"))?;
        if proto.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(vu("memory region"))?;
        fe.set_mem_table(&regions).map_err(vu("SET_MEM_TABLE"))?;
        // SET_VRING_ADDR carries the frontend's own virtual addresses; the backend maps them
        // back to guest-physical ones through the memory table.
        let va = regions[0].userspace_addr;
        let (mut kicks, mut calls) = (vec![], vec![]);
        let epoll = Epoll::new()?;
        for q in [HIPRIO_QUEUE, REQUEST_QUEUE] {
            let l = RingLayout::for_queue(q);
            let (kick, call) = (EventFd::new(EFD_NONBLOCK)?, EventFd::new(EFD_NONBLOCK)?);
            fe.set_vring_num(q, QUEUE_SIZE)
                .map_err(vu("SET_VRING_NUM"))?;
            fe.set_vring_base(q, 0).map_err(vu("SET_VRING_BASE"))?;
            let addrs = VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: 0,
                desc_table_addr: va + l.desc,
                used_ring_addr: va + l.used,
                avail_ring_addr: va + l.avail,
                log_addr: None,
            };
            fe.set_vring_addr(q, &addrs).map_err(vu("SET_VRING_ADDR"))?;
            fe.set_vring_call(q, &call).map_err(vu("SET_VRING_CALL"))?;
            fe.set_vring_kick(q, &kick).map_err(vu("SET_VRING_KICK"))?;
            if q == REQUEST_QUEUE {
                use std::os::fd::AsRawFd;
                let ev = EpollEvent::new(EventSet::IN, q as u64);
                epoll.ctl(ControlOperation::Add, call.as_raw_fd(), ev)?;
            }
            kicks.push(kick);
            calls.push(call);
        }
        for q in [HIPRIO_QUEUE, REQUEST_QUEUE] {
            fe.set_vring_enable(q, true)
                .map_err(vu("SET_VRING_ENABLE"))?;
        }
        Ok(FsFrontend {
            frontend: fe,
            mem,
            ring: DriverRing::new(RingLayout::for_queue(REQUEST_QUEUE)),
            kicks,
            calls,
            epoll,
            unique: 0,
            timeout,
        })
    }

    /// Sends one request on the request queue, kicks, waits on the call eventfd for the used
    /// element and returns the decoded reply.
    pub fn request(&mut self, opcode: Opcode, nodeid: u64, args: &[&[u8]]) -> io::Result<Reply> {
        self.unique += 1;
        self.ring
            .post(&self.mem, &encode(opcode, self.unique, nodeid, args))?;
        self.kicks[REQUEST_QUEUE].write(1)?;
        let deadline = Instant::now() + self.timeout;
        let (head, len) = loop {
            if let Some(used) = self.ring.take_used(&self.mem)? {
                break used;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no reply to {opcode:?} in {:?}", self.timeout),
                ));
            }
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
            let mut events = [EpollEvent::default()];
            match self.epoll.wait(ms, &mut events) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
                // Drain the count; it may be 0 (EAGAIN) when the used ring was already read.
                Ok(_) => drop(self.calls[REQUEST_QUEUE].read()),
            }
        };
        if head != 0 {
            return Err(io::Error::other(format!("used ring returned head {head}")));
        }
        let reply = Reply::parse(&self.ring.reply(&self.mem, len)?)?;
        if reply.unique != self.unique {
            return Err(io::Error::other(format!(
                "reply for {} to request {}",
                reply.unique, self.unique
            )));
        }
        Ok(reply)
    }

    /// FUSE_INIT as protocol 7.31 with no flags; returns the (major, minor) the server speaks.
    pub fn init(&mut self) -> io::Result<(u32, u32)> {
        let init_in = [7u32, 31, 0, 0].map(u32::to_le_bytes).concat(); // major, minor, readahead, flags
        let r = self.request(Opcode::Init, 0, &[&init_in])?;
        if let Some(e) = r.errno() {
            return Err(io::Error::new(e.kind(), format!("FUSE_INIT: {e}")));
        }
        match r.payload.get(..8) {
            Some(v) => Ok((
                u32::from_le_bytes([v[0], v[1], v[2], v[3]]),
                u32::from_le_bytes([v[4], v[5], v[6], v[7]]),
            )),
            None => Err(io::Error::other("FUSE_INIT reply without fuse_init_out")),
        }
    }

    pub fn lookup(&mut self, parent: u64, name: &[u8]) -> io::Result<Reply> {
        self.request(Opcode::Lookup, parent, &[&cstr(name)])
    }

    /// MKDIR: `fuse_mkdir_in` {mode, umask} then the name.
    pub fn mkdir(&mut self, parent: u64, name: &[u8], mode: u32) -> io::Result<Reply> {
        let mkdir_in = [mode, 0].map(u32::to_le_bytes).concat();
        self.request(Opcode::Mkdir, parent, &[&mkdir_in, &cstr(name)])
    }

    /// SYMLINK: the new entry's name, then the link's target.
    pub fn symlink(&mut self, parent: u64, name: &[u8], target: &[u8]) -> io::Result<Reply> {
        self.request(Opcode::Symlink, parent, &[&cstr(name), &cstr(target)])
    }

    /// RENAME: `fuse_rename_in` {newdir}, the old name, the new name.
    pub fn rename(&mut self, dir: u64, old: &[u8], newdir: u64, new: &[u8]) -> io::Result<Reply> {
        let rename_in = newdir.to_le_bytes();
        self.request(Opcode::Rename, dir, &[&rename_in, &cstr(old), &cstr(new)])
    }

    pub fn unlink(&mut self, parent: u64, name: &[u8]) -> io::Result<Reply> {
        self.request(Opcode::Unlink, parent, &[&cstr(name)])
    }

    /// LINK: `fuse_link_in` {oldnodeid}, then the new name under `newparent`.
    pub fn link(&mut self, inode: u64, newparent: u64, name: &[u8]) -> io::Result<Reply> {
        let link_in = inode.to_le_bytes();
        self.request(Opcode::Link, newparent, &[&link_in, &cstr(name)])
    }

    /// Closes the vhost-user connection: virtiofsd serves one frontend and exits after it.
    pub fn disconnect(self) {
        drop(self.frontend);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use virtio_queue::{Queue, QueueT};

    #[test]
    fn every_part_of_both_queues_is_aligned_inside_memory_and_apart() {
        let mut parts: Vec<(u64, u64)> = (0..NUM_QUEUES)
            .flat_map(|q| RingLayout::for_queue(q).parts())
            .collect();
        for q in 0..NUM_QUEUES {
            let l = RingLayout::for_queue(q);
            assert_eq!((l.desc % 16, l.avail % 2, l.used % 4), (0, 0, 0), "{l:?}");
        }
        parts.sort();
        for w in parts.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "overlap: {w:?}");
        }
        let (start, len) = parts[parts.len() - 1];
        assert!(start + len <= GUEST_MEM_SIZE as u64);
    }

    #[test]
    fn a_request_is_header_then_args_and_a_reply_is_checked_against_its_length() {
        let m = encode(
            Opcode::Mkdir,
            7,
            FUSE_ROOT_ID,
            &[&[1, 2, 3, 4, 5, 6, 7, 8], &cstr(b"d")],
        );
        assert_eq!(m.len(), IN_HEADER_LEN + 8 + 2);
        assert_eq!(m[..4], (m.len() as u32).to_le_bytes());
        assert_eq!(m[4..8], 9u32.to_le_bytes());
        assert_eq!(m[8..16], 7u64.to_le_bytes());
        assert_eq!(m[16..24], 1u64.to_le_bytes());
        assert_eq!(m[IN_HEADER_LEN + 8..], *b"d\0");

        let mut r = [24u32.to_le_bytes(), (-2i32).to_le_bytes()].concat();
        r.extend_from_slice(&5u64.to_le_bytes());
        r.extend_from_slice(&42u64.to_le_bytes());
        let reply = Reply::parse(&r).unwrap();
        assert_eq!((reply.error, reply.unique), (-2, 5));
        assert_eq!(reply.errno().unwrap().kind(), io::ErrorKind::NotFound);
        assert_eq!(reply.nodeid(), None, "a failed request has no entry");
        assert!(Reply::parse(&r[..10]).is_err());
        r[0] = 200;
        assert!(Reply::parse(&r).is_err(), "a length past the bytes written");
    }

    /// virtio-queue's device side (what virtiofsd runs) pops the chain this driver posted,
    /// reads the request, writes a reply and marks it used; the driver reads it back.
    #[test]
    fn a_device_side_queue_reads_the_posted_chain_and_its_reply_comes_back() {
        let mem = shared_guest_memory().unwrap();
        let l = RingLayout::for_queue(REQUEST_QUEUE);
        let mut ring = DriverRing::new(l);
        let mut device = Queue::new(QUEUE_SIZE).unwrap();
        device.set_size(QUEUE_SIZE);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(l.desc);
        device.set_desc_table_address(lo, hi);
        let (lo, hi) = split(l.avail);
        device.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(l.used);
        device.set_used_ring_address(lo, hi);
        device.set_ready(true);
        assert!(device.is_valid(&mem));

        for unique in 1..=(QUEUE_SIZE as u64 + 2) {
            // More requests than entries: the indices wrap around the ring.
            let request = encode(Opcode::Lookup, unique, FUSE_ROOT_ID, &[&cstr(b"name")]);
            ring.post(&mem, &request).unwrap();
            assert_eq!(ring.take_used(&mem).unwrap(), None);

            let chain = device.pop_descriptor_chain(&mem).unwrap();
            let head = chain.head_index();
            let mut got = vec![];
            chain
                .clone()
                .reader(&mem)
                .unwrap()
                .read_to_end(&mut got)
                .unwrap();
            assert_eq!(got, request);
            let mut w = chain.writer(&mem).unwrap();
            assert_eq!(w.available_bytes(), REPLY_BUF_LEN as usize);
            let mut out = [24u32.to_le_bytes(), 0i32.to_le_bytes()].concat();
            out.extend_from_slice(&unique.to_le_bytes());
            out.extend_from_slice(&(100 + unique).to_le_bytes());
            w.write_all(&out).unwrap();
            device.add_used(&mem, head, out.len() as u32).unwrap();

            let (id, len) = ring.take_used(&mem).unwrap().unwrap();
            assert_eq!((id, len), (0, 24));
            let reply = Reply::parse(&ring.reply(&mem, len).unwrap()).unwrap();
            assert_eq!((reply.unique, reply.nodeid()), (unique, Some(100 + unique)));
        }
    }
}
