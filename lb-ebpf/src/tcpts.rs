//! TCP timestamps across full NAT.
//!
//! A SNAT address:port towards a backend is reused by flows of unrelated clients, while the
//! backend still holds the previous flow in TIME_WAIT (60 s). The backend accepts the new SYN
//! only if its timestamp is newer than the last one it saw on that 4-tuple (PAWS), and
//! clients start their timestamps at a random offset per connection: about half the reuses
//! were refused, each costing the client a one-second SYN retransmission. So each flow
//! shifts the client's TSval onto the balancer's millisecond clock (the shift fixed at the
//! SYN, kept in both conntrack entries) and shifts the echoed TSecr back: towards a backend,
//! timestamps then grow from flow to flow like those of a proxy's own connections.
//!
//! Only the option layouts that Linux, macOS and Windows send are recognised (timestamps
//! first after two NOPs, or after MSS and SACK-permitted / MSS, NOP, window scale in a SYN);
//! other layouts keep their timestamps.

use lb_common::csum::CsumDiff;

use crate::{nat::l4_bytes, parse::Packet};

/// The TCP header's first 40, 36 or 32 bytes: the most of them in bounds, as far as any
/// recognised layout reaches.
#[inline(always)]
fn header(pkt: &Packet) -> Option<&mut [u8]> {
    // SAFETY (all three): that many bytes are in bounds; the slice stays within them.
    if let Ok(h) = l4_bytes::<40>(pkt.l4, &pkt.data_end) {
        return Some(unsafe { &mut *h });
    }
    if let Ok(h) = l4_bytes::<36>(pkt.l4, &pkt.data_end) {
        return Some(unsafe { &mut *h });
    }
    if let Ok(h) = l4_bytes::<32>(pkt.l4, &pkt.data_end) {
        return Some(unsafe { &mut *h });
    }
    None
}

/// Offset of TSval in the TCP header `h`, for the recognised layouts (TSecr follows it).
#[inline(always)]
fn tsval_offset(h: &[u8]) -> Option<usize> {
    let doff = ((*h.get(12)? >> 4) as usize) * 4;
    let o = |i: usize| h.get(i).copied().unwrap_or(0);
    let ts_at = |i: usize| o(i) == 8 && o(i + 1) == 10;
    // NOP, NOP, TS: data segments of every common stack.
    if doff >= 32 && o(20) == 1 && o(21) == 1 && ts_at(22) {
        return Some(24);
    }
    if o(20) != 2 || o(21) != 4 {
        return None;
    }
    // MSS, then SACK-permitted or NOP NOP, then TS: Linux SYN and SYN-ACK.
    if doff >= 36 && ((o(24) == 4 && o(25) == 2) || (o(24) == 1 && o(25) == 1)) && ts_at(26) {
        return Some(28);
    }
    // MSS, NOP, window scale, NOP, NOP, TS: macOS SYN.
    if doff >= 40 && o(24) == 1 && o(25) == 3 && o(26) == 3 && o(28) == 1 && o(29) == 1 {
        if ts_at(30) {
            return Some(32);
        }
    }
    None
}

/// The TSval of a segment, if it has one in a recognised layout.
#[inline(always)]
pub fn tsval(pkt: &Packet) -> Option<u32> {
    let h = header(pkt)?;
    let i = tsval_offset(h)?;
    let &[b0, b1, b2, b3] = h.get(i..i + 4)? else {
        return None;
    };
    Some(u32::from_be_bytes([b0, b1, b2, b3]))
}

/// Which timestamp field to shift.
#[derive(Clone, Copy)]
pub enum Field {
    /// The sender's clock: client → backend.
    Val,
    /// The echo of the peer's clock: backend → client.
    Ecr,
}

/// Adds `delta` to one timestamp field of a (rewritten) TCP segment, fixing the checksum.
/// Segments without a recognised timestamp option are left alone.
#[inline(always)]
pub fn shift(pkt: &Packet, field: Field, delta: u32) {
    if delta == 0 {
        return;
    }
    let Some(h) = header(pkt) else {
        return;
    };
    let Some(at) = tsval_offset(h) else {
        return;
    };
    let i = match field {
        Field::Val => at,
        Field::Ecr => at + 4,
    };
    // Slices from `get`, never indexing that could panic: a panicking path is code the
    // verifier rejects.
    let (Some(&[c0, c1]), Some(&[b0, b1, b2, b3])) = (h.get(16..18), h.get(i..i + 4)) else {
        return;
    };
    let old = [b0, b1, b2, b3];
    let new = u32::from_be_bytes(old).wrapping_add(delta).to_be_bytes();
    // Every recognised offset is even: the field is made of two whole checksum words.
    let c = CsumDiff::new()
        .bytes4(&old, &new)
        .apply(u16::from_ne_bytes([c0, c1]))
        .to_ne_bytes();
    if let Some([b0, b1, b2, b3]) = h.get_mut(i..i + 4) {
        (*b0, *b1, *b2, *b3) = (new[0], new[1], new[2], new[3]);
    }
    if let Some([c0, c1]) = h.get_mut(16..18) {
        (*c0, *c1) = (c[0], c[1]);
    }
}
