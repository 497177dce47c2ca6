//! Byte-level mutation of seed inputs (AFL-style: bit flips, interesting values, integer
//! fields set to huge values, truncation, duplication, splicing, insertion of random bytes
//! and of dictionary tokens).

use crate::rng::Rng;

/// Bytes worth trying in any position.
pub const INTERESTING_U8: [u8; 8] = [0, 1, 0x7f, 0x80, 0xff, b'"', b'{', b'\n'];

/// 64-bit values worth writing into a length or count field.
pub const INTERESTING_U64: [u64; 14] =
    [0, 1, 2, 0x7f, 0xff, 0xffff, 1 << 31, (1 << 31) - 1, 1 << 32, u32::MAX as u64, 1 << 40, i64::MAX as u64, 1 << 63, u64::MAX];

/// Numbers as text, for text formats.
pub const INTERESTING_NUMBERS: [&str; 16] = [
    "0",
    "-1",
    "1",
    "2147483648",
    "4294967296",
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999999",
    "1e308",
    "-1e308",
    "1e400",
    "nan",
    "inf",
    "0.5",
];

/// Applies 1 to 8 stacked random mutations to `data`; `dict` holds format tokens to insert
/// and `others` inputs to splice from.
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>, dict: &[&[u8]], others: &[Vec<u8>]) {
    let n = 1 + rng.below(8);
    for _ in 0..n {
        mutate_once(rng, data, dict, others);
    }
    // Keep inputs small enough to run fast.
    data.truncate(1 << 20);
}

fn mutate_once(rng: &mut Rng, data: &mut Vec<u8>, dict: &[&[u8]], others: &[Vec<u8>]) {
    let len = data.len();
    match rng.below(13) {
        0 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            data[i] = INTERESTING_U8[rng.below(INTERESTING_U8.len())];
        }
        2 if len > 0 => {
            let i = rng.below(len);
            data[i] = rng.next_u64() as u8;
        }
        3 if len >= 8 => {
            // A little-endian integer field set to an interesting value (u64, u32 or u16).
            let v = INTERESTING_U64[rng.below(INTERESTING_U64.len())];
            let width = [8usize, 4, 2][rng.below(3)];
            let i = rng.below(len - width + 1);
            data[i..i + width].copy_from_slice(&v.to_le_bytes()[..width]);
        }
        4 if len > 0 => data.truncate(rng.below(len)),
        5 if len > 0 => {
            // Duplicate a chunk in place.
            let a = rng.below(len);
            let b = (a + 1 + rng.below(64)).min(len);
            let chunk = data[a..b].to_vec();
            let at = rng.below(len + 1);
            data.splice(at..at, chunk);
        }
        6 if len > 0 => {
            let a = rng.below(len);
            let b = (a + 1 + rng.below(64)).min(len);
            data.drain(a..b);
        }
        7 => {
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            let at = rng.below(len + 1);
            data.splice(at..at, bytes);
        }
        8 | 9 if !dict.is_empty() => {
            let tok = dict[rng.below(dict.len())];
            let at = rng.below(len + 1);
            if rng.one_in(2) && len > 0 {
                // Overwrite instead of insert.
                let end = (at + tok.len()).min(len);
                data.splice(at..end, tok.iter().copied());
            } else {
                data.splice(at..at, tok.iter().copied());
            }
        }
        10 => {
            let num = INTERESTING_NUMBERS[rng.below(INTERESTING_NUMBERS.len())].as_bytes();
            // Replace a run of ASCII digits (a number in a text format) when there is one.
            let start = rng.below(len + 1);
            match data[start.min(len)..].iter().position(u8::is_ascii_digit) {
                Some(p) => {
                    let a = start + p;
                    let b = a + data[a..].iter().take_while(|c| c.is_ascii_digit()).count();
                    data.splice(a..b, num.iter().copied());
                }
                None => data.splice(start..start, num.iter().copied()).for_each(drop),
            }
        }
        11 if !others.is_empty() => {
            // Splice: our head, another input's tail.
            let other = &others[rng.below(others.len())];
            let cut = rng.below(len + 1);
            let from = rng.below(other.len() + 1);
            data.truncate(cut);
            data.extend_from_slice(&other[from..]);
        }
        12 if len > 0 => {
            // Repeat a chunk many times (long strings, deep nesting).
            let a = rng.below(len);
            let b = (a + 1 + rng.below(8)).min(len);
            let chunk = data[a..b].to_vec();
            let times = 1 + rng.below(2000);
            let at = rng.below(len + 1);
            let rep: Vec<u8> = chunk.iter().copied().cycle().take(chunk.len() * times).collect();
            data.splice(at..at, rep);
        }
        _ => {
            let at = rng.below(len + 1);
            data.insert(at, rng.next_u64() as u8);
        }
    }
}
