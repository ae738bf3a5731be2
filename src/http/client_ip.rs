//! Who is really calling: the socket peer, or — only when that peer is a trusted proxy — the
//! address its `X-Forwarded-For` names. Pure.

use std::net::{IpAddr, Ipv6Addr};

use axum::http::HeaderMap;
use ipnet::IpNet;

pub const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// A trusted proxy passed an `X-Forwarded-For` entry that is not an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("X-Forwarded-For from a trusted proxy holds an entry that is not an IP address")]
pub struct MalformedForwardedFor;

/// The client's address.
///
/// `X-Forwarded-For` is read from the right: each trusted proxy appends the address it saw, so
/// the rightmost entry that is not itself a trusted proxy is the first one nobody could forge.
/// Anything left of it was written by the client and is ignored.
///
/// # Errors
/// An entry that must be read (right of the client's) is not an address, or the header is not
/// ASCII. Answering with the proxy's own address instead would charge the proxy, and so
/// everyone behind it, with the failures of whoever sent the bad header.
pub fn client_ip(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &[IpNet],
) -> Result<IpAddr, MalformedForwardedFor> {
    let peer = peer.to_canonical();
    if !is_trusted(peer, trusted) {
        return Ok(peer);
    }
    let mut client = peer;
    let hops = headers.get_all(X_FORWARDED_FOR).iter().rev();
    for value in hops {
        let text = value.to_str().map_err(|_| MalformedForwardedFor)?;
        for entry in text.rsplit(',') {
            let addr = entry
                .trim()
                .parse::<IpAddr>()
                .map_err(|_| MalformedForwardedFor)?;
            client = addr.to_canonical();
            if !is_trusted(client, trusted) {
                return Ok(client);
            }
        }
    }
    Ok(client)
}

/// Whether `addr` is one of the `trusted` proxies.
pub fn is_trusted(addr: IpAddr, trusted: &[IpNet]) -> bool {
    let addr = addr.to_canonical();
    trusted.iter().any(|net| net.contains(&addr))
}

/// The rate-limiting key: the address itself for IPv4, its /64 for IPv6 (one subscriber
/// usually holds a whole /64, so per-address keys would be free to multiply).
pub fn limit_key(addr: IpAddr) -> IpAddr {
    match addr.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn xff(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(X_FORWARDED_FOR, HeaderValue::from_str(v).unwrap());
        }
        headers
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn forwarded_only_from_trusted_peers() {
        let trusted = nets(&["10.0.0.0/8", "127.0.0.1/32"]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let cases = [
            // Untrusted peer: its header is ignored.
            ("203.0.113.9", vec!["198.51.100.1"], "203.0.113.9"),
            // Trusted peer: the rightmost untrusted entry wins, spoofed prefixes are ignored.
            ("127.0.0.1", vec!["6.6.6.6, 198.51.100.1"], "198.51.100.1"),
            (
                "127.0.0.1",
                vec!["6.6.6.6, 198.51.100.1, 10.1.2.3"],
                "198.51.100.1",
            ),
            (
                "127.0.0.1",
                vec!["6.6.6.6", "198.51.100.1, 10.1.2.3"],
                "198.51.100.1",
            ),
            // What the client wrote left of its own entry is never read.
            ("127.0.0.1", vec!["garbage, 198.51.100.1"], "198.51.100.1"),
            // No header, or only proxies.
            ("127.0.0.1", vec![], "127.0.0.1"),
            ("127.0.0.1", vec!["10.0.0.1"], "10.0.0.1"),
            // IPv4-mapped peers are treated as IPv4.
            ("::ffff:127.0.0.1", vec!["198.51.100.7"], "198.51.100.7"),
        ];
        for (peer, header, expected) in cases {
            assert_eq!(
                client_ip(ip(peer), &xff(&header), &trusted),
                Ok(ip(expected)),
                "{peer} {header:?}"
            );
        }
    }

    #[test]
    fn a_malformed_entry_from_a_proxy_is_an_error_never_the_proxy() {
        let trusted = nets(&["10.0.0.0/8", "127.0.0.1/32"]);
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        for header in [
            vec!["198.51.100.1, garbage"],
            vec!["garbage, 10.9.9.9"],
            vec![""],
            vec!["198.51.100.1", "10.0.0.1, "],
        ] {
            assert_eq!(
                client_ip(peer, &xff(&header), &trusted),
                Err(MalformedForwardedFor),
                "{header:?}"
            );
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            X_FORWARDED_FOR,
            HeaderValue::from_bytes(b"198.51.100.1\xff").unwrap(),
        );
        assert_eq!(
            client_ip(peer, &headers, &trusted),
            Err(MalformedForwardedFor)
        );
        // From an untrusted peer the header is not read at all.
        let stranger: IpAddr = "203.0.113.5".parse().unwrap();
        assert_eq!(client_ip(stranger, &headers, &trusted), Ok(stranger));
    }

    #[test]
    fn ipv6_keyed_by_slash_64() {
        let a = limit_key("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = limit_key("2001:db8:1:2:bbbb::9".parse().unwrap());
        let c = limit_key("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            limit_key("192.0.2.1".parse().unwrap()),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn entry() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<std::net::Ipv4Addr>().prop_map(|ip| ip.to_string()),
                any::<std::net::Ipv6Addr>().prop_map(|ip| ip.to_string()),
                Just("10.1.2.3".to_owned()),
                Just("127.0.0.1".to_owned()),
                "[ -~]{0,20}",
            ]
        }

        proptest! {
            #[test]
            fn never_the_proxy_for_a_bad_header_and_never_a_panic(
                entries in prop::collection::vec(entry(), 0..6),
                raw in prop::collection::vec(any::<u8>(), 0..40),
                peer in prop_oneof![Just("127.0.0.1"), Just("10.9.9.9"), Just("203.0.113.1")],
            ) {
                let trusted = nets(&["10.0.0.0/8", "127.0.0.1/32"]);
                let peer: IpAddr = peer.parse().unwrap();
                let mut headers = xff(&[&entries.join(", ")]);
                if let Ok(value) = HeaderValue::from_bytes(&raw) {
                    headers.append(X_FORWARDED_FOR, value);
                }
                match client_ip(peer, &headers, &trusted) {
                    _ if !is_trusted(peer, &trusted) => {
                        prop_assert_eq!(client_ip(peer, &headers, &trusted), Ok(peer));
                    }
                    // Read from the right, the answer is the first untrusted entry, or the
                    // leftmost proxy when every entry is one: an address the header names,
                    // never the peer itself unless there is no header at all.
                    Ok(client) => {
                        let text: Vec<String> = headers
                            .get_all(X_FORWARDED_FOR)
                            .iter()
                            .filter_map(|v| v.to_str().ok())
                            .flat_map(|t| t.split(',').map(|e| e.trim().to_owned()))
                            .collect();
                        let named = text.iter().any(|e| e.parse::<IpAddr>().is_ok_and(|a| a.to_canonical() == client));
                        prop_assert!(named || (text.is_empty() && client == peer), "{client} {text:?}");
                    }
                    Err(MalformedForwardedFor) => {}
                }
            }
        }
    }
}
