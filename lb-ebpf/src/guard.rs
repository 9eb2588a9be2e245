//! What may open a flow: SYNs whose flags, header and source a real client can send. A
//! flood of crafted SYNs must not create conntrack entries, take SNAT ports or reach a
//! backend; each refusal is counted by its reason.

use aya_ebpf::{
    cty::c_void, helpers::bpf_xdp_load_bytes, maps::lpm_trie::Key, programs::XdpContext,
};
use lb_common::{flow::FlowKey, guard::SourceAddr, stats::Stat};

use crate::{
    maps::LB_SOURCES,
    parse::{Packet, TCP_FIN, TCP_RST},
};

const TCP_URG: u8 = 0x20;
/// Longest TCP header (data offset 15).
const MAX_TCP_HDR: usize = 60;

/// One byte of the TCP header at `off`, if it is in the packet.
#[inline(always)]
fn tcp_byte(pkt: &Packet, off: usize) -> Option<u8> {
    if off >= MAX_TCP_HDR {
        return None;
    }
    // SAFETY: reading a field of a live struct, opaquely, so that the check below stays
    // next to the access for the verifier.
    let end = unsafe { core::ptr::read_volatile(&pkt.data_end) };
    let p = pkt.l4 as usize + off;
    if p + 1 > end {
        return None;
    }
    // SAFETY: in bounds, checked just above.
    Some(unsafe { *(p as *const u8) })
}

/// Walks the options of a TCP header of `hdr_len` bytes: `Err` unless every option but EOL
/// and NOP has a length of at least 2 that ends inside the header; else the window scale
/// the segment offers (0 without the option).
///
/// The options are copied to the stack first: a walk over packet bytes gives the verifier a
/// packet range per path that it cannot prune, and exceeded its instruction budget.
#[inline(always)]
fn options(ctx: &XdpContext, pkt: &Packet, hdr_len: usize) -> Result<u8, ()> {
    let n = hdr_len.saturating_sub(20);
    if n == 0 {
        return Ok(0);
    }
    if n > 40 {
        return Err(());
    }
    // In a form the verifier can bound (1..=64) whatever the compiler made of the checks
    // above (read opaquely, so the mask is not folded away); for n in 1..=40 it is n.
    let n32 = n as u32;
    // SAFETY: reading a local.
    let n32 = unsafe { core::ptr::read_volatile(&n32) };
    let len = (n32.wrapping_sub(1) & 63) + 1;
    // Left uninitialised (zeroing it would be a byte-loop `memset` call): the helper fills
    // the first `len` bytes, and only those are read.
    let mut buf = core::mem::MaybeUninit::<[u8; 64]>::uninit();
    let offset = (pkt.l4 as usize - ctx.data() + 20) as u32;
    // SAFETY: the helper writes at most `len` ≤ 64 bytes into the 64-byte buffer.
    let rc = unsafe { bpf_xdp_load_bytes(ctx.ctx, offset, buf.as_mut_ptr() as *mut c_void, len) };
    if rc != 0 {
        return Err(());
    }
    // SAFETY: the first `n` bytes are initialised, and the walk reads no others.
    let b: &[u8; 64] = unsafe { buf.assume_init_ref() };
    // A byte-at-a-time state machine over positions 0..n: each byte's position is the loop
    // counter, never a value read from the packet, so the verifier walks 40 positions
    // instead of every way the options could be laid out (it gave up on that: "sequence of
    // jumps is too complex").
    let mut skip = 0u32; // bytes of the current option still to come
    let mut want_len = false; // the next byte is an option's length
    let mut want_ws = false; // the next byte is the window scale shift
    let mut is_ws = false; // the option being read is window scale
    let mut wscale = 0u8;
    for i in 0..40usize {
        if i >= n {
            break;
        }
        let c = b[i];
        if want_len {
            want_len = false;
            if c < 2 {
                return Err(());
            }
            skip = c as u32 - 2;
            want_ws = is_ws && c == 3;
        } else if skip > 0 {
            skip -= 1;
            if want_ws {
                wscale = c;
                want_ws = false;
            }
        } else if c == 0 {
            return Ok(wscale);
        } else if c != 1 {
            want_len = true;
            is_ws = c == 3;
        }
    }
    // An option whose length byte or body is missing ran past the header.
    if want_len || skip > 0 {
        Err(())
    } else {
        Ok(wscale)
    }
}

/// Refuses a SYN no real client sends: SYN with FIN, RST or URG; a data offset below 5 or
/// past the segment; options that do not parse. Returns the window scale the SYN offers.
/// Not inlined: the option walk's registers and spills get a frame of their own.
#[inline(never)]
pub fn check_syn(ctx: &XdpContext, pkt: &Packet) -> Result<u8, Stat> {
    if pkt.tcp_flags & (TCP_FIN | TCP_RST | TCP_URG) != 0 {
        return Err(Stat::BadTcpFlags);
    }
    let doff = tcp_byte(pkt, 12).ok_or(Stat::BadTcpHeader)? >> 4;
    let hdr_len = doff as usize * 4;
    let segment = pkt.l4_len as usize;
    if doff < 5 || hdr_len > segment || tcp_byte(pkt, hdr_len - 1).is_none() {
        return Err(Stat::BadTcpHeader);
    }
    options(ctx, pkt, hdr_len).map_err(|()| Stat::BadTcpHeader)
}

/// Refuses a new flow from a source no client has, or from a backend-side subnet arriving
/// on another interface than that subnet's (the source guard map, which userspace fills).
/// Not inlined: its key gets a stack frame of its own instead of adding to the new-flow
/// path's.
#[inline(never)]
pub fn check_source(ctx: &XdpContext, key: &FlowKey) -> Result<(), Stat> {
    let k = Key::new(
        SourceAddr::HEADER_BITS + 128,
        SourceAddr {
            family: key.family as u32,
            _pad: 0,
            addr: key.src,
        },
    );
    match LB_SOURCES.get(&k) {
        Some(rule) if rule.ifindex == 0 || rule.ifindex != ctx.ingress_ifindex() as u32 => {
            Err(Stat::SpoofedSource)
        }
        _ => Ok(()),
    }
}
