//! Header parsing with the bounds checks the verifier wants. Anything the balancer does not
//! handle comes back as `Verdict::Pass(reason)`; nothing here writes the packet.

use aya_ebpf::programs::XdpContext;
use core::mem::size_of;
use lb_common::{
    FAMILY_V4, PROTO_ICMP, PROTO_TCP, PROTO_UDP, conntrack::Segment, flow::FlowKey, flow::v4,
    stats::Stat,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

/// TCP flag bits (byte 13 of the header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const ETH_P_IP: u16 = 0x0800;
/// Bytes of the TCP header the balancer reads and writes.
pub const TCP_HDR_LEN: usize = 20;
/// Bytes of the UDP header.
pub const UDP_HDR_LEN: usize = 8;

/// A parsed IPv4 TCP/UDP packet, with raw pointers into it (checked against `data_end`).
pub struct Packet {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    /// Start of the TCP/UDP header; at least 20 (TCP) or 8 (UDP) bytes are in bounds.
    pub l4: *mut u8,
    /// The flow as it arrived (src → dst).
    pub key: FlowKey,
    /// TCP flags, 0 for UDP.
    pub tcp_flags: u8,
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

    /// A TCP segment's sequence and acknowledgment numbers (host order) and payload length.
    #[inline(always)]
    pub fn tcp_segment(&self) -> Option<Segment> {
        let h = crate::nat::l4_bytes::<TCP_HDR_LEN>(self.l4, &self.data_end).ok()?;
        // SAFETY: 20 bytes in bounds, checked just above.
        let h = unsafe { &*h };
        // SAFETY: bounds-checked by `parse`.
        let ip = unsafe { &*self.ip };
        let hdrs = (ip.vihl & 0x0f) as u32 * 4 + (h[12] >> 4) as u32 * 4;
        Some(Segment {
            seq: u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
            ack: u32::from_be_bytes([h[8], h[9], h[10], h[11]]),
            flags: h[13],
            payload_len: (u16::from_be_bytes(ip.tot_len) as u32).saturating_sub(hdrs),
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

/// Parses Ethernet / IPv4 (with options) / TCP or UDP.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, Stat> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Stat::Malformed)?;
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        // ARP, IPv6 (forwarding comes later), VLANs: the kernel's business.
        return Err(Stat::NotOurs);
    }
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
    let l4_off = EthHdr::LEN + ihl * 4;
    let (l4, sport, dport, tcp_flags) = if proto == PROTO_TCP {
        let l4: *mut [u8; TCP_HDR_LEN] = ptr_at(ctx, l4_off).ok_or(Stat::Malformed)?;
        // SAFETY: 20 bytes in bounds.
        let h = unsafe { &*l4 };
        (
            l4 as *mut u8,
            u16::from_ne_bytes([h[0], h[1]]),
            u16::from_ne_bytes([h[2], h[3]]),
            h[13],
        )
    } else {
        let l4: *mut [u8; UDP_HDR_LEN] = ptr_at(ctx, l4_off).ok_or(Stat::Malformed)?;
        // SAFETY: 8 bytes in bounds.
        let h = unsafe { &*l4 };
        (
            l4 as *mut u8,
            u16::from_ne_bytes([h[0], h[1]]),
            u16::from_ne_bytes([h[2], h[3]]),
            0,
        )
    };
    Ok(Packet {
        eth,
        ip,
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
        len: (ctx.data_end() - ctx.data()) as u64,
        data_end: ctx.data_end(),
    })
}
