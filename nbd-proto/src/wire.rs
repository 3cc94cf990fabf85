//! Reading big-endian fields out of a received buffer, each read checked
//! against what is left: a short or hostile message is an error, never a
//! panic or an allocation sized by the peer.

/// A message did not have the shape the protocol gives it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("message ends {need} bytes early")]
    Short { need: usize },
    #[error("{what}: bad magic {got:#x}")]
    Magic { what: &'static str, got: u64 },
    #[error("{0} is longer than the protocol's 4096-byte limit")]
    TooLong(&'static str),
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
    #[error("{0} bytes are left over at the end of the message")]
    Trailing(usize),
    #[error("{0}")]
    Invalid(&'static str),
}

/// A read position in a received message.
#[derive(Debug, Clone)]
pub struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Cursor<'a> {
        Cursor { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if n > self.buf.len() {
            return Err(WireError::Short {
                need: n - self.buf.len(),
            });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        Ok(self.bytes(N)?.try_into().expect("split at N"))
    }

    pub fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A string of `len` bytes: UTF-8, at most [`crate::MAX_STRING`].
    pub fn string(&mut self, len: usize, what: &'static str) -> Result<String, WireError> {
        if len > crate::MAX_STRING {
            return Err(WireError::TooLong(what));
        }
        let b = self.bytes(len)?;
        String::from_utf8(b.to_vec()).map_err(|_| WireError::NotUtf8(what))
    }

    /// A string prefixed by its 32-bit length.
    pub fn string32(&mut self, what: &'static str) -> Result<String, WireError> {
        let len = self.u32()? as usize;
        self.string(len, what)
    }

    /// The message must end here.
    pub fn finish(&self) -> Result<(), WireError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(WireError::Trailing(n)),
        }
    }
}

/// Appends big-endian fields to a message being built.
pub(crate) trait Put {
    fn put16(&mut self, v: u16);
    fn put32(&mut self, v: u32);
    fn put64(&mut self, v: u64);
}

impl Put for Vec<u8> {
    fn put16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_reads_are_errors() {
        let mut c = Cursor::new(&[0, 1, 2]);
        assert_eq!(c.u16(), Ok(1));
        assert_eq!(c.u32(), Err(WireError::Short { need: 3 }));
        assert_eq!(c.remaining(), 1);
    }

    #[test]
    fn strings_are_bounded_and_utf8() {
        let mut big = vec![0, 0, 0x10, 0x01];
        big.resize(4 + 4097, b'a');
        assert_eq!(
            Cursor::new(&big).string32("name"),
            Err(WireError::TooLong("name"))
        );
        let bad = [0, 0, 0, 1, 0xff];
        assert_eq!(
            Cursor::new(&bad).string32("name"),
            Err(WireError::NotUtf8("name"))
        );
        // A length past the message's end is short, not an allocation.
        let lie = [0, 0, 0x0f, 0xff, b'a'];
        assert!(matches!(
            Cursor::new(&lie).string32("name"),
            Err(WireError::Short { .. })
        ));
    }
}
