//! Bodies as stored: LZ4-compressed when that makes the body smaller, else the body as it
//! came. Webhook bodies are JSON, which LZ4 shrinks by a third or more, and the body is most of
//! what a stored delivery costs on disk. A compressed body is a zero byte (no JSON text starts
//! with one, and a stored body is JSON: it parsed before it was stored), the body's length
//! (`u32`, little-endian) and one LZ4 block.
//!
//! Compression runs on the request's own task, before the body reaches the single writer, so
//! its cost is CPU on every request: LZ4 because it has no entropy stage. zstd at its fastest
//! level kept a scanner body barely smaller for twice the time (benches/LOG.md).

use std::borrow::Cow;

/// The first byte of a compressed body.
const TAG: u8 = 0;
/// The tag and the body's length, before the LZ4 block.
const HEADER: usize = 1 + 4;
/// Smaller bodies are stored as they are: compressing them saves next to nothing.
const WORTH_IT: usize = 128;
/// The largest body a stored one may claim to hold; a larger claim is a damaged row.
const LARGEST: usize = 64 << 20;

/// The body to store for `body`: compressed if that is smaller.
#[must_use]
pub fn pack(body: &[u8]) -> Vec<u8> {
    if body.len() < WORTH_IT || body.len() > LARGEST {
        return body.to_vec();
    }
    let mut packed = vec![0; HEADER + lz4_flex::block::get_maximum_output_size(body.len())];
    packed[0] = TAG;
    #[allow(clippy::cast_possible_truncation)] // at most LARGEST
    packed[1..HEADER].copy_from_slice(&(body.len() as u32).to_le_bytes());
    match lz4_flex::block::compress_into(body, &mut packed[HEADER..]) {
        Ok(size) if HEADER + size < body.len() => {
            packed.truncate(HEADER + size);
            packed
        }
        _ => body.to_vec(),
    }
}

/// The body a stored one holds; `None` if it is a damaged one.
#[must_use]
pub fn unpack(stored: &[u8]) -> Option<Cow<'_, [u8]>> {
    let Some((&TAG, rest)) = stored.split_first() else {
        return Some(Cow::Borrowed(stored));
    };
    let (size, block) = rest.split_first_chunk::<4>()?;
    let size = usize::try_from(u32::from_le_bytes(*size)).ok()?;
    if size > LARGEST {
        return None;
    }
    let mut body = vec![0; size];
    match lz4_flex::block::decompress_into(block, &mut body) {
        Ok(written) if written == size => Some(Cow::Owned(body)),
        _ => None,
    }
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
            let stored = pack(&body);
            assert!(stored.len() <= body.len());
            assert_eq!(unpack(&stored).unwrap().as_ref(), body.as_slice());
        }
        assert!(
            pack(&json).len() * 4 < json.len(),
            "repetitive JSON shrinks"
        );
        assert_eq!(pack(&short), short, "too short to bother");
        assert_eq!(
            pack(&random),
            random,
            "incompressible bytes stay as they are"
        );
    }

    #[test]
    fn a_damaged_compressed_body_is_not_a_body() {
        let mut stored = pack(&br#"{"padding":""#.repeat(40));
        assert_eq!(stored[0], TAG);
        stored.truncate(stored.len() / 2);
        assert!(unpack(&stored).is_none(), "cut short");
        assert!(unpack(&[TAG, 0xFF]).is_none(), "no length");
        assert!(
            unpack(&[TAG, 0xFF, 0xFF, 0xFF, 0xFF, 0]).is_none(),
            "claims 4 GiB"
        );
        let mut longer = pack(&br#"{"padding":""#.repeat(40));
        longer[1] += 1;
        assert!(
            unpack(&longer).is_none(),
            "claims a byte more than it holds"
        );
    }
}
