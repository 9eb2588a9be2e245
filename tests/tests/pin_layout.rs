//! Pinned state across restarts: a second load adopts the first one's maps (same map ids),
//! and a pinned map this build would misread is refused with an error that says what to do.

use std::path::PathBuf;

use aya::maps::MapInfo;
use lb_common::map_names;
use lb_tests::{netns::run, require_root, xdp::Bpffs};
use lb_userspace::dataplane::{Dataplane, LoadOptions, maps_dir};

fn opts(pin_dir: PathBuf) -> LoadOptions {
    LoadOptions {
        pin_dir: Some(pin_dir),
        ..LoadOptions::default()
    }
}

#[test]
fn a_second_load_adopts_the_pinned_maps() {
    if !require_root("a_second_load_adopts_the_pinned_maps") {
        return;
    }
    let fs = Bpffs::new("p");
    let pins = fs.0.join("lb");
    let id = || {
        MapInfo::from_pin(maps_dir(&pins).join(map_names::CONNTRACK))
            .unwrap()
            .id()
    };
    let first = Dataplane::load(&opts(pins.clone())).unwrap();
    let before = id();
    drop(first);
    let _second = Dataplane::load(&opts(pins.clone())).unwrap();
    assert_eq!(before, id(), "the conntrack map was recreated, not adopted");
}

#[test]
fn a_pinned_map_of_another_layout_is_refused() {
    if !require_root("a_pinned_map_of_another_layout_is_refused") {
        return;
    }
    let fs = Bpffs::new("q");
    let pins = fs.0.join("lb");
    let maps = maps_dir(&pins);
    std::fs::create_dir_all(&maps).unwrap();
    // What an older build with a smaller backend record would have left behind.
    let path = maps.join(map_names::BACKENDS);
    run(&[
        "bpftool",
        "map",
        "create",
        path.to_str().unwrap(),
        "type",
        "array",
        "key",
        "4",
        "value",
        "16",
        "entries",
        "4096",
        "name",
        "LB_BACKENDS",
    ])
    .unwrap();
    let err = match Dataplane::load(&opts(pins)) {
        Ok(_) => panic!("a pinned map with the wrong value size was adopted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("does not match this build") && err.contains("lbd down"),
        "{err}"
    );
}
