//! One file per control command: its arguments (`parse`) and what it does (`execute`).
pub mod explain;
pub mod help;
pub mod rollout;
pub mod rollout_status;
pub mod set_host;
pub mod set_split;
pub mod set_state;
pub mod set_weight;
pub mod show_backends;
pub mod show_host;
pub mod show_rollouts;
pub mod show_services;
pub mod show_stat;
pub mod show_table;
