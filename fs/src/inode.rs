//! The inode table: which inode number stands for which object key.
//!
//! The mount root is inode 1 and the root of space number `i` (in configuration order)
//! is inode `2 + i`. Every other entry gets [`hashed_ino`] of its space and key, so
//! readdir reports the same number as a later lookup, and an unchanged tree shows the
//! same numbers after a remount. Only when that number is taken (a hash collision, or
//! an unlinked inode of the same key that the kernel still holds) does an entry get the
//! next number of a counter instead.
//!
//! Invariant: an inode number keeps naming the same (space, key) while the kernel holds
//! a lookup reference to it or a file handle is open on it, and no two live inodes share
//! a number, so Samba and other programs that compare inode numbers see stable values.
//! A renamed entry keeps its number while held; an unlinked one is detached from its
//! key, so a new file at that key gets a different number while the old one is held.

use std::collections::HashMap;
use std::sync::Mutex;

pub const ROOT_INO: u64 = 1;

/// First inode number handed out for entries below the space roots.
const FIRST_DYNAMIC_INO: u64 = 1 << 16;

/// Maximum number of spaces whose root inodes fit below [`FIRST_DYNAMIC_INO`].
pub const MAX_SPACES: usize = (FIRST_DYNAMIC_INO - 2) as usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

/// The entry that an inode number refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The mount root, listing the spaces.
    Root,
    /// An entry of space `space`; the space root has the empty key.
    Entry { space: usize, key: String, kind: Kind },
}

#[derive(Debug)]
struct Node {
    space: usize,
    key: String,
    kind: Kind,
    lookups: u64,
    open_handles: u64,
    /// False once the key was unlinked or replaced. The node then lives only until the
    /// kernel sends the last `forget` for it.
    attached: bool,
}

#[derive(Debug, Default)]
struct Table {
    nodes: HashMap<u64, Node>,
    by_key: HashMap<(usize, String), u64>,
    next_ino: u64,
}

#[derive(Debug)]
pub struct InodeTable {
    space_count: usize,
    table: Mutex<Table>,
}

pub fn space_root_ino(space: usize) -> u64 {
    2 + space as u64
}

/// The preferred inode number of (space, key): a hash with the top bit set, so it never
/// equals a root or a counter-allocated number.
pub fn hashed_ino(space: usize, key: &str) -> u64 {
    let digest = ring::digest::digest(&ring::digest::SHA256, format!("{space}\0{key}").as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_le_bytes(bytes) | (1 << 63)
}

impl InodeTable {
    pub fn new(space_count: usize) -> Self {
        assert!(space_count <= MAX_SPACES, "too many spaces");
        InodeTable {
            space_count,
            table: Mutex::new(Table {
                next_ino: FIRST_DYNAMIC_INO,
                ..Table::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves an inode number, or `None` when the kernel passed an unknown one.
    pub fn target(&self, ino: u64) -> Option<Target> {
        if ino == ROOT_INO {
            return Some(Target::Root);
        }
        if ino >= 2 && ino < 2 + self.space_count as u64 {
            return Some(Target::Entry {
                space: (ino - 2) as usize,
                key: String::new(),
                kind: Kind::Dir,
            });
        }
        let table = self.lock();
        table.nodes.get(&ino).map(|node| Target::Entry {
            space: node.space,
            key: node.key.clone(),
            kind: node.kind,
        })
    }

    /// Returns the inode of (space, key) and counts one kernel lookup reference on it.
    /// An existing inode of another kind is detached first, because the kernel must not
    /// see a file turn into a directory under the same number.
    pub fn lookup(&self, space: usize, key: &str, kind: Kind) -> u64 {
        if key.is_empty() {
            return space_root_ino(space);
        }
        let mut table = self.lock();
        let map_key = (space, key.to_string());
        if let Some(&ino) = table.by_key.get(&map_key) {
            let node = table.nodes.get_mut(&ino).expect("by_key points to a node");
            if node.kind == kind {
                node.lookups += 1;
                return ino;
            }
            node.attached = false;
            table.by_key.remove(&map_key);
            Self::drop_if_unused(&mut table, ino);
        }

        let hashed = hashed_ino(space, key);
        let ino = if table.nodes.contains_key(&hashed) {
            let counted = table.next_ino;
            table.next_ino += 1;
            counted
        } else {
            hashed
        };
        table.nodes.insert(
            ino,
            Node {
                space,
                key: key.to_string(),
                kind,
                lookups: 1,
                open_handles: 0,
                attached: true,
            },
        );
        table.by_key.insert(map_key, ino);
        ino
    }

    /// Returns the inode currently attached to (space, key), without counting a lookup.
    pub fn peek(&self, space: usize, key: &str) -> Option<u64> {
        if key.is_empty() {
            return Some(space_root_ino(space));
        }
        self.lock().by_key.get(&(space, key.to_string())).copied()
    }

    /// Drops `count` kernel lookup references.
    pub fn forget(&self, ino: u64, count: u64) {
        let mut table = self.lock();
        if let Some(node) = table.nodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(count);
            Self::drop_if_unused(&mut table, ino);
        }
    }

    pub fn open(&self, ino: u64) {
        if let Some(node) = self.lock().nodes.get_mut(&ino) {
            node.open_handles += 1;
        }
    }

    pub fn close(&self, ino: u64) {
        let mut table = self.lock();
        if let Some(node) = table.nodes.get_mut(&ino) {
            node.open_handles = node.open_handles.saturating_sub(1);
            Self::drop_if_unused(&mut table, ino);
        }
    }

    /// Detaches the inode of an unlinked key; open handles keep working on it.
    pub fn unlink(&self, space: usize, key: &str) {
        let mut table = self.lock();
        if let Some(ino) = table.by_key.remove(&(space, key.to_string())) {
            if let Some(node) = table.nodes.get_mut(&ino) {
                node.attached = false;
            }
            Self::drop_if_unused(&mut table, ino);
        }
    }

    /// Moves `from` and every key below it to `to`, keeping their inode numbers. An
    /// inode attached to `to` before (the replaced entry) is detached.
    pub fn rename(&self, space: usize, from: &str, to: &str) {
        let mut table = self.lock();
        if let Some(replaced) = table.by_key.remove(&(space, to.to_string())) {
            if let Some(node) = table.nodes.get_mut(&replaced) {
                node.attached = false;
            }
            Self::drop_if_unused(&mut table, replaced);
        }

        let from_dir = format!("{from}/");
        let moved: Vec<(String, u64)> = table
            .by_key
            .iter()
            .filter(|((s, key), _)| *s == space && (key == from || key.starts_with(&from_dir)))
            .map(|((_, key), ino)| (key.clone(), *ino))
            .collect();
        for (old_key, ino) in moved {
            let new_key = format!("{to}{}", &old_key[from.len()..]);
            table.by_key.remove(&(space, old_key));
            table.by_key.insert((space, new_key.clone()), ino);
            if let Some(node) = table.nodes.get_mut(&ino) {
                node.key = new_key;
            }
        }
    }

    fn drop_if_unused(table: &mut Table, ino: u64) {
        let Some(node) = table.nodes.get(&ino) else { return };
        if node.lookups > 0 || node.open_handles > 0 {
            return;
        }
        let map_key = (node.space, node.key.clone());
        if node.attached && table.by_key.get(&map_key) == Some(&ino) {
            table.by_key.remove(&map_key);
        }
        table.nodes.remove(&ino);
    }

    /// Number of inodes held, for tests and `statfs`.
    pub fn len(&self) -> usize {
        self.lock().nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_stable_while_referenced() {
        let table = InodeTable::new(1);
        let a = table.lookup(0, "dir/a", Kind::File);
        assert_eq!(table.lookup(0, "dir/a", Kind::File), a);
        table.forget(a, 1);
        assert_eq!(table.peek(0, "dir/a"), Some(a));
        table.forget(a, 1);
        assert_eq!(table.peek(0, "dir/a"), None);
        assert_eq!(table.lookup(0, "dir/a", Kind::File), a, "the same key gets the same number again");
        assert_eq!(a, hashed_ino(0, "dir/a"));
    }

    #[test]
    fn held_detached_inode_not_shared() {
        let table = InodeTable::new(1);
        let old = table.lookup(0, "f", Kind::File);
        table.open(old);
        table.unlink(0, "f");
        let new = table.lookup(0, "f", Kind::File);
        assert_ne!(new, old, "an unlinked file still open keeps its number to itself");
        assert!(table.target(old).is_some());
    }

    #[test]
    fn open_handle_keeps_inode() {
        let table = InodeTable::new(1);
        let a = table.lookup(0, "a", Kind::File);
        table.open(a);
        table.forget(a, 1);
        assert!(table.target(a).is_some());
        table.close(a);
        assert!(table.target(a).is_none());
    }

    #[test]
    fn rename_moves_descendants() {
        let table = InodeTable::new(1);
        let dir = table.lookup(0, "d", Kind::Dir);
        let child = table.lookup(0, "d/x", Kind::File);
        let other = table.lookup(0, "dd", Kind::File);
        table.rename(0, "d", "e");
        assert_eq!(table.peek(0, "e"), Some(dir));
        assert_eq!(table.peek(0, "e/x"), Some(child));
        assert_eq!(table.peek(0, "dd"), Some(other));
        assert_eq!(
            table.target(child),
            Some(Target::Entry { space: 0, key: "e/x".into(), kind: Kind::File })
        );
    }

    #[test]
    fn kind_change_gets_new_inode() {
        let table = InodeTable::new(1);
        let file = table.lookup(0, "x", Kind::File);
        let dir = table.lookup(0, "x", Kind::Dir);
        assert_ne!(file, dir);
        assert_eq!(table.peek(0, "x"), Some(dir));
    }

    #[test]
    fn roots_are_fixed() {
        let table = InodeTable::new(3);
        assert_eq!(table.target(ROOT_INO), Some(Target::Root));
        assert_eq!(table.lookup(2, "", Kind::Dir), 4);
        assert!(table.target(5).is_none());
    }
}
