//! Dual stack end to end: one pool set behind an IPv4 VIP (`web`) and an IPv6 VIP (`web6`),
//! real TCP connections over each through the XDP balancer (full NAT on both families).

use std::{net::SocketAddr, time::Duration};

use lb_tests::{check_share, legacy, require_root, topology::Topology};

#[test]
fn both_families_follow_the_split_and_keep_established_flows_across_a_change() {
    if !require_root("both_families_follow_the_split") {
        return;
    }
    let mut t = Topology::new("ds", "native").unwrap();
    t.dual_stack().unwrap();
    t.start_lbd().unwrap();
    // Every IPv6 backend passes its (IPv6) health check.
    let started = std::time::Instant::now();
    loop {
        let b = t.control("show backends web6").unwrap();
        if b.lines().filter(|l| l.ends_with(" up")).count() == 4 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "IPv6 backends not all up:\n{b}\n{}",
            t.lbd_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let (vip4, vip6) = (t.vip(), t.vip6());
    for (family, vip) in [("IPv4", vip4), ("IPv6", vip6)] {
        let (by, failed) = t.new_connections_to(vip, 1000);
        eprintln!("[{family}] 90/10: {by:?}, failed {failed}");
        assert_eq!(
            failed,
            0,
            "[{family}] every connection succeeds; lbd log:\n{}",
            t.lbd_log()
        );
        if let Err(e) = check_share(legacy(&by), 1000, 0.9) {
            panic!("[{family}] legacy pool at 90/10: {e}");
        }
        assert_eq!(by.len(), 4, "[{family}] every backend takes flows: {by:?}");
    }

    let kept4 = t.keepalive_to(vip4, 10);
    let kept6 = t.keepalive_to(vip6, 10);
    t.control("set split web legacy=50 k8s=50").unwrap();
    t.control("set split web6 legacy=50 k8s=50").unwrap();
    for (family, vip) in [("IPv4", vip4), ("IPv6", vip6)] {
        let (by, failed) = t.new_connections_to(vip, 1000);
        eprintln!("[{family}] 50/50: {by:?}, failed {failed}");
        assert_eq!(
            failed, 0,
            "[{family}] every connection succeeds after the change"
        );
        if let Err(e) = check_share(legacy(&by), 1000, 0.5) {
            panic!("[{family}] legacy pool at 50/50: {e}");
        }
    }
    let moved = t.moved(kept4.into_iter().chain(kept6).collect());
    assert!(
        moved.is_empty(),
        "established flows changed backend: {moved:?}"
    );

    // `explain` computes an IPv6 client's backend as the kernel does. (Ports below the
    // ephemeral range: the connections above used thousands of those.)
    for port in 20000..20020u16 {
        let from: SocketAddr = format!("[fd00:99:1::2]:{port}").parse().unwrap();
        let (said, got) = t.explain_and_connect("web6", from, vip6).unwrap();
        assert_eq!(said, got, "explain and the kernel disagree for {from}");
    }
}
