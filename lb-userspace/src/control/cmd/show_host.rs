use crate::daemon::Daemon;

/// `show host`: this host's state, and each VIP: whether lbd wants it announced and whether
/// BIRD has it.
#[derive(Debug, PartialEq)]
pub struct ShowHost;

impl ShowHost {
    pub fn execute(self, d: &mut Daemon) -> String {
        let state = if d.state.drained { "drain" } else { "ready" };
        let mut out = format!("host {state}\n");
        let wanted = crate::announce::wanted(&d.state);
        let Some(status) = d.announce_status() else {
            out += "announce off (no [daemon.announce])\n";
            return out;
        };
        out += "vip wanted announced\n";
        let vips = d.state.vips();
        let yes = |b: bool| if b { "yes" } else { "no" };
        for vip in vips {
            out += &format!(
                "{vip} {} {}\n",
                yes(wanted.contains(&vip)),
                yes(status.announced.contains(&vip))
            );
        }
        if let Some(e) = &status.error {
            out += &format!("last_error {e}\n");
        }
        out
    }
}
