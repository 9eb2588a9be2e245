/// `help`: the grammar.
#[derive(Debug, PartialEq)]
pub struct Help;

impl Help {
    /// The grammar, from [`crate::control::COMMANDS`].
    pub fn execute(self) -> String {
        let usage =
            |c: &crate::control::Spec| format!("{} {}", c.name, c.args).trim_end().to_string();
        let width = crate::control::COMMANDS
            .iter()
            .map(|c| usage(c).len())
            .max()
            .unwrap_or(0);
        let mut out = String::from("commands:");
        for c in crate::control::COMMANDS {
            out += &format!("\n  {:width$}  {}", usage(c), c.about);
        }
        out
    }
}
