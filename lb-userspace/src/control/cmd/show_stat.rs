use lb_common::stats::{BackendStats, L4Stats};

use crate::control::CommandError;
use crate::daemon::Daemon;

/// `show stat [json]`: one row per backend with its weights, state, health and the data
/// plane's counters (summed over CPUs). CSV with a `# ` header line, like HAProxy's.
#[derive(Debug, PartialEq)]
pub struct ShowStat {
    pub json: bool,
}

const COLUMNS: &str = "service,pool,backend,addr,pool_weight,weight,share,state,health,\
connections,packets_to_backend,bytes_to_backend,packets_to_client,bytes_to_client,\
active_flows,connect_resets,connect_timeouts,first_byte_p50_ms,first_byte_p99_ms";

/// A quantile of the time-to-first-byte histogram in ms (interpolated within its bucket, as
/// rollouts judge it), or `None` without samples.
pub fn first_byte_quantile_ms(l4: &L4Stats, q: f64) -> Option<f64> {
    crate::rollout::quantile(&l4.first_byte, q).map(|d| d.as_secs_f64() * 1e3)
}

impl ShowStat {
    pub fn parse(args: &[&str]) -> Result<Self, String> {
        match args {
            [] => Ok(ShowStat { json: false }),
            ["json"] => Ok(ShowStat { json: true }),
            _ => Err("usage: show stat [json]".into()),
        }
    }

    pub fn execute(self, d: &mut Daemon) -> Result<String, CommandError> {
        // Shares once per service, not once per backend.
        let mut shares = std::collections::HashMap::new();
        for name in d.state.services.keys() {
            for x in d.state.shares(name)? {
                shares.insert(x.id, x.share);
            }
        }
        let mut rows = Vec::new();
        let active = d.kernel.active_flows();
        for (s, p, b) in d.state.backends() {
            let share = shares.get(&b.id).copied().unwrap_or(0.0);
            let connection = s.config.mode == crate::config::Mode::Connection;
            let (st, l4) = if connection {
                (
                    d.kernel
                        .backend_stats(b.id)
                        .map_err(CommandError::Counters)?,
                    d.kernel.backend_l4(b.id).map_err(CommandError::Counters)?,
                )
            } else {
                (BackendStats::default(), L4Stats::default())
            };
            let ms = |q| {
                first_byte_quantile_ms(&l4, q).map_or(serde_json::Value::Null, |v| {
                    serde_json::json!((v * 1000.0).round() / 1000.0)
                })
            };
            rows.push(serde_json::json!({
                "service": s.config.name,
                "pool": p.name,
                "backend": b.name,
                "addr": b.addr.to_string(),
                "pool_weight": p.weight,
                "weight": b.weight,
                "share": share,
                "state": b.state.to_string(),
                "health": if b.healthy { "up" } else { "down" },
                "connections": st.new_flows,
                "packets_to_backend": st.packets_to_backend,
                "bytes_to_backend": st.bytes_to_backend,
                "packets_to_client": st.packets_to_client,
                "bytes_to_client": st.bytes_to_client,
                "active_flows": if connection { active.get(&b.id).copied().unwrap_or(0) } else { 0 },
                "connect_resets": l4.connect_reset,
                "connect_timeouts": l4.connect_timeout,
                "first_byte_p50_ms": ms(0.5),
                "first_byte_p99_ms": ms(0.99),
            }));
        }
        if self.json {
            return Ok(serde_json::Value::Array(rows).to_string());
        }
        let mut out = format!("# {COLUMNS}\n");
        for r in rows {
            let cells: Vec<String> = COLUMNS
                .split(',')
                .map(|c| match &r[c] {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Number(n) if c == "share" => {
                        format!("{:.4}", n.as_f64().unwrap_or(0.0))
                    }
                    serde_json::Value::Null => String::new(),
                    v => v.to_string(),
                })
                .collect();
            out += &cells.join(",");
            out.push('\n');
        }
        Ok(out)
    }
}
