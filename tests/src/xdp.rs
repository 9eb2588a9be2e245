//! A loaded data plane in a private namespace, for BPF_PROG_TEST_RUN fixtures and benchmarks.
//!
//! test_run runs the program on the namespace's loopback, so fib lookups see this namespace's
//! routes: a veth `veth0` (MAC [`VETH_MAC`], 10.20.0.1/24) with permanent neighbour entries
//! for the given backends gives them known, resolved next hops.

use aya::programs::{TestRun, TestRunOptions};
use lb_common::{TABLE_SIZE, Tunables, backend::BackendInfo, flow::v4, service::ServiceKey};
use lb_userspace::dataplane::{Dataplane, LoadOptions, empty_table};

use crate::netns::{Netns, unique_prefix};

/// MAC of the namespace's `veth0` (the egress towards backends).
pub const VETH_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x00];
/// The SNAT address every fixture service uses (`veth0`'s address).
pub const SNAT: [u8; 4] = [10, 20, 0, 1];

/// Creates a namespace with `veth0` and a permanent neighbour entry per `(address, MAC)`,
/// enables forwarding, and moves the calling thread into it. Deleted when dropped.
pub fn private_netns(tag: &str, neighbours: &[([u8; 4], [u8; 6])]) -> Netns {
    let ns = Netns::new(&unique_prefix(tag)).unwrap();
    let veth_mac = mac_text(&VETH_MAC);
    ns.ip(&[
        "link", "add", "veth0", "address", &veth_mac, "type", "veth", "peer", "name", "veth1",
    ])
    .unwrap();
    ns.ip(&["addr", "add", "10.20.0.1/24", "dev", "veth0"])
        .unwrap();
    ns.ip(&["link", "set", "veth0", "up"]).unwrap();
    ns.ip(&["link", "set", "veth1", "up"]).unwrap();
    for (addr, m) in neighbours {
        neighbour(&ns, (*addr).into(), *m);
    }
    ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    // IPv6 too: `fd00:20::1/64` on veth0 ([`SNAT6`]), forwarding on (the fib lookup helper
    // refuses to route IPv6 without it).
    ns.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
    ns.ip(&["addr", "add", "fd00:20::1/64", "dev", "veth0", "nodad"])
        .unwrap();
    ns.enter().unwrap();
    ns
}

/// The IPv6 SNAT address of fixture services (`veth0`'s IPv6 address).
pub const SNAT6: [u8; 16] = crate::packets6::addr6(0x20, 1);

/// Adds a permanent neighbour entry on `veth0` of `ns`.
pub fn neighbour(ns: &Netns, addr: std::net::IpAddr, mac: [u8; 6]) {
    ns.ip(&[
        "neigh",
        "add",
        &addr.to_string(),
        "lladdr",
        &mac_text(&mac),
        "dev",
        "veth0",
        "nud",
        "permanent",
    ])
    .unwrap();
}

/// A MAC address as `ip` writes it (`02:00:00:00:01:00`).
fn mac_text(m: &[u8; 6]) -> String {
    m.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Writes backend `id` at `addr:port`, of either family.
pub fn set_backend_ip(dp: &mut Dataplane, id: u32, addr: std::net::IpAddr, port: u16) {
    let (bytes, family) = lb_userspace::dataplane::ip_bytes(addr);
    let info = BackendInfo {
        addr: bytes,
        port: port.to_be(),
        family,
        flags: BackendInfo::VALID,
        _pad: 0,
    };
    dp.set_backend(id, Some(info)).unwrap();
}

/// Publishes a table for service slot `svc_id` (`vip:port`, `proto`, either family) whose
/// every bucket is `backend`, with SNAT address `snat` (of the VIP's family).
pub fn service_ip(
    dp: &mut Dataplane,
    svc_id: u32,
    (vip, port): (std::net::IpAddr, u16),
    proto: u8,
    backend: u32,
    snat: std::net::IpAddr,
) {
    publish(dp, svc_id, (vip, port), proto, backend, (snat, 0));
}

/// Like [`service_ip`], for a direct-server-return service (as lbd publishes one: the VIP in
/// the SNAT address's place, the DSR flag set).
pub fn dsr_service(
    dp: &mut Dataplane,
    svc_id: u32,
    (vip, port): (std::net::IpAddr, u16),
    proto: u8,
    backend: u32,
) {
    let dsr = lb_common::service::ServiceValue::DSR;
    publish(dp, svc_id, (vip, port), proto, backend, (vip, dsr));
}

fn publish(
    dp: &mut Dataplane,
    svc_id: u32,
    (vip, port): (std::net::IpAddr, u16),
    proto: u8,
    backend: u32,
    (snat, flags): (std::net::IpAddr, u32),
) {
    let (addr, family) = lb_userspace::dataplane::ip_bytes(vip);
    let key = ServiceKey {
        addr,
        port: port.to_be(),
        proto,
        family,
        _pad: 0,
    };
    let mut t = empty_table();
    t.buckets = [backend; TABLE_SIZE as usize];
    // As the daemon does: a table half that was live a moment ago is written after its grace.
    if let Some(until) = dp.grace_until(svc_id) {
        std::thread::sleep(
            until
                .into_std()
                .saturating_duration_since(std::time::Instant::now()),
        );
    }
    let snat = lb_userspace::dataplane::ip_bytes(snat).0;
    dp.publish_table(&key, svc_id, (snat, flags), &t).unwrap();
}

/// A private bpffs, unmounted and removed on drop.
pub struct Bpffs(pub std::path::PathBuf);

impl Bpffs {
    /// Mounts one at `/run/<unique prefix from tag>`.
    pub fn new(tag: &str) -> Bpffs {
        let dir = std::path::PathBuf::from(format!("/run/{}", crate::netns::unique_prefix(tag)));
        std::fs::create_dir_all(&dir).unwrap();
        let fs = Bpffs(dir);
        crate::netns::run(&["mount", "-t", "bpf", "bpf", fs.0.to_str().unwrap()]).unwrap();
        fs
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = crate::netns::run(&["umount", self.0.to_str().unwrap_or("")]);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Loads the program as lbd does, pinning (or adopting) its maps and tail-call slot under
/// `pin_dir`, with the real CPU count.
pub fn load_pinned(pin_dir: &std::path::Path) -> Dataplane {
    let mut opts = LoadOptions {
        pin_dir: Some(pin_dir.to_path_buf()),
        ..LoadOptions::default()
    };
    opts.tunables.cpus = aya::util::nr_cpus().unwrap() as u32;
    Dataplane::load(&opts).unwrap()
}

/// Loads the program (no pins) with the real CPU count and `tweak` applied to the tunables.
pub fn load(tweak: impl FnOnce(&mut Tunables)) -> Dataplane {
    let mut opts = LoadOptions::default();
    opts.tunables.cpus = aya::util::nr_cpus().unwrap() as u32;
    tweak(&mut opts.tunables);
    Dataplane::load(&opts).unwrap()
}

/// Writes backend `id` at `addr:8080`.
pub fn set_backend(dp: &mut Dataplane, id: u32, addr: [u8; 4]) {
    set_backend_at(dp, id, (addr, 8080));
}

/// Writes backend `id` at `addr:port`.
pub fn set_backend_at(dp: &mut Dataplane, id: u32, (addr, port): ([u8; 4], u16)) {
    let info = BackendInfo {
        addr: v4(addr),
        port: port.to_be(),
        family: lb_common::FAMILY_V4,
        flags: BackendInfo::VALID,
        _pad: 0,
    };
    dp.set_backend(id, Some(info)).unwrap();
}

/// The key of the IPv4 service `vip:port` over `proto`.
pub fn service_key(vip: [u8; 4], port: u16, proto: u8) -> ServiceKey {
    ServiceKey {
        addr: v4(vip),
        port: port.to_be(),
        proto,
        family: lb_common::FAMILY_V4,
        _pad: 0,
    }
}

/// Publishes a table for service slot `svc_id` (`vip:port`, `proto`) whose every bucket is
/// `backend` (0 = an empty table), with SNAT address [`SNAT`].
pub fn single_backend_table(
    dp: &mut Dataplane,
    svc_id: u32,
    vip: [u8; 4],
    port: u16,
    proto: u8,
    backend: u32,
) {
    single_backend_service(dp, svc_id, (vip, port), proto, backend, SNAT);
}

/// Like [`single_backend_table`], with SNAT address `snat`.
pub fn single_backend_service(
    dp: &mut Dataplane,
    svc_id: u32,
    (vip, port): ([u8; 4], u16),
    proto: u8,
    backend: u32,
    snat: [u8; 4],
) {
    service_ip(dp, svc_id, (vip.into(), port), proto, backend, snat.into());
}

/// One BPF_PROG_TEST_RUN of program `prog`: verdict, output frame, and the kernel's
/// per-run duration in ns. The packet arrives on the namespace's loopback.
pub fn run(dp: &mut Dataplane, prog: &str, pkt: &[u8], repeat: u32) -> (u32, Vec<u8>, f64) {
    run_on(dp, prog, pkt, repeat, 0)
}

/// The interface index of `name` in the calling thread's namespace.
pub fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(i, 0, "no interface {name}");
    i
}

/// Like [`run`], with the packet arriving on interface `ifindex` (0: loopback), as
/// `xdp_md.ingress_ifindex` says.
pub fn run_on(
    dp: &mut Dataplane,
    prog: &str,
    pkt: &[u8],
    repeat: u32,
    ifindex: u32,
) -> (u32, Vec<u8>, f64) {
    let p = dp.program(prog).unwrap();
    let mut out = vec![0u8; pkt.len() + 64];
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex (the kernel wants data 0 and data_end the frame's length).
    let md: Vec<u8> = [0, pkt.len() as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect();
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            ctx_in: (ifindex != 0).then_some(&md[..]),
            repeat,
            ..Default::default()
        })
        .unwrap();
    out.truncate(r.data_size_out as usize);
    (r.return_value, out, r.duration.as_nanos() as f64)
}
