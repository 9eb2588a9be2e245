use crate::control::CommandError;
use crate::{daemon::Daemon, state::parse_weight};

/// `set split SERVICE POOL=N [POOL=N …]`: all pools at once, atomically.
#[derive(Debug, PartialEq)]
pub struct SetSplit {
    pub service: String,
    pub split: Vec<(String, u32)>,
}

const USAGE: &str = "usage: set split SERVICE POOL=N [POOL=N ...]";

impl SetSplit {
    pub fn parse(args: &[&str]) -> Result<Self, String> {
        let [service, pairs @ ..] = args else {
            return Err(USAGE.into());
        };
        if pairs.is_empty() {
            return Err(USAGE.into());
        }
        let mut split = Vec::new();
        for p in pairs {
            let (name, w) = p
                .split_once('=')
                .ok_or_else(|| format!("{p:?} is not POOL=N; {USAGE}"))?;
            split.push((
                name.to_string(),
                parse_weight(w).map_err(|e| e.to_string())?,
            ));
        }
        Ok(SetSplit {
            service: service.to_string(),
            split,
        })
    }

    pub fn execute(self, d: &mut Daemon) -> Result<String, CommandError> {
        let mut note = None;
        d.change(&self.service, |st| {
            st.set_split(&self.service, &self.split)?;
            note = Daemon::pause_for_operator(st, &self.service);
            Ok(())
        })?;
        Ok(note.unwrap_or_default())
    }
}
