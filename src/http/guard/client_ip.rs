//! Who the client is, for the rate limiter: the TCP peer, or behind trusted proxies the address
//! they saw, with IPv6 clients grouped by network prefix.
//!
//! A proxy *appends* the address it received a connection from to `X-Forwarded-For`, so only the
//! entries on the right were written by proxies we trust. Everything to the left came from the
//! client. tower_governor's `SmartIpKeyExtractor` takes the leftmost entry, which any client can
//! forge, rotating it to get a fresh quota on every request. Here the client is found from the
//! right. If the TCP peer is in `TRUSTED_PROXIES`, the entries are walked right to left, passing
//! over trusted proxies, and the first address that is not one is the client. A peer that is not
//! trusted is the client whatever it sends. An unreadable entry ends the walk: nothing left of it
//! was written by a trusted proxy, so the last trusted hop stands for the client.
//!
//! `Forwarded` (RFC 7239) and `X-Real-IP` are ignored. HAProxy, nginx, Envoy, cloud load balancers
//! and Kubernetes ingresses all append `X-Forwarded-For`. Reading two more headers would give a
//! forger two more places to write.
//!
//! An IPv6 host commonly holds a whole /64 and can pick a new address from it per request, so an
//! IPv6 client is keyed by its first `RATE_LIMIT_IPV6_PREFIX` bits (64 by default). IPv4-mapped
//! IPv6 addresses count as the IPv4 address.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use axum::http::HeaderMap;
use ipnet::IpNet;

const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// How the client's address is found and keyed.
#[derive(Debug, Clone)]
pub struct ClientAddr {
    trusted: std::sync::Arc<[IpNet]>,
    ipv6_prefix: u8,
}

impl ClientAddr {
    /// `ipv6_prefix` is at most 128.
    pub fn new(trusted: &[IpNet], ipv6_prefix: u8) -> Self {
        ClientAddr {
            trusted: trusted.iter().map(IpNet::trunc).collect(),
            ipv6_prefix: ipv6_prefix.min(128),
        }
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// The client's address, as described in the module doc.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if self.trusted.is_empty() || !self.trusts(peer) {
            return peer;
        }
        let mut client = peer;
        // Several header lines are one list, in order (RFC 9110 §5.3): walk the last line first.
        // Split from the bytes: what a client wrote on the left (even bytes that are not ASCII)
        // must not hide the entries trusted proxies appended on the right.
        for line in headers.get_all(X_FORWARDED_FOR).iter().rev() {
            for entry in line.as_bytes().rsplit(|&b| b == b',') {
                let Some(ip) = std::str::from_utf8(entry)
                    .ok()
                    .and_then(|e| parse_entry(e.trim()))
                else {
                    return client;
                };
                client = canonical(ip);
                if !self.trusts(client) {
                    return client;
                }
            }
        }
        client
    }

    /// The rate-limit key for a client address: IPv4 as is, IPv6 cut to its prefix.
    pub fn key(&self, client: IpAddr) -> IpAddr {
        match client {
            IpAddr::V4(_) => client,
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                let mask = match self.ipv6_prefix {
                    0 => 0,
                    p => u128::MAX << (128 - u32::from(p)),
                };
                IpAddr::V6(Ipv6Addr::from(bits & mask))
            }
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// An address, with or without a port (some proxies write `1.2.3.4:5678` or `[::1]:5678`).
fn parse_entry(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn xff(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(X_FORWARDED_FOR, HeaderValue::from_str(l).unwrap());
        }
        h
    }

    fn behind(proxies: &[&str]) -> ClientAddr {
        let nets: Vec<IpNet> = proxies.iter().map(|p| p.parse().unwrap()).collect();
        ClientAddr::new(&nets, 64)
    }

    #[test]
    fn without_trusted_proxies_the_peer_is_the_client_whatever_it_sends() {
        let c = ClientAddr::new(&[], 64);
        assert_eq!(c.client(ip("10.0.0.5"), &xff(&["1.1.1.1"])), ip("10.0.0.5"));
        let c = behind(&["10.0.0.0/8"]);
        assert_eq!(
            c.client(ip("192.0.2.9"), &xff(&["1.1.1.1"])),
            ip("192.0.2.9"),
            "an untrusted peer cannot name another client"
        );
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_entry_so_a_forged_prefix_changes_nothing() {
        let c = behind(&["10.0.0.0/8", "127.0.0.1/32"]);
        let peer = ip("10.0.0.1");
        assert_eq!(c.client(peer, &xff(&["203.0.113.7"])), ip("203.0.113.7"));
        // The client wrote the first two; the edge proxy appended what it saw, then an inner
        // proxy appended the edge proxy's address.
        let forged = xff(&["6.6.6.6, 7.7.7.7", "203.0.113.7, 10.0.0.2"]);
        assert_eq!(c.client(peer, &forged), ip("203.0.113.7"));
        assert_eq!(
            c.client(peer, &xff(&["garbage, 203.0.113.7:4242"])),
            ip("203.0.113.7"),
            "ports are dropped; what is left of the client does not matter"
        );
        // A byte that is not ASCII on the client's side (a proxy forwards what it was sent) no
        // longer hides the entry the proxy appended.
        let mut raw = HeaderMap::new();
        raw.append(
            X_FORWARDED_FOR,
            HeaderValue::from_bytes(b"\xff, 198.51.100.77").unwrap(),
        );
        assert_eq!(c.client(peer, &raw), ip("198.51.100.77"));
    }

    #[test]
    fn an_unreadable_entry_or_a_missing_header_leaves_the_last_trusted_hop() {
        let c = behind(&["10.0.0.0/8"]);
        assert_eq!(c.client(ip("10.0.0.1"), &HeaderMap::new()), ip("10.0.0.1"));
        assert_eq!(
            c.client(ip("10.0.0.1"), &xff(&["203.0.113.7, nonsense, 10.0.0.2"])),
            ip("10.0.0.2")
        );
        assert_eq!(
            c.client(ip("10.0.0.1"), &xff(&["10.0.0.3, 10.0.0.2"])),
            ip("10.0.0.3"),
            "all trusted: the leftmost"
        );
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_prefix_and_mapped_ipv4_as_ipv4() {
        let c = ClientAddr::new(&[], 64);
        assert_eq!(
            c.key(ip("2001:db8:1:2:aaaa::1")),
            c.key(ip("2001:db8:1:2:bbbb::99"))
        );
        assert_ne!(c.key(ip("2001:db8:1:2::1")), c.key(ip("2001:db8:1:3::1")));
        assert_eq!(c.key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            c.client(ip("::ffff:192.0.2.1"), &HeaderMap::new()),
            ip("192.0.2.1")
        );
        assert_eq!(c.key(ip("192.0.2.1")), ip("192.0.2.1"));
        let exact = ClientAddr::new(&[], 128);
        assert_eq!(exact.key(ip("2001:db8::1")), ip("2001:db8::1"));
    }
}
