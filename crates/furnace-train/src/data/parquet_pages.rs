//! A check of every page header of a Parquet file against the bytes that exist, before the
//! `parquet` crate's row reader reads them.
//!
//! The row reader trusts page headers: it allocates a page's declared uncompressed size
//! before decompressing (`Vec::with_capacity`), and a dictionary page's declared value
//! count before decoding it (`resize`). A crafted file of 1 KiB made it allocate 1.4 GiB
//! at once (found by furnace-fuzz). The crate's page header type is private and
//! `PageReader::peek_next_page` tells neither size, so the headers are read here with a
//! small Thrift compact-protocol reader (header only: no page body is read or
//! decompressed) along the same walk the reader makes: from the chunk's first page
//! (dictionary page offset, else data page offset) over its `total_compressed_size` bytes.

use parquet::basic::{Compression, Type as PhysicalType};
use parquet::file::metadata::{ColumnChunkMetaData, ParquetMetaData};

/// The largest uncompressed page accepted, whatever the codec. Writers flush a page at
/// about 1 MiB (pyarrow, parquet-mr, arrow-rs); a page grows past that only by its last
/// batch of values (pyarrow checks the size every 1,024 values), so 512 MiB is 1,024 rows
/// of 512 KiB of text each, far past any training example, while it stops the
/// allocations of up to 2 GiB a header may declare.
pub(crate) const MAX_PAGE_BYTES: u64 = 512 << 20;

/// Slack added to the codec's bound: every page up to this size passes whatever its ratio.
const PAGE_SLACK_BYTES: u64 = 1 << 20;

/// The most bytes a codec can produce from one compressed byte (rounded up from the
/// format's limit, measured with pyarrow 26 on 16 MiB of zeros: snappy 21.3, gzip 1,028,
/// lz4 243, zstd 31,596). A header declaring more cannot be a real page.
fn max_ratio(c: Compression) -> u64 {
    match c {
        Compression::UNCOMPRESSED => 1,
        // A 3-byte copy element yields at most 64 bytes.
        Compression::SNAPPY => 22,
        // Deflate's limit is 1,032:1 (a 258-byte match in about 2 bits).
        Compression::GZIP(_) => 1_032,
        // One byte of match length extension yields 255 bytes.
        Compression::LZ4 | Compression::LZ4_RAW | Compression::LZO => 256,
        // An RLE block: 128 KiB from a 3-byte block header and 1 byte.
        Compression::ZSTD(_) => 32_768,
        // Not built in (rejected above); bounded by MAX_PAGE_BYTES only.
        Compression::BROTLI(_) => MAX_PAGE_BYTES,
    }
}

/// The fewest bits one value takes in a PLAIN-encoded dictionary page.
fn min_plain_bits(t: PhysicalType, type_length: i32) -> u64 {
    match t {
        PhysicalType::BOOLEAN => 1,
        PhysicalType::INT32 | PhysicalType::FLOAT => 32,
        PhysicalType::INT64 | PhysicalType::DOUBLE => 64,
        PhysicalType::INT96 => 96,
        // A 4-byte length, then the bytes.
        PhysicalType::BYTE_ARRAY => 32,
        PhysicalType::FIXED_LEN_BYTE_ARRAY => 8 * u64::try_from(type_length.max(1)).unwrap_or(1),
    }
}

/// A byte count for messages: "1.4 GiB", "2 KiB", "17 bytes".
fn size(n: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (unit, name) in UNITS {
        if n >= unit {
            let v = n as f64 / unit as f64;
            return if v < 10.0 { format!("{v:.1} {name}") } else { format!("{v:.0} {name}") };
        }
    }
    format!("{n} bytes")
}

/// Checks every page header of every column chunk; the error is a message naming the row
/// group, column and page.
pub(crate) fn check_page_headers(meta: &ParquetMetaData, file: &[u8]) -> Result<(), String> {
    for (g, group) in meta.row_groups().iter().enumerate() {
        let rows = u64::try_from(group.num_rows()).unwrap_or(0);
        for col in group.columns() {
            // Not built in: the row reader would fail on every row (and be reported as
            // more rows than declared), so say what is wrong instead.
            let unread = match col.compression() {
                Compression::BROTLI(_) => Some("brotli"),
                Compression::LZO => Some("LZO"),
                _ => None,
            };
            if let Some(codec) = unread {
                return Err(format!(
                    "column '{}' is compressed with {codec}, which furnace does not read (write it with snappy, gzip, lz4 or zstd)",
                    col.column_path().string()
                ));
            }
            check_chunk(col, rows, file)
                .map_err(|m| format!("row group {g}, column '{}'{m}; not a valid Parquet file", col.column_path().string()))?;
        }
    }
    Ok(())
}

/// What the reader uses of one page header.
#[derive(Debug, Default)]
struct PageHeader {
    page_type: Option<i32>,
    uncompressed: Option<i32>,
    compressed: Option<i32>,
    /// `num_values` of the data (v1 or v2) or dictionary page header.
    num_values: Option<i32>,
}

const DATA_PAGE: i32 = 0;
const INDEX_PAGE: i32 = 1;
const DICTIONARY_PAGE: i32 = 2;
const DATA_PAGE_V2: i32 = 3;

fn check_chunk(col: &ColumnChunkMetaData, rows: u64, file: &[u8]) -> Result<(), String> {
    let start = col.dictionary_page_offset().unwrap_or_else(|| col.data_page_offset());
    let (start, len) = match (u64::try_from(start), u64::try_from(col.compressed_size())) {
        (Ok(s), Ok(l)) => (s, l),
        _ => return Err(format!(": the chunk has a negative offset ({start}) or size ({})", col.compressed_size())),
    };
    let end = start
        .checked_add(len)
        .filter(|&e| e <= file.len() as u64)
        .ok_or_else(|| format!(": the chunk spans bytes {start}..{} of a {}-byte file", start.saturating_add(len), file.len()))?;
    let chunk = &file[start as usize..end as usize];
    let ratio = max_ratio(col.compression());
    let descr = col.column_descr();
    let repeated = descr.max_rep_level() > 0;
    let min_bits = min_plain_bits(col.column_type(), descr.type_length());
    let chunk_values = u64::try_from(col.num_values()).map_err(|_| format!(" declares {} values", col.num_values()))?;
    if !repeated && chunk_values > rows {
        return Err(format!(" declares {chunk_values} values in a row group of {rows} rows"));
    }
    let (mut pos, mut page, mut data_values) = (0usize, 0usize, 0u64);
    while pos < chunk.len() {
        page += 1;
        let mut cur = Cursor { b: &chunk[pos..], pos: 0 };
        let h = read_page_header(&mut cur).ok_or_else(|| format!(", page {page}: the page header is malformed or runs past the chunk"))?;
        let (Some(kind), Some(uncompressed), Some(compressed)) = (h.page_type, h.uncompressed, h.compressed) else {
            return Err(format!(", page {page}: the page header lacks its type or sizes"));
        };
        let what = match kind {
            DICTIONARY_PAGE => format!(", page {page} (dictionary)"),
            _ => format!(", page {page}"),
        };
        let (Ok(compressed), Ok(uncompressed)) = (u64::try_from(compressed), u64::try_from(uncompressed)) else {
            return Err(format!("{what} declares a negative size ({compressed} compressed, {uncompressed} uncompressed)"));
        };
        let left = (chunk.len() - pos - cur.pos) as u64;
        if compressed > left {
            return Err(format!("{what} declares {} compressed, past the {} left in its column chunk", size(compressed), size(left)));
        }
        let bound = compressed.saturating_mul(ratio).saturating_add(PAGE_SLACK_BYTES).min(MAX_PAGE_BYTES);
        if uncompressed > bound {
            return Err(format!("{what} declares {} uncompressed from {}", size(uncompressed), size(compressed)));
        }
        let values = match h.num_values.map(u64::try_from) {
            Some(Ok(v)) => v,
            Some(Err(_)) => return Err(format!("{what} declares {} values", h.num_values.unwrap_or(0))),
            None if kind == INDEX_PAGE => 0,
            None => return Err(format!("{what}: the page header lacks its value count")),
        };
        match kind {
            DICTIONARY_PAGE => {
                // The reader sizes the dictionary by this count before decoding it.
                let readable = if ratio == 1 { compressed.min(uncompressed) } else { uncompressed };
                if values.saturating_mul(min_bits) > readable.saturating_mul(8) {
                    return Err(format!("{what} declares {values} values in {}", size(readable)));
                }
            }
            DATA_PAGE | DATA_PAGE_V2 => {
                data_values = data_values.saturating_add(values);
                if data_values > chunk_values {
                    return Err(format!("{what}: its pages declare more values than the {chunk_values} of the chunk"));
                }
            }
            _ => {}
        }
        pos += cur.pos + compressed as usize;
    }
    Ok(())
}

/// A Thrift compact-protocol reader over a byte slice; `None` when the bytes run out or
/// are malformed.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

/// Nesting deeper than this is malformed for a page header (its deepest part, the
/// statistics inside a data page header, is 3 levels down).
const MAX_DEPTH: u32 = 16;

impl Cursor<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.b.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    fn skip_bytes(&mut self, n: u64) -> Option<()> {
        let n = usize::try_from(n).ok()?;
        if n > self.b.len() - self.pos {
            return None;
        }
        self.pos += n;
        Some(())
    }

    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..70).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f).checked_shl(shift)?;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    fn zigzag(&mut self) -> Option<i64> {
        let v = self.varint()?;
        Some((v >> 1) as i64 ^ -((v & 1) as i64))
    }

    /// An i32, truncated from the 64-bit varint as the parquet crate reads it (so that a
    /// size the reader would take as 1.4 GiB is reported as such).
    fn i32(&mut self) -> Option<i32> {
        Some(self.zigzag()? as i32)
    }

    /// The next field's id and type, or `None` inside the `Some` at the struct's end.
    fn field(&mut self, last: &mut i16) -> Option<Option<(i16, u8)>> {
        let b = self.byte()?;
        if b == 0 {
            return Some(None);
        }
        let (delta, ty) = (b >> 4, b & 0x0f);
        // Truncated as the parquet crate reads it.
        let id = if delta == 0 { self.zigzag()? as i16 } else { last.wrapping_add(i16::from(delta)) };
        *last = id;
        Some(Some((id, ty)))
    }

    /// Skips a value of compact type `ty`; `in_list` for a list element (a boolean is
    /// then a byte of its own, not part of the field header).
    fn skip(&mut self, ty: u8, in_list: bool, depth: u32) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match ty {
            1 | 2 if !in_list => Some(()),
            1..=3 => self.skip_bytes(1),
            4..=6 => self.varint().map(drop),
            7 => self.skip_bytes(8),
            8 => {
                let n = self.varint()?;
                self.skip_bytes(n)
            }
            9 | 10 => {
                let h = self.byte()?;
                let n = if h >> 4 == 15 { self.varint()? } else { u64::from(h >> 4) };
                for _ in 0..n {
                    self.skip(h & 0x0f, true, depth + 1)?;
                }
                Some(())
            }
            11 => {
                let n = self.varint()?;
                if n > 0 {
                    let kv = self.byte()?;
                    for _ in 0..n {
                        self.skip(kv >> 4, true, depth + 1)?;
                        self.skip(kv & 0x0f, true, depth + 1)?;
                    }
                }
                Some(())
            }
            // A UUID.
            13 => self.skip_bytes(16),
            12 => {
                let mut last = 0;
                while let Some((_, t)) = self.field(&mut last)? {
                    self.skip(t, false, depth + 1)?;
                }
                Some(())
            }
            _ => None,
        }
    }
}

/// Compact type of an i32 field.
const I32: u8 = 5;
/// Compact type of a struct field.
const STRUCT: u8 = 12;

fn read_page_header(c: &mut Cursor) -> Option<PageHeader> {
    let mut h = PageHeader::default();
    let mut last = 0;
    while let Some((id, ty)) = c.field(&mut last)? {
        match (id, ty) {
            (1, I32) => h.page_type = Some(c.i32()?),
            (2, I32) => h.uncompressed = Some(c.i32()?),
            (3, I32) => h.compressed = Some(c.i32()?),
            // data_page_header, dictionary_page_header, data_page_header_v2: each starts
            // with num_values (field 1).
            (5 | 7 | 8, STRUCT) => {
                let mut last = 0;
                while let Some((id, ty)) = c.field(&mut last)? {
                    match (id, ty) {
                        (1, I32) => h.num_values = Some(c.i32()?),
                        _ => c.skip(ty, false, 2)?,
                    }
                }
            }
            (1..=3, _) => return None,
            _ => c.skip(ty, false, 1)?,
        }
    }
    Some(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_well() {
        assert_eq!(size(17), "17 bytes");
        assert_eq!(size(2048), "2.0 KiB");
        assert_eq!(size(1_476_395_008), "1.4 GiB");
    }

    #[test]
    fn a_page_header_is_read() {
        // type 0, uncompressed 100, compressed 40, data_page_header { num_values 7, encoding 0,
        // def 3, rep 3 }.
        let b = [0x15, 0x00, 0x15, 0xc8, 0x01, 0x15, 0x50, 0x2c, 0x15, 0x0e, 0x15, 0x00, 0x15, 0x06, 0x15, 0x06, 0x00, 0x00];
        let mut c = Cursor { b: &b, pos: 0 };
        let h = read_page_header(&mut c).unwrap();
        assert_eq!((h.page_type, h.uncompressed, h.compressed, h.num_values), (Some(0), Some(100), Some(40), Some(7)));
        assert_eq!(c.pos, b.len());
        // Cut short anywhere: malformed, never a panic.
        for n in 0..b.len() {
            assert!(read_page_header(&mut Cursor { b: &b[..n], pos: 0 }).is_none());
        }
    }
}
