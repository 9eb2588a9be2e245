//! The Unix socket server: many clients at once (up to a cap), a bound on line length, an
//! idle timeout, peers checked with SO_PEERCRED, every line handed to the owner task and
//! answered in order.

use std::{os::unix::fs::PermissionsExt, path::Path, sync::Arc, time::Duration};

use crate::listener::{Cap, accept_loop};
use anyhow::{Context as _, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

/// Longest accepted command line, in bytes.
pub const MAX_LINE: usize = 4096;

/// A line for the owner task, and where to send its reply.
pub struct Request {
    pub line: String,
    pub reply: oneshot::Sender<String>,
}

/// Binds the socket (mode 0600, replacing a stale one) and serves it until the task is
/// dropped: at most `cap` clients at once, each closed after `idle` without a complete line.
pub async fn serve(
    path: &Path,
    to_owner: mpsc::Sender<Request>,
    cap: Cap,
    idle: Duration,
) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(socket = %path.display(), "control socket listening");
    // SAFETY: geteuid has no preconditions.
    let own_uid = unsafe { libc::geteuid() };
    let to_owner = Arc::new(to_owner);
    accept_loop(listener, cap, move |stream, slot| {
        let allowed = stream
            .peer_cred()
            .map(|c| c.uid() == 0 || c.uid() == own_uid)
            .unwrap_or(false);
        let to_owner = to_owner.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if !allowed {
                let mut s = stream;
                let _ = s.write_all(b"error: permission denied\n\n").await;
                return;
            }
            if let Err(e) = client(stream, &to_owner, idle).await {
                tracing::debug!(error = %e, "control client ended");
            }
        });
    })
    .await
}

async fn client(
    stream: UnixStream,
    to_owner: &mpsc::Sender<Request>,
    idle: Duration,
) -> Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let mut bounded = (&mut r).take(MAX_LINE as u64 + 1);
        let read = bounded.read_until(b'\n', &mut buf);
        let Ok(n) = tokio::time::timeout(idle, read).await else {
            let _ = w
                .write_all(format!("error: idle for {idle:?}, closing\n\n").as_bytes())
                .await;
            return Ok(());
        };
        let n = n?;
        if n == 0 {
            return Ok(());
        }
        if buf.len() > MAX_LINE && !buf.ends_with(b"\n") {
            w.write_all(format!("error: line longer than {MAX_LINE} bytes\n\n").as_bytes())
                .await?;
            return Ok(());
        }
        let reply = match std::str::from_utf8(&buf) {
            Err(_) => "error: command is not valid UTF-8\n\n".to_string(),
            Ok(line) => {
                let (tx, rx) = oneshot::channel();
                to_owner
                    .send(Request {
                        line: line.trim_end_matches(['\r', '\n']).to_string(),
                        reply: tx,
                    })
                    .await
                    .context("daemon is shutting down")?;
                rx.await.context("daemon is shutting down")?
            }
        };
        w.write_all(reply.as_bytes()).await?;
    }
}
