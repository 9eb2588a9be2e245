//! The XDP program through BPF_PROG_TEST_RUN: input packet → expected verdict and output packet.
//!
//! Runs inside a private network namespace with a veth towards the "backends" and permanent
//! neighbour entries for three of them, so fib lookups give known answers.

use lb_common::{service::PortServices, stats::Stat};
use lb_tests::{
    netns::Netns,
    packets::{
        self, ACK, CLIENT_MAC, FIN, LB_MAC, RST, RST_ACK, SYN, SYN_ACK, Seen, check, tcp, tcp_seq,
        tcp_with, udp, with_ttl,
    },
    packets6::{
        Seen6, addr6, check_icmp6, check6, dest_opts, fragment, hop_by_hop, icmp6, packet_too_big,
        routing, tcp6, tcp6_full, tcp6_opts, timestamps6, udp6, with_tcp6_bytes,
    },
    require_root,
    xdp::{self, SNAT, VETH_MAC},
};
use lb_userspace::dataplane::{Dataplane, PROGRAM};

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;
const XDP_DROP: u32 = 1;

const VIP: [u8; 4] = [10, 99, 0, 10];
const EMPTY_VIP: [u8; 4] = [10, 99, 0, 11];
const CLIENT: [u8; 4] = [10, 99, 1, 2];
/// Backends 1..=4; the first three have permanent neighbour entries, the fourth none.
const BACKENDS: [[u8; 4]; 4] = [
    [10, 20, 0, 11],
    [10, 20, 0, 12],
    [10, 20, 0, 21],
    [10, 20, 0, 22],
];

fn backend_mac(i: usize) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x02, i as u8 + 1]
}

struct Fixture {
    _ns: Netns,
    dp: Dataplane,
    /// `veth0`: where the backends are (their packets arrive there).
    backend_side: u32,
}

/// The sequence number every client segment built by `packets::tcp` carries: a SYN's
/// answer must acknowledge one more.
const CLIENT_ISN: u32 = 1000;
/// The ISN the fixtures' backends answer with.
const BACKEND_ISN: u32 = 5000;

/// Backend `i`'s segment: from its MAC, its address:8080, to the SNAT address:`port`.
fn from_backend(
    i: usize,
    port: u16,
    f: packets::Flags,
    seq_ack: (u32, u32),
    payload: &[u8],
) -> Vec<u8> {
    tcp_seq(
        backend_mac(i),
        (BACKENDS[i], 8080),
        (SNAT, port),
        f,
        seq_ack,
        payload,
    )
}

/// Backend `i`'s SYN-ACK to the flow on SNAT `port` whose client SYN was `packets::tcp`'s.
fn syn_ack(i: usize, port: u16) -> Vec<u8> {
    from_backend(i, port, SYN_ACK, (BACKEND_ISN, CLIENT_ISN + 1), b"")
}

impl Fixture {
    fn new() -> Fixture {
        let neighbours: Vec<([u8; 4], [u8; 6])> =
            (0..3).map(|i| (BACKENDS[i], backend_mac(i))).collect();
        let ns = xdp::private_netns("fx", &neighbours);
        let mut dp = xdp::load(|_| {});
        for (i, b) in BACKENDS.iter().enumerate() {
            xdp::set_backend(&mut dp, i as u32 + 1, *b);
        }
        let backend_side = xdp::ifindex("veth0");
        let mut f = Fixture {
            _ns: ns,
            dp,
            backend_side,
        };
        f.table(VIP, 80, 6, 1);
        f.table(VIP, 53, 17, 1);
        f.table(EMPTY_VIP, 80, 6, 0);
        f
    }

    /// Points every bucket of a service at one backend id (0 = empty table).
    fn table(&mut self, vip: [u8; 4], port: u16, proto: u8, backend: u32) {
        let id = match (vip, port, proto) {
            (VIP, 80, 6) => 0,
            (VIP, 53, 17) => 1,
            _ => 2,
        };
        xdp::single_backend_table(&mut self.dp, id, vip, port, proto, backend);
    }

    fn run(&mut self, pkt: &[u8]) -> (u32, Vec<u8>) {
        let (verdict, out, _) = xdp::run(&mut self.dp, PROGRAM, pkt, 1);
        (verdict, out)
    }

    /// A packet arriving from the backends' side.
    fn ret(&mut self, pkt: &[u8]) -> (u32, Vec<u8>) {
        let (verdict, out, _) = xdp::run_on(&mut self.dp, PROGRAM, pkt, 1, self.backend_side);
        (verdict, out)
    }

    fn stat(&self, s: Stat) -> u64 {
        self.dp.xdp_stats().unwrap()[s as usize]
    }

    /// Runs each case (name, packet from the client side, reason): its verdict must be
    /// `verdict` and its reason counted once; a passed packet must come out as it went in.
    fn expect_each(&mut self, verdict: u32, cases: Vec<(&str, Vec<u8>, Stat)>) {
        for (name, pkt, reason) in cases {
            let before = self.stat(reason);
            let (v, out) = self.run(&pkt);
            assert_eq!(v, verdict, "{name}: verdict");
            if verdict == XDP_PASS {
                assert_eq!(out, pkt, "{name}: the packet must not be rewritten");
            }
            assert_eq!(self.stat(reason), before + 1, "{name}: {reason:?} counted");
        }
    }
}

fn cut(mut p: Vec<u8>, len: usize) -> Vec<u8> {
    p.truncate(len);
    p
}

/// Packets the balancer must leave alone: verdict PASS, bytes unchanged, and the reason counted.
#[test]
fn packets_that_are_not_ours_pass_untouched() {
    if !require_root("packets_that_are_not_ours_pass_untouched") {
        return;
    }
    let mut f = Fixture::new();
    let syn = tcp((CLIENT, 40000), (VIP, 80), SYN);
    let mut frag = syn.clone();
    frag[14 + 6] = 0x20; // more fragments, offset 0
    let mut icmp = syn.clone();
    icmp[14 + 9] = 1;
    let mut gre = syn.clone();
    gre[14 + 9] = 47;
    let mut ipv6 = syn.clone(); // version nibble 4 where 6 belongs
    ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
    let mut arp = syn.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    let mut ttl1 = tcp((CLIENT, 40001), (VIP, 80), SYN);
    ttl1[14 + 8] = 1;
    let mut bad_ihl = syn.clone();
    bad_ihl[14] = 0x44;
    let cases: Vec<(&str, Vec<u8>, Stat)> = vec![
        (
            "SYN to a non-VIP address",
            tcp((CLIENT, 40000), ([10, 99, 0, 99], 80), SYN),
            Stat::NotOurs,
        ),
        (
            "SYN to the VIP on another port",
            tcp((CLIENT, 40000), (VIP, 81), SYN),
            Stat::NotOurs,
        ),
        ("ARP", arp, Stat::NotOurs),
        ("IPv4 bytes under the IPv6 ethertype", ipv6, Stat::Malformed),
        ("ICMP to the VIP", icmp, Stat::NotOurs),
        ("GRE to the VIP", gre, Stat::NotOurs),
        ("IP fragment to the VIP", frag, Stat::Fragment),
        // (A frame shorter than an Ethernet header cannot be fed to test_run: EINVAL.)
        (
            "truncated IPv4 header",
            cut(syn.clone(), 14 + 12),
            Stat::Malformed,
        ),
        ("IHL below 5", bad_ihl, Stat::Malformed),
        (
            "truncated TCP header",
            cut(syn.clone(), 14 + 20 + 12),
            Stat::Malformed,
        ),
        (
            "ACK to the VIP without a flow",
            tcp((CLIENT, 40000), (VIP, 80), ACK),
            Stat::NonSynMiss,
        ),
        (
            "SYN to a service without backends",
            tcp((CLIENT, 40000), (EMPTY_VIP, 80), SYN),
            Stat::NoBackend,
        ),
        ("SYN whose TTL would expire", ttl1, Stat::TtlExceeded),
        (
            "return traffic to a SNAT port without a flow",
            tcp((BACKENDS[0], 8080), (SNAT, 61001), ACK),
            Stat::NotOurs,
        ),
    ];
    f.expect_each(XDP_PASS, cases);
    assert_eq!(f.stat(Stat::NewFlow), 0, "no flow may have been created");
}

fn snat_port(seen: &Seen) -> u16 {
    let p = seen.src.1;
    assert!(
        (lb_common::Tunables::DEFAULT.snat_port_min..=lb_common::Tunables::DEFAULT.snat_port_max)
            .contains(&p),
        "SNAT port {p} outside the configured range"
    );
    p
}

/// The ports map (what lets most packets skip the services lookup) follows the services, and
/// a removed service's established flows stop being balanced: their packets go to the host,
/// which answers with a reset, as if the conntrack entry were gone.
#[test]
fn the_ports_map_follows_the_services_and_a_removed_service_ends_its_flows() {
    if !require_root("the_ports_map_follows_the_services") {
        return;
    }
    let mut f = Fixture::new();
    let v4 = u32::from_ne_bytes;
    // Port 80: services 0 (VIP) and 2 (EMPTY_VIP), two addresses: the maps decide.
    assert_eq!(
        f.dp.port_services(80).unwrap(),
        PortServices {
            ids: 0b101,
            only_v4: 0
        }
    );
    assert_eq!(
        f.dp.port_services(53).unwrap(),
        PortServices {
            ids: 0b10,
            only_v4: v4(VIP)
        }
    );
    assert_eq!(f.dp.port_services(22).unwrap(), PortServices::default());

    let (v, out) = f.run(&tcp((CLIENT, 40000), (VIP, 80), SYN));
    assert_eq!(v, XDP_REDIRECT);
    let port = snat_port(&check(&out));
    let ack = tcp((CLIENT, 40000), (VIP, 80), ACK);
    assert_eq!(
        f.run(&ack).0,
        XDP_REDIRECT,
        "an established flow is forwarded"
    );

    f.dp.remove_service(&xdp::service_key(EMPTY_VIP, 80, 6))
        .unwrap();
    assert_eq!(
        f.dp.port_services(80).unwrap(),
        PortServices {
            ids: 0b1,
            only_v4: v4(VIP)
        }
    );
    let other = tcp((CLIENT, 40000), (EMPTY_VIP, 80), SYN);
    let not_ours = f.stat(Stat::NotOurs);
    assert_eq!(
        f.run(&other),
        (XDP_PASS, other.clone()),
        "another address passes"
    );
    assert_eq!(f.stat(Stat::NotOurs), not_ours + 1);
    assert_eq!(
        f.run(&ack).0,
        XDP_REDIRECT,
        "the remaining service's flow is kept"
    );

    f.dp.remove_service(&xdp::service_key(VIP, 80, 6)).unwrap();
    assert_eq!(f.dp.port_services(80).unwrap(), PortServices::default());
    assert_eq!(
        f.run(&ack),
        (XDP_PASS, ack.clone()),
        "the flow's packets go to the host"
    );
    // Its return traffic is still turned back to the client while the entry lives (the
    // client's stack sorts out what its peer's reset means); nothing is misforwarded.
    let (v, out) = f.ret(&syn_ack(0, port));
    assert_eq!(v, XDP_REDIRECT);
    assert_eq!(check(&out).dst, (CLIENT, 40000));
}

/// Client timestamps are moved onto the balancer's millisecond clock towards the backend
/// and back on the way to the client: a backend's TIME_WAIT then accepts the next flow on
/// the same SNAT port (PAWS), whatever random offset that flow's client started from.
#[test]
fn tcp_timestamps_follow_the_balancers_clock_and_come_back_unchanged() {
    if !require_root("tcp_timestamps_follow_the_balancers_clock") {
        return;
    }
    use packets::TcpOptionElement::{
        MaximumSegmentSize, Noop, SelectiveAcknowledgementPermitted, Timestamp, WindowScale,
    };
    let mut f = Fixture::new();
    // Linux's SYN layout.
    let syn = packets::tcp_opts(
        (CLIENT, 40100),
        (VIP, 80),
        SYN,
        &[
            MaximumSegmentSize(1460),
            SelectiveAcknowledgementPermitted,
            Timestamp(3_000_000_000, 0),
            Noop,
            WindowScale(7),
        ],
    );
    let (v, out) = f.run(&syn);
    assert_eq!(v, XDP_REDIRECT);
    let port = snat_port(&check(&out));
    let (val, ecr) = packets::timestamps(&out).expect("the SYN keeps its timestamps");
    assert_eq!(ecr, 0);
    // SAFETY: clock_gettime with a valid out pointer.
    let now_ms = unsafe {
        let mut ts = std::mem::zeroed::<libc::timespec>();
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
        (ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000) as u32
    };
    assert!(
        now_ms.wrapping_sub(val) < 1000,
        "TSval {val} is the balancer's clock ({now_ms} ms)"
    );
    let delta = val.wrapping_sub(3_000_000_000);

    // A data segment (NOP, NOP, TS): the same shift; its echo is the backend's, untouched.
    let ack = packets::tcp_opts(
        (CLIENT, 40100),
        (VIP, 80),
        ACK,
        &[Noop, Noop, Timestamp(3_000_000_040, 777)],
    );
    let (v, out) = f.run(&ack);
    assert_eq!(v, XDP_REDIRECT);
    check(&out);
    assert_eq!(
        packets::timestamps(&out),
        Some((3_000_000_040u32.wrapping_add(delta), 777))
    );

    // The backend's segment echoes the shifted clock; the client gets its own back.
    assert_eq!(f.ret(&syn_ack(0, port)).0, XDP_REDIRECT);
    let mut ret = packets::tcp_opts(
        (BACKENDS[0], 8080),
        (SNAT, port),
        ACK,
        &[
            Noop,
            Noop,
            Timestamp(778, 3_000_000_040u32.wrapping_add(delta)),
        ],
    );
    ret[6..12].copy_from_slice(&backend_mac(0));
    let (v, out) = f.ret(&ret);
    assert_eq!(v, XDP_REDIRECT);
    check(&out);
    assert_eq!(packets::timestamps(&out), Some((778, 3_000_000_040)));

    // A layout the balancer does not know is forwarded with its timestamps as they were.
    let odd = packets::tcp_opts(
        (CLIENT, 40100),
        (VIP, 80),
        ACK,
        &[Timestamp(3_000_000_050, 779), Noop, Noop],
    );
    let (v, out) = f.run(&odd);
    assert_eq!(v, XDP_REDIRECT);
    check(&out);
    assert_eq!(packets::timestamps(&out), Some((3_000_000_050, 779)));
}

/// A whole flow: SYN → backend (full-NAT, checksums), return → client, and the flow keeps its
/// backend after the table changes while new flows follow the new table.
#[test]
fn flows_are_natted_both_ways_and_survive_table_changes() {
    if !require_root("flows_are_natted_both_ways_and_survive_table_changes") {
        return;
    }
    let mut f = Fixture::new();

    let (v, out) = f.run(&tcp((CLIENT, 40000), (VIP, 80), SYN));
    assert_eq!(
        v, XDP_REDIRECT,
        "SYN to VIP is redirected towards the backend"
    );
    let seen = check(&out);
    let port = snat_port(&seen);
    assert_eq!(
        seen,
        Seen {
            src: (SNAT, port),
            dst: (BACKENDS[0], 8080),
            ttl: 63,
            smac: VETH_MAC,
            dmac: backend_mac(0)
        }
    );

    // A retransmitted SYN stays on the same flow (same SNAT port).
    let (_, out) = f.run(&tcp((CLIENT, 40000), (VIP, 80), SYN));
    assert_eq!(check(&out).src, (SNAT, port));

    // The backend's answer is reverse-NATed and sent back out the way the client came in.
    let (v, out) = f.ret(&syn_ack(0, port));
    assert_eq!(
        v, XDP_REDIRECT,
        "return traffic leaves through the client's interface"
    );
    assert_eq!(
        check(&out),
        Seen {
            src: (VIP, 80),
            dst: (CLIENT, 40000),
            ttl: 63,
            smac: LB_MAC,
            dmac: CLIENT_MAC
        }
    );

    // The table now sends everything to backend 2: the established flow stays on backend 1…
    f.table(VIP, 80, 6, 2);
    let (v, out) = f.run(&tcp_with(
        (CLIENT, 40000),
        (VIP, 80),
        ACK,
        b"GET / HTTP/1.1\r\n\r\n",
        &[],
    ));
    assert_eq!(v, XDP_REDIRECT);
    assert_eq!(
        check(&out).dst,
        (BACKENDS[0], 8080),
        "established flow keeps its backend"
    );
    // …while a new flow follows the new table.
    let (_, out) = f.run(&tcp((CLIENT, 40002), (VIP, 80), SYN));
    let seen = check(&out);
    assert_eq!(seen.dst, (BACKENDS[1], 8080));
    // Two live flows never share a SNAT 4-tuple: towards another backend the same port is
    // another tuple; towards the same backend a second flow gets another port.
    let (_, out) = f.run(&tcp((CLIENT, 40004), (VIP, 80), SYN));
    let second = check(&out);
    assert_eq!(second.dst, (BACKENDS[1], 8080));
    assert_ne!(
        snat_port(&second),
        snat_port(&seen),
        "two live flows to one backend never share a SNAT port"
    );

    // IPv4 options are parsed past, and the packet forwarded with its options intact.
    let opts = [1u8, 1, 1, 1]; // four NOPs
    let (v, out) = f.run(&tcp_with((CLIENT, 40003), (VIP, 80), SYN, b"", &opts));
    assert_eq!(v, XDP_REDIRECT);
    assert_eq!(check(&out).dst, (BACKENDS[1], 8080));
    assert_eq!(&out[14 + 20..14 + 24], &opts);

    // FIN marks the flow closing; a new SYN from the same port then starts a new flow.
    let (v, _) = f.run(&tcp((CLIENT, 40000), (VIP, 80), FIN));
    assert_eq!(v, XDP_REDIRECT);
    let (_, out) = f.run(&tcp((CLIENT, 40000), (VIP, 80), SYN));
    assert_eq!(
        check(&out).dst,
        (BACKENDS[1], 8080),
        "a reused client port after FIN is a new flow"
    );

    // UDP: every datagram of a new flow is balanced; the checksum stays valid.
    let (v, out) = f.run(&udp((CLIENT, 5353), (VIP, 53), b"query"));
    assert_eq!(v, XDP_REDIRECT);
    let seen = check(&out);
    assert_eq!(seen.dst, (BACKENDS[0], 8080));
    let udp_port = snat_port(&seen);
    // …and the backend's answers come back from the VIP, payload and checksum intact; an
    // answer without a checksum (0, allowed over IPv4) stays without one.
    let from_backend_mac = |mut p: Vec<u8>| {
        p[6..12].copy_from_slice(&backend_mac(0));
        p
    };
    let answer = from_backend_mac(udp((BACKENDS[0], 8080), (SNAT, udp_port), b"answer"));
    let (v, out) = f.ret(&answer);
    assert_eq!(v, XDP_REDIRECT);
    assert_eq!(
        check(&out),
        Seen {
            src: (VIP, 53),
            dst: (CLIENT, 5353),
            ttl: 63,
            smac: LB_MAC,
            dmac: CLIENT_MAC
        }
    );
    assert_eq!(&out[14 + 20 + 8..], b"answer");
    let mut bare = answer.clone();
    bare[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
    let (v, out) = f.ret(&bare);
    assert_eq!(v, XDP_REDIRECT);
    assert_eq!(
        &out[14 + 20 + 6..14 + 20 + 8],
        &[0, 0],
        "no checksum stays none"
    );

    // Unresolved neighbour: the rewritten packet goes to the kernel, which resolves and sends it.
    f.table(VIP, 80, 6, 4);
    let before = f.stat(Stat::FibPass);
    let (v, out) = f.run(&tcp((CLIENT, 40010), (VIP, 80), SYN));
    assert_eq!(v, XDP_PASS);
    assert_eq!(
        check(&out).dst,
        (BACKENDS[3], 8080),
        "handed to the kernel already rewritten"
    );
    assert_eq!(f.stat(Stat::FibPass), before + 1);

    // Counters: flows and packets per backend.
    let b1 = f.dp.backend_stats(1).unwrap();
    assert_eq!(
        b1.new_flows, 2,
        "two flows went to backend 1 (TCP 40000 and UDP)"
    );
    assert_eq!(
        b1.packets_to_client, 3,
        "the TCP SYN-ACK and two UDP answers"
    );
    assert_eq!(f.stat(Stat::NewFlow), 7);
}

/// The conntrack key of the TCP flow from CLIENT:`port` to VIP:80.
fn client_flow(port: u16) -> lb_common::flow::FlowKey {
    lb_common::flow::FlowKey {
        src: lb_common::flow::v4(CLIENT),
        dst: lb_common::flow::v4(VIP),
        sport: port.to_be(),
        dport: 80u16.to_be(),
        proto: 6,
        family: lb_common::FAMILY_V4,
        _pad: 0,
    }
}

/// A data plane (in a private namespace named after `tag`) whose one service, VIP:80/tcp, has
/// backend 1 alone and one SNAT port per CPU: every new flow test_run sends on a CPU wants
/// that CPU's port. `tune` sets other tunables.
fn one_port_per_cpu(tag: &str, tune: impl FnOnce(&mut lb_common::Tunables)) -> (Netns, Dataplane) {
    let ns = xdp::private_netns(tag, &[(BACKENDS[0], backend_mac(0))]);
    let mut dp = xdp::load(|t| {
        t.snat_port_min = 61000;
        t.snat_port_max = 61000 + t.cpus as u16 - 1;
        tune(t);
    });
    xdp::set_backend(&mut dp, 1, BACKENDS[0]);
    xdp::single_backend_table(&mut dp, 0, VIP, 80, 6, 1);
    (ns, dp)
}

#[test]
fn a_flow_that_cannot_get_a_snat_port_is_dropped_and_counted() {
    if !require_root("a_flow_that_cannot_get_a_snat_port_is_dropped_and_counted") {
        return;
    }
    // The first flow per CPU takes the CPU's one port, the next is refused.
    let (_ns, mut dp) = one_port_per_cpu("fs", |_| {});
    let mut verdicts = Vec::new();
    for port in 0..2 {
        let pkt = tcp((CLIENT, 40000 + port), (VIP, 80), SYN);
        // test_run runs on one CPU, so both flows compete for that CPU's single port.
        verdicts.push(xdp::run(&mut dp, PROGRAM, &pkt, 1).0);
    }
    assert_ne!(verdicts[0], XDP_DROP, "the first flow gets the port");
    assert_eq!(verdicts[1], XDP_DROP, "the second flow must not share it");
    assert_eq!(dp.xdp_stats().unwrap()[Stat::FlowNotCreated as usize], 1);
}

/// Under a SYN flood every SNAT port would be held by a half-open flow whose "client" never
/// answers. A new flow may take the port of a flow that has seen only its client's SYN for at
/// least `tcp_syn_reclaim` (250 ms): the old flow's conntrack entry goes with it (its
/// client's next packet finds no flow). An established flow's port is never taken.
#[test]
fn a_half_open_flows_port_goes_to_a_new_flow_after_tcp_syn_reclaim_an_established_ones_never() {
    if !require_root("a_half_open_flows_port_goes_to_a_new_flow") {
        return;
    }
    let (_ns, mut dp) = one_port_per_cpu("fh", |_| {});
    pin_to_cpu0();
    let stat = |dp: &Dataplane, s: Stat| dp.xdp_stats().unwrap()[s as usize];
    let syn = |port| tcp((CLIENT, port), (VIP, 80), SYN);

    assert_eq!(xdp::run(&mut dp, PROGRAM, &syn(40000), 1).0, XDP_REDIRECT);
    assert_eq!(
        xdp::run(&mut dp, PROGRAM, &syn(40001), 1).0,
        XDP_DROP,
        "a young half-open flow keeps its port"
    );
    let reclaim = std::time::Duration::from_nanos(lb_common::Tunables::DEFAULT.tcp_syn_reclaim_ns);
    // The data plane's coarse clock ticks every few ms: a little more than the reclaim age.
    std::thread::sleep(reclaim + std::time::Duration::from_millis(50));
    let (v, out, _) = xdp::run(&mut dp, PROGRAM, &syn(40001), 1);
    assert_eq!(
        v, XDP_REDIRECT,
        "past tcp_syn_reclaim, a new flow takes the port"
    );
    let port = check(&out).src.1;
    assert_eq!(stat(&dp, Stat::HalfOpenReclaimed), 1);
    // The old flow is over: its client's next packet finds no flow (the host resets it).
    let before = stat(&dp, Stat::NonSynMiss);
    let (v, _, _) = xdp::run(&mut dp, PROGRAM, &tcp((CLIENT, 40000), (VIP, 80), ACK), 1);
    assert_eq!(v, XDP_PASS);
    assert_eq!(stat(&dp, Stat::NonSynMiss), before + 1);
    // The new flow is answered and established: its port stays its own, however long.
    let (v, _, _) = xdp::run_on(
        &mut dp,
        PROGRAM,
        &from_backend(0, port, SYN_ACK, (BACKEND_ISN, CLIENT_ISN + 1), b""),
        1,
        xdp::ifindex("veth0"),
    );
    assert_eq!(v, XDP_REDIRECT);
    let ack = tcp_seq(
        CLIENT_MAC,
        (CLIENT, 40001),
        (VIP, 80),
        ACK,
        (CLIENT_ISN + 1, BACKEND_ISN + 1),
        b"",
    );
    assert_eq!(xdp::run(&mut dp, PROGRAM, &ack, 1).0, XDP_REDIRECT);
    std::thread::sleep(reclaim * 2);
    assert_eq!(
        xdp::run(&mut dp, PROGRAM, &syn(40002), 1).0,
        XDP_DROP,
        "an established flow's port is never taken"
    );
    assert_eq!(stat(&dp, Stat::HalfOpenReclaimed), 1);
    let (v, out, _) = xdp::run(&mut dp, PROGRAM, &ack, 1);
    assert_eq!(v, XDP_REDIRECT, "and it still flows");
    assert_eq!(check(&out).src, (SNAT, port));
}

/// The timestamps the data plane writes into flow entries are the host's monotonic clock,
/// which lbd's flow collector compares them with (a tick or two behind it at most: the
/// program reads the coarse clock through a per-CPU cache refreshed once per jiffy), and they
/// move on while a flow runs: an entry is refreshed at most once a second.
#[test]
fn flow_timestamps_are_the_hosts_monotonic_clock_and_move_on_while_the_flow_runs() {
    if !require_root("flow_timestamps_are_the_hosts_monotonic_clock") {
        return;
    }
    let (_ns, mut dp) = one_port_per_cpu("ft", |_| {});
    pin_to_cpu0();
    // Two timer ticks at HZ = 100, with room to spare.
    const SLACK_NS: u64 = 25_000_000;
    let now = lb_userspace::dataplane::gc::monotonic_ns;
    let stamped = |dp: &mut Dataplane, pkt: &[u8], what: &str| {
        let before = now();
        assert_eq!(xdp::run(dp, PROGRAM, pkt, 1).0, XDP_REDIRECT, "{what}");
        let after = now();
        let e = dp
            .conntrack_entry(&client_flow(40000))
            .unwrap()
            .expect("the flow has its conntrack entry");
        assert!(
            e.last_seen_ns + SLACK_NS >= before && e.last_seen_ns <= after,
            "{what}: stamped {} ns, the host's clock read {before}..{after}",
            e.last_seen_ns
        );
        e.last_seen_ns
    };
    let opened = stamped(&mut dp, &tcp((CLIENT, 40000), (VIP, 80), SYN), "the SYN");
    let ack = tcp((CLIENT, 40000), (VIP, 80), ACK);
    // The first ACK establishes the flow (a state change is stamped at once).
    stamped(&mut dp, &ack, "the ACK that establishes it");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let later = stamped(&mut dp, &ack, "an ACK a second later");
    assert!(
        later >= opened + 1_000_000_000,
        "the clock moved on: {opened} → {later}"
    );
}

/// A half-open flow's age is its client's: the backend's SYN-ACK retransmitted a second
/// later (a SYN queue does that for a minute) does not make it young again, so its port still
/// goes to a new flow 250 ms after the client's SYN. (Refreshed by those retransmissions, a
/// SYN flood's flows kept new flows from their ports a second after they began.)
#[test]
fn a_backends_syn_ack_retransmission_does_not_keep_a_half_open_flows_port() {
    if !require_root("a_backends_syn_ack_retransmission_does_not_keep") {
        return;
    }
    let (_ns, mut dp) = one_port_per_cpu("fr", |_| {});
    pin_to_cpu0();
    let (v, out, _) = xdp::run(&mut dp, PROGRAM, &tcp((CLIENT, 40000), (VIP, 80), SYN), 1);
    assert_eq!(v, XDP_REDIRECT);
    let port = check(&out).src.1;
    let syn_ack = from_backend(0, port, SYN_ACK, (BACKEND_ISN, CLIENT_ISN + 1), b"");
    let backend_side = xdp::ifindex("veth0");
    assert_eq!(
        xdp::run_on(&mut dp, PROGRAM, &syn_ack, 1, backend_side).0,
        XDP_REDIRECT
    );
    // Past the entries' refresh interval (1 s), the backend retransmits its SYN-ACK: still
    // the client's to see.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(
        xdp::run_on(&mut dp, PROGRAM, &syn_ack, 1, backend_side).0,
        XDP_REDIRECT,
        "the retransmitted SYN-ACK reaches the client"
    );
    let (v, out, _) = xdp::run(&mut dp, PROGRAM, &tcp((CLIENT, 40001), (VIP, 80), SYN), 1);
    assert_eq!(
        v, XDP_REDIRECT,
        "the client has been silent for over tcp_syn_reclaim: a new flow takes the port"
    );
    assert_eq!(check(&out).src.1, port);
}

/// The frame's TCP header: what a reset carries.
fn tcp_of(frame: &[u8], l4: usize) -> (etherparse::TcpHeader, usize) {
    let (t, rest) = etherparse::TcpHeader::from_slice(&frame[l4..]).expect("tcp");
    (t, rest.len())
}

/// A SNAT port reused (after its flow ended, or taken from a half-open flow in a SYN flood)
/// may still carry an old connection at the backend, which then answers the new flow's SYN
/// with an ACK of that connection. The client can do nothing with it, so the balancer, owner
/// of the SNAT end, sends the reset a client would (sequence = the ACK's acknowledgment, no
/// ACK flag, no options or payload, checksums right) back to the backend, and the backend's
/// SYN-ACK retransmitted for the new flow then goes through as usual. After the handshake a
/// segment out of window is dropped as before, not answered.
#[test]
fn a_backend_answering_a_new_flows_syn_for_an_old_connection_gets_a_reset() {
    if !require_root("a_backend_answering_a_new_flows_syn_for_an_old_connection") {
        return;
    }
    const OLD_SEQ: u32 = 777_000;
    const OLD_ACK: u32 = 123_456_789;
    let mut f = Fixture::new();
    f.v6(5);
    let (v, out) = f.run(&tcp((CLIENT, 41500), (VIP, 80), SYN));
    assert_eq!(v, XDP_REDIRECT);
    let port = snat_port(&check(&out));
    // The old connection's ACK, with a timestamp option and data a reset must not carry.
    let stale = packets::fix_ipv4_len(packets::with_tcp_bytes(
        &from_backend(0, port, ACK, (OLD_SEQ, OLD_ACK), b"old data"),
        |seg| {
            let payload = seg.split_off(20);
            seg[12] = 8 << 4;
            seg.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 7]);
            seg.extend_from_slice(&payload);
        },
    ));
    let before = f.stat(Stat::BackendStaleReset);
    let (v, out) = f.ret(&stale);
    assert_eq!(v, XDP_TX, "the reset goes back out towards the backend");
    assert_eq!(f.stat(Stat::BackendStaleReset), before + 1);
    let seen = check(&out);
    assert_eq!(
        seen,
        Seen {
            src: (SNAT, port),
            dst: (BACKENDS[0], 8080),
            ttl: 64,
            smac: stale[..6].try_into().unwrap(),
            dmac: backend_mac(0),
        }
    );
    let (t, payload) = tcp_of(&out, 14 + 20);
    assert!(t.rst && !t.ack && !t.syn && !t.fin, "{t:?}");
    assert_eq!((t.sequence_number, t.acknowledgment_number), (OLD_ACK, 0));
    assert_eq!((t.header_len(), payload, out.len()), (20, 0, 14 + 20 + 20));

    // The backend, its old connection gone, answers the client's retransmitted SYN.
    let (v, out) = f.ret(&syn_ack(0, port));
    assert_eq!(v, XDP_REDIRECT, "the SYN-ACK reaches the client");
    assert_eq!(check(&out).dst, (CLIENT, 41500));
    let before = f.stat(Stat::ReturnOutOfWindow);
    let late = from_backend(0, port, ACK, (OLD_SEQ, OLD_ACK), b"");
    assert_eq!(
        f.ret(&late).0,
        XDP_DROP,
        "after the handshake: out of window"
    );
    assert_eq!(f.stat(Stat::ReturnOutOfWindow), before + 1);

    // IPv6 alike.
    let (v, out) = f.run(&tcp6((CLIENT6, 41500), (VIP6, 80), SYN));
    assert_eq!(v, XDP_REDIRECT);
    let port6 = check6(&out).src.1;
    let stale6 = tcp6_full(
        backend_mac(0),
        (BACKENDS6[0], 8080),
        (xdp::SNAT6, port6),
        ACK,
        (OLD_SEQ, OLD_ACK),
        b"old data",
        &[],
    );
    let (v, out) = f.ret(&stale6);
    assert_eq!(v, XDP_TX);
    let seen = check6(&out);
    assert_eq!(
        (seen.src, seen.dst, seen.hop_limit, seen.dmac),
        (
            (xdp::SNAT6, port6),
            (BACKENDS6[0], 8080),
            64,
            backend_mac(0)
        )
    );
    let (t, payload) = tcp_of(&out, 14 + 40);
    assert!(t.rst && !t.ack, "{t:?}");
    assert_eq!(
        (t.sequence_number, payload, out.len()),
        (OLD_ACK, 0, 14 + 40 + 20)
    );
}

#[test]
fn the_benchmark_programs_pass_the_verifier() {
    if !require_root("the_benchmark_programs_pass_the_verifier") {
        return;
    }
    // lbd loads only the balancer; the baseline and the ideal forwarder are loaded on demand
    // by `cargo xtask bench`, so a verifier regression in them must still show up here.
    let _ns = xdp::private_netns("fv", &[]);
    let mut dp = xdp::load(|_| {});
    for name in [
        lb_userspace::dataplane::PASS_PROGRAM,
        lb_userspace::dataplane::IDEAL_FORWARDER,
    ] {
        dp.program(name).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    }
}

/// Attack: packets that claim to be a backend's (source = backend address:port, destination
/// = the SNAT address:port of a live flow) sent from the client side, from another host on
/// the backends' segment, or blind (off the flow's sequence numbers). None may reach the
/// client; each is dropped (passing it would make the host reset the real flow) and
/// counted. The real backend's traffic still flows.
#[test]
fn spoofed_return_traffic_never_reaches_the_client() {
    if !require_root("spoofed_return_traffic_never_reaches_the_client") {
        return;
    }
    let mut f = Fixture::new();
    let (v, out) = f.run(&tcp((CLIENT, 41000), (VIP, 80), SYN));
    assert_eq!(v, XDP_REDIRECT);
    let port = snat_port(&check(&out));
    let data =
        |seq: u32, payload: &[u8]| from_backend(0, port, ACK, (seq, CLIENT_ISN + 1), payload);
    let mut on_client_side = data(BACKEND_ISN + 1, b"injected");
    on_client_side[6..12].copy_from_slice(&CLIENT_MAC);

    // Before the backend's SYN-ACK: only an answer to the client's SYN is taken (a plain
    // ACK or data is answered with a reset instead: see the stale-connection test).
    let early: Vec<(&str, Vec<u8>, Stat)> = vec![
        (
            "a SYN-ACK that acknowledges another ISN",
            from_backend(0, port, SYN_ACK, (BACKEND_ISN, CLIENT_ISN + 7), b""),
            Stat::ReturnOutOfWindow,
        ),
        (
            "a bare RST before the SYN-ACK",
            from_backend(0, port, RST, (0, 0), b""),
            Stat::ReturnOutOfWindow,
        ),
    ];
    for (name, pkt, reason) in early {
        let before = f.stat(reason);
        assert_eq!(f.ret(&pkt).0, XDP_DROP, "{name}");
        assert_eq!(f.stat(reason), before + 1, "{name}: {reason:?} counted");
    }
    assert_eq!(f.ret(&syn_ack(0, port)).0, XDP_REDIRECT, "the real SYN-ACK");

    let mut other_host = data(BACKEND_ISN + 1, b"injected");
    other_host[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0x09, 0x09]);
    let cases: Vec<(&str, Vec<u8>, u32, Stat)> = vec![
        (
            "backend's data arriving from the client side",
            on_client_side,
            0,
            Stat::ReturnWrongSide,
        ),
        (
            "backend's data from another MAC on the backend side",
            other_host,
            f.backend_side,
            Stat::ReturnWrongSide,
        ),
        (
            "a RST one past the next sequence number",
            from_backend(0, port, RST, (BACKEND_ISN + 2, 0), b""),
            f.backend_side,
            Stat::ReturnOutOfWindow,
        ),
        (
            "a RST inside the window but not at its edge",
            from_backend(
                0,
                port,
                RST_ACK,
                (BACKEND_ISN + 1 + 5000, CLIENT_ISN + 1),
                b"",
            ),
            f.backend_side,
            Stat::ReturnOutOfWindow,
        ),
        (
            "data half the sequence space away",
            data(BACKEND_ISN.wrapping_add(1 << 31), b"injected"),
            f.backend_side,
            Stat::ReturnOutOfWindow,
        ),
    ];
    for (name, pkt, ifindex, reason) in cases {
        let before = f.stat(reason);
        let (v, _, _) = xdp::run_on(&mut f.dp, PROGRAM, &pkt, 1, ifindex);
        assert_eq!(v, XDP_DROP, "{name}: verdict");
        assert_eq!(f.stat(reason), before + 1, "{name}: {reason:?} counted");
    }
    // UDP: only the side is checked.
    let (v, out) = f.run(&udp((CLIENT, 5300), (VIP, 53), b"q"));
    assert_eq!(v, XDP_REDIRECT);
    let uport = snat_port(&check(&out));
    let mut answer = udp((BACKENDS[0], 8080), (SNAT, uport), b"a");
    answer[6..12].copy_from_slice(&backend_mac(0));
    let before = f.stat(Stat::ReturnWrongSide);
    assert_eq!(xdp::run_on(&mut f.dp, PROGRAM, &answer, 1, 0).0, XDP_DROP);
    assert_eq!(f.stat(Stat::ReturnWrongSide), before + 1);
    assert_eq!(f.ret(&answer).0, XDP_REDIRECT, "the real answer");

    // Nothing above touched the flow: the backend's data and its RST at the edge go through.
    let (v, out) = f.ret(&data(BACKEND_ISN + 1, b"0123456789"));
    assert_eq!(v, XDP_REDIRECT);
    assert_eq!(check(&out).dst, (CLIENT, 41000));
    let (v, out) = f.ret(&from_backend(0, port, RST, (BACKEND_ISN + 11, 0), b""));
    assert_eq!(v, XDP_REDIRECT, "a RST exactly at the next sequence number");
    assert_eq!(check(&out).dst, (CLIENT, 41000));
    assert_eq!(f.dp.backend_stats(1).unwrap().packets_to_client, 4);
}

/// Attack: SYNs no real client sends — martian and own sources, impossible flag
/// combinations, bad data offsets, options that do not parse — are dropped before they take
/// a conntrack entry or a SNAT port, each counted by its reason.
#[test]
fn crafted_syns_are_dropped_before_they_take_any_state() {
    if !require_root("crafted_syns_are_dropped_before_they_take_any_state") {
        return;
    }
    use lb_common::guard::{MARTIAN_V4, SourceRule};
    let mut f = Fixture::new();
    let mut rules: Vec<(std::net::IpAddr, u8, SourceRule)> = MARTIAN_V4
        .iter()
        .map(|(a, l)| ((*a).into(), *l, SourceRule { ifindex: 0 }))
        .collect();
    rules.push((VIP.into(), 32, SourceRule { ifindex: 0 }));
    rules.push((SNAT.into(), 32, SourceRule { ifindex: 0 }));
    rules.push((
        [10, 20, 0, 0].into(),
        24,
        SourceRule {
            ifindex: f.backend_side,
        },
    ));
    f.dp.set_sources(&rules).unwrap();
    assert_eq!(f.dp.sources().len(), rules.len());

    let syn_from = |src: [u8; 4]| tcp((src, 40000), (VIP, 80), SYN);
    let good = tcp((CLIENT, 40000), (VIP, 80), SYN);
    let flags = |extra: u8| packets::with_tcp_bytes(&good, |h| h[13] |= extra);
    let doff = |d: u8| packets::with_tcp_bytes(&good, |h| h[12] = d << 4);
    let opts = |o: &[u8]| {
        packets::with_tcp_bytes(&good, |h| {
            h.extend_from_slice(o);
            h[12] = ((20 + o.len() as u8) / 4) << 4;
        })
    };
    // The IPv4 total length must cover the options appended above.
    let fix_len = packets::fix_ipv4_len;
    let cases: Vec<(&str, Vec<u8>, Stat)> = vec![
        (
            "source 127.0.0.1",
            syn_from([127, 0, 0, 1]),
            Stat::SpoofedSource,
        ),
        (
            "source 0.0.0.0",
            syn_from([0, 0, 0, 0]),
            Stat::SpoofedSource,
        ),
        (
            "source 255.255.255.255",
            syn_from([255; 4]),
            Stat::SpoofedSource,
        ),
        (
            "source multicast",
            syn_from([224, 0, 0, 1]),
            Stat::SpoofedSource,
        ),
        ("source = VIP (land)", syn_from(VIP), Stat::SpoofedSource),
        ("source = SNAT address", syn_from(SNAT), Stat::SpoofedSource),
        (
            "a backend-subnet source from the client side",
            syn_from([10, 20, 0, 50]),
            Stat::SpoofedSource,
        ),
        ("SYN+FIN", flags(0x01), Stat::BadTcpFlags),
        ("SYN+RST", flags(0x04), Stat::BadTcpFlags),
        (
            "SYN+FIN+PSH+URG",
            flags(0x01 | 0x08 | 0x20),
            Stat::BadTcpFlags,
        ),
        ("data offset 4", doff(4), Stat::BadTcpHeader),
        ("data offset past the segment", doff(15), Stat::BadTcpHeader),
        (
            "an option of length 0",
            fix_len(opts(&[2, 0, 0, 0])),
            Stat::BadTcpHeader,
        ),
        (
            "an option running past the header",
            fix_len(opts(&[1, 1, 8, 10])),
            Stat::BadTcpHeader,
        ),
    ];
    f.expect_each(XDP_DROP, cases);
    assert_eq!(f.stat(Stat::NewFlow), 0, "no crafted SYN created a flow");

    // What real clients send still opens flows: options that parse, a client on the
    // backends' own segment arriving there, an ordinary source.
    let ok_opts = fix_len(opts(&[2, 4, 5, 0xb4, 1, 3, 3, 7]));
    assert_eq!(f.run(&ok_opts).0, XDP_REDIRECT, "MSS, NOP, window scale");
    let (v, _, _) = xdp::run_on(
        &mut f.dp,
        PROGRAM,
        &syn_from([10, 20, 0, 50]),
        1,
        f.backend_side,
    );
    assert_eq!(
        v, XDP_TX,
        "a client on the backends' segment, arriving there"
    );
    assert_eq!(f.stat(Stat::NewFlow), 2);
}

/// L4 signals, one packet sequence per row: what each backend's counters must say after
/// it. Every flow goes to backend 1 (index 0); backend 2 must stay untouched throughout.
#[test]
fn connect_failures_and_time_to_first_byte_are_counted_per_backend() {
    if !require_root("connect_failures_and_time_to_first_byte_are_counted_per_backend") {
        return;
    }
    /// A step of a flow: a client segment (`true`) or a backend one.
    enum Step {
        Client(packets::Flags, (u32, u32), &'static [u8]),
        Backend(packets::Flags, (u32, u32), &'static [u8]),
        Syn,
        SynAck,
    }
    use Step::*;
    let req = (CLIENT_ISN + 1, BACKEND_ISN + 1);
    // (name, steps, resets, timeouts, first-byte samples)
    let rows: Vec<(&str, Vec<Step>, u64, u64, u64)> = vec![
        (
            "a RST answering the SYN (nothing listens)",
            vec![Syn, Backend(RST_ACK, (0, CLIENT_ISN + 1), b"")],
            1,
            0,
            0,
        ),
        (
            "the SYN retransmitted twice while no SYN-ACK comes: one timeout",
            vec![Syn, Syn, Syn],
            0,
            1,
            0,
        ),
        (
            "a request and its answer: one first-byte sample",
            vec![
                Syn,
                SynAck,
                Client(ACK, req, b""),
                Client(ACK, req, b"GET / HTTP/1.1\r\n\r\n"),
                Backend(
                    ACK,
                    (BACKEND_ISN + 1, CLIENT_ISN + 19),
                    b"HTTP/1.1 200 OK\r\n",
                ),
                Backend(ACK, (BACKEND_ISN + 18, CLIENT_ISN + 19), b"more"),
                Backend(RST_ACK, (BACKEND_ISN + 22, CLIENT_ISN + 19), b""),
            ],
            0,
            0,
            1,
        ),
        (
            "accepted, then reset before the first byte",
            vec![
                Syn,
                SynAck,
                Client(ACK, req, b"GET / HTTP/1.1\r\n\r\n"),
                Backend(RST_ACK, (BACKEND_ISN + 1, CLIENT_ISN + 19), b""),
            ],
            1,
            0,
            0,
        ),
        (
            "the backend speaks first (a server-first protocol): no sample, no failure",
            vec![
                Syn,
                SynAck,
                Client(ACK, req, b""),
                Backend(ACK, (BACKEND_ISN + 1, CLIENT_ISN + 1), b"220 ready\r\n"),
                Client(ACK, (CLIENT_ISN + 1, BACKEND_ISN + 12), b"HELO\r\n"),
                Backend(ACK, (BACKEND_ISN + 12, CLIENT_ISN + 7), b"250 ok\r\n"),
            ],
            0,
            0,
            0,
        ),
        (
            "a clean close without data: nothing",
            vec![
                Syn,
                SynAck,
                Client(ACK, req, b""),
                Client(FIN, req, b""),
                Backend(FIN, (BACKEND_ISN + 1, CLIENT_ISN + 2), b""),
            ],
            0,
            0,
            0,
        ),
    ];
    for (k, (name, steps, resets, timeouts, samples)) in rows.into_iter().enumerate() {
        let mut f = Fixture::new();
        let cport = 42000 + k as u16;
        let mut port = 0;
        for s in steps {
            let (v, out) = match s {
                Syn => f.run(&tcp((CLIENT, cport), (VIP, 80), SYN)),
                SynAck => f.ret(&syn_ack(0, port)),
                Client(flags, seq_ack, payload) => f.run(&tcp_seq(
                    CLIENT_MAC,
                    (CLIENT, cport),
                    (VIP, 80),
                    flags,
                    seq_ack,
                    payload,
                )),
                Backend(flags, seq_ack, payload) => {
                    f.ret(&from_backend(0, port, flags, seq_ack, payload))
                }
            };
            assert_eq!(v, XDP_REDIRECT, "{name}: every step is forwarded");
            if port == 0 {
                port = snat_port(&check(&out));
            }
        }
        let l4 = f.dp.backend_l4(1).unwrap();
        assert_eq!(
            (l4.connect_reset, l4.connect_timeout, l4.first_byte_count()),
            (resets, timeouts, samples),
            "{name}"
        );
        assert_eq!(
            f.dp.backend_l4(2).unwrap(),
            Default::default(),
            "{name}: another backend's counters moved"
        );
        if samples > 0 {
            // BPF_PROG_TEST_RUN runs back to back: the sample is tiny but real.
            assert!(l4.first_byte_sum_ns > 0, "{name}: {l4:?}");
        }
    }
}

/// The IPv4 packet inside a frame (what an ICMP error quotes).
fn ip_packet(frame: &[u8]) -> &[u8] {
    &frame[14..]
}

/// A quoted packet as a frame again, to check its checksums with `packets::check`.
fn as_frame(quoted: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(quoted);
    f
}

/// ICMP errors about a flow's packets are translated to the flow's other end: outer and
/// quoted addresses, quoted ports and all three checksums, so that the end that sent the
/// packet (as it knows it) recognises its own packet in the error. This is what keeps path-MTU
/// discovery working through the NAT. Errors about nothing of ours pass untouched; an error
/// about a packet to a backend arriving from the client side is spoofed and dropped.
#[test]
fn icmp_errors_about_a_flow_are_translated_to_its_other_end() {
    if !require_root("icmp_errors_about_a_flow_are_translated") {
        return;
    }
    let mut f = Fixture::new();
    let router_b = [10, 20, 0, 254];
    let router_c = [10, 99, 1, 1];
    let mtu_1400 = [0, 0, 0x05, 0x78];

    // A TCP flow: its SYN went to backend 1 from SNAT address:port.
    let syn = tcp((CLIENT, 41000), (VIP, 80), SYN);
    let (v, fwd) = f.run(&syn);
    assert_eq!(v, XDP_REDIRECT);
    let port = snat_port(&check(&fwd));
    let client_saw = with_ttl(&syn, 63);

    // "Fragmentation needed" from a router on the backends' side, quoting the whole packet
    // the balancer sent: the client gets it from the VIP, quoting its own SYN.
    let to_client = f.stat(Stat::IcmpToClient);
    let err = packets::frag_needed(backend_mac(0), router_b, SNAT, 1400, ip_packet(&fwd));
    let (v, out) = f.ret(&err);
    assert_eq!(v, XDP_REDIRECT, "sent out of the client's interface");
    let s = packets::check_icmp(&out);
    assert_eq!(
        (s.src, s.dst, s.smac, s.dmac, s.ttl),
        (VIP, CLIENT, LB_MAC, CLIENT_MAC, 63)
    );
    assert_eq!(
        (s.ty, s.code, s.rest),
        (3, 4, mtu_1400),
        "type, code and MTU kept"
    );
    assert_eq!(
        s.quoted,
        ip_packet(&client_saw),
        "quotes the client's own packet"
    );
    check(&as_frame(&s.quoted));
    assert_eq!(f.stat(Stat::IcmpToClient), to_client + 1);

    // A router that quotes only the IPv4 header and 8 bytes (RFC 792): the same, shorter.
    let err = packets::frag_needed(backend_mac(0), router_b, SNAT, 1400, &ip_packet(&fwd)[..28]);
    let (v, out) = f.ret(&err);
    assert_eq!(v, XDP_REDIRECT);
    let s = packets::check_icmp(&out);
    assert_eq!((s.src, s.dst), (VIP, CLIENT));
    assert_eq!(s.quoted, &ip_packet(&client_saw)[..28]);

    // The backend's SYN-ACK went to the client from the VIP; a router on the client's side
    // cannot pass it on: the backend gets the error from the SNAT address, quoting its own
    // SYN-ACK.
    let answer = syn_ack(0, port);
    let (v, back) = f.ret(&answer);
    assert_eq!(v, XDP_REDIRECT);
    let to_backend = f.stat(Stat::IcmpToBackend);
    let err = packets::frag_needed(CLIENT_MAC, router_c, VIP, 1400, ip_packet(&back));
    let (v, out) = f.run(&err);
    assert_eq!(v, XDP_REDIRECT, "sent towards the backend");
    let s = packets::check_icmp(&out);
    assert_eq!(
        (s.src, s.dst, s.smac, s.dmac),
        (SNAT, BACKENDS[0], VETH_MAC, backend_mac(0))
    );
    assert_eq!((s.ty, s.code, s.rest), (3, 4, mtu_1400));
    assert_eq!(s.quoted, ip_packet(&with_ttl(&answer, 63)));
    check(&as_frame(&s.quoted));
    assert_eq!(f.stat(Stat::IcmpToBackend), to_backend + 1);

    // UDP: the backend's port is closed; the client learns it (port unreachable) about its
    // own datagram, UDP checksum and all.
    let query = udp((CLIENT, 5400), (VIP, 53), b"query");
    let (v, fwd_udp) = f.run(&query);
    assert_eq!(v, XDP_REDIRECT);
    let err = packets::icmp_error(
        backend_mac(0),
        BACKENDS[0],
        SNAT,
        (3, 3),
        [0; 4],
        ip_packet(&fwd_udp),
    );
    let (v, out) = f.ret(&err);
    assert_eq!(v, XDP_REDIRECT);
    let s = packets::check_icmp(&out);
    assert_eq!((s.src, s.dst, s.ty, s.code), (VIP, CLIENT, 3, 3));
    assert_eq!(s.quoted, ip_packet(&with_ttl(&query, 63)));
    check(&as_frame(&s.quoted));

    // Errors about nothing of ours pass untouched, counted.
    let (_, with_opts) = f.run(&tcp_with(
        (CLIENT, 41001),
        (VIP, 80),
        SYN,
        b"",
        &[1, 1, 1, 1],
    ));
    let stranger = tcp((SNAT, 61001), (BACKENDS[0], 8080), SYN);
    let cases: Vec<(&str, Vec<u8>, Stat)> = vec![
        (
            "about a SNAT port without a flow",
            packets::frag_needed(backend_mac(0), router_b, SNAT, 1400, ip_packet(&stranger)),
            Stat::IcmpNotTranslated,
        ),
        (
            "sent elsewhere than the quoted packet's source",
            packets::frag_needed(
                backend_mac(0),
                router_b,
                [10, 20, 0, 99],
                1400,
                ip_packet(&fwd),
            ),
            Stat::IcmpNotTranslated,
        ),
        (
            "quoting a header with IPv4 options",
            packets::frag_needed(backend_mac(0), router_b, SNAT, 1400, ip_packet(&with_opts)),
            Stat::IcmpNotTranslated,
        ),
        (
            "quoting fewer than 8 bytes past the IPv4 header",
            packets::frag_needed(backend_mac(0), router_b, SNAT, 1400, &ip_packet(&fwd)[..24]),
            Stat::IcmpNotTranslated,
        ),
        (
            "an echo request to the VIP",
            packets::icmp_error(CLIENT_MAC, CLIENT, VIP, (8, 0), [0, 1, 0, 1], b"ping"),
            Stat::NotOurs,
        ),
    ];
    for (name, pkt, reason) in cases {
        let before = f.stat(reason);
        let (v, out) = f.ret(&pkt);
        assert_eq!((v, &out), (XDP_PASS, &pkt), "{name}: passed untouched");
        assert_eq!(f.stat(reason), before + 1, "{name}: {reason:?} counted");
    }

    // The same error about a packet to a backend, arriving from the client side: nobody on
    // that side saw the packet, so it is spoofed.
    let spoofed = f.stat(Stat::ReturnWrongSide);
    let err = packets::frag_needed(CLIENT_MAC, router_c, SNAT, 576, ip_packet(&fwd));
    assert_eq!(f.run(&err).0, XDP_DROP);
    assert_eq!(f.stat(Stat::ReturnWrongSide), spoofed + 1);
}

/// Keeps the calling thread on CPU 0: test_run runs the program on the caller's CPU, and the
/// SNAT port classes are per CPU.
fn pin_to_cpu0() {
    pin_to_cpu(0)
}

/// Moves the calling thread to CPU `cpu` (and keeps it there).
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
}

/// A data plane (in a private namespace named after `tag`) whose one service, VIP:80/tcp, has
/// backend 1 alone.
fn one_backend(tag: &str) -> (Netns, Dataplane) {
    let ns = xdp::private_netns(tag, &[(BACKENDS[0], backend_mac(0))]);
    let mut dp = xdp::load(|_| {});
    xdp::set_backend(&mut dp, 1, BACKENDS[0]);
    xdp::single_backend_table(&mut dp, 0, VIP, 80, 6, 1);
    (ns, dp)
}

/// The client's segment from port 40000 to VIP:80 with flags `f`, carrying a request.
fn request(f: packets::Flags) -> Vec<u8> {
    tcp_with(
        (CLIENT, 40000),
        (VIP, 80),
        f,
        b"GET / HTTP/1.1\r\n\r\n",
        &[],
    )
}

/// Sends `pkt` and returns the SNAT port it went out from (it must be forwarded).
fn sent_from(dp: &mut Dataplane, pkt: &[u8]) -> u16 {
    let (v, out, _) = xdp::run(dp, PROGRAM, pkt, 1);
    assert_eq!(v, XDP_REDIRECT, "forwarded");
    check(&out).src.1
}

/// Whether this host has the two CPUs the flow cache tests need (a cache is per CPU); says
/// why not when it has not.
fn two_cpus() -> bool {
    let two = std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2;
    if !two {
        eprintln!("skipped: needs two CPUs (a flow cache is per CPU)");
    }
    two
}

/// The client's connection from port 40000 opens on CPU 1 and sends its request; `meanwhile`
/// runs; CPU 1 forwards more of its packets, from its copy of the flow. Then on CPU 0 the
/// client closes it and opens another on the same 5-tuple: a new flow, with one of CPU 0's
/// SNAT ports. Back on CPU 1, well within its copy's lifetime, the new connection's packets
/// must go out as the new flow's.
fn reopened_on_cpu0_is_sent_as_the_new_flow_by_cpu1(dp: &mut Dataplane, meanwhile: impl FnOnce()) {
    let syn = tcp((CLIENT, 40000), (VIP, 80), SYN);
    pin_to_cpu(1);
    let old = sent_from(dp, &syn);
    meanwhile();
    for _ in 0..3 {
        assert_eq!(sent_from(dp, &request(ACK)), old);
    }
    pin_to_cpu0();
    assert_eq!(sent_from(dp, &tcp((CLIENT, 40000), (VIP, 80), FIN)), old);
    let new = sent_from(dp, &syn);
    assert_ne!(new, old, "each CPU has SNAT ports of its own");
    pin_to_cpu(1);
    for _ in 0..3 {
        assert_eq!(
            sent_from(dp, &request(ACK)),
            new,
            "sent as the new flow, not from CPU 1's copy of the old one"
        );
    }
}

/// Each CPU forwards an established flow's packets from its own copy of the flow's entry
/// (its flow cache). A client that closes a connection and opens another on the same
/// 5-tuple gets a new flow (a new SNAT port, maybe another backend): a CPU that holds a copy
/// of the old flow must send the new connection's packets as the new flow's, at once.
#[test]
fn a_flow_reopened_on_one_cpu_is_never_served_from_another_cpus_copy_of_the_old_one() {
    if !require_root("a_flow_reopened_on_one_cpu_is_never_served") || !two_cpus() {
        return;
    }
    let (_ns, mut dp) = one_backend("fr");
    reopened_on_cpu0_is_sent_as_the_new_flow_by_cpu1(&mut dp, || {});
}

/// While lbd restarts, the old build's balancer still runs, and the new build's new-flow
/// program already sits in the pinned tail-call slot they share: flows the old balancer
/// sends there are opened by the new build, with generations of its own. The old balancer's
/// copies of a flow reopened that way must still go stale at once.
#[test]
fn a_flow_reopened_while_lbd_restarts_is_never_served_from_the_old_programs_copy() {
    if !require_root("a_flow_reopened_while_lbd_restarts") || !two_cpus() {
        return;
    }
    let _ns = xdp::private_netns("fu", &[(BACKENDS[0], backend_mac(0))]);
    let fs = xdp::Bpffs::new("fu");
    let pins = fs.0.join("lb");
    let mut old_build = xdp::load_pinned(&pins);
    xdp::set_backend(&mut old_build, 1, BACKENDS[0]);
    xdp::single_backend_table(&mut old_build, 0, VIP, 80, 6, 1);
    let mut new_build = None;
    // The new build loads once the flow is open, before CPU 1 takes its copies (a load
    // takes longer than a copy lives): it adopts the pinned maps and takes the tail-call
    // slot. The old build's balancer carries every packet.
    reopened_on_cpu0_is_sent_as_the_new_flow_by_cpu1(&mut old_build, || {
        new_build = Some(xdp::load_pinned(&pins));
    });
}

/// The conntrack map's LRU evicts without telling the CPUs' flow caches: a copy of the
/// evicted flow forwards its packets for at most `FLOW_CACHE_TTL_NS`, then they find no flow
/// and pass to the host (which resets the connection), as without a cache.
#[test]
fn an_evicted_flow_is_forwarded_from_a_cpus_copy_for_at_most_the_cache_ttl() {
    if !require_root("an_evicted_flow_is_forwarded_from_a_cpus_copy") {
        return;
    }
    let (_ns, mut dp) = one_backend("fe");
    pin_to_cpu0();
    let port = sent_from(&mut dp, &tcp((CLIENT, 40000), (VIP, 80), SYN));
    assert_eq!(sent_from(&mut dp, &request(ACK)), port);
    dp.evict_flow_entry(&client_flow(40000), false).unwrap();
    assert_eq!(
        sent_from(&mut dp, &request(ACK)),
        port,
        "CPU 0's copy still forwards it"
    );
    std::thread::sleep(std::time::Duration::from_nanos(
        lb_common::conntrack::FLOW_CACHE_TTL_NS + 50_000_000,
    ));
    let pkt = request(ACK);
    let (v, out, _) = xdp::run(&mut dp, PROGRAM, &pkt, 1);
    assert_eq!(
        (v, out),
        (XDP_PASS, pkt),
        "no flow: passed to the host untouched"
    );
}

/// A SNAT port is held by its flow's reverse-NAT entry, which the XDP program never evicts;
/// lbd's flow collector frees it once the flow is over (closed, or idle past its timeout) or
/// its conntrack entry has been evicted (at two passes in a row, `ORPHAN_AGE` apart: a CPU's
/// flow cache may forward the flow that long after). So a port never goes to a new flow
/// while a flow that still has an entry on either side, or a cached copy, uses it.
#[test]
fn a_snat_port_goes_to_a_new_flow_only_once_its_flow_is_gone_from_both_maps() {
    if !require_root("a_snat_port_goes_to_a_new_flow_only_once") {
        return;
    }
    use lb_userspace::dataplane::gc::{Collected, Suspects};
    pin_to_cpu0();
    // Every flow here competes for CPU 0's port. Closed flows free their port 50 ms after
    // their last packet.
    let (_ns, mut dp) = one_port_per_cpu("lp", |t| t.tcp_closed_reuse_ns = 50_000_000);
    let stat = |dp: &Dataplane, s: Stat| dp.xdp_stats().unwrap()[s as usize];
    let from = |port: u16, f: packets::Flags| tcp((CLIENT, port), (VIP, 80), f);
    let mut suspects = Suspects::default();
    let refused = |dp: &mut Dataplane, client_port: u16| {
        let before = stat(dp, Stat::FlowNotCreated);
        let (v, _, _) = xdp::run(dp, PROGRAM, &from(client_port, SYN), 1);
        v == XDP_DROP && stat(dp, Stat::FlowNotCreated) == before + 1
    };

    // Flow A takes the port.
    let (v, out, _) = xdp::run(&mut dp, PROGRAM, &from(40000, SYN), 1);
    assert_eq!(v, XDP_REDIRECT);
    let port = check(&out).src.1;

    // A's conntrack entry is evicted (its LRU map was full). A's client packets find no
    // flow (the host resets them), but its reverse entry still holds the port: the backend
    // may still answer. Flow B does not get it.
    let a_key = client_flow(40000);
    dp.evict_flow_entry(&a_key, false).unwrap();
    let a_ack = from(40000, ACK);
    assert_eq!(
        xdp::run(&mut dp, PROGRAM, &a_ack, 1).1,
        a_ack,
        "A's packet passes"
    );
    assert!(refused(&mut dp, 40001), "B must not get A's port yet");

    // The collector's first pass only suspects A's reverse entry (a new flow's two inserts
    // are not atomic); so does a second one right after (a CPU may still forward A from its
    // flow cache); the first pass `ORPHAN_AGE` later frees the port, and B gets it.
    for pass in ["first pass", "second pass, at once"] {
        let c = dp.collect_flows(&mut suspects).unwrap();
        assert_eq!((c.orphaned, c.finished, c.kept), (0, 0, 1), "{pass}: {c:?}");
        assert!(
            refused(&mut dp, 40001),
            "B must not get A's port after the {pass}"
        );
    }
    std::thread::sleep(lb_userspace::dataplane::gc::ORPHAN_AGE);
    let c = dp.collect_flows(&mut suspects).unwrap();
    assert_eq!(
        c,
        Collected {
            finished: 0,
            orphaned: 1,
            kept: 0
        }
    );
    let (v, out, _) = xdp::run(&mut dp, PROGRAM, &from(40001, SYN), 1);
    assert_eq!(v, XDP_REDIRECT);
    assert_eq!(check(&out).src.1, port, "B got the freed port");

    // A live flow is never collected, however many passes: C is refused.
    assert_eq!(
        xdp::run(&mut dp, PROGRAM, &from(40001, ACK), 1).0,
        XDP_REDIRECT
    );
    for _ in 0..2 {
        let c = dp.collect_flows(&mut suspects).unwrap();
        assert_eq!((c.orphaned, c.finished, c.kept), (0, 0, 1), "{c:?}");
    }
    assert!(refused(&mut dp, 40002), "C must not get B's port");

    // B closes; 50 ms later (tcp_closed_reuse) its port is free, and C gets it.
    assert_eq!(
        xdp::run(&mut dp, PROGRAM, &from(40001, FIN), 1).0,
        XDP_REDIRECT
    );
    assert_eq!(
        dp.collect_flows(&mut suspects).unwrap().finished,
        0,
        "just closed"
    );
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(dp.collect_flows(&mut suspects).unwrap().finished, 1);
    let (v, out, _) = xdp::run(&mut dp, PROGRAM, &from(40002, SYN), 1);
    assert_eq!(v, XDP_REDIRECT);
    assert_eq!(check(&out).src.1, port, "C got the port B closed");
}

/// The collector reads the reverse-NAT map thousands of entries per system call and removes
/// in batches too: with more flows than one read holds (4 096), every flow is judged — the
/// live ones kept, the orphaned ones (conntrack entry evicted) removed at the second pass,
/// in more than one removal batch — and nothing is judged twice.
#[test]
fn the_flow_collector_judges_every_flow_of_a_table_larger_than_one_read() {
    if !require_root("the_flow_collector_judges_every_flow") {
        return;
    }
    use lb_userspace::dataplane::gc::{Collected, Suspects};
    pin_to_cpu0();
    const FLOWS: u16 = 3 * 4096 + 100;
    let _ns = xdp::private_netns("lb", &[(BACKENDS[0], backend_mac(0))]);
    let mut dp = xdp::load(|t| {
        t.snat_port_min = 1024;
        t.snat_port_max = 65535;
    });
    xdp::set_backend(&mut dp, 1, BACKENDS[0]);
    xdp::single_backend_table(&mut dp, 0, VIP, 80, 6, 1);
    let key = client_flow;
    let ports = || 20000..20000 + FLOWS;
    for p in ports() {
        let (v, _, _) = xdp::run(&mut dp, PROGRAM, &tcp((CLIENT, p), (VIP, 80), SYN), 1);
        assert_eq!(v, XDP_REDIRECT, "flow from port {p}");
    }
    let mut suspects = Suspects::default();
    let all = Collected {
        kept: FLOWS as u64,
        ..Collected::default()
    };
    assert_eq!(dp.collect_flows(&mut suspects).unwrap(), all);

    // A third of the flows lose their conntrack entry: suspected at the next pass (still
    // kept), removed at the first one `ORPHAN_AGE` after.
    let lost: Vec<u16> = ports().step_by(3).collect();
    for &p in &lost {
        dp.evict_flow_entry(&key(p), false).unwrap();
    }
    assert_eq!(dp.collect_flows(&mut suspects).unwrap(), all);
    std::thread::sleep(lb_userspace::dataplane::gc::ORPHAN_AGE);
    let n = lost.len() as u64;
    assert!(n > 4096, "more than one removal batch");
    assert_eq!(
        dp.collect_flows(&mut suspects).unwrap(),
        Collected {
            finished: 0,
            orphaned: n,
            kept: FLOWS as u64 - n
        }
    );
    assert_eq!(
        dp.collect_flows(&mut suspects).unwrap(),
        Collected {
            kept: FLOWS as u64 - n,
            ..Collected::default()
        },
        "the removed are gone, the rest stay"
    );
}

const VIP6: [u8; 16] = addr6(0x99, 0x10);
const OTHER6: [u8; 16] = addr6(0x99, 0x11);
const CLIENT6: [u8; 16] = addr6(0x99, 0x102);
/// IPv6 backends 5..=7: the first two with permanent neighbour entries, the third none.
const BACKENDS6: [[u8; 16]; 3] = [addr6(0x20, 0x11), addr6(0x20, 0x12), addr6(0x20, 0x21)];

impl Fixture {
    /// The IPv6 side: backends 5..=7, service slot 3 (VIP6 port 80 TCP) on backend `tcp`
    /// and slot 4 (VIP6 port 53 UDP) on backend 5, SNAT address [`xdp::SNAT6`].
    fn v6(&mut self, tcp: u32) {
        for (i, b) in BACKENDS6.iter().enumerate() {
            if i < 2 {
                xdp::neighbour(&self._ns, (*b).into(), backend_mac(i));
            }
            xdp::set_backend_ip(&mut self.dp, 5 + i as u32, (*b).into(), 8080);
        }
        self.table6(tcp);
        xdp::service_ip(&mut self.dp, 4, (VIP6.into(), 53), 17, 5, xdp::SNAT6.into());
    }

    fn table6(&mut self, backend: u32) {
        xdp::service_ip(
            &mut self.dp,
            3,
            (VIP6.into(), 80),
            6,
            backend,
            xdp::SNAT6.into(),
        );
    }
}

/// IPv6 in connection mode: what the IPv4 table checks, for IPv6 flows — NAT both ways with
/// valid checksums and the hop limit decremented, established flows keeping their backend
/// across a table change, extension headers walked past and forwarded intact, UDP; and the
/// IPv6 packets the balancer must leave to the kernel, each counted by its reason.
#[test]
fn ipv6_flows_are_natted_both_ways_and_what_is_not_ours_passes() {
    if !require_root("ipv6_flows_are_natted_both_ways_and_what_is_not_ours_passes") {
        return;
    }
    let mut f = Fixture::new();
    f.v6(5);
    let from_backend6 = |i: usize, port: u16, fl, seq_ack, payload: &[u8]| {
        tcp6_full(
            backend_mac(i),
            (BACKENDS6[i], 8080),
            (xdp::SNAT6, port),
            fl,
            seq_ack,
            payload,
            &[],
        )
    };

    let (v, out) = f.run(&tcp6((CLIENT6, 40000), (VIP6, 80), SYN));
    assert_eq!(v, XDP_REDIRECT, "SYN to the IPv6 VIP goes to its backend");
    let seen = check6(&out);
    let port = seen.src.1;
    assert_eq!(
        seen,
        Seen6 {
            src: (xdp::SNAT6, port),
            dst: (BACKENDS6[0], 8080),
            hop_limit: 63,
            smac: VETH_MAC,
            dmac: backend_mac(0),
        }
    );
    let (_, out) = f.run(&tcp6((CLIENT6, 40000), (VIP6, 80), SYN));
    assert_eq!(
        check6(&out).src,
        (xdp::SNAT6, port),
        "a retransmitted SYN stays on its flow"
    );

    let (v, out) = f.ret(&from_backend6(
        0,
        port,
        SYN_ACK,
        (BACKEND_ISN, CLIENT_ISN + 1),
        b"",
    ));
    assert_eq!(
        v, XDP_REDIRECT,
        "the backend's answer goes back to the client"
    );
    assert_eq!(
        check6(&out),
        Seen6 {
            src: (VIP6, 80),
            dst: (CLIENT6, 40000),
            hop_limit: 63,
            smac: LB_MAC,
            dmac: CLIENT_MAC,
        }
    );
    // The same answer from another MAC is spoofed.
    let mut spoofed = from_backend6(0, port, ACK, (BACKEND_ISN + 1, CLIENT_ISN + 1), b"x");
    spoofed[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0x66, 0x66]);
    assert_eq!(
        f.ret(&spoofed).0,
        XDP_DROP,
        "return traffic from elsewhere is dropped"
    );

    // A table change: the established flow stays, a new one follows the table.
    f.table6(6);
    let data = tcp6_full(
        CLIENT_MAC,
        (CLIENT6, 40000),
        (VIP6, 80),
        ACK,
        (CLIENT_ISN + 1, BACKEND_ISN + 1),
        b"GET / HTTP/1.1\r\n\r\n",
        &[],
    );
    let (v, out) = f.run(&data);
    assert_eq!(v, XDP_REDIRECT);
    assert_eq!(
        check6(&out).dst,
        (BACKENDS6[0], 8080),
        "established flow keeps its backend"
    );
    let (_, out) = f.run(&tcp6((CLIENT6, 40002), (VIP6, 80), SYN));
    assert_eq!(
        check6(&out).dst,
        (BACKENDS6[1], 8080),
        "a new flow follows the new table"
    );

    // Hop-by-hop and destination options are walked past and forwarded as they came.
    let exts = [hop_by_hop(), dest_opts(1)];
    let with_exts = tcp6_full(
        CLIENT_MAC,
        (CLIENT6, 40004),
        (VIP6, 80),
        SYN,
        (CLIENT_ISN, 0),
        b"",
        &exts,
    );
    let (v, out) = f.run(&with_exts);
    assert_eq!(
        v, XDP_REDIRECT,
        "a SYN behind extension headers is balanced"
    );
    assert_eq!(check6(&out).dst, (BACKENDS6[1], 8080));
    assert_eq!(
        &out[14 + 40 + 2..14 + 40 + 8],
        &with_exts[14 + 40 + 2..14 + 40 + 8]
    );
    assert_eq!(out.len(), with_exts.len());

    // UDP both ways, checksums valid (mandatory over IPv6).
    let (v, out) = f.run(&udp6(CLIENT_MAC, (CLIENT6, 5353), (VIP6, 53), b"query"));
    assert_eq!(v, XDP_REDIRECT);
    let seen = check6(&out);
    assert_eq!(seen.dst, (BACKENDS6[0], 8080));
    let (v, out) = f.ret(&udp6(
        backend_mac(0),
        (BACKENDS6[0], 8080),
        (xdp::SNAT6, seen.src.1),
        b"answer",
    ));
    assert_eq!(v, XDP_REDIRECT);
    assert_eq!(check6(&out).src, (VIP6, 53));
    assert_eq!(check6(&out).dst, (CLIENT6, 5353));
    assert_eq!(&out[14 + 40 + 8..], b"answer");

    // An unresolved neighbour: rewritten, handed to the kernel.
    f.table6(7);
    let before = f.stat(Stat::FibPass);
    let (v, out) = f.run(&tcp6((CLIENT6, 40006), (VIP6, 80), SYN));
    assert_eq!(v, XDP_PASS);
    assert_eq!(
        check6(&out).dst,
        (BACKENDS6[2], 8080),
        "handed over already rewritten"
    );
    assert_eq!(f.stat(Stat::FibPass), before + 1);

    // What is not ours passes untouched, counted.
    let flows = f.stat(Stat::NewFlow);
    let mut hop1 = tcp6((CLIENT6, 40008), (VIP6, 80), SYN);
    hop1[14 + 7] = 1;
    let five = [
        hop_by_hop(),
        dest_opts(0),
        dest_opts(0),
        dest_opts(0),
        dest_opts(0),
    ];
    let cases: Vec<(&str, Vec<u8>, Stat)> = vec![
        (
            "SYN to another IPv6 address on a served port",
            tcp6((CLIENT6, 40000), (OTHER6, 80), SYN),
            Stat::NotOurs,
        ),
        (
            "neighbour solicitation for the VIP",
            icmp6(CLIENT6, VIP6, 135, 0, &[0; 20]),
            Stat::NotOurs,
        ),
        (
            "an ICMPv6 packet too big",
            icmp6(CLIENT6, VIP6, 2, 0, &[0, 0, 5, 0x78]),
            Stat::IcmpNotTranslated,
        ),
        (
            "a first fragment",
            tcp6_full(
                CLIENT_MAC,
                (CLIENT6, 40010),
                (VIP6, 80),
                SYN,
                (1, 0),
                b"",
                &[fragment()],
            ),
            Stat::Fragment,
        ),
        (
            "a routing header with segments left",
            tcp6_full(
                CLIENT_MAC,
                (CLIENT6, 40012),
                (VIP6, 80),
                SYN,
                (1, 0),
                b"",
                &[routing(1)],
            ),
            Stat::Ipv6ExtUnhandled,
        ),
        (
            "five extension headers",
            tcp6_full(
                CLIENT_MAC,
                (CLIENT6, 40014),
                (VIP6, 80),
                SYN,
                (1, 0),
                b"",
                &five,
            ),
            Stat::Ipv6ExtUnhandled,
        ),
        (
            "a SYN whose hop limit would expire",
            hop1,
            Stat::TtlExceeded,
        ),
        (
            "an ACK without a flow",
            tcp6((CLIENT6, 40016), (VIP6, 80), ACK),
            Stat::NonSynMiss,
        ),
        (
            "truncated TCP header",
            cut(tcp6((CLIENT6, 40018), (VIP6, 80), SYN), 14 + 40 + 12),
            Stat::Malformed,
        ),
    ];
    f.expect_each(XDP_PASS, cases);
    assert_eq!(f.stat(Stat::NewFlow), flows, "none of them opened a flow");
    // A routing header with no segments left is the last hop's: balanced.
    f.table6(5);
    let (v, _) = f.run(&tcp6_full(
        CLIENT_MAC,
        (CLIENT6, 40020),
        (VIP6, 80),
        SYN,
        (1, 0),
        b"",
        &[routing(0)],
    ));
    assert_eq!(
        v, XDP_REDIRECT,
        "a routing header at its last segment is balanced"
    );
}

/// Everything of an IPv6 packet but its hop limit (byte 7).
fn but_hop_limit(p: &[u8]) -> (Vec<u8>, Vec<u8>) {
    (p[..7].to_vec(), p[8..].to_vec())
}

/// ICMPv6 errors about a flow ("packet too big" above all: IPv6 routers never fragment) are
/// translated to the flow's other end, quoting that end's own packet, checksums valid; an
/// error about no flow of ours passes, and one claiming to come from a backend's side from
/// elsewhere is dropped.
#[test]
fn icmpv6_errors_about_a_flow_are_translated_to_its_other_end() {
    if !require_root("icmpv6_errors_about_a_flow_are_translated_to_its_other_end") {
        return;
    }
    let mut f = Fixture::new();
    f.v6(5);
    let router_b = addr6(0x20, 0xfe);
    let router_c = addr6(0x99, 0xfe);

    let syn = tcp6((CLIENT6, 40000), (VIP6, 80), SYN);
    let (_, to_backend) = f.run(&syn);
    let port = check6(&to_backend).src.1;
    // A router on the backends' side: the SYN does not fit its next link.
    let ptb = packet_too_big(
        backend_mac(0),
        router_b,
        xdp::SNAT6,
        1280,
        &to_backend[14..],
    );
    let (v, out) = f.ret(&ptb);
    assert_eq!(v, XDP_REDIRECT, "the error goes to the client");
    let seen = check_icmp6(&out);
    assert_eq!(
        (
            seen.src,
            seen.dst,
            seen.hop_limit,
            seen.smac,
            seen.dmac,
            seen.ty
        ),
        (VIP6, CLIENT6, 63, LB_MAC, CLIENT_MAC, 2)
    );
    assert_eq!(seen.rest, 1280u32.to_be_bytes(), "the MTU is kept");
    assert_eq!(
        but_hop_limit(&seen.quoted),
        but_hop_limit(&syn[14..]),
        "it quotes the client's own SYN (its checksum valid again)"
    );
    assert_eq!(f.stat(Stat::IcmpToClient), 1);

    // The same error from another MAC on the backends' side is spoofed.
    let mut spoofed = ptb.clone();
    spoofed[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0x66, 0x66]);
    assert_eq!(f.ret(&spoofed).0, XDP_DROP);

    // A router on the client's side: the backend's answer does not fit.
    let (_, to_client) = f.ret(&tcp6_full(
        backend_mac(0),
        (BACKENDS6[0], 8080),
        (xdp::SNAT6, port),
        SYN_ACK,
        (BACKEND_ISN, CLIENT_ISN + 1),
        b"",
        &[],
    ));
    assert_eq!(check6(&to_client).dst, (CLIENT6, 40000));
    let ptb = packet_too_big(CLIENT_MAC, router_c, VIP6, 1300, &to_client[14..]);
    let (v, out) = f.run(&ptb);
    assert_eq!(v, XDP_REDIRECT, "the error goes to the backend");
    let seen = check_icmp6(&out);
    assert_eq!(
        (seen.src, seen.dst, seen.hop_limit, seen.smac, seen.dmac),
        (xdp::SNAT6, BACKENDS6[0], 63, VETH_MAC, backend_mac(0))
    );
    let quoted = check6(&[&to_client[..14], &seen.quoted[..]].concat());
    assert_eq!(
        (quoted.src, quoted.dst),
        ((BACKENDS6[0], 8080), (xdp::SNAT6, port)),
        "it quotes the backend's own packet, its TCP checksum valid"
    );
    assert_eq!(f.stat(Stat::IcmpToBackend), 1);

    // UDP: the quoted checksum is fixed too.
    let (_, udp_out) = f.run(&udp6(CLIENT_MAC, (CLIENT6, 5353), (VIP6, 53), b"query"));
    let (v, out) = f.ret(&packet_too_big(
        backend_mac(0),
        router_b,
        xdp::SNAT6,
        1280,
        &udp_out[14..],
    ));
    assert_eq!(v, XDP_REDIRECT);
    let seen = check_icmp6(&out);
    let quoted = check6(&[&udp_out[..14], &seen.quoted[..]].concat());
    assert_eq!((quoted.src, quoted.dst), ((CLIENT6, 5353), (VIP6, 53)));

    // About no flow of ours: the host's.
    let stranger = tcp6((CLIENT6, 40100), (VIP6, 80), ACK);
    let before = f.stat(Stat::IcmpNotTranslated);
    let pkt = packet_too_big(CLIENT_MAC, router_c, CLIENT6, 1280, &stranger[14..]);
    let (v, out) = f.run(&pkt);
    assert_eq!((v, out), (XDP_PASS, pkt));
    assert_eq!(f.stat(Stat::IcmpNotTranslated), before + 1);
}

/// The IPv4 table's guard, window and timestamp cases, for IPv6 flows: crafted SYNs and
/// spoofed sources open no flow, a backend segment outside the flow's window is dropped, and
/// TCP timestamps are shifted onto the balancer's clock and back.
#[test]
fn ipv6_crafted_syns_spoofed_sources_and_out_of_window_answers_take_no_flow() {
    if !require_root("ipv6_crafted_syns_spoofed_sources") {
        return;
    }
    use lb_common::guard::{MARTIAN_V6, SourceRule};
    use packets::TcpOptionElement::{MaximumSegmentSize, Noop, Timestamp, WindowScale};
    let mut f = Fixture::new();
    f.v6(5);
    let never = SourceRule { ifindex: 0 };
    let mut rules: Vec<(std::net::IpAddr, u8, SourceRule)> = MARTIAN_V6
        .iter()
        .map(|(a, l)| ((*a).into(), *l, never))
        .collect();
    rules.push((VIP6.into(), 128, never));
    rules.push((xdp::SNAT6.into(), 128, never));
    rules.push((
        addr6(0x20, 0).into(),
        64,
        SourceRule {
            ifindex: f.backend_side,
        },
    ));
    f.dp.set_sources(&rules).unwrap();

    let syn_from = |src: [u8; 16]| tcp6((src, 40000), (VIP6, 80), SYN);
    let good = tcp6((CLIENT6, 40000), (VIP6, 80), SYN);
    let edit = |e: &dyn Fn(&mut Vec<u8>)| with_tcp6_bytes(&good, e);
    let mut loopback = [0u8; 16];
    loopback[15] = 1;
    let mut all_nodes = loopback;
    all_nodes[..2].copy_from_slice(&[0xff, 0x02]);
    let cases: Vec<(&str, Vec<u8>, Stat)> = vec![
        ("source ::1", syn_from(loopback), Stat::SpoofedSource),
        (
            "source ff02::1 (multicast)",
            syn_from(all_nodes),
            Stat::SpoofedSource,
        ),
        ("source = VIP (land)", syn_from(VIP6), Stat::SpoofedSource),
        (
            "source = SNAT address",
            syn_from(xdp::SNAT6),
            Stat::SpoofedSource,
        ),
        (
            "a backend-subnet source from the client side",
            syn_from(addr6(0x20, 0x50)),
            Stat::SpoofedSource,
        ),
        ("SYN+FIN", edit(&|h| h[13] |= 0x01), Stat::BadTcpFlags),
        (
            "data offset 4",
            edit(&|h| h[12] = 4 << 4),
            Stat::BadTcpHeader,
        ),
        (
            "data offset past the segment",
            edit(&|h| h[12] = 15 << 4),
            Stat::BadTcpHeader,
        ),
        (
            "an option running past the header",
            edit(&|h| {
                h.extend_from_slice(&[1, 1, 8, 10]);
                h[12] = 6 << 4;
            }),
            Stat::BadTcpHeader,
        ),
    ];
    f.expect_each(XDP_DROP, cases);
    assert_eq!(f.stat(Stat::NewFlow), 0, "no crafted SYN created a flow");

    // A real client's SYN with timestamps: shifted onto the balancer's clock.
    let syn = tcp6_opts(
        (CLIENT6, 40100),
        (VIP6, 80),
        SYN,
        &[
            MaximumSegmentSize(1440),
            Noop,
            WindowScale(7),
            Noop,
            Noop,
            Timestamp(3_000_000_000, 0),
        ],
    );
    let (v, out) = f.run(&syn);
    assert_eq!(v, XDP_REDIRECT);
    let port = check6(&out).src.1;
    let (val, _) = timestamps6(&out).expect("the SYN keeps its timestamps");
    assert_ne!(val, 3_000_000_000, "TSval moved onto the balancer's clock");
    let delta = val.wrapping_sub(3_000_000_000);

    // Before its SYN-ACK, the backend may send nothing but an answer to the client's SYN
    // (anything else with an ACK is a connection it still holds on the tuple: it gets a reset).
    let from_b = |flags, seq_ack, payload: &[u8]| {
        tcp6_full(
            backend_mac(0),
            (BACKENDS6[0], 8080),
            (xdp::SNAT6, port),
            flags,
            seq_ack,
            payload,
            &[],
        )
    };
    let (before, resets) = (
        f.stat(Stat::ReturnOutOfWindow),
        f.stat(Stat::BackendStaleReset),
    );
    assert_eq!(f.ret(&from_b(SYN_ACK, (BACKEND_ISN, 77), b"")).0, XDP_DROP);
    assert_eq!(
        f.ret(&from_b(ACK, (BACKEND_ISN, CLIENT_ISN + 1), b"x")).0,
        XDP_TX
    );
    assert_eq!(f.stat(Stat::ReturnOutOfWindow), before + 1);
    assert_eq!(f.stat(Stat::BackendStaleReset), resets + 1);
    assert_eq!(
        f.ret(&from_b(SYN_ACK, (BACKEND_ISN, CLIENT_ISN + 1), b""))
            .0,
        XDP_REDIRECT
    );
    // After it: a reset away from the next sequence number is dropped.
    assert_eq!(f.ret(&from_b(RST, (BACKEND_ISN + 5, 0), b"")).0, XDP_DROP);

    // The backend's echo of the shifted clock goes back to the client as its own.
    let mut ret = with_tcp6_bytes(&from_b(ACK, (BACKEND_ISN + 1, CLIENT_ISN + 1), b""), |h| {
        h.truncate(20);
        h.extend_from_slice(&[1, 1, 8, 10]);
        h.extend_from_slice(&778u32.to_be_bytes());
        h.extend_from_slice(&3_000_000_000u32.wrapping_add(delta).to_be_bytes());
        h[12] = 8 << 4;
    });
    ret[6..12].copy_from_slice(&backend_mac(0));
    let (v, out) = f.ret(&ret);
    assert_eq!(v, XDP_REDIRECT);
    check6(&out);
    assert_eq!(timestamps6(&out), Some((778, 3_000_000_000)));
}

/// The DSR services: 10.99.0.12:8080 (slot 5) on one backend, the IPv6 [`DSR_VIP6`]:8080
/// (slot 6), and 10.99.0.13:8080 (slot 7) on a backend behind a gateway.
const DSR_VIP: [u8; 4] = [10, 99, 0, 12];
const DSR_VIP_ROUTED: [u8; 4] = [10, 99, 0, 13];
const DSR_VIP6: [u8; 16] = addr6(0x99, 0x12);

/// What DSR makes of a client frame: the same IP packet, one hop older, framed from the
/// balancer's backend-side MAC to the backend's.
fn dsr_framed(pkt: &[u8], backend: usize) -> Vec<u8> {
    let mut want = if pkt[12..14] == [0x86, 0xdd] {
        let mut p = pkt.to_vec();
        p[14 + 7] -= 1;
        p
    } else {
        with_ttl(pkt, pkt[14 + 8] - 1)
    };
    want[0..6].copy_from_slice(&backend_mac(backend));
    want[6..12].copy_from_slice(&VETH_MAC);
    want
}

/// Direct server return: packets reach the backend with only their Ethernet addresses and
/// TTL changed (IPv4 and IPv6); established flows keep their backend across a table change;
/// a TCP packet without a flow here (a flow another balancer host carried) is forwarded by
/// the table and tracked, not reset; no reverse state exists (a backend's packet to the
/// client is not ours); and a backend that cannot be reached on the link is never handed a
/// packet the kernel would deliver to this host.
#[test]
fn dsr_forwards_the_packet_unchanged_to_the_tables_backend_even_without_a_flow() {
    if !require_root("dsr_forwards_the_packet_unchanged_to_the_tables_backend_even_without_a_flow")
    {
        return;
    }
    let mut f = Fixture::new();
    xdp::dsr_service(&mut f.dp, 5, (DSR_VIP.into(), 8080), 6, 1);
    let new_flows = f.stat(Stat::NewFlow);

    let syn = tcp((CLIENT, 40000), (DSR_VIP, 8080), SYN);
    let (v, out) = f.run(&syn);
    assert_eq!(v, XDP_REDIRECT, "a SYN goes to the backend");
    assert_eq!(
        out,
        dsr_framed(&syn, 0),
        "only the L2 header and TTL change"
    );
    assert_eq!(f.stat(Stat::NewFlow), new_flows + 1);

    // The backend answers the client itself: a packet from it to the client is nothing the
    // balancer translates.
    let answer = tcp_seq(
        backend_mac(0),
        (DSR_VIP, 8080),
        (CLIENT, 40000),
        SYN_ACK,
        (BACKEND_ISN, CLIENT_ISN + 1),
        b"",
    );
    let (v, out) = f.ret(&answer);
    assert_eq!((v, out), (XDP_PASS, answer), "no reverse state in DSR");

    // A table change: the flow stays, a new one takes the new backend.
    xdp::dsr_service(&mut f.dp, 5, (DSR_VIP.into(), 8080), 6, 2);
    let ack = tcp((CLIENT, 40000), (DSR_VIP, 8080), ACK);
    let (v, out) = f.run(&ack);
    assert_eq!(
        (v, out),
        (XDP_REDIRECT, dsr_framed(&ack, 0)),
        "kept its backend"
    );
    let (v, out) = f.run(&tcp((CLIENT, 40001), (DSR_VIP, 8080), SYN));
    assert_eq!(v, XDP_REDIRECT);
    assert_eq!(
        check(&out).dmac,
        backend_mac(1),
        "a new flow takes the new table"
    );

    // No flow here, not a SYN: forwarded by the table (what any host with this table does),
    // counted once, and tracked from then on.
    let misses = f.stat(Stat::DsrMissForwarded);
    let mid = tcp((CLIENT, 40002), (DSR_VIP, 8080), ACK);
    let (v, out) = f.run(&mid);
    assert_eq!((v, out), (XDP_REDIRECT, dsr_framed(&mid, 1)));
    assert_eq!(f.stat(Stat::DsrMissForwarded), misses + 1);
    xdp::dsr_service(&mut f.dp, 5, (DSR_VIP.into(), 8080), 6, 1);
    let (_, out) = f.run(&mid);
    assert_eq!(
        check(&out).dmac,
        backend_mac(1),
        "picked up mid-way, then kept"
    );
    assert_eq!(f.stat(Stat::DsrMissForwarded), misses + 1, "a hit now");
    // A reset without a flow is forwarded but opens none.
    let rst = tcp((CLIENT, 40003), (DSR_VIP, 8080), RST);
    assert_eq!(f.run(&rst), (XDP_REDIRECT, dsr_framed(&rst, 0)));
    f.run(&rst);
    assert_eq!(f.stat(Stat::DsrMissForwarded), misses + 3, "never tracked");

    // A router's "fragmentation needed" about a backend's answer (VIP → client) comes to the
    // VIP: it goes to that backend as it is — the flow's backend, or for a flow this host
    // never saw, the table's.
    let icmp_before = f.stat(Stat::IcmpToBackend);
    let answer = |port| {
        tcp_seq(
            backend_mac(0),
            (DSR_VIP, 8080),
            (CLIENT, port),
            ACK,
            (BACKEND_ISN + 1, CLIENT_ISN + 1),
            b"",
        )
    };
    xdp::dsr_service(&mut f.dp, 5, (DSR_VIP.into(), 8080), 6, 2);
    // A router's "fragmentation needed" about the backend's answer to client port `port`.
    let error_about = |port| {
        packets::frag_needed(
            CLIENT_MAC,
            [10, 99, 1, 1],
            DSR_VIP,
            1400,
            ip_packet(&answer(port)),
        )
    };
    let err = error_about(40000);
    assert_eq!(
        f.run(&err),
        (XDP_REDIRECT, dsr_framed(&err, 0)),
        "the flow's backend"
    );
    let err = error_about(40010);
    assert_eq!(
        f.run(&err),
        (XDP_REDIRECT, dsr_framed(&err, 1)),
        "the table's backend"
    );
    assert_eq!(f.stat(Stat::IcmpToBackend), icmp_before + 2);

    // TTL 1: the kernel answers with time exceeded.
    let old = with_ttl(&tcp((CLIENT, 40004), (DSR_VIP, 8080), SYN), 1);
    f.expect_each(XDP_PASS, vec![("ttl 1", old, Stat::TtlExceeded)]);

    // Backend 4 has no neighbour entry; a backend behind a gateway is not on the link: the
    // packet, still to the VIP, is dropped and counted, not passed to this host's stack.
    xdp::dsr_service(&mut f.dp, 5, (DSR_VIP.into(), 8080), 6, 4);
    f.run(&tcp((CLIENT, 40005), (DSR_VIP, 8080), ACK));
    f.expect_each(
        XDP_DROP,
        vec![(
            "backend MAC unknown",
            tcp((CLIENT, 40006), (DSR_VIP, 8080), SYN),
            Stat::DsrNotOnLink,
        )],
    );
    f._ns
        .ip(&[
            "route",
            "add",
            "10.30.0.0/24",
            "via",
            "10.20.0.12",
            "dev",
            "veth0",
        ])
        .unwrap();
    xdp::set_backend_at(&mut f.dp, 8, ([10, 30, 0, 5], 8080));
    xdp::dsr_service(&mut f.dp, 7, (DSR_VIP_ROUTED.into(), 8080), 6, 8);
    f.expect_each(
        XDP_DROP,
        vec![(
            "backend behind a gateway",
            tcp((CLIENT, 40007), (DSR_VIP_ROUTED, 8080), SYN),
            Stat::DsrNotOnLink,
        )],
    );

    // IPv6: the same, with the hop limit.
    f.v6(5);
    xdp::dsr_service(&mut f.dp, 6, (DSR_VIP6.into(), 8080), 6, 5);
    let syn6 = tcp6((CLIENT6, 40000), (DSR_VIP6, 8080), SYN);
    let (v, out) = f.run(&syn6);
    assert_eq!((v, out), (XDP_REDIRECT, dsr_framed(&syn6, 0)));
    let mid6 = tcp6((CLIENT6, 40001), (DSR_VIP6, 8080), ACK);
    let misses = f.stat(Stat::DsrMissForwarded);
    assert_eq!(f.run(&mid6), (XDP_REDIRECT, dsr_framed(&mid6, 0)));
    assert_eq!(f.stat(Stat::DsrMissForwarded), misses + 1);
    // "Packet too big" about the backend's answer: to the backend, untranslated.
    let answer6 = tcp6_full(
        backend_mac(0),
        (DSR_VIP6, 8080),
        (CLIENT6, 40000),
        ACK,
        (BACKEND_ISN + 1, CLIENT_ISN + 1),
        b"",
        &[],
    );
    let ptb = packet_too_big(CLIENT_MAC, addr6(0x99, 0x1), DSR_VIP6, 1300, &answer6[14..]);
    assert_eq!(f.run(&ptb), (XDP_REDIRECT, dsr_framed(&ptb, 0)));
}
