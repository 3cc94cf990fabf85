//! A connected NBD socket, UNIX or TCP: the one byte stream type under
//! both ends of the protocol (the engine's client and rimg-nbd's
//! connections), TLS or not above it.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

#[derive(Debug)]
pub enum Socket {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Socket {
    pub fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
        })
    }

    /// Ends both directions; a blocked read or write on a clone returns.
    pub fn shutdown(&self) {
        let _ = match self {
            Socket::Unix(s) => s.shutdown(Shutdown::Both),
            Socket::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Bounds each read and each write (None: no bound).
    pub fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Socket::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
}

impl std::os::fd::AsRawFd for Socket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Socket::Unix(s) => s.as_raw_fd(),
            Socket::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Socket {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.read(b),
            Socket::Tcp(s) => s.read(b),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.write(b),
            Socket::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
