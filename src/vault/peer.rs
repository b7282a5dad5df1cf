//! Where a request comes from: its TCP peer or, when that peer is a trusted proxy (an
//! ingress, a sidecar), the client that proxy names in `x-forwarded-for`.
//!
//! The header is believed only from a peer inside `auth.trusted_proxies`: anyone else could
//! write any address into it and so pick the address its failures are counted against. Behind
//! trusted proxies the client is the rightmost hop that is not itself a trusted proxy — the
//! hops left of it were written by the client and prove nothing.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

/// Most `x-forwarded-for` hops looked at, from the right: a longer chain of trusted proxies
/// is a misconfiguration, and the walk must stay cheap whatever a client sends.
const MAX_HOPS: usize = 16;

/// An IP network, `10.0.0.0/8` or `2001:db8::/32`; a bare address is a network of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// A string that is not a CIDR network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IP network (e.g. 10.0.0.0/8, 2001:db8::/32 or 10.1.2.3)")]
pub struct InvalidCidr(String);

impl Cidr {
    /// Parses `address/prefix` or a bare address. Host bits below the prefix are cleared.
    pub fn parse(text: &str) -> Result<Cidr, InvalidCidr> {
        let invalid = || InvalidCidr(text.chars().take(64).collect());
        let (address, prefix) = match text.trim().split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text.trim(), None),
        };
        let address = canonical(address.parse::<IpAddr>().map_err(|_| invalid())?);
        let max = match address {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        let prefix = match prefix {
            None => max,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(invalid)?,
            Some(_) => return Err(invalid()),
        };
        Ok(Cidr {
            network: masked(address, prefix),
            prefix,
        })
    }

    /// Whether `ip` is inside the network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        ip.is_ipv4() == self.network.is_ipv4() && masked(ip, self.prefix) == self.network
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// `ip` with the bits below `prefix` cleared.
fn masked(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, what a dual-stack listener reports) as the
/// IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Where a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The client's address: the TCP peer, or the client a trusted proxy named.
    pub ip: Option<IpAddr>,
    /// As the audit log shows it: `ip:port`, or `client via proxy:port`.
    pub shown: Option<String>,
}

impl Origin {
    /// The origin of a request from `peer` carrying `forwarded_for` (the `x-forwarded-for`
    /// values, comma-separated), believing the header only from a peer in `trusted`.
    pub fn of(peer: Option<SocketAddr>, forwarded_for: Option<&str>, trusted: &[Cidr]) -> Origin {
        let Some(peer) = peer else {
            return Origin {
                ip: None,
                shown: None,
            };
        };
        let peer_ip = canonical(peer.ip());
        let is_trusted = |ip: IpAddr| trusted.iter().any(|network| network.contains(ip));
        let mut client = peer_ip;
        if is_trusted(peer_ip)
            && let Some(header) = forwarded_for
        {
            for hop in header.rsplit(',').take(MAX_HOPS) {
                // A hop that is no address ends the walk: the proxy that wrote it is the
                // last one known, and the client stays unknown behind it.
                let Some(ip) = parse_hop(hop.trim()) else {
                    break;
                };
                client = ip;
                if !is_trusted(ip) {
                    break;
                }
            }
        }
        let shown = if client == peer_ip {
            peer.to_string()
        } else {
            format!("{client} via {peer}")
        };
        Origin {
            ip: Some(client),
            shown: Some(shown),
        }
    }

    /// The address failures are counted against: the client's IPv4 address, or its IPv6 /64
    /// (one host usually holds a whole /64, and could otherwise start afresh at will).
    pub fn bucket(&self) -> Option<String> {
        self.ip.map(|ip| match ip {
            IpAddr::V4(_) => ip.to_string(),
            IpAddr::V6(_) => format!("{}/64", masked(ip, 64)),
        })
    }
}

/// One `x-forwarded-for` hop: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1` or `[2001:db8::1]:443`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .or_else(|_| hop.parse::<SocketAddr>().map(|a| a.ip()))
        .ok()
        .map(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|c| Cidr::parse(c).unwrap()).collect()
    }

    fn peer(text: &str) -> Option<SocketAddr> {
        Some(text.parse().unwrap())
    }

    #[test]
    fn networks_parse_and_contain_their_addresses() {
        let net = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(net.contains("10.200.3.4".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()));
        let host = Cidr::parse("192.168.1.7").unwrap();
        assert!(host.contains("192.168.1.7".parse().unwrap()));
        assert!(!host.contains("192.168.1.8".parse().unwrap()));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains("2001:db8:1::9".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
        assert_eq!(Cidr::parse("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0/8",
            "host/8",
            "::/129",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy() {
        let trusted = cidrs(&["10.0.0.0/8"]);
        // The attack: a client writes someone else's address into the header.
        let direct = Origin::of(peer("203.0.113.9:4000"), Some("198.51.100.1"), &trusted);
        assert_eq!(direct.ip, Some("203.0.113.9".parse().unwrap()));
        assert_eq!(direct.shown.as_deref(), Some("203.0.113.9:4000"));
        let untrusting = Origin::of(peer("10.0.0.5:4000"), Some("198.51.100.1"), &[]);
        assert_eq!(untrusting.ip, Some("10.0.0.5".parse().unwrap()));
    }

    #[test]
    fn behind_trusted_proxies_the_client_is_the_rightmost_untrusted_hop() {
        let trusted = cidrs(&["10.0.0.0/8", "fd00::/8"]);
        // The client forged the leftmost hop; the ingress appended the real client, a
        // sidecar the ingress.
        let origin = Origin::of(
            peer("10.0.0.5:4000"),
            Some("6.6.6.6, 203.0.113.9, 10.9.9.9"),
            &trusted,
        );
        assert_eq!(origin.ip, Some("203.0.113.9".parse().unwrap()));
        assert_eq!(
            origin.shown.as_deref(),
            Some("203.0.113.9 via 10.0.0.5:4000")
        );
        let with_ports = Origin::of(peer("[fd00::1]:4000"), Some("[2001:db8::7]:5555"), &trusted);
        assert_eq!(with_ports.ip, Some("2001:db8::7".parse().unwrap()));
        assert_eq!(with_ports.bucket().as_deref(), Some("2001:db8::/64"));
        // Only proxies in the chain: the leftmost is the best known.
        let internal = Origin::of(peer("10.0.0.5:4000"), Some("10.1.1.1"), &trusted);
        assert_eq!(internal.ip, Some("10.1.1.1".parse().unwrap()));
        // Garbage ends the walk at the last address known.
        let garbage = Origin::of(peer("10.0.0.5:4000"), Some("1.2.3.4, junk"), &trusted);
        assert_eq!(garbage.ip, Some("10.0.0.5".parse().unwrap()));
        // No header: the proxy itself.
        let none = Origin::of(peer("10.0.0.5:4000"), None, &trusted);
        assert_eq!(none.ip, Some("10.0.0.5".parse().unwrap()));
    }
}
