use crate::control::CommandError;
use crate::{daemon::Daemon, rollout_driver::Action};

/// `rollout start|pause|resume|abort|promote SERVICE`: drives a service's rollout (its
/// `[service.rollout]`); the phase change and the split it implies are one change.
#[derive(Debug, PartialEq)]
pub struct RolloutCmd {
    pub action: Action,
    pub service: String,
}

impl RolloutCmd {
    pub fn parse(action: Action, verb: &str, args: &[&str]) -> Result<Self, String> {
        match args {
            [service] => Ok(RolloutCmd {
                action,
                service: service.to_string(),
            }),
            _ => Err(format!("usage: rollout {verb} SERVICE")),
        }
    }

    pub fn execute(self, d: &mut Daemon) -> Result<String, CommandError> {
        let p = d.rollout_command(&self.service, self.action)?;
        let svc = d.state.service(&self.service)?;
        let steps = svc.config.rollout.as_ref().map_or(0, |c| c.steps.len());
        Ok(format!(
            "rollout {}: {} at step {}/{steps}, canary {:.1}%",
            self.service,
            p.phase.name(),
            p.stage,
            svc.canary_share().unwrap_or(0.0)
        ))
    }
}
