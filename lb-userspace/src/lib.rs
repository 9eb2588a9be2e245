//! lb's userspace: configuration, the Maglev table builder, the data-plane loader and writer.
pub mod dataplane;
pub mod maglev;
