//! Scale-out across balancer hosts, in namespaces: a router running BIRD spreads flows over
//! two balancer hosts by ECMP (L4 hash); each host runs lbd, which announces the VIP through
//! its own BIRD (BGP with BFD). What users of several hosts rely on: new flows spread over
//! both hosts, both send a flow to the same backend, a host's death withdraws its route within
//! the BFD timers and — with DSR — breaks no established flow, full-NAT breaks only the dead
//! host's flows, and a drained host stops receiving traffic while its flows go on.

use std::time::{Duration, Instant};

use lb_tests::{check_share, http::Client, require_root, scale_out::ScaleOut};

/// `show table web`'s checksum on balancer `i`.
fn checksum(t: &ScaleOut, i: usize) -> String {
    let first = t.lbs[i].control("show table web").unwrap();
    let line = first.lines().next().unwrap_or_default().to_string();
    line.rsplit(' ').next().unwrap_or_default().to_string()
}

/// New flows created on balancer `i` so far.
fn new_flows(t: &ScaleOut, i: usize) -> f64 {
    t.lbs[i].metric("lb_xdp_events_total", "reason=\"new_flow\"")
}

/// `n` one-request connections from the client: each one's client port and the backend that
/// answered (`None`: it failed).
fn one_shot(t: &ScaleOut, n: usize) -> Vec<(u16, Option<String>)> {
    t.in_client(move || {
        (0..n)
            .map(|_| match Client::connect(ScaleOut::vip()) {
                Ok(mut c) => {
                    let port = c.local_addr().map(|a| a.port()).unwrap_or(0);
                    (port, c.get(true).ok())
                }
                Err(_) => (0, None),
            })
            .collect()
    })
}

/// `n` keep-alive connections, one request each: the connection and who answered.
fn keep_alive(t: &ScaleOut, n: usize) -> Vec<(Client, String)> {
    t.in_client(move || {
        (0..n)
            .map(|_| {
                let mut c = Client::connect(ScaleOut::vip()).unwrap();
                // Long enough for retransmissions across a failover.
                c.set_timeout(Duration::from_secs(15)).unwrap();
                let name = c.get(false).unwrap();
                (c, name)
            })
            .collect()
    })
}

/// One more request on each kept connection, all at once (each waits out its own
/// retransmissions), from a thread in the client namespace `client`: how many still reach the
/// backend they started with, and the slowest answer. Started right after a host dies, the
/// requests are in flight while the router still sends to it.
fn still_working(
    client: String,
    kept: Vec<(Client, String)>,
) -> std::thread::JoinHandle<(usize, usize, Duration)> {
    std::thread::spawn(move || {
        lb_tests::netns::Netns { name: client }
            .enter_no_drop()
            .expect("enter the client");
        let handles: Vec<_> = kept
            .into_iter()
            .map(|(mut c, name)| {
                std::thread::spawn(move || {
                    let start = Instant::now();
                    let ok = c.get(false).is_ok_and(|n| n == name);
                    (ok, start.elapsed())
                })
            })
            .collect();
        let results: Vec<(bool, Duration)> =
            handles.into_iter().map(|h| h.join().unwrap()).collect();
        let ok = results.iter().filter(|r| r.0).count();
        let slowest = results.iter().map(|r| r.1).max().unwrap_or_default();
        (ok, results.len() - ok, slowest)
    })
}

/// Kills balancer 0 with requests in flight on every kept connection: how long until the
/// router's route leaves it, and what the kept connections saw.
fn kill_first_host(
    t: &mut ScaleOut,
    kept: Vec<(Client, String)>,
) -> (Duration, (usize, usize, Duration)) {
    t.lbs[0].die().unwrap();
    let requests = still_working(t.client.name.clone(), kept);
    let withdrawn = t
        .wait_next_hops(&[false, true], Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}"));
    (withdrawn, requests.join().expect("requests"))
}

/// Both hosts publish the same table; new flows spread over both; for sampled flows both
/// hosts' `explain` names the backend that answered. Returns the flows per host.
fn spread_and_agree(t: &ScaleOut) -> (f64, f64) {
    let (a, b) = (checksum(t, 0), checksum(t, 1));
    assert!(a.len() == 16 && a == b, "tables differ: {a} vs {b}");
    let before = (new_flows(t, 0), new_flows(t, 1));
    let flows = one_shot(t, 200);
    let failed = flows.iter().filter(|f| f.1.is_none()).count();
    assert_eq!(failed, 0, "every new connection is answered");
    let per_host = (new_flows(t, 0) - before.0, new_flows(t, 1) - before.1);
    assert_eq!(per_host.0 + per_host.1, 200.0, "{per_host:?}");
    check_share(per_host.0 as usize, 200, 0.5)
        .unwrap_or_else(|e| panic!("flows on the first host: {e}"));
    for (port, name) in flows.iter().take(20) {
        let name = name.as_deref().unwrap();
        for lb in &t.lbs {
            let e = lb
                .control(&format!("explain web 10.99.1.2:{port}"))
                .unwrap();
            assert_eq!(
                e.lines().next(),
                Some(format!("backend {name}").as_str()),
                "{} explains port {port} otherwise than what answered:\n{e}",
                lb.ns.name
            );
        }
    }
    per_host
}

#[test]
fn dsr_hosts_share_new_flows_and_a_dead_host_breaks_no_established_flow() {
    if !require_root("dsr_hosts_share_new_flows_and_a_dead_host_breaks_no_established_flow") {
        return;
    }
    let mut t = ScaleOut::new("sd", "dsr").unwrap();
    let per_host = spread_and_agree(&t);

    let before = new_flows(&t, 0);
    let kept = keep_alive(&t, 40);
    let on_dead = new_flows(&t, 0) - before;
    assert!(
        on_dead > 0.0,
        "some kept flows go through the host that will die"
    );
    let misses_before = t.lbs[1].metric("lb_xdp_events_total", "reason=\"dsr_miss_forwarded\"");

    let (withdrawn, (ok, broken, slowest)) = kill_first_host(&mut t, kept);
    let taken_over =
        t.lbs[1].metric("lb_xdp_events_total", "reason=\"dsr_miss_forwarded\"") - misses_before;
    let after = one_shot(&t, 50);
    let new_ok = after.iter().filter(|f| f.1.is_some()).count();
    eprintln!(
        "scale-out DSR: new flows per host {per_host:?}; {on_dead} of 40 kept flows on the dead host; \
         route withdrawn {withdrawn:?} after the host died; kept flows (a request in flight on each \
         as it died) working {ok}, broken {broken}, slowest answer {slowest:?}; packets of flows taken over by the survivor {taken_over}; \
         new flows after: {new_ok} of 50"
    );
    assert_eq!(broken, 0, "no established flow breaks with DSR");
    assert!(taken_over >= on_dead, "{taken_over} < {on_dead}");
    assert_eq!(new_ok, 50);
    assert!(
        withdrawn < Duration::from_secs(3),
        "BFD (5 × 100 ms) should withdraw well before the 3 s hold time: {withdrawn:?}"
    );
}

#[test]
fn full_nat_hosts_lose_only_the_dead_hosts_flows_and_new_flows_recover() {
    if !require_root("full_nat_hosts_lose_only_the_dead_hosts_flows_and_new_flows_recover") {
        return;
    }
    let mut t = ScaleOut::new("sn", "nat").unwrap();
    let per_host = spread_and_agree(&t);

    let before = new_flows(&t, 0);
    let kept = keep_alive(&t, 40);
    let on_dead = (new_flows(&t, 0) - before) as usize;
    assert!(
        on_dead > 0 && on_dead < 40,
        "{on_dead} of 40 on the first host"
    );

    let (withdrawn, (ok, broken, slowest)) = kill_first_host(&mut t, kept);
    let after = one_shot(&t, 50);
    let new_ok = after.iter().filter(|f| f.1.is_some()).count();
    eprintln!(
        "scale-out full-NAT: new flows per host {per_host:?}; route withdrawn {withdrawn:?}; \
         kept flows on the dead host {on_dead}: broken {broken}; on the survivor: working {ok}, \
         slowest answer {slowest:?}; new flows after: {new_ok} of 50"
    );
    assert_eq!(
        (broken, ok),
        (on_dead, 40 - on_dead),
        "full-NAT: exactly the dead host's flows break (the survivor resets them)"
    );
    assert_eq!(new_ok, 50, "new flows succeed on the survivor");
}

#[test]
fn a_drained_host_is_withdrawn_gets_no_new_traffic_and_its_dsr_flows_go_on() {
    if !require_root("a_drained_host_is_withdrawn_gets_no_new_traffic_and_its_dsr_flows_go_on") {
        return;
    }
    let t = ScaleOut::new("sr", "dsr").unwrap();
    let before = new_flows(&t, 0);
    let kept = keep_alive(&t, 20);
    assert!(
        new_flows(&t, 0) > before,
        "some kept flows on the host to drain"
    );

    t.lbs[0].control("set host drain").unwrap();
    let withdrawn = t
        .wait_next_hops(&[false, true], Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let host = t.lbs[0].control("show host").unwrap();
    assert!(
        host.starts_with("host drain") && host.contains("10.99.0.10 no no"),
        "{host}"
    );
    let packets = |t: &ScaleOut| t.lbs[0].metric("lb_backend_packets_total", "");
    let (flows_then, packets_then) = (new_flows(&t, 0), packets(&t));
    let (ok, broken, _) = still_working(t.client.name.clone(), kept)
        .join()
        .expect("requests");
    let later = one_shot(&t, 50);
    assert_eq!(later.iter().filter(|f| f.1.is_some()).count(), 50);
    assert_eq!(
        (ok, broken),
        (20, 0),
        "the drained host's flows go on (DSR)"
    );
    assert_eq!(
        new_flows(&t, 0),
        flows_then,
        "no new flow on a drained host"
    );
    assert_eq!(
        packets(&t),
        packets_then,
        "no traffic at all once withdrawn"
    );
    eprintln!("scale-out drain: route withdrawn {withdrawn:?} after `set host drain`");

    t.lbs[0].control("set host ready").unwrap();
    t.wait_next_hops(&[true, true], Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}"));
    // `lbd down` (taking the host out for good) withdraws too.
    let said = t.lbs[0].lbd_down().unwrap();
    assert!(said.contains("withdrew the VIPs"), "{said}");
    t.wait_next_hops(&[false, true], Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}"));
}
