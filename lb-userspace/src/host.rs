//! The few host settings the balancer depends on, checked or set at start.

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
/// otherwise drop as martian. Also makes sure the host forwards at all.
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
