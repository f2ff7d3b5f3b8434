//! The previous release's agent, built from the git history: the last
//! commit whose map layout is `LAYOUT_VERSION - 1`, the layout an upgrade
//! starts from. Built once into `target/previous-layout/<commit>/` (its
//! own target directory, removed after the build; the binary is kept).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

const LAYOUT_LINE: &str = "pub const LAYOUT_VERSION: u32 = ";
const LAYOUT_FILE: &str = "lb-common/src/lib.rs";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn git(args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo_root())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("git {args:?}: {e}"));
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn layout_at(commit: &str) -> u32 {
    let text = git(&["show", &format!("{commit}:{LAYOUT_FILE}")]);
    let line = text
        .lines()
        .find(|l| l.starts_with(LAYOUT_LINE))
        .unwrap_or_else(|| panic!("{LAYOUT_FILE} at {commit} declares no layout version"));
    line[LAYOUT_LINE.len()..]
        .trim_end_matches(';')
        .parse()
        .unwrap_or_else(|e| panic!("layout version at {commit}: {e}"))
}

/// The last commit with layout `LAYOUT_VERSION - 1`: the parent of the
/// commit that introduced the current version.
pub fn previous_layout_commit() -> (String, u32) {
    let current = lb_common::LAYOUT_VERSION;
    let line = format!("{LAYOUT_LINE}{current};");
    // Commits that added or removed the line, newest first: the oldest introduced it.
    let commits = git(&[
        "log",
        "--format=%H",
        &format!("-S{line}"),
        "--",
        LAYOUT_FILE,
    ]);
    let introduced = commits.lines().last().unwrap_or_else(|| {
        panic!(
            "no commit introduces layout {current} in this clone's history \
             (a shallow clone? the upgrade test builds the previous release from git)"
        )
    });
    let previous = git(&["rev-parse", &format!("{introduced}^")]);
    let version = layout_at(&previous);
    assert_eq!(
        version,
        current - 1,
        "{previous} (before {introduced}) has layout {version}"
    );
    (previous, version)
}

/// Path of the previous release's `lb-agent`, building it if needed.
pub fn previous_agent() -> (PathBuf, String, u32) {
    let (commit, version) = previous_layout_commit();
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/
    let target = exe.ancestors().nth(3).expect("target dir").to_path_buf();
    let dir = target.join("previous-layout").join(&commit[..12]);
    let bin = dir.join("lb-agent");
    if bin.exists() {
        return (bin, commit, version);
    }
    let src = dir.join("src");
    let _ = fs::remove_dir_all(&src);
    fs::create_dir_all(&src).expect("source dir");
    let mut archive = Command::new("git")
        .arg("-C")
        .arg(repo_root())
        .args(["archive", "--format=tar", &commit])
        .stdout(Stdio::piped())
        .spawn()
        .expect("git archive");
    let status = Command::new("tar")
        .args(["-x", "-C"])
        .arg(&src)
        .stdin(archive.stdout.take().expect("archive stdout"))
        .status()
        .expect("tar");
    let archived = archive.wait().expect("git archive");
    assert!(
        status.success() && archived.success(),
        "unpacking {commit} failed"
    );
    let build_target = dir.join("target");
    println!(
        "building the layout-{version} agent from {commit} (once; kept in {})",
        dir.display()
    );
    let status = Command::new(env!("CARGO"))
        .current_dir(&src)
        .args(["build", "--locked", "-p", "lb-agent", "--bin", "lb-agent"])
        .env("CARGO_TARGET_DIR", &build_target)
        // Not this build's settings.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .expect("cargo build of the previous release");
    assert!(status.success(), "building lb-agent at {commit} failed");
    fs::copy(build_target.join("debug").join("lb-agent"), &bin).expect("keep the binary");
    // Its target directory is a gigabyte: only the binary is needed.
    let _ = fs::remove_dir_all(&build_target);
    let _ = fs::remove_dir_all(&src);
    (bin, commit, version)
}
