//! Bare-metal packaging: the systemd unit `node-image/dispynode.service` and its environment
//! file `node-image/dispynode.env`.

#[path = "common/netns.rs"]
mod netns;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn unit_text() -> String {
    std::fs::read_to_string(repo().join("node-image/dispynode.service")).unwrap()
}

/// `[Service]` keys of the unit (a key given twice keeps its values in order).
fn service_section(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut section = "";
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            section = line;
            continue;
        }
        if section == "[Service]" {
            let (k, v) = line.split_once('=').expect("key=value");
            out.entry(k.to_string()).or_default().push(v.to_string());
        }
    }
    out
}

/// KEY=value lines of an environment file (quotes removed), as systemd reads them.
fn env_file(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("KEY=value");
            (k.to_string(), v.trim_matches('"').to_string())
        })
        .collect()
}

#[test]
fn the_unit_restarts_on_failure_reads_its_options_and_runs_sandboxed_as_dispy() {
    let s = service_section(&unit_text());
    let one = |k: &str| -> &str {
        match s.get(k).map(Vec::as_slice) {
            Some([v]) => v,
            other => panic!("{k}: {other:?}"),
        }
    };
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("EnvironmentFile"), "-/etc/default/dispynode");
    assert_eq!(one("User"), "dispy");
    assert!(one("ExecStart").starts_with("/usr/local/bin/dispynode --daemon "));
    assert!(one("ExecStart").ends_with(" $DISPYNODE_OPTS"));
    assert_eq!(one("KillMode"), "mixed");
    for k in [
        "NoNewPrivileges",
        "ProtectKernelModules",
        "RestrictSUIDSGID",
        "PrivateTmp",
    ] {
        assert_eq!(one(k), "yes", "{k}");
    }
    assert_eq!(one("ProtectSystem"), "full");
    assert_eq!(one("CapabilityBoundingSet"), "");
    // Jobs fork, exec and may run JIT-compiled code; a node must see its interfaces.
    for k in [
        "MemoryDenyWriteExecute",
        "PrivateNetwork",
        "RestrictNamespaces",
        "SystemCallFilter",
    ] {
        assert!(!s.contains_key(k), "{k} would stop ordinary jobs");
    }
    assert!(one("RestrictAddressFamilies").contains("AF_NETLINK"));
    // The secret travels in the environment, not on the command line.
    let env = env_file(&std::fs::read_to_string(repo().join("node-image/dispynode.env")).unwrap());
    assert!(env.contains_key("DISPYNODE_SECRET"), "{env:?}");
    assert!(!env["DISPYNODE_OPTS"].contains("--secret"));
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("SKIPPED systemd_analyze_verifies_the_unit: systemd-analyze is not installed");
        return;
    };
    assert!(version.status.success());
    // A root with the unit, the binary where ExecStart says, and the host's own units (the
    // unit's dependencies). systemd-analyze exits 0 on unknown keys and bad values but prints
    // them, so any output fails the test.
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for d in [
        "usr/local/bin",
        "etc/systemd/system",
        "etc/default",
        "usr/lib/systemd",
    ] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    std::fs::copy(
        env!("CARGO_BIN_EXE_dispynode"),
        r.join("usr/local/bin/dispynode"),
    )
    .unwrap();
    std::fs::copy(
        repo().join("node-image/dispynode.service"),
        r.join("etc/systemd/system/dispynode.service"),
    )
    .unwrap();
    std::fs::copy(
        repo().join("node-image/dispynode.env"),
        r.join("etc/default/dispynode"),
    )
    .unwrap();
    let cp = Command::new("cp")
        .args(["-r", "/usr/lib/systemd/system"])
        .arg(r.join("usr/lib/systemd/"))
        .status()
        .unwrap();
    assert!(cp.success());
    let out = Command::new("systemd-analyze")
        .args(["verify", "--root"])
        .arg(r)
        .arg("dispynode.service")
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

#[test]
fn the_units_command_line_with_its_env_file_starts_a_node() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "SKIPPED the_units_command_line_with_its_env_file_starts_a_node: needs root (a \
             private network namespace, so the node's announcement stays off the host's \
             interfaces); CI runs as root"
        );
        return;
    }
    // ExecStart with %S and $DISPYNODE_OPTS expanded as systemd does.
    let s = service_section(&unit_text());
    let env = env_file(&std::fs::read_to_string(repo().join("node-image/dispynode.env")).unwrap());
    let mut net = netns::Netns::new("u");
    let state = net.dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let exec = s["ExecStart"][0].replace("%S/dispynode", state.to_str().unwrap());
    let mut argv: Vec<String> = vec![];
    for word in exec.split_whitespace() {
        match word {
            "$DISPYNODE_OPTS" => {
                argv.extend(env["DISPYNODE_OPTS"].split_whitespace().map(str::to_string))
            }
            w => argv.push(w.to_string()),
        }
    }
    assert_eq!(argv[0], "/usr/local/bin/dispynode");
    let log = net.dir.path().join("node.log");
    let child = Command::new("ip")
        .args(["netns", "exec", &net.a])
        .arg(env!("CARGO_BIN_EXE_dispynode"))
        .args(&argv[1..])
        .env("DISPYNODE_SECRET", "unit-secret")
        .stdin(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    net.children.push(child);
    let up = net.run_in(&net.a.clone(), || {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect("127.0.0.1:9701").is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    });
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(up, "the node did not serve on 9701:\n{text}");
    // The state directory is the computations' prefix (the log's field, colours aside).
    assert!(
        text.contains("dest_path_prefix") && text.contains(state.to_str().unwrap()),
        "{text}"
    );
}
