//! The OpenAPI document at `/openapi.json`: generated from the handlers and
//! their types, it lists every route the server answers (and the server
//! answers every route it lists), its references resolve, and schemathesis
//! driving the API from it finds no server error and no response that
//! breaks it.

use serde_json::Value;

use crate::common::{run_python_script, start_server, TestResult};

const ADMIN: &str = "sk-admin-openapi";

/// Every `.route(` written in the API's source: routes that bypass the
/// documented `routes!(…)` list (only the playground's static files may).
fn undocumented_routes() -> Vec<String> {
    fn walk(dir: &std::path::Path, found: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("playground.rs") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                found
                    .extend(text.lines().filter(|l| l.contains(".route(")).map(|l| format!("{}: {l}", path.display())));
            }
        }
    }
    let mut found = Vec::new();
    walk(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src/api")), &mut found);
    found
}

#[tokio::test]
async fn the_document_and_the_router_list_the_same_routes_and_schemathesis_finds_nothing() -> TestResult {
    assert!(undocumented_routes().is_empty(), "routes outside the document: {:?}", undocumented_routes());
    let data = tempfile::tempdir()?;
    let data_dir = data.path().display().to_string();
    // Short generations (the context capped), every route reachable with the admin key.
    let addr = start_server(&[
        "--api-key",
        "sk-user-openapi",
        "--admin-api-key",
        ADMIN,
        "--enable-lora-loading",
        "--max-model-len",
        "64",
        "--data-dir",
        &data_dir,
    ]);
    let client = reqwest::Client::new();
    let doc: Value = client.get(format!("http://{addr}/openapi.json")).send().await?.json().await?;
    assert_eq!(doc["openapi"], "3.1.0", "{doc}");
    let text = doc.to_string();
    let schemas = doc["components"]["schemas"].as_object().ok_or("schemas")?;
    for reference in text.split("\"#/components/schemas/").skip(1) {
        let name = reference.split('"').next().unwrap_or_default();
        assert!(schemas.contains_key(name), "a reference to a schema that is not there: {name}");
    }
    let paths = doc["paths"].as_object().ok_or("paths")?;
    assert!(paths.len() >= 24, "{} paths", paths.len());
    for (path, operations) in paths {
        let concrete = path.replace("{id}", "x").replace("{name}", "x");
        for method in operations.as_object().ok_or("operations")?.keys() {
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes())?;
            let response = client
                .request(method.clone(), format!("http://{addr}{concrete}"))
                .bearer_auth(ADMIN)
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await?;
            let status = response.status().as_u16();
            let body = response.text().await?;
            // The router's fallbacks: a route or method it does not have.
            assert!(
                status != 405 && !body.contains("no such route"),
                "{method} {path} is listed but not served: {status} {body}"
            );
        }
    }
    let base = format!("http://{addr}");
    tokio::task::spawn_blocking(move || {
        run_python_script("openapi_schemathesis.py", &[&base, ADMIN], "schemathesis").map_err(|e| e.to_string())
    })
    .await??;
    Ok(())
}
