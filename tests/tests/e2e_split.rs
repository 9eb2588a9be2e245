//! End to end in network namespaces: real TCP connections through the XDP balancer to HTTP
//! backends that answer with their name.

use lb_tests::{check_share, legacy, require_root, topology::Topology};

fn split_follows_weights_and_keepalive_flows_keep_their_backend(mode: &str) {
    let mut t = Topology::new("e", mode).unwrap();
    t.start_lbd().unwrap();

    let (by, failed) = t.new_connections(1000);
    eprintln!("[{mode}] 90/10: {by:?}, failed {failed}");
    assert_eq!(
        failed,
        0,
        "every connection must succeed; lbd log:\n{}",
        t.lbd_log()
    );
    if let Err(e) = check_share(legacy(&by), 1000, 0.9) {
        panic!("legacy pool at 90/10: {e}");
    }
    assert_eq!(by.len(), 4, "every backend takes flows: {by:?}");

    // 20 keep-alive connections opened before the change.
    let kept = t.keepalive(20);

    t.control("set split web legacy=50 k8s=50").unwrap();
    let backends = t.control("show backends web").unwrap();
    assert!(backends.contains("legacy legacy-1 1 25.00%"), "{backends}");

    let (by, failed) = t.new_connections(1000);
    eprintln!("[{mode}] 50/50: {by:?}, failed {failed}");
    assert_eq!(failed, 0);
    if let Err(e) = check_share(legacy(&by), 1000, 0.5) {
        panic!("legacy pool at 50/50: {e}");
    }

    // The established keep-alive connections still work, each on the backend it had.
    let moved = t.moved(kept);
    assert!(
        moved.is_empty(),
        "established flows changed backend: {moved:?}"
    );
}

#[test]
fn native_xdp_split_follows_weights_and_keepalive_flows_keep_their_backend() {
    if !require_root("native_xdp_split_follows_weights") {
        return;
    }
    split_follows_weights_and_keepalive_flows_keep_their_backend("native");
}

#[test]
fn skb_xdp_split_follows_weights_and_keepalive_flows_keep_their_backend() {
    if !require_root("skb_xdp_split_follows_weights") {
        return;
    }
    split_follows_weights_and_keepalive_flows_keep_their_backend("skb");
}
