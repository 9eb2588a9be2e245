//! Staged rollouts that lbd drives and judges itself: the state machine and the judgement,
//! both pure (no clock, no kernel), so every transition and gate is tested in process.
//!
//! A rollout moves the canary pool's share through `steps`; stage 0 is the split it started
//! from, stage k (1…N) gives the canary `steps[k-1]` %. Each `interval` the daemon measures
//! the canary and the baseline over that interval only and calls [`judge`]; [`Progress::judged`]
//! applies the verdict. Reaching the last step is promotion (not judged).

use std::time::Duration;

use lb_common::stats::{FIRST_BYTE_BUCKETS, first_byte_bound_ns};
use serde::{Deserialize, Serialize};

use crate::config::{OnFailure, Rollout};

/// Judgements kept per rollout (newest first) for `rollout status`.
pub const KEPT_JUDGEMENTS: usize = 10;

/// Where a rollout is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Not started (or started over with `--fresh`).
    #[default]
    Idle,
    /// Watching the current stage; judged each interval.
    Progressing,
    /// Held by the operator (`rollout pause`, or a `set split`/`set weight` on the service).
    Paused,
    /// Back one stage after `threshold` failed judgements; held until `rollout resume`.
    RolledBack,
    /// Canary share 0 % (`rollout abort`, or `on_failure = "abort"`).
    Aborted,
    /// At the last step.
    Promoted,
}

impl Phase {
    /// Every phase, in the order metrics list them.
    pub const ALL: [Phase; 6] = [
        Phase::Idle,
        Phase::Progressing,
        Phase::Paused,
        Phase::RolledBack,
        Phase::Aborted,
        Phase::Promoted,
    ];

    /// The name used in replies, logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Progressing => "progressing",
            Phase::Paused => "paused",
            Phase::RolledBack => "rolled_back",
            Phase::Aborted => "aborted",
            Phase::Promoted => "promoted",
        }
    }
}

/// Why a rollout command was refused.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum RolloutError {
    #[error("service {0:?} has no [service.rollout]")]
    NotConfigured(String),
    #[error("rollout is {0}: `{1}` needs {2}")]
    WrongPhase(&'static str, &'static str, &'static str),
}

/// What one pool did during a window (or since start, before a delta is taken).
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Requests (request mode) or new flows (connection mode).
    pub samples: u64,
    /// 5xx and lbd's own 502/503/504 (request mode); connect failures (connection mode).
    pub errors: u64,
    /// Latency samples per bucket of [`lb_common::stats::first_byte_bucket`].
    pub latency: [u64; FIRST_BYTE_BUCKETS],
}

impl Default for Sample {
    fn default() -> Self {
        Sample {
            samples: 0,
            errors: 0,
            latency: [0; FIRST_BYTE_BUCKETS],
        }
    }
}

impl Sample {
    /// What happened since `earlier` (counters only grow; a reset reads as nothing).
    pub fn since(&self, earlier: &Sample) -> Sample {
        let mut latency = [0; FIRST_BYTE_BUCKETS];
        for (i, l) in latency.iter_mut().enumerate() {
            *l = self.latency[i].saturating_sub(earlier.latency[i]);
        }
        Sample {
            samples: self.samples.saturating_sub(earlier.samples),
            errors: self.errors.saturating_sub(earlier.errors),
            latency,
        }
    }

    /// Adds another backend's counts.
    pub fn add(&mut self, o: &Sample) {
        self.samples += o.samples;
        self.errors += o.errors;
        for (a, b) in self.latency.iter_mut().zip(o.latency.iter()) {
            *a += b;
        }
    }

    /// Errors per sample (`None` without samples).
    pub fn error_ratio(&self) -> Option<f64> {
        (self.samples > 0).then(|| self.errors as f64 / self.samples as f64)
    }

    /// The 99th percentile of the latency samples, interpolated within its bucket (`None`
    /// without samples).
    pub fn p99(&self) -> Option<Duration> {
        quantile(&self.latency, 0.99)
    }

    /// The figures a judgement reports.
    pub fn figures(&self) -> Figures {
        Figures {
            samples: self.samples,
            errors: self.errors,
            error_ratio: self.error_ratio(),
            p99_ms: self.p99().map(|d| d.as_secs_f64() * 1e3),
        }
    }
}

/// A quantile of per-bucket counts in [`first_byte_bound_ns`] buckets.
pub fn quantile(buckets: &[u64; FIRST_BYTE_BUCKETS], q: f64) -> Option<Duration> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut seen = 0u64;
    for (i, n) in buckets.iter().enumerate() {
        if *n == 0 {
            continue;
        }
        if (seen + n) as f64 >= rank {
            let lo = if i == 0 {
                0
            } else {
                first_byte_bound_ns(i - 1).unwrap_or(0)
            };
            // The open last bucket: its lower bound is all that is known.
            let hi = first_byte_bound_ns(i).unwrap_or(lo);
            let within = ((rank - seen as f64) / *n as f64).clamp(0.0, 1.0);
            return Some(Duration::from_nanos(
                (lo as f64 + within * (hi - lo) as f64) as u64,
            ));
        }
        seen += n;
    }
    None
}

/// A progressing rollout's current observation window: when it began, at which stage, and
/// the two pools' counters then (a judgement takes the deltas since).
#[derive(Clone, Debug)]
pub struct Window {
    pub started: tokio::time::Instant,
    pub stage: usize,
    pub canary: Sample,
    pub baseline: Sample,
}

/// One pool's figures in a judgement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    pub samples: u64,
    pub errors: u64,
    pub error_ratio: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// A judgement's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Fail,
    Inconclusive,
}

impl Verdict {
    /// Every result, in the order metrics list them.
    pub const ALL: [Verdict; 3] = [Verdict::Pass, Verdict::Fail, Verdict::Inconclusive];

    pub fn name(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::Inconclusive => "inconclusive",
        }
    }
}

/// One interval's judgement, with what it was based on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Judgement {
    /// Wall-clock time (Unix seconds).
    pub at: u64,
    /// The stage judged (1…N) and the number of steps.
    pub stage: usize,
    pub steps: usize,
    pub result: Verdict,
    /// Why: the gate that failed with its figures, or why it was inconclusive.
    pub reason: String,
    pub canary: Figures,
    pub baseline: Figures,
}

impl Judgement {
    /// The one-line form `rollout status` prints.
    pub fn line(&self) -> String {
        let f = |x: &Figures| {
            format!(
                "{}/{} errors ({}), p99 {}",
                x.errors,
                x.samples,
                x.error_ratio
                    .map_or("-".to_string(), |r| format!("{:.2}%", r * 100.0)),
                x.p99_ms.map_or("-".to_string(), |p| format!("{p:.1}ms"))
            )
        };
        format!(
            "{} stage {}/{} {}: {}; canary {}; baseline {}",
            self.at,
            self.stage,
            self.steps,
            self.result.name(),
            self.reason,
            f(&self.canary),
            f(&self.baseline)
        )
    }
}

/// Judges one interval: `pass` when every set gate holds, `fail` naming the first gate that
/// does not, `inconclusive` below `min_samples` canary samples. A canary pool with no healthy
/// backend fails whatever the counters say (no samples is not "no errors").
pub fn judge(
    cfg: &Rollout,
    canary: &Sample,
    baseline: &Sample,
    canary_healthy: bool,
) -> (Verdict, String) {
    if !canary_healthy {
        return (
            Verdict::Fail,
            "canary pool has no healthy backend".to_string(),
        );
    }
    if canary.samples < cfg.min_samples {
        return (
            Verdict::Inconclusive,
            format!(
                "{} canary samples, below min_samples {}",
                canary.samples, cfg.min_samples
            ),
        );
    }
    let ratio = canary.error_ratio().unwrap_or(0.0);
    if let Some(max) = cfg.max_error_ratio {
        if ratio > max {
            return (
                Verdict::Fail,
                format!(
                    "max_error_ratio: canary {:.2}% > {:.2}%",
                    ratio * 100.0,
                    max * 100.0
                ),
            );
        }
    }
    if let Some(max) = cfg.max_error_ratio_increase {
        let base = baseline.error_ratio().unwrap_or(0.0);
        if ratio - base > max {
            return (
                Verdict::Fail,
                format!(
                    "max_error_ratio_increase: canary {:.2}% - baseline {:.2}% > {:.2}%",
                    ratio * 100.0,
                    base * 100.0,
                    max * 100.0
                ),
            );
        }
    }
    let p99 = canary.p99();
    if let (Some(max), Some(c), Some(b)) = (cfg.max_p99_ratio, p99, baseline.p99()) {
        if b > Duration::ZERO && c.as_secs_f64() / b.as_secs_f64() > max {
            return (
                Verdict::Fail,
                format!(
                    "max_p99_ratio: canary p99 {:.1}ms / baseline p99 {:.1}ms > {max}",
                    c.as_secs_f64() * 1e3,
                    b.as_secs_f64() * 1e3
                ),
            );
        }
    }
    if let (Some(max), Some(c)) = (cfg.max_p99, p99) {
        if c > max {
            return (
                Verdict::Fail,
                format!(
                    "max_p99: canary p99 {:.1}ms > {:.1}ms",
                    c.as_secs_f64() * 1e3,
                    max.as_secs_f64() * 1e3
                ),
            );
        }
    }
    (Verdict::Pass, "every gate holds".to_string())
}

/// The pool weights a rollout sets: (baseline, canary), on the 0-1000 scale.
pub type Weights = (u32, u32);

/// A rollout's progress: what survives a restart (in the state file).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub phase: Phase,
    /// 0 = the split `rollout start` began from; k = `steps[k-1]` % to the canary.
    pub stage: usize,
    /// Stage 0's weights.
    pub origin: Weights,
    /// Failed judgements since the last pass (or stage change).
    pub fails: u32,
    /// Newest first, at most [`KEPT_JUDGEMENTS`].
    pub judgements: Vec<Judgement>,
}

impl Progress {
    /// The weights of `stage`.
    pub fn stage_weights(&self, cfg: &Rollout, stage: usize) -> Weights {
        match stage {
            0 => self.origin,
            k => {
                let s = cfg.steps[(k - 1).min(cfg.steps.len() - 1)];
                ((100 - s) * 10, s * 10)
            }
        }
    }

    /// The weights the rollout holds the pools at now (`None` while idle: the operator's).
    pub fn weights(&self, cfg: &Rollout) -> Option<Weights> {
        match self.phase {
            Phase::Idle => None,
            Phase::Aborted => Some((self.origin.0.max(1), 0)),
            _ => Some(self.stage_weights(cfg, self.stage)),
        }
    }

    /// `rollout start`: from the first step, the current split as stage 0.
    pub fn start(&mut self, cfg: &Rollout, current: Weights) -> Result<(), RolloutError> {
        if matches!(self.phase, Phase::Progressing | Phase::Paused) {
            return Err(RolloutError::WrongPhase(
                self.phase.name(),
                "start",
                "no rollout progressing or paused",
            ));
        }
        *self = Progress {
            phase: Phase::Progressing,
            stage: 1,
            origin: current,
            fails: 0,
            judgements: Vec::new(),
        };
        if cfg.steps.len() == 1 {
            self.phase = Phase::Promoted;
        }
        Ok(())
    }

    /// `rollout pause`.
    pub fn pause(&mut self) -> Result<(), RolloutError> {
        self.need(&[Phase::Progressing], "pause", "progressing")?;
        self.phase = Phase::Paused;
        Ok(())
    }

    /// `rollout resume`: the same stage, watched anew.
    pub fn resume(&mut self) -> Result<(), RolloutError> {
        self.need(
            &[Phase::Paused, Phase::RolledBack],
            "resume",
            "paused or rolled_back",
        )?;
        self.phase = Phase::Progressing;
        self.fails = 0;
        Ok(())
    }

    /// `rollout abort`: canary to 0 %.
    pub fn abort(&mut self) -> Result<(), RolloutError> {
        self.need(
            &[Phase::Progressing, Phase::Paused, Phase::RolledBack],
            "abort",
            "progressing, paused or rolled_back",
        )?;
        self.phase = Phase::Aborted;
        Ok(())
    }

    /// `rollout promote`: straight to the last step.
    pub fn promote(&mut self, cfg: &Rollout) -> Result<(), RolloutError> {
        self.need(
            &[Phase::Progressing, Phase::Paused, Phase::RolledBack],
            "promote",
            "progressing, paused or rolled_back",
        )?;
        self.phase = Phase::Promoted;
        self.stage = cfg.steps.len();
        Ok(())
    }

    fn need(
        &self,
        phases: &[Phase],
        what: &'static str,
        wanted: &'static str,
    ) -> Result<(), RolloutError> {
        if phases.contains(&self.phase) {
            Ok(())
        } else {
            Err(RolloutError::WrongPhase(self.phase.name(), what, wanted))
        }
    }

    /// Applies an interval's judgement (only while progressing): a pass moves to the next
    /// stage (the last one is promotion); `threshold` fails without a pass between them
    /// trigger `on_failure`; an inconclusive interval holds the stage and neither counts nor
    /// resets the fails.
    pub fn judged(&mut self, cfg: &Rollout, j: Judgement) {
        if self.phase != Phase::Progressing {
            return;
        }
        match j.result {
            Verdict::Pass => {
                self.fails = 0;
                self.stage = (self.stage + 1).min(cfg.steps.len());
                if self.stage == cfg.steps.len() {
                    self.phase = Phase::Promoted;
                }
            }
            Verdict::Fail => {
                self.fails += 1;
                if self.fails >= cfg.threshold {
                    self.fails = 0;
                    match cfg.on_failure {
                        OnFailure::Previous => {
                            self.stage = self.stage.saturating_sub(1);
                            self.phase = Phase::RolledBack;
                        }
                        OnFailure::Abort => self.phase = Phase::Aborted,
                    }
                }
            }
            Verdict::Inconclusive => {}
        }
        self.judgements.insert(0, j);
        self.judgements.truncate(KEPT_JUDGEMENTS);
    }

    /// After a config change (reload, restart): a stage past the steps it now has is clamped
    /// to the last one.
    pub fn fit(&mut self, cfg: &Rollout) {
        if self.stage > cfg.steps.len() {
            self.stage = cfg.steps.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::stats::first_byte_bucket;

    fn cfg() -> Rollout {
        Rollout {
            baseline: "legacy".into(),
            canary: "k8s".into(),
            steps: vec![5, 20, 50, 100],
            interval: Duration::from_secs(60),
            threshold: 2,
            min_samples: 100,
            max_error_ratio: Some(0.01),
            max_error_ratio_increase: Some(0.005),
            max_p99_ratio: Some(1.5),
            max_p99: Some(Duration::from_millis(500)),
            on_failure: OnFailure::Previous,
        }
    }

    fn sample(samples: u64, errors: u64, latency_ms: u64) -> Sample {
        let mut s = Sample {
            samples,
            errors,
            ..Default::default()
        };
        s.latency[first_byte_bucket(latency_ms * 1_000_000)] = samples;
        s
    }

    fn j(result: Verdict) -> Judgement {
        Judgement {
            at: 0,
            stage: 0,
            steps: 4,
            result,
            reason: String::new(),
            canary: sample(0, 0, 1).figures(),
            baseline: sample(0, 0, 1).figures(),
        }
    }

    #[test]
    fn every_gate_judges_its_own_figure() {
        let c = cfg();
        let base = sample(1000, 2, 20);
        // (name, canary, healthy, expected, reason contains)
        let rows: Vec<(&str, Sample, bool, Verdict, &str)> = vec![
            (
                "healthy canary",
                sample(200, 1, 20),
                true,
                Verdict::Pass,
                "every gate",
            ),
            (
                "too few samples",
                sample(99, 50, 900),
                true,
                Verdict::Inconclusive,
                "min_samples",
            ),
            (
                "error ratio above 1 %",
                sample(200, 3, 20),
                true,
                Verdict::Fail,
                "max_error_ratio:",
            ),
            (
                "error ratio 0.5 pp above the baseline's",
                sample(1000, 8, 20),
                true,
                Verdict::Fail,
                "max_error_ratio_increase",
            ),
            (
                "p99 1.5× the baseline's",
                sample(200, 0, 40),
                true,
                Verdict::Fail,
                "max_p99_ratio",
            ),
            (
                "unhealthy canary",
                sample(0, 0, 1),
                false,
                Verdict::Fail,
                "no healthy backend",
            ),
        ];
        for (name, canary, healthy, want, why) in rows {
            let (got, reason) = judge(&c, &canary, &base, healthy);
            assert_eq!(got, want, "{name}: {reason}");
            assert!(reason.contains(why), "{name}: {reason}");
        }
        // The absolute p99 gate alone: 600 ms against a baseline just as slow.
        let mut only_p99 = cfg();
        only_p99.max_p99_ratio = None;
        let (got, reason) = judge(&only_p99, &sample(200, 0, 600), &sample(200, 0, 600), true);
        assert_eq!(
            (got, reason.contains("max_p99:")),
            (Verdict::Fail, true),
            "{reason}"
        );
        // A gate that is not set is not checked.
        let mut lax = cfg();
        lax.max_error_ratio = None;
        lax.max_error_ratio_increase = None;
        assert_eq!(
            judge(&lax, &sample(200, 100, 20), &base, true).0,
            Verdict::Pass
        );
    }

    #[test]
    fn passes_walk_the_steps_to_promotion() {
        let c = cfg();
        let mut p = Progress::default();
        p.start(&c, (900, 100)).unwrap();
        assert_eq!(
            (p.phase, p.stage, p.weights(&c)),
            (Phase::Progressing, 1, Some((950, 50)))
        );
        for (stage, w) in [(2, (800, 200)), (3, (500, 500))] {
            p.judged(&c, j(Verdict::Pass));
            assert_eq!((p.stage, p.weights(&c)), (stage, Some(w)));
        }
        p.judged(&c, j(Verdict::Pass));
        assert_eq!(
            (p.phase, p.stage, p.weights(&c)),
            (Phase::Promoted, 4, Some((0, 1000)))
        );
        // Promoted is not judged any more.
        p.judged(&c, j(Verdict::Fail));
        assert_eq!(p.judgements.len(), 3);
    }

    #[test]
    fn threshold_fails_in_a_row_roll_back_one_stage_and_hold() {
        let c = cfg();
        let mut p = Progress::default();
        p.start(&c, (900, 100)).unwrap();
        p.judged(&c, j(Verdict::Pass)); // stage 2
        p.judged(&c, j(Verdict::Fail));
        p.judged(&c, j(Verdict::Inconclusive)); // neither counts nor resets
        assert_eq!((p.phase, p.fails), (Phase::Progressing, 1));
        p.judged(&c, j(Verdict::Fail));
        assert_eq!(
            (p.phase, p.stage, p.weights(&c)),
            (Phase::RolledBack, 1, Some((950, 50)))
        );
        // Held: no judgement moves it; resume goes on from there.
        p.judged(&c, j(Verdict::Pass));
        assert_eq!(p.stage, 1);
        p.resume().unwrap();
        p.judged(&c, j(Verdict::Fail));
        p.judged(&c, j(Verdict::Pass));
        p.judged(&c, j(Verdict::Fail));
        assert_eq!(
            (p.phase, p.stage),
            (Phase::Progressing, 2),
            "a pass between fails resets"
        );
        // From the first step, a rollback returns to the split it started from.
        let mut q = Progress::default();
        q.start(&c, (900, 100)).unwrap();
        q.judged(&c, j(Verdict::Fail));
        q.judged(&c, j(Verdict::Fail));
        assert_eq!(
            (q.phase, q.stage, q.weights(&c)),
            (Phase::RolledBack, 0, Some((900, 100)))
        );
    }

    #[test]
    fn on_failure_abort_takes_the_canary_to_zero() {
        let mut c = cfg();
        c.on_failure = OnFailure::Abort;
        c.threshold = 1;
        let mut p = Progress::default();
        p.start(&c, (900, 100)).unwrap();
        p.judged(&c, j(Verdict::Fail));
        assert_eq!((p.phase, p.weights(&c)), (Phase::Aborted, Some((900, 0))));
    }

    #[test]
    fn commands_need_their_phases() {
        let c = cfg();
        let mut p = Progress::default();
        for (what, r) in [
            ("pause", p.clone().pause()),
            ("resume", p.clone().resume()),
            ("abort", p.clone().abort()),
            ("promote", p.clone().promote(&c)),
        ] {
            assert!(
                matches!(r, Err(RolloutError::WrongPhase("idle", _, _))),
                "{what}: {r:?}"
            );
        }
        p.start(&c, (1000, 0)).unwrap();
        assert!(p.start(&c, (1000, 0)).is_err(), "one is progressing");
        p.pause().unwrap();
        assert!(p.start(&c, (1000, 0)).is_err(), "one is paused");
        assert!(p.pause().is_err());
        p.resume().unwrap();
        p.promote(&c).unwrap();
        assert_eq!((p.phase, p.weights(&c)), (Phase::Promoted, Some((0, 1000))));
        assert!(p.abort().is_err());
        // A finished rollout can be started again, from where it is now.
        p.start(&c, (0, 1000)).unwrap();
        assert_eq!(p.stage, 1);
    }

    #[test]
    fn deltas_and_quantiles() {
        let a = sample(100, 1, 10);
        let mut b = sample(300, 4, 10);
        b.latency[first_byte_bucket(200_000_000)] += 2;
        let d = b.since(&a);
        assert_eq!((d.samples, d.errors), (200, 3));
        let p99 = d.p99().unwrap();
        assert!(
            p99 > Duration::from_millis(8) && p99 < Duration::from_millis(14),
            "{p99:?}"
        );
        assert_eq!(Sample::default().p99(), None);
        assert_eq!(
            sample(10, 0, 1).since(&sample(20, 5, 1)).samples,
            0,
            "a reset reads as nothing"
        );
    }
}
