use crate::control::CommandError;
use crate::{control::split_path, daemon::Daemon, state::AdminState};

/// `set state SERVICE/POOL/BACKEND ready|drain|maint`.
#[derive(Debug, PartialEq)]
pub struct SetState {
    pub service: String,
    pub pool: String,
    pub backend: String,
    pub state: AdminState,
}

const USAGE: &str = "usage: set state SERVICE/POOL/BACKEND ready|drain|maint";

impl SetState {
    pub fn parse(args: &[&str]) -> Result<Self, String> {
        let [path, st] = args else {
            return Err(USAGE.into());
        };
        let state =
            AdminState::parse(st).ok_or_else(|| format!("unknown state {st:?}; {USAGE}"))?;
        match split_path(path).as_slice() {
            [s, p, b] => Ok(SetState {
                service: s.to_string(),
                pool: p.to_string(),
                backend: b.to_string(),
                state,
            }),
            _ => Err(USAGE.into()),
        }
    }

    pub fn execute(self, d: &mut Daemon) -> Result<String, CommandError> {
        d.change(&self.service, |st| {
            st.backend_mut(&self.service, &self.pool, &self.backend)?
                .state = self.state;
            Ok(())
        })?;
        Ok(String::new())
    }
}
