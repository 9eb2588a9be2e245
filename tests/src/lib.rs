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
pub mod topology;
pub mod traffic;
pub mod xdp;

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
