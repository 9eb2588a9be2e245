//! Full-NAT rewrite of an IPv4 TCP/UDP packet with incremental checksum updates.

use lb_common::{PROTO_TCP, csum::CsumDiff};

use crate::parse::Packet;

/// The new addresses and ports (ports in network byte order).
pub struct Rewrite {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: u16,
    pub dport: u16,
}

/// Rewrites addresses and ports, decrements the TTL and fixes both checksums.
/// The caller has checked that the TTL is above 1.
#[inline(always)]
pub fn rewrite(pkt: &Packet, rw: &Rewrite) {
    // SAFETY: `ip` and the first 20 (TCP) / 8 (UDP) bytes at `l4` were bounds-checked by
    // `parse`; every access below stays inside them.
    unsafe {
        let ip = &mut *pkt.ip;
        let addrs = CsumDiff::new()
            .bytes4(&ip.src_addr, &rw.src)
            .bytes4(&ip.dst_addr, &rw.dst);
        let old_ttl_word = u16::from_ne_bytes([ip.ttl, ip.proto]);
        ip.ttl -= 1;
        let ip_diff = addrs.word(old_ttl_word, u16::from_ne_bytes([ip.ttl, ip.proto]));
        let c = ip_diff.apply(u16::from_ne_bytes(ip.check));
        ip.check = c.to_ne_bytes();
        ip.src_addr = rw.src;
        ip.dst_addr = rw.dst;

        let l4 = pkt.l4;
        let ports = addrs
            .word(pkt.key.sport, rw.sport)
            .word(pkt.key.dport, rw.dport);
        (l4 as *mut u16).write_unaligned(rw.sport);
        (l4.add(2) as *mut u16).write_unaligned(rw.dport);
        if pkt.key.proto == PROTO_TCP {
            let p = l4.add(16) as *mut u16;
            p.write_unaligned(ports.apply(p.read_unaligned()));
        } else {
            let p = l4.add(6) as *mut u16;
            p.write_unaligned(ports.apply_udp(p.read_unaligned()));
        }
    }
}

/// The TTL the packet arrived with.
#[inline(always)]
pub fn ttl(pkt: &Packet) -> u8 {
    // SAFETY: bounds-checked by `parse`.
    unsafe { (*pkt.ip).ttl }
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
