use std::net::SocketAddr;

use lb_common::{NO_BACKEND, TABLE_SIZE, flow::FlowKey, hash};

use crate::control::CommandError;
use crate::{daemon::Daemon, dataplane::ip_bytes, state::Service};

/// `explain SERVICE CLIENT_IP:PORT [json]`: the backend a new flow from there gets, computed
/// with the kernel's own hash (`lb_common::hash`) over the table the kernel uses.
#[derive(Debug, PartialEq)]
pub struct Explain {
    pub service: String,
    pub client: SocketAddr,
    pub json: bool,
}

const USAGE: &str = "usage: explain SERVICE CLIENT_IP:PORT [json]";

impl Explain {
    pub fn parse(args: &[&str]) -> Result<Self, String> {
        let (svc, client, json) = match args {
            [s, c] => (s, c, false),
            [s, c, "json"] => (s, c, true),
            _ => return Err(USAGE.into()),
        };
        let client = client
            .parse()
            .map_err(|_| format!("{client:?} is not CLIENT_IP:PORT; {USAGE}"))?;
        Ok(Explain {
            service: svc.to_string(),
            client,
            json,
        })
    }

    /// The flow key the kernel builds for this client's first packet.
    fn flow_key(&self, svc: &Service) -> Result<FlowKey, String> {
        let (src, family) = ip_bytes(self.client.ip());
        let (dst, vip_family) = ip_bytes(svc.config.vip);
        if family != vip_family {
            return Err(format!(
                "client {} and VIP {} are of different address families",
                self.client, svc.config.vip
            ));
        }
        Ok(FlowKey {
            src,
            dst,
            sport: self.client.port().to_be(),
            dport: svc.config.port.to_be(),
            proto: svc.config.protocol.number(),
            family,
            _pad: 0,
        })
    }

    pub fn execute(self, d: &mut Daemon) -> Result<String, CommandError> {
        let svc = d.state.service(&self.service)?;
        if svc.config.mode != crate::config::Mode::Connection {
            return Err(format!(
                "service {:?} is in request mode: each request is balanced, not each flow",
                self.service
            )
            .into());
        }
        let key = self.flow_key(svc)?;
        let h = hash::flow_hash(&key);
        let bucket = hash::bucket(&key);
        let table = d.live_table(&self.service)?;
        let id = table[bucket as usize];
        let held = table.iter().filter(|&&b| b == id).count();
        let generation = d.generation(&self.service);
        let flow = format!(
            "{:?} {} -> {}:{}",
            svc.config.protocol, self.client, svc.config.vip, svc.config.port
        );
        let found = d
            .state
            .backends()
            .find(|(s, _, b)| s.config.name == self.service && b.id == id && id != NO_BACKEND);
        let Some((_, pool, b)) = found else {
            let why = "no backend can take new flows (none healthy and ready with weight > 0); \
                       the host answers the SYN with a TCP reset";
            return Ok(if self.json {
                serde_json::json!({
                    "service": self.service, "client": self.client.to_string(),
                    "backend": null, "hash": h, "bucket": bucket,
                    "buckets": TABLE_SIZE, "generation": generation, "why": why,
                })
                .to_string()
            } else {
                format!(
                    "backend (none)\nwhy: {flow} hashes to {h:#010x}, bucket {bucket} of {TABLE_SIZE} (table generation {generation}); {why}"
                )
            });
        };
        let pool_total: u32 = svc.pools.iter().map(|p| p.weight).sum();
        let backend_total: u32 = pool.backends.iter().map(|b| b.weight).sum();
        let share = 100.0 * held as f64 / TABLE_SIZE as f64;
        Ok(if self.json {
            serde_json::json!({
                "service": self.service, "client": self.client.to_string(),
                "backend": b.name, "pool": pool.name, "addr": b.addr.to_string(),
                "hash": h, "bucket": bucket, "buckets": TABLE_SIZE,
                "generation": generation, "backend_buckets": held,
            })
            .to_string()
        } else {
            format!(
                "backend {}\npool {}\naddr {}\nwhy: {flow} hashes to {h:#010x}, bucket {bucket} of {TABLE_SIZE} (table generation {generation}); \
                 {} holds {held} buckets ({share:.2}%): pool {} weight {} of {pool_total}, backend weight {} of {backend_total} in its pool.\n\
                 An established flow keeps the backend it started with.",
                b.name, pool.name, b.addr, b.name, pool.name, pool.weight, b.weight
            )
        })
    }
}
