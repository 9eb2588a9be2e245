//! lbctl — send one control command to lbd and print the reply.
//! Exit 0 on success, 1 when the reply is an error, 2 when the socket cannot be reached or
//! usage is wrong.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "lbctl",
    version,
    about = "Control a running lbd",
    trailing_var_arg = true
)]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, default_value = "/run/lb/lb.sock")]
    socket: PathBuf,
    /// Ask for JSON where the command has it.
    #[arg(long)]
    json: bool,
    /// The command, e.g. `set split web legacy=80 k8s=20`.
    #[arg(required = true, allow_hyphen_values = true)]
    words: Vec<String>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let mut line = cli.words.join(" ");
    // The commands with a JSON form take a trailing `json` word; others answer in text.
    let words: Vec<&str> = line.split([' ', '\t']).filter(|w| !w.is_empty()).collect();
    let has_json = lb_userspace::control::Spec::find(&words).is_some_and(|c| c.json);
    if cli.json && has_json && !line.ends_with(" json") {
        line.push_str(" json");
    }
    match lb_userspace::control::client::request(&cli.socket, &line) {
        Ok(reply) => {
            print!("{reply}");
            if reply.starts_with("error: ") {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("lbctl: {}: {e}", cli.socket.display());
            ExitCode::from(2)
        }
    }
}
