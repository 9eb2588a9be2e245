//! One Prometheus scrape: the data plane's counters read now, with the state's weights,
//! health and table generations, encoded by [`crate::metrics`]. Kept apart from the daemon's
//! logic: reading is all it does.

use crate::{
    config::Mode,
    daemon::Daemon,
    metrics::{Labels, Sampled, Value, backend_labels},
};

/// The XDP program's time-to-first-byte buckets as a Prometheus histogram (seconds).
fn first_byte_histogram(l4: &lb_common::stats::L4Stats) -> Value {
    use lb_common::stats::first_byte_bound_ns;
    let buckets = l4
        .first_byte
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let le = first_byte_bound_ns(i).map_or(f64::INFINITY, |ns| ns as f64 / 1e9);
            (le, *n)
        })
        .collect();
    Value::Histogram {
        buckets,
        sum: l4.first_byte_sum_ns as f64 / 1e9,
    }
}

impl Daemon {
    /// The metrics text for one scrape: the data plane's per-CPU counters summed now, plus the
    /// state's weights, health and table generations.
    pub fn scrape(&self) -> String {
        use lb_common::stats::Stat;
        let fam = |name, help| Sampled {
            name,
            help,
            samples: Vec::new(),
        };
        let mut conns = fam(
            "lb_backend_connections",
            "New flows to the backend (connection mode).",
        );
        let mut packets = fam("lb_backend_packets", "Packets forwarded, by direction.");
        let mut bytes = fam(
            "lb_backend_bytes",
            "Bytes forwarded (IP packets), by direction.",
        );
        let mut up = fam("lb_backend_up", "1 when health checks pass, 0 when not.");
        let mut weight = fam(
            "lb_backend_weight",
            "Backend weight within its pool (0-1000).",
        );
        let mut share = fam(
            "lb_backend_share",
            "Configured share of new flows (0-1): pool share times backend share among eligible backends.",
        );
        let mut ready = fam(
            "lb_backend_ready",
            "1 when the admin state is ready (not drain or maint).",
        );
        let mut pool_weight = fam(
            "lb_pool_weight",
            "Pool weight in the service's split (0-1000).",
        );
        let mut generation = fam(
            "lb_table_generation",
            "Generation of the service's live table.",
        );
        let mut active = fam(
            "lb_backend_active_flows",
            "Flows to the backend in the connection-tracking table, neither closed nor expired (connection mode).",
        );
        let mut failures = fam(
            "lb_backend_connect_failures",
            "New flows the backend reset before its first payload byte (reason=reset) or whose SYN went unanswered until the client retransmitted it (reason=timeout); connection mode.",
        );
        let mut first_byte = fam(
            "lb_backend_first_byte_seconds",
            "Time from the client's first payload packet to the backend's first payload packet, measured in XDP (connection mode).",
        );
        let active_by_id = self.kernel.active_flows();
        for (name, s) in &self.state.services {
            let shares = self.state.shares(name).unwrap_or_default();
            for p in &s.pools {
                pool_weight.samples.push((
                    vec![("service", name.clone()), ("pool", p.name.clone())],
                    Value::Gauge(p.weight as f64),
                ));
                for b in &p.backends {
                    let l = backend_labels(name, &p.name, &b.name);
                    up.samples
                        .push((l.clone(), Value::Gauge(if b.healthy { 1.0 } else { 0.0 })));
                    ready.samples.push((
                        l.clone(),
                        Value::Gauge(if b.state == crate::state::AdminState::Ready {
                            1.0
                        } else {
                            0.0
                        }),
                    ));
                    weight
                        .samples
                        .push((l.clone(), Value::Gauge(b.weight as f64)));
                    let sh = shares
                        .iter()
                        .find(|x| x.id == b.id)
                        .map_or(0.0, |x| x.share);
                    share.samples.push((l.clone(), Value::Gauge(sh)));
                    if s.config.mode != Mode::Connection {
                        continue;
                    }
                    let st = self.kernel.backend_stats(b.id).unwrap_or_default();
                    conns
                        .samples
                        .push((l.clone(), Value::Counter(st.new_flows)));
                    let dir = |d: &str| {
                        let mut l: Labels = l.clone();
                        l.push(("direction", d.to_string()));
                        l
                    };
                    packets
                        .samples
                        .push((dir("to_backend"), Value::Counter(st.packets_to_backend)));
                    packets
                        .samples
                        .push((dir("to_client"), Value::Counter(st.packets_to_client)));
                    bytes
                        .samples
                        .push((dir("to_backend"), Value::Counter(st.bytes_to_backend)));
                    bytes
                        .samples
                        .push((dir("to_client"), Value::Counter(st.bytes_to_client)));
                    active.samples.push((
                        l.clone(),
                        Value::Gauge(active_by_id.get(&b.id).copied().unwrap_or(0) as f64),
                    ));
                    let l4 = self.kernel.backend_l4(b.id).unwrap_or_default();
                    let reason = |r: &str| {
                        let mut l: Labels = l.clone();
                        l.push(("reason", r.to_string()));
                        l
                    };
                    failures
                        .samples
                        .push((reason("reset"), Value::Counter(l4.connect_reset)));
                    failures
                        .samples
                        .push((reason("timeout"), Value::Counter(l4.connect_timeout)));
                    first_byte
                        .samples
                        .push((l.clone(), first_byte_histogram(&l4)));
                }
            }
            if s.config.mode == Mode::Connection {
                generation.samples.push((
                    vec![("service", name.clone())],
                    Value::Gauge(self.generation(name) as f64),
                ));
            }
        }
        let mut canary_share = fam(
            "lb_rollout_canary_share",
            "The rollout's canary pool share of the split now (%).",
        );
        let mut rollout_state = fam(
            "lb_rollout_state",
            "1 for the rollout's current state, 0 for the others.",
        );
        for (name, s) in &self.state.services {
            let Some(p) = &s.rollout else { continue };
            canary_share.samples.push((
                vec![("service", name.clone())],
                Value::Gauge(s.canary_share().unwrap_or(0.0)),
            ));
            for ph in crate::rollout::Phase::ALL {
                rollout_state.samples.push((
                    vec![("service", name.clone()), ("state", ph.name().to_string())],
                    Value::Gauge(if ph == p.phase { 1.0 } else { 0.0 }),
                ));
            }
        }
        let mut out = vec![
            canary_share,
            rollout_state,
            conns,
            packets,
            bytes,
            up,
            ready,
            weight,
            share,
            pool_weight,
            generation,
            active,
            failures,
            first_byte,
        ];
        {
            let dp = &self.kernel;
            if let Ok(stats) = dp.xdp_stats() {
                // One labelled counter per `Stat` index.
                let counters = |name, help, label: &'static str, which: &[(&str, Stat)]| Sampled {
                    name,
                    help,
                    samples: which
                        .iter()
                        .map(|(v, st)| {
                            (
                                vec![(label, v.to_string())],
                                Value::Counter(stats[*st as usize]),
                            )
                        })
                        .collect(),
                };
                out.push(counters(
                    "lb_xdp_packets",
                    "Packets seen by the XDP program, by verdict.",
                    "action",
                    &[
                        ("aborted", Stat::Aborted),
                        ("drop", Stat::Drop),
                        ("pass", Stat::Pass),
                        ("tx", Stat::Tx),
                        ("redirect", Stat::Redirect),
                    ],
                ));
                out.push(counters(
                    "lb_xdp_events",
                    "Why the XDP program did what it did (a packet can count once here besides its verdict).",
                    "reason",
                    &[
                        ("not_ours", Stat::NotOurs),
                        ("malformed", Stat::Malformed),
                        ("fragment", Stat::Fragment),
                        ("non_syn_without_flow", Stat::NonSynMiss),
                        ("no_backend", Stat::NoBackend),
                        ("next_hop_unresolved", Stat::FibPass),
                        ("flow_not_created", Stat::FlowNotCreated),
                        ("ttl_exceeded", Stat::TtlExceeded),
                        ("new_flow", Stat::NewFlow),
                        ("return_wrong_side", Stat::ReturnWrongSide),
                        ("return_out_of_window", Stat::ReturnOutOfWindow),
                        ("spoofed_source", Stat::SpoofedSource),
                        ("bad_tcp_flags", Stat::BadTcpFlags),
                        ("bad_tcp_header", Stat::BadTcpHeader),
                        ("icmp_not_translated", Stat::IcmpNotTranslated),
                        ("icmp_to_client", Stat::IcmpToClient),
                        ("icmp_to_backend", Stat::IcmpToBackend),
                        ("flow_lost_port", Stat::FlowLostPort),
                        ("ipv6_ext_unhandled", Stat::Ipv6ExtUnhandled),
                        ("half_open_reclaimed", Stat::HalfOpenReclaimed),
                        ("dsr_miss_forwarded", Stat::DsrMissForwarded),
                        ("dsr_not_on_link", Stat::DsrNotOnLink),
                        ("backend_stale_reset", Stat::BackendStaleReset),
                    ],
                ));
            }
            let (entries, capacity) = dp.conntrack_fill();
            out.push(Sampled {
                name: "lb_conntrack_entries",
                help: "Flows in the connection-tracking table (live or not yet evicted).",
                samples: vec![(Vec::new(), Value::Gauge(entries as f64))],
            });
            let (finished, orphaned, in_use) = dp.flows_collected();
            out.push(Sampled {
                name: "lb_snat_ports_in_use",
                help: "SNAT ports held by flows (reverse-NAT entries) at the flow collector's last pass, once a second.",
                samples: vec![(Vec::new(), Value::Gauge(in_use as f64))],
            });
            out.push(Sampled {
                name: "lb_flows_collected",
                help: "Flows whose SNAT port the flow collector freed: finished (idle past their timeout, or closed), or orphaned (their conntrack entry was evicted).",
                samples: vec![
                    (
                        vec![("reason", "finished".to_string())],
                        Value::Counter(finished),
                    ),
                    (
                        vec![("reason", "orphaned".to_string())],
                        Value::Counter(orphaned),
                    ),
                ],
            });
            out.push(Sampled {
                name: "lb_conntrack_capacity",
                help: "Flows the connection-tracking table holds before evicting the least recent.",
                samples: vec![(Vec::new(), Value::Gauge(capacity as f64))],
            });
        }
        out.push(Sampled {
            name: "lb_host_drained",
            help: "1 after `set host drain`: the host withdraws its VIPs and serves what still arrives.",
            samples: vec![(Vec::new(), Value::Gauge(self.state.drained as u8 as f64))],
        });
        if let Some(status) = self.announce_status() {
            let vips = self.state.vips();
            out.push(Sampled {
                name: "lb_vip_announced",
                help: "1 while BIRD has the VIP's route to announce (the last set it accepted), 0 when withdrawn.",
                samples: vips
                    .into_iter()
                    .map(|v| {
                        let on = status.announced.contains(&v);
                        (vec![("vip", v.to_string())], Value::Gauge(on as u8 as f64))
                    })
                    .collect(),
            });
            out.push(Sampled {
                name: "lb_announce_failures",
                help: "Announcements BIRD did not take (socket unreachable, config refused); each is retried.",
                samples: vec![(Vec::new(), Value::Counter(status.failures))],
            });
        }
        let listeners = self.listeners.snapshot();
        if !listeners.is_empty() {
            let per = |name, help, f: &dyn Fn(&crate::listener::ListenerStats) -> Value| Sampled {
                name,
                help,
                samples: listeners
                    .iter()
                    .map(|(n, s)| (vec![("listener", n.clone())], f(s)))
                    .collect(),
            };
            out.push(per(
                "lb_listener_connections",
                "Connections open now on each of lbd's listeners (control, metrics, request:SERVICE).",
                &|s| Value::Gauge(s.open as f64),
            ));
            out.push(per(
                "lb_listener_refused",
                "Connections closed at once because the listener was at its cap ([daemon.limits]).",
                &|s| Value::Counter(s.refused),
            ));
            out.push(per(
                "lb_listener_accept_errors",
                "Accepts that failed for want of descriptors or memory (the listener backs off and retries).",
                &|s| Value::Counter(s.accept_errors),
            ));
        }
        out.push(Sampled {
            name: "lb_build_info",
            help: "Always 1; the version of lbd.",
            samples: vec![(
                vec![("version", env!("CARGO_PKG_VERSION").to_string())],
                Value::Gauge(1.0),
            )],
        });
        self.metrics.encode(out)
    }
}
