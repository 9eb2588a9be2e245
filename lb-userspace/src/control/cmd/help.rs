/// `help`: the grammar.
#[derive(Debug, PartialEq)]
pub struct Help;

impl Help {
    pub fn execute(self) -> String {
        "commands:
  help
  show services
  show backends [SERVICE]
  show stat [json]                     (CSV with a '# ' header, or JSON)
  show table SERVICE
  explain SERVICE CLIENT_IP:PORT [json]  (the backend a new flow from there gets, and why)
  set weight SERVICE/POOL N            (0-1000)
  set weight SERVICE/POOL/BACKEND N    (0-1000)
  set split SERVICE POOL=N [POOL=N ...]  (every pool, atomically)
  set state SERVICE/POOL/BACKEND ready|drain|maint"
            .into()
    }
}
