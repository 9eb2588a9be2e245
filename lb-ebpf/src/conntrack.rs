//! Flow state and idle timeouts. The forward (conntrack) and reverse (NAT) entries of one flow
//! are kept in step: a state change or a refresh on one side is copied to the other, so both
//! expire together, and lbd's flow collector never frees a SNAT port while its flow still
//! runs.

use lb_common::{PROTO_TCP, conntrack::state};

use crate::parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

use lb_common::conntrack::REFRESH_NS;

/// Whether an entry last refreshed at `last_seen` is refreshed by a packet at `now`.
#[inline(always)]
pub fn needs_refresh(last_seen: u64, now: u64) -> bool {
    now.saturating_sub(last_seen) > REFRESH_NS
}

/// Whether `flags` is a connection-opening SYN (SYN without ACK).
#[inline(always)]
pub fn is_syn(flags: u8) -> bool {
    flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

pub use lb_common::conntrack::alive;

/// Applies one packet to an entry's state and timestamp; returns whether anything changed
/// (and so must be copied to the flow's other entry).
#[inline(always)]
pub fn observe(
    last_seen: &mut u64,
    st: &mut u8,
    flags: u8,
    proto: u8,
    from_client: bool,
    now: u64,
) -> bool {
    let mut changed = false;
    if proto == PROTO_TCP {
        if flags & (TCP_FIN | TCP_RST) != 0 {
            if *st != state::CLOSING {
                *st = state::CLOSING;
                changed = true;
            }
        } else if *st == state::SYN && from_client && flags & TCP_SYN == 0 {
            *st = state::ESTABLISHED;
            changed = true;
        }
    }
    // A half-open flow lives on its client's SYNs alone: the backend's SYN-ACK retransmissions
    // (a minute of them from its SYN queue) say nothing of whether the client is still there.
    // Refreshed by them, a SYN flood's flows became young again a second after they began,
    // just as new flows came round for their ports, and those new flows were refused.
    let half_open_answer = proto == PROTO_TCP && *st == state::SYN && !from_client;
    if changed || (!half_open_answer && needs_refresh(*last_seen, now)) {
        *last_seen = now;
        changed = true;
    }
    changed
}

/// Copies a change to the flow's other entry (states only move forward: SYN → ESTABLISHED →
/// CLOSING).
#[inline(always)]
pub fn sync(last_seen: &mut u64, st: &mut u8, from_last_seen: u64, from_st: u8) {
    *last_seen = from_last_seen;
    if from_st > *st {
        *st = from_st;
    }
}

pub use lb_common::conntrack::{forward_key, reverse_key};
