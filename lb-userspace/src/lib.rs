//! lb's userspace: configuration, the Maglev table builder, the data-plane loader and writer.
pub mod admin;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod guard;
pub mod health;
pub mod host;
pub mod listener;
pub mod maglev;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod state;
pub mod swrr;
pub mod view;
