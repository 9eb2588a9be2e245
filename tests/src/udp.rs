//! A UDP backend for tests: answers every datagram with its name, from inside a network
//! namespace, until dropped.

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::netns::Netns;

/// A UDP echo-with-name server in a namespace.
pub struct UdpBackend {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl UdpBackend {
    /// Binds `addr` inside `ns` and answers every datagram with `name`.
    pub fn start(ns: &Netns, addr: SocketAddr, name: &str) -> Result<UdpBackend> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (ns_name, name, s) = (ns.name.clone(), name.to_string(), stop.clone());
        let handle = std::thread::spawn(move || {
            let setup = (|| -> Result<UdpSocket> {
                Netns { name: ns_name }.enter_no_drop()?;
                let sock = UdpSocket::bind(addr)?;
                sock.set_read_timeout(Some(Duration::from_millis(50)))?;
                Ok(sock)
            })();
            let sock = match setup {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let mut buf = [0u8; 1500];
            while !s.load(Ordering::Relaxed) {
                if let Ok((_, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(name.as_bytes(), from);
                }
            }
        });
        ready_rx.recv().context("udp backend thread")??;
        Ok(UdpBackend {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
