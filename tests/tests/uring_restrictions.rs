//! io_uring operations run in the kernel without a system call of their
//! own, out of the seccomp filters' sight: the daemons' worker rings are
//! restricted to the operations each worker submits. A ring made by a
//! daemon's own ring constructor runs its listed opcodes, and completes
//! any other (opening a file, a socket, an fsync, another kind of read)
//! with EACCES without doing it; submission flags (but IOSQE_FIXED_FILE
//! on the net ring, whose one fixed file is the TAP queue) and further
//! `io_uring_register` operations are refused too.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use io_uring::{opcode, squeue, types, IoUring};
use rimg_tests::tempdir;
use vmm_sys_util::eventfd::EventFd;

/// Submits `sqe` and returns its completion's result.
///
/// # Safety
/// Every buffer, iovec and string `sqe` points at must stay alive and
/// unaliased until this returns (it waits for the completion).
unsafe fn run(ring: &mut IoUring, sqe: squeue::Entry) -> i32 {
    // SAFETY: the caller keeps what the entry points at alive until the
    // completion, which is waited for below.
    unsafe { ring.submission().push(&sqe) }.expect("queue has room");
    ring.submit_and_wait(1).expect("submit");
    ring.completion().next().expect("a completion").result()
}

/// What no worker ring may do: open a file, make a socket.
fn assert_refuses_open_and_socket(ring: &mut IoUring, what: &str) {
    let d = tempdir();
    let path = CString::new(d.path().join("created").to_str().unwrap()).unwrap();
    let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
        .flags(libc::O_CREAT | libc::O_RDWR)
        .mode(0o600)
        .build();
    // SAFETY: `path` outlives the call.
    assert_eq!(unsafe { run(ring, open) }, -libc::EACCES, "{what}: openat");
    assert!(
        !d.path().join("created").exists(),
        "{what}: the refused openat created the file"
    );
    let sock = opcode::Socket::new(libc::AF_INET, libc::SOCK_STREAM, 0).build();
    // SAFETY: no memory involved.
    assert_eq!(unsafe { run(ring, sock) }, -libc::EACCES, "{what}: socket");
    // No register operation once the ring runs.
    let e = ring.submitter().unregister_eventfd().unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{what}: register");
}

#[test]
fn block_worker_ring_runs_vectored_file_io_only() {
    let d = tempdir();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(d.path().join("img"))
        .unwrap();
    f.write_all_at(&[0x5a; 4096], 0).unwrap();
    let efd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut ring = rimg_vhost_blk::worker::ring(8, &efd).unwrap();
    let fd = types::Fd(f.as_raw_fd());

    // Allowed: readv and writev.
    let mut buf = vec![0u8; 4096];
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    let readv = opcode::Readv::new(fd, iov.as_ptr(), 1).offset(0).build();
    // SAFETY: `iov` and `buf` outlive the call.
    assert_eq!(unsafe { run(&mut ring, readv) }, 4096);
    assert_eq!(buf, vec![0x5a; 4096]);
    let data = vec![0xa5u8; 512];
    let iov = [libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    }];
    let writev = opcode::Writev::new(fd, iov.as_ptr(), 1).offset(512).build();
    // SAFETY: `iov` and `data` outlive the call.
    assert_eq!(unsafe { run(&mut ring, writev) }, 512);
    let mut back = [0u8; 512];
    f.read_exact_at(&mut back, 512).unwrap();
    assert_eq!(back, [0xa5; 512]);
    // The completion eventfd is registered.
    assert!(efd.read().unwrap() >= 2);

    // Refused: a plain read or write, fsync, fallocate, with flags.
    let read = opcode::Read::new(fd, buf.as_mut_ptr(), 4096)
        .offset(0)
        .build();
    // SAFETY: `buf` outlives the call.
    assert_eq!(unsafe { run(&mut ring, read) }, -libc::EACCES, "read");
    let write = opcode::Write::new(fd, data.as_ptr(), 512).offset(0).build();
    // SAFETY: `data` outlives the call.
    assert_eq!(unsafe { run(&mut ring, write) }, -libc::EACCES, "write");
    let fsync = opcode::Fsync::new(fd).build();
    // SAFETY: no memory involved.
    assert_eq!(unsafe { run(&mut ring, fsync) }, -libc::EACCES, "fsync");
    let falloc = opcode::Fallocate::new(fd, 1 << 20).build();
    // SAFETY: no memory involved.
    assert_eq!(
        unsafe { run(&mut ring, falloc) },
        -libc::EACCES,
        "fallocate"
    );
    assert_eq!(f.metadata().unwrap().len(), 4096, "refused fallocate ran");
    let readv = opcode::Readv::new(fd, iov.as_ptr(), 1)
        .offset(0)
        .build()
        .flags(squeue::Flags::ASYNC);
    // SAFETY: `iov` and `data` outlive the call.
    assert_eq!(
        unsafe { run(&mut ring, readv) },
        -libc::EACCES,
        "readv with IOSQE_ASYNC"
    );
    assert_refuses_open_and_socket(&mut ring, "blk");
}

#[test]
fn net_worker_ring_runs_reads_writes_and_cancels_only() {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors we pass.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both are fresh descriptors we own from here on.
    let (rd, wr) = unsafe {
        use std::os::fd::FromRawFd;
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    let efd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    // The pipe's write end stands for the TAP queue, the fixed file.
    let mut ring = rimg_vhost_net::worker::ring(16, &efd, wr.as_raw_fd()).unwrap();

    // Allowed: write, read (as frames cross the TAP), cancel, on the
    // fixed file or not.
    let frame = b"a frame for the TAP";
    let write = opcode::Write::new(rimg_vhost_net::worker::TAP, frame.as_ptr(), 3)
        .offset(u64::MAX)
        .build();
    // SAFETY: `frame` outlives the call.
    assert_eq!(unsafe { run(&mut ring, write) }, 3);
    let write = opcode::Write::new(
        types::Fd(wr.as_raw_fd()),
        frame[3..].as_ptr(),
        frame.len() as u32 - 3,
    )
    .offset(u64::MAX)
    .build();
    // SAFETY: `frame` outlives the call.
    assert_eq!(unsafe { run(&mut ring, write) }, frame.len() as i32 - 3);
    let mut buf = [0u8; 64];
    let read = opcode::Read::new(types::Fd(rd.as_raw_fd()), buf.as_mut_ptr(), 64)
        .offset(u64::MAX)
        .build();
    // SAFETY: `buf` outlives the call.
    assert_eq!(unsafe { run(&mut ring, read) }, frame.len() as i32);
    assert_eq!(&buf[..frame.len()], frame);
    let cancel = opcode::AsyncCancel::new(12345).build();
    // SAFETY: no memory involved. Nothing to cancel: ENOENT, but run.
    assert_eq!(unsafe { run(&mut ring, cancel) }, -libc::ENOENT);

    // Refused: vectored I/O, fsync, with flags.
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    let readv = opcode::Readv::new(types::Fd(rd.as_raw_fd()), iov.as_ptr(), 1).build();
    // SAFETY: `iov` and `buf` outlive the call.
    assert_eq!(unsafe { run(&mut ring, readv) }, -libc::EACCES, "readv");
    let fsync = opcode::Fsync::new(types::Fd(wr.as_raw_fd())).build();
    // SAFETY: no memory involved.
    assert_eq!(unsafe { run(&mut ring, fsync) }, -libc::EACCES, "fsync");
    let write = opcode::Write::new(
        types::Fd(wr.as_raw_fd()),
        frame.as_ptr(),
        frame.len() as u32,
    )
    .offset(u64::MAX)
    .build()
    .flags(squeue::Flags::IO_LINK);
    // SAFETY: `frame` outlives the call.
    assert_eq!(
        unsafe { run(&mut ring, write) },
        -libc::EACCES,
        "write with IOSQE_IO_LINK"
    );
    let write = opcode::Write::new(rimg_vhost_net::worker::TAP, frame.as_ptr(), 3)
        .offset(u64::MAX)
        .build()
        .flags(squeue::Flags::ASYNC);
    // SAFETY: `frame` outlives the call.
    assert_eq!(
        unsafe { run(&mut ring, write) },
        -libc::EACCES,
        "fixed-file write with IOSQE_ASYNC"
    );
    assert_refuses_open_and_socket(&mut ring, "net");
}
