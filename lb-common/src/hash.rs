//! The flow hash that picks a Maglev bucket. It lives here, once, because the kernel uses it
//! per new flow and userspace (`explain`) must compute the very same bucket.

use crate::{
    TABLE_SIZE,
    flow::{FlowKey, IpBytes},
};

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;
/// Fixed seed: two hosts with one config must send a flow to the same backend.
const SEED: u32 = 0x4c42_2d31; // "LB-1"

#[inline(always)]
fn mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// The address's four 32-bit words, each its bytes read little-endian.
#[inline(always)]
fn words(a: &IpBytes) -> [u32; 4] {
    let (l, h) = (a.lo.to_ne_bytes(), a.hi.to_ne_bytes());
    [
        u32::from_le_bytes([l[0], l[1], l[2], l[3]]),
        u32::from_le_bytes([l[4], l[5], l[6], l[7]]),
        u32::from_le_bytes([h[0], h[1], h[2], h[3]]),
        u32::from_le_bytes([h[4], h[5], h[6], h[7]]),
    ]
}

/// MurmurHash3 (x86, 32-bit) over the flow's addresses, ports, protocol and family.
/// Straight-line code: no loops for the verifier, ~10 multiply rounds.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    let mut h = SEED;
    let (s, d) = (words(&key.src), words(&key.dst));
    h = mix(h, s[0]);
    h = mix(h, s[1]);
    h = mix(h, s[2]);
    h = mix(h, s[3]);
    h = mix(h, d[0]);
    h = mix(h, d[1]);
    h = mix(h, d[2]);
    h = mix(h, d[3]);
    h = mix(h, (key.sport as u32) | ((key.dport as u32) << 16));
    h = mix(h, (key.proto as u32) | ((key.family as u32) << 8));
    h ^= 40;
    // fmix32: every input bit affects every output bit.
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The Maglev bucket a new flow with this key lands in.
#[inline(always)]
pub fn bucket(key: &FlowKey) -> u32 {
    flow_hash(key) % TABLE_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::v4;

    fn key(client: [u8; 4], port: u16) -> FlowKey {
        FlowKey {
            src: v4(client),
            dst: v4([10, 99, 0, 10]),
            sport: port.to_be(),
            dport: 80u16.to_be(),
            proto: crate::PROTO_TCP,
            family: crate::FAMILY_V4,
            _pad: 0,
        }
    }

    #[test]
    fn known_vector_is_stable() {
        // Pinned so that a change of the hash (which would move every flow on an upgrade
        // and break `explain` against a running kernel program) is a deliberate decision.
        assert_eq!(flow_hash(&key([10, 0, 0, 1], 40000)), 0x7841_49dd);
    }

    #[test]
    fn neighbouring_ports_spread_over_buckets() {
        let mut seen = [0u32; 16];
        for p in 0..16_000u16 {
            seen[(bucket(&key([192, 168, 1, 7], 20000 + p)) % 16) as usize] += 1;
        }
        for n in seen {
            assert!((900..1100).contains(&n), "uneven spread: {seen:?}");
        }
    }
}
