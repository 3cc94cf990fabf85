//! Test support for the block daemon: starting `rimg-vhost-blk` and a
//! synchronous libblkio (`virtio-blk-vhost-user` driver) client, the real
//! vhost-user-blk frontend the tests drive it with.

use std::mem::MaybeUninit;
use std::path::Path;
use std::process::Command;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// A running `rimg-vhost-blk`.
pub type Daemon = crate::daemon::DaemonProcess;

impl Daemon {
    /// Starts `rimg-vhost-blk` with `args` (after --socket/--image) and
    /// waits until it listens.
    pub fn start(socket: &Path, image: &Path, args: &[&str]) -> Result<Daemon, String> {
        let mut cmd = Command::new(crate::workspace_bin("rimg-vhost-blk"));
        cmd.arg("--socket")
            .arg(socket)
            .arg("--image")
            .arg(image)
            .args(args);
        crate::daemon::DaemonProcess::spawn(cmd, socket)
    }
}

/// How long a client waits for its requests' completions before it
/// calls the daemon hung.
const ANSWER_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A libblkio client with one mapped buffer region per queue.
pub struct Client {
    blkio: Blkio,
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    buf_len: usize,
}

/// What a request returned: 0 or a negative errno.
pub type Ret = i32;

/// One request of [`Client::batch`].
#[derive(Debug, Clone, Copy)]
pub enum Req<'a> {
    Write(u64, &'a [u8]),
    /// Offset, length, unmap allowed.
    WriteZeroes(u64, u64, bool),
    Discard(u64, u64),
}

impl Client {
    pub fn connect(socket: &Path, num_queues: usize, read_only: bool) -> Result<Client, String> {
        let e = |e: blkio::Error| e.message().to_string();
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(e)?;
        b.set_str("path", socket.to_str().unwrap()).map_err(e)?;
        if read_only {
            b.set_bool("read-only", true).map_err(e)?;
        }
        b.connect().map_err(e)?;
        b.set_i32("num-queues", num_queues as i32).map_err(e)?;
        let out = b.start().map_err(e)?;
        let buf_len = 4 << 20;
        let per_q = buf_len * num_queues;
        let align = b.get_u64("mem-region-alignment").map_err(e)? as usize;
        let region = b
            .alloc_mem_region(per_q.next_multiple_of(align))
            .map_err(e)?;
        b.map_mem_region(&region).map_err(e)?;
        Ok(Client {
            blkio: b,
            queues: out.queues,
            region,
            buf_len,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").unwrap()
    }

    pub fn prop_bool(&self, name: &str) -> bool {
        self.blkio.get_bool(name).unwrap()
    }

    fn buf(&mut self, q: usize) -> &mut [u8] {
        // SAFETY: the region is `buf_len * num_queues` bytes, mapped
        // read-write for the client's lifetime; queue q owns its own slice
        // and only one request uses it at a time (submit then wait).
        unsafe {
            std::slice::from_raw_parts_mut(
                (self.region.addr as *mut u8).add(q * self.buf_len),
                self.buf_len,
            )
        }
    }

    fn wait(&mut self, q: usize, n: usize) -> Vec<Completion> {
        let start = std::time::Instant::now();
        let mut out = Vec::new();
        while out.len() < n {
            let mut c: [MaybeUninit<Completion>; 64] = [const { MaybeUninit::uninit() }; 64];
            // A daemon that stops answering (killed, wedged) fails the
            // test here, not at CI's timeout.
            let mut left = ANSWER_LIMIT.saturating_sub(start.elapsed());
            let got = self.queues[q]
                .do_io(&mut c, 1, Some(&mut left), None)
                .unwrap_or_else(|e| {
                    panic!(
                        "queue {q}: {} of {n} completions after {:?}: {}",
                        out.len(),
                        start.elapsed(),
                        e.message()
                    )
                });
            for x in c.iter().take(got) {
                // SAFETY: do_io initialised the first `got` entries.
                out.push(unsafe { x.assume_init_read() });
            }
        }
        out
    }

    pub fn read(&mut self, q: usize, off: u64, len: usize) -> Result<Vec<u8>, Ret> {
        assert!(len <= self.buf_len);
        let p = self.buf(q).as_mut_ptr();
        self.queues[q].read(off, p, len, 0, ReqFlags::empty());
        let c = self.wait(q, 1);
        if c[0].ret != 0 {
            return Err(c[0].ret);
        }
        Ok(self.buf(q)[..len].to_vec())
    }

    pub fn write(&mut self, q: usize, off: u64, data: &[u8]) -> Result<(), Ret> {
        assert!(data.len() <= self.buf_len);
        self.buf(q)[..data.len()].copy_from_slice(data);
        let p = self.buf(q).as_ptr();
        self.queues[q].write(off, p, data.len(), 0, ReqFlags::empty());
        ret(&self.wait(q, 1)[0])
    }

    /// Submits several writes of `chunk` bytes at `offs` at once (queue
    /// depth = offs.len()), data from the buffer at [i*chunk..].
    pub fn write_many(&mut self, q: usize, offs: &[u64], data: &[u8], chunk: usize) -> Vec<Ret> {
        assert!(data.len() <= self.buf_len && offs.len() * chunk <= data.len());
        self.buf(q)[..data.len()].copy_from_slice(data);
        let base = self.buf(q).as_ptr();
        for (i, &o) in offs.iter().enumerate() {
            // SAFETY: i * chunk + chunk <= data.len() <= buf_len.
            let p = unsafe { base.add(i * chunk) };
            self.queues[q].write(o, p, chunk, i, ReqFlags::empty());
        }
        let mut r = vec![1; offs.len()];
        for c in self.wait(q, offs.len()) {
            r[c.user_data] = c.ret;
        }
        r
    }

    /// Submits every request of `reqs` (each on its queue) at once, then
    /// waits for all of them; write data is copied into each queue's
    /// buffer one after the other. Returns each request's result.
    pub fn batch(&mut self, reqs: &[(usize, Req<'_>)]) -> Vec<Ret> {
        let mut at = vec![0usize; self.queues.len()];
        let mut per_queue = vec![0usize; self.queues.len()];
        for (i, &(q, r)) in reqs.iter().enumerate() {
            per_queue[q] += 1;
            match r {
                Req::Write(off, d) => {
                    let from = at[q];
                    assert!(
                        from + d.len() <= self.buf_len,
                        "batch data exceeds the buffer"
                    );
                    let buf = self.buf(q);
                    buf[from..from + d.len()].copy_from_slice(d);
                    // SAFETY: from + d.len() <= buf_len, inside queue q's
                    // slice of the mapped region.
                    let p = unsafe { buf.as_ptr().add(from) };
                    self.queues[q].write(off, p, d.len(), i, ReqFlags::empty());
                    at[q] += d.len();
                }
                Req::WriteZeroes(off, len, unmap) => {
                    let f = if unmap {
                        ReqFlags::empty()
                    } else {
                        ReqFlags::NO_UNMAP
                    };
                    self.queues[q].write_zeroes(off, len, i, f);
                }
                Req::Discard(off, len) => {
                    self.queues[q].discard(off, len, i, ReqFlags::empty());
                }
            }
        }
        let mut r = vec![1; reqs.len()];
        for (q, &n) in per_queue.iter().enumerate() {
            if n > 0 {
                for c in self.wait(q, n) {
                    r[c.user_data] = c.ret;
                }
            }
        }
        r
    }

    pub fn flush(&mut self, q: usize) -> Result<(), Ret> {
        self.queues[q].flush(0, ReqFlags::empty());
        ret(&self.wait(q, 1)[0])
    }

    pub fn discard(&mut self, q: usize, off: u64, len: u64) -> Result<(), Ret> {
        self.queues[q].discard(off, len, 0, ReqFlags::empty());
        ret(&self.wait(q, 1)[0])
    }

    pub fn write_zeroes(&mut self, q: usize, off: u64, len: u64, unmap: bool) -> Result<(), Ret> {
        let f = if unmap {
            ReqFlags::empty()
        } else {
            ReqFlags::NO_UNMAP
        };
        self.queues[q].write_zeroes(off, len, 0, f);
        ret(&self.wait(q, 1)[0])
    }
}

fn ret(c: &Completion) -> Result<(), Ret> {
    if c.ret == 0 {
        Ok(())
    } else {
        Err(c.ret)
    }
}
