//! The image map: which local executable stands for which container image.
//!
//! ```yaml
//! # image name (no tag, no digest) -> executable, or [executable, fixed args...]
//! dispy/node: ${CARGO_TARGET_DIR:-../target}/debug/dispynode
//! e2e/python: [python3, -u]
//! ```
//! Relative paths are relative to the map file's directory; a bare name
//! (`python3`) is looked up on PATH when the container starts.
//! `${VAR}` and `${VAR:-default}` are expanded from the kubelet's environment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

#[derive(Debug, Clone, PartialEq)]
pub struct Entrypoint {
    pub program: String,
    pub args: Vec<String>,
}

#[derive(Debug, Default)]
pub struct ImageMap {
    file: PathBuf,
    entries: BTreeMap<String, Entrypoint>,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Value {
    One(String),
    Many(Vec<String>),
}

impl ImageMap {
    pub fn load(file: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading image map {}", file.display()))?;
        let base = file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
            .canonicalize()
            .unwrap_or_default();
        Self::parse(&text, &base, file, |k| std::env::var(k).ok())
    }

    pub fn parse(
        text: &str,
        base: &Path,
        file: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Self> {
        let raw: BTreeMap<String, Value> = serde_yaml::from_str(text).with_context(|| {
            format!(
                "image map {}: expected `image: executable` lines",
                file.display()
            )
        })?;
        let mut entries = BTreeMap::new();
        for (image, v) in raw {
            let mut words = match v {
                Value::One(s) => vec![s],
                Value::Many(v) => v,
            };
            anyhow::ensure!(
                !words.is_empty(),
                "image map {}: {image} maps to an empty command",
                file.display()
            );
            let first = expand(&words.remove(0), &env);
            let program = if first.contains('/') && !first.starts_with('/') {
                base.join(first).to_string_lossy().into_owned()
            } else {
                first
            };
            let args = words.iter().map(|w| expand(w, &env)).collect();
            entries.insert(normalize(&image), Entrypoint { program, args });
        }
        Ok(Self {
            file: file.to_path_buf(),
            entries,
        })
    }

    /// The entrypoint of `image`, which may carry a tag, a digest and a registry.
    pub fn lookup(&self, image: &str) -> anyhow::Result<&Entrypoint> {
        let name = normalize(image);
        if let Some(e) = self.entries.get(&name) {
            return Ok(e);
        }
        // registry.example/dispy/node -> dispy/node
        if let Some((first, rest)) = name.split_once('/') {
            if first.contains('.') || first.contains(':') || first == "localhost" {
                if let Some(e) = self.entries.get(rest) {
                    return Ok(e);
                }
            }
        }
        anyhow::bail!(
            "image {image:?} has no entry in the image map {} (known: {})",
            self.file.display(),
            self.entries.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    }
}

/// Drops the digest and the tag: `reg:5000/a/b:1.0@sha256:..` -> `reg:5000/a/b`.
fn normalize(image: &str) -> String {
    let image = image.split('@').next().unwrap_or(image);
    let last_slash = image.rfind('/').map(|i| i + 1).unwrap_or(0);
    match image[last_slash..].find(':') {
        Some(colon) => image[..last_slash + colon].to_string(),
        None => image.to_string(),
    }
}

fn expand(s: &str, env: &impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}') else {
            out.push_str(&rest[start..]);
            return out;
        };
        let inner = &rest[start + 2..start + end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        match env(name).filter(|v| !v.is_empty()) {
            Some(v) => out.push_str(&v),
            None => out.push_str(default.unwrap_or("")),
        }
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(text: &str) -> ImageMap {
        ImageMap::parse(
            text,
            Path::new("/repo/e2e"),
            Path::new("images.yaml"),
            |k| (k == "T").then(|| "/t".to_string()),
        )
        .unwrap()
    }

    #[test]
    fn tags_digests_and_registries_are_ignored() {
        let m = map("dispy/node: ${T}/debug/dispynode\n");
        for image in [
            "dispy/node",
            "dispy/node:0.1.0",
            "dispy/node@sha256:abc",
            "ghcr.io/dispy/node:latest",
            "localhost:5000/dispy/node:1",
        ] {
            assert_eq!(
                m.lookup(image).unwrap().program,
                "/t/debug/dispynode",
                "{image}"
            );
        }
        assert!(m.lookup("other/node").is_err());
    }

    #[test]
    fn relative_paths_defaults_and_lists() {
        let m = map("a: ${NOPE:-../target}/x\nb: [python3, -u]\n");
        assert_eq!(m.lookup("a").unwrap().program, "/repo/e2e/../target/x");
        let b = m.lookup("b:3").unwrap();
        assert_eq!(
            (b.program.as_str(), b.args.clone()),
            ("python3", vec!["-u".to_string()])
        );
    }
}
