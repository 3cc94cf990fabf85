//! A control-channel relay between a frontend and the vhost-user handler,
//! for one frontend ordering the vhost crate refuses.
//!
//! QEMU's virtio-net (7.2 and later) sends SET_VRING_ENABLE when the guest
//! driver accepts its features, which is before the vhost-user device is
//! started and so before SET_FEATURES. The vhost crate (0.18) requires
//! VHOST_USER_F_PROTOCOL_FEATURES to be acked by SET_FEATURES first and
//! otherwise fails the whole connection. The relay holds such early
//! SET_VRING_ENABLE messages (answering the frontend's reply-ack request
//! itself) and delivers them right after SET_FEATURES, in order, if that
//! acked PROTOCOL_FEATURES. Everything else passes through unchanged,
//! file descriptors included. Only control messages cross the relay; the
//! data path (rings, kicks, calls) never does.
//!
//! The relay also keeps a duplicate of the backend request channel that
//! SET_BACKEND_REQ_FD carries, for the daemon's own messages to the
//! frontend ([`Frontend::config_changed`]).
//!
//! For a device with inflight tracking ([`Inflight`]), the relay answers
//! GET_INFLIGHT_FD and SET_INFLIGHT_FD itself: vhost-user-backend refuses
//! both and ends the connection. Messages are relayed in order, so a
//! region SET before a ring starts is attached when its first kick comes.
//! An invalid SET closes the connection: running untracked would turn
//! the next daemon restart into requests lost without a word.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use log::{debug, warn};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::frontend::Frontend;
use crate::inflight::{Description, Inflight};

const HDR_LEN: usize = 12;
/// Larger payloads than any vhost-user request carries mean a broken or
/// hostile peer: the connection is closed.
const MAX_PAYLOAD: usize = 64 * 1024;
const MAX_FDS: usize = 32;
const REQ_SET_FEATURES: u32 = 2;
const REQ_SET_VRING_ENABLE: u32 = 18;
const REQ_SET_BACKEND_REQ_FD: u32 = 21;
const REQ_GET_INFLIGHT_FD: u32 = 31;
const REQ_SET_INFLIGHT_FD: u32 = 32;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const PROTOCOL_FEATURES: u64 = 1 << 30;

/// Relays between `front` (the frontend) and `back` (the handler's end)
/// until either side closes; then closes both. With `inflight`, the relay
/// serves the inflight messages into it.
pub fn spawn(
    front: UnixStream,
    back: UnixStream,
    frontend: Frontend,
    inflight: Option<Inflight>,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    let front_w = Arc::new(Mutex::new(front.try_clone()?));
    let back_r = back.try_clone()?;
    let f2b = {
        let front_w = front_w.clone();
        std::thread::Builder::new()
            .name("vu-relay-f2b".into())
            .spawn(move || {
                let ends = Ends {
                    back: &back,
                    front_w: &front_w,
                    frontend: &frontend,
                    inflight: inflight.as_ref(),
                };
                if let Err(e) = frontend_to_backend(&front, &ends) {
                    debug!("relay frontend->backend ended: {e}");
                }
                let _ = front.shutdown(std::net::Shutdown::Both);
                let _ = back.shutdown(std::net::Shutdown::Both);
            })?
    };
    let b2f = std::thread::Builder::new()
        .name("vu-relay-b2f".into())
        .spawn(move || {
            if let Err(e) = backend_to_frontend(&back_r, &front_w) {
                debug!("relay backend->frontend ended: {e}");
            }
            let _ = back_r.shutdown(std::net::Shutdown::Both);
            if let Ok(f) = front_w.lock() {
                let _ = f.shutdown(std::net::Shutdown::Both);
            }
        })?;
    Ok(vec![f2b, b2f])
}

/// One message: header, payload and the descriptors that came with it.
struct Msg {
    hdr: [u8; HDR_LEN],
    payload: Vec<u8>,
    fds: Vec<File>,
}

impl Msg {
    fn request(&self) -> u32 {
        u32::from_le_bytes(self.hdr[0..4].try_into().unwrap())
    }

    fn flags(&self) -> u32 {
        u32::from_le_bytes(self.hdr[4..8].try_into().unwrap())
    }

    fn set_flags(&mut self, f: u32) {
        self.hdr[4..8].copy_from_slice(&f.to_le_bytes());
    }

    fn send(&self, to: &UnixStream) -> std::io::Result<()> {
        let fds: Vec<RawFd> = self.fds.iter().map(|f| f.as_raw_fd()).collect();
        let mut buf = Vec::with_capacity(HDR_LEN + self.payload.len());
        buf.extend_from_slice(&self.hdr);
        buf.extend_from_slice(&self.payload);
        let n = to
            .send_with_fds(&[&buf[..]], &fds)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        // The descriptors went with the first bytes; send the rest plainly.
        let mut w = to;
        w.write_all(&buf[n..])
    }
}

fn recv_msg(from: &UnixStream) -> std::io::Result<Option<Msg>> {
    let mut hdr = [0u8; HDR_LEN];
    let mut raw = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: HDR_LEN,
    }];
    // SAFETY: the iovec points at `hdr`, which we own mutably and which
    // outlives the call; arbitrary bytes are valid for it.
    let (n, nfds) = unsafe { from.recv_with_fds(&mut iov, &mut raw) }
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    let fds: Vec<File> = raw[..nfds]
        .iter()
        // SAFETY: recvmsg just gave us these descriptors; we own them and
        // wrap each once.
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    let mut r = from;
    r.read_exact(&mut hdr[n..])?;
    let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
    if size > MAX_PAYLOAD {
        return Err(std::io::Error::other(format!(
            "vhost-user message of {size} bytes"
        )));
    }
    let mut payload = vec![0u8; size];
    r.read_exact(&mut payload)?;
    Ok(Some(Msg { hdr, payload, fds }))
}

/// Where the frontend's messages go.
struct Ends<'a> {
    back: &'a UnixStream,
    front_w: &'a Mutex<UnixStream>,
    frontend: &'a Frontend,
    inflight: Option<&'a Inflight>,
}

/// Sends the relay's own reply to request `req` to the frontend.
fn reply(
    front_w: &Mutex<UnixStream>,
    req: u32,
    payload: &[u8],
    fds: Vec<File>,
) -> std::io::Result<()> {
    let mut hdr = [0u8; HDR_LEN];
    hdr[0..4].copy_from_slice(&req.to_le_bytes());
    hdr[4..8].copy_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
    hdr[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let m = Msg {
        hdr,
        payload: payload.to_vec(),
        fds,
    };
    let f = front_w
        .lock()
        .map_err(|_| std::io::Error::other("poisoned"))?;
    m.send(&f)
}

/// A REPLY_ACK answer (success) to `m`, if it asks for one.
fn ack(front_w: &Mutex<UnixStream>, m: &Msg) -> std::io::Result<()> {
    if m.flags() & FLAG_NEED_REPLY == 0 {
        return Ok(());
    }
    reply(front_w, m.request(), &0u64.to_le_bytes(), Vec::new())
}

fn frontend_to_backend(front: &UnixStream, ends: &Ends) -> std::io::Result<()> {
    let (back, front_w) = (ends.back, ends.front_w);
    let mut features_seen = false;
    let mut held: Vec<Msg> = Vec::new();
    while let Some(mut m) = recv_msg(front)? {
        match m.request() {
            REQ_SET_VRING_ENABLE if !features_seen => {
                debug!("holding SET_VRING_ENABLE sent before SET_FEATURES");
                ack(front_w, &m)?;
                m.set_flags(m.flags() & !FLAG_NEED_REPLY);
                held.push(m);
            }
            REQ_SET_FEATURES => {
                features_seen = true;
                let acked = m
                    .payload
                    .get(..8)
                    .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
                    .unwrap_or(0);
                m.send(back)?;
                if acked & PROTOCOL_FEATURES != 0 {
                    for h in held.drain(..) {
                        h.send(back)?;
                    }
                } else if !held.is_empty() {
                    warn!("frontend enabled rings without acking PROTOCOL_FEATURES");
                    held.clear();
                }
            }
            REQ_SET_BACKEND_REQ_FD => {
                if let [fd] = &m.fds[..] {
                    ends.frontend
                        .set_channel(UnixStream::from(std::os::fd::OwnedFd::from(
                            fd.try_clone()?,
                        )));
                }
                m.send(back)?
            }
            REQ_GET_INFLIGHT_FD if ends.inflight.is_some() => {
                let inflight = ends.inflight.expect("checked");
                let (d, fds) = match inflight.get(&m.payload) {
                    Ok((d, file)) => (d, vec![file]),
                    Err(e) => {
                        // As libvhost-user: a zero size and no descriptor.
                        warn!("GET_INFLIGHT_FD refused: {e}");
                        (
                            Description::decode(&[0; Description::LEN]).expect("zeros"),
                            Vec::new(),
                        )
                    }
                };
                reply(front_w, REQ_GET_INFLIGHT_FD, &d.encode(), fds)?;
            }
            REQ_SET_INFLIGHT_FD if ends.inflight.is_some() => {
                let inflight = ends.inflight.expect("checked");
                if let Err(e) = inflight.set(&m.payload, &m.fds) {
                    warn!("SET_INFLIGHT_FD refused: {e}: closing the connection");
                    return Err(std::io::Error::other(e));
                }
                debug!("inflight region attached");
                ack(front_w, &m)?;
            }
            _ => m.send(back)?,
        }
    }
    Ok(())
}

fn backend_to_frontend(back: &UnixStream, front_w: &Mutex<UnixStream>) -> std::io::Result<()> {
    while let Some(m) = recv_msg(back)? {
        let f = front_w
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        m.send(&f)?;
    }
    Ok(())
}
