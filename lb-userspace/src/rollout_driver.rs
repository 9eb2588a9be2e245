//! Drives the rollouts: observation windows over the daemon's own counters, judgements when
//! they end, and the `rollout …` commands — each decision applied through
//! [`Daemon::change`], so it is atomic, published and in the state file before anything is
//! answered. The state machine and the judgement themselves are pure (`rollout`).

use tokio::time::Instant;

use crate::{
    config::Mode,
    daemon::{ChangeError, Daemon},
    rollout::{Judgement, Phase, Progress, Sample, Window, judge},
    state::{AdminState, Service, StateError},
};

/// A rollout command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Start,
    Pause,
    Resume,
    Abort,
    Promote,
}

impl Daemon {
    /// What a pool's backends did so far (counters since they were created): in request mode
    /// the proxy's requests, errors and response times; in connection mode the XDP program's
    /// new flows, connect failures and times to first byte.
    pub fn pool_sample(&self, svc: &Service, pool: &str) -> Sample {
        let mut out = Sample::default();
        let Some(p) = svc.pools.iter().find(|p| p.name == pool) else {
            return out;
        };
        for b in &p.backends {
            let mut s = Sample::default();
            match svc.config.mode {
                Mode::Request => {
                    use std::sync::atomic::Ordering::Relaxed;
                    let l = crate::metrics::backend_labels(&svc.config.name, pool, &b.name);
                    let sig = self.metrics.requests.signals.get_or_create(&l);
                    s.samples = sig.requests.load(Relaxed);
                    s.errors = sig.errors.load(Relaxed);
                    for (o, v) in s.latency.iter_mut().zip(sig.latency.iter()) {
                        *o = v.load(Relaxed);
                    }
                }
                Mode::Connection => {
                    let st = self.kernel.backend_stats(b.id).unwrap_or_default();
                    let l4 = self.kernel.backend_l4(b.id).unwrap_or_default();
                    s.samples = st.new_flows;
                    s.errors = l4.connect_reset + l4.connect_timeout;
                    s.latency = l4.first_byte;
                }
            }
            out.add(&s);
        }
        out
    }

    /// Opens a window for each rollout that progresses without one (just started, resumed,
    /// or moved to another stage), drops those of rollouts that stopped progressing, and
    /// returns when the next window ends.
    pub fn next_judgement(&mut self) -> Option<Instant> {
        let now = Instant::now();
        let mut open = Vec::new();
        for (name, s) in &self.state.services {
            let Some(p) = &s.rollout else { continue };
            let since = self.in_stage.get(name);
            if since.is_none_or(|(ph, st, _)| (*ph, *st) != (p.phase, p.stage)) {
                self.in_stage.insert(name.clone(), (p.phase, p.stage, now));
            }
            let current = self
                .windows
                .get(name)
                .is_some_and(|w| w.stage == p.stage && p.phase == Phase::Progressing);
            if p.phase == Phase::Progressing && !current {
                open.push(name.clone());
            }
        }
        let services = &self.state.services;
        self.windows.retain(|n, w| {
            services
                .get(n)
                .and_then(|s| s.rollout.as_ref())
                .is_some_and(|p| p.phase == Phase::Progressing && p.stage == w.stage)
        });
        self.in_stage.retain(|n, _| services.contains_key(n));
        for name in open {
            let s = &self.state.services[&name];
            let (Some(cfg), Some(p)) = (&s.config.rollout, &s.rollout) else {
                continue;
            };
            let w = Window {
                started: now,
                stage: p.stage,
                canary: self.pool_sample(s, &cfg.canary),
                baseline: self.pool_sample(s, &cfg.baseline),
            };
            self.windows.insert(name, w);
        }
        self.windows
            .iter()
            .filter_map(|(n, w)| {
                let cfg = self.state.services.get(n)?.config.rollout.as_ref()?;
                Some(w.started + cfg.interval)
            })
            .min()
    }

    /// Judges every window that has ended and applies the verdicts.
    pub fn judge_due(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .windows
            .iter()
            .filter(|(n, w)| {
                self.state
                    .services
                    .get(*n)
                    .and_then(|s| s.config.rollout.as_ref())
                    .is_some_and(|c| w.started + c.interval <= now)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            let Some(w) = self.windows.remove(&name) else {
                continue;
            };
            let s = &self.state.services[&name];
            let (Some(cfg), Some(p)) = (s.config.rollout.clone(), s.rollout.clone()) else {
                continue;
            };
            let canary = self.pool_sample(s, &cfg.canary).since(&w.canary);
            let baseline = self.pool_sample(s, &cfg.baseline).since(&w.baseline);
            let healthy = s.pools.iter().any(|pool| {
                pool.name == cfg.canary
                    && pool
                        .backends
                        .iter()
                        .any(|b| b.healthy && b.state == AdminState::Ready)
            });
            let (result, reason) = judge(&cfg, &canary, &baseline, healthy);
            let j = Judgement {
                at: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                stage: p.stage,
                steps: cfg.steps.len(),
                result,
                reason,
                canary: canary.figures(),
                baseline: baseline.figures(),
            };
            let line = j.line();
            let applied = self.change(&name, |st| {
                let svc = st
                    .services
                    .get_mut(&name)
                    .ok_or_else(|| StateError::NoService(name.clone()))?;
                if let Some(p) = &mut svc.rollout {
                    p.judged(&cfg, j.clone());
                }
                svc.apply_rollout();
                Ok(())
            });
            self.metrics
                .judgements
                .get_or_create(&vec![
                    ("service", name.clone()),
                    ("result", result.name().to_string()),
                ])
                .inc();
            let after = self.state.services[&name]
                .rollout
                .clone()
                .unwrap_or_default();
            match applied {
                Ok(()) => tracing::info!(
                    service = name,
                    result = result.name(),
                    stage = j.stage,
                    steps = j.steps,
                    reason = j.reason,
                    canary_samples = j.canary.samples,
                    canary_errors = j.canary.errors,
                    canary_p99_ms = j.canary.p99_ms,
                    baseline_samples = j.baseline.samples,
                    baseline_errors = j.baseline.errors,
                    baseline_p99_ms = j.baseline.p99_ms,
                    state = after.phase.name(),
                    now_stage = after.stage,
                    fails = after.fails,
                    "rollout judgement: {line}"
                ),
                Err(e) => tracing::error!(
                    service = name,
                    error = %e,
                    "rollout judgement could not be applied: {line}"
                ),
            }
        }
    }

    /// Runs `rollout start|pause|resume|abort|promote SERVICE`: the phase change and the
    /// split it implies, as one change.
    pub fn rollout_command(
        &mut self,
        service: &str,
        action: Action,
    ) -> Result<Progress, ChangeError> {
        let svc = self.state.service(service)?;
        let cfg = svc.config.rollout.clone().ok_or_else(|| {
            StateError::Rollout(crate::rollout::RolloutError::NotConfigured(
                service.to_string(),
            ))
        })?;
        let current = svc.rollout_weights().unwrap_or((0, 0));
        self.change(service, |st| {
            let svc = st
                .services
                .get_mut(service)
                .ok_or_else(|| StateError::NoService(service.to_string()))?;
            let p = svc.rollout.get_or_insert_with(Progress::default);
            match action {
                Action::Start => p.start(&cfg, current)?,
                Action::Pause => p.pause()?,
                Action::Resume => p.resume()?,
                Action::Abort => p.abort()?,
                Action::Promote => p.promote(&cfg)?,
            }
            svc.apply_rollout();
            Ok(())
        })?;
        let p = self.state.services[service]
            .rollout
            .clone()
            .unwrap_or_default();
        tracing::info!(
            service,
            action = ?action,
            state = p.phase.name(),
            stage = p.stage,
            steps = cfg.steps.len(),
            "rollout command"
        );
        Ok(p)
    }

    /// Seconds the rollout has been in its current stage and state (0 when unknown).
    pub fn in_stage_secs(&self, service: &str) -> f64 {
        self.in_stage
            .get(service)
            .map_or(0.0, |(_, _, t)| t.elapsed().as_secs_f64())
    }

    /// A `set split` or `set weight` on `service` while its rollout progresses: the operator's
    /// word wins, the rollout pauses. Returns the note for the reply.
    pub fn pause_for_operator(st: &mut crate::state::State, service: &str) -> Option<String> {
        let p = st.services.get_mut(service)?.rollout.as_mut()?;
        if p.phase != Phase::Progressing {
            return None;
        }
        p.phase = Phase::Paused;
        Some(format!(
            "rollout of {service} paused: the operator's split wins (`rollout resume {service}` returns to stage {})",
            p.stage
        ))
    }
}
