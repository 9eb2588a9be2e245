use crate::control::CommandError;
use crate::daemon::Daemon;

/// `show backends [SERVICE]`: a table of every backend with its effective share.
#[derive(Debug, PartialEq)]
pub struct ShowBackends {
    pub service: Option<String>,
}

impl ShowBackends {
    pub fn parse(args: &[&str]) -> Result<Self, String> {
        match args {
            [] => Ok(ShowBackends { service: None }),
            [s] => Ok(ShowBackends {
                service: Some(s.to_string()),
            }),
            _ => Err("usage: show backends [SERVICE]".into()),
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
        Ok(out)
    }
}
