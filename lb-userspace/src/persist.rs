//! The state file: the operator's runtime decisions (pool and backend weights, admin states)
//! kept across restarts. Written atomically before a change's reply; read once at start.
//!
//! Each saved weight carries the config's value it replaced. At start a saved weight is
//! restored only while the config still says what it said then: an operator who edited a
//! weight in the file and restarted meant the new value. Admin states are not in the config,
//! so they are always restored. What the config no longer has is dropped (and logged).

use std::{
    collections::BTreeMap,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::state::{AdminState, State};

/// The format this lbd writes and reads. A file of another version is reported and ignored.
pub const VERSION: u32 = 1;

/// The file's contents.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Saved {
    pub version: u32,
    /// By service name.
    pub services: BTreeMap<String, SavedService>,
    /// `set host drain` is in force (absent: ready).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub host_drained: bool,
}

/// One service's runtime values.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedService {
    /// By pool name.
    pub pools: BTreeMap<String, SavedPool>,
    /// The rollout's progress (state, stage, the split it started from, its last
    /// judgements), for services with `[service.rollout]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<crate::rollout::Progress>,
}

/// A pool's weight and its backends'.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedPool {
    pub weight: u32,
    /// The config's weight when this was written.
    pub config_weight: u32,
    /// By backend name.
    pub backends: BTreeMap<String, SavedBackend>,
}

/// A backend's weight and admin state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedBackend {
    pub weight: u32,
    /// The config's weight when this was written.
    pub config_weight: u32,
    /// `ready`, `drain` or `maint`.
    pub state: String,
}

/// Why the file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a state file: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: format version {found}, this lbd reads {VERSION}")]
    Version { path: PathBuf, found: u32 },
}

/// Why the file could not be written (the change it would have recorded is refused).
#[derive(Debug, thiserror::Error)]
#[error("writing the state file {path}: {source}")]
pub struct SaveError {
    path: PathBuf,
    source: std::io::Error,
}

/// What a restore did, for the log.
#[derive(Debug, Default, PartialEq)]
pub struct Restored {
    /// Values taken from the file.
    pub applied: usize,
    /// Entries the config no longer has, or weights the config changed since.
    pub dropped: Vec<String>,
}

impl Saved {
    /// The runtime values of a state.
    pub fn of(state: &State) -> Saved {
        let mut services = BTreeMap::new();
        for (name, s) in &state.services {
            let mut pools = BTreeMap::new();
            for p in &s.pools {
                let cp = s.config.pools.iter().find(|c| c.name == p.name);
                let backends = p
                    .backends
                    .iter()
                    .map(|b| {
                        let cw = cp
                            .and_then(|c| c.backends.iter().find(|c| c.name == b.name))
                            .map_or(b.weight, |c| c.weight.0);
                        (
                            b.name.clone(),
                            SavedBackend {
                                weight: b.weight,
                                config_weight: cw,
                                state: b.state.to_string(),
                            },
                        )
                    })
                    .collect();
                pools.insert(
                    p.name.clone(),
                    SavedPool {
                        weight: p.weight,
                        config_weight: cp.map_or(p.weight, |c| c.weight.0),
                        backends,
                    },
                );
            }
            services.insert(
                name.clone(),
                SavedService {
                    pools,
                    rollout: s.rollout.clone(),
                },
            );
        }
        Saved {
            version: VERSION,
            services,
            host_drained: state.drained,
        }
    }

    /// Applies the saved values to a state built from the config.
    pub fn restore_into(&self, state: &mut State) -> Restored {
        let mut r = Restored::default();
        if self.host_drained != state.drained {
            state.drained = self.host_drained;
            r.applied += 1;
        }
        for (sname, ss) in &self.services {
            let Some(s) = state.services.get_mut(sname) else {
                r.dropped.push(format!("service {sname}"));
                continue;
            };
            match (&s.config.rollout, &ss.rollout) {
                (Some(cfg), Some(saved)) => {
                    let mut p = saved.clone();
                    p.fit(cfg);
                    if s.rollout.as_ref() != Some(&p) {
                        r.applied += 1;
                    }
                    s.rollout = Some(p);
                }
                (None, Some(_)) => r
                    .dropped
                    .push(format!("rollout of {sname} (no [service.rollout] now)")),
                _ => {}
            }
            for (pname, sp) in &ss.pools {
                let Some(p) = s.pools.iter_mut().find(|p| &p.name == pname) else {
                    r.dropped.push(format!("pool {sname}/{pname}"));
                    continue;
                };
                if sp.weight != p.weight {
                    if sp.config_weight == p.weight && sp.weight <= crate::config::MAX_WEIGHT {
                        p.weight = sp.weight;
                        r.applied += 1;
                    } else {
                        r.dropped
                            .push(format!("weight of {sname}/{pname} (the config changed it)"));
                    }
                }
                for (bname, sb) in &sp.backends {
                    let Some(b) = p.backends.iter_mut().find(|b| &b.name == bname) else {
                        r.dropped.push(format!("backend {sname}/{pname}/{bname}"));
                        continue;
                    };
                    if sb.weight != b.weight {
                        if sb.config_weight == b.weight && sb.weight <= crate::config::MAX_WEIGHT {
                            b.weight = sb.weight;
                            r.applied += 1;
                        } else {
                            r.dropped.push(format!(
                                "weight of {sname}/{pname}/{bname} (the config changed it)"
                            ));
                        }
                    }
                    match AdminState::parse(&sb.state) {
                        Some(st) if st != b.state => {
                            b.state = st;
                            r.applied += 1;
                        }
                        Some(_) => {}
                        None => r
                            .dropped
                            .push(format!("state {:?} of {sname}/{pname}/{bname}", sb.state)),
                    }
                }
            }
        }
        // A rollout under way owns its two pools' weights.
        for s in state.services.values_mut() {
            s.apply_rollout();
        }
        r
    }
}

/// Where the state file lives, and what it holds now.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    /// What the file holds (so an unchanged state is not written again).
    written: Option<Saved>,
}

impl Store {
    /// A store at `path`; nothing is read or written yet.
    pub fn new(path: impl Into<PathBuf>) -> Store {
        Store {
            path: path.into(),
            written: None,
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file: `Ok(None)` when there is none.
    pub fn load(&mut self) -> Result<Option<Saved>, LoadError> {
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(LoadError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        // The version first, so that a newer format is named as such, not as garbage.
        #[derive(Deserialize)]
        struct Head {
            version: u32,
        }
        let parse = |source| LoadError::Parse {
            path: self.path.clone(),
            source,
        };
        let head: Head = serde_json::from_slice(&text).map_err(parse)?;
        if head.version != VERSION {
            return Err(LoadError::Version {
                path: self.path.clone(),
                found: head.version,
            });
        }
        let saved: Saved = serde_json::from_slice(&text).map_err(parse)?;
        self.written = Some(saved.clone());
        Ok(Some(saved))
    }

    /// Moves an unusable file aside (`….corrupt`), so that it is not overwritten and can be
    /// looked at; returns where it went.
    pub fn set_aside(&self) -> std::io::Result<PathBuf> {
        let mut to = self.path.clone().into_os_string();
        to.push(".corrupt");
        let to = PathBuf::from(to);
        std::fs::rename(&self.path, &to)?;
        Ok(to)
    }

    /// Records `saved` unless the file already holds it: a temporary file in the same
    /// directory, fsync, rename over the old one, fsync of the directory — so a crash at any
    /// point leaves either the old file or the new one, whole. Returns whether it wrote.
    pub fn save(&mut self, saved: &Saved) -> Result<bool, SaveError> {
        if self.written.as_ref() == Some(saved) {
            return Ok(false);
        }
        self.write(saved).map_err(|source| SaveError {
            path: self.path.clone(),
            source,
        })?;
        self.written = Some(saved.clone());
        Ok(true)
    }

    fn write(&self, saved: &Saved) -> std::io::Result<()> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(dir)?;
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut text = serde_json::to_vec_pretty(saved).map_err(std::io::Error::other)?;
        text.push(b'\n');
        let result = (|| {
            // Only lbd reads it: what the operator decided is nobody else's business.
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            std::fs::File::open(dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const CONFIG: &str = r#"
[daemon]
interfaces = ["eth0"]
[[service]]
name = "web"
vip = "10.0.0.1"
port = 80
snat = "10.0.1.1"
[[service.pool]]
name = "legacy"
weight = 90
backends = ["10.1.0.1:80", "10.1.0.2:80"]
[[service.pool]]
name = "k8s"
weight = 10
backends = ["10.2.0.1:80"]
"#;

    fn state(text: &str) -> State {
        State::from_config(&Config::parse(text, Path::new("t.toml")).unwrap()).unwrap()
    }

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "lb-persist-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn changed() -> State {
        let mut st = state(CONFIG);
        st.set_split("web", &[("legacy".into(), 0), ("k8s".into(), 100)])
            .unwrap();
        st.backend_mut("web", "legacy", "10.1.0.2:80")
            .unwrap()
            .state = AdminState::Drain;
        st.backend_mut("web", "k8s", "10.2.0.1:80").unwrap().weight = 7;
        st.drained = true;
        st
    }

    #[test]
    fn what_was_saved_comes_back_over_the_config() {
        let d = dir();
        let mut store = Store::new(d.join("sub/state.json"));
        assert!(store.save(&Saved::of(&changed())).unwrap());
        let mut st = state(CONFIG);
        let saved = Store::new(d.join("sub/state.json"))
            .load()
            .unwrap()
            .unwrap();
        let r = saved.restore_into(&mut st);
        assert_eq!(r.dropped, Vec::<String>::new());
        assert_eq!(r.applied, 5);
        assert!(st.drained, "a drained host stays drained");
        assert_eq!(Saved::of(&st), Saved::of(&changed()));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn an_unchanged_state_is_not_written_again() {
        let d = dir();
        let mut store = Store::new(d.join("state.json"));
        assert!(store.save(&Saved::of(&changed())).unwrap());
        assert!(!store.save(&Saved::of(&changed())).unwrap());
        assert!(store.save(&Saved::of(&state(CONFIG))).unwrap());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_weight_the_config_changed_since_comes_from_the_config() {
        let saved = Saved::of(&changed());
        // The operator edited legacy to 80 and k8s to 20 and restarted.
        let edited = CONFIG
            .replace("weight = 90", "weight = 80")
            .replace("weight = 10", "weight = 20");
        let mut st = state(&edited);
        let r = saved.restore_into(&mut st);
        assert_eq!(st.services["web"].pools[0].weight, 80);
        assert_eq!(st.services["web"].pools[1].weight, 20);
        assert_eq!(r.dropped.len(), 2, "{:?}", r.dropped);
        // What the config did not change still comes back.
        assert_eq!(
            st.backend_mut("web", "legacy", "10.1.0.2:80")
                .unwrap()
                .state,
            AdminState::Drain
        );
        assert_eq!(
            st.backend_mut("web", "k8s", "10.2.0.1:80").unwrap().weight,
            7
        );
    }

    #[test]
    fn what_the_config_no_longer_has_is_dropped() {
        let saved = Saved::of(&changed());
        let smaller = CONFIG.replace(r#", "10.1.0.2:80""#, "");
        let mut st = state(&smaller);
        let r = saved.restore_into(&mut st);
        assert_eq!(
            r.dropped,
            vec!["backend web/legacy/10.1.0.2:80".to_string()]
        );
        assert_eq!(st.services["web"].pools[1].weight, 100);
    }

    #[test]
    fn a_corrupt_a_foreign_and_a_missing_file_are_told_apart() {
        let d = dir();
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("state.json");
        assert!(Store::new(&p).load().unwrap().is_none());
        std::fs::write(&p, "{\"version\": 1, \"services\": {").unwrap();
        assert!(matches!(
            Store::new(&p).load(),
            Err(LoadError::Parse { .. })
        ));
        std::fs::write(&p, "{\"version\": 9, \"whatever\": []}").unwrap();
        assert!(matches!(
            Store::new(&p).load(),
            Err(LoadError::Version { found: 9, .. })
        ));
        let aside = Store::new(&p).set_aside().unwrap();
        assert!(aside.exists() && !p.exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn an_unwritable_place_is_an_error_and_leaves_no_temporary_file() {
        let d = dir();
        std::fs::create_dir_all(&d).unwrap();
        // A directory where the file should be: the rename fails.
        let p = d.join("state.json");
        std::fs::create_dir_all(p.join("x")).unwrap();
        let mut store = Store::new(&p);
        assert!(store.save(&Saved::of(&changed())).is_err());
        assert!(!d.join("state.json.tmp").exists());
        let _ = std::fs::remove_dir_all(&d);
    }
}
