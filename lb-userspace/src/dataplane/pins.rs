//! Pins: where this instance's maps and links live on the bpffs, the check that pinned maps
//! have the layout this build reads (against `lb_common::layout`), and their removal.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use aya::{
    maps::{MapInfo, MapType},
    programs::links::PinnedLink,
};

use super::PIN_LAYOUT;

/// Directory of this layout's pinned maps.
pub fn maps_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(PIN_LAYOUT).join("maps")
}

/// Directory of this layout's pinned links.
pub fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(PIN_LAYOUT).join("links")
}

/// Makes sure `dir` is on a bpf filesystem, mounting one at `/sys/fs/bpf` if that is where
/// it should be and nothing is mounted there (as Cilium and bpfman do).
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let is_bpffs = |p: &Path| -> bool {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
            return false;
        };
        // SAFETY: valid C string and an out-parameter of the right type.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
    };
    let mut probe = dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if is_bpffs(&probe) {
        return Ok(());
    }
    let root = Path::new("/sys/fs/bpf");
    if dir.starts_with(root) && !is_bpffs(root) {
        let status = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .context("running mount -t bpf")?;
        if status.success() {
            tracing::info!("mounted a bpf filesystem at /sys/fs/bpf");
            return Ok(());
        }
    }
    bail!(
        "pin_dir {} is not on a bpf filesystem: mount one first (`mount -t bpf bpf /sys/fs/bpf`) or point pin_dir at one",
        dir.display()
    )
}

/// What each pinned map must look like for this build to use it: type, key size, value size,
/// and the entry count (`None` where the config sets it: conntrack and reverse NAT), from
/// the one description the kernel crate is sized by.
fn expected_maps() -> impl Iterator<Item = (&'static str, MapType, usize, usize, Option<u32>)> {
    use lb_common::layout::MapKind;
    lb_common::layout::PINNED.into_iter().map(|m| {
        let ty = match m.kind {
            MapKind::Hash => MapType::Hash,
            MapKind::LruHash => MapType::LruHash,
            MapKind::Array => MapType::Array,
            MapKind::PerCpuArray => MapType::PerCpuArray,
            MapKind::LpmTrie => MapType::LpmTrie,
            MapKind::ProgramArray => MapType::ProgramArray,
        };
        (
            m.name,
            ty,
            m.key_size,
            m.value_size,
            (!m.sized_by_config).then_some(m.max_entries),
        )
    })
}

/// Refuses pinned maps this build would misread: a layout change without a version bump, or
/// pins left by something else. Maps that are not pinned yet are fine (they get created).
pub fn check_pinned_layout(pin_dir: &Path) -> Result<()> {
    let dir = maps_dir(pin_dir);
    for (name, ty, key, value, entries) in expected_maps() {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("reading pinned map {}", path.display()))?;
        let found_ty = info.map_type().ok();
        let mismatch = found_ty != Some(ty)
            || info.key_size() as usize != key
            || info.value_size() as usize != value
            || entries.is_some_and(|n| n != info.max_entries());
        if mismatch {
            bail!(
                "pinned map {} does not match this build (found {:?} key {} value {} entries {}, want {:?} key {key} value {value} entries {}): \
                 refusing to misread it. Run `lbd down` to remove the old data plane (established flows through it are lost), then start again",
                path.display(),
                found_ty,
                info.key_size(),
                info.value_size(),
                info.max_entries(),
                ty,
                entries.map_or("any".to_string(), |n| n.to_string()),
            );
        }
    }
    Ok(())
}

/// Pins of another layout version are not ours to read or remove; say they are there.
pub(super) fn warn_other_layouts(pin_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name != PIN_LAYOUT && name.starts_with('v') {
            tracing::warn!(
                found = %e.path().display(),
                ours = PIN_LAYOUT,
                "pins of another layout version exist; this build ignores them (remove them with the lbd that made them)"
            );
        }
    }
}

/// Detaches and removes everything pinned under this layout's directory (`pin_dir/v2`; what
/// `lbd down` does).
pub fn remove_pins(pin_dir: &Path) -> Result<()> {
    let links = links_dir(pin_dir);
    if links.exists() {
        for e in std::fs::read_dir(&links)? {
            let path = e?.path();
            // Unpinning drops the last reference: the kernel detaches the program.
            PinnedLink::from_pin(&path)
                .with_context(|| format!("opening {}", path.display()))?
                .unpin()?;
        }
    }
    let layout = pin_dir.join(PIN_LAYOUT);
    if layout.exists() {
        std::fs::remove_dir_all(&layout)
            .with_context(|| format!("removing {}", layout.display()))?;
    }
    // The pin dir itself goes too if nothing else lives there.
    let _ = std::fs::remove_dir(pin_dir);
    Ok(())
}
