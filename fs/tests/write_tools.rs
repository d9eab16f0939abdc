//! Everyday tools writing onto a real kernel mount over Garage: rsync -a, tar x, git and
//! sqlite3. Needs the service stack (`scripts/stack.sh up`) and the tools that
//! scripts/setup.sh installs.

mod write_support;

use std::os::unix::fs::MetadataExt;

use write_support::mount::{require_tool, sh, sh_status, Mounted, MountSettings};
use write_support::stack_garage;

fn mount(test: &str) -> Mounted {
    Mounted::start(&stack_garage(), test, MountSettings::default())
}

#[test]
fn rsync_archive_keeps_attributes() {
    require_tool("rsync");
    let mut m = mount("rsync");
    let work = m.root.path().to_path_buf();
    let dst = m.path("dst");
    sh(&work, "mkdir -p src/sub; echo 1 > src/a; echo 2 > src/sub/b; chmod 640 src/a; \
               touch -d '2020-01-02 03:04:05 UTC' src/a src/sub");
    sh(&work, &format!("rsync -a src/ '{}/'", dst.display()));
    assert_eq!(sh(&work, &format!("stat -c '%a %Y' '{}/a'", dst.display())), "640 1577934245\n");
    assert_eq!(sh(&work, &format!("stat -c '%Y' '{}/sub'", dst.display())), "1577934245\n");

    let again = sh(&work, &format!("rsync -ai src/ '{}/'", dst.display()));
    assert_eq!(again, "", "a second run transferred something");

    m.remount();
    assert_eq!(sh(&work, &format!("stat -c '%a %Y' '{}/a'", dst.display())), "640 1577934245\n");
    assert_eq!(sh(&work, &format!("stat -c '%Y' '{}/sub'", dst.display())), "1577934245\n");
    assert_eq!(std::fs::read_to_string(dst.join("sub/b")).unwrap(), "2\n");
    sh(&work, &format!("ls -ld '{}'", m.mountpoint.display()));
}

#[test]
fn tar_extract_keeps_dirs() {
    let mut m = mount("tar");
    let work = m.root.path().to_path_buf();
    sh(&work, "mkdir -p t/top/mid/leaf; echo f > t/top/mid/leaf/f; chmod 750 t/top; \
               touch -d '2019-05-06 07:08:09 UTC' t/top t/top/mid; tar -C t -cf t.tar top");
    sh(&work, &format!("tar -C '{}' -xpf t.tar", m.path("").display()));
    let expected = "750 1557126489\n755 1557126489\n";
    let stat = format!("stat -c '%a %Y' '{0}/top' '{0}/top/mid'", m.path("").display());
    assert_eq!(sh(&work, &stat), expected);
    m.remount();
    assert_eq!(sh(&work, &stat), expected);
    assert_eq!(std::fs::read_to_string(m.path("top/mid/leaf/f")).unwrap(), "f\n");
}

/// A real source tree: every file, mode and mtime survives tar x onto the mount.
#[test]
fn tar_extract_source_tree() {
    let mut m = mount("tartree");
    let work = m.root.path().to_path_buf();
    // A generated tree with nested directories, executables, symlinks and empty files.
    sh(&work, "mkdir -p src; cd src; for d in a b c/d c/e/f; do mkdir -p $d; \
               for i in 1 2 3; do seq 1 $((i * 300)) > $d/file$i.c; done; done; \
               printf '#!/bin/sh\\necho hi\\n' > run.sh; chmod 755 run.sh; : > empty; \
               ln -s c/d/file1.c link.c; chmod 600 a/file2.c; \
               touch -d '2018-01-01 00:00:00 UTC' a/file1.c; cd ..; tar -cf tree.tar -C src .");
    std::fs::create_dir(m.path("tree")).unwrap();
    sh(&work, &format!("tar -C '{}' -xpf tree.tar", m.path("tree").display()));
    m.remount();

    // Directory sizes differ between filesystems, so only non-directories show theirs.
    let listing = "find . \\( -type d -printf '%y %m %p\\n' \\) -o -printf '%y %m %s %p %l\\n' | sort";
    let original = sh(&work.join("src"), listing);
    let mounted = sh(&m.path("tree"), listing);
    assert_eq!(mounted, original);
    // tar keeps whole seconds.
    let mtimes = "find . -type f -printf '%T@ %p\\n' | sed 's/[.][0-9]* / /' | sort";
    assert_eq!(sh(&m.path("tree"), mtimes), sh(&work.join("src"), mtimes));
    sh(&work, &format!("diff -r src '{}'", m.path("tree").display()));
}

#[test]
fn git_on_mount() {
    require_tool("git");
    let m = mount("git");
    let dir = m.path("");
    sh(&dir, "git init -q repo");
    let repo = m.path("repo");
    sh(&repo, "git config user.email t@example.invalid; git config user.name t; \
               echo hello > a.txt; git add a.txt; git commit -qm first; \
               mkdir sub; echo two > sub/b.txt; chmod +x sub/b.txt; git add -A; git commit -qm second");
    assert!(!repo.join(".git/index.lock").exists());
    assert_eq!(sh(&repo, "git status --porcelain"), "");
    sh(&repo, "git fsck --no-progress");

    sh(&dir, &format!("git clone -q '{}' clone", repo.display()));
    assert_eq!(sh(&m.path("clone"), "git log --format=%s"), "second\nfirst\n");
    assert_eq!(sh(&m.path("clone"), "git status --porcelain"), "");
    let mode = std::fs::metadata(m.path("clone/sub/b.txt")).unwrap().mode();
    assert_eq!(mode & 0o111, 0o111, "executable bit lost in the clone");
}

#[test]
fn sqlite_on_mount() {
    require_tool("sqlite3");
    let mut m = mount("sqlite");
    let dir = m.path("");
    sh(&dir, "sqlite3 db.sqlite 'create table t(id integer primary key, v text);' \
               'insert into t(v) select hex(randomblob(100)) from generate_series(1, 2000);' 2>/dev/null \
               || sqlite3 db.sqlite 'create table t(id integer primary key, v text);' \
               'with recursive n(i) as (select 1 union all select i + 1 from n where i < 2000) insert into t(v) select hex(randomblob(100)) from n;'");
    sh(&dir, "sqlite3 db.sqlite 'update t set v = \"x\" where id % 7 = 0; delete from t where id > 1900;'");
    m.remount();
    assert_eq!(sh(&dir, "sqlite3 db.sqlite 'pragma integrity_check; select count(*) from t; select count(*) from t where v = \"x\";'"), "ok\n1900\n271\n");
    let (code, _, _) = sh_status(&dir, "ls db.sqlite-journal");
    assert_ne!(code, 0, "the rollback journal was left behind");
}
