/// `help`: the grammar.
#[derive(Debug, PartialEq)]
pub struct Help;

impl Help {
    pub fn execute(self) -> String {
        "commands:
  help
  show services
  show backends [SERVICE]
  show table SERVICE
  set weight SERVICE/POOL N            (0-1000)
  set weight SERVICE/POOL/BACKEND N    (0-1000)
  set split SERVICE POOL=N [POOL=N ...]  (every pool, atomically)
  set state SERVICE/POOL/BACKEND ready|drain|maint"
            .into()
    }
}
