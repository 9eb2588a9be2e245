//! Building and checking packets for BPF_PROG_TEST_RUN fixtures (etherparse does the bytes).

pub use etherparse::TcpOptionElement;
use etherparse::{EtherType, Ethernet2Header, IpNumber, Ipv4Header, TcpHeader, UdpHeader};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// TCP flags to set on a built segment.
#[derive(Clone, Copy, Default)]
pub struct Flags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

pub const SYN: Flags = Flags {
    syn: true,
    ack: false,
    fin: false,
    rst: false,
};
pub const ACK: Flags = Flags {
    syn: false,
    ack: true,
    fin: false,
    rst: false,
};
pub const SYN_ACK: Flags = Flags {
    syn: true,
    ack: true,
    fin: false,
    rst: false,
};
pub const RST_ACK: Flags = Flags {
    syn: false,
    ack: true,
    fin: false,
    rst: true,
};
pub const RST: Flags = Flags {
    syn: false,
    ack: false,
    fin: false,
    rst: true,
};
pub const FIN: Flags = Flags {
    syn: false,
    ack: true,
    fin: true,
    rst: false,
};

fn ip(src: [u8; 4], dst: [u8; 4], proto: IpNumber, payload_len: usize) -> Ipv4Header {
    let mut h = Ipv4Header::new(payload_len as u16, 64, proto, src, dst).expect("valid");
    h.identification = 0x1234;
    h.dont_fragment = true;
    h
}

fn eth() -> Ethernet2Header {
    Ethernet2Header {
        source: CLIENT_MAC,
        destination: LB_MAC,
        ether_type: EtherType::IPV4,
    }
}

/// A TCP header (window 64240, no checksum yet) with `f`'s flags and the sequence and
/// acknowledgment numbers given; both families' frames start from it.
pub fn tcp_header(sport: u16, dport: u16, f: Flags, (seq, ack): (u32, u32)) -> TcpHeader {
    let mut t = TcpHeader::new(sport, dport, seq, 64240);
    t.syn = f.syn;
    t.ack = f.ack;
    t.fin = f.fin;
    t.rst = f.rst;
    t.acknowledgment_number = ack;
    t
}

/// An Ethernet/IPv4/TCP frame with correct checksums; `options` are IPv4 options (len % 4 == 0).
pub fn tcp_with(
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    f: Flags,
    payload: &[u8],
    options: &[u8],
) -> Vec<u8> {
    let mut t = tcp_header(src.1, dst.1, f, (1000, f.ack as u32));
    let mut iph = ip(src.0, dst.0, IpNumber::TCP, t.header_len() + payload.len());
    iph.options = etherparse::Ipv4Options::try_from(options).expect("valid options length");
    iph.set_payload_len(t.header_len() + payload.len()).unwrap();
    iph.header_checksum = iph.calc_header_checksum();
    t.checksum = t.calc_checksum_ipv4(&iph, payload).expect("checksum");
    let mut out = Vec::new();
    eth().write(&mut out).unwrap();
    iph.write(&mut out).unwrap();
    t.write(&mut out).unwrap();
    out.extend_from_slice(payload);
    out
}

/// An Ethernet/IPv4/TCP frame with the given sequence and acknowledgment numbers (the ACK
/// flag as `f` says), sent from `smac`: a backend's segment, say.
pub fn tcp_seq(
    smac: [u8; 6],
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    f: Flags,
    (seq, ack): (u32, u32),
    payload: &[u8],
) -> Vec<u8> {
    let mut t = tcp_header(src.1, dst.1, f, (seq, ack));
    let iph = ip(src.0, dst.0, IpNumber::TCP, t.header_len() + payload.len());
    t.checksum = t.calc_checksum_ipv4(&iph, payload).expect("checksum");
    let mut out = Vec::new();
    Ethernet2Header {
        source: smac,
        ..eth()
    }
    .write(&mut out)
    .unwrap();
    iph.write(&mut out).unwrap();
    t.write(&mut out).unwrap();
    out.extend_from_slice(payload);
    out
}

/// The same frame with raw TCP header bytes `f(header)` changed (flags, data offset, options),
/// the TCP checksum recomputed over what the header then says.
pub fn with_tcp_bytes(frame: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let (iph, _) = Ipv4Header::from_slice(&frame[14..]).expect("an IPv4 frame");
    let l4 = 14 + iph.header_len();
    let mut seg = frame[l4..].to_vec();
    f(&mut seg);
    seg[16] = 0;
    seg[17] = 0;
    let c = tcp_checksum(&iph, &seg);
    seg[16..18].copy_from_slice(&c.to_be_bytes());
    let mut out = frame[..l4].to_vec();
    out.extend_from_slice(&seg);
    out
}

/// The frame with its IPv4 total length (and header checksum) set to what follows the
/// Ethernet header: after TCP bytes were appended by [`with_tcp_bytes`].
pub fn fix_ipv4_len(mut p: Vec<u8>) -> Vec<u8> {
    let len = (p.len() - 14) as u16;
    p[16..18].copy_from_slice(&len.to_be_bytes());
    p[24] = 0;
    p[25] = 0;
    let (h, _) = Ipv4Header::from_slice(&p[14..]).expect("an IPv4 frame");
    p[24..26].copy_from_slice(&h.calc_header_checksum().to_be_bytes());
    p
}

/// RFC 793 checksum of a TCP segment (header and payload, checksum field zero) under `iph`.
fn tcp_checksum(iph: &Ipv4Header, seg: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
        }
    };
    add(&iph.source);
    add(&iph.destination);
    add(&[0, 6]);
    add(&(seg.len() as u16).to_be_bytes());
    add(seg);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet/IPv4/TCP frame with TCP `options` (e.g. timestamps) and correct checksums.
pub fn tcp_opts(
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    f: Flags,
    options: &[TcpOptionElement],
) -> Vec<u8> {
    let frame = tcp(src, dst, f);
    let (e, rest) = Ethernet2Header::from_slice(&frame).unwrap();
    let (mut iph, rest) = Ipv4Header::from_slice(rest).unwrap();
    let (mut t, _) = TcpHeader::from_slice(rest).unwrap();
    t.set_options(options).expect("options fit");
    iph.set_payload_len(t.header_len()).unwrap();
    iph.header_checksum = iph.calc_header_checksum();
    t.checksum = t.calc_checksum_ipv4(&iph, &[]).unwrap();
    let mut out = Vec::new();
    e.write(&mut out).unwrap();
    iph.write(&mut out).unwrap();
    t.write(&mut out).unwrap();
    out
}

/// The TCP timestamp option (TSval, TSecr) of a frame, if it has one.
pub fn timestamps(frame: &[u8]) -> Option<(u32, u32)> {
    let (_, rest) = Ethernet2Header::from_slice(frame).ok()?;
    let (_, rest) = Ipv4Header::from_slice(rest).ok()?;
    let (t, _) = TcpHeader::from_slice(rest).ok()?;
    t.options_iterator().find_map(|o| match o {
        Ok(TcpOptionElement::Timestamp(v, e)) => Some((v, e)),
        _ => None,
    })
}

/// An Ethernet/IPv4/TCP frame without IP options.
pub fn tcp(src: ([u8; 4], u16), dst: ([u8; 4], u16), f: Flags) -> Vec<u8> {
    tcp_with(src, dst, f, b"", &[])
}

/// An Ethernet/IPv4/UDP frame with a checksum.
pub fn udp(src: ([u8; 4], u16), dst: ([u8; 4], u16), payload: &[u8]) -> Vec<u8> {
    let iph = ip(src.0, dst.0, IpNumber::UDP, 8 + payload.len());
    let u = UdpHeader::with_ipv4_checksum(src.1, dst.1, &iph, payload).unwrap();
    let mut out = Vec::new();
    eth().write(&mut out).unwrap();
    iph.write(&mut out).unwrap();
    u.write(&mut out).unwrap();
    out.extend_from_slice(payload);
    out
}

/// What a checked output frame says.
#[derive(Debug, PartialEq)]
pub struct Seen {
    pub src: ([u8; 4], u16),
    pub dst: ([u8; 4], u16),
    pub ttl: u8,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// Parses an IPv4 TCP/UDP frame and asserts that both checksums are right.
pub fn check(frame: &[u8]) -> Seen {
    let (e, rest) = Ethernet2Header::from_slice(frame).expect("ethernet");
    let (iph, rest) = Ipv4Header::from_slice(rest).expect("ipv4");
    assert_eq!(
        iph.header_checksum,
        iph.calc_header_checksum(),
        "IPv4 header checksum"
    );
    let (sport, dport) = match iph.protocol {
        IpNumber::TCP => {
            let (t, payload) = TcpHeader::from_slice(rest).expect("tcp");
            assert_eq!(
                t.checksum,
                t.calc_checksum_ipv4(&iph, payload).unwrap(),
                "TCP checksum"
            );
            (t.source_port, t.destination_port)
        }
        IpNumber::UDP => {
            let (u, payload) = UdpHeader::from_slice(rest).expect("udp");
            assert_eq!(
                u.checksum,
                u.calc_checksum_ipv4(&iph, payload).unwrap(),
                "UDP checksum"
            );
            (u.source_port, u.destination_port)
        }
        p => panic!("unexpected protocol {p:?}"),
    };
    Seen {
        src: (iph.source, sport),
        dst: (iph.destination, dport),
        ttl: iph.time_to_live,
        smac: e.source,
        dmac: e.destination,
    }
}

/// The same frame with another IPv4 TTL (header checksum recomputed; TCP/UDP checksums do
/// not cover the TTL).
pub fn with_ttl(frame: &[u8], ttl: u8) -> Vec<u8> {
    let (mut h, _) = Ipv4Header::from_slice(&frame[14..]).expect("an IPv4 frame");
    h.time_to_live = ttl;
    h.header_checksum = h.calc_header_checksum();
    let mut out = frame[..14].to_vec();
    h.write(&mut out).unwrap();
    out.extend_from_slice(&frame[14 + h.header_len()..]);
    out
}

/// The Internet checksum of `data` (RFC 1071), as it is written into a header.
pub fn inet_csum(data: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in data.chunks(2) {
        s += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// An ICMP error (`ty`, `code`, the 4 bytes after the checksum in `rest`: the next-hop MTU
/// of a "fragmentation needed") from `src` to `dst`, sent by `smac`, quoting `quoted` (an IPv4
/// packet, or as much of it as the sender quotes).
pub fn icmp_error(
    smac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    (ty, code): (u8, u8),
    rest: [u8; 4],
    quoted: &[u8],
) -> Vec<u8> {
    let mut icmp = vec![ty, code, 0, 0];
    icmp.extend_from_slice(&rest);
    icmp.extend_from_slice(quoted);
    let c = inet_csum(&icmp).to_be_bytes();
    icmp[2..4].copy_from_slice(&c);
    let mut iph = ip(src, dst, IpNumber::ICMP, icmp.len());
    iph.dont_fragment = false;
    let mut out = Vec::new();
    Ethernet2Header {
        source: smac,
        destination: LB_MAC,
        ether_type: EtherType::IPV4,
    }
    .write(&mut out)
    .unwrap();
    iph.write(&mut out).unwrap();
    out.extend_from_slice(&icmp);
    out
}

/// A "fragmentation needed" (type 3 code 4) with next-hop MTU `mtu`.
pub fn frag_needed(smac: [u8; 6], src: [u8; 4], dst: [u8; 4], mtu: u16, quoted: &[u8]) -> Vec<u8> {
    let m = mtu.to_be_bytes();
    icmp_error(smac, src, dst, (3, 4), [0, 0, m[0], m[1]], quoted)
}

/// What a checked ICMP error frame says.
#[derive(Debug, PartialEq)]
pub struct SeenIcmp {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub ttl: u8,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub ty: u8,
    pub code: u8,
    /// The 4 bytes after the checksum (a "fragmentation needed"'s MTU is in the last two).
    pub rest: [u8; 4],
    /// The quoted packet, as sent.
    pub quoted: Vec<u8>,
}

/// Parses an IPv4 ICMP error frame and asserts that its IPv4, ICMP and quoted IPv4
/// checksums are right.
pub fn check_icmp(frame: &[u8]) -> SeenIcmp {
    let (e, rest) = Ethernet2Header::from_slice(frame).expect("ethernet");
    let (iph, icmp) = Ipv4Header::from_slice(rest).expect("ipv4");
    assert_eq!(iph.protocol, IpNumber::ICMP, "an ICMP packet");
    assert_eq!(
        iph.header_checksum,
        iph.calc_header_checksum(),
        "outer IPv4 header checksum"
    );
    assert_eq!(inet_csum(icmp), 0, "ICMP checksum");
    let quoted = icmp[8..].to_vec();
    let (q, _) = Ipv4Header::from_slice(&quoted).expect("quoted ipv4");
    assert_eq!(
        q.header_checksum,
        q.calc_header_checksum(),
        "quoted IPv4 header checksum"
    );
    SeenIcmp {
        src: iph.source,
        dst: iph.destination,
        ttl: iph.time_to_live,
        smac: e.source,
        dmac: e.destination,
        ty: icmp[0],
        code: icmp[1],
        rest: [icmp[4], icmp[5], icmp[6], icmp[7]],
        quoted,
    }
}
