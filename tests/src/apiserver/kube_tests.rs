//! kube-rs 4.2 (client and `runtime::watcher`) against the simulator: proves the simulator speaks the
//! protocol kube-rs expects (kubeconfig, paginated LIST, WATCH, bookmarks, 410 and re-list, streaming
//! lists, field selectors, GET, PATCH), independently of the agent. No root needed: it runs on loopback.

use std::fmt::Debug;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Config, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::runtime::Runtime;

use super::{ApiServer, Verb, objects};

const T: Duration = Duration::from_secs(10);

/// What a watcher emitted, reduced to names and versions.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Init,
    InitApply(String),
    InitDone,
    Apply(String, String),
    Delete(String, String),
    Error(String),
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A kube client configured the way the agent is: from a kubeconfig file the simulator wrote.
fn client(rt: &Runtime, api: &ApiServer) -> Client {
    let dir = std::env::temp_dir().join(format!(
        "weir-apisim-{}-{}",
        std::process::id(),
        api.addr().port()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("kubeconfig");
    api.write_kubeconfig(&path).expect("write kubeconfig");
    let kubeconfig = Kubeconfig::read_from(&path).expect("kube-rs reads the kubeconfig");
    let _ = std::fs::remove_dir_all(&dir);
    rt.block_on(async {
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("kube-rs accepts the kubeconfig");
        Client::try_from(config).expect("client")
    })
}

/// Runs a kube-rs watcher on the runtime, forwarding its events; errors are followed by a short pause
/// (the agent uses a backoff) so a failing server does not make it spin.
fn drive<K>(rt: &Runtime, api: Api<K>, config: watcher::Config) -> Receiver<Ev>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    rt.spawn(async move {
        let mut stream = std::pin::pin!(watcher::watcher(api, config));
        while let Some(event) = stream.next().await {
            let name_rv = |o: &K| (o.name_any(), o.resource_version().unwrap_or_default());
            let (ev, failed) = match event {
                Ok(Event::Init) => (Ev::Init, false),
                Ok(Event::InitApply(o)) => (Ev::InitApply(o.name_any()), false),
                Ok(Event::InitDone) => (Ev::InitDone, false),
                Ok(Event::Apply(o)) => {
                    let (n, rv) = name_rv(&o);
                    (Ev::Apply(n, rv), false)
                }
                Ok(Event::Delete(o)) => {
                    let (n, rv) = name_rv(&o);
                    (Ev::Delete(n, rv), false)
                }
                Err(e) => (Ev::Error(format!("{e}: {e:?}")), true),
            };
            if tx.send(ev).is_err() {
                return;
            }
            if failed {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    rx
}

/// The next non-error event (errors are collected into `errors`).
fn next(rx: &Receiver<Ev>, errors: &mut Vec<String>) -> Ev {
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Ev::Error(e)) => errors.push(e),
            Ok(ev) => return ev,
            Err(RecvTimeoutError::Timeout) => {
                panic!("no watcher event in {T:?}; errors: {errors:#?}")
            }
            Err(RecvTimeoutError::Disconnected) => panic!("watcher ended; errors: {errors:#?}"),
        }
    }
}

/// Events up to and including `InitDone`, after an `Init`: the names listed.
fn initial_list(rx: &Receiver<Ev>, errors: &mut Vec<String>) -> Vec<String> {
    assert_eq!(next(rx, errors), Ev::Init);
    let mut names = Vec::new();
    loop {
        match next(rx, errors) {
            Ev::InitApply(n) => names.push(n),
            Ev::InitDone => return names,
            other => panic!("unexpected {other:?} during the initial list"),
        }
    }
}

fn svc(name: &str, port: u16) -> serde_json::Value {
    objects::service("default", name, "10.96.0.1", &[("tcp", port, "TCP", 8080)]).expect("service")
}

fn no_more(rx: &Receiver<Ev>) {
    match rx.recv_timeout(Duration::from_millis(300)) {
        Err(RecvTimeoutError::Timeout) => {}
        other => panic!("unexpected watcher event {other:?}"),
    }
}

#[test]
fn kube_watcher_lists_in_pages_at_one_version_and_then_watches_from_it() {
    let api = ApiServer::start().expect("simulator");
    for i in 0..5 {
        api.apply(svc(&format!("svc-{i}"), 80)).expect("apply");
    }
    let list_rv = api.resource_version();
    let rt = runtime();
    let client = client(&rt, &api);
    let rx = drive(
        &rt,
        Api::<Service>::all(client),
        watcher::Config::default().page_size(2),
    );
    let mut errors = Vec::new();
    assert_eq!(
        initial_list(&rx, &mut errors),
        ["svc-0", "svc-1", "svc-2", "svc-3", "svc-4"]
    );
    api.wait_for_watches("services", 1, T).expect("watch");
    let reqs = api.requests();
    let lists: Vec<_> = reqs.iter().filter(|r| r.verb == Verb::List).collect();
    assert_eq!(lists.len(), 3, "5 items in pages of 2: {lists:#?}");
    assert!(
        lists.iter().all(|r| r.param("limit") == Some("2")),
        "{lists:#?}"
    );
    assert_eq!(
        lists
            .iter()
            .filter(|r| r.param("continue").is_some())
            .count(),
        2
    );
    let watch = reqs
        .iter()
        .find(|r| r.verb == Verb::Watch)
        .expect("watch request");
    assert_eq!(watch.path, "/api/v1/services");
    assert_eq!(
        watch.param("resourceVersion"),
        Some(list_rv.to_string().as_str())
    );
    assert_eq!(watch.param("allowWatchBookmarks"), Some("true"));
    assert!(errors.is_empty(), "{errors:#?}");

    let rv = api.apply(svc("svc-5", 80)).expect("add");
    assert_eq!(
        next(&rx, &mut errors),
        Ev::Apply("svc-5".into(), rv.to_string())
    );
    let rv = api.apply(svc("svc-1", 81)).expect("update");
    assert_eq!(
        next(&rx, &mut errors),
        Ev::Apply("svc-1".into(), rv.to_string())
    );
    let rv = api.delete("Service", "default", "svc-0").expect("delete");
    assert_eq!(
        next(&rx, &mut errors),
        Ev::Delete("svc-0".into(), rv.to_string()),
        "DELETED carries the deletion's version"
    );
    // A no-op update is no event.
    api.apply(svc("svc-5", 80)).expect("same again");
    no_more(&rx);
    assert!(errors.is_empty(), "{errors:#?}");
}

#[test]
fn kube_watcher_resumes_a_dropped_watch_from_its_last_bookmark_without_relisting() {
    let api = ApiServer::start().expect("simulator");
    api.apply(svc("a", 80)).expect("apply");
    let rt = runtime();
    let client = client(&rt, &api);
    let rx = drive(&rt, Api::<Service>::all(client), watcher::Config::default());
    let mut errors = Vec::new();
    assert_eq!(initial_list(&rx, &mut errors), ["a"]);
    api.wait_for_watches("services", 1, T).expect("watch");

    // Other kinds move the global version; only a bookmark tells the Service watcher about it.
    api.apply(objects::node("node-a", [192, 168, 0, 1].into()))
        .expect("node");
    let bookmark_rv = api.resource_version();
    api.send_bookmarks();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(api.drop_watches(), 1);
    api.wait_for_watches("services", 1, T).expect("re-watch");
    let rv = api.apply(svc("b", 80)).expect("apply");
    assert_eq!(
        next(&rx, &mut errors),
        Ev::Apply("b".into(), rv.to_string())
    );

    let watches: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.verb == Verb::Watch)
        .collect();
    assert_eq!(watches.len(), 2, "{watches:#?}");
    assert_eq!(
        watches[1].param("resourceVersion"),
        Some(bookmark_rv.to_string().as_str()),
        "the re-watch starts from the bookmark's version"
    );
    assert_eq!(api.count(Verb::List, "services"), 1, "no re-list");
    assert_eq!(errors.len(), 1, "one error for the cut stream: {errors:#?}");
}

#[test]
fn kube_watcher_relists_after_410_and_misses_nothing_deleted_meanwhile() {
    let api = ApiServer::start().expect("simulator");
    for n in ["a", "b", "c"] {
        api.apply(svc(n, 80)).expect("apply");
    }
    let rt = runtime();
    let client = client(&rt, &api);
    let rx = drive(&rt, Api::<Service>::all(client), watcher::Config::default());
    let mut errors = Vec::new();
    assert_eq!(initial_list(&rx, &mut errors), ["a", "b", "c"]);
    api.wait_for_watches("services", 1, T).expect("watch");

    // While the client cannot reach the server, "b" goes and the history of it goes too.
    api.set_reachable(false);
    api.delete("Service", "default", "b").expect("delete");
    api.apply(svc("c", 90)).expect("update");
    api.apply(svc("d", 80)).expect("add");
    api.compact();
    std::thread::sleep(Duration::from_millis(300));
    api.set_reachable(true);

    assert_eq!(initial_list(&rx, &mut errors), ["a", "c", "d"]);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("410") && e.contains("Expired")),
        "the watcher saw the 410: {errors:#?}"
    );
    let expired: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.verb == Verb::Watch && r.expired)
        .collect();
    assert_eq!(expired.len(), 1, "{expired:#?}");
    assert_eq!(
        expired[0].status, 200,
        "a watch gets its 410 inside the stream"
    );
    assert_eq!(api.count(Verb::List, "services"), 2, "one re-list");
    api.wait_for_watches("services", 1, T)
        .expect("watching again");
    let rv = api.delete("Service", "default", "a").expect("delete");
    assert_eq!(
        next(&rx, &mut errors),
        Ev::Delete("a".into(), rv.to_string())
    );
}

#[test]
fn kube_watcher_streaming_list_with_a_field_selector_sees_only_its_node() {
    let api = ApiServer::start().expect("simulator");
    api.apply(objects::node("node-a", [192, 168, 0, 1].into()))
        .expect("node-a");
    api.apply(objects::node("node-b", [192, 168, 0, 2].into()))
        .expect("node-b");
    let rt = runtime();
    let client = client(&rt, &api);
    let rx = drive(
        &rt,
        Api::<Node>::all(client.clone()),
        watcher::Config::default()
            .fields("metadata.name=node-a")
            .streaming_lists(),
    );
    let mut errors = Vec::new();
    assert_eq!(next(&rx, &mut errors), Ev::InitApply("node-a".into()));
    assert_eq!(next(&rx, &mut errors), Ev::InitDone);
    api.apply(objects::node("node-b", [192, 168, 0, 3].into()))
        .expect("node-b changes");
    let rv = api
        .apply(objects::node("node-a", [192, 168, 0, 4].into()))
        .expect("node-a changes");
    assert_eq!(
        next(&rx, &mut errors),
        Ev::Apply("node-a".into(), rv.to_string())
    );
    assert!(errors.is_empty(), "{errors:#?}");
    let watch = api
        .requests()
        .into_iter()
        .find(|r| r.verb == Verb::Watch)
        .expect("watch");
    assert_eq!(watch.param("fieldSelector"), Some("metadata.name=node-a"));
    assert_eq!(watch.param("sendInitialEvents"), Some("true"));
    assert_eq!(api.count(Verb::List, "nodes"), 0);

    // The list-then-watch way with the same selector.
    let rx = drive(
        &rt,
        Api::<Node>::all(client),
        watcher::Config::default().fields("metadata.name=node-b"),
    );
    assert_eq!(initial_list(&rx, &mut errors), ["node-b"]);
}

#[test]
fn kube_client_lists_gets_patches_and_sees_an_expired_continue_token() {
    let api = ApiServer::start().expect("simulator");
    for n in ["a", "b", "c"] {
        let slice = objects::endpointslice(
            "prod",
            &format!("{n}-1"),
            n,
            &[("tcp", 8080, "TCP")],
            &[([10, 0, 0, 10].into(), true)],
        )
        .expect("slice");
        api.apply(slice).expect("apply");
    }
    let rt = runtime();
    let client = client(&rt, &api);
    rt.block_on(async {
        let version = client.apiserver_version().await.expect("/version");
        assert_eq!(version.major, "1");

        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "prod");
        let page = slices
            .list(&ListParams::default().limit(2))
            .await
            .expect("list");
        assert_eq!(page.items.len(), 2);
        assert_eq!(page.metadata.remaining_item_count, Some(1));
        let token = page.metadata.continue_.clone().expect("continue token");
        let empty: Api<EndpointSlice> = Api::namespaced(client.clone(), "other");
        assert!(
            empty
                .list(&ListParams::default())
                .await
                .expect("list")
                .items
                .is_empty()
        );

        let one = slices.get("b-1").await.expect("get");
        assert_eq!(
            one.endpoints.unwrap_or_default()[0].addresses,
            ["10.0.0.10"]
        );
        let missing = slices.get("zzz").await.expect_err("404");
        assert!(
            matches!(&missing, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound"),
            "{missing:?}"
        );

        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        api.apply(svc("web", 80)).expect("service");
        let patched = services
            .patch_status(
                "web",
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"status": {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}}),
                ),
            )
            .await
            .expect("patch status");
        let ingress = patched
            .status
            .and_then(|s| s.load_balancer)
            .and_then(|lb| lb.ingress)
            .unwrap_or_default();
        assert_eq!(ingress[0].ip.as_deref(), Some("1.2.3.4"));

        api.compact();
        let expired = slices
            .list(&ListParams::default().limit(2).continue_token(&token))
            .await
            .expect_err("continuing a compacted list");
        assert!(
            matches!(&expired, kube::Error::Api(s) if s.code == 410 && s.reason == "Expired"),
            "{expired:?}"
        );
    });
    assert!(
        api.requests()
            .iter()
            .any(|r| r.status == 410 && r.verb == Verb::List)
    );
    // Without the kubeconfig's token: 401 with a Status, as from a server with anonymous access disabled.
    let anonymous = crate::client::http_get(api.addr(), "/api/v1/services", T).expect("GET");
    assert_eq!(anonymous.status, 401, "{anonymous:?}");
    assert!(
        anonymous.body.contains("\"reason\":\"Unauthorized\""),
        "{anonymous:?}"
    );
    assert_eq!(api.count(Verb::Patch, "services"), 1);
}
