//! Guest reads: mapping a guest range to host clusters, unallocated and
//! compressed clusters, backing files, encrypted data.

use super::*;

impl Qcow2 {
    /// Maps the run of guest bytes starting at `off` (at most `len`) that
    /// share one kind of mapping in this layer.
    pub(super) fn map_run(
        &self,
        m: &mut Meta,
        off: GuestOffset,
        len: u64,
    ) -> Result<(Mapping, u64)> {
        if self.extl2 {
            return self.map_run_ext(m, off, len);
        }
        let cs = self.cluster_size();
        let cb = self.cluster_bits;
        let l2n = 1u64 << self.l2_bits();
        let gc = off.cluster(cb);
        let in_cl = off.in_cluster(cb);
        let l1i = gc.l1_index(self.l2_bits());
        let l2i = gc.l2_index(self.l2_bits()) as u64;
        // Clusters this request may span within the current L2 table.
        let want = (in_cl + len).div_ceil(cs).min(l2n - l2i);
        let Some(slot) = self.l2_for(m, l1i)? else {
            return Ok((Mapping::Unallocated, (want * cs - in_cl).min(len)));
        };
        let first = self.decode(Self::l2_get(m, slot, l2i as usize))?;
        // A bad entry further on ends the run instead of failing it: it
        // fails only the request that starts on it. (Failing the run
        // would make a caller stepping past the error rescan the same
        // entries for every cluster before it: quadratic on a corrupt
        // table.)
        let entry = |m: &Meta, n: u64| self.decode(Self::l2_get(m, slot, (l2i + n) as usize)).ok();
        let mut n = 1;
        let run = match first {
            L2Entry::Normal { host, .. } => {
                while n < want {
                    match entry(m, n) {
                        Some(L2Entry::Normal { host: h, .. }) if h == host + n * cs => n += 1,
                        _ => break,
                    }
                }
                Mapping::Data(HostOffset(host) + in_cl)
            }
            L2Entry::Zero { host, .. } => {
                // A run is either all plain zero clusters or preallocated
                // ones at contiguous host offsets, as QEMU counts them
                // (so that block status and `map` report the same runs).
                while n < want {
                    match entry(m, n) {
                        Some(L2Entry::Zero { host: h, .. })
                            if h == host.map(|first| first + n * cs) =>
                        {
                            n += 1
                        }
                        _ => break,
                    }
                }
                Mapping::Zero(host.map(|h| HostOffset(h) + in_cl))
            }
            L2Entry::Unallocated => {
                while n < want {
                    match entry(m, n) {
                        Some(L2Entry::Unallocated) => n += 1,
                        _ => break,
                    }
                }
                Mapping::Unallocated
            }
            c @ L2Entry::Compressed { .. } => Mapping::Compressed(c),
        };
        Ok((run, (n * cs - in_cl).min(len)))
    }

    // ----- reads -----

    pub(super) fn read_unallocated(&self, buf: &mut [u8], off: u64) -> Result<()> {
        match &self.backing {
            Some(b) => read_backing(b.as_ref(), buf, off),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Decompresses the cluster described by `e` and hands it to `f`.
    pub(super) fn with_decompressed<R>(&self, e: L2Entry, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        let L2Entry::Compressed { offset, len, .. } = e else {
            unreachable!("with_decompressed takes compressed entries")
        };
        if self.data.is_some() {
            return Err(Error::Corrupt(
                "compressed cluster entry found in an image with an external data file".into(),
            ));
        }
        DECOMP.with(|d| {
            let (input, out) = &mut *d.borrow_mut();
            input.resize(len as usize, 0);
            out.resize(self.cluster_size() as usize, 0);
            self.st.read_at(input, offset)?;
            compress::decompress(self.compression, input, out)
                .map_err(|reason| Error::Decompress { offset, reason })?;
            Ok(f(out))
        })
    }

    /// Reads guest data into `buf` from guest offset `off` (which must lie
    /// within the image).
    pub(super) fn read_inner(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let (run, n) = {
                let mut m = self.lock();
                self.map_run(&mut m, GuestOffset(pos), (buf.len() - done) as u64)?
            };
            self.read_run(run, &mut buf[done..done + n as usize], pos)?;
            done += n as usize;
        }
        Ok(())
    }

    /// [`Image::map_read`]: encrypted images refuse (their host bytes are
    /// not the guest's).
    pub(super) fn map_for_read(&self, off: u64, len: u64) -> Result<(Mapping, u64)> {
        self.check_clear()?;
        self.check_range(off, len)?;
        let mut m = self.lock();
        self.map_run(&mut m, GuestOffset(off), len)
    }

    /// Reads guest bytes at `off` that [`map_run`](Self::map_run) mapped
    /// as `mapping` (any kind).
    pub(super) fn read_run(&self, mapping: Mapping, buf: &mut [u8], off: u64) -> Result<()> {
        match mapping {
            Mapping::Data(host) if self.crypt_method != 0 => {
                self.st.debug_event("read_aio");
                self.read_encrypted(buf, host, GuestOffset(off))
            }
            Mapping::Data(host) => {
                self.st.debug_event("read_aio");
                self.data_storage().read_at(buf, host.0)
            }
            Mapping::Zero(_) => {
                buf.fill(0);
                Ok(())
            }
            Mapping::Unallocated => self.read_unallocated(buf, off),
            Mapping::Compressed(e) => {
                let in_cl = (off & (self.cluster_size() - 1)) as usize;
                self.with_decompressed(e, |c| buf.copy_from_slice(&c[in_cl..in_cl + buf.len()]))
            }
        }
    }

    /// Reads and decrypts data at `host` (guest offset `off`), whole
    /// 512-byte sectors around it.
    pub(super) fn read_encrypted(
        &self,
        buf: &mut [u8],
        host: HostOffset,
        off: GuestOffset,
    ) -> Result<()> {
        let c = self.data_cipher()?;
        let skip = host.0 % crate::crypto::SECTOR;
        let len = (skip + buf.len() as u64).next_multiple_of(crate::crypto::SECTOR);
        let mut tmp = vec![0u8; len as usize];
        let (host, off) = (HostOffset(host.0 - skip), GuestOffset(off.0 - skip));
        self.data_storage().read_at(&mut tmp, host.0)?;
        c.decrypt(host, off, &mut tmp);
        buf.copy_from_slice(&tmp[skip as usize..skip as usize + buf.len()]);
        Ok(())
    }

    /// The cipher of an encrypted image opened with its key.
    pub(super) fn data_cipher(&self) -> Result<&crate::encrypt::DataCipher> {
        self.cipher.as_ref().ok_or_else(|| {
            Error::Crypto("Parameter 'encrypt.key-secret' is required for cipher".into())
        })
    }
}

/// Reads from a backing image; bytes past its end read as zeros.
pub(super) fn read_backing(b: &dyn Image, buf: &mut [u8], off: u64) -> Result<()> {
    let bsize = b.size();
    if off >= bsize {
        buf.fill(0);
        return Ok(());
    }
    let n = ((bsize - off) as usize).min(buf.len());
    b.read_at(&mut buf[..n], off)?;
    buf[n..].fill(0);
    Ok(())
}
