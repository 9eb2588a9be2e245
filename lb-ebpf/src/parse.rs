//! Header parsing with the bounds checks the verifier wants. Anything the balancer does not
//! handle comes back as the reason it is passed (`Err(Stat)`); nothing here writes the packet.

use aya_ebpf::{cty::c_void, helpers::bpf_xdp_load_bytes, programs::XdpContext};
use core::mem::size_of;
use lb_common::{
    FAMILY_V4, FAMILY_V6, PROTO_ICMP, PROTO_TCP, PROTO_UDP,
    conntrack::Segment,
    flow::{FlowKey, IpBytes, v4},
    stats::Stat,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

/// TCP flag bits (byte 13 of the header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const NH_AH: u8 = 51;
const NH_ESP: u8 = 50;
/// Bytes of the fixed IPv6 header.
pub const IPV6_HDR_LEN: usize = 40;
/// Bytes of the TCP header the balancer reads and writes.
pub const TCP_HDR_LEN: usize = 20;
/// Bytes of the UDP header.
pub const UDP_HDR_LEN: usize = 8;

/// A parsed IPv4 or IPv6 TCP/UDP packet, with raw pointers into it (checked against
/// `data_end`).
pub struct Packet {
    pub eth: *mut EthHdr,
    /// The IP header: IPv4 (at least 20 bytes in bounds) or IPv6 (40), as `key.family` says.
    pub l3: *mut u8,
    /// Start of the TCP/UDP header; at least 20 (TCP) or 8 (UDP) bytes are in bounds.
    pub l4: *mut u8,
    /// The flow as it arrived (src → dst).
    pub key: FlowKey,
    /// TCP flags, 0 for UDP.
    pub tcp_flags: u8,
    /// Bytes of the TCP/UDP segment as the IP header gives them (its length less the IP
    /// and extension headers): what the segment's payload length is computed from.
    pub l4_len: u32,
    /// Frame length in bytes (for counters).
    pub len: u64,
    /// End of packet data: writers re-check against it, because the verifier cannot always
    /// carry `parse`'s checks across the code in between.
    pub data_end: usize,
}

impl Packet {
    #[inline(always)]
    pub fn is_tcp(&self) -> bool {
        self.key.proto == PROTO_TCP
    }

    #[inline(always)]
    pub fn is_v6(&self) -> bool {
        self.key.family == FAMILY_V6
    }

    /// A TCP segment's sequence and acknowledgment numbers (host order) and payload length.
    #[inline(always)]
    pub fn tcp_segment(&self) -> Option<Segment> {
        let h = crate::nat::l4_bytes::<TCP_HDR_LEN>(self.l4, &self.data_end).ok()?;
        // SAFETY: 20 bytes in bounds, checked just above.
        let h = unsafe { &*h };
        Some(Segment {
            seq: u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
            ack: u32::from_be_bytes([h[8], h[9], h[10], h[11]]),
            flags: h[13],
            payload_len: self.l4_len.saturating_sub((h[12] >> 4) as u32 * 4),
        })
    }
}

/// A pointer to a `T` at `offset`, if the whole `T` lies inside the packet.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Parses Ethernet / IPv4 (with options) or IPv6 (with extension headers) / TCP or UDP.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, Stat> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Stat::Malformed)?;
    // SAFETY: bounds checked by ptr_at.
    match u16::from_be(unsafe { (*eth).ether_type }) {
        ETH_P_IP => ipv4(ctx, eth),
        ETH_P_IPV6 => ipv6(ctx, eth),
        // ARP, VLANs: the kernel's business.
        _ => Err(Stat::NotOurs),
    }
}

/// The TCP or UDP header at `off`: a pointer to it, the ports and the TCP flags (0 for UDP).
#[inline(always)]
fn l4(ctx: &XdpContext, off: usize, proto: u8) -> Result<(*mut u8, u16, u16, u8), Stat> {
    if proto == PROTO_TCP {
        let l4: *mut [u8; TCP_HDR_LEN] = ptr_at(ctx, off).ok_or(Stat::Malformed)?;
        // SAFETY: 20 bytes in bounds.
        let h = unsafe { &*l4 };
        Ok((
            l4 as *mut u8,
            u16::from_ne_bytes([h[0], h[1]]),
            u16::from_ne_bytes([h[2], h[3]]),
            h[13],
        ))
    } else {
        let l4: *mut [u8; UDP_HDR_LEN] = ptr_at(ctx, off).ok_or(Stat::Malformed)?;
        // SAFETY: 8 bytes in bounds.
        let h = unsafe { &*l4 };
        Ok((
            l4 as *mut u8,
            u16::from_ne_bytes([h[0], h[1]]),
            u16::from_ne_bytes([h[2], h[3]]),
            0,
        ))
    }
}

/// IPv4 (options skipped); TCP and UDP only, not fragmented.
#[inline(always)]
fn ipv4(ctx: &XdpContext, eth: *mut EthHdr) -> Result<Packet, Stat> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN).ok_or(Stat::Malformed)?;
    // SAFETY: bounds checked.
    let iph = unsafe { &*ip };
    let ihl = (iph.vihl & 0x0f) as usize;
    if iph.vihl >> 4 != 4 || ihl < 5 {
        return Err(Stat::Malformed);
    }
    let proto = iph.proto;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        // ICMP may be an error about one of our flows: `icmp` decides (and counts).
        return Err(if proto == PROTO_ICMP {
            Stat::IcmpNotTranslated
        } else {
            Stat::NotOurs
        });
    }
    // More-fragments flag or a non-zero offset: ports are not (all) here.
    if (u16::from_be_bytes(iph.frags) & 0x3fff) != 0 {
        return Err(Stat::Fragment);
    }
    let (l4, sport, dport, tcp_flags) = l4(ctx, EthHdr::LEN + ihl * 4, proto)?;
    Ok(Packet {
        eth,
        l3: ip as *mut u8,
        l4,
        key: FlowKey {
            src: v4(iph.src_addr),
            dst: v4(iph.dst_addr),
            sport,
            dport,
            proto,
            family: FAMILY_V4,
            _pad: 0,
        },
        tcp_flags,
        l4_len: (u16::from_be_bytes(iph.tot_len) as u32).saturating_sub(ihl as u32 * 4),
        len: (ctx.data_end() - ctx.data()) as u64,
        data_end: ctx.data_end(),
    })
}

/// IPv6 next-header values the parser walks past or stops at.
const NH_HOP_BY_HOP: u8 = 0;
const NH_ROUTING: u8 = 43;
const NH_FRAGMENT: u8 = 44;
const NH_ICMPV6: u8 = 58;
const NH_DEST_OPTS: u8 = 60;
/// Extension headers walked before giving up (passed, counted): real traffic to a service
/// carries none or one (hop-by-hop, destination options).
const MAX_EXT_HEADERS: usize = 4;

/// IPv6 and its extension headers; TCP and UDP only, not fragmented.
#[inline(always)]
fn ipv6(ctx: &XdpContext, eth: *mut EthHdr) -> Result<Packet, Stat> {
    let mut addrs = [IpBytes { lo: 0, hi: 0 }; 2];
    let walked = ipv6_walk(ctx, &mut addrs)?;
    let ip: *mut [u8; IPV6_HDR_LEN] = ptr_at(ctx, EthHdr::LEN).ok_or(Stat::Malformed)?;
    let proto = (walked >> 16) as u8;
    // At most 14 + 40 + 4 × 2048: 14 bits, a bound the verifier can add a header to.
    let (l4, sport, dport, tcp_flags) = l4(ctx, (walked & 0x3fff) as usize, proto)?;
    Ok(Packet {
        eth,
        l3: ip as *mut u8,
        l4,
        key: FlowKey {
            src: addrs[0],
            dst: addrs[1],
            sport,
            dport,
            proto,
            family: FAMILY_V6,
            _pad: 0,
        },
        tcp_flags,
        l4_len: (walked >> 32) as u32,
        len: (ctx.data_end() - ctx.data()) as u64,
        data_end: ctx.data_end(),
    })
}

/// Reads the IPv6 addresses into `addrs` (source, destination) and walks the extension
/// headers: the L4 offset in the frame (bits 0–15), the protocol (16–23) and the segment's
/// length (32–63).
///
/// Not inlined: the unrolled walk needs registers and spill slots that would otherwise sit
/// in the main frame, under every other subprogram's. It reads the packet with
/// `bpf_xdp_load_bytes` only: a subprogram given packet pointers gets them back from the
/// compiler in forms the verifier refuses (`data_end` shifted as an integer).
#[inline(never)]
fn ipv6_walk(ctx: &XdpContext, addrs: &mut [IpBytes; 2]) -> Result<u64, Stat> {
    let load = |off: usize, to: *mut u8, len: u32| {
        // SAFETY: the helper writes at most `len` bytes to `to`, which has room for them.
        unsafe { bpf_xdp_load_bytes(ctx.ctx, off as u32, to as *mut c_void, len) == 0 }
    };
    let mut h = [0u8; 8];
    if !load(EthHdr::LEN, h.as_mut_ptr(), 8) || h[0] >> 4 != 6 {
        return Err(Stat::Malformed);
    }
    let payload_len = u16::from_be_bytes([h[4], h[5]]) as u32;
    let mut next = h[6];
    let mut off = EthHdr::LEN + IPV6_HDR_LEN;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            NH_HOP_BY_HOP | NH_ROUTING | NH_DEST_OPTS => {
                let mut e = [0u8; 4];
                if !load(off, e.as_mut_ptr(), 4) {
                    return Err(Stat::Ipv6ExtUnhandled);
                }
                // A routing header with segments left: the destination is not the last
                // one (the packet is only passing through this address).
                if next == NH_ROUTING && e[3] != 0 {
                    return Err(Stat::Ipv6ExtUnhandled);
                }
                next = e[0];
                off += (e[1] as usize + 1) * 8;
            }
            _ => break,
        }
    }
    let proto = next;
    if proto == NH_ICMPV6 {
        // Errors (types below 128) may be about a flow; neighbour discovery, echo and the
        // rest are the host's.
        let mut ty = [0u8; 1];
        return Err(if load(off, ty.as_mut_ptr(), 1) && ty[0] < 128 {
            Stat::IcmpNotTranslated
        } else {
            Stat::NotOurs
        });
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(match proto {
            NH_FRAGMENT => Stat::Fragment,
            NH_HOP_BY_HOP | NH_ROUTING | NH_DEST_OPTS | NH_AH | NH_ESP => Stat::Ipv6ExtUnhandled,
            _ => Stat::NotOurs,
        });
    }
    // Source and destination follow each other in the header as in `addrs`.
    if !load(EthHdr::LEN + 8, addrs.as_mut_ptr() as *mut u8, 32) {
        return Err(Stat::Malformed);
    }
    let ext = (off - EthHdr::LEN - IPV6_HDR_LEN) as u64;
    Ok(off as u64 | (proto as u64) << 16 | (payload_len as u64).saturating_sub(ext) << 32)
}
