//! Background client traffic for tests that change things under load: keep-alive
//! connections that keep sending requests (each must stay on its backend and never break)
//! and a stream of new connections (each must succeed; where it went is recorded).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::{
    http::{Client, get_once},
    topology::Topology,
};

/// What the traffic saw.
#[derive(Debug, Default)]
pub struct Report {
    /// Requests made on the keep-alive connections.
    pub keepalive_requests: usize,
    /// Keep-alive request failures (a reset or a closed connection), with the reason.
    pub keepalive_errors: Vec<String>,
    /// Keep-alive requests answered by another backend than the connection's first.
    pub keepalive_moved: usize,
    /// New connections: when the connect started, and the backend that answered.
    pub new_flows: Vec<(Instant, String)>,
    /// New connections that failed, with the reason.
    pub new_failed: Vec<String>,
}

/// Traffic running on a thread inside the client namespace until [`Traffic::stop`].
pub struct Traffic {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<Report>>>,
}

impl Traffic {
    /// Opens `keepalive` connections (returns once they are all up), then loops: one request
    /// on each of them, one new connection, a short pause.
    pub fn start(t: &Topology, keepalive: usize) -> Result<Traffic> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let vip = t.vip();
        let name = t.client.name.clone();
        let s = stop.clone();
        let handle = std::thread::spawn(move || -> Result<Report> {
            crate::netns::Netns { name }.enter_no_drop()?;
            let mut conns = Vec::new();
            for _ in 0..keepalive {
                let mut c = Client::connect(vip)?;
                let first = c.get(false)?;
                conns.push(Some((c, first)));
            }
            let _ = ready_tx.send(());
            let mut r = Report::default();
            while !s.load(Ordering::Relaxed) {
                for slot in conns.iter_mut() {
                    let Some((c, first)) = slot else { continue };
                    r.keepalive_requests += 1;
                    match c.get(false) {
                        Ok(now) if &now == first => {}
                        Ok(_) => r.keepalive_moved += 1,
                        Err(e) => {
                            r.keepalive_errors.push(format!("{e:#}"));
                            *slot = None;
                        }
                    }
                }
                let started = Instant::now();
                match get_once(vip) {
                    Ok(b) => r.new_flows.push((started, b)),
                    Err(e) => r.new_failed.push(format!("{e:#}")),
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(r)
        });
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(()) => Ok(Traffic {
                stop,
                handle: Some(handle),
            }),
            Err(_) => {
                let e = handle
                    .join()
                    .map_err(|_| anyhow::anyhow!("traffic thread panicked"))?
                    .err();
                anyhow::bail!("traffic did not start: {e:?}")
            }
        }
    }

    /// Stops the traffic and returns what it saw.
    pub fn stop(mut self) -> Result<Report> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .expect("stopped once")
            .join()
            .map_err(|_| anyhow::anyhow!("traffic thread panicked"))?
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
