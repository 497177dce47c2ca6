//! The on-disk format shared by every index structure, and atomic writes.
//!
//! A file is a 32-byte header followed by a payload, all little-endian:
//!
//! | bytes | field |
//! | --- | --- |
//! | 8 | magic: which structure (`FRAGFLAT`, `FRAGHNSW`, `FRAGBM25`) |
//! | 4 | format version |
//! | 4 | reserved, zero |
//! | 8 | payload length in bytes |
//! | 8 | FNV-1a 64 checksum of the payload |
//!
//! Loading checks the length against the file's size before reading anything, then the
//! checksum, and every count inside the payload against the bytes that remain before
//! allocating for it: a truncated or corrupted file is an [`Error::Corrupt`], never a
//! panic or a huge allocation.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

const HEADER_LEN: usize = 32;

/// FNV-1a, 64-bit.
fn checksum(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Builds a payload.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn new() -> Self {
        Writer::default()
    }
    pub(crate) fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn f32(&mut self, v: f32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn f64(&mut self, v: f64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn len(&mut self, n: usize) {
        self.u64(n as u64);
    }
    pub(crate) fn f32s(&mut self, v: &[f32]) {
        self.len(v.len());
        self.buf.reserve(v.len() * 4);
        for x in v {
            self.f32(*x);
        }
    }
    pub(crate) fn u32s(&mut self, v: &[u32]) {
        self.len(v.len());
        self.buf.reserve(v.len() * 4);
        for x in v {
            self.u32(*x);
        }
    }
    pub(crate) fn bytes(&mut self, v: &[u8]) {
        self.len(v.len());
        self.buf.extend_from_slice(v);
    }
    pub(crate) fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
}

/// Reads a payload, checking every length against what remains.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], path: &'a Path) -> Self {
        Reader { buf, pos: 0, path }
    }

    pub(crate) fn corrupt(&self, reason: impl Into<String>) -> Error {
        Error::Corrupt { path: self.path.to_path_buf(), reason: reason.into() }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.corrupt(format!("needs {n} more bytes at offset {} but the payload ends at {}", self.pos, self.buf.len()))),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }
    pub(crate) fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub(crate) fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_le_bytes(self.array()?))
    }

    /// A count of items of `item_size` bytes each, refused if that many cannot fit in what
    /// remains (so the caller may allocate for it).
    pub(crate) fn len(&mut self, item_size: usize) -> Result<usize> {
        let n = self.u64()?;
        let remaining = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(item_size.max(1) as u64) > remaining {
            return Err(self.corrupt(format!("a count of {n} items does not fit in the {remaining} bytes left")));
        }
        usize::try_from(n).map_err(|_| self.corrupt("count too large"))
    }

    pub(crate) fn usize(&mut self) -> Result<usize> {
        let n = self.u64()?;
        usize::try_from(n).map_err(|_| self.corrupt("value too large"))
    }

    pub(crate) fn f32s(&mut self) -> Result<Vec<f32>> {
        let n = self.len(4)?;
        let raw = self.take(n * 4)?;
        Ok(raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
    pub(crate) fn u32s(&mut self) -> Result<Vec<u32>> {
        let n = self.len(4)?;
        let raw = self.take(n * 4)?;
        Ok(raw.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
    pub(crate) fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.len(1)?;
        self.take(n)
    }
    pub(crate) fn string(&mut self) -> Result<String> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| self.corrupt("a string is not UTF-8"))
    }

    /// Fails unless every byte was read.
    pub(crate) fn finish(&self) -> Result<()> {
        if self.pos != self.buf.len() {
            return Err(self.corrupt(format!("{} unexpected bytes after the data", self.buf.len() - self.pos)));
        }
        Ok(())
    }
}

/// Writes `payload` under a header to `dir/name` atomically: a temporary file in the same
/// folder, flushed to disk, then renamed over the target (and the folder synced).
pub(crate) fn save(dir: &Path, name: &str, magic: &[u8; 8], version: u32, payload: Writer) -> Result<PathBuf> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let payload = payload.buf;
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(magic);
    header.extend_from_slice(&version.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    header.extend_from_slice(&checksum(&payload).to_le_bytes());
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&header)?;
        f.write_all(&payload)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &path)?;
        // Make the rename itself durable; not every platform can open a folder.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(&path, e)
    })?;
    Ok(path)
}

/// Reads `path`, checks its header (magic, version, length, checksum) and returns the payload.
pub(crate) fn load(path: &Path, magic: &[u8; 8], version: u32) -> Result<Vec<u8>> {
    let corrupt = |reason: String| Error::Corrupt { path: path.to_path_buf(), reason };
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if file_len < HEADER_LEN as u64 {
        return Err(corrupt(format!("{file_len} bytes is shorter than the {HEADER_LEN}-byte header (truncated?)")));
    }
    let mut header = [0u8; HEADER_LEN];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    if &header[..8] != magic {
        return Err(corrupt(format!("wrong magic bytes (expected {:?})", String::from_utf8_lossy(magic))));
    }
    let mut word = [0u8; 4];
    word.copy_from_slice(&header[8..12]);
    let got_version = u32::from_le_bytes(word);
    if got_version != version {
        return Err(corrupt(format!("format version {got_version}, this build reads version {version}")));
    }
    let mut long = [0u8; 8];
    long.copy_from_slice(&header[16..24]);
    let payload_len = u64::from_le_bytes(long);
    long.copy_from_slice(&header[24..32]);
    let expected_sum = u64::from_le_bytes(long);
    let actual = file_len - HEADER_LEN as u64;
    if payload_len != actual {
        return Err(corrupt(format!("the header announces {payload_len} bytes of data but the file holds {actual} (truncated?)")));
    }
    let len = usize::try_from(payload_len).map_err(|_| corrupt("file too large for this machine".into()))?;
    let mut payload = vec![0u8; len];
    f.read_exact(&mut payload).map_err(|e| Error::io(path, e))?;
    if checksum(&payload) != expected_sum {
        return Err(corrupt("checksum mismatch (the file is corrupted)".into()));
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_damage() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::new();
        w.u32(7);
        w.f32s(&[1.0, 2.5]);
        w.str("héllo");
        let path = save(dir.path(), "x.bin", b"FRAGTEST", 1, w).unwrap();
        let payload = load(&path, b"FRAGTEST", 1).unwrap();
        let mut r = Reader::new(&payload, &path);
        assert_eq!(r.u32().unwrap(), 7);
        assert_eq!(r.f32s().unwrap(), vec![1.0, 2.5]);
        assert_eq!(r.string().unwrap(), "héllo");
        r.finish().unwrap();

        assert!(matches!(load(&path, b"FRAGXXXX", 1), Err(Error::Corrupt { .. })));
        assert!(matches!(load(&path, b"FRAGTEST", 2), Err(Error::Corrupt { .. })));
        let bytes = fs::read(&path).unwrap();
        for cut in [0, 5, 31, 32, bytes.len() - 1] {
            fs::write(&path, &bytes[..cut]).unwrap();
            assert!(matches!(load(&path, b"FRAGTEST", 1), Err(Error::Corrupt { .. })), "cut at {cut}");
        }
        let mut flipped = bytes.clone();
        flipped[40] ^= 0x10;
        fs::write(&path, &flipped).unwrap();
        assert!(matches!(load(&path, b"FRAGTEST", 1), Err(Error::Corrupt { .. })));
        assert!(!dir.path().join(".x.bin.tmp").exists());
    }

    #[test]
    fn a_huge_count_is_refused_before_allocating() {
        let mut w = Writer::new();
        w.u64(u64::MAX / 2);
        let p = Path::new("mem");
        let mut r = Reader::new(&w.buf, p);
        assert!(matches!(r.f32s(), Err(Error::Corrupt { .. })));
    }
}
