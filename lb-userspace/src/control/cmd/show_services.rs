use crate::daemon::Daemon;

/// `show services`: one line per service.
#[derive(Debug, PartialEq)]
pub struct ShowServices;

impl ShowServices {
    pub fn execute(self, d: &mut Daemon) -> String {
        let mut out = String::from("service vip port protocol mode pools generation\n");
        for (name, s) in &d.state.services {
            let c = &s.config;
            let pools: Vec<String> = s
                .pools
                .iter()
                .map(|p| format!("{}={}", p.name, p.weight))
                .collect();
            out += &format!(
                "{name} {} {} {:?} {:?} {} {}\n",
                c.vip,
                c.port,
                c.protocol,
                c.mode,
                pools.join(","),
                d.generation(name)
            )
            .to_lowercase();
        }
        out
    }
}
