//! The source guard's contents: which client sources may open a connection-mode flow, and
//! on which interface. Built from the state and the host's routes; the data plane only looks
//! it up, once per SYN.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::guard::{MARTIAN_V4, MARTIAN_V6, SourceRule};

use crate::{config::Mode, state::State};

/// Where the host routes an address: the matching route's prefix, whether it is on-link (no
/// gateway), and the interface index it leaves through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub prefix: IpAddr,
    pub len: u8,
    pub on_link: bool,
    pub ifindex: u32,
}

/// The guard's rules (address, prefix length, rule) for `state`, with `route` telling where
/// each backend is:
/// - martian prefixes ([`MARTIAN_V4`], [`MARTIAN_V6`]) and our own addresses (every connection-mode VIP and
///   SNAT address: a SYN "from" them is a land attack or a reflection) may never open a flow;
/// - a backend's subnet (its on-link route's prefix; just the backend when it is reached
///   through a gateway) may open flows only from the interface that reaches it: a SYN
///   claiming a backend-side source that arrives from the client side is spoofed.
///
/// More specific prefixes win (an LPM trie): the SNAT address inside a backend subnet stays
/// refused.
pub fn rules(
    state: &State,
    route: impl Fn(IpAddr) -> Option<Route>,
) -> Vec<(IpAddr, u8, SourceRule)> {
    let never = SourceRule { ifindex: 0 };
    let mut out: Vec<(IpAddr, u8, SourceRule)> = MARTIAN_V4
        .iter()
        .map(|(a, len)| (IpAddr::from(*a), *len, never))
        .chain(
            MARTIAN_V6
                .iter()
                .map(|(a, len)| (IpAddr::from(*a), *len, never)),
        )
        .collect();
    let mut push = |ip: IpAddr, len: u8, rule: SourceRule| {
        if !out.iter().any(|(a, l, _)| *a == ip && *l == len) {
            out.push((ip, len, rule));
        }
    };
    for s in state.services.values() {
        if s.config.mode != Mode::Connection {
            continue;
        }
        let host_len = |ip: &IpAddr| if ip.is_ipv4() { 32 } else { 128 };
        push(s.config.vip, host_len(&s.config.vip), never);
        if let Some(snat) = s.config.snat {
            push(snat, host_len(&snat), never);
        }
    }
    for (s, _, b) in state.backends() {
        if s.config.mode != Mode::Connection {
            continue;
        }
        let ip = b.addr.ip();
        let Some(r) = route(ip) else {
            continue;
        };
        let rule = SourceRule { ifindex: r.ifindex };
        if r.on_link && r.len > 0 {
            push(r.prefix, r.len, rule);
        } else {
            push(ip, if ip.is_ipv4() { 32 } else { 128 }, rule);
        }
    }
    out
}

/// The host's route to `ip` (longest prefix, read from the calling thread's network
/// namespace: `/proc/net/route` for IPv4, `/proc/net/ipv6_route` for IPv6).
pub fn host_route(ip: IpAddr) -> Option<Route> {
    let ifindex = |name: &str| {
        let c = std::ffi::CString::new(name).ok()?;
        // SAFETY: a valid NUL-terminated string.
        let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
        (i != 0).then_some(i)
    };
    match ip {
        IpAddr::V4(ip) => {
            let table = std::fs::read_to_string("/proc/thread-self/net/route").ok()?;
            best_route(&table, ip, ifindex)
        }
        IpAddr::V6(ip) => {
            let table = std::fs::read_to_string("/proc/thread-self/net/ipv6_route").ok()?;
            best_route6(&table, ip, ifindex)
        }
    }
}

/// The longest-prefix route to `ip` in a `/proc/net/ipv6_route` table (the host's own
/// addresses' routes, on `lo`, left out).
fn best_route6(table: &str, ip: Ipv6Addr, ifindex: impl Fn(&str) -> Option<u32>) -> Option<Route> {
    // Fields: destination (32 hex digits), its prefix length (hex), source, its length, next
    // hop, metric, refcount, use, flags, interface.
    let addr = |s: &str| u128::from_str_radix(s, 16).ok();
    let want = u128::from(ip);
    table
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (dest, len, gw) = (
                addr(f.first()?)?,
                u32::from_str_radix(f.get(1)?, 16).ok()?,
                addr(f.get(4)?)?,
            );
            let iface = *f.get(9)?;
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            (len <= 128 && iface != "lo" && want & mask == dest & mask)
                .then_some((iface, dest, len, gw))
        })
        .max_by_key(|(_, _, len, _)| *len)
        .and_then(|(iface, dest, len, gw)| {
            Some(Route {
                prefix: IpAddr::V6(Ipv6Addr::from(dest)),
                len: len as u8,
                on_link: gw == 0,
                ifindex: ifindex(iface)?,
            })
        })
}

/// The longest-prefix route to `ip` in a `/proc/net/route` table.
fn best_route(table: &str, ip: Ipv4Addr, ifindex: impl Fn(&str) -> Option<u32>) -> Option<Route> {
    // Fields: Iface Destination Gateway Flags RefCnt Use Metric Mask …, addresses as
    // native-endian hex of the wire bytes.
    let hex = |s: &str| {
        u32::from_str_radix(s, 16)
            .ok()
            .map(|v| Ipv4Addr::from(v.to_ne_bytes()))
    };
    let want = u32::from(ip);
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (dest, gw, mask) = (hex(f.get(1)?)?, hex(f.get(2)?)?, hex(f.get(7)?)?);
            let m = u32::from(mask);
            (want & m == u32::from(dest) & m).then_some((f[0], dest, gw, m))
        })
        .max_by_key(|(_, _, _, m)| m.count_ones())
        .and_then(|(iface, dest, gw, m)| {
            Some(Route {
                prefix: IpAddr::V4(dest),
                len: m.count_ones() as u8,
                on_link: gw.is_unspecified(),
                ifindex: ifindex(iface)?,
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0101630A\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t0001630A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth1\t0000140A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
";

    const TABLE6: &str = "\
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
fd000020000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth1
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000002 00000000 00000003     eth0
fd000020000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001       lo
";

    fn idx(name: &str) -> Option<u32> {
        match name {
            "eth0" => Some(2),
            "eth1" => Some(3),
            _ => None,
        }
    }

    #[test]
    fn the_longest_matching_route_gives_prefix_gateway_and_interface() {
        let on_link = best_route(TABLE, "10.20.0.11".parse().unwrap(), idx).unwrap();
        assert_eq!(
            on_link,
            Route {
                prefix: "10.20.0.0".parse().unwrap(),
                len: 24,
                on_link: true,
                ifindex: 3
            }
        );
        let via_gw = best_route(TABLE, "192.0.2.1".parse().unwrap(), idx).unwrap();
        assert_eq!((via_gw.len, via_gw.on_link, via_gw.ifindex), (0, false, 2));
    }

    #[test]
    fn martians_and_own_addresses_never_open_flows_and_backend_subnets_only_from_their_side() {
        let cfg = crate::config::Config::parse(
            r#"
[daemon]
interfaces = ["eth0"]
[[service]]
name = "web"
vip = "10.99.0.10"
port = 80
snat = "10.20.0.1"
[[service.pool]]
name = "legacy"
backends = ["10.20.0.11:8080", "10.20.0.12:8080", "192.0.2.7:80"]
[[service]]
name = "web6"
vip = "fd00:99::10"
port = 80
snat = "fd00:20::1"
[[service.pool]]
name = "legacy"
backends = ["[fd00:20::11]:8080", "[2001:db8::7]:80"]
"#,
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        let state = State::from_config(&cfg).unwrap();
        let r = rules(&state, |ip| match ip {
            IpAddr::V4(ip) => best_route(TABLE, ip, idx),
            IpAddr::V6(ip) => best_route6(TABLE6, ip, idx),
        });
        let find = |a: &str, len: u8| {
            r.iter()
                .find(|(ip, l, _)| *ip == a.parse::<IpAddr>().unwrap() && *l == len)
                .map(|(_, _, rule)| rule.ifindex)
        };
        assert_eq!(find("127.0.0.0", 8), Some(0));
        assert_eq!(find("224.0.0.0", 4), Some(0));
        assert_eq!(find("10.99.0.10", 32), Some(0), "the VIP itself: land");
        assert_eq!(find("10.20.0.1", 32), Some(0), "the SNAT address");
        assert_eq!(
            find("10.20.0.0", 24),
            Some(3),
            "the backends' subnet, from eth1 only"
        );
        assert_eq!(
            find("192.0.2.7", 32),
            Some(2),
            "a routed backend: just itself"
        );
        assert_eq!(
            r.iter().filter(|(_, l, _)| *l == 24).count(),
            1,
            "one rule per subnet however many backends are in it"
        );
        // IPv6 alike.
        assert_eq!(find("::1", 128), Some(0));
        assert_eq!(find("ff00::", 8), Some(0));
        assert_eq!(find("::ffff:0.0.0.0", 96), Some(0));
        assert_eq!(find("fd00:99::10", 128), Some(0), "the IPv6 VIP: land");
        assert_eq!(find("fd00:20::1", 128), Some(0), "the IPv6 SNAT address");
        assert_eq!(
            find("fd00:20::", 64),
            Some(3),
            "the IPv6 backends' subnet, from eth1 only (not the host's own /128 on lo)"
        );
        assert_eq!(
            find("2001:db8::7", 128),
            Some(2),
            "a routed IPv6 backend: just itself"
        );
    }
}
