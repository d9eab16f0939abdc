//! datanet: one POSIX namespace over every configured storage space.
//!
//! The library holds what all three tools share (the configuration in [`config`] and
//! object access in [`store`]) and the FUSE filesystem behind the `datanet` binary:
//! [`filesystem`] implements the operations on inodes without any FUSE types, and
//! [`fuse`] is the thin adapter to the pinned `fuser` version.

pub mod block_pool;
pub mod check;
pub mod config;
pub mod datacache;
pub mod dirmeta;
pub mod error;
pub mod filesystem;
pub mod fuse;
pub mod inflight;
pub mod inode;
pub mod journal;
pub mod marker;
pub mod metacache;
pub mod mount;
pub mod name;
pub mod namespace;
pub mod part_copy;
pub mod posix_meta;
pub mod prefetch;
pub mod private_dir;
pub mod sigv4;
pub mod staging;
pub mod store;
pub mod stream_upload;
pub mod upload;
pub mod walkahead;
pub mod write;

pub use config::{Config, ConfigError, SpaceConfig};
pub use store::{open_space, Space, StoreError};
