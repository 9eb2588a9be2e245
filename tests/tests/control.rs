//! The control socket against a running lbd in namespaces: `explain` names the backend a
//! real flow from that port reaches. (The grammar, bad inputs, concurrent clients, lbctl and
//! socat run in process without root: `lb-userspace/tests/control_socket.rs`.)

use std::net::SocketAddr;

use lb_tests::{require_root, topology::Topology};

#[test]
fn explain_names_the_backend_a_real_flow_reaches() {
    if !require_root("explain_names_the_backend") {
        return;
    }
    let mut t = Topology::new("x", "skb").unwrap();
    t.start_lbd().unwrap();
    t.control("set split web legacy=50 k8s=50").unwrap();
    let vip = t.vip();
    let mut agreed = 0;
    for port in 41000..41040u16 {
        let from: SocketAddr = format!("10.99.1.2:{port}").parse().unwrap();
        let (said, got) = t.explain_and_connect("web", from, vip).unwrap();
        assert_eq!(said, got, "explain and the kernel disagree for {from}");
        agreed += 1;
    }
    assert_eq!(agreed, 40);
}
