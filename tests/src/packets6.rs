//! IPv6 frames for BPF_PROG_TEST_RUN fixtures: built and checked with etherparse, like
//! [`crate::packets`]' IPv4 ones, with optional extension headers in front of TCP/UDP.

use etherparse::{EtherType, Ethernet2Header, IpNumber, Ipv6Header, TcpHeader, UdpHeader};

use crate::packets::{CLIENT_MAC, Flags, LB_MAC};

/// An IPv6 address and a port.
pub type Endpoint6 = ([u8; 16], u16);

/// `fd00:<net>::<host>`: the fixtures' addresses.
pub const fn addr6(net: u16, host: u16) -> [u8; 16] {
    let n = net.to_be_bytes();
    let h = host.to_be_bytes();
    [
        0xfd, 0, n[0], n[1], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, h[0], h[1],
    ]
}

/// An extension header of `next`'s chain: its type and its bytes (next-header byte, length,
/// options), as [`hop_by_hop`] or [`dest_opts`] make them.
pub struct Ext {
    pub kind: u8,
    pub bytes: Vec<u8>,
}

/// An 8-byte hop-by-hop options header holding one PadN option.
pub fn hop_by_hop() -> Ext {
    Ext {
        kind: 0,
        bytes: vec![0, 0, 1, 4, 0, 0, 0, 0],
    }
}

/// A destination options header of `8 * (1 + extra)` bytes, padded with PadN.
pub fn dest_opts(extra: u8) -> Ext {
    let len = 8 * (1 + extra as usize);
    let mut bytes = vec![0, extra, 1, (len - 4) as u8];
    bytes.resize(len, 0);
    Ext { kind: 60, bytes }
}

/// A fragment header (offset 0, more fragments).
pub fn fragment() -> Ext {
    Ext {
        kind: 44,
        bytes: vec![0, 0, 0, 1, 0, 0, 0x12, 0x34],
    }
}

/// A type-0 routing header with `left` segments left (one address listed).
pub fn routing(left: u8) -> Ext {
    let mut bytes = vec![0, 2, 0, left, 0, 0, 0, 0];
    bytes.extend_from_slice(&addr6(99, 1));
    Ext { kind: 43, bytes }
}

/// An Ethernet/IPv6 frame from `smac` carrying `exts` then the L4 bytes `l4` of protocol
/// `proto` (checksum already right), hop limit 64.
fn frame(
    smac: [u8; 6],
    (src, dst): ([u8; 16], [u8; 16]),
    exts: &[Ext],
    proto: u8,
    l4: &[u8],
) -> Vec<u8> {
    let mut chain = Vec::new();
    for (i, e) in exts.iter().enumerate() {
        let mut b = e.bytes.clone();
        b[0] = exts.get(i + 1).map_or(proto, |n| n.kind);
        chain.extend_from_slice(&b);
    }
    let h = Ipv6Header {
        traffic_class: 0,
        flow_label: Default::default(),
        payload_length: (chain.len() + l4.len()) as u16,
        next_header: IpNumber(exts.first().map_or(proto, |e| e.kind)),
        hop_limit: 64,
        source: src,
        destination: dst,
    };
    let mut out = Vec::new();
    Ethernet2Header {
        source: smac,
        destination: LB_MAC,
        ether_type: EtherType::IPV6,
    }
    .write(&mut out)
    .unwrap();
    h.write(&mut out).unwrap();
    out.extend_from_slice(&chain);
    out.extend_from_slice(l4);
    out
}

/// An Ethernet/IPv6/TCP frame (sequence 1000, as [`crate::packets::tcp`]'s, or `seq_ack`)
/// from `smac`, behind `exts`, with a correct checksum.
pub fn tcp6_full(
    smac: [u8; 6],
    src: Endpoint6,
    dst: Endpoint6,
    f: Flags,
    (seq, ack): (u32, u32),
    payload: &[u8],
    exts: &[Ext],
) -> Vec<u8> {
    let mut t = crate::packets::tcp_header(src.1, dst.1, f, (seq, ack));
    t.checksum = t.calc_checksum_ipv6_raw(src.0, dst.0, payload).unwrap();
    let mut l4 = Vec::new();
    t.write(&mut l4).unwrap();
    l4.extend_from_slice(payload);
    frame(smac, (src.0, dst.0), exts, 6, &l4)
}

/// A client's IPv6 TCP segment with TCP `options` (sequence 1000; acknowledgment 1 when ACK
/// is set), checksum right.
pub fn tcp6_opts(
    src: Endpoint6,
    dst: Endpoint6,
    f: Flags,
    options: &[crate::packets::TcpOptionElement],
) -> Vec<u8> {
    let mut t = crate::packets::tcp_header(src.1, dst.1, f, (1000, f.ack as u32));
    t.set_options(options).expect("options fit");
    t.checksum = t.calc_checksum_ipv6_raw(src.0, dst.0, &[]).unwrap();
    let mut l4 = Vec::new();
    t.write(&mut l4).unwrap();
    frame(CLIENT_MAC, (src.0, dst.0), &[], 6, &l4)
}

/// The same IPv6 frame (no extension headers) with its TCP bytes changed by `f` (flags, data
/// offset, appended options), the payload length and TCP checksum made to fit again.
pub fn with_tcp6_bytes(frame: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let (h, _) = Ipv6Header::from_slice(&frame[14..]).expect("an IPv6 frame");
    let mut seg = frame[14 + 40..].to_vec();
    f(&mut seg);
    seg[16] = 0;
    seg[17] = 0;
    let c = csum6(&h.source, &h.destination, 6, &seg);
    seg[16..18].copy_from_slice(&c.to_be_bytes());
    let mut out = frame[..14 + 40].to_vec();
    out[14 + 4..14 + 6].copy_from_slice(&(seg.len() as u16).to_be_bytes());
    out.extend_from_slice(&seg);
    out
}

/// The TCP timestamp option (TSval, TSecr) of an IPv6 frame (no extension headers).
pub fn timestamps6(frame: &[u8]) -> Option<(u32, u32)> {
    let (t, _) = TcpHeader::from_slice(frame.get(14 + 40..)?).ok()?;
    t.options_iterator().find_map(|o| match o {
        Ok(crate::packets::TcpOptionElement::Timestamp(v, e)) => Some((v, e)),
        _ => None,
    })
}

/// A client's IPv6 TCP segment (sequence 1000; acknowledgment 1 when ACK is set).
pub fn tcp6(src: Endpoint6, dst: Endpoint6, f: Flags) -> Vec<u8> {
    tcp6_full(CLIENT_MAC, src, dst, f, (1000, f.ack as u32), b"", &[])
}

/// An Ethernet/IPv6/UDP frame from `smac` with a correct checksum.
pub fn udp6(smac: [u8; 6], src: Endpoint6, dst: Endpoint6, payload: &[u8]) -> Vec<u8> {
    let h = Ipv6Header {
        traffic_class: 0,
        flow_label: Default::default(),
        payload_length: (8 + payload.len()) as u16,
        next_header: IpNumber::UDP,
        hop_limit: 64,
        source: src.0,
        destination: dst.0,
    };
    let u = UdpHeader::with_ipv6_checksum(src.1, dst.1, &h, payload).unwrap();
    let mut l4 = Vec::new();
    u.write(&mut l4).unwrap();
    l4.extend_from_slice(payload);
    frame(smac, (src.0, dst.0), &[], 17, &l4)
}

/// The checksum of the upper-layer message `msg` (its checksum field zero) of protocol
/// `next` from `src` to `dst`: over the IPv6 pseudo-header and the message.
fn csum6(src: &[u8; 16], dst: &[u8; 16], next: u8, msg: &[u8]) -> u16 {
    let mut data = Vec::new();
    data.extend_from_slice(src);
    data.extend_from_slice(dst);
    data.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    data.extend_from_slice(&[0, 0, 0, next]);
    data.extend_from_slice(msg);
    crate::packets::inet_csum(&data)
}

/// An ICMPv6 message (`ty`, `code`, body) from `src` to `dst`, sent by `smac`, with a
/// correct checksum.
pub fn icmp6_from(
    smac: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    ty: u8,
    code: u8,
    body: &[u8],
) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(body);
    let c = csum6(&src, &dst, 58, &m).to_be_bytes();
    m[2..4].copy_from_slice(&c);
    frame(smac, (src, dst), &[], 58, &m)
}

/// A client's ICMPv6 message.
pub fn icmp6(src: [u8; 16], dst: [u8; 16], ty: u8, code: u8, body: &[u8]) -> Vec<u8> {
    icmp6_from(CLIENT_MAC, src, dst, ty, code, body)
}

/// A "packet too big" (type 2) with `mtu` from `src` to `dst`, sent by `smac`, quoting
/// `quoted` (an IPv6 packet, or its start).
pub fn packet_too_big(
    smac: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    mtu: u32,
    quoted: &[u8],
) -> Vec<u8> {
    let mut body = mtu.to_be_bytes().to_vec();
    body.extend_from_slice(quoted);
    icmp6_from(smac, src, dst, 2, 0, &body)
}

/// What a checked ICMPv6 error frame says.
#[derive(Debug, PartialEq)]
pub struct SeenIcmp6 {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub hop_limit: u8,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub ty: u8,
    /// The 4 bytes after the checksum (a "packet too big"'s MTU).
    pub rest: [u8; 4],
    /// The quoted packet, as sent.
    pub quoted: Vec<u8>,
}

/// Parses an ICMPv6 error frame (no extension headers) and asserts that its checksum is
/// right.
pub fn check_icmp6(frame: &[u8]) -> SeenIcmp6 {
    let (e, rest) = Ethernet2Header::from_slice(frame).expect("ethernet");
    let (h, msg) = Ipv6Header::from_slice(rest).expect("ipv6");
    assert_eq!(h.next_header.0, 58, "an ICMPv6 packet");
    let mut zeroed = msg.to_vec();
    zeroed[2] = 0;
    zeroed[3] = 0;
    assert_eq!(
        u16::from_be_bytes([msg[2], msg[3]]),
        csum6(&h.source, &h.destination, 58, &zeroed),
        "ICMPv6 checksum"
    );
    SeenIcmp6 {
        src: h.source,
        dst: h.destination,
        hop_limit: h.hop_limit,
        smac: e.source,
        dmac: e.destination,
        ty: msg[0],
        rest: [msg[4], msg[5], msg[6], msg[7]],
        quoted: msg[8..].to_vec(),
    }
}

/// What a checked IPv6 output frame says.
#[derive(Debug, PartialEq)]
pub struct Seen6 {
    pub src: Endpoint6,
    pub dst: Endpoint6,
    pub hop_limit: u8,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// Parses an IPv6 TCP/UDP frame (extension headers skipped) and asserts that the L4
/// checksum is right; returns what it says.
pub fn check6(frame: &[u8]) -> Seen6 {
    let (e, rest) = Ethernet2Header::from_slice(frame).expect("ethernet");
    assert_eq!(e.ether_type, EtherType::IPV6, "an IPv6 frame");
    let (h, mut rest) = Ipv6Header::from_slice(rest).expect("ipv6");
    let mut next = h.next_header.0;
    while matches!(next, 0 | 43 | 60) {
        let len = (rest[1] as usize + 1) * 8;
        next = rest[0];
        rest = &rest[len..];
    }
    let (sport, dport) = match next {
        6 => {
            let (t, payload) = TcpHeader::from_slice(rest).expect("tcp");
            assert_eq!(
                t.checksum,
                t.calc_checksum_ipv6(&h, payload).unwrap(),
                "TCP checksum"
            );
            (t.source_port, t.destination_port)
        }
        17 => {
            let (u, payload) = UdpHeader::from_slice(rest).expect("udp");
            assert_eq!(
                u.checksum,
                u.calc_checksum_ipv6(&h, payload).unwrap(),
                "UDP checksum"
            );
            (u.source_port, u.destination_port)
        }
        p => panic!("unexpected next header {p}"),
    };
    Seen6 {
        src: (h.source, sport),
        dst: (h.destination, dport),
        hop_limit: h.hop_limit,
        smac: e.source,
        dmac: e.destination,
    }
}
