//! The client side of the control protocol (used by `lbctl`, and by tests the same way).

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

/// Sends one command line and returns the reply without its closing empty line.
pub fn request(socket: &Path, line: &str) -> std::io::Result<String> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut r = BufReader::new(s);
    let mut reply = String::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l)? == 0 || l == "\n" {
            return Ok(reply);
        }
        reply.push_str(&l);
    }
}
