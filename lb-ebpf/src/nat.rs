//! Full-NAT rewrite of an IPv4 TCP/UDP packet with incremental checksum updates.

use lb_common::{PROTO_TCP, csum::CsumDiff};

use crate::parse::{Packet, TCP_HDR_LEN, UDP_HDR_LEN};

/// The new addresses and ports (ports in network byte order).
pub struct Rewrite {
    pub src: [u8; 4],
    pub dst: [u8; 4],
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

/// Rewrites addresses and ports, decrements the TTL and fixes both checksums.
/// The caller has checked that the TTL is above 1. Fails, writing nothing, if the L4 header
/// is not (provably) in bounds.
#[inline(always)]
pub fn rewrite(pkt: &Packet, rw: &Rewrite) -> Result<(), ()> {
    // SAFETY: `ip` was bounds-checked by `parse`; the L4 bytes are checked just below, before
    // anything is written.
    unsafe {
        let ip = &mut *pkt.ip;
        let addrs = CsumDiff::new()
            .bytes4(&ip.src_addr, &rw.src)
            .bytes4(&ip.dst_addr, &rw.dst);
        let ports = addrs
            .word(pkt.key.sport, rw.sport)
            .word(pkt.key.dport, rw.dport);
        let sport = rw.sport.to_ne_bytes();
        let dport = rw.dport.to_ne_bytes();
        if pkt.key.proto == PROTO_TCP {
            let h = &mut *l4_bytes::<TCP_HDR_LEN>(pkt.l4, &pkt.data_end)?;
            let c = ports
                .apply(u16::from_ne_bytes([h[16], h[17]]))
                .to_ne_bytes();
            *h = [
                sport[0], sport[1], dport[0], dport[1], h[4], h[5], h[6], h[7], h[8], h[9], h[10],
                h[11], h[12], h[13], h[14], h[15], c[0], c[1], h[18], h[19],
            ];
        } else {
            let h = &mut *l4_bytes::<UDP_HDR_LEN>(pkt.l4, &pkt.data_end)?;
            let c = ports
                .apply_udp(u16::from_ne_bytes([h[6], h[7]]))
                .to_ne_bytes();
            h[0] = sport[0];
            h[1] = sport[1];
            h[2] = dport[0];
            h[3] = dport[1];
            h[6] = c[0];
            h[7] = c[1];
        }
        let old_ttl_word = u16::from_ne_bytes([ip.ttl, ip.proto]);
        ip.ttl -= 1;
        let ip_diff = addrs.word(old_ttl_word, u16::from_ne_bytes([ip.ttl, ip.proto]));
        ip.check = ip_diff.apply(u16::from_ne_bytes(ip.check)).to_ne_bytes();
        ip.src_addr = rw.src;
        ip.dst_addr = rw.dst;
    }
    Ok(())
}

/// Decrements the TTL, fixing the IPv4 checksum (the caller has checked it is above 1).
#[inline(always)]
pub fn decrement_ttl(pkt: &Packet) {
    // SAFETY: bounds-checked by `parse`.
    unsafe {
        let ip = &mut *pkt.ip;
        let old = u16::from_ne_bytes([ip.ttl, ip.proto]);
        ip.ttl -= 1;
        let diff = CsumDiff::new().word(old, u16::from_ne_bytes([ip.ttl, ip.proto]));
        ip.check = diff.apply(u16::from_ne_bytes(ip.check)).to_ne_bytes();
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
