//! New flows: the Maglev bucket → backend, and a SNAT port that no live flow holds.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_EXIST, BPF_NOEXIST},
    helpers::bpf_get_smp_processor_id,
    programs::XdpContext,
};
use lb_common::{
    NO_BACKEND, PROTO_TCP, Tunables,
    backend::{BackendInfo, NextHop},
    conntrack::{CtValue, RnatValue, half_open_reclaimable, holds, state},
    flow::FlowKey,
    hash,
    service::ServiceValue,
    stats::Stat,
};

use crate::{
    maps::{LB_BACKENDS, LB_CONNTRACK, LB_NEW_FLOW, LB_REVERSE_NAT, LB_SNAT_CURSOR, LB_TABLES},
    parse::Packet,
    tcpts,
};

/// SNAT ports probed per new flow before giving up (the flow's SYN is then dropped and
/// counted; the client retransmits it).
const SNAT_TRIES: u32 = 8;

/// The backend the service's live table gives this flow: its id, and its entry in `out`.
#[inline(always)]
pub fn pick(svc: &ServiceValue, key: &FlowKey, out: &mut BackendInfo) -> Result<u32, Stat> {
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
    *out = *be;
    Ok(id)
}

/// Finds a SNAT port for `rkey` (whose `dport` it fills in) and stores `rval` under it.
///
/// A port is free when no reverse-NAT entry holds it: the entry is only ever created here
/// (insert-if-absent) and removed by lbd's flow collector once the flow is over, so a port
/// is never handed out while a flow still uses it.
///
/// Each CPU owns the ports `min + cpu + k * cpus`, so no other CPU competes for the same key.
/// Within its class a CPU walks the ports towards each backend in turn (a cursor per
/// backend), so the port it tries first is the one it used longest ago towards that backend:
/// the one whose flow is most surely over, and whose backend-side TIME_WAIT is oldest. (One
/// cursor shared by all backends came round to a port while its flow towards the same backend
/// still held it: under a 10 000 SYN/s flood, 490 of 60 000 SYNs found no port in 8 tries.) (Random draws found a port still in use often enough, at a few thousand new
/// connections per second, to drop SYNs into one-second retransmissions.)
#[inline(always)]
fn alloc_snat_port(
    rkey: &mut FlowKey,
    rval: &RnatValue,
    t: &Tunables,
    backend_id: u32,
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
    let cursor = LB_SNAT_CURSOR
        .get_ptr_mut(backend_id)
        .ok_or(Stat::FlowNotCreated)?;
    // SAFETY: per-CPU slot: only this CPU touches it while the program runs.
    let cursor = unsafe { &mut *cursor };
    let mut idx = *cursor;
    for _ in 0..SNAT_TRIES {
        idx = idx.checked_rem(count).unwrap_or(0);
        let port = t.snat_port_min as u32 + cpu + idx * cpus;
        idx += 1;
        rkey.dport = (port as u16).to_be();
        // Taken, or the map is full: the next port (a full map fails them all, and the SYN
        // is dropped and counted; the client retries) — unless a half-open flow holds it.
        if LB_REVERSE_NAT
            .insert(&*rkey, rval, BPF_NOEXIST as u64)
            .is_ok()
            || reclaim(rkey, rval, t)
        {
            *cursor = idx;
            return Ok(());
        }
    }
    *cursor = idx;
    Err(Stat::FlowNotCreated)
}

/// Takes the port of `rkey` from the half-open flow that holds it, if it may
/// ([`half_open_reclaimable`]) and its conntrack entry is still its own: that entry goes
/// first (its client's next packet finds no flow, as after a timeout), then the reverse
/// entry is replaced whole (an element swap: the return path sees the old flow or the new).
///
/// An entry without its own conntrack entry is left to lbd's flow collector, which frees
/// such orphans: so the collector never removes an entry this has just given to another
/// flow, and this never replaces one the collector is about to remove.
#[inline(always)]
fn reclaim(rkey: &FlowKey, rval: &RnatValue, t: &Tunables) -> bool {
    let Some(old) = LB_REVERSE_NAT.get_ptr(rkey) else {
        return false;
    };
    // SAFETY: plain integers, read in place.
    let old = unsafe { &*old };
    if !half_open_reclaimable(old, rkey.proto, rval.last_seen_ns, t) {
        return false;
    }
    let Some(fkey) = crate::maps::LB_SCRATCH_KEY.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's scratch slot: nothing else touches it while this runs.
    let fkey = unsafe { &mut *fkey };
    *fkey = crate::conntrack::forward_key(old, rkey);
    let fkey: &FlowKey = fkey;
    // Its own as the flow collector judges it (so that it never judges this entry orphaned).
    // SAFETY: as above.
    let own = LB_CONNTRACK
        .get_ptr(fkey)
        .is_some_and(|c| holds(unsafe { &*c }, rkey));
    if !own || LB_CONNTRACK.remove(fkey).is_err() {
        return false;
    }
    // No flow cache holds a half-open flow (`flowcache::put`), and copies of whatever held
    // its 5-tuple before were made stale when it replaced that: nothing to invalidate.
    if LB_REVERSE_NAT.insert(rkey, rval, BPF_EXIST as u64).is_err() {
        return false;
    }
    crate::stats::bump(Stat::HalfOpenReclaimed);
    true
}

/// A new flow under construction, in the per-CPU scratch map `LB_NEW_FLOW` rather than on
/// the stack: its keys and entries, beside the callers' frames, would not fit the 512-byte
/// stack. The caller fills the backend and the next hop ([`pick`], `forward::next_hop`),
/// then [`new_flow`] the rest.
#[repr(C)]
pub struct NewFlow {
    /// Its reverse-NAT key (backend → SNAT address:port).
    pub rkey: FlowKey,
    /// Its reverse-NAT entry.
    pub rval: RnatValue,
    /// Its conntrack entry.
    pub ct: CtValue,
    /// The backend [`pick`] chose.
    pub backend: BackendInfo,
    /// The next hop towards it, valid when `routed` is 1.
    pub hop: NextHop,
    /// Its id.
    pub backend_id: u32,
    /// 1 when `hop` is resolved (else the kernel must forward the first packet).
    pub routed: u32,
    /// When `routed` is 0: the interface the route towards the backend leaves through (0 =
    /// none).
    pub route_ifindex: u32,
    /// Explicit padding.
    pub _pad: u32,
}

/// Completes the flow in `f` (backend and next hop already there): takes a SNAT port and
/// stores both entries. `wscale` is the window scale of the client's SYN.
///
/// A function of its own (a BPF subprogram) for the same reason: its frame is not added to
/// the caller's.
#[inline(never)]
pub fn new_flow(
    ctx: &XdpContext,
    pkt: &Packet,
    svc: &ServiceValue,
    t: &Tunables,
    wscale: u32,
) -> Result<(), Stat> {
    let f = LB_NEW_FLOW.get_ptr_mut(0).ok_or(Stat::FlowNotCreated)?;
    // SAFETY: per-CPU slot: only this CPU touches it while the program runs.
    let f = unsafe { &mut *f };
    let now = crate::clock::now();
    let (id, be) = (f.backend_id, &f.backend);
    // Where the backend's answers must come from: the route towards it, now.
    let (backend_ifindex, backend_mac) = if f.routed != 0 {
        (f.hop.ifindex, f.hop.dmac)
    } else {
        (f.route_ifindex, [0; 6])
    };
    // Before the backend's SYN-ACK, `seq_next` is what that SYN-ACK must acknowledge.
    let seq_next = pkt.tcp_segment().map_or(0, |s| s.seq.wrapping_add(1));
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
    let (be_addr, be_port) = (be.addr, be.port);
    f.rkey = FlowKey {
        src: be_addr,
        dst: svc.snat_addr,
        sport: be_port,
        dport: 0,
        proto: pkt.key.proto,
        family: pkt.key.family,
        _pad: 0,
    };
    f.rval = RnatValue {
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
        signals: 0,
        _pad2: 0,
        ts_delta,
        backend_ifindex,
        seq_next,
        backend_mac,
        wscale: wscale as u8,
        seq_synced: 0,
        request_ns: 0,
    };
    alloc_snat_port(&mut f.rkey, &f.rval, t, id)?;
    f.ct = CtValue {
        backend_addr: be_addr,
        snat_addr: svc.snat_addr,
        last_seen_ns: now,
        backend_id: id,
        backend_port: be_port,
        snat_port: f.rkey.dport,
        state: st,
        service_id: svc.id as u8,
        signals: 0,
        flags: 0,
        ts_delta,
    };
    if LB_CONNTRACK
        .insert(&pkt.key, &f.ct, BPF_ANY as u64)
        .is_err()
    {
        let _ = LB_REVERSE_NAT.remove(&f.rkey);
        return Err(Stat::FlowNotCreated);
    }
    Ok(())
}
