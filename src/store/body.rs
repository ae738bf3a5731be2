//! Bodies as stored: a zstd frame when compressing makes the body smaller, else the body as
//! it came. Webhook bodies are JSON, which compresses two to three times, and the body is
//! most of what a stored delivery costs on disk. No flag tells the two apart: a stored body is
//! JSON (it parsed before it was stored), and JSON never starts with zstd's magic number
//! (`28 B5 2F FD`, and `(` starts no JSON text).
//!
//! Compression runs on the request's own task, before the body reaches the single writer; a
//! thread's compression context is kept, since making one costs more than compressing 1 KiB.

use std::borrow::Cow;
use std::cell::RefCell;

/// The first bytes of every zstd frame.
const MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
/// Smaller bodies are stored as they are: a frame's header would eat what it saves.
const WORTH_IT: usize = 128;
/// A negative ("fast") level leaves literals uncoded: on a 1 KiB scanner body it takes
/// 2.7 µs for 675 bytes, where level 1 takes 5.3 µs for 526 (benches/README.md). Either keeps a
/// stored delivery well under its budget; the request path is where time is short.
const LEVEL: i32 = -1;
/// The largest body a stored frame may claim to hold; a larger claim is a damaged row.
const LARGEST: u64 = 64 << 20;

thread_local! {
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// The body to store for `body`: compressed if that is smaller.
#[must_use]
pub fn pack(body: Vec<u8>) -> Vec<u8> {
    if body.len() < WORTH_IT {
        return body;
    }
    let packed = COMPRESSOR.with_borrow_mut(|compressor| {
        let compressor = match compressor {
            Some(compressor) => compressor,
            None => compressor.insert(zstd::bulk::Compressor::new(LEVEL).ok()?),
        };
        compressor.compress(&body).ok()
    });
    match packed {
        Some(packed) if packed.len() < body.len() => packed,
        _ => body,
    }
}

/// The body a stored one holds; `None` if it is a damaged frame.
#[must_use]
pub fn unpack(stored: &[u8]) -> Option<Cow<'_, [u8]>> {
    if !stored.starts_with(&MAGIC) {
        return Some(Cow::Borrowed(stored));
    }
    let size = zstd::zstd_safe::get_frame_content_size(stored).ok()??;
    if size > LARGEST {
        return None;
    }
    DECOMPRESSOR.with_borrow_mut(|decompressor| {
        let decompressor = match decompressor {
            Some(decompressor) => decompressor,
            None => decompressor.insert(zstd::bulk::Decompressor::new().ok()?),
        };
        let body = decompressor
            .decompress(stored, usize::try_from(size).ok()?)
            .ok()?;
        Some(Cow::Owned(body))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_round_trip_compressed_only_when_that_is_smaller() {
        let samples = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
            .into_iter()
            .flatten()
            .filter_map(|entry| std::fs::read(entry.ok()?.path()).ok());
        let finding = r#"{"title":"Missing HSTS header","severity":"medium"}"#;
        let json = format!(
            r#"{{"type":"scan.completed","findings":[{}]}}"#,
            [finding; 20].join(",")
        )
        .into_bytes();
        let short = br#"{"type":"ping"}"#.to_vec();
        let mut state = 0x9E37_79B9_7F4A_7C15_u64; // xorshift: bytes with nothing to find
        let random: Vec<u8> = std::iter::repeat_with(|| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .take(512)
        .collect();
        for body in samples.chain([json.clone(), short.clone(), random.clone()]) {
            let stored = pack(body.clone());
            assert!(stored.len() <= body.len());
            assert_eq!(unpack(&stored).unwrap().as_ref(), body.as_slice());
        }
        assert!(
            pack(json.clone()).len() * 4 < json.len(),
            "repetitive JSON shrinks"
        );
        assert_eq!(pack(short.clone()), short, "too short to bother");
        assert_eq!(
            pack(random.clone()),
            random,
            "incompressible bytes stay as they are"
        );
    }

    #[test]
    fn a_damaged_frame_is_not_a_body() {
        let mut stored = pack(br#"{"padding":""#.repeat(40));
        stored.truncate(stored.len() / 2);
        assert!(unpack(&stored).is_none());
        assert!(unpack(&[0x28, 0xB5, 0x2F, 0xFD, 0xFF]).is_none());
    }
}
