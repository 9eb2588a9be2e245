use crate::daemon::Daemon;

/// `show rollouts`: one line per service with a rollout: state, step, canary share.
#[derive(Debug, PartialEq)]
pub struct ShowRollouts;

impl ShowRollouts {
    pub fn execute(self, d: &mut Daemon) -> String {
        let mut out = String::from("service state step canary_share\n");
        for (name, s) in &d.state.services {
            let (Some(cfg), Some(p)) = (&s.config.rollout, &s.rollout) else {
                continue;
            };
            out += &format!(
                "{name} {} {}/{} {:.1}%\n",
                p.phase.name(),
                p.stage,
                cfg.steps.len(),
                s.canary_share().unwrap_or(0.0)
            );
        }
        out
    }
}
