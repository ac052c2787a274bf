use std::{fs, path::Path};

use super::*;

const SVC: &str = r#"apiVersion: v1
kind: Service
metadata: {name: @NAME@, namespace: default}
spec:
  clusterIP: @IP@
  ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080}]
"#;

fn svc(name: &str, ip: &str) -> String {
    SVC.replace("@NAME@", name).replace("@IP@", ip)
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("weir-standalone-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

fn write(dir: &Path, name: &str, text: &str) {
    fs::write(dir.join(name), text).expect("write test file");
}

fn names(s: &Snapshot) -> Vec<String> {
    s.services.keys().map(ToString::to_string).collect()
}

#[test]
fn loads_multi_document_files_and_ignores_other_kinds_and_dotfiles() {
    let dir = temp_dir("multi");
    let slice = r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: a-1, namespace: default, labels: {kubernetes.io/service-name: a}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.0.0.1]}]
"#;
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n";
    write(
        &dir,
        "a.yaml",
        &format!("{}---\n{}---\n{}", svc("a", "10.96.0.1"), slice, cm),
    );
    write(&dir, "b.yml", &svc("b", "10.96.0.2"));
    write(&dir, ".c.yaml", &svc("c", "10.96.0.3"));
    write(&dir, "d.txt", &svc("d", "10.96.0.4"));
    let (snap, errors) = ConfigDir::new(&dir).reload().expect("dir readable");
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(names(&snap), ["default/a", "default/b"]);
    assert_eq!(snap.slices.len(), 1);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_broken_file_keeps_its_last_good_objects_and_is_reported_with_its_name() {
    let dir = temp_dir("broken");
    write(&dir, "a.yaml", &svc("a", "10.96.0.1"));
    write(&dir, "b.yaml", &svc("b", "10.96.0.2"));
    let mut config = ConfigDir::new(&dir);
    let (first, _) = config.reload().expect("dir readable");

    write(
        &dir,
        "b.yaml",
        "apiVersion: v1\nkind: Service\nspec: [unclosed\n",
    );
    let (second, errors) = config.reload().expect("dir readable");
    assert_eq!(first, second, "last good content of b.yaml stays");
    assert_eq!(errors.len(), 1);
    assert!(errors[0].to_string().contains("b.yaml"), "{}", errors[0]);

    // A new broken file that never was good contributes nothing and disturbs nothing.
    write(&dir, "c.yaml", "{{{{");
    let (third, errors) = config.reload().expect("dir readable");
    assert_eq!(first, third);
    assert_eq!(errors.len(), 2);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn an_invalid_object_is_reported_with_file_object_and_field_and_keeps_its_last_good_version() {
    let dir = temp_dir("invalid");
    write(
        &dir,
        "a.yaml",
        &format!("{}---\n{}", svc("a", "10.96.0.1"), svc("b", "10.96.0.2")),
    );
    let mut config = ConfigDir::new(&dir);
    let (first, _) = config.reload().expect("dir readable");

    write(
        &dir,
        "a.yaml",
        &format!("{}---\n{}", svc("a", "10.96.0.9"), svc("b", "not-an-ip")),
    );
    let (second, errors) = config.reload().expect("dir readable");
    assert_eq!(errors.len(), 1);
    let msg = errors[0].to_string();
    assert!(
        msg.contains("a.yaml")
            && msg.contains("Service default/b")
            && msg.contains("spec.clusterIP"),
        "{msg}"
    );
    // a changed and is applied; b keeps its previous, valid definition.
    let a = &second.services[&NsName {
        namespace: "default".into(),
        name: "a".into(),
    }];
    assert_eq!(a.cluster_ips, [std::net::Ipv4Addr::new(10, 96, 0, 9)]);
    assert_eq!(
        second.services[&NsName {
            namespace: "default".into(),
            name: "b".into()
        }],
        first.services[&NsName {
            namespace: "default".into(),
            name: "b".into()
        }]
    );

    // A type error inside the typed object names the field path.
    write(
        &dir,
        "c.yaml",
        &svc("c", "10.96.0.3").replace("port: 80", "port: eighty"),
    );
    let (_, errors) = config.reload().expect("dir readable");
    let msg = errors
        .iter()
        .map(ToString::to_string)
        .find(|m| m.contains("c.yaml"))
        .expect("c.yaml reported");
    assert!(msg.contains("spec.ports[0].port"), "{msg}");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn deleting_a_file_removes_its_objects() {
    let dir = temp_dir("delete");
    write(&dir, "a.yaml", &svc("a", "10.96.0.1"));
    write(&dir, "b.yaml", &svc("b", "10.96.0.2"));
    let mut config = ConfigDir::new(&dir);
    config.reload().expect("dir readable");
    fs::remove_file(dir.join("b.yaml")).expect("remove");
    let (snap, _) = config.reload().expect("dir readable");
    assert_eq!(names(&snap), ["default/a"]);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_rescan_without_force_still_sees_a_renamed_in_file_of_the_same_size() {
    let dir = temp_dir("rescan");
    write(&dir, "a.yaml", &svc("a", "10.96.0.1"));
    let mut config = ConfigDir::new(&dir);
    let (first, _) = config.reload_with(false).expect("dir readable");
    let (again, _) = config.reload_with(false).expect("dir readable");
    assert_eq!(first, again);
    // Same length, new content, written the way tools do (temp file + rename): a new inode.
    write(&dir, ".a.yaml.tmp", &svc("a", "10.96.0.2"));
    fs::rename(dir.join(".a.yaml.tmp"), dir.join("a.yaml")).expect("rename");
    let (after, _) = config.reload_with(false).expect("dir readable");
    let a = &after.services[&NsName {
        namespace: "default".into(),
        name: "a".into(),
    }];
    assert_eq!(a.cluster_ips, [std::net::Ipv4Addr::new(10, 96, 0, 2)]);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn files_read_before_they_settled_are_read_again() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    let at = |age: Duration| {
        let t = now - age;
        Some((1, 10, t.as_secs() as i64, i64::from(t.subsec_nanos()), 0, 0))
    };
    assert!(super::racy(at(Duration::ZERO)), "just written");
    assert!(super::racy(at(Duration::from_millis(200))));
    assert!(!super::racy(at(Duration::from_secs(10))), "settled");
    assert!(super::racy(None), "no stamp");
    // A file modified "in the future" (clock skew) is not trusted either.
    let future = now + Duration::from_secs(5);
    assert!(super::racy(Some((1, 10, future.as_secs() as i64, 0, 0, 0))));
}
