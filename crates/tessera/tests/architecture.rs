//! DESIGN §10's layering rule, enforced: the pure crates (types, crypto, usig, core, kv) never
//! depend on IO, clocks or randomness, and no pure crate depends on an IO crate. This test fails
//! the build when such a dependency creeps in, directly or transitively.

use std::path::{Path, PathBuf};
use std::process::Command;

const PURE: &[&str] = &[
    "tessera-types",
    "tessera-crypto",
    "tessera-usig",
    "tessera-core",
    "tessera-kv",
];
const IO_CRATES: &[&str] = &[
    "tessera-node",
    "tessera-client",
    "tessera",
    "tessera-usigd",
    "tessera-tpm",
];
/// Packages that bring sockets, async runtimes, clocks, storage engines or OS randomness.
const FORBIDDEN: &[&str] = &[
    "tokio",
    "mio",
    "socket2",
    "async-std",
    "getrandom",
    "rand",
    "chrono",
    "time",
    "redb",
    "sled",
    "rocksdb",
    "nix",
];
/// Source patterns that would read the clock, touch the network or files, spawn threads or draw
/// OS randomness inside a pure crate.
const FORBIDDEN_SOURCE: &[&str] = &[
    "std::net",
    "std::fs",
    "std::time",
    "std::thread",
    "std::process",
    "Instant::now",
    "SystemTime",
    "OsRng",
    "thread_rng",
    "std::env",
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn host_target() -> String {
    let output = Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc -vV runs");
    let text = String::from_utf8(output.stdout).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .to_string()
}

/// Runs `cargo tree --offline -p <package> <args>` for the host platform and returns its output.
fn cargo_tree(package: &str, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO"))
        .args(["tree", "--offline", "-p", package])
        .args(args)
        .args(["--target", &host_target()])
        .current_dir(workspace_root())
        .output()
        .expect("cargo tree runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Normal (non-dev, non-build) dependencies of one package, resolved for that package alone on
/// the host platform — what actually links into it.
fn dependencies_of(package: &str) -> Vec<String> {
    cargo_tree(
        package,
        &["-e", "normal", "--prefix", "none", "--format", "{p}"],
    )
    .lines()
    .filter_map(|line| line.split_whitespace().next().map(str::to_string))
    .collect()
}

#[test]
fn pure_crates_have_no_io_dependencies() {
    for pure in PURE {
        let dependencies = dependencies_of(pure);
        assert!(
            dependencies.iter().any(|name| name == pure),
            "cargo tree listed {pure} itself"
        );
        for name in &dependencies {
            assert!(
                !FORBIDDEN.contains(&name.as_str()),
                "pure crate {pure} depends (transitively) on {name}"
            );
            assert!(
                !IO_CRATES.contains(&name.as_str()),
                "pure crate {pure} depends on IO crate {name}"
            );
        }
    }
}

#[test]
fn the_check_would_catch_an_io_dependency() {
    // The IO crates do depend on tokio: if this ever stops being seen, the check above is blind.
    assert!(dependencies_of("tessera-node")
        .iter()
        .any(|name| name == "tokio"));
}

#[test]
fn pure_crates_do_not_reach_for_io_in_source() {
    for pure in PURE {
        let source = workspace_root().join("crates").join(pure).join("src");
        let mut files = vec![source];
        while let Some(path) = files.pop() {
            if path.is_dir() {
                files.extend(
                    std::fs::read_dir(&path)
                        .unwrap()
                        .map(|entry| entry.unwrap().path()),
                );
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for pattern in FORBIDDEN_SOURCE {
                assert!(!text.contains(pattern), "{} uses {pattern}", path.display());
            }
        }
    }
}

/// The planted-bug catalogue (issue 3) must never reach a production build: resolved for the
/// `tessera` binary alone, no crate may have the `planted-bugs` feature on.
#[test]
fn production_builds_never_enable_planted_bugs() {
    let tree = cargo_tree("tessera", &["-e", "normal,features", "--prefix", "none"]);
    assert!(
        tree.contains("tessera-core"),
        "the tree must list the core: {tree}"
    );
    assert!(
        !tree.contains("planted-bugs"),
        "a production dependency enables planted-bugs:\n{tree}"
    );
}
