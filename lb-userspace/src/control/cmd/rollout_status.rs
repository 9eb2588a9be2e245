use crate::control::CommandError;
use crate::daemon::Daemon;
use crate::rollout::RolloutError;
use crate::state::StateError;

/// `rollout status SERVICE [json]`: state, step, canary share, time in the stage, failed
/// judgements so far and the last judgements with their figures (newest first), one
/// `key: value` per line.
#[derive(Debug, PartialEq)]
pub struct RolloutStatus {
    pub service: String,
    pub json: bool,
}

impl RolloutStatus {
    pub fn parse(args: &[&str]) -> Result<Self, String> {
        match args {
            [s] => Ok(RolloutStatus {
                service: s.to_string(),
                json: false,
            }),
            [s, "json"] => Ok(RolloutStatus {
                service: s.to_string(),
                json: true,
            }),
            _ => Err("usage: rollout status SERVICE [json]".into()),
        }
    }

    pub fn execute(self, d: &mut Daemon) -> Result<String, CommandError> {
        let svc = d.state.service(&self.service)?;
        let (Some(cfg), Some(p)) = (&svc.config.rollout, &svc.rollout) else {
            return Err(StateError::Rollout(RolloutError::NotConfigured(self.service)).into());
        };
        let share = svc.canary_share().unwrap_or(0.0);
        let in_stage = d.in_stage_secs(&self.service);
        if self.json {
            return Ok(serde_json::json!({
                "service": self.service,
                "state": p.phase.name(),
                "step": p.stage,
                "steps": cfg.steps.len(),
                "canary_share": share,
                "in_stage": in_stage,
                "fails": p.fails,
                "baseline": cfg.baseline,
                "canary": cfg.canary,
                "judgements": p.judgements,
            })
            .to_string());
        }
        let mut out = format!(
            "state: {}\nstep: {}/{}\ncanary_share: {share:.1}\nin_stage: {in_stage:.0}\nfails: {}/{}\nbaseline: {}\ncanary: {}\n",
            p.phase.name(),
            p.stage,
            cfg.steps.len(),
            p.fails,
            cfg.threshold,
            cfg.baseline,
            cfg.canary,
        );
        for j in &p.judgements {
            out += &format!("judgement: {}\n", j.line());
        }
        Ok(out)
    }
}
