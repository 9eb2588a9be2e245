use std::collections::HashMap;

use crate::control::CommandError;
use crate::daemon::Daemon;

/// `show table SERVICE`: how many buckets each backend holds, and the table generation.
#[derive(Debug, PartialEq)]
pub struct ShowTable {
    pub service: String,
}

impl ShowTable {
    pub fn parse(args: &[&str]) -> Result<Self, String> {
        match args {
            [s] => Ok(ShowTable {
                service: s.to_string(),
            }),
            _ => Err("usage: show table SERVICE".into()),
        }
    }

    pub fn execute(self, d: &mut Daemon) -> Result<String, CommandError> {
        let svc = d.state.service(&self.service)?;
        // The table the kernel uses, as published: no rebuild.
        let table = d.live_table(&self.service)?;
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &id in table.iter() {
            *counts.entry(id).or_default() += 1;
        }
        let mut out = format!(
            "service {} generation {} buckets {}\npool backend buckets\n",
            self.service,
            d.generation(&self.service),
            lb_common::TABLE_SIZE
        );
        for p in &svc.pools {
            for b in &p.backends {
                out += &format!(
                    "{} {} {}\n",
                    p.name,
                    b.name,
                    counts.get(&b.id).copied().unwrap_or(0)
                );
            }
        }
        let empty = counts.get(&lb_common::NO_BACKEND).copied().unwrap_or(0);
        if empty > 0 {
            out += &format!("(none) - {empty}\n");
        }
        Ok(out)
    }
}
