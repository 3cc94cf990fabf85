//! The handshake and the replay against a scripted backend that records
//! each request: the order of the first start and of a replay, the
//! inflight region asked for once and given to every backend, BASE from
//! the guest's used index, and a returning backend that offers less
//! refused.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use vhost::vhost_user::message::VhostUserProtocolFeatures as P;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::*;
use crate::vhost_user::Kind;

const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_QUEUE_NUM: u32 = 17;
const SET_VRING_ENABLE: u32 = 18;
const SET_BACKEND_REQ_FD: u32 = 21;
const GET_CONFIG: u32 = 24;
const GET_INFLIGHT_FD: u32 = 31;
const SET_INFLIGHT_FD: u32 = 32;

const HANDSHAKE: [u32; 7] = [
    SET_OWNER,
    GET_FEATURES,
    GET_PROTOCOL_FEATURES,
    SET_PROTOCOL_FEATURES,
    SET_BACKEND_REQ_FD,
    GET_QUEUE_NUM,
    GET_CONFIG,
];
/// VERSION_1, PROTOCOL_FEATURES and virtio-blk's FLUSH.
const FEATURES: u64 = (1 << 32) | (1 << 30) | (1 << 9);
const INFLIGHT_SIZE: u64 = 4160;

/// One backend's answers: what it offers and its config space's first
/// byte.
#[derive(Clone, Copy)]
struct Script {
    protocol: P,
    config: u8,
}

/// Serves one connection on `listener` as `script` says; each request
/// (code, payload) goes to `log`.
fn serve(listener: UnixListener, script: Script, log: mpsc::Sender<(u32, Vec<u8>)>) {
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut hdr = [0u8; 12];
        while s.read_exact(&mut hdr).is_ok() {
            let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap());
            let (code, size) = (word(0), word(8) as usize);
            let mut body = vec![0u8; size];
            s.read_exact(&mut body).unwrap();
            let u64_reply = |v: u64| v.to_le_bytes().to_vec();
            let reply = match code {
                GET_FEATURES => Some(u64_reply(FEATURES)),
                GET_PROTOCOL_FEATURES => Some(u64_reply(script.protocol.bits())),
                GET_QUEUE_NUM => Some(u64_reply(1)),
                GET_CONFIG => {
                    let mut r = body.clone();
                    r[12] = script.config;
                    Some(r)
                }
                GET_INFLIGHT_FD => {
                    let mut r = body.clone();
                    r[..8].copy_from_slice(&INFLIGHT_SIZE.to_le_bytes());
                    Some(r)
                }
                _ => None,
            };
            log.send((code, body)).unwrap();
            if let Some(r) = reply {
                let mut msg = Vec::new();
                msg.extend_from_slice(&code.to_le_bytes());
                msg.extend_from_slice(&5u32.to_le_bytes());
                msg.extend_from_slice(&(r.len() as u32).to_le_bytes());
                msg.extend_from_slice(&r);
                if code == GET_INFLIGHT_FD {
                    let region = EventFd::new(0).unwrap();
                    s.send_with_fds(&[&msg[..]], &[region.as_raw_fd()]).unwrap();
                } else {
                    s.write_all(&msg).unwrap();
                }
            }
        }
    });
}

struct Bench {
    path: PathBuf,
    log: mpsc::Receiver<(u32, Vec<u8>)>,
    tx: mpsc::Sender<(u32, Vec<u8>)>,
}

impl Bench {
    fn new(name: &str) -> Bench {
        let path = std::env::temp_dir().join(format!("rimg-vmm-{name}-{}", std::process::id()));
        let (tx, log) = mpsc::channel();
        Bench { path, log, tx }
    }

    /// A backend listening at the path, following `script`.
    fn backend(&self, script: Script) {
        let _ = std::fs::remove_file(&self.path);
        serve(
            UnixListener::bind(&self.path).unwrap(),
            script,
            self.tx.clone(),
        );
    }

    /// The requests so far (GET_FEATURES, which has a reply, makes sure
    /// the backend has read all before it; it is not listed).
    fn requests(&self, b: &Backend) -> Vec<(u32, Vec<u8>)> {
        b.fe.get_features().unwrap();
        let mut out: Vec<_> = self.log.try_iter().collect();
        assert_eq!(out.pop().map(|r| r.0), Some(GET_FEATURES));
        out
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn codes(r: &[(u32, Vec<u8>)]) -> Vec<u32> {
    r.iter().map(|r| r.0).collect()
}

fn payload(r: &[(u32, Vec<u8>)], code: u32) -> &[u8] {
    &r.iter().find(|r| r.0 == code).unwrap().1
}

fn start_order(inflight: &[u32]) -> Vec<u32> {
    let mut v = vec![SET_FEATURES];
    v.extend_from_slice(inflight);
    v.extend_from_slice(&[
        SET_MEM_TABLE,
        SET_VRING_NUM,
        SET_VRING_ADDR,
        SET_VRING_BASE,
        SET_VRING_CALL,
        SET_VRING_KICK,
        SET_VRING_ENABLE,
    ]);
    v
}

fn connect(path: &Path) -> UnixStream {
    UnixStream::connect(path).unwrap()
}

#[test]
fn first_start_and_replay_share_one_order_and_one_inflight_region() {
    let bench = Bench::new("replay");
    let all = P::MQ | P::CONFIG | P::BACKEND_REQ | P::INFLIGHT_SHMFD;
    bench.backend(Script {
        protocol: all,
        config: 1,
    });
    let mut b = Backend::connect(Kind::Block, &bench.path, 0).unwrap();
    assert!(b.tracks_inflight());
    assert_eq!(codes(&bench.requests(&b)), HANDSHAKE);

    // Guest memory with one ring of 8 whose used index is 7.
    let mem = Mem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let r = mem.iter().next().unwrap();
    let host = r.get_host_address(MemoryRegionAddress(0)).unwrap() as u64;
    let regions = [Region {
        guest: 0,
        size: 0x10000,
        host,
        offset: 0,
    }];
    let ring = RingAddrs {
        size: 8,
        desc: 0x1000,
        avail: 0x2000,
        used: 0x3000,
    };
    mem.write_obj(7u16.to_le(), GuestAddress(0x3002)).unwrap();
    let kicks = [EventFd::new(0).unwrap()];
    let call = EventFd::new(0).unwrap();
    let rings = [(0, ring)];
    let desired = |base| Desired {
        driver_features: FEATURES,
        regions: &regions,
        memfd: call.as_raw_fd(),
        mem: &mem,
        rings: &rings,
        enabled: &[0usize],
        kicks: &kicks,
        call: &call,
        base,
    };
    let base = |r: &[(u32, Vec<u8>)]| payload(r, SET_VRING_BASE)[4];

    b.apply(&desired(Base::Zero)).unwrap();
    let first = bench.requests(&b);
    assert_eq!(
        codes(&first),
        start_order(&[GET_INFLIGHT_FD, SET_INFLIGHT_FD])
    );
    // GET_INFLIGHT_FD asks for every queue at the largest ring size.
    let get = payload(&first, GET_INFLIGHT_FD);
    assert_eq!(get[16..20], [1, 0, 0, 1], "{get:?}");
    assert_eq!(
        payload(&first, SET_INFLIGHT_FD)[..8],
        INFLIGHT_SIZE.to_le_bytes()
    );
    assert_eq!(base(&first), 0);

    // A new backend, with a new config space: the same handshake, then
    // the replay with the kept region and the guest's used index.
    bench.backend(Script {
        protocol: all,
        config: 2,
    });
    assert!(b.reconnect(connect(&bench.path)).unwrap());
    assert_eq!(codes(&bench.requests(&b)), HANDSHAKE);
    assert_eq!(b.config[0], 2);
    b.apply(&desired(Base::GuestUsed)).unwrap();
    let replay = bench.requests(&b);
    assert_eq!(codes(&replay), start_order(&[SET_INFLIGHT_FD]));
    assert_eq!(
        payload(&replay, SET_INFLIGHT_FD)[..8],
        INFLIGHT_SIZE.to_le_bytes()
    );
    assert_eq!(base(&replay), 7);

    // After a device reset the next start asks for a new region.
    b.drop_inflight();
    b.apply(&desired(Base::Zero)).unwrap();
    assert_eq!(
        codes(&bench.requests(&b)),
        start_order(&[GET_INFLIGHT_FD, SET_INFLIGHT_FD])
    );

    // A backend that comes back without INFLIGHT_SHMFD is refused (not
    // taken for a lost connection: the device fails).
    bench.backend(Script {
        protocol: all - P::INFLIGHT_SHMFD,
        config: 2,
    });
    let e = b.reconnect(connect(&bench.path)).unwrap_err();
    assert!(!e.backend_lost(), "{e}");
    assert!(e.to_string().contains("no longer offers protocol"), "{e}");
}

#[test]
fn net_and_backends_without_the_feature_keep_no_region() {
    let bench = Bench::new("noinflight");
    bench.backend(Script {
        protocol: P::MQ | P::CONFIG | P::INFLIGHT_SHMFD,
        config: 0,
    });
    let b = Backend::connect(Kind::Net, &bench.path, 0).unwrap();
    assert!(!b.tracks_inflight());
    // No BACKEND_REQ offered: no channel.
    let mut h = HANDSHAKE.to_vec();
    h.retain(|&c| c != SET_BACKEND_REQ_FD);
    assert_eq!(codes(&bench.requests(&b)), h);
}
