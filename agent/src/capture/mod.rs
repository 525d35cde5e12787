//! Evidence capture on detection (issue 4): freeze, core file, context,
//! manifest, bundle.

pub mod core;
pub mod freeze;
mod procutil;
#[cfg(test)]
mod testutil;

use std::io::{self, Write};

use sha2::{Digest, Sha256};

/// A writer that hashes (sha256) and counts what goes through it.
pub(crate) struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W> HashingWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// (hex sha256, bytes written, the inner writer).
    pub(crate) fn finish(self) -> (String, u64, W) {
        (hex::encode(self.hasher.finalize()), self.len, self.inner)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
