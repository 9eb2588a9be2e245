use crate::control::CommandError;
use crate::daemon::{ChangeError, Daemon};

/// `set host ready|drain`: whether this balancer host should receive new traffic. `drain`
/// withdraws its VIPs from the routers (`[daemon.announce]`) and goes on serving whatever
/// still arrives, so established flows end on their own; kept across restarts.
#[derive(Debug, PartialEq)]
pub struct SetHost {
    pub drained: bool,
}

const USAGE: &str = "usage: set host ready|drain";

impl SetHost {
    pub fn parse(args: &[&str]) -> Result<Self, String> {
        match args {
            ["ready"] => Ok(SetHost { drained: false }),
            ["drain"] => Ok(SetHost { drained: true }),
            [other] => Err(format!("unknown host state {other:?}; {USAGE}")),
            _ => Err(USAGE.into()),
        }
    }

    pub fn execute(self, d: &mut Daemon) -> Result<String, CommandError> {
        let previous = std::mem::replace(&mut d.state.drained, self.drained);
        // Recorded before the reply, as every runtime decision: a drained host stays drained
        // across a restart. Refused (and undone) if it cannot be.
        if let Err(e) = d.persist() {
            d.state.drained = previous;
            return Err(ChangeError::Persist(e).into());
        }
        d.update_announce();
        Ok(String::new())
    }
}
