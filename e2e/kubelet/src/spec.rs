//! Turning a pod's container into a process: volumes materialised on disk,
//! the environment resolved, mount paths rewritten.
//!
//! How a program sees its mounts (also in e2e/README.md):
//! - each volume is a directory `<pod dir>/volumes/<volume name>`;
//! - each container gets `<pod dir>/containers/<container>/root`, a stand-in
//!   for the container's `/`: every `mountPath` M is a symlink
//!   `root/M -> <volume dir>[/subPath]`, and the process finds that directory
//!   in `$CONTAINER_ROOT`;
//! - any command, args, env value or `workingDir` that is a mount path or
//!   starts with `M/` (also after `=`, as in `--config=/etc/app/x`) is
//!   rewritten to the host path, so `cat /etc/app/x` with a ConfigMap at
//!   `/etc/app` works unchanged; paths inside files are not rewritten.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, KeyToPath, ObjectFieldSelector, Pod, Secret,
    ServiceAccount,
};
use kube::api::PostParams;
use kube::Api;

use crate::Context;

pub const SERVICE_ACCOUNT_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Directories of one pod.
#[derive(Debug, Clone)]
pub struct PodDir(pub PathBuf);

impl PodDir {
    pub fn new(root: &Path, pod: &Pod) -> Self {
        let m = &pod.metadata;
        PodDir(root.join("pods").join(format!(
            "{}_{}_{}",
            m.namespace.as_deref().unwrap_or("default"),
            m.name.as_deref().unwrap_or("?"),
            m.uid.as_deref().unwrap_or("?")
        )))
    }
    pub fn volume(&self, name: &str) -> PathBuf {
        self.0.join("volumes").join(name)
    }
    pub fn container_root(&self, container: &str) -> PathBuf {
        self.0.join("containers").join(container).join("root")
    }
    pub fn log(&self, container: &str) -> PathBuf {
        self.0.join("containers").join(container).join("output.log")
    }
}

/// The program `command[0]` names in an image whose entrypoint is `entry`: the entrypoint
/// itself when it names that file, another program of the image when the entrypoint's
/// directory has one of that name (an image holds several, e.g. dispynode and
/// dispyscheduler), else `command[0]` as written (an absolute path, or looked up on PATH).
fn image_program(entry: &str, first: &str) -> String {
    let entry = Path::new(entry);
    let Some(base) = Path::new(first).file_name() else {
        return first.to_string();
    };
    if entry.file_name() == Some(base) {
        return entry.to_string_lossy().into_owned();
    }
    match entry.parent().map(|d| d.join(base)) {
        Some(sibling) if sibling.is_file() => sibling.to_string_lossy().into_owned(),
        _ => first.to_string(),
    }
}

/// What to exec for one container.
#[derive(Debug, Clone)]
pub struct Launch {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
}

fn ns(pod: &Pod) -> String {
    pod.metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into())
}

async fn config_map(
    ctx: &Context,
    pod: &Pod,
    name: &str,
    optional: bool,
) -> anyhow::Result<Option<ConfigMap>> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns(pod));
    match api.get_opt(name).await? {
        Some(cm) => Ok(Some(cm)),
        None if optional => Ok(None),
        None => bail!("configmap \"{name}\" not found"),
    }
}

async fn secret(
    ctx: &Context,
    pod: &Pod,
    name: &str,
    optional: bool,
) -> anyhow::Result<Option<Secret>> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns(pod));
    match api.get_opt(name).await? {
        Some(s) => Ok(Some(s)),
        None if optional => Ok(None),
        None => bail!("secret \"{name}\" not found"),
    }
}

fn config_map_entries(cm: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (k, v) in cm.data.iter().flatten() {
        out.insert(k.clone(), v.clone().into_bytes());
    }
    for (k, v) in cm.binary_data.iter().flatten() {
        out.insert(k.clone(), v.0.clone());
    }
    out
}

fn secret_entries(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    s.data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect()
}

/// A field of the pod as `fieldRef` names it (env and downward API).
pub fn field(
    pod: &Pod,
    sel: &ObjectFieldSelector,
    pod_ip: &str,
    host_ip: &str,
) -> anyhow::Result<String> {
    let m = &pod.metadata;
    let path = sel.field_path.as_str();
    let map_key = |prefix: &str, map: &Option<BTreeMap<String, String>>| -> Option<String> {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(
            map.as_ref()
                .and_then(|m| m.get(key))
                .cloned()
                .unwrap_or_default(),
        )
    };
    let fmt_map = |map: &Option<BTreeMap<String, String>>| -> String {
        map.iter()
            .flatten()
            .map(|(k, v)| format!("{k}={}\n", serde_json::to_string(v).unwrap_or_default()))
            .collect()
    };
    Ok(match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => ns(pod),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "metadata.labels" => fmt_map(&m.labels),
        "metadata.annotations" => fmt_map(&m.annotations),
        "spec.nodeName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default(),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" | "status.podIPs" => pod_ip.to_string(),
        "status.hostIP" | "status.hostIPs" => host_ip.to_string(),
        _ => {
            if let Some(v) = map_key("metadata.labels['", &m.labels) {
                v
            } else if let Some(v) = map_key("metadata.annotations['", &m.annotations) {
                v
            } else {
                bail!("fieldRef {path:?} is not supported by the process kubelet")
            }
        }
    })
}

fn write_file(dir: &Path, rel: &str, data: &[u8], mode: Option<i32>) -> anyhow::Result<()> {
    if rel.split('/').any(|c| c == "..") || rel.starts_with('/') {
        bail!("refusing path {rel:?} outside the volume");
    }
    let path = dir.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if std::fs::read(&path).is_ok_and(|now| now == data) {
        return Ok(());
    }
    // Written beside and renamed over: a program reading the file while it is refreshed sees
    // the old content or the new, never a part.
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!("..{name}.tmp"));
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(
        &tmp,
        std::fs::Permissions::from_mode(mode.unwrap_or(0o644) as u32 & 0o777),
    )?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Rewrites the files of the pod's ConfigMap and Secret volumes whose objects changed since
/// the pod started, as a kubelet's periodic sync does (a kubelet takes up to a minute or so;
/// this one the refresh interval). Keys removed from the object stay on disk.
pub async fn refresh_volumes(ctx: &Context, pod: &Pod, dir: &PodDir) -> anyhow::Result<()> {
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
    for v in volumes.into_iter().flatten() {
        let what = format!("volume {:?}", v.name);
        let path = dir.volume(&v.name);
        if let Some(c) = &v.config_map {
            if let Some(cm) = config_map(ctx, pod, &c.name, true).await? {
                write_entries(
                    &path,
                    &config_map_entries(&cm),
                    &c.items,
                    c.default_mode,
                    &what,
                )?;
            }
        } else if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            if let Some(sec) = secret(ctx, pod, &name, true).await? {
                write_entries(
                    &path,
                    &secret_entries(&sec),
                    &s.items,
                    s.default_mode,
                    &what,
                )?;
            }
        }
    }
    Ok(())
}

fn write_entries(
    dir: &Path,
    entries: &BTreeMap<String, Vec<u8>>,
    items: &Option<Vec<KeyToPath>>,
    default_mode: Option<i32>,
    what: &str,
) -> anyhow::Result<()> {
    match items {
        None => {
            for (k, v) in entries {
                write_file(dir, k, v, default_mode)?;
            }
        }
        Some(items) => {
            for it in items {
                let v = entries
                    .get(&it.key)
                    .ok_or_else(|| anyhow!("{what} has no key {:?}", it.key))?;
                write_file(dir, &it.path, v, it.mode.or(default_mode))?;
            }
        }
    }
    Ok(())
}

fn write_downward(
    dir: &Path,
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    default_mode: Option<i32>,
    pod_ip: &str,
    host_ip: &str,
) -> anyhow::Result<()> {
    for it in items {
        let value = match (&it.field_ref, &it.resource_field_ref) {
            (Some(f), _) => field(pod, f, pod_ip, host_ip)?,
            (None, Some(r)) => bail!(
                "downwardAPI resourceFieldRef {:?} is not supported",
                r.resource
            ),
            (None, None) => bail!(
                "downwardAPI item {:?} has neither fieldRef nor resourceFieldRef",
                it.path
            ),
        };
        write_file(dir, &it.path, value.as_bytes(), it.mode.or(default_mode))?;
    }
    Ok(())
}

async fn service_account_token(
    ctx: &Context,
    pod: &Pod,
    audience: Option<String>,
    expiration: Option<i64>,
) -> anyhow::Result<String> {
    let sa_name = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &ns(pod));
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: audience.map(|a| vec![a]),
            expiration_seconds: expiration,
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let resp = api
        .create_token_request(&sa_name, &PostParams::default(), &req)
        .await
        .with_context(|| format!("token for serviceaccount {sa_name}"))?;
    Ok(resp.status.and_then(|s| s.token).unwrap_or_default())
}

/// Writes every volume of the pod under its pod directory.
pub async fn materialise_volumes(
    ctx: &Context,
    pod: &Pod,
    dir: &PodDir,
    pod_ip: &str,
    host_ip: &str,
) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    for v in volumes {
        let path = dir.volume(&v.name);
        let what = format!("volume {:?}", v.name);
        if let Some(h) = &v.host_path {
            out.insert(v.name.clone(), PathBuf::from(&h.path));
            continue;
        }
        // ConfigMap, Secret, downward API and token volumes are rewritten on
        // every start, like a kubelet's atomic writer; emptyDir keeps its data.
        if v.empty_dir.is_none() {
            let _ = std::fs::remove_dir_all(&path);
        }
        std::fs::create_dir_all(&path)?;
        if v.empty_dir.is_some() {
        } else if let Some(c) = &v.config_map {
            if let Some(cm) = config_map(ctx, pod, &c.name, c.optional.unwrap_or(false))
                .await
                .with_context(|| what.clone())?
            {
                write_entries(
                    &path,
                    &config_map_entries(&cm),
                    &c.items,
                    c.default_mode,
                    &what,
                )?;
            }
        } else if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            if let Some(sec) = secret(ctx, pod, &name, s.optional.unwrap_or(false))
                .await
                .with_context(|| what.clone())?
            {
                write_entries(
                    &path,
                    &secret_entries(&sec),
                    &s.items,
                    s.default_mode,
                    &what,
                )?;
            }
        } else if let Some(d) = &v.downward_api {
            write_downward(
                &path,
                pod,
                d.items.as_deref().unwrap_or_default(),
                d.default_mode,
                pod_ip,
                host_ip,
            )?;
        } else if let Some(p) = &v.projected {
            for src in p.sources.iter().flatten() {
                if let Some(c) = &src.config_map {
                    if let Some(cm) =
                        config_map(ctx, pod, &c.name, c.optional.unwrap_or(false)).await?
                    {
                        write_entries(
                            &path,
                            &config_map_entries(&cm),
                            &c.items,
                            p.default_mode,
                            &what,
                        )?;
                    }
                }
                if let Some(s) = &src.secret {
                    if let Some(sec) =
                        secret(ctx, pod, &s.name, s.optional.unwrap_or(false)).await?
                    {
                        write_entries(
                            &path,
                            &secret_entries(&sec),
                            &s.items,
                            p.default_mode,
                            &what,
                        )?;
                    }
                }
                if let Some(d) = &src.downward_api {
                    write_downward(
                        &path,
                        pod,
                        d.items.as_deref().unwrap_or_default(),
                        p.default_mode,
                        pod_ip,
                        host_ip,
                    )?;
                }
                if let Some(t) = &src.service_account_token {
                    let token =
                        service_account_token(ctx, pod, t.audience.clone(), t.expiration_seconds)
                            .await?;
                    write_file(
                        &path,
                        &t.path,
                        token.as_bytes(),
                        Some(p.default_mode.unwrap_or(0o600)),
                    )?;
                }
            }
        } else {
            bail!("{what}: only configMap, secret, emptyDir, downwardAPI, projected and hostPath volumes are supported by the process kubelet");
        }
        out.insert(v.name.clone(), path);
    }
    Ok(out)
}

/// Replaces a leading mount path in `s` (or right after the first `=`).
pub fn rewrite_path(s: &str, mounts: &[(String, PathBuf)]) -> String {
    let one = |s: &str| -> Option<String> {
        // the longest mount path that matches wins
        let (m, host) = mounts
            .iter()
            .filter(|(m, _)| s == m || s.starts_with(&format!("{}/", m.trim_end_matches('/'))))
            .max_by_key(|(m, _)| m.len())?;
        Some(format!(
            "{}{}",
            host.display(),
            &s[m.trim_end_matches('/').len()..]
        ))
    };
    if let Some(r) = one(s) {
        return r;
    }
    if let Some((flag, value)) = s.split_once('=') {
        if let Some(r) = one(value) {
            return format!("{flag}={r}");
        }
    }
    s.to_string()
}

/// Kubernetes' `$(VAR)` expansion: defined variables are replaced, `$$` is a
/// literal `$`, anything else is left as written.
pub fn expand_vars(s: &str, vars: &BTreeMap<String, String>) -> String {
    let b = s.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' && i + 1 < b.len() {
            if b[i + 1] == b'$' {
                out.push('$');
                i += 2;
                continue;
            }
            if b[i + 1] == b'(' {
                if let Some(end) = s[i + 2..].find(')') {
                    let name = &s[i + 2..i + 2 + end];
                    if let Some(v) = vars.get(name) {
                        out.push_str(v);
                        i += 3 + end;
                        continue;
                    }
                }
            }
        }
        let ch = s[i..].chars().next().unwrap();
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// The process to start for `c`, with mount symlinks in place.
pub async fn launch(
    ctx: &Context,
    pod: &Pod,
    c: &Container,
    dir: &PodDir,
    volumes: &BTreeMap<String, PathBuf>,
    pod_ip: &str,
    host_ip: &str,
) -> anyhow::Result<Launch> {
    // mounts: container root with one symlink per mountPath
    let root = dir.container_root(&c.name);
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let vol = volumes
            .get(&m.name)
            .ok_or_else(|| anyhow!("volumeMount {:?}: no volume of that name", m.name))?;
        let mut host = vol.clone();
        if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            host = host.join(sub);
        }
        let link = root.join(m.mount_path.trim_start_matches('/'));
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&host, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), host.display()))?;
        mounts.push((m.mount_path.clone(), host));
    }

    // environment: the kubelet's own, less its credentials, then the pod's
    let mut env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| k != "KUBECONFIG" && !k.starts_with("KUBERNETES_") && k != "RUST_LOG")
        .collect();
    let hostname = pod
        .spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .or_else(|| pod.metadata.name.clone())
        .unwrap_or_default();
    env.insert("HOSTNAME".into(), hostname);
    env.insert("KUBERNETES_SERVICE_HOST".into(), ctx.api_host.clone());
    env.insert("KUBERNETES_SERVICE_PORT".into(), ctx.api_port.to_string());
    env.insert("CONTAINER_ROOT".into(), root.display().to_string());
    if let Some((_, sa)) = mounts
        .iter()
        .find(|(m, _)| m.trim_end_matches('/') == SERVICE_ACCOUNT_MOUNT)
    {
        // In-cluster config reads fixed absolute paths, so a program gets a
        // kubeconfig pointing at the same token and CA instead.
        let kc = dir.0.join("containers").join(&c.name).join("kubeconfig");
        let ca = sa.join("ca.crt");
        std::fs::write(
            &kc,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: https://{}:{}\n    certificate-authority: {}\nusers:\n- name: sa\n  user:\n    tokenFile: {}\ncontexts:\n- name: local\n  context: {{cluster: local, user: sa, namespace: {}}}\ncurrent-context: local\n",
                ctx.api_host,
                ctx.api_port,
                ca.display(),
                sa.join("token").display(),
                ns(pod)
            ),
        )?;
        env.insert("KUBECONFIG".into(), kc.display().to_string());
    }
    // pod-defined variables; $(VAR) sees only those defined before it
    let mut defined: BTreeMap<String, String> = BTreeMap::new();
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let entries = if let Some(r) = &from.config_map_ref {
            config_map(ctx, pod, &r.name, r.optional.unwrap_or(false))
                .await?
                .map(|cm| config_map_entries(&cm))
        } else if let Some(r) = &from.secret_ref {
            secret(ctx, pod, &r.name, r.optional.unwrap_or(false))
                .await?
                .map(|s| secret_entries(&s))
        } else {
            None
        };
        for (k, v) in entries.into_iter().flatten() {
            defined.insert(
                format!("{prefix}{k}"),
                String::from_utf8_lossy(&v).into_owned(),
            );
        }
    }
    for e in c.env.iter().flatten() {
        let value = if let Some(src) = &e.value_from {
            if let Some(f) = &src.field_ref {
                Some(field(pod, f, pod_ip, host_ip)?)
            } else if let Some(r) = &src.secret_key_ref {
                secret(ctx, pod, &r.name, r.optional.unwrap_or(false))
                    .await?
                    .map(|s| secret_entries(&s).remove(&r.key))
                    .map(|v| v.ok_or_else(|| anyhow!("secret {:?} has no key {:?}", r.name, r.key)))
                    .transpose()
                    .or_else(|e| {
                        if r.optional.unwrap_or(false) {
                            Ok(None)
                        } else {
                            Err(e)
                        }
                    })?
                    .map(|v| String::from_utf8_lossy(&v).into_owned())
            } else if let Some(r) = &src.config_map_key_ref {
                config_map(ctx, pod, &r.name, r.optional.unwrap_or(false))
                    .await?
                    .map(|cm| config_map_entries(&cm).remove(&r.key))
                    .map(|v| {
                        v.ok_or_else(|| anyhow!("configmap {:?} has no key {:?}", r.name, r.key))
                    })
                    .transpose()
                    .or_else(|e| {
                        if r.optional.unwrap_or(false) {
                            Ok(None)
                        } else {
                            Err(e)
                        }
                    })?
                    .map(|v| String::from_utf8_lossy(&v).into_owned())
            } else if let Some(r) = &src.resource_field_ref {
                bail!(
                    "env {}: resourceFieldRef {:?} is not supported",
                    e.name,
                    r.resource
                )
            } else {
                None
            }
        } else {
            Some(expand_vars(e.value.as_deref().unwrap_or(""), &defined))
        };
        if let Some(v) = value {
            defined.insert(e.name.clone(), v);
        }
    }
    for (k, v) in &defined {
        env.insert(k.clone(), rewrite_path(v, &mounts));
    }

    // argv: the image's entrypoint unless `command` replaces it
    let entry = ctx.images.lookup(c.image.as_deref().unwrap_or(""))?;
    let expand = |s: &String| rewrite_path(&expand_vars(s, &defined), &mounts);
    let command: Vec<String> = c.command.iter().flatten().map(expand).collect();
    let args: Vec<String> = c.args.iter().flatten().map(expand).collect();
    let (program, mut argv) = if command.is_empty() {
        (entry.program.clone(), entry.args.clone())
    } else {
        (
            image_program(&entry.program, &command[0]),
            command[1..].to_vec(),
        )
    };
    argv.extend(args);

    let cwd = match c.working_dir.as_deref().filter(|w| !w.is_empty()) {
        Some(w) => {
            let r = rewrite_path(w, &mounts);
            if r == w {
                // not a mount: a directory under the container root
                root.join(w.trim_start_matches('/'))
            } else {
                PathBuf::from(r)
            }
        }
        None => root.clone(),
    };
    std::fs::create_dir_all(&cwd).with_context(|| format!("workingDir {}", cwd.display()))?;
    Ok(Launch {
        program,
        args: argv,
        env: env.into_iter().collect(),
        cwd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_names_the_entrypoint_another_program_beside_it_or_a_program_on_path() {
        let dir = std::env::temp_dir().join(format!("image-program-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("dispynode"), "").unwrap();
        std::fs::write(dir.join("dispyscheduler"), "").unwrap();
        let entry = dir.join("dispynode").to_string_lossy().into_owned();
        let beside = dir.join("dispyscheduler").to_string_lossy().into_owned();
        assert_eq!(image_program(&entry, "dispynode"), entry);
        assert_eq!(image_program(&entry, "/usr/local/bin/dispynode"), entry);
        assert_eq!(image_program(&entry, "dispyscheduler"), beside);
        assert_eq!(
            image_program(&entry, "/usr/local/bin/dispyscheduler"),
            beside
        );
        assert_eq!(image_program(&entry, "python3"), "python3");
        assert_eq!(image_program(&entry, "/bin/sh"), "/bin/sh");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mount_paths_are_rewritten_at_the_start_or_after_equals() {
        let m = vec![
            ("/etc/app".to_string(), PathBuf::from("/p/v/cfg")),
            ("/etc/app/secret".to_string(), PathBuf::from("/p/v/sec")),
        ];
        assert_eq!(rewrite_path("/etc/app", &m), "/p/v/cfg");
        assert_eq!(rewrite_path("/etc/app/x.yaml", &m), "/p/v/cfg/x.yaml");
        assert_eq!(rewrite_path("/etc/app/secret/k", &m), "/p/v/sec/k");
        assert_eq!(
            rewrite_path("--config=/etc/app/x", &m),
            "--config=/p/v/cfg/x"
        );
        assert_eq!(rewrite_path("/etc/application", &m), "/etc/application");
        assert_eq!(rewrite_path("x/etc/app", &m), "x/etc/app");
    }

    #[test]
    fn dependent_variables_expand_like_kubernetes() {
        let vars: BTreeMap<String, String> = [("A".to_string(), "1".to_string())].into();
        assert_eq!(expand_vars("$(A)-$(B)-$$(A)-$", &vars), "1-$(B)-$(A)-$");
    }
}
