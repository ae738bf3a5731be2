//! The hop count hookroute daemons mark forwarded deliveries with: how a sink forwarding into
//! its own daemon, or two daemons forwarding to each other, is stopped. Pure.

/// The header an http sink marks a forwarded delivery with: how many times hookroute daemons
/// have forwarded the event, this time included.
pub const HOPS_HEADER: &str = "x-hookroute-hops";

/// Most forwards an event may take between hookroute daemons. A sink signing into its own
/// daemon's source (or two daemons forwarding to each other) once made 571 events of one in
/// 8 s; past this many hops the forward is a dead letter, and a daemon refuses a delivery
/// whose header says more.
pub const MAX_HOPS: u8 = 4;

/// The hop count in an [`HOPS_HEADER`] value: one to three ASCII digits, nothing else (no
/// sign, no space, no leading zero but `0` itself). `None` for anything else.
pub fn parse_hops(value: &[u8]) -> Option<u8> {
    let well_formed = matches!(value, [b'0'] | [b'1'..=b'9', ..])
        && value.len() <= 3
        && value.iter().all(u8::is_ascii_digit);
    if !well_formed {
        return None;
    }
    let hops = value
        .iter()
        .fold(0u16, |n, digit| n * 10 + u16::from(digit - b'0'));
    u8::try_from(hops).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_headers_are_digits_only() {
        for (value, hops) in [
            (&b"0"[..], Some(0)),
            (b"4", Some(4)),
            (b"255", Some(255)),
            (b"256", None),
            (b"007", None),
            (b"", None),
            (b"+1", None),
            (b" 1", None),
            (b"1\0", None),
            (b"1000", None),
            (&[0xd9, 0xa3], None),
        ] {
            assert_eq!(parse_hops(value), hops, "{value:?}");
        }
    }

    proptest::proptest! {
        /// Any bytes a stranger sends: no panic, and a count only for the canonical spelling
        /// of a number up to 255.
        #[test]
        fn a_hop_header_is_a_number_or_refused(value in proptest::collection::vec(proptest::num::u8::ANY, 0..6)) {
            let parsed = parse_hops(&value);
            let canonical = std::str::from_utf8(&value).ok()
                .and_then(|text| text.parse::<u8>().ok().filter(|n| n.to_string() == text));
            proptest::prop_assert_eq!(parsed, canonical);
        }

        #[test]
        fn every_count_reads_back(hops in 0u8..=255) {
            proptest::prop_assert_eq!(parse_hops(hops.to_string().as_bytes()), Some(hops));
        }
    }
}
