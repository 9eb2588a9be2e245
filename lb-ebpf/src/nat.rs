//! Full-NAT rewrite of an IPv4 or IPv6 TCP/UDP packet with incremental checksum updates.

use lb_common::{PROTO_TCP, csum::CsumDiff, flow::IpBytes};
use network_types::ip::Ipv4Hdr;

use crate::parse::{IPV6_HDR_LEN, Packet, TCP_HDR_LEN, UDP_HDR_LEN};

/// The new addresses and ports (ports in network byte order); addresses of the packet's
/// family (IPv4 in the first four bytes).
pub struct Rewrite<'a> {
    pub src: &'a IpBytes,
    pub dst: &'a IpBytes,
    pub sport: u16,
    pub dport: u16,
}

/// A pointer to `N` bytes at `p` if they end before `data_end`. `data_end` is read opaquely so
/// the compiler cannot fold this into `parse`'s check: the verifier needs to see it here, with
/// a constant size, right before the access.
#[inline(always)]
pub fn l4_bytes<const N: usize>(p: *mut u8, data_end: &usize) -> Result<*mut [u8; N], ()> {
    // SAFETY: reading a field of a live struct.
    let end = unsafe { core::ptr::read_volatile(data_end) };
    if p as usize + N > end {
        return Err(());
    }
    Ok(p as *mut [u8; N])
}

/// Rewrites addresses and ports, decrements the TTL (hop limit) and fixes the checksums.
/// The caller has checked that the TTL is above 1. Fails, writing nothing, if the headers
/// are not (provably) in bounds.
#[inline(always)]
pub fn rewrite(pkt: &Packet, rw: &Rewrite) -> Result<(), ()> {
    if pkt.is_v6() {
        return rewrite_v6(pkt, rw);
    }
    rewrite_v4(pkt, rw)
}

/// As [`rewrite`], with the IPv6 half inlined too: for a caller that is itself a subprogram,
/// whose frame would otherwise have a third one stacked on it.
#[inline(always)]
pub fn rewrite_inlined(pkt: &Packet, rw: &Rewrite) -> Result<(), ()> {
    if pkt.is_v6() {
        return rewrite_v6_body(pkt, rw);
    }
    rewrite_v4(pkt, rw)
}

#[inline(always)]
fn rewrite_v4(pkt: &Packet, rw: &Rewrite) -> Result<(), ()> {
    let (src, dst) = (rw.src.v4_octets(), rw.dst.v4_octets());
    // SAFETY: the IPv4 header was bounds-checked by `parse`; the L4 bytes are checked in
    // `ports`, before anything is written.
    unsafe {
        let ip = &mut *(pkt.l3 as *mut Ipv4Hdr);
        let addrs = CsumDiff::new()
            .bytes4(&ip.src_addr, &src)
            .bytes4(&ip.dst_addr, &dst);
        ports(pkt, rw, addrs)?;
        let old_ttl_word = u16::from_ne_bytes([ip.ttl, ip.proto]);
        ip.ttl -= 1;
        let ip_diff = addrs.word(old_ttl_word, u16::from_ne_bytes([ip.ttl, ip.proto]));
        ip.check = ip_diff.apply(u16::from_ne_bytes(ip.check)).to_ne_bytes();
        ip.src_addr = src;
        ip.dst_addr = dst;
    }
    Ok(())
}

/// The IPv6 half of [`rewrite`]: no header checksum, the addresses in the L4 pseudo-header.
/// Not inlined: the IPv4 path's frame (the new-flow path's, close to the 512-byte stack)
/// does not carry this one's.
#[inline(never)]
fn rewrite_v6(pkt: &Packet, rw: &Rewrite) -> Result<(), ()> {
    rewrite_v6_body(pkt, rw)
}

#[inline(always)]
fn rewrite_v6_body(pkt: &Packet, rw: &Rewrite) -> Result<(), ()> {
    let ip = l3_bytes::<IPV6_HDR_LEN>(pkt.l3, &pkt.data_end)?;
    // SAFETY: 40 bytes in bounds, checked just above; the addresses are read and written as
    // unaligned words at offsets 8 and 24 inside them.
    unsafe {
        let base = ip as *mut u8;
        let at = |o: usize| base.add(o) as *mut u64;
        let addrs = CsumDiff::new()
            .word64(core::ptr::read_unaligned(at(8)), rw.src.lo)
            .word64(core::ptr::read_unaligned(at(16)), rw.src.hi)
            .word64(core::ptr::read_unaligned(at(24)), rw.dst.lo)
            .word64(core::ptr::read_unaligned(at(32)), rw.dst.hi);
        ports(pkt, rw, addrs)?;
        *base.add(7) -= 1;
        core::ptr::write_unaligned(at(8), rw.src.lo);
        core::ptr::write_unaligned(at(16), rw.src.hi);
        core::ptr::write_unaligned(at(24), rw.dst.lo);
        core::ptr::write_unaligned(at(32), rw.dst.hi);
    }
    Ok(())
}

/// Writes the ports and the L4 checksum (which covers the addresses too: `addrs`).
#[inline(always)]
fn ports(pkt: &Packet, rw: &Rewrite, addrs: CsumDiff) -> Result<(), ()> {
    let diff = addrs
        .word(pkt.key.sport, rw.sport)
        .word(pkt.key.dport, rw.dport);
    let sport = rw.sport.to_ne_bytes();
    let dport = rw.dport.to_ne_bytes();
    // SAFETY: the L4 bytes are bounds-checked right here, before anything is written.
    unsafe {
        if pkt.key.proto == PROTO_TCP {
            let h = &mut *l4_bytes::<TCP_HDR_LEN>(pkt.l4, &pkt.data_end)?;
            let c = diff.apply(u16::from_ne_bytes([h[16], h[17]])).to_ne_bytes();
            *h = [
                sport[0], sport[1], dport[0], dport[1], h[4], h[5], h[6], h[7], h[8], h[9], h[10],
                h[11], h[12], h[13], h[14], h[15], c[0], c[1], h[18], h[19],
            ];
        } else {
            let h = &mut *l4_bytes::<UDP_HDR_LEN>(pkt.l4, &pkt.data_end)?;
            let c = diff
                .apply_udp(u16::from_ne_bytes([h[6], h[7]]))
                .to_ne_bytes();
            h[0] = sport[0];
            h[1] = sport[1];
            h[2] = dport[0];
            h[3] = dport[1];
            h[6] = c[0];
            h[7] = c[1];
        }
    }
    Ok(())
}

/// A pointer to the IP header's first `N` bytes if they end before `data_end` (read
/// opaquely, as in [`l4_bytes`]).
#[inline(always)]
pub fn l3_bytes<const N: usize>(p: *mut u8, data_end: &usize) -> Result<*mut [u8; N], ()> {
    l4_bytes::<N>(p, data_end)
}

/// Decrements the TTL, fixing the IPv4 checksum (the caller has checked it is above 1).
/// IPv4 only: the benchmarks' ideal forwarder.
#[inline(always)]
pub fn decrement_ttl(pkt: &Packet) {
    // SAFETY: bounds-checked by `parse`.
    unsafe {
        let ip = &mut *(pkt.l3 as *mut Ipv4Hdr);
        let old = u16::from_ne_bytes([ip.ttl, ip.proto]);
        ip.ttl -= 1;
        let diff = CsumDiff::new().word(old, u16::from_ne_bytes([ip.ttl, ip.proto]));
        ip.check = diff.apply(u16::from_ne_bytes(ip.check)).to_ne_bytes();
    }
}

/// Decrements the TTL (IPv4, with its header checksum) or the hop limit (IPv6). The caller
/// has checked that it is above 1.
#[inline(always)]
pub fn decrement_hop_limit(pkt: &Packet) {
    if pkt.is_v6() {
        // SAFETY: bounds-checked by `parse` (the hop limit is byte 7 of the IPv6 header).
        unsafe { *pkt.l3.add(7) -= 1 };
    } else {
        decrement_ttl(pkt);
    }
}

/// The TTL (IPv6: hop limit) the packet arrived with.
#[inline(always)]
pub fn ttl(pkt: &Packet) -> u8 {
    // SAFETY: bounds-checked by `parse` (the hop limit is byte 7 of the IPv6 header, the TTL
    // byte 8 of the IPv4 one).
    unsafe {
        if pkt.is_v6() {
            *pkt.l3.add(7)
        } else {
            (*(pkt.l3 as *mut Ipv4Hdr)).ttl
        }
    }
}

/// Sets the Ethernet addresses.
#[inline(always)]
pub fn set_macs(pkt: &Packet, src: &[u8; 6], dst: &[u8; 6]) {
    // SAFETY: bounds-checked by `parse`.
    unsafe {
        (*pkt.eth).src_addr = *src;
        (*pkt.eth).dst_addr = *dst;
    }
}
