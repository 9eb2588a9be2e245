//! L4 signals per backend: connect failures (reset, timeout) and time to first byte. Taken
//! only on the packets that carry them — a SYN retransmission, the first payload each way, a
//! reset before the backend's first byte — and marked as taken in the flow's entries, so an
//! ordinary data packet pays one byte test per direction.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    conntrack::{CtValue, RnatValue, Segment, signal, state},
    stats::{L4Stats, first_byte_bucket},
};

use crate::{
    conntrack,
    maps::{LB_BACKEND_L4, LB_REVERSE_NAT},
    parse::{Packet, TCP_RST},
};

/// This CPU's L4 counters of a backend.
#[inline(always)]
fn stats(backend_id: u32) -> Option<&'static mut L4Stats> {
    let s = LB_BACKEND_L4.get_ptr_mut(backend_id)?;
    // SAFETY: per-CPU slot: only this CPU writes it while the program runs.
    Some(unsafe { &mut *s })
}

/// A client packet of a tracked TCP flow whose request has not been seen yet: a SYN again
/// while the flow waits for its SYN-ACK is a connect timeout (counted once per flow); the
/// first payload starts the backend's time to first byte.
#[inline(always)]
pub fn from_client(pkt: &Packet, e: &mut CtValue, syn: bool) {
    if syn {
        if e.state == state::SYN && e.signals & signal::TIMEOUT == 0 {
            e.signals |= signal::TIMEOUT;
            if let Some(s) = stats(e.backend_id) {
                s.connect_timeout += 1;
            }
        }
        return;
    }
    match pkt.tcp_segment() {
        Some(seg) if seg.payload_len > 0 => {}
        _ => return,
    }
    e.signals |= signal::REQUEST;
    let rkey = conntrack::reverse_key(e, &pkt.key);
    if let Some(r) = LB_REVERSE_NAT.get_ptr_mut(&rkey) {
        // SAFETY: LRU entry; plain integers.
        let r = unsafe { &mut *r };
        if r.request_ns == 0 {
            // SAFETY: helper without arguments.
            r.request_ns = unsafe { bpf_ktime_get_ns() };
        }
    }
}

/// A backend segment (already judged in window) of a flow not answered yet: a reset before
/// the first payload byte is a connect failure; the first payload ends the time to first
/// byte.
#[inline(always)]
pub fn from_backend(e: &mut RnatValue, seg: &Segment) {
    if seg.flags & TCP_RST != 0 {
        e.signals |= signal::ANSWERED;
        if let Some(s) = stats(e.backend_id) {
            s.connect_reset += 1;
        }
        return;
    }
    if seg.payload_len == 0 {
        return;
    }
    e.signals |= signal::ANSWERED;
    let Some(s) = stats(e.backend_id) else {
        return;
    };
    s.answered += 1;
    if e.request_ns == 0 {
        // The backend spoke first (a server-first protocol): no request to time it from.
        return;
    }
    // SAFETY: helper without arguments.
    let ns = unsafe { bpf_ktime_get_ns() }.saturating_sub(e.request_ns);
    {
        s.first_byte_sum_ns += ns;
        if let Some(b) = s.first_byte.get_mut(first_byte_bucket(ns)) {
            *b += 1;
        }
    }
}
