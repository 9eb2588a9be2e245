//! New flows: the Maglev bucket → backend, and a SNAT port that no live flow holds.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_get_smp_processor_id, programs::XdpContext};
use lb_common::{
    NO_BACKEND, PROTO_TCP, Tunables,
    backend::BackendInfo,
    conntrack::{CtValue, RnatValue, state},
    flow::FlowKey,
    hash,
    service::ServiceValue,
    stats::Stat,
};

use crate::{
    conntrack,
    maps::{LB_BACKENDS, LB_CONNTRACK, LB_REVERSE_NAT, LB_SNAT_CURSOR, LB_TABLES},
    parse::Packet,
    tcpts,
};

/// SNAT ports probed per new flow before giving up (the flow's SYN is then dropped and
/// counted; the client retransmits it).
const SNAT_TRIES: u32 = 8;

/// The backend the service's live table gives this flow.
#[inline(always)]
fn pick(svc: &ServiceValue, key: &FlowKey) -> Result<(u32, BackendInfo), Stat> {
    let table = LB_TABLES.get(svc.table_index()).ok_or(Stat::NoBackend)?;
    let bucket = hash::bucket(key);
    // The compiler knows `hash % M < M` and would drop the bounds check, but the verifier
    // cannot follow the multiply it turns `%` into: hide the value so the check stays.
    // SAFETY: reading a local.
    let bucket = unsafe { core::ptr::read_volatile(&bucket) };
    let id = *table.buckets.get(bucket as usize).ok_or(Stat::NoBackend)?;
    if id == NO_BACKEND {
        return Err(Stat::NoBackend);
    }
    let be = LB_BACKENDS.get(id).ok_or(Stat::NoBackend)?;
    if be.flags & BackendInfo::VALID == 0 {
        return Err(Stat::NoBackend);
    }
    Ok((id, *be))
}

/// Finds a SNAT port for `rkey` (whose `dport` it fills in) and stores `rval` under it.
///
/// Each CPU owns the ports `min + cpu + k * cpus`, so no other CPU can insert the same key
/// meanwhile: a free port can be taken, and a dead flow's port reclaimed, without a race.
/// Within its class a CPU walks the ports in turn, so the port it tries first is the one it
/// used longest ago: the one whose flow is most surely over, and whose backend-side TIME_WAIT
/// is oldest. (Random draws found a port still in use often enough, at a few thousand new
/// connections per second, to drop SYNs into one-second retransmissions.)
#[inline(always)]
fn alloc_snat_port(
    rkey: &mut FlowKey,
    rval: &RnatValue,
    t: &Tunables,
    now: u64,
) -> Result<(), Stat> {
    let cpus = if t.cpus == 0 { 1 } else { t.cpus };
    // SAFETY: helper call without arguments.
    // Divisions use checked forms: a panicking path would leave code the verifier rejects.
    let cpu = unsafe { bpf_get_smp_processor_id() }
        .checked_rem(cpus)
        .unwrap_or(0);
    let range = (t.snat_port_max.saturating_sub(t.snat_port_min)) as u32 + 1;
    if cpu >= range {
        return Err(Stat::FlowNotCreated);
    }
    let count = (range - cpu + cpus - 1).checked_div(cpus).unwrap_or(0);
    if count == 0 {
        return Err(Stat::FlowNotCreated);
    }
    let cursor = LB_SNAT_CURSOR.get_ptr_mut(0).ok_or(Stat::FlowNotCreated)?;
    // SAFETY: per-CPU slot: only this CPU touches it while the program runs.
    let cursor = unsafe { &mut *cursor };
    let mut idx = *cursor;
    for _ in 0..SNAT_TRIES {
        idx = idx.checked_rem(count).unwrap_or(0);
        let port = t.snat_port_min as u32 + cpu + idx * cpus;
        idx += 1;
        rkey.dport = (port as u16).to_be();
        // SAFETY: read-only peek at an entry; only its timestamps are used.
        let taken = match unsafe { LB_REVERSE_NAT.get(&*rkey) } {
            None => false,
            Some(old) => !conntrack::port_reusable(old.last_seen_ns, old.state, rkey.proto, now, t),
        };
        if !taken {
            *cursor = idx;
            return LB_REVERSE_NAT
                .insert(&*rkey, rval, BPF_ANY as u64)
                .map_err(|_| Stat::FlowNotCreated);
        }
    }
    *cursor = idx;
    Err(Stat::FlowNotCreated)
}

/// Creates the flow for a new connection: picks the backend, takes a SNAT port, stores both
/// entries. Returns the conntrack entry.
#[inline(always)]
pub fn new_flow(
    ctx: &XdpContext,
    pkt: &Packet,
    svc: &ServiceValue,
    t: &Tunables,
    now: u64,
) -> Result<CtValue, Stat> {
    let (id, be) = pick(svc, &pkt.key)?;
    let st = if pkt.key.proto == PROTO_TCP {
        state::SYN
    } else {
        state::ESTABLISHED
    };
    // SAFETY: bounds-checked by `parse`.
    let eth = unsafe { &*pkt.eth };
    // The client's timestamps start on the balancer's millisecond clock (see `tcpts`).
    let ts_delta = if pkt.key.proto == PROTO_TCP {
        tcpts::tsval(pkt)
            .map(|v| ((now / 1_000_000) as u32).wrapping_sub(v))
            .unwrap_or(0)
    } else {
        0
    };
    let mut rkey = FlowKey {
        src: be.addr,
        dst: svc.snat_addr,
        sport: be.port,
        dport: 0,
        proto: pkt.key.proto,
        family: pkt.key.family,
        _pad: 0,
    };
    let rval = RnatValue {
        client_addr: pkt.key.src,
        vip_addr: pkt.key.dst,
        last_seen_ns: now,
        backend_id: id,
        ifindex: ctx.ingress_ifindex() as u32,
        client_port: pkt.key.sport,
        vip_port: pkt.key.dport,
        client_mac: eth.src_addr,
        local_mac: eth.dst_addr,
        state: st,
        _pad1: 0,
        _pad2: 0,
        ts_delta,
    };
    alloc_snat_port(&mut rkey, &rval, t, now)?;
    let ct = CtValue {
        backend_addr: be.addr,
        snat_addr: svc.snat_addr,
        last_seen_ns: now,
        backend_id: id,
        backend_port: be.port,
        snat_port: rkey.dport,
        state: st,
        service_id: svc.id as u8,
        _pad2: 0,
        ts_delta,
    };
    if LB_CONNTRACK.insert(&pkt.key, &ct, BPF_ANY as u64).is_err() {
        let _ = LB_REVERSE_NAT.remove(&rkey);
        return Err(Stat::FlowNotCreated);
    }
    Ok(ct)
}
