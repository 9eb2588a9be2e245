//! Whole-map walks and multi-key removals in a few system calls.
//!
//! Walking a hash map key by key costs two system calls per entry (next key, then lookup),
//! each about a microsecond with this era's speculation mitigations. The flow collector and
//! the conntrack count walk maps of up to hundreds of thousands of flows every second, so in
//! a SYN flood the collector alone took a fifth of a two-core machine. The kernel's batch
//! commands (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_DELETE_BATCH`, Linux 5.6) copy thousands of
//! entries per call; aya 0.14 does not wrap them, hence this module. A kernel that refuses
//! them gets the key-by-key walk.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
};

use aya::{
    Pod,
    maps::{HashMap, Map, MapData},
};
use aya_obj::generated::{bpf_attr, bpf_cmd};

/// Entries copied per system call.
const CHUNK: usize = 4096;

/// The map's data, for the hash kinds the walks are used on.
fn data(map: &Map) -> io::Result<&MapData> {
    match map {
        Map::HashMap(d) | Map::LruHashMap(d) => Ok(d),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a hash map",
        )),
    }
}

/// `bpf(cmd, attr)`.
fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<()> {
    // SAFETY: `attr` is a whole, initialised bpf_attr; the kernel reads and writes only
    // within it and within the buffers its pointers name, which the callers size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_int,
            attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether an error means the kernel (or this map type) has no batch commands: EINVAL for an
/// unknown command, ENOTSUPP (524, kernel-internal) or EOPNOTSUPP for a map type without them.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(524) | Some(libc::EOPNOTSUPP)
    )
}

/// Calls `f` with every entry of `map` (a hash or LRU hash map of `K` → `V`), in the
/// kernel's bucket order. Entries added or removed during the walk may or may not be seen;
/// each bucket is read whole, so an entry is never seen twice. Returns the entries seen.
pub fn for_each<K: Pod, V: Pod>(map: &Map, mut f: impl FnMut(K, V)) -> anyhow::Result<u64> {
    let d = data(map)?;
    let mut keys: Vec<K> = Vec::with_capacity(CHUNK);
    let mut values: Vec<V> = Vec::with_capacity(CHUNK);
    // The hash maps' batch position: a bucket index.
    let (mut at, mut next) = (0u32, 0u32);
    let mut seen = 0u64;
    let mut first = true;
    loop {
        // SAFETY: all-zero is a valid bpf_attr.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing the batch member of a zeroed union.
        unsafe {
            let b = &mut attr.batch;
            b.in_batch = if first { 0 } else { &mut at as *mut u32 as u64 };
            b.out_batch = &mut next as *mut u32 as u64;
            b.keys = keys.as_mut_ptr() as u64;
            b.values = values.as_mut_ptr() as u64;
            b.count = CHUNK as u32;
            b.map_fd = d.fd().as_fd().as_raw_fd() as u32;
        }
        let r = bpf(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr);
        let done = match &r {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) if first && unsupported(e) => return walk(map, f),
            Err(e) => return Err(anyhow::anyhow!("BPF_MAP_LOOKUP_BATCH: {e}")),
        };
        // SAFETY: the kernel says how many it wrote (also with ENOENT, at the end).
        let n = (unsafe { attr.batch.count } as usize).min(CHUNK);
        // SAFETY: the first `n` of each buffer were written by the kernel with whole `K`s
        // and `V`s, plain data (`Pod`) valid for any bytes.
        unsafe {
            keys.set_len(n);
            values.set_len(n);
        }
        for (k, v) in keys.drain(..).zip(values.drain(..)) {
            f(k, v);
        }
        seen += n as u64;
        if done {
            return Ok(seen);
        }
        at = next;
        first = false;
    }
}

/// The key-by-key walk, for kernels without batch commands.
fn walk<K: Pod, V: Pod>(map: &Map, mut f: impl FnMut(K, V)) -> anyhow::Result<u64> {
    let m = HashMap::<&MapData, K, V>::try_from(map)?;
    let mut seen = 0u64;
    // An entry removed between its key and its lookup is an error: skipped.
    for (k, v) in m.iter().flatten() {
        f(k, v);
        seen += 1;
    }
    Ok(seen)
}

/// Removes `keys` from `map`; a key no longer there is skipped. Returns how many were
/// removed.
pub fn remove<K: Pod, V: Pod>(map: &mut Map, keys: &[K]) -> anyhow::Result<u64> {
    let mut removed = 0u64;
    let mut rest = keys;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(CHUNK)];
        // SAFETY: all-zero is a valid bpf_attr.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing the batch member of a zeroed union; the kernel only reads `keys`.
        unsafe {
            let b = &mut attr.batch;
            b.keys = chunk.as_ptr() as u64;
            b.count = chunk.len() as u32;
            b.map_fd = data(map)?.fd().as_fd().as_raw_fd() as u32;
        }
        let r = bpf(bpf_cmd::BPF_MAP_DELETE_BATCH, &mut attr);
        // SAFETY: the kernel says how many it removed before it stopped.
        let n = (unsafe { attr.batch.count } as usize).min(chunk.len());
        removed += n as u64;
        match r {
            Ok(()) => rest = &rest[chunk.len()..],
            // The key at `n` is gone already (the batch stops at it): skip it, go on.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                rest = &rest[(n + 1).min(rest.len())..]
            }
            Err(e) if removed == 0 && unsupported(&e) => {
                return one_by_one::<K, V>(map, rest);
            }
            Err(e) => return Err(anyhow::anyhow!("BPF_MAP_DELETE_BATCH: {e}")),
        }
    }
    Ok(removed)
}

/// Key-by-key removal, for kernels without batch commands.
fn one_by_one<K: Pod, V: Pod>(map: &mut Map, keys: &[K]) -> anyhow::Result<u64> {
    let mut m = HashMap::<&mut MapData, K, V>::try_from(map)?;
    Ok(keys.iter().filter(|k| m.remove(k).is_ok()).count() as u64)
}
