//! Client addresses as the limits count them: the peer, or behind
//! `TRUSTED_PROXIES` the nearest untrusted hop of `X-Forwarded-For`; IPv6
//! grouped by /64. Shared by the request limits (`extract.rs`) and the
//! connection limits (`admission.rs`).

use std::net::IpAddr;

/// The client address of a request from `peer` (see `extract::ClientIp`).
/// `forwarded` are the `X-Forwarded-For` values in order.
pub fn client_address<'a>(
    peer: IpAddr,
    forwarded: impl Iterator<Item = &'a str>,
    trusted: &[ipnet::IpNet],
) -> IpAddr {
    let mut client = canonical(peer);
    if !is_trusted(client, trusted) {
        return group(client);
    }
    let hops: Vec<&str> = forwarded.flat_map(|v| v.split(',')).collect();
    for hop in hops.iter().rev() {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => {
                client = canonical(ip);
                if !is_trusted(client, trusted) {
                    break;
                }
            }
            // Garbage from the left of the chain: stop at the last hop a
            // trusted proxy vouched for.
            Err(_) => break,
        }
    }
    group(client)
}

/// Whether `peer` is one of `trusted` (a balancer).
pub fn is_trusted(peer: IpAddr, trusted: &[ipnet::IpNet]) -> bool {
    let peer = canonical(peer);
    trusted.iter().any(|net| net.contains(&peer))
}

/// An IPv4-mapped IPv6 address is the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// IPv6 clients are counted per /64.
fn group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            let mut segments = v6.segments();
            segments[4..].fill(0);
            IpAddr::V6(segments.into())
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_hop() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let lb = ip("10.0.0.5");
        // A client that forges the header only adds to the left.
        let got = client_address(lb, ["6.6.6.6, 203.0.113.7"].into_iter(), &trusted);
        assert_eq!(got, ip("203.0.113.7"));
        // Two trusted hops, several header lines.
        let got = client_address(
            lb,
            ["1.1.1.1", "203.0.113.7, 10.0.0.9"].into_iter(),
            &trusted,
        );
        assert_eq!(got, ip("203.0.113.7"));
        // An untrusted peer's header is ignored.
        let got = client_address(ip("198.51.100.1"), ["203.0.113.7"].into_iter(), &trusted);
        assert_eq!(got, ip("198.51.100.1"));
        // Garbage stops the walk at the last vouched hop.
        let got = client_address(lb, ["garbage, 10.0.0.9"].into_iter(), &trusted);
        assert_eq!(got, ip("10.0.0.9"));
        // No trusted proxies: the peer, whatever the header says.
        assert_eq!(client_address(lb, ["203.0.113.7"].into_iter(), &[]), lb);
    }

    #[test]
    fn ipv6_is_grouped_by_64_and_mapped_ipv4_is_ipv4() {
        let a = client_address(ip("2001:db8:1:2:aaaa::1"), std::iter::empty(), &[]);
        let b = client_address(ip("2001:db8:1:2:bbbb::2"), std::iter::empty(), &[]);
        assert_eq!(a, b);
        assert_eq!(a, ip("2001:db8:1:2::"));
        let mapped = client_address(ip("::ffff:192.0.2.1"), std::iter::empty(), &[]);
        assert_eq!(mapped, ip("192.0.2.1"));
    }
}
