//! datanet: one POSIX namespace over every configured storage space.
//!
//! The library holds what all three tools share (the configuration in [`config`] and
//! object access in [`store`]) and the FUSE filesystem behind the `datanet` binary.

pub mod config;
pub mod journal;
pub mod posix_meta;
pub mod staging;
pub mod store;
pub mod upload;

pub use config::{Config, ConfigError, SpaceConfig};
pub use store::{open_space, Space, StoreError};
