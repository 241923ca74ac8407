//! The node image, built without a container engine by `node-image/image/build.sh` (mmdebstrap,
//! umoci, skopeo): its config and layers, its agreement with `node-image/Dockerfile`, and the
//! image running — its root filesystem unpacked by umoci, dispynode started from it as the
//! image says (entrypoint, user, environment, working directory) in its own network, mount and
//! PID namespaces, and the `dispy` CLI running a Python and a program computation on it from
//! another namespace through a veth pair.
//!
//! These need root (mmdebstrap, umoci unpack, namespaces, chroot): without it each test says so
//! and returns. CI runs as root.

#[path = "common/cli.rs"]
mod cli;
#[path = "common/netns.rs"]
mod netns;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cli::{dispy_cli, repo};
use serde_json::Value;

const TAG: &str = env!("CARGO_PKG_VERSION");
const SECRET: &str = "image-test-secret";

fn is_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!(
            "SKIPPED {test}: needs root (mmdebstrap --mode=root, umoci unpack, network \
             namespaces, chroot); CI runs as root"
        );
    }
    root
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

struct Image {
    out: PathBuf,
}

impl Image {
    fn layout(&self) -> PathBuf {
        self.out.join("oci")
    }
    fn archive(&self) -> PathBuf {
        self.out.join("dispynode-image.tar")
    }
    fn blob(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        self.layout().join("blobs/sha256").join(hex)
    }
    fn json(&self, digest: &str) -> Value {
        serde_json::from_slice(&std::fs::read(self.blob(digest)).unwrap()).unwrap()
    }
    /// The manifest tagged `TAG` in the layout's index.
    fn manifest(&self) -> Value {
        let index: Value =
            serde_json::from_slice(&std::fs::read(self.layout().join("index.json")).unwrap())
                .unwrap();
        let entry = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == TAG)
            .unwrap_or_else(|| panic!("no manifest tagged {TAG} in {index}"))
            .clone();
        self.json(entry["digest"].as_str().unwrap())
    }
}

/// Builds the image once per test run, from the dispynode binary cargo built for these tests
/// (the root filesystem comes from build.sh's cache after the first build on a machine).
fn image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("node-image");
        let started = Instant::now();
        let status = Command::new("bash")
            .arg(repo().join("node-image/image/build.sh"))
            .arg("--binary")
            .arg(env!("CARGO_BIN_EXE_dispynode"))
            .arg("--relay-binary")
            .arg(env!("CARGO_BIN_EXE_dispynetrelay"))
            .arg("--scheduler-binary")
            .arg(env!("CARGO_BIN_EXE_dispyscheduler"))
            .arg("--out")
            .arg(&out)
            .status()
            .expect("bash");
        assert!(status.success(), "node-image/image/build.sh failed");
        eprintln!("image built in {:.1}s", started.elapsed().as_secs_f64());
        Image { out }
    })
}

fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `tar -tv` of a gzip layer: path -> the listing line (mode, owner, size...).
fn layer_listing(blob: &Path) -> BTreeMap<String, String> {
    run(Command::new("tar").arg("-tvzf").arg(blob))
        .lines()
        .map(|l| {
            let path = l.split_whitespace().nth(5).unwrap_or_default();
            (path.trim_start_matches("./").to_string(), l.to_string())
        })
        .collect()
}

/// The final stage of a Dockerfile: instruction -> arguments (continuation lines joined;
/// LABEL and EXPOSE collected over all their lines).
fn dockerfile_final_stage(text: &str) -> Vec<(String, String)> {
    let mut logical = vec![];
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
        } else {
            cur.push_str(t);
            logical.push(std::mem::take(&mut cur));
        }
    }
    let last_from = logical
        .iter()
        .rposition(|l| l.starts_with("FROM "))
        .expect("a FROM line");
    logical[last_from..]
        .iter()
        .filter_map(|l| {
            let (i, rest) = l.split_once(' ')?;
            Some((i.to_string(), rest.trim().to_string()))
        })
        .collect()
}

/// `key="value" key2="value 2"` -> map (the LABEL syntax the Dockerfile uses).
fn label_pairs(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let after = after.strip_prefix('"').expect("quoted label values");
        let end = after.find('"').expect("closing quote");
        out.insert(key.trim().to_string(), after[..end].to_string());
        rest = after[end + 1..].trim();
    }
    out
}

#[test]
fn image_config_and_layers_carry_user_entrypoint_ports_labels_and_python() {
    if !is_root("image_config_and_layers_carry_user_entrypoint_ports_labels_and_python") {
        return;
    }
    let image = image();
    let manifest = image.manifest();

    // Every blob is what its digest says.
    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    for d in
        std::iter::once(config_digest).chain(layers.iter().map(|l| l["digest"].as_str().unwrap()))
    {
        let data = std::fs::read(image.blob(d)).unwrap();
        assert_eq!(format!("sha256:{}", sha256_hex(&data)), d, "blob {d}");
    }

    let config = image.json(config_digest);
    let c = &config["config"];
    assert_eq!(
        (config["os"].as_str(), config["architecture"].as_str()),
        (Some("linux"), Some("amd64"))
    );
    assert_eq!(c["User"], "10001:10001", "{c}");
    assert_eq!(c["Entrypoint"], serde_json::json!(["dispynode"]));
    assert_eq!(c["Cmd"], serde_json::json!(["--daemon"]));
    let ports: BTreeSet<&str> = c["ExposedPorts"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(ports, BTreeSet::from(["9701/tcp", "9701/udp"]));
    assert_eq!(c["Labels"]["org.opencontainers.image.title"], "dispynode");
    assert_eq!(c["Labels"]["org.opencontainers.image.version"], TAG);

    // Two gzip layers: the Debian root filesystem, then the node's binaries.
    assert_eq!(layers.len(), 2, "{manifest}");
    assert_eq!(config["rootfs"]["diff_ids"].as_array().unwrap().len(), 2);
    for l in layers {
        assert_eq!(
            l["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
    }
    let base = layer_listing(&image.blob(layers[0]["digest"].as_str().unwrap()));
    for f in [
        "usr/bin/python3",
        "usr/bin/python3.11",
        "usr/lib/python3.11/json/__init__.py",
        "usr/lib/python3.11/hashlib.py",
        "etc/passwd",
    ] {
        assert!(
            base.contains_key(f),
            "{f} is not in the root filesystem layer"
        );
    }
    assert!(
        base["var/lib/dispynode/"].contains("10001/10001"),
        "{}",
        base["var/lib/dispynode/"]
    );
    let passwd = run(Command::new("tar")
        .arg("-xzOf")
        .arg(image.blob(layers[0]["digest"].as_str().unwrap()))
        .arg("./etc/passwd"));
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("dispy:x:10001:10001:") && l.ends_with(":/usr/sbin/nologin")),
        "{passwd}"
    );
    let app = layer_listing(&image.blob(layers[1]["digest"].as_str().unwrap()));
    for f in [
        "usr/local/bin/dispynode",
        "usr/local/bin/dispynetrelay",
        "usr/local/bin/dispyscheduler",
        "usr/local/bin/dispynode-healthcheck",
    ] {
        let line = app
            .get(f)
            .unwrap_or_else(|| panic!("{f} not in the app layer: {app:?}"));
        assert!(line.starts_with("-rwxr-xr-x 0/0"), "{line}");
    }

    // The Dockerfile's runtime stage says the same.
    let dockerfile = std::fs::read_to_string(repo().join("node-image/Dockerfile")).unwrap();
    let stage = dockerfile_final_stage(&dockerfile);
    let get = |i: &str| -> Vec<&str> {
        stage
            .iter()
            .filter(|(k, _)| k == i)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(get("USER"), [c["User"].as_str().unwrap()]);
    assert_eq!(get("ENTRYPOINT"), [r#"["dispynode"]"#]);
    assert_eq!(get("CMD"), [r#"["--daemon"]"#]);
    assert_eq!(get("WORKDIR"), [c["WorkingDir"].as_str().unwrap()]);
    let exposed: BTreeSet<&str> = get("EXPOSE")
        .iter()
        .flat_map(|e| e.split_whitespace())
        .collect();
    assert_eq!(exposed, ports);
    assert!(get("HEALTHCHECK")[0].ends_with(r#"CMD ["dispynode-healthcheck"]"#));
    let mut labels = BTreeMap::new();
    for l in get("LABEL") {
        labels.extend(label_pairs(l));
    }
    labels.insert(
        "org.opencontainers.image.version".into(),
        labels["org.opencontainers.image.version"].replace("${VERSION}", TAG),
    );
    let image_labels: BTreeMap<String, String> = c["Labels"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    assert_eq!(labels, image_labels);
    let version_arg = stage
        .iter()
        .find(|(k, v)| k == "ARG" && v.starts_with("VERSION="));
    assert_eq!(
        version_arg.map(|(_, v)| v.as_str()),
        Some(format!("VERSION={TAG}").as_str())
    );

    // The docker-archive has the same config and layers under the chart's image name.
    let archive_manifest: Value = serde_json::from_str(&run(Command::new("tar")
        .arg("-xOf")
        .arg(image.archive())
        .arg("manifest.json")))
    .unwrap();
    let entry = &archive_manifest[0];
    // skopeo writes the name fully qualified; `docker load` shows it as dispy/node:TAG.
    assert_eq!(
        entry["RepoTags"],
        serde_json::json!([format!("docker.io/dispy/node:{TAG}")])
    );
    assert_eq!(entry["Layers"].as_array().unwrap().len(), 2);
    let archive_config: Value = serde_json::from_str(&run(Command::new("tar")
        .arg("-xOf")
        .arg(image.archive())
        .arg(entry["Config"].as_str().unwrap())))
    .unwrap();
    assert_eq!(archive_config["rootfs"], config["rootfs"]);
    for k in [
        "User",
        "Entrypoint",
        "Cmd",
        "ExposedPorts",
        "Labels",
        "WorkingDir",
    ] {
        assert_eq!(archive_config["config"][k], c[k], "{k}");
    }
}

/// The process the image's runtime config describes, started by `unshare` in namespace `ns`.
struct Container {
    child: Child,
    log: PathBuf,
}

impl Container {
    /// The pid of the image's process (the child of `unshare --fork`).
    fn init_pid(&self) -> i32 {
        let pid = self.child.id();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
        children
            .split_whitespace()
            .next()
            .expect("unshare's child")
            .parse()
            .unwrap()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // unshare --kill-child takes the image's process with it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a container runtime does for the unpacked bundle, with unshare and chroot: new mount
/// and PID namespaces (the process is PID 1 there), /dev, /proc and a tmpfs /tmp, then the
/// runtime config's user, environment, working directory and arguments.
const RUNTIME: &str = r#"set -e
root="$1"; cwd="$2"; user="$3"; shift 3
mkdir -p "$root/dev"
mount --rbind /dev "$root/dev"
mount -t proc proc "$root/proc"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
exec chroot --userspec="$user" "$root" /usr/bin/env -i -C "$cwd" "$@"
"#;

fn start_container(ns: &str, bundle: &Path, extra_args: &[&str], log: PathBuf) -> Container {
    let spec: Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    let p = &spec["process"];
    let user = format!("{}:{}", p["user"]["uid"], p["user"]["gid"]);
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        ns,
        "unshare",
        "--mount",
        "--pid",
        "--fork",
        "--kill-child",
    ])
    .args(["sh", "-c", RUNTIME, "sh"])
    .arg(bundle.join("rootfs"))
    .arg(p["cwd"].as_str().unwrap())
    .arg(user);
    for e in p["env"].as_array().unwrap() {
        cmd.arg(e.as_str().unwrap());
    }
    for a in p["args"].as_array().unwrap() {
        cmd.arg(a.as_str().unwrap());
    }
    let child = cmd
        .args(extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Container { child, log }
}

fn status_of<'a>(items: &'a [Value], name: &str) -> &'a Value {
    &items
        .iter()
        .find(|i| i["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no job {name} in the output"))["status"]
}

#[test]
fn the_image_runs_python_and_program_jobs_from_its_own_root_filesystem() {
    if !is_root("the_image_runs_python_and_program_jobs_from_its_own_root_filesystem") {
        return;
    }
    let image = image();
    let dispy = dispy_cli();
    let net = netns::Netns::new("m");
    let bundle = net.dir.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{TAG}", image.layout().display()))
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");

    let started = Instant::now();
    let mut container = start_container(
        &net.a,
        &bundle,
        &["--name", "image-node", "--cpus", "2", "--secret", SECRET],
        net.dir.path().join("node.log"),
    );
    let log_path = container.log.clone();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // Reachable from B through the veth pair.
    let up = net.run_in(&net.b.clone(), || {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let addr = "10.231.0.1:9701".parse().unwrap();
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    });
    assert!(up, "the node from the image did not come up:\n{}", log());
    eprintln!(
        "node from the image serving after {:.2}s",
        started.elapsed().as_secs_f64()
    );

    // The image's process: the image's user, PID 1 of its own PID namespace.
    let pid = container.init_pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(field("Uid:")[0], "10001", "{status}");
    assert_eq!(field("Gid:")[0], "10001", "{status}");
    assert_eq!(field("NSpid:").last().copied(), Some("1"), "{status}");
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/root")).unwrap(),
        rootfs.canonicalize().unwrap()
    );

    // The image's health check, inside the node's network namespace and root filesystem.
    let health = |ns: &str| {
        Command::new("ip")
            .args(["netns", "exec", ns, "chroot"])
            .arg(&rootfs)
            .args(["/usr/local/bin/dispynode-healthcheck"])
            .env("DISPYNODE_HEALTH_TIMEOUT", "2")
            .output()
            .unwrap()
    };
    let h = health(&net.a);
    assert!(
        h.status.success(),
        "health check: {}",
        String::from_utf8_lossy(&h.stderr)
    );

    // dispynetrelay and dispyscheduler run from the image too (their libraries are there).
    let v = run(Command::new("chroot")
        .arg(&rootfs)
        .args(["/usr/local/bin/dispynetrelay", "--version"]));
    assert_eq!(v.trim(), format!("dispynetrelay {TAG}"));
    let v = run(Command::new("chroot")
        .arg(&rootfs)
        .args(["/usr/local/bin/dispyscheduler", "--version"]));
    assert_eq!(v.trim(), format!("dispyscheduler {TAG}"));

    // A Python computation (setup, a data file, hashlib), a program computation, and a Python
    // job that reports where it runs — all from namespace B with the dispy CLI.
    let whoami = net.dir.path().join("whoami.yaml");
    std::fs::write(
        &whoami,
        format!(
            r#"apiVersion: dispy.io/v1alpha1
kind: JobCluster
metadata: {{name: whoami}}
spec:
  computation:
    python:
      source: |
        import os, sys
        def whoami():
            return {{"uid": os.getuid(), "gid": os.getgid(), "python": sys.executable,
                    "version": list(sys.version_info[:2]), "cwd_under": os.getcwd().split("/")[1],
                    "in_image": os.path.exists("/usr/local/bin/dispynode-healthcheck"),
                    "host_repo_visible": os.path.exists({repo:?})}}
      function: whoami
---
apiVersion: dispy.io/v1alpha1
kind: DispyJob
metadata: {{name: whoami}}
spec: {{cluster: whoami}}
"#,
            repo = repo().canonicalize().unwrap().display().to_string()
        ),
    )
    .unwrap();
    let examples = repo().join("docs/examples");
    let t = Instant::now();
    let out = Command::new("ip")
        .args(["netns", "exec", &net.b])
        .arg(dispy)
        .args([
            "run",
            "-q",
            "-o",
            "json",
            "--node",
            "10.231.0.1:9701",
            "--secret",
            SECRET,
        ])
        .arg("-f")
        .arg(examples.join("checksums.yaml"))
        .arg("-f")
        .arg(examples.join("program.yaml"))
        .arg("-f")
        .arg(&whoami)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "dispy run: {}\nnode log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        log()
    );
    eprintln!(
        "dispy run (7 jobs, 3 computations) took {:.2}s",
        t.elapsed().as_secs_f64()
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 7, "{v}");
    for item in items {
        assert_eq!(item["status"]["status"], "Finished", "{item}");
        assert_eq!(item["status"]["node"], "image-node", "{item}");
    }
    let data = "The quick brown fox jumps over the lazy dog.\ndispy ships a computation to nodes and runs jobs on them.\n";
    assert_eq!(
        status_of(items, "checksums-sha256")["result"],
        sha256_hex(data.as_bytes())
    );
    let sha1 = |s: &str| {
        hex(ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, s.as_bytes()).as_ref())
    };
    let prog = status_of(items, "sha1sum-both");
    assert_eq!(prog["result"], 0);
    assert_eq!(
        prog["stdout"],
        format!("{}  a.txt\n{}  b.txt\n", sha1("alpha\n"), sha1("beta\n"))
    );
    let me = &status_of(items, "whoami")["result"];
    assert_eq!(me["uid"], 10001, "{me}");
    assert_eq!(me["gid"], 10001, "{me}");
    assert_eq!(me["python"], "/usr/bin/python3", "{me}");
    assert_eq!(me["version"], serde_json::json!([3, 11]), "{me}");
    assert_eq!(me["cwd_under"], "tmp", "{me}");
    assert_eq!(me["in_image"], true, "{me}");
    assert_eq!(me["host_repo_visible"], false, "{me}");

    // SIGTERM to the image's process (what `docker stop` and the kubelet send) stops it
    // cleanly even as PID 1; then the health check fails.
    // SAFETY: kill on a pid this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(s) = container.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the node did not stop on SIGTERM:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "exit {exit}:\n{}", log());
    assert!(log().contains("dispynode stopped"), "{}", log());
    let h = health(&net.a);
    assert!(!h.status.success(), "the health check passed with no node");
}
