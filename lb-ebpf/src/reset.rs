//! A reset to a backend for a connection it still holds on a SNAT address:port that a new
//! flow now uses.
//!
//! A SNAT port goes to a new flow once its old flow is over or — in a SYN flood — once a
//! half-open flow has waited `tcp_syn_reclaim` for its client. The backend may still hold the
//! old connection on the same four-tuple: a half-open one (its SYN queue entry, which keeps
//! retransmitting its SYN-ACK for about a minute) or one whose end it never saw. It then
//! answers the new flow's SYN with an ACK of the old connection (RFC 793's answer to a SYN
//! outside a half-open connection's window; RFC 5961's challenge ACK for an established
//! one). The new flow's client can do nothing with it, and every SYN it retransmits gets the
//! same answer until the old connection times out: the client's connect fails.
//!
//! A client would answer such an ACK with a reset taking its sequence number from the ACK
//! field ("if the connection is in any non-synchronized state … a reset is sent", RFC 793).
//! The balancer owns the SNAT end of the four-tuple and sends that reset itself, back out
//! of the interface the ACK came in on: the backend drops the old connection, and the
//! client's SYN, retransmitted a second later, opens the new one.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_tail, programs::XdpContext};
use lb_common::stats::Stat;

use crate::parse::{IPV6_HDR_LEN, Packet, TCP_HDR_LEN};

const ETH_HLEN: usize = 14;
const IPV4_HDR_LEN: usize = 20;
const TCP_RST: u8 = 0x04;
/// TTL (hop limit) of the reset: it is a new packet of this host's, not a forwarded one.
const TTL: u8 = 64;

/// Turns the backend's stale ACK `pkt` into the reset that ends the connection it belongs
/// to (sequence number `ack`, the ACK's acknowledgment number) and sends it back. A packet
/// with IPv4 options, IPv6 extension headers or a VLAN tag is dropped instead (counted as
/// out of window, as before): a backend's ACK has none of them.
#[inline(always)]
pub fn stale_backend(ctx: &XdpContext, pkt: &Packet, ack: u32) -> u32 {
    match make_reset(ctx, pkt, ack) {
        Ok(()) => {
            crate::stats::bump(Stat::BackendStaleReset);
            xdp_action::XDP_TX
        }
        Err(()) => crate::drop(Stat::ReturnOutOfWindow),
    }
}

#[inline(always)]
fn make_reset(ctx: &XdpContext, pkt: &Packet, seq: u32) -> Result<(), ()> {
    let ip_len = if pkt.is_v6() {
        IPV6_HDR_LEN
    } else {
        IPV4_HDR_LEN
    };
    let data = ctx.data();
    if pkt.l3 as usize != data + ETH_HLEN || pkt.l4 as usize != data + ETH_HLEN + ip_len {
        return Err(());
    }
    // Options and payload go: a reset carries neither (a timestamp option could make a
    // TIME-WAIT socket reject it).
    let len = ctx.data_end() - data;
    let want = ETH_HLEN + ip_len + TCP_HDR_LEN;
    if len > want {
        // SAFETY: helper call with this program's context; a negative delta shrinks the
        // frame, and every packet pointer is derived again below.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((len - want) as i32)) } != 0 {
            return Err(());
        }
    }
    if pkt.is_v6() {
        reset_v6(ctx, seq)
    } else {
        reset_v4(ctx, seq)
    }
}

/// The frame's first `N` bytes, if it has them.
#[inline(always)]
fn frame<const N: usize>(ctx: &XdpContext) -> Result<&mut [u8; N], ()> {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + N > end {
        return Err(());
    }
    // SAFETY: `N` bytes from `data` are inside the frame (checked just above).
    Ok(unsafe { &mut *(data as *mut [u8; N]) })
}

/// Swaps `n` bytes at `a` with those at `b`.
#[inline(always)]
fn swap<const N: usize>(f: &mut [u8; N], a: usize, b: usize, n: usize) {
    let mut i = 0;
    while i < n {
        f.swap(a + i, b + i);
        i += 1;
    }
}

/// The one's complement sum of `f[from..to]` as 16-bit words in memory order (added to
/// `acc`, not folded). The bytes are read afresh (volatile): left to itself the compiler
/// keeps every byte it swapped earlier in a register for this, and spills them all to a
/// stack frame the verifier's 512-byte limit has no room for.
#[inline(always)]
fn sum<const N: usize>(f: &[u8; N], from: usize, to: usize, mut acc: u32) -> u32 {
    let mut i = from;
    while i + 1 < to && i + 1 < N {
        // SAFETY: both indexes are below N, inside the array.
        let (a, b) = unsafe {
            (
                core::ptr::read_volatile(f.as_ptr().add(i)),
                core::ptr::read_volatile(f.as_ptr().add(i + 1)),
            )
        };
        acc += u16::from_ne_bytes([a, b]) as u32;
        i += 2;
    }
    acc
}

/// The Internet checksum of a sum, as the bytes to store.
#[inline(always)]
fn checksum(mut acc: u32) -> [u8; 2] {
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    (!(acc as u16)).to_ne_bytes()
}

/// Writes the TCP reset header at `at` (ports swapped, sequence `seq`, nothing else).
#[inline(always)]
fn tcp_reset<const N: usize>(f: &mut [u8; N], at: usize, seq: u32) {
    swap(f, at, at + 2, 2);
    let s = seq.to_be_bytes();
    f[at + 4] = s[0];
    f[at + 5] = s[1];
    f[at + 6] = s[2];
    f[at + 7] = s[3];
    let mut i = at + 8;
    while i < at + TCP_HDR_LEN {
        f[i] = 0;
        i += 1;
    }
    // Data offset 5 words (no options), only RST: no ACK, as for a segment that had one.
    f[at + 12] = 5 << 4;
    f[at + 13] = TCP_RST;
}

/// Writes the checksum of the TCP header at `tcp` (20 bytes, no payload), over the
/// pseudo-header of the addresses in `f[addrs.0..addrs.1]` (source, then destination).
#[inline(always)]
fn tcp_checksum<const N: usize>(f: &mut [u8; N], addrs: (usize, usize), tcp: usize) {
    let pseudo = sum(f, addrs.0, addrs.1, 0)
        + u16::from_ne_bytes([0, lb_common::PROTO_TCP]) as u32
        + u16::from_ne_bytes((TCP_HDR_LEN as u16).to_be_bytes()) as u32;
    let c = checksum(sum(f, tcp, tcp + TCP_HDR_LEN, pseudo));
    f[tcp + 16] = c[0];
    f[tcp + 17] = c[1];
}

#[inline(always)]
fn reset_v4(ctx: &XdpContext, seq: u32) -> Result<(), ()> {
    const IP: usize = ETH_HLEN;
    const TCP: usize = IP + IPV4_HDR_LEN;
    let f = frame::<{ TCP + TCP_HDR_LEN }>(ctx)?;
    swap(f, 0, 6, 6);
    let total = ((IPV4_HDR_LEN + TCP_HDR_LEN) as u16).to_be_bytes();
    f[IP + 2] = total[0];
    f[IP + 3] = total[1];
    f[IP + 8] = TTL;
    swap(f, IP + 12, IP + 16, 4);
    f[IP + 10] = 0;
    f[IP + 11] = 0;
    let c = checksum(sum(f, IP, TCP, 0));
    f[IP + 10] = c[0];
    f[IP + 11] = c[1];
    tcp_reset(f, TCP, seq);
    tcp_checksum(f, (IP + 12, IP + 20), TCP);
    Ok(())
}

#[inline(always)]
fn reset_v6(ctx: &XdpContext, seq: u32) -> Result<(), ()> {
    const IP: usize = ETH_HLEN;
    const TCP: usize = IP + IPV6_HDR_LEN;
    let f = frame::<{ TCP + TCP_HDR_LEN }>(ctx)?;
    swap(f, 0, 6, 6);
    let payload = (TCP_HDR_LEN as u16).to_be_bytes();
    f[IP + 4] = payload[0];
    f[IP + 5] = payload[1];
    f[IP + 7] = TTL;
    swap(f, IP + 8, IP + 24, 16);
    tcp_reset(f, TCP, seq);
    tcp_checksum(f, (IP + 8, IP + 40), TCP);
    Ok(())
}
