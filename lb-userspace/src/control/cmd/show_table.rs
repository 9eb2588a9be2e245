use std::{collections::HashMap, net::SocketAddr};

use crate::control::CommandError;
use crate::daemon::Daemon;

/// `show table SERVICE`: how many buckets each backend holds, the table generation, and a
/// checksum of which backend each bucket sends to: equal on every balancer host whose table
/// sends each flow where this one does (hosts behind one ECMP router must agree).
#[derive(Debug, PartialEq)]
pub struct ShowTable {
    pub service: String,
}

impl ShowTable {
    pub fn parse(args: &[&str]) -> Result<Self, String> {
        match args {
            [s] => Ok(ShowTable {
                service: s.to_string(),
            }),
            _ => Err("usage: show table SERVICE".into()),
        }
    }

    pub fn execute(self, d: &mut Daemon) -> Result<String, CommandError> {
        let svc = d.state.service(&self.service)?;
        // The table the kernel uses, as published: no rebuild.
        let table = d.live_table(&self.service)?;
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &id in table.iter() {
            *counts.entry(id).or_default() += 1;
        }
        let addr_of: HashMap<u32, SocketAddr> = svc
            .pools
            .iter()
            .flat_map(|p| p.backends.iter().map(|b| (b.id, b.addr)))
            .collect();
        let mut out = format!(
            "service {} generation {} buckets {} checksum {:016x}\npool backend buckets\n",
            self.service,
            d.generation(&self.service),
            lb_common::TABLE_SIZE,
            checksum(&table, &addr_of)
        );
        for p in &svc.pools {
            for b in &p.backends {
                out += &format!(
                    "{} {} {}\n",
                    p.name,
                    b.name,
                    counts.get(&b.id).copied().unwrap_or(0)
                );
            }
        }
        let empty = counts.get(&lb_common::NO_BACKEND).copied().unwrap_or(0);
        if empty > 0 {
            out += &format!("(none) - {empty}\n");
        }
        Ok(out)
    }
}

/// FNV-1a (64 bits) over each bucket's backend, as address and port (a byte 0 for none): it
/// depends on where each bucket sends, not on the ids a host gave its backends (those follow
/// the config's order and the host's history).
pub fn checksum(table: &[u32], addr_of: &HashMap<u32, SocketAddr>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for id in table {
        match addr_of.get(id) {
            Some(SocketAddr::V4(a)) => {
                eat(&[4]);
                eat(&a.ip().octets());
                eat(&a.port().to_be_bytes());
            }
            Some(SocketAddr::V6(a)) => {
                eat(&[6]);
                eat(&a.ip().octets());
                eat(&a.port().to_be_bytes());
            }
            None => eat(&[0]),
        }
    }
    h
}
