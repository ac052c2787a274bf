//! The Kubernetes manifests in `manifests/`, checked without a cluster (unprivileged, fast): every document
//! decodes into its k8s-openapi type with no field the type does not know, the ClusterRole grants exactly
//! what the agent asks for, and the DaemonSet runs the agent as intended with flags `weir-agent` has.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::{CommandFactory as _, Parser as _};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value as Json;
use weir_agent::kube_source::RBAC_RULES;

const NAMESPACE: &str = "kube-system";
const AGENT_CONTAINER: &str = "weir-agent";
const HEALTH_PORT: i32 = 10256;
const BPFFS: &str = "/sys/fs/bpf";

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

/// Every object in `manifests/`, by type.
#[derive(Default)]
struct Manifests {
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
    crds: Vec<CustomResourceDefinition>,
    /// `resources:` of kustomization.yaml.
    kustomize_resources: Option<Vec<String>>,
    /// Names of the YAML files, sorted.
    files: Vec<String>,
}

impl Manifests {
    fn one<'a, T>(items: &'a [T], kind: &str) -> &'a T {
        assert_eq!(
            items.len(),
            1,
            "manifests/ must hold exactly one {kind}, found {}",
            items.len()
        );
        &items[0]
    }

    fn service_account(&self) -> &ServiceAccount {
        Self::one(&self.service_accounts, "ServiceAccount")
    }
    fn cluster_role(&self) -> &ClusterRole {
        Self::one(&self.cluster_roles, "ClusterRole")
    }
    fn binding(&self) -> &ClusterRoleBinding {
        Self::one(&self.bindings, "ClusterRoleBinding")
    }
    fn daemon_set(&self) -> &DaemonSet {
        Self::one(&self.daemon_sets, "DaemonSet")
    }

    fn agent(&self) -> &Container {
        let spec = self
            .daemon_set()
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("DaemonSet has a pod spec");
        spec.containers
            .iter()
            .find(|c| c.name == AGENT_CONTAINER)
            .unwrap_or_else(|| panic!("DaemonSet has no container {AGENT_CONTAINER:?}"))
    }

    fn config_map(&self, name: &str) -> Option<&ConfigMap> {
        self.config_maps
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(name))
    }
}

/// Reads and decodes every `*.yaml`/`*.yml` in `manifests/`. Panics, naming file, document and field, on
/// a YAML error, an unknown kind, a decoding error, or a field the type does not know (a typo that
/// Kubernetes would silently drop).
fn load() -> Manifests {
    let dir = manifests_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML in {}", dir.display());

    let mut m = Manifests::default();
    for path in &files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {file}: {e}"));
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let at = format!("{file}, document {}", i + 1);
            let value = <serde_yaml::Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{at}: YAML error: {e}"));
            if value.is_null() {
                // An empty document, e.g. after a trailing `---`.
                continue;
            }
            let json = serde_json::to_value(&value)
                .unwrap_or_else(|e| panic!("{at}: not representable as JSON: {e}"));
            let api_version = json["apiVersion"].as_str().unwrap_or_default().to_owned();
            let kind = json["kind"].as_str().unwrap_or_default().to_owned();
            let at = format!("{at} ({api_version} {kind})");
            match (api_version.as_str(), kind.as_str()) {
                ("v1", "ServiceAccount") => m.service_accounts.push(decode(&at, json)),
                ("v1", "ConfigMap") => m.config_maps.push(decode(&at, json)),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                    m.cluster_roles.push(decode(&at, json))
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    m.bindings.push(decode(&at, json))
                }
                ("apps/v1", "DaemonSet") => m.daemon_sets.push(decode(&at, json)),
                ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
                    m.crds.push(decode(&at, json))
                }
                ("kustomize.config.k8s.io/v1beta1", "Kustomization")
                    if file == "kustomization.yaml" =>
                {
                    let resources = json["resources"]
                        .as_array()
                        .unwrap_or_else(|| panic!("{at}: no resources list"))
                        .iter()
                        .map(|r| {
                            r.as_str()
                                .unwrap_or_else(|| panic!("{at}: resource {r} is not a string"))
                                .to_owned()
                        })
                        .collect();
                    m.kustomize_resources = Some(resources);
                }
                _ => panic!(
                    "{at}: unknown kind: this test knows ServiceAccount, ClusterRole, ClusterRoleBinding, ConfigMap, DaemonSet, CustomResourceDefinition (and the Kustomization); teach it the new one"
                ),
            }
        }
        m.files.push(file);
    }
    m
}

/// Decodes `json` as `T`, then checks that encoding `T` again gives back every field of the input: a
/// field k8s-openapi does not know (and so Kubernetes would not either) is dropped on the way.
fn decode<T: DeserializeOwned + Serialize>(at: &str, json: Json) -> T {
    let typed: T = serde_json::from_value(json.clone()).unwrap_or_else(|e| panic!("{at}: {e}"));
    let back = serde_json::to_value(&typed).expect("re-encode");
    let mut lost = Vec::new();
    lost_fields(&json, &back, "", &mut lost);
    assert!(
        lost.is_empty(),
        "{at}: fields unknown to the Kubernetes type (typo, wrong place or wrong type?):\n  {}",
        lost.join("\n  ")
    );
    typed
}

fn lost_fields(orig: &Json, back: &Json, path: &str, out: &mut Vec<String>) {
    match (orig, back) {
        (Json::Object(o), Json::Object(b)) => {
            for (key, value) in o {
                let p = format!("{path}.{key}");
                match b.get(key) {
                    Some(bv) => lost_fields(value, bv, &p, out),
                    None => out.push(p),
                }
            }
        }
        (Json::Array(o), Json::Array(b)) if o.len() == b.len() => {
            for (i, (ov, bv)) in o.iter().zip(b).enumerate() {
                lost_fields(ov, bv, &format!("{path}[{i}]"), out);
            }
        }
        (Json::Number(o), Json::Number(b)) if o.as_f64() == b.as_f64() => {}
        (o, b) if o == b => {}
        (o, b) => out.push(format!("{path}: {o} came back as {b}")),
    }
}

#[test]
fn every_manifest_decodes_into_its_kubernetes_type_in_kube_system() {
    let m = load();
    let namespaced = m
        .service_accounts
        .iter()
        .map(|o| (&o.metadata, "ServiceAccount"))
        .chain(m.config_maps.iter().map(|o| (&o.metadata, "ConfigMap")))
        .chain(m.daemon_sets.iter().map(|o| (&o.metadata, "DaemonSet")));
    for (meta, kind) in namespaced {
        assert_eq!(
            meta.namespace.as_deref(),
            Some(NAMESPACE),
            "{kind} {:?} must be in {NAMESPACE}",
            meta.name
        );
    }
    // Each is looked up by kind below; one of each keeps "which one?" from arising.
    m.service_account();
    m.cluster_role();
    m.binding();
    m.daemon_set();
    assert!(
        m.config_map("weir-config").is_some(),
        "no ConfigMap weir-config"
    );
}

#[test]
fn the_kustomization_lists_every_manifest() {
    let m = load();
    let listed: BTreeSet<String> = m
        .kustomize_resources
        .clone()
        .expect("manifests/kustomization.yaml")
        .into_iter()
        .collect();
    let present: BTreeSet<String> = m
        .files
        .iter()
        .filter(|f| *f != "kustomization.yaml")
        .cloned()
        .collect();
    assert_eq!(
        listed, present,
        "kustomization.yaml resources must be exactly the other YAML files"
    );
}

/// (apiGroup, resource, verb).
type Grant = (String, String, String);

#[test]
fn the_cluster_role_grants_exactly_what_the_agent_asks_for() {
    let m = load();
    let wanted: BTreeSet<Grant> = RBAC_RULES
        .iter()
        .flat_map(|r| {
            r.verbs.iter().map(|v| {
                (
                    r.api_group.to_owned(),
                    r.resource.to_owned(),
                    (*v).to_owned(),
                )
            })
        })
        .collect();
    let role = m.cluster_role();
    assert!(
        role.aggregation_rule.is_none(),
        "an aggregated role grants what other roles say"
    );
    let mut granted = BTreeSet::new();
    for (i, rule) in role.rules.iter().flatten().enumerate() {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "rule {i}: resourceNames / nonResourceURLs are not expected"
        );
        let groups = rule.api_groups.clone().unwrap_or_default();
        let resources = rule.resources.clone().unwrap_or_default();
        for g in &groups {
            for r in &resources {
                for v in &rule.verbs {
                    assert!(
                        g != "*" && r != "*" && v != "*",
                        "rule {i}: wildcards grant more than the agent asks for"
                    );
                    granted.insert((g.clone(), r.clone(), v.clone()));
                }
            }
        }
    }
    let missing: Vec<&Grant> = wanted.difference(&granted).collect();
    let extra: Vec<&Grant> = granted.difference(&wanted).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "ClusterRole {:?} differs from weir_agent::kube_source::RBAC_RULES\n  missing (group, resource, verb): \
         {missing:?}\n  not asked for: {extra:?}",
        role.metadata.name
    );
}

#[test]
fn the_binding_gives_the_role_to_the_agents_service_account() {
    let m = load();
    let (role, binding, sa) = (m.cluster_role(), m.binding(), m.service_account());
    assert_eq!(
        binding.role_ref.api_group.as_deref(),
        Some("rbac.authorization.k8s.io")
    );
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "one subject: the agent");
    let s = &subjects[0];
    assert_eq!(s.kind, "ServiceAccount");
    assert_eq!(Some(&s.name), sa.metadata.name.as_ref());
    assert_eq!(s.namespace.as_ref(), sa.metadata.namespace.as_ref());
    let ds = m.daemon_set();
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(
        pod.service_account_name.as_ref(),
        sa.metadata.name.as_ref(),
        "the DaemonSet must run as the bound ServiceAccount"
    );
    assert_eq!(
        ds.metadata.namespace, sa.metadata.namespace,
        "a pod can only use a ServiceAccount of its own namespace"
    );
}

#[test]
fn the_daemonset_replaces_kube_proxy_on_every_node() {
    let m = load();
    let ds = m.daemon_set();
    let spec = ds.spec.as_ref().unwrap();
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    // Cluster DNS is a ClusterIP, which Weir does not translate for host-network processes.
    assert_eq!(pod.dns_policy.as_deref(), Some("Default"));
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "must tolerate every taint, like kube-proxy"
    );
    let strategy = spec.update_strategy.as_ref().expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        strategy
            .rolling_update
            .as_ref()
            .and_then(|r| r.max_unavailable.clone()),
        Some(IntOrString::Int(1))
    );
    let selector = spec.selector.match_labels.clone().unwrap_or_default();
    let labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    assert!(
        !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
        "the selector must match the pod template's labels"
    );

    let agent = m.agent();
    assert_eq!(
        agent.command.as_deref(),
        Some(&["weir-agent".to_owned()][..])
    );
    assert_eq!(
        agent.image.as_deref(),
        Some("ghcr.io/weir-lb/weir-agent:0.1.0")
    );
    let requests = agent
        .resources
        .as_ref()
        .and_then(|r| r.requests.clone())
        .unwrap_or_default();
    assert!(
        requests.contains_key("cpu") && requests.contains_key("memory"),
        "resource requests: {requests:?}"
    );
}

#[test]
fn the_agent_is_unprivileged_with_exactly_its_capabilities() {
    let m = load();
    let agent = m.agent();
    let sc = agent.security_context.as_ref().expect("securityContext");
    assert_ne!(
        sc.privileged,
        Some(true),
        "the agent must not be privileged"
    );
    assert_eq!(
        sc.allow_privilege_escalation,
        Some(false),
        "no setuid or file capabilities may add to the set"
    );
    assert_eq!(
        sc.read_only_root_filesystem,
        Some(true),
        "the agent writes only to the bpffs hostPath"
    );
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    // The least that works, as tests/tests/daemonset_capabilities.rs proves with the real agent: not
    // SYS_ADMIN, which would stand in for BPF and PERFMON and grant far more (mounting is left to the
    // node).
    assert_eq!(added, BTreeSet::from(["BPF", "NET_ADMIN", "PERFMON"]));

    // The API server rejects Bidirectional propagation in a container that is not privileged.
    let pod = m
        .daemon_set()
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    for c in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        let privileged = c.security_context.as_ref().and_then(|s| s.privileged) == Some(true);
        for vm in c.volume_mounts.iter().flatten() {
            assert!(
                privileged || vm.mount_propagation.as_deref() != Some("Bidirectional"),
                "container {}: mount {} is Bidirectional, which Kubernetes allows only in privileged containers",
                c.name,
                vm.mount_path
            );
        }
    }
}

/// Each added capability is explained where it is granted: a comment directly above its list entry.
#[test]
fn every_added_capability_is_explained_by_a_comment() {
    let text =
        std::fs::read_to_string(manifests_dir().join("daemonset.yaml")).expect("daemonset.yaml");
    let lines: Vec<&str> = text.lines().collect();
    let add = lines
        .iter()
        .position(|l| l.trim() == "add:")
        .expect("capabilities.add in daemonset.yaml");
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut explained = BTreeMap::new();
    for (i, line) in lines.iter().enumerate().skip(add + 1) {
        let t = line.trim();
        if !t.is_empty() && !t.starts_with('#') && !t.starts_with("- ") {
            break;
        }
        if indent(line) <= indent(lines[add]) && !t.starts_with('#') {
            break;
        }
        if let Some(cap) = t.strip_prefix("- ") {
            let comment = lines[..i]
                .iter()
                .rev()
                .take_while(|l| l.trim().starts_with('#'))
                .count();
            explained.insert(cap.to_owned(), comment);
        }
    }
    assert!(!explained.is_empty(), "no capability list found");
    for (cap, comment_lines) in &explained {
        assert!(
            *comment_lines > 0,
            "capability {cap} has no comment explaining why"
        );
    }
}

#[test]
fn the_agent_mounts_the_node_bpffs_cgroups_and_modules() {
    let m = load();
    let pod = m
        .daemon_set()
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    let host_paths: BTreeMap<&str, &str> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| Some((v.name.as_str(), v.host_path.as_ref()?.path.as_str())))
        .collect();
    let mounts: BTreeMap<&str, (&str, bool, Option<&str>)> = m
        .agent()
        .volume_mounts
        .iter()
        .flatten()
        .filter_map(|vm| {
            Some((
                *host_paths.get(vm.name.as_str())?,
                (
                    vm.mount_path.as_str(),
                    vm.read_only == Some(true),
                    vm.mount_propagation.as_deref(),
                ),
            ))
        })
        .collect();
    let (path, read_only, propagation) = mounts
        .get(BPFFS)
        .copied()
        .unwrap_or_else(|| panic!("the agent must mount the node's {BPFFS}"));
    assert_eq!(path, BPFFS);
    assert!(!read_only, "maps are pinned there: it must be writable");
    // Pins made by the agent must land in the node's bpffs; a mount of a fresh bpffs by the node must
    // reach the container.
    assert_eq!(propagation, Some("HostToContainer"));
    let bpffs_dir = flag_values(m.agent())
        .get("bpffs-dir")
        .cloned()
        .flatten()
        .expect("--bpffs-dir is set");
    assert!(
        Path::new(&bpffs_dir).starts_with(BPFFS),
        "--bpffs-dir={bpffs_dir} must be under the mounted {BPFFS}"
    );
    for host in ["/sys/fs/cgroup", "/lib/modules"] {
        let (path, read_only, _) = mounts
            .get(host)
            .copied()
            .unwrap_or_else(|| panic!("the agent must mount {host}"));
        assert_eq!(path, host);
        assert!(read_only, "{host} must be mounted read-only");
    }
}

#[test]
fn probes_ask_the_health_port_which_listens_beyond_loopback() {
    let m = load();
    let agent = m.agent();
    for (kind, probe) in [
        ("liveness", &agent.liveness_probe),
        ("readiness", &agent.readiness_probe),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{kind} probe must be an httpGet"));
        assert_eq!(get.path.as_deref(), Some("/healthz"), "{kind} probe path");
        assert_eq!(get.port, IntOrString::Int(HEALTH_PORT), "{kind} probe port");
        assert!(get.host.is_none(), "{kind} probe goes to the pod (node) IP");
    }
    // The kubelet probes the node's address: the agent must listen there, not on loopback only.
    let health = flag_values(agent)
        .get("health-addr")
        .cloned()
        .flatten()
        .expect("--health-addr is set");
    let addr: std::net::SocketAddr = health.parse().expect("--health-addr is IP:port");
    assert_eq!(i32::from(addr.port()), HEALTH_PORT);
    assert!(
        addr.ip().is_unspecified(),
        "--health-addr={health} must listen on all addresses"
    );
}

/// `--name=value` → (name, Some(value)); `--name` → (name, None). Panics on anything else, so the args
/// stay unambiguous to read (a separate value argument could be mistaken for a flag's).
fn flag_values(c: &Container) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    for arg in c.args.iter().flatten() {
        let flag = arg.strip_prefix("--").unwrap_or_else(|| {
            panic!("arg {arg:?}: write every agent flag as --name=value or --name")
        });
        let (name, value) = match flag.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (flag.to_owned(), None),
        };
        out.insert(name, value);
    }
    out
}

#[test]
fn every_flag_in_the_daemonset_is_a_flag_of_weir_agent() {
    let m = load();
    let agent = m.agent();
    let command = weir_agent::cli::Args::command();
    let known: BTreeMap<String, bool> = command
        .get_arguments()
        .flat_map(|a| {
            let takes_value = a.get_action().takes_values();
            let mut names: Vec<String> = a.get_long().into_iter().map(str::to_owned).collect();
            names.extend(a.get_all_aliases().into_iter().flatten().map(str::to_owned));
            names.into_iter().map(move |n| (n, takes_value))
        })
        .collect();
    for (name, value) in flag_values(agent) {
        let takes_value = *known.get(&name).unwrap_or_else(|| {
            panic!(
                "--{name} is not a flag of weir-agent (weir_agent::cli::Args); its flags: {:?}",
                known.keys().collect::<Vec<_>>()
            )
        });
        assert_eq!(
            value.is_some(),
            takes_value,
            "--{name}: {}",
            if takes_value {
                "needs =VALUE"
            } else {
                "takes no value"
            }
        );
    }
    let flags = flag_values(agent);
    for absent in ["config-dir", "kubeconfig"] {
        assert!(
            !flags.contains_key(absent),
            "--{absent}: the DaemonSet runs the agent in-cluster mode"
        );
    }
    assert_eq!(
        flags.get("node-name").cloned().flatten().as_deref(),
        Some("$(NODE_NAME)")
    );
}

/// The `$(VAR)` references in `s` (`$$(VAR)` is an escaped literal in Kubernetes and does not count).
fn var_refs(s: &str) -> Vec<String> {
    let mut refs = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        let after = &rest[i + 1..];
        if let Some(escaped) = after.strip_prefix('$') {
            rest = escaped;
            continue;
        }
        if let Some(body) = after.strip_prefix('(')
            && let Some(end) = body.find(')')
        {
            refs.push(body[..end].to_owned());
            rest = &body[end + 1..];
            continue;
        }
        rest = after;
    }
    refs
}

#[test]
fn var_refs_follow_kubernetes_expansion_rules() {
    assert_eq!(var_refs("--a=$(A)-$(B)"), vec!["A", "B"]);
    assert_eq!(var_refs("$$(NOT) $(YES) $(open"), vec!["YES"]);
    assert!(var_refs("plain").is_empty());
}

#[test]
fn every_variable_in_the_args_is_defined_and_every_config_key_exists() {
    let m = load();
    let agent = m.agent();
    let env: BTreeMap<&str, &EnvVar> = agent
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.as_str(), e))
        .collect();
    assert!(
        agent.env_from.is_none(),
        "define variables one by one in env, so this test can see them"
    );
    for arg in agent
        .command
        .iter()
        .flatten()
        .chain(agent.args.iter().flatten())
    {
        for var in var_refs(arg) {
            assert!(
                env.contains_key(var.as_str()),
                "{arg:?} uses $({var}), which env does not define (Kubernetes would pass it literally)"
            );
        }
    }
    let node_name = env.get("NODE_NAME").expect("NODE_NAME in env");
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName"),
        "NODE_NAME comes from the downward API"
    );
    let mut from_config = BTreeSet::new();
    for e in env.values() {
        let Some(r) = e
            .value_from
            .as_ref()
            .and_then(|v| v.config_map_key_ref.as_ref())
        else {
            continue;
        };
        assert_ne!(r.optional, Some(true), "{}: make the key required", e.name);
        let cm = m.config_map(&r.name).unwrap_or_else(|| {
            panic!(
                "{} reads ConfigMap {}, which manifests/ lacks",
                e.name, r.name
            )
        });
        let value = cm
            .data
            .as_ref()
            .and_then(|d| d.get(&r.key))
            .unwrap_or_else(|| {
                panic!(
                    "{} reads key {} that ConfigMap {} lacks",
                    e.name, r.key, r.name
                )
            });
        assert!(!value.is_empty(), "{}: key {} is empty", e.name, r.key);
        from_config.insert(e.name.clone());
    }
    assert!(
        from_config.contains("POD_IFACE_PREFIX"),
        "--pod-iface-prefix comes from the ConfigMap"
    );
    assert_eq!(
        flag_values(agent)
            .get("pod-iface-prefix")
            .cloned()
            .flatten()
            .as_deref(),
        Some("$(POD_IFACE_PREFIX)")
    );
}

/// The value Kubernetes would give `var`: a ConfigMap key's value, or a sample for a downward-API field.
fn env_value(m: &Manifests, var: &EnvVar) -> String {
    if let Some(v) = &var.value {
        return v.clone();
    }
    let from = var.value_from.as_ref().expect("value or valueFrom");
    if let Some(r) = &from.config_map_key_ref {
        return m
            .config_map(&r.name)
            .and_then(|cm| cm.data.as_ref()?.get(&r.key).cloned())
            .unwrap_or_else(|| panic!("{}: no key {} in ConfigMap {}", var.name, r.key, r.name));
    }
    match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
        Some("spec.nodeName") => "node-1".to_owned(),
        other => panic!("{}: no sample value for {other:?}", var.name),
    }
}

#[test]
fn the_agent_accepts_the_daemonset_command_line() {
    let m = load();
    let agent = m.agent();
    let env: BTreeMap<&str, String> = agent
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.as_str(), env_value(&m, e)))
        .collect();
    // Expand $(VAR) as the kubelet does: an undefined reference stays as written (and fails the test
    // above).
    let args: Vec<String> = agent
        .args
        .iter()
        .flatten()
        .map(|arg| {
            var_refs(arg)
                .iter()
                .fold(arg.clone(), |a, var| match env.get(var.as_str()) {
                    Some(value) => a.replace(&format!("$({var})"), value),
                    None => a,
                })
        })
        .collect();
    let parsed = weir_agent::cli::Args::try_parse_from(
        std::iter::once("weir-agent".to_owned()).chain(args.iter().cloned()),
    )
    .unwrap_or_else(|e| panic!("weir-agent rejects {args:?}:\n{e}"));
    assert_eq!(parsed.config_dir, None, "in-cluster mode");
    assert_eq!(parsed.kubeconfig, None, "in-cluster mode");
    assert_eq!(parsed.node_name.as_deref(), Some("node-1"));
    assert_eq!(parsed.pod_iface_prefix, env["POD_IFACE_PREFIX"]);
    assert_eq!(parsed.bpffs_dir, Path::new("/sys/fs/bpf/weir"));
    assert_eq!(parsed.health_addr.to_string(), "0.0.0.0:10256");
    assert_eq!(parsed.metrics_addr.to_string(), "127.0.0.1:10249");
}

/// The HTTPFaultInjection CRD names what the agent watches (group, kind, plural, version), and the
/// ClusterRole lets it read that resource.
#[test]
fn the_fault_injection_crd_matches_the_agents_type() {
    use weir_agent::l7::fault;
    let m = load();
    let crd = Manifests::one(&m.crds, "CustomResourceDefinition");
    assert_eq!(crd.spec.group, fault::GROUP);
    assert_eq!(crd.spec.names.kind, fault::KIND);
    assert_eq!(crd.spec.names.plural, fault::PLURAL);
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some(format!("{}.{}", fault::PLURAL, fault::GROUP).as_str())
    );
    assert_eq!(crd.spec.scope, "Namespaced");
    let versions: Vec<&str> = crd.spec.versions.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(versions, [fault::VERSION]);
    assert!(
        RBAC_RULES
            .iter()
            .any(|r| r.api_group == fault::GROUP && r.resource == fault::PLURAL),
        "the agent must ask to read {}",
        fault::PLURAL
    );
}
