//! Network namespaces, veth links and commands run inside them. Everything is undone by Drop.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, bail};

/// Runs a command, failing with its stderr if it fails.
pub fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("spawning {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A name prefix unique to this process and call, short enough for interface names.
pub fn unique_prefix(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("lb{}{}{}", tag, std::process::id() % 10000, n)
}

/// A network namespace that is deleted (with everything in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `name` with its loopback up.
    pub fn new(name: &str) -> Result<Netns> {
        run(&["ip", "netns", "add", name])?;
        let ns = Netns { name: name.into() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME …`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut v = vec!["ip", "-n", &self.name];
        v.extend_from_slice(args);
        run(&v)
    }

    /// Runs a command inside the namespace and waits for it.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend_from_slice(args);
        run(&v)
    }

    /// The MAC address of `iface` in the namespace.
    pub fn mac(&self, iface: &str) -> Result<[u8; 6]> {
        crate::raw::parse_mac(&self.exec(&["cat", &format!("/sys/class/net/{iface}/address")])?)
    }

    /// Writes a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")])?;
        Ok(())
    }

    /// Waits (at most `timeout`) until no IPv6 address in the namespace is tentative: a fresh
    /// interface's link-local address goes through duplicate address detection (~1–2 s), and
    /// neighbour discovery sent before it ends is not answered, which costs the first
    /// connection a one-second retransmission.
    pub fn wait_ipv6_ready(&self, timeout: std::time::Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let tentative = self.ip(&["-6", "addr", "show", "tentative"])?;
            if tentative.trim().is_empty() {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "{}: IPv6 addresses still tentative:\n{tentative}",
                    self.name
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Starts a long-running command inside the namespace; it is killed when the guard drops.
    pub fn spawn(&self, args: &[&str], log: &std::path::Path) -> Result<ChildGuard> {
        self.spawn_passing(args, log, None)
    }

    /// Like [`Netns::spawn`], with `passed` (a listening socket, say) as the child's
    /// descriptor 3, the way a supervisor passes sockets (systemd socket activation).
    pub fn spawn_passing(
        &self,
        args: &[&str],
        log: &std::path::Path,
        passed: Option<std::os::fd::RawFd>,
    ) -> Result<ChildGuard> {
        use std::os::unix::process::CommandExt as _;
        let f = File::create(log)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f);
        if let Some(fd) = passed {
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    // dup2 clears close-on-exec on the copy, but dup2(3, 3) makes no copy:
                    // a descriptor that is already 3 must have the flag cleared itself, or
                    // the exec closes it and lbd finds one of its own there.
                    let r = if fd == 3 {
                        libc::fcntl(3, libc::F_SETFD, 0)
                    } else {
                        libc::dup2(fd, 3)
                    };
                    if r < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        // A group of its own, so that the guard's kill reaches what the child forks too
        // (nginx's and HAProxy's workers), not just the process it started.
        cmd.process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {args:?} in {}", self.name))?;
        Ok(ChildGuard(Some(child)))
    }

    /// Moves the calling thread into this namespace (sockets it opens then live there).
    pub fn enter(&self) -> Result<()> {
        enter_named(&self.name)
    }
}

impl Netns {
    /// As `enter`, for a handle that does not own the namespace (consumed without deleting).
    pub fn enter_no_drop(self) -> Result<()> {
        let r = enter_named(&self.name);
        std::mem::forget(self);
        r
    }
}

fn enter_named(name: &str) -> Result<()> {
    {
        let f = File::open(format!("/var/run/netns/{name}"))?;
        // SAFETY: a valid namespace fd; affects only the calling thread.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {name}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.0.take()?;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().ok()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.0.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            // The whole group, while its leader is unreaped (so the id is still its own):
            // killing only the leader orphans a daemon's workers, which live on.
            // SAFETY: signalling our own child's process group.
            unsafe { libc::killpg(c.id() as i32, libc::SIGKILL) };
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Creates a veth pair `a_if`@`a` ↔ `b_if`@`b`, both up, never touching the host's namespace.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    run(&[
        "ip", "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
        &b.name,
    ])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}

/// TX checksum offload off: a veth otherwise hands its peer packets with partial checksums,
/// which an XDP rewrite cannot complete (real NICs deliver full checksums).
pub fn tx_csum_off(ns: &Netns, iface: &str) -> Result<()> {
    ns.exec(&["ethtool", "-K", iface, "tx", "off"])?;
    Ok(())
}
