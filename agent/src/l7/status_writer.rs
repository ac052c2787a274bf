//! Writes HTTPRoute status (`status.parents[]` entries under [`CONTROLLER_NAME`]) to the API server
//! in Kubernetes mode, through a merge patch of the status subresource. Entries of other controllers
//! (a Gateway's, say) are kept; a condition keeps its `lastTransitionTime` while its status holds.
use std::collections::BTreeMap;

use anyhow::Context as _;
use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::l7::status::{CONTROLLER_NAME, RouteStatus};

/// After a failed write, try again this soon.
const RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// Follows the computed statuses and writes each route's when it changes. Runs until `rx` closes.
pub async fn run(client: Client, mut rx: watch::Receiver<Vec<RouteStatus>>) {
    let mut written: BTreeMap<String, RouteStatus> = BTreeMap::new();
    let mut retry = false;
    loop {
        if retry {
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(RETRY) => {}
            }
        } else if rx.changed().await.is_err() {
            return;
        }
        retry = false;
        let statuses = rx.borrow_and_update().clone();
        written.retain(|route, _| statuses.iter().any(|s| s.route == *route));
        for status in statuses {
            if written.get(&status.route) == Some(&status) {
                continue;
            }
            match write(&client, &status).await {
                Ok(()) => {
                    written.insert(status.route.clone(), status);
                }
                Err(e) => {
                    warn!(route = %status.route, "writing HTTPRoute status: {e:#}");
                    retry = true;
                }
            }
        }
    }
}

fn entry_key(entry: &Value) -> (Value, Value) {
    (
        entry.get("parentRef").cloned().unwrap_or(Value::Null),
        entry.get("controllerName").cloned().unwrap_or(Value::Null),
    )
}

async fn write(client: &Client, status: &RouteStatus) -> anyhow::Result<()> {
    let (namespace, name) = status
        .route
        .split_once('/')
        .context("route id without a namespace")?;
    let api: Api<HttpRoute> = Api::namespaced(client.clone(), namespace);
    let current = api.get(name).await.context("reading the route")?;
    let existing: Vec<Value> = current
        .status
        .as_ref()
        .map(|s| serde_json::to_value(&s.parents))
        .transpose()
        .context("encoding the current status")?
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    let now = Timestamp::now().to_string();
    let generation = current.metadata.generation.or(status.generation);
    let mut parents: Vec<Value> = existing
        .iter()
        .filter(|e| e.get("controllerName").and_then(Value::as_str) != Some(CONTROLLER_NAME))
        .cloned()
        .collect();
    for p in &status.parents {
        let key = (p.parent_ref.clone(), Value::from(CONTROLLER_NAME));
        let previous = existing.iter().find(|e| entry_key(e) == key);
        let conditions: Vec<Value> = p
            .conditions
            .iter()
            .map(|c| {
                let kept = previous
                    .and_then(|e| e.get("conditions"))
                    .and_then(Value::as_array)
                    .and_then(|cs| {
                        cs.iter().find(|old| {
                            old.get("type").and_then(Value::as_str) == Some(c.kind.as_str())
                                && old.get("status").and_then(Value::as_str)
                                    == Some(c.status.as_str())
                        })
                    })
                    .and_then(|old| old.get("lastTransitionTime").cloned());
                json!({
                    "type": c.kind,
                    "status": c.status,
                    "reason": c.reason,
                    "message": c.message,
                    "observedGeneration": generation.unwrap_or(0),
                    "lastTransitionTime": kept.unwrap_or_else(|| Value::from(now.clone())),
                })
            })
            .collect();
        parents.push(json!({
            "parentRef": p.parent_ref,
            "controllerName": CONTROLLER_NAME,
            "conditions": conditions,
        }));
    }
    if parents == existing {
        debug!(route = %status.route, "HTTPRoute status already current");
        return Ok(());
    }
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"parents": parents}})),
    )
    .await
    .context("patching the route's status")?;
    Ok(())
}
