use crate::control::CommandError;
use crate::daemon::Daemon;

/// `show backends [SERVICE] [json]`: a table of every backend with its effective share; the
/// JSON form also carries each connection-mode backend's active flows (the table keeps the
/// columns scripts read).
#[derive(Debug, PartialEq)]
pub struct ShowBackends {
    pub service: Option<String>,
    pub json: bool,
}

impl ShowBackends {
    pub fn parse(args: &[&str]) -> Result<Self, String> {
        match args {
            [] => Ok(ShowBackends {
                service: None,
                json: false,
            }),
            ["json"] => Ok(ShowBackends {
                service: None,
                json: true,
            }),
            [s] => Ok(ShowBackends {
                service: Some(s.to_string()),
                json: false,
            }),
            [s, "json"] => Ok(ShowBackends {
                service: Some(s.to_string()),
                json: true,
            }),
            _ => Err("usage: show backends [SERVICE] [json]".into()),
        }
    }

    pub fn execute(self, d: &mut Daemon) -> Result<String, CommandError> {
        let names: Vec<String> = match &self.service {
            Some(s) => {
                d.state.service(s)?;
                vec![s.clone()]
            }
            None => d.state.services.keys().cloned().collect(),
        };
        let active = d.kernel.active_flows();
        let mut rows = Vec::new();
        let mut out = String::from("service pool backend weight share state health\n");
        for name in names {
            let svc = d.state.service(&name)?;
            let shares = d.state.shares(&name)?;
            for p in &svc.pools {
                for b in &p.backends {
                    let share = shares
                        .iter()
                        .find(|s| s.id == b.id)
                        .map_or(0.0, |s| s.share);
                    let connection = svc.config.mode == crate::config::Mode::Connection;
                    rows.push(serde_json::json!({
                        "service": name,
                        "pool": p.name,
                        "backend": b.name,
                        "weight": b.weight,
                        "share": share,
                        "state": b.state.to_string(),
                        "health": if b.healthy { "up" } else { "down" },
                        "active_flows": if connection {
                            serde_json::json!(active.get(&b.id).copied().unwrap_or(0))
                        } else {
                            serde_json::Value::Null
                        },
                    }));
                    out += &format!(
                        "{name} {} {} {} {:.2}% {} {}\n",
                        p.name,
                        b.name,
                        b.weight,
                        share * 100.0,
                        b.state,
                        if b.healthy { "up" } else { "down" }
                    );
                }
            }
        }
        if self.json {
            return Ok(serde_json::Value::Array(rows).to_string());
        }
        Ok(out)
    }
}
