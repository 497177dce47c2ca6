//! CRC32C, TFRecord framing and the protobuf bytes of our events, against known vectors.

use furnace_track::tfrecord::{crc32c, file_version_event, masked_crc, record, scalars_event};

#[test]
fn crc32c_matches_known_vectors() {
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c(b""), 0);
    // RFC 3720 (iSCSI) B.4: 32 bytes of zeros, of 0xff.
    assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
    // TFRecord's mask: rotated right by 15 bits plus 0xa282ead8.
    assert_eq!(masked_crc(b"123456789"), 0xC78A_B0E5);
}

#[test]
fn records_and_events_have_the_expected_bytes() {
    let r = record(b"abc");
    assert_eq!(r.len(), 8 + 4 + 3 + 4);
    assert_eq!(&r[..8], &3u64.to_le_bytes());
    assert_eq!(&r[8..12], &masked_crc(&3u64.to_le_bytes()).to_le_bytes());
    assert_eq!(&r[12..15], b"abc");
    assert_eq!(&r[15..], &masked_crc(b"abc").to_le_bytes());

    let mut want = vec![0x09];
    want.extend_from_slice(&1.5f64.to_le_bytes());
    want.extend_from_slice(&[0x1a, 13]);
    want.extend_from_slice(b"brain.Event:2");
    assert_eq!(file_version_event(1.5), want);

    // Event { wall_time: 2.0, step: 300, summary { value { tag: "a", simple_value: 1.0 } } }
    let mut want = vec![0x09];
    want.extend_from_slice(&2.0f64.to_le_bytes());
    want.extend_from_slice(&[0x10, 0xac, 0x02]); // step 300 as a varint
    want.extend_from_slice(&[0x2a, 10, 0x0a, 8, 0x0a, 1, b'a', 0x15, 0x00, 0x00, 0x80, 0x3f]);
    assert_eq!(scalars_event(2.0, 300, &[("a", 1.0)]), want);
}
