//! Reads manifests into what `dispy run` needs: each JobCluster's computation and files, each
//! DispyJob's call, and each DispyJobArray's calls, with ConfigMaps resolved into file contents
//! and `argsFrom` lines.

use std::collections::BTreeMap;
use std::path::Path;

use dispy_core::manifest::{
    self, ConfigMap, DependsSource, DispyJobArray, DispyJobSpec, Document, JobClusterSpec,
};
use dispy_core::protocol::Computation;
use dispy_core::scheduler::ClusterPolicy;

pub struct ClusterPlan {
    pub name: String,
    pub namespace: String,
    pub spec: JobClusterSpec,
    pub computation: Computation,
    /// Files every node gets: (name, contents).
    pub files: Vec<(String, Vec<u8>)>,
}

pub struct JobPlan {
    pub name: String,
    /// Index into `Plan::clusters`.
    pub cluster: usize,
    pub spec: DispyJobSpec,
    pub args: String,
    pub kwargs: String,
    pub files: Vec<(String, Vec<u8>)>,
}

/// One index's call: positional and keyword arguments as JSON text.
pub struct Call {
    pub args: Box<str>,
    pub kwargs: Box<str>,
}

pub struct ArrayPlan {
    pub name: String,
    /// Index into `Plan::clusters`.
    pub cluster: usize,
    /// Index `i`'s call is `calls[i]`.
    pub calls: Vec<Call>,
    pub policy: ClusterPolicy,
    pub suspend: bool,
}

pub struct Plan {
    pub clusters: Vec<ClusterPlan>,
    pub jobs: Vec<JobPlan>,
    pub arrays: Vec<ArrayPlan>,
}

/// Reads and checks every file; errors name the file, the document and the field.
pub fn load(paths: &[impl AsRef<Path>]) -> Result<Plan, String> {
    let mut docs = Vec::new();
    for path in paths {
        let path = path.as_ref();
        let text = if path == Path::new("-") {
            std::io::read_to_string(std::io::stdin())
                .map_err(|e| format!("cannot read standard input: {e}"))?
        } else {
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        };
        docs.extend(
            manifest::parse_documents(&text, &path.display().to_string())
                .map_err(|e| e.to_string())?,
        );
    }
    plan(docs)
}

fn ns(namespace: &Option<String>) -> String {
    namespace.clone().unwrap_or_else(|| "default".into())
}

pub fn plan(docs: Vec<Document>) -> Result<Plan, String> {
    let mut config_maps: BTreeMap<(String, String), ConfigMap> = BTreeMap::new();
    for d in &docs {
        if let Document::ConfigMap(cm) = d {
            config_maps.insert(
                (ns(&cm.metadata.namespace), cm.metadata.name.clone()),
                cm.clone(),
            );
        }
    }
    let files_of = |namespace: &str,
                    owner: &str,
                    depends: &[DependsSource]|
     -> Result<Vec<(String, Vec<u8>)>, String> {
        let mut files = Vec::new();
        for d in depends {
            let name = &d.config_map_ref.name;
            let cm = config_maps
                .get(&(namespace.to_string(), name.clone()))
                .ok_or_else(|| format!("{owner}: ConfigMap {namespace}/{name} (in depends) is not in the manifests"))?;
            files.extend(
                cm.data
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_bytes().to_vec())),
            );
            files.extend(cm.binary_data.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        Ok(files)
    };

    let mut clusters: Vec<ClusterPlan> = Vec::new();
    for d in &docs {
        let Document::JobCluster(c) = d else { continue };
        let namespace = ns(&c.metadata.namespace);
        let owner = format!("JobCluster {namespace}/{}", c.metadata.name);
        if clusters
            .iter()
            .any(|p| p.name == c.metadata.name && p.namespace == namespace)
        {
            return Err(format!("{owner} appears twice"));
        }
        let Some(comp) = &c.spec.computation else {
            return Err(format!(
                "{owner} has no computation: it is a node pool for Python dispy clients, which `dispy run` has nothing to run on"
            ));
        };
        let computation = comp
            .to_protocol(|r| {
                let cm = config_maps
                    .get(&(namespace.clone(), r.name.clone()))
                    .ok_or_else(|| {
                        format!("ConfigMap {namespace}/{} (python.configMapRef) is not in the manifests", r.name)
                    })?;
                cm.data.get(&r.key).cloned().ok_or_else(|| {
                    format!("ConfigMap {namespace}/{} has no key {:?} (python.configMapRef.key)", r.name, r.key)
                })
            })
            .map_err(|e| format!("{owner}: {e}"))?;
        clusters.push(ClusterPlan {
            name: c.metadata.name.clone(),
            namespace: namespace.clone(),
            files: files_of(&namespace, &owner, &c.spec.depends)?,
            spec: c.spec.clone(),
            computation,
        });
    }

    let mut jobs: Vec<JobPlan> = Vec::new();
    for d in &docs {
        let Document::DispyJob(j) = d else { continue };
        let taken = jobs.iter().map(|p| (p.name.as_str(), p.cluster));
        let (owner, cluster) = place("DispyJob", &j.metadata, &j.spec.cluster, &clusters, taken)?;
        let namespace = clusters[cluster].namespace.clone();
        if matches!(clusters[cluster].computation, Computation::Program(_))
            && !j.spec.kwargs.is_empty()
        {
            return Err(format!(
                "{owner}: field spec.kwargs: a program computation takes no kwargs"
            ));
        }
        jobs.push(JobPlan {
            name: j.metadata.name.clone(),
            cluster,
            args: serde_json::Value::Array(j.spec.args.clone()).to_string(),
            kwargs: serde_json::Value::Object(j.spec.kwargs.clone()).to_string(),
            files: files_of(&namespace, &owner, &j.spec.depends)?,
            spec: j.spec.clone(),
        });
    }
    let mut arrays: Vec<ArrayPlan> = Vec::new();
    for d in &docs {
        let Document::DispyJobArray(a) = d else {
            continue;
        };
        let taken = arrays.iter().map(|p| (p.name.as_str(), p.cluster));
        let (owner, cluster) = place(
            "DispyJobArray",
            &a.metadata,
            &a.spec.cluster,
            &clusters,
            taken,
        )?;
        let namespace = clusters[cluster].namespace.clone();
        let c = &clusters[cluster];
        let calls = array_calls(a, &namespace, &config_maps)
            .and_then(|calls| {
                let program = matches!(c.computation, Computation::Program(_));
                match calls
                    .iter()
                    .position(|(_, kwargs)| program && !kwargs.is_empty())
                {
                    Some(i) => Err(format!("index {i}: a program computation takes no kwargs")),
                    None => Ok(calls),
                }
            })
            .map_err(|e| format!("{owner}: {e}"))?;
        arrays.push(ArrayPlan {
            name: a.metadata.name.clone(),
            cluster,
            calls: calls
                .into_iter()
                .map(|(args, kwargs)| Call {
                    args: serde_json::Value::Array(args).to_string().into(),
                    kwargs: serde_json::Value::Object(kwargs).to_string().into(),
                })
                .collect(),
            policy: dispy_core::driver::array_policy(&c.spec, &a.spec),
            suspend: a.spec.suspend,
        });
    }
    if jobs.is_empty() && arrays.is_empty() {
        return Err("the manifests hold no DispyJob or DispyJobArray: nothing to run".into());
    }
    Ok(Plan {
        clusters,
        jobs,
        arrays,
    })
}

/// A DispyJob's or DispyJobArray's name for errors (`Kind namespace/name`) and its cluster;
/// `taken` are the objects of that kind so far, by name and cluster.
fn place<'p>(
    kind: &str,
    meta: &manifest::Meta,
    cluster: &str,
    clusters: &[ClusterPlan],
    mut taken: impl Iterator<Item = (&'p str, usize)>,
) -> Result<(String, usize), String> {
    let namespace = ns(&meta.namespace);
    let owner = format!("{kind} {namespace}/{}", meta.name);
    if taken.any(|(name, c)| name == meta.name && clusters[c].namespace == namespace) {
        return Err(format!("{owner} appears twice"));
    }
    let found = clusters
        .iter()
        .position(|c| c.name == cluster && c.namespace == namespace)
        .ok_or_else(|| format!("{owner}: cluster {cluster:?} not found in the manifests"))?;
    Ok((owner, found))
}

type Args = (
    Vec<serde_json::Value>,
    serde_json::Map<String, serde_json::Value>,
);

/// An array's calls from `spec.args` or from its `argsFrom` ConfigMap's JSON lines. (The
/// manifest loader has checked that exactly one of them is set.)
fn array_calls(
    a: &DispyJobArray,
    namespace: &str,
    config_maps: &BTreeMap<(String, String), ConfigMap>,
) -> Result<Vec<Args>, String> {
    if let Some(args) = &a.spec.args {
        return Ok(args
            .iter()
            .map(|a| (a.clone(), Default::default()))
            .collect());
    }
    let Some(from) = &a.spec.args_from else {
        return Err("field spec: set exactly one of args or argsFrom".into());
    };
    let r = &from.config_map_ref;
    let cm = config_maps
        .get(&(namespace.to_string(), r.name.clone()))
        .ok_or_else(|| {
            format!(
                "ConfigMap {namespace}/{} (spec.argsFrom.configMapRef) is not in the manifests",
                r.name
            )
        })?;
    let text = cm.data.get(&r.key).ok_or_else(|| {
        format!(
            "ConfigMap {namespace}/{} has no key {:?} (spec.argsFrom.configMapRef.key)",
            r.name, r.key
        )
    })?;
    manifest::array_args_from_lines(text)
        .map_err(|e| format!("ConfigMap {namespace}/{} key {:?}: {e}", r.name, r.key))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &str = "apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {name: sq}\nspec:\n  reentrant: true\n  computation:\n    python: {source: 'def sq(n, k=1): return n * k', function: sq}\n";

    fn plan_of(yaml: &str) -> Result<Plan, String> {
        let text = format!("{CLUSTER}---\n{yaml}");
        plan(manifest::parse_documents(&text, "t.yaml").map_err(|e| e.to_string())?)
    }

    fn lines(data: &str) -> String {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: in}}\ndata:\n  lines: |\n{data}---\napiVersion: dispy.io/v1alpha1\nkind: DispyJobArray\nmetadata: {{name: a}}\nspec: {{cluster: sq, argsFrom: {{configMapRef: {{name: in, key: lines}}}}}}\n")
    }

    #[test]
    fn an_array_s_calls_come_from_argsfrom_lines_blank_lines_skipped() {
        let p = plan_of(&lines(
            "    [1]\n\n    {\"args\": [2], \"kwargs\": {\"k\": 3}}\n    {}\n",
        ))
        .unwrap();
        assert!(p.jobs.is_empty());
        let calls: Vec<(&str, &str)> = p.arrays[0]
            .calls
            .iter()
            .map(|c| (&*c.args, &*c.kwargs))
            .collect();
        assert_eq!(calls, [("[1]", "{}"), ("[2]", "{\"k\":3}"), ("[]", "{}")]);
        assert!(p.arrays[0].policy.reentrant, "the cluster's");
    }

    #[test]
    fn inline_args_and_the_array_s_own_policy() {
        let p = plan_of("apiVersion: dispy.io/v1alpha1\nkind: DispyJobArray\nmetadata: {name: a}\nspec: {cluster: sq, args: [[1], [2, 3]], reentrant: false, backoffLimit: 1, suspend: true, ttlSecondsAfterFinished: 60}\n").unwrap();
        let a = &p.arrays[0];
        assert_eq!(a.calls.len(), 2);
        assert_eq!(&*a.calls[1].args, "[2,3]");
        assert_eq!((a.policy.reentrant, a.policy.backoff_limit), (false, 1));
        assert!(a.suspend);
    }

    #[test]
    fn argsfrom_errors_name_the_array_the_config_map_the_key_and_the_line() {
        let bad_line = plan_of(&lines("    [1]\n    [2\n")).err().unwrap();
        assert!(
            bad_line.starts_with(
                "DispyJobArray default/a: ConfigMap default/in key \"lines\": line 2: not JSON"
            ),
            "{bad_line}"
        );
        let not_args = plan_of(&lines("    7\n")).err().unwrap();
        assert!(
            not_args.contains("line 1: not a list of arguments"),
            "{not_args}"
        );
        let no_key = plan_of(&lines("    [1]\n").replace("key: lines", "key: rows"))
            .err()
            .unwrap();
        assert_eq!(no_key, "DispyJobArray default/a: ConfigMap default/in has no key \"rows\" (spec.argsFrom.configMapRef.key)");
        let no_map = plan_of(&lines("    [1]\n").replace("name: in,", "name: gone,"))
            .err()
            .unwrap();
        assert_eq!(no_map, "DispyJobArray default/a: ConfigMap default/gone (spec.argsFrom.configMapRef) is not in the manifests");
        let no_cluster = plan_of(&lines("    [1]\n").replace("cluster: sq", "cluster: cube"))
            .err()
            .unwrap();
        assert_eq!(
            no_cluster,
            "DispyJobArray default/a: cluster \"cube\" not found in the manifests"
        );
    }

    #[test]
    fn a_program_array_takes_no_kwargs_and_an_array_appears_once() {
        let program = "apiVersion: dispy.io/v1alpha1\nkind: JobCluster\nmetadata: {name: p}\nspec:\n  computation: {program: {command: [echo]}}\n---\n";
        let with_kwargs =
            lines("    [1]\n    {\"kwargs\": {\"k\": 1}}\n").replace("cluster: sq", "cluster: p");
        let err = plan_of(&format!("{program}{with_kwargs}")).err().unwrap();
        assert_eq!(
            err,
            "DispyJobArray default/a: index 1: a program computation takes no kwargs"
        );
        let plain = lines("    [\"x\"]\n").replace("cluster: sq", "cluster: p");
        assert!(plan_of(&format!("{program}{plain}")).is_ok());
        let again = "---\napiVersion: dispy.io/v1alpha1\nkind: DispyJobArray\nmetadata: {name: a}\nspec: {cluster: sq, args: [[2]]}\n";
        let err = plan_of(&format!("{}{again}", lines("    [1]\n")))
            .err()
            .unwrap();
        assert_eq!(err, "DispyJobArray default/a appears twice");
    }
}
