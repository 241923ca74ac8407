//! Reads manifests into what `dispy run` needs: each JobCluster's computation and files, and
//! each DispyJob's call, with ConfigMaps resolved into file contents.

use std::collections::BTreeMap;
use std::path::Path;

use dispy_core::manifest::{
    self, ConfigMap, DependsSource, DispyJobSpec, Document, JobClusterSpec,
};
use dispy_core::protocol::Computation;

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

pub struct Plan {
    pub clusters: Vec<ClusterPlan>,
    pub jobs: Vec<JobPlan>,
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
        let namespace = ns(&j.metadata.namespace);
        let owner = format!("DispyJob {namespace}/{}", j.metadata.name);
        if jobs
            .iter()
            .any(|p| p.name == j.metadata.name && clusters[p.cluster].namespace == namespace)
        {
            return Err(format!("{owner} appears twice"));
        }
        let cluster = clusters
            .iter()
            .position(|c| c.name == j.spec.cluster && c.namespace == namespace)
            .ok_or_else(|| {
                format!(
                    "{owner}: cluster {:?} not found in the manifests",
                    j.spec.cluster
                )
            })?;
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
    if jobs.is_empty() {
        return Err("the manifests hold no DispyJob: nothing to run".into());
    }
    Ok(Plan { clusters, jobs })
}
