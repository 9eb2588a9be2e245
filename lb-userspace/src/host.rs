//! The few host settings the balancer depends on, checked or set at start.

/// What the daemon changes on the host besides the data plane: a trait, so that the run
/// loop runs in process in tests with a host that changes nothing.
pub trait Host: Send {
    /// See [`reserve_snat_ports`].
    fn reserve_snat_ports(&mut self, range: (u16, u16)) -> Result<()>;
    /// See [`forward_filter`].
    fn forward_filter(&mut self, interfaces: &[String], sources: &[std::net::IpAddr])
    -> Result<()>;
    /// See [`prepare_interface`].
    fn prepare_interface(&mut self, iface: &str) -> Result<()>;
    /// See [`prepare_ipv6`].
    fn prepare_ipv6(&mut self) -> Result<()>;
}

/// This host (sysctls under /proc/sys, nftables).
pub struct RealHost;

impl Host for RealHost {
    fn reserve_snat_ports(&mut self, range: (u16, u16)) -> Result<()> {
        reserve_snat_ports(range)
    }
    fn forward_filter(
        &mut self,
        interfaces: &[String],
        sources: &[std::net::IpAddr],
    ) -> Result<()> {
        forward_filter(interfaces, sources)
    }
    fn prepare_interface(&mut self, iface: &str) -> Result<()> {
        prepare_interface(iface)
    }
    fn prepare_ipv6(&mut self) -> Result<()> {
        prepare_ipv6()
    }
}

/// A host that is left as it is (in-process tests); it records the interfaces it was
/// asked to prepare.
#[derive(Default)]
pub struct NoHost {
    pub prepared: Vec<String>,
}

impl Host for NoHost {
    fn reserve_snat_ports(&mut self, _: (u16, u16)) -> Result<()> {
        Ok(())
    }
    fn forward_filter(&mut self, _: &[String], _: &[std::net::IpAddr]) -> Result<()> {
        Ok(())
    }
    fn prepare_interface(&mut self, iface: &str) -> Result<()> {
        self.prepared.push(iface.to_string());
        Ok(())
    }
    fn prepare_ipv6(&mut self) -> Result<()> {
        Ok(())
    }
}

use anyhow::{Context as _, Result, bail};

fn read(path: &str) -> Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading {path}"))?
        .trim()
        .to_string())
}

fn write(path: &str, value: &str) -> Result<()> {
    std::fs::write(path, value).with_context(|| format!("writing {value:?} to {path}"))
}

/// SNAT ports must never be handed to the host's own sockets (health checks, the request-mode
/// proxy): if the range overlaps the kernel's ephemeral range, reserve it there.
pub fn reserve_snat_ports((lo, hi): (u16, u16)) -> Result<()> {
    let range = read("/proc/sys/net/ipv4/ip_local_port_range")?;
    let mut it = range
        .split_whitespace()
        .filter_map(|v| v.parse::<u16>().ok());
    let (Some(elo), Some(ehi)) = (it.next(), it.next()) else {
        bail!("unexpected ip_local_port_range {range:?}");
    };
    if hi < elo || lo > ehi {
        return Ok(());
    }
    let path = "/proc/sys/net/ipv4/ip_local_reserved_ports";
    let current = read(path)?;
    let mine = format!("{lo}-{hi}");
    if current.split(',').any(|r| r == mine) {
        return Ok(());
    }
    let value = if current.is_empty() {
        mine.clone()
    } else {
        format!("{current},{mine}")
    };
    write(path, &value)?;
    tracing::warn!(snat_ports = %mine, ephemeral = %range, "SNAT ports overlap the ephemeral range; reserved them in ip_local_reserved_ports");
    Ok(())
}

/// Lets the kernel forward what the XDP program hands it after NAT (when a next hop is not
/// resolved yet): such packets carry our own SNAT address as source, which the kernel would
/// otherwise drop as martian. Also makes sure the host forwards at all: the XDP program's
/// fib lookups need forwarding on, and the first packet to an unresolved neighbour is the
/// kernel's to send. What else the host then forwards is limited by [`forward_filter`].
pub fn prepare_interface(iface: &str) -> Result<()> {
    if iface.contains('/') || iface.contains("..") {
        bail!("invalid interface name {iface:?}");
    }
    write(
        &format!("/proc/sys/net/ipv4/conf/{iface}/accept_local"),
        "1",
    )?;
    if read("/proc/sys/net/ipv4/ip_forward")? != "1" {
        write("/proc/sys/net/ipv4/ip_forward", "1")?;
        tracing::warn!("enabled net.ipv4.ip_forward (the balancer forwards packets)");
    }
    Ok(())
}

/// Turns IPv6 forwarding on, for a connection-mode service on an IPv6 VIP: the fib lookup
/// helper refuses IPv6 routes without it, and the first packet towards an unresolved
/// neighbour is the kernel's to forward. (IPv6 has no martian check on a local source
/// address, so nothing like `accept_local` is needed.)
pub fn prepare_ipv6() -> Result<()> {
    let all = "/proc/sys/net/ipv6/conf/all/forwarding";
    if !std::path::Path::new(all).exists() {
        bail!("a connection-mode service has an IPv6 VIP, but IPv6 is disabled on this host");
    }
    if read(all)? != "1" {
        write(all, "1")?;
        tracing::warn!(
            "enabled net.ipv6.conf.all.forwarding (an IPv6 VIP is balanced); interfaces with accept_ra = 1 now ignore router advertisements: set accept_ra = 2 on those the host needs them on"
        );
    }
    Ok(())
}

/// The nftables table lbd owns (one per network namespace).
pub const NFT_TABLE: &str = "lb";

/// The ruleset that makes the host forward, from the balancer's interfaces, only the
/// balancer's own traffic: packets whose source is one of `sources` (the SNAT addresses
/// and VIPs — what the XDP program hands the kernel after rewriting). Anything else that
/// arrives there addressed through the host (a packet straight to a backend, say) is
/// dropped and counted. Applied as one transaction: the table is replaced whole.
pub fn forward_filter_rules(interfaces: &[String], sources: &[std::net::IpAddr]) -> String {
    let ifs = interfaces
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let v4: Vec<String> = sources
        .iter()
        .filter(|a| a.is_ipv4())
        .map(|a| a.to_string())
        .collect();
    let v6: Vec<String> = sources
        .iter()
        .filter(|a| a.is_ipv6())
        .map(|a| a.to_string())
        .collect();
    let rule = |family: &str, field: &str, addrs: &[String]| {
        if addrs.is_empty() {
            format!(
                "    iifname {{ {ifs} }} meta nfproto {family} counter drop comment \"not the balancer's\"\n"
            )
        } else {
            format!(
                "    iifname {{ {ifs} }} meta nfproto {family} {field} saddr != {{ {} }} counter drop comment \"not the balancer's\"\n",
                addrs.join(", ")
            )
        }
    };
    format!(
        "table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\ntable inet {NFT_TABLE} {{\n  chain forward {{\n    type filter hook forward priority filter; policy accept;\n{}{}  }}\n}}\n",
        rule("ipv4", "ip", &v4),
        rule("ipv6", "ip6", &v6)
    )
}

fn nft(script: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running nft (install nftables, or set [daemon] forward_filter = false)")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft refused the forward filter: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Installs (or replaces) the forward filter of [`forward_filter_rules`].
pub fn forward_filter(interfaces: &[String], sources: &[std::net::IpAddr]) -> Result<()> {
    nft(&forward_filter_rules(interfaces, sources))?;
    tracing::info!(
        table = NFT_TABLE,
        "forward filter installed: the host forwards only the balancer's own traffic from its interfaces"
    );
    Ok(())
}

/// Removes the forward filter (`lbd down`); nothing to do when it is not there.
pub fn remove_forward_filter() -> Result<()> {
    nft(&format!(
        "table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forward_filter_drops_what_is_not_the_balancers_on_its_interfaces() {
        let r = forward_filter_rules(
            &["eth0".into(), "eth1".into()],
            &["10.20.0.1".parse().unwrap(), "10.99.0.10".parse().unwrap()],
        );
        assert!(
            r.starts_with("table inet lb\ndelete table inet lb\n"),
            "{r}"
        );
        assert!(
            r.contains(
                "iifname { \"eth0\", \"eth1\" } meta nfproto ipv4 ip saddr != { 10.20.0.1, 10.99.0.10 } counter drop"
            ),
            "{r}"
        );
        assert!(r.contains("meta nfproto ipv6 counter drop"), "{r}");
        let dual = forward_filter_rules(
            &["eth0".into()],
            &["10.20.0.1".parse().unwrap(), "fd00:20::1".parse().unwrap()],
        );
        assert!(
            dual.contains(
                "iifname { \"eth0\" } meta nfproto ipv6 ip6 saddr != { fd00:20::1 } counter drop"
            ),
            "{dual}"
        );
        assert!(
            r.contains("policy accept"),
            "other interfaces are not ours to filter: {r}"
        );
    }
}
