//! The control socket: grammar (one command per file under `cmd/`), dispatch, and server.
//!
//! One command per line; the reply ends with an empty line; a failed command's reply starts
//! with `error: ` and changes nothing.

pub mod client;
pub mod cmd;
pub mod server;

use crate::{
    daemon::{ChangeError, Daemon},
    rollout_driver::Action,
    state::StateError,
};

/// Why a command failed: its text is what follows `error: ` in the reply. Kept typed up to
/// the moment the reply is written.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The words do not make a command: wrong arguments, a value that does not parse.
    #[error("{0}")]
    Usage(String),
    /// An empty line.
    #[error("empty command (try 'help')")]
    Empty,
    /// No command starts with these words.
    #[error("unknown command {0:?} (try 'help')")]
    Unknown(String),
    /// The state refused it (unknown service, pool or backend, a weight out of range…).
    #[error(transparent)]
    State(#[from] StateError),
    /// The change was valid but could not be applied (it was rolled back).
    #[error(transparent)]
    Change(#[from] ChangeError),
    /// Reading the data plane's counters failed.
    #[error("reading counters: {0:#}")]
    Counters(anyhow::Error),
}

impl From<String> for CommandError {
    fn from(s: String) -> Self {
        CommandError::Usage(s)
    }
}

/// A parsed control command.
#[derive(Debug, PartialEq)]
pub enum Command {
    Help(cmd::help::Help),
    ShowServices(cmd::show_services::ShowServices),
    ShowBackends(cmd::show_backends::ShowBackends),
    ShowTable(cmd::show_table::ShowTable),
    ShowStat(cmd::show_stat::ShowStat),
    Explain(cmd::explain::Explain),
    SetWeight(cmd::set_weight::SetWeight),
    SetSplit(cmd::set_split::SetSplit),
    SetState(cmd::set_state::SetState),
    SetHost(cmd::set_host::SetHost),
    ShowHost(cmd::show_host::ShowHost),
    ShowRollouts(cmd::show_rollouts::ShowRollouts),
    RolloutStatus(cmd::rollout_status::RolloutStatus),
    Rollout(cmd::rollout::RolloutCmd),
    /// Anything else (including an empty line).
    Unknown(String),
}

impl Command {
    /// Parses one line. A known command with bad arguments is an `Err` with the reason.
    pub fn parse(line: &str) -> Result<Command, CommandError> {
        Command::parse_named(line).1
    }

    /// Parses one line; also the name of the command it is (`None`: unknown), for the
    /// per-command metric.
    pub fn parse_named(line: &str) -> (Option<&'static str>, Result<Command, CommandError>) {
        // Words are separated by ASCII spaces and tabs only: any other control or Unicode
        // space (a CR, a vertical tab, U+00A0) is refused rather than read as a separator.
        if let Some(c) = line.chars().find(|c| {
            (c.is_control() && *c != '\t') || (c.is_whitespace() && !matches!(c, ' ' | '\t'))
        }) {
            return (
                None,
                Err(CommandError::Usage(format!(
                    "unexpected character {c:?} in the command (words are separated by spaces or tabs)"
                ))),
            );
        }
        let words: Vec<&str> = line.split([' ', '\t']).filter(|w| !w.is_empty()).collect();
        match Spec::find(&words) {
            Some(spec) => (
                Some(spec.name),
                (spec.parse)(&words[spec.words.len()..]).map_err(CommandError::Usage),
            ),
            None => (None, Ok(Command::Unknown(line.trim().to_string()))),
        }
    }

    /// Runs the command against the daemon. `Err` is the error text (state unchanged).
    pub fn execute(self, d: &mut Daemon) -> Result<String, CommandError> {
        match self {
            Command::Help(c) => Ok(c.execute()),
            Command::ShowServices(c) => Ok(c.execute(d)),
            Command::ShowBackends(c) => c.execute(d),
            Command::ShowTable(c) => c.execute(d),
            Command::ShowStat(c) => c.execute(d),
            Command::Explain(c) => c.execute(d),
            Command::SetWeight(c) => c.execute(d),
            Command::SetSplit(c) => c.execute(d),
            Command::SetState(c) => c.execute(d),
            Command::SetHost(c) => c.execute(d),
            Command::ShowHost(c) => Ok(c.execute(d)),
            Command::ShowRollouts(c) => Ok(c.execute(d)),
            Command::RolloutStatus(c) => c.execute(d),
            Command::Rollout(c) => c.execute(d),
            Command::Unknown(l) if l.is_empty() => Err(CommandError::Empty),
            Command::Unknown(l) => Err(CommandError::Unknown(l)),
        }
    }
}

/// Runs one line: the reply text, ending with the blank line that closes a reply.
pub fn handle_line(d: &mut Daemon, line: &str) -> (String, &'static str, bool) {
    let (name, result) = match Command::parse_named(line) {
        (name, Ok(cmd)) => (name.unwrap_or("unknown"), cmd.execute(d)),
        // A known command with bad arguments (or a line with forbidden characters).
        (_, Err(e)) => ("invalid", Err(e)),
    };
    d.metrics.command(name, result.is_ok());
    match result {
        Ok(mut text) => {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push('\n');
            (text, name, true)
        }
        Err(e) => (format!("error: {e}\n\n"), name, false),
    }
}

/// One command of the grammar: the words that name it, its arguments and what it does (for
/// `help`), whether it has a JSON form (a trailing `json` word, which `lbctl --json` adds),
/// and its parser. [`COMMANDS`] is the only list: dispatch, `help`, the metric label and
/// `lbctl` all read it.
pub struct Spec {
    pub name: &'static str,
    pub words: &'static [&'static str],
    pub args: &'static str,
    pub about: &'static str,
    pub json: bool,
    parse: fn(&[&str]) -> Result<Command, String>,
}

impl Spec {
    /// The command `words` start with (the longest match).
    pub fn find(words: &[&str]) -> Option<&'static Spec> {
        COMMANDS
            .iter()
            .filter(|s| words.starts_with(s.words))
            .max_by_key(|s| s.words.len())
    }
}

/// A command that takes no arguments.
fn bare(rest: &[&str], name: &str, cmd: Command) -> Result<Command, String> {
    if rest.is_empty() {
        Ok(cmd)
    } else {
        Err(format!("`{name}` takes no arguments"))
    }
}

/// The grammar, in `help`'s order.
pub static COMMANDS: &[Spec] = &[
    Spec {
        name: "help",
        words: &["help"],
        args: "",
        about: "this list",
        json: false,
        parse: |r| bare(r, "help", Command::Help(cmd::help::Help)),
    },
    Spec {
        name: "show services",
        words: &["show", "services"],
        args: "",
        about: "one line per service",
        json: false,
        parse: |r| {
            bare(
                r,
                "show services",
                Command::ShowServices(cmd::show_services::ShowServices),
            )
        },
    },
    Spec {
        name: "show backends",
        words: &["show", "backends"],
        args: "[SERVICE] [json]",
        about: "service pool backend weight share state health (JSON: and active flows)",
        json: true,
        parse: |r| cmd::show_backends::ShowBackends::parse(r).map(Command::ShowBackends),
    },
    Spec {
        name: "show stat",
        words: &["show", "stat"],
        args: "[json]",
        about: "counters per backend (CSV with a '# ' header, or JSON)",
        json: true,
        parse: |r| cmd::show_stat::ShowStat::parse(r).map(Command::ShowStat),
    },
    Spec {
        name: "show table",
        words: &["show", "table"],
        args: "SERVICE",
        about: "buckets per backend, table generation",
        json: false,
        parse: |r| cmd::show_table::ShowTable::parse(r).map(Command::ShowTable),
    },
    Spec {
        name: "explain",
        words: &["explain"],
        args: "SERVICE CLIENT_IP:PORT [json]",
        about: "the backend a new flow from there gets, and why",
        json: true,
        parse: |r| cmd::explain::Explain::parse(r).map(Command::Explain),
    },
    Spec {
        name: "set weight",
        words: &["set", "weight"],
        args: "SERVICE/POOL[/BACKEND] N",
        about: "a pool's or a backend's weight (0-1000)",
        json: false,
        parse: |r| cmd::set_weight::SetWeight::parse(r).map(Command::SetWeight),
    },
    Spec {
        name: "set split",
        words: &["set", "split"],
        args: "SERVICE POOL=N [POOL=N ...]",
        about: "every pool's weight at once, atomically",
        json: false,
        parse: |r| cmd::set_split::SetSplit::parse(r).map(Command::SetSplit),
    },
    Spec {
        name: "set state",
        words: &["set", "state"],
        args: "SERVICE/POOL/BACKEND ready|drain|maint",
        about: "a backend's admin state",
        json: false,
        parse: |r| cmd::set_state::SetState::parse(r).map(Command::SetState),
    },
    Spec {
        name: "set host",
        words: &["set", "host"],
        args: "ready|drain",
        about: "drain: withdraw this host's VIPs from the routers, keep serving what arrives",
        json: false,
        parse: |r| cmd::set_host::SetHost::parse(r).map(Command::SetHost),
    },
    Spec {
        name: "show host",
        words: &["show", "host"],
        args: "",
        about: "host state; per VIP whether it is wanted and announced",
        json: false,
        parse: |r| bare(r, "show host", Command::ShowHost(cmd::show_host::ShowHost)),
    },
    Spec {
        name: "show rollouts",
        words: &["show", "rollouts"],
        args: "",
        about: "one line per service with a rollout: state step canary_share",
        json: false,
        parse: |r| {
            bare(
                r,
                "show rollouts",
                Command::ShowRollouts(cmd::show_rollouts::ShowRollouts),
            )
        },
    },
    Spec {
        name: "rollout status",
        words: &["rollout", "status"],
        args: "SERVICE [json]",
        about: "state, step, canary share, time in stage, the last judgements with their figures",
        json: true,
        parse: |r| cmd::rollout_status::RolloutStatus::parse(r).map(Command::RolloutStatus),
    },
    Spec {
        name: "rollout start",
        words: &["rollout", "start"],
        args: "SERVICE",
        about: "from the first step; the split now is stage 0",
        json: false,
        parse: |r| rollout(Action::Start, "start", r),
    },
    Spec {
        name: "rollout pause",
        words: &["rollout", "pause"],
        args: "SERVICE",
        about: "hold the stage (needs progressing)",
        json: false,
        parse: |r| rollout(Action::Pause, "pause", r),
    },
    Spec {
        name: "rollout resume",
        words: &["rollout", "resume"],
        args: "SERVICE",
        about: "watch the stage again (needs paused or rolled_back)",
        json: false,
        parse: |r| rollout(Action::Resume, "resume", r),
    },
    Spec {
        name: "rollout abort",
        words: &["rollout", "abort"],
        args: "SERVICE",
        about: "canary share to 0 %, state aborted",
        json: false,
        parse: |r| rollout(Action::Abort, "abort", r),
    },
    Spec {
        name: "rollout promote",
        words: &["rollout", "promote"],
        args: "SERVICE",
        about: "straight to the last step, state promoted",
        json: false,
        parse: |r| rollout(Action::Promote, "promote", r),
    },
];

fn rollout(action: Action, verb: &str, rest: &[&str]) -> Result<Command, String> {
    cmd::rollout::RolloutCmd::parse(action, verb, rest).map(Command::Rollout)
}

/// Splits `SERVICE/POOL[/BACKEND]`.
pub fn split_path(path: &str) -> Vec<&str> {
    path.split('/').collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ascii_spaces_and_tabs_separate_words() {
        assert!(Command::parse("show services").is_ok());
        assert!(Command::parse("  show\tservices ").is_ok());
        for bad in [
            "show\rservices",
            "show services\r\nset weight web/k8s 0",
            "show\u{0b}services",
            "show\u{a0}services",
            "show\u{2028}services",
            "show services\u{1b}[2J",
        ] {
            let e = Command::parse(bad).err().map(|e| e.to_string());
            assert!(
                e.as_deref()
                    .is_some_and(|e| e.contains("unexpected character")),
                "{bad:?}: {e:?}"
            );
        }
    }
}
