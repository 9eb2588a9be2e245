use crate::control::CommandError;
use crate::{control::split_path, daemon::Daemon, state::parse_weight};

/// `set weight SERVICE/POOL N` or `set weight SERVICE/POOL/BACKEND N`.
#[derive(Debug, PartialEq)]
pub struct SetWeight {
    pub service: String,
    pub pool: String,
    pub backend: Option<String>,
    pub weight: u32,
}

const USAGE: &str = "usage: set weight SERVICE/POOL[/BACKEND] N";

impl SetWeight {
    pub fn parse(args: &[&str]) -> Result<Self, String> {
        let [path, w] = args else {
            return Err(USAGE.into());
        };
        let weight = parse_weight(w).map_err(|e| e.to_string())?;
        match split_path(path).as_slice() {
            [s, p] => Ok(SetWeight {
                service: s.to_string(),
                pool: p.to_string(),
                backend: None,
                weight,
            }),
            [s, p, b] => Ok(SetWeight {
                service: s.to_string(),
                pool: p.to_string(),
                backend: Some(b.to_string()),
                weight,
            }),
            _ => Err(USAGE.into()),
        }
    }

    pub fn execute(self, d: &mut Daemon) -> Result<String, CommandError> {
        let service = self.service.clone();
        let mut note = None;
        d.change(&service, |st| {
            match &self.backend {
                None => st.set_pool_weight(&self.service, &self.pool, self.weight)?,
                Some(b) => st.backend_mut(&self.service, &self.pool, b)?.weight = self.weight,
            }
            note = Daemon::pause_for_operator(st, &self.service);
            Ok(())
        })?;
        Ok(note.unwrap_or_default())
    }
}
