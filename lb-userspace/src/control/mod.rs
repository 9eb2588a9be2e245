//! The control socket: grammar (one command per file under `cmd/`), dispatch, and server.
//!
//! One command per line; the reply ends with an empty line; a failed command's reply starts
//! with `error: ` and changes nothing.

pub mod client;
pub mod cmd;
pub mod server;

use crate::daemon::Daemon;

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
    /// Anything else (including an empty line).
    Unknown(String),
}

impl Command {
    /// Parses one line. A known command with bad arguments is an `Err` with the reason.
    pub fn parse(line: &str) -> Result<Command, String> {
        // Words are separated by ASCII spaces and tabs only: any other control or Unicode
        // space (a CR, a vertical tab, U+00A0) is refused rather than read as a separator.
        if let Some(c) = line.chars().find(|c| {
            (c.is_control() && *c != '\t') || (c.is_whitespace() && !matches!(c, ' ' | '\t'))
        }) {
            return Err(format!(
                "unexpected character {:?} in the command (words are separated by spaces or tabs)",
                c
            ));
        }
        let words: Vec<&str> = line.split([' ', '\t']).filter(|w| !w.is_empty()).collect();
        Ok(match words.as_slice() {
            ["help"] => Command::Help(cmd::help::Help),
            ["show", "services"] => Command::ShowServices(cmd::show_services::ShowServices),
            ["show", "backends", rest @ ..] => {
                Command::ShowBackends(cmd::show_backends::ShowBackends::parse(rest)?)
            }
            ["show", "table", rest @ ..] => {
                Command::ShowTable(cmd::show_table::ShowTable::parse(rest)?)
            }
            ["show", "stat", rest @ ..] => {
                Command::ShowStat(cmd::show_stat::ShowStat::parse(rest)?)
            }
            ["explain", rest @ ..] => Command::Explain(cmd::explain::Explain::parse(rest)?),
            ["set", "weight", rest @ ..] => {
                Command::SetWeight(cmd::set_weight::SetWeight::parse(rest)?)
            }
            ["set", "split", rest @ ..] => {
                Command::SetSplit(cmd::set_split::SetSplit::parse(rest)?)
            }
            ["set", "state", rest @ ..] => {
                Command::SetState(cmd::set_state::SetState::parse(rest)?)
            }
            _ => Command::Unknown(line.trim().to_string()),
        })
    }

    /// The command's name for metrics (`lb_control_commands_total{command}`).
    pub fn name(&self) -> &'static str {
        match self {
            Command::Help(_) => "help",
            Command::ShowServices(_) => "show services",
            Command::ShowBackends(_) => "show backends",
            Command::ShowTable(_) => "show table",
            Command::ShowStat(_) => "show stat",
            Command::Explain(_) => "explain",
            Command::SetWeight(_) => "set weight",
            Command::SetSplit(_) => "set split",
            Command::SetState(_) => "set state",
            Command::Unknown(_) => "unknown",
        }
    }

    /// Runs the command against the daemon. `Err` is the error text (state unchanged).
    pub fn execute(self, d: &mut Daemon) -> Result<String, String> {
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
            Command::Unknown(l) if l.is_empty() => Err("empty command (try 'help')".into()),
            Command::Unknown(l) => Err(format!("unknown command {l:?} (try 'help')")),
        }
    }
}

/// Runs one line: the reply text, ending with the blank line that closes a reply.
pub fn handle_line(d: &mut Daemon, line: &str) -> (String, &'static str, bool) {
    let (name, result) = match Command::parse(line) {
        Ok(cmd) => {
            let name = cmd.name();
            (name, cmd.execute(d))
        }
        // A known command with bad arguments.
        Err(e) => ("invalid", Err(e)),
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
            let e = Command::parse(bad).err();
            assert!(
                e.as_deref()
                    .is_some_and(|e| e.contains("unexpected character")),
                "{bad:?}: {e:?}"
            );
        }
    }
}
