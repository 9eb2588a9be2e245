//! Helpers for lb's integration tests: network namespaces with Drop cleanup, a topology of
//! client / balancer / backends, tiny HTTP backends and clients running as threads inside
//! those namespaces, and packet builders for BPF_PROG_TEST_RUN fixtures.
//!
//! Every name a test creates starts with a prefix unique to that test and process, and
//! every address lives inside namespaces the test made.

pub mod bench;
pub mod http;
pub mod netns;
pub mod packets;
pub mod packets6;
pub mod raw;
pub mod scale_out;
pub mod topology;
pub mod traffic;
pub mod udp;
pub mod xdp;

/// A process's resident memory (VmRSS, KiB; 0 when it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// How many of the answers in `by` (answers per backend name) came from the legacy pool.
pub fn legacy(by: &std::collections::HashMap<String, usize>) -> usize {
    by.iter()
        .filter(|(k, _)| k.starts_with("legacy"))
        .map(|(_, v)| v)
        .sum()
}

/// Root is needed for namespaces, XDP and BPF. Outside CI a non-root run skips with a reason;
/// in CI (where tests run as root) a non-root run is a failure, never a silent skip.
pub fn require_root(test: &str) -> bool {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: needs root, and CI must run it (CI is set)");
    }
    eprintln!("SKIP {test}: needs root (network namespaces, XDP, BPF)");
    false
}

/// Checks that `k` of `n` independent flows landing somewhere agrees with a configured share
/// `p`. Which backend a new flow gets depends on a hash of its (kernel-chosen) source port,
/// so counts scatter binomially around `n·p`; the bound is five standard deviations, a
/// false alarm about once in two million runs, yet far tighter than the gap between any two
/// splits the tests set (a 90/10 that stayed 50/50 is dozens of deviations off).
pub fn check_share(k: usize, n: usize, p: f64) -> Result<(), String> {
    let mean = n as f64 * p;
    let bound = 5.0 * (n as f64 * p * (1.0 - p)).sqrt();
    if (k as f64 - mean).abs() <= bound {
        Ok(())
    } else {
        Err(format!(
            "{k} of {n} flows ({:.1} %), expected {:.1} % ± {:.1} %",
            100.0 * k as f64 / n as f64,
            100.0 * p,
            100.0 * bound / n as f64
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::check_share;

    #[test]
    fn share_bound_tells_splits_apart() {
        assert!(check_share(449, 1000, 0.5).is_ok(), "3 sigma off is chance");
        assert!(
            check_share(900, 1000, 0.5).is_err(),
            "a split left at 90/10"
        );
        assert!(
            check_share(500, 1000, 0.9).is_err(),
            "a split left at 50/50"
        );
        assert!(check_share(0, 400, 0.5).is_err());
    }
}
