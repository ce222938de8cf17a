//! Integration tests: each simulator driven over HTTP with reqwest, as the connectors use them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dualwrite_simulators::{
    ColumnKind, DataverseConfig, DataverseSim, EntraClient, EntraConfig, EntraSim, Fault,
    FnoConfig, FnoEntityDef, FnoEventFormat, FnoEventRegistration, FnoKeyKind, FnoKeyType,
    FnoMessage, FnoSim, TableDef, ThrottleConfig, WebhookAuth, WebhookMessage, WebhookRegistration,
};
use serde_json::{Value, json};

mod batch;

fn accounts() -> TableDef {
    TableDef {
        entity_set: "accounts".into(),
        logical_name: "account".into(),
        primary_id: "accountid".into(),
        alternate_keys: vec![
            vec!["accountnumber".into()],
            vec!["accountnumber".into(), "msdyn_company".into()],
        ],
        key_lookups: vec!["msdyn_company".into()],
    }
}

fn currencies() -> TableDef {
    TableDef {
        entity_set: "transactioncurrencies".into(),
        logical_name: "transactioncurrency".into(),
        primary_id: "transactioncurrencyid".into(),
        alternate_keys: vec![vec!["isocurrencycode".into()]],
        key_lookups: Vec::new(),
    }
}

async fn dataverse() -> (DataverseSim, reqwest::Client) {
    let sim = DataverseSim::start(DataverseConfig {
        tables: vec![accounts(), currencies()],
        ..Default::default()
    })
    .await
    .unwrap();
    (sim, reqwest::Client::new())
}

async fn body(resp: reqwest::Response) -> Value {
    resp.json().await.unwrap()
}

/// A tiny receiver that records every POST (headers + body + query) and answers with scripted statuses.
#[derive(Clone, Default)]
struct Receiver {
    calls: Arc<Mutex<Vec<(String, axum::http::HeaderMap, Value)>>>,
    statuses: Arc<Mutex<Vec<u16>>>,
}

async fn receiver(statuses: Vec<u16>) -> (String, Receiver) {
    let r = Receiver {
        statuses: Arc::new(Mutex::new(statuses)),
        ..Default::default()
    };
    let rr = r.clone();
    let app = axum::Router::new().fallback(
        move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let rr = rr.clone();
            async move {
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                rr.calls.lock().unwrap().push((uri.to_string(), headers, v));
                let mut s = rr.statuses.lock().unwrap();
                let code = if s.is_empty() { 200 } else { s.remove(0) };
                axum::http::StatusCode::from_u16(code).unwrap()
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, r)
}

#[tokio::test]
async fn entra_issues_scoped_tokens_and_rejects_bad_clients() {
    let entra = EntraSim::start(EntraConfig {
        clients: vec![EntraClient {
            tenant: "contoso".into(),
            client_id: "app1".into(),
            client_secret: "s3cret".into(),
            allowed_scopes: vec!["https://org.crm.dynamics.com/.default".into()],
        }],
        ..Default::default()
    })
    .await
    .unwrap();
    let c = reqwest::Client::new();
    let form = |secret: &str, scope: &str| {
        format!(
            "client_id=app1&scope={}&client_secret={secret}&grant_type=client_credentials",
            scope.replace(':', "%3A").replace('/', "%2F")
        )
    };
    let ok = c
        .post(entra.token_url("contoso"))
        .body(form("s3cret", "https://org.crm.dynamics.com/.default"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let v = body(ok).await;
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["expires_in"], 3599);
    assert!(v["access_token"].as_str().unwrap().len() > 20);
    let bad_secret = c
        .post(entra.token_url("contoso"))
        .body(form("nope", "https://org.crm.dynamics.com/.default"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_secret.status(), 401);
    assert_eq!(body(bad_secret).await["error"], "invalid_client");
    let bad_scope = c
        .post(entra.token_url("contoso"))
        .body(form("s3cret", "https://other/.default"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_scope.status(), 400);
    let v = body(bad_scope).await;
    assert_eq!(v["error"], "invalid_scope");
    assert_eq!(v["error_codes"][0], 70011);
    assert!(
        v["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS70011")
    );
    assert_eq!(entra.tokens_issued(), 1);
}

#[tokio::test]
async fn dataverse_requires_a_token_for_its_own_scope() {
    let entra = EntraSim::start(EntraConfig::default()).await.unwrap();
    let sim = DataverseSim::start(DataverseConfig {
        tables: vec![accounts()],
        auth: Some(entra.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    entra.add_client(EntraClient {
        tenant: "t".into(),
        client_id: "c".into(),
        client_secret: "s".into(),
        allowed_scopes: vec![],
    });
    let c = reqwest::Client::new();
    let get_token = |scope: String| {
        let c = c.clone();
        let url = entra.token_url("t");
        async move {
            let v: Value = c
                .post(url)
                .form(&[
                    ("client_id", "c"),
                    ("client_secret", "s"),
                    ("grant_type", "client_credentials"),
                    ("scope", scope.as_str()),
                ])
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["access_token"].as_str().unwrap().to_owned()
        }
    };
    let url = format!("{}accounts", sim.api_url());
    assert_eq!(c.get(&url).send().await.unwrap().status(), 401);
    let wrong = get_token("https://elsewhere.crm.dynamics.com/.default".into()).await;
    assert_eq!(
        c.get(&url)
            .bearer_auth(&wrong)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let good = get_token(format!("{}/.default", sim.base_url())).await;
    assert_eq!(
        c.get(&url)
            .bearer_auth(&good)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    entra.expire_all_tokens();
    assert_eq!(
        c.get(&url)
            .bearer_auth(&good)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(sim.stats().unauthorized, 3);
}

#[tokio::test]
async fn dataverse_create_get_update_delete_by_id() {
    let (sim, c) = dataverse().await;
    let api = sim.api_url();
    let r = c
        .post(format!("{api}accounts"))
        .json(&json!({"name": "Contoso", "accountnumber": "A1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let loc = r.headers()["odata-entityid"].to_str().unwrap().to_owned();
    assert!(loc.starts_with(&format!("{api}accounts(")));
    let got = body(c.get(&loc).send().await.unwrap()).await;
    assert_eq!(got["name"], "Contoso");
    let etag = got["@odata.etag"].as_str().unwrap().to_owned();
    assert!(etag.starts_with("W/\""));
    assert!(got["createdon"].as_str().unwrap().ends_with('Z'));
    // 304 when unchanged
    assert_eq!(
        c.get(&loc)
            .header("If-None-Match", &etag)
            .send()
            .await
            .unwrap()
            .status(),
        304
    );
    // update with matching etag, then stale etag → 412
    let r = c
        .patch(&loc)
        .header("If-Match", &etag)
        .json(&json!({"name": "Contoso 2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = c
        .patch(&loc)
        .header("If-Match", &etag)
        .json(&json!({"name": "Contoso 3"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412);
    let e = body(r).await;
    assert_eq!(e["error"]["code"], "0x80060882");
    assert_eq!(
        e["error"]["message"],
        "The version of the existing record doesn't match the RowVersion property provided."
    );
    let got2 = body(c.get(&loc).send().await.unwrap()).await;
    assert_ne!(got2["versionnumber"], got["versionnumber"]);
    assert_eq!(got2["name"], "Contoso 2");
    // return=representation on create
    let r = c
        .post(format!("{api}accounts"))
        .header("Prefer", "return=representation")
        .json(&json!({"name": "B"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(body(r).await["name"], "B");
    // delete with stale etag, then for real
    assert_eq!(
        c.delete(&loc)
            .header("If-Match", &etag)
            .send()
            .await
            .unwrap()
            .status(),
        412
    );
    assert_eq!(c.delete(&loc).send().await.unwrap().status(), 204);
    let r = c.get(&loc).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(body(r).await["error"]["code"], "0x80040217");
    // If-Match: * on a missing row → 404, not an upsert
    let missing = format!("{api}accounts(00000000-0000-4000-8000-000000000099)");
    assert_eq!(
        c.patch(&missing)
            .header("If-Match", "*")
            .json(&json!({"name": "x"}))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(sim.rows("accounts").len(), 1);
}

#[tokio::test]
async fn dataverse_upsert_by_alternate_key_and_lookups() {
    let (sim, c) = dataverse().await;
    let api = sim.api_url();
    c.post(format!("{api}transactioncurrencies"))
        .json(&json!({"isocurrencycode": "USD"}))
        .send()
        .await
        .unwrap();
    let url = format!("{api}accounts(accountnumber='O''Neil')");
    let r = c
        .patch(&url)
        .header("Prefer", "return=representation")
        .json(&json!({"name": "first", "transactioncurrencyid@odata.bind": "/transactioncurrencies(isocurrencycode='USD')"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert!(r.headers()["etag"].to_str().unwrap().starts_with("W/\""));
    let created = body(r).await;
    assert_eq!(created["accountnumber"], "O'Neil");
    let id = created["accountid"].as_str().unwrap().to_owned();
    let r = c
        .patch(&url)
        .header("Prefer", "return=representation")
        .json(&json!({"name": "second"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(body(r).await["accountid"], id.as_str());
    assert_eq!(
        c.patch(&url)
            .json(&json!({"name": "third"}))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    let r = c
        .patch(&url)
        .header("If-None-Match", "*")
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412);
    assert_eq!(
        body(r).await["error"]["message"],
        "A record with matching key values already exists."
    );
    let got = c
        .get(&url)
        .header("Prefer", "odata.include-annotations=\"*\"")
        .query(&[("$select", "name,_transactioncurrencyid_value")])
        .send()
        .await
        .unwrap();
    let got = body(got).await;
    assert_eq!(got["name"], "third");
    assert!(got["_transactioncurrencyid_value"].as_str().is_some());
    assert_eq!(
        got["_transactioncurrencyid_value@Microsoft.Dynamics.CRM.lookuplogicalname"],
        "transactioncurrency"
    );
    // unknown lookup target
    let r = c
        .patch(&url)
        .json(&json!({"transactioncurrencyid@odata.bind": "/transactioncurrencies(isocurrencycode='EUR')"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(
        body(r).await["error"]["message"]
            .as_str()
            .unwrap()
            .contains("transactioncurrency")
    );
    // compound key with a lookup
    let co = "6d81597f-0f9f-e711-8122-000d3aa2331c";
    let url2 = format!("{api}accounts(accountnumber='C1',_msdyn_company_value={co})");
    assert_eq!(
        c.patch(&url2)
            .json(&json!({"name": "by compound"}))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    let got = body(c.get(&url2).send().await.unwrap()).await;
    assert_eq!(got["_msdyn_company_value"], co);
    assert_eq!(sim.rows("accounts").len(), 2);
}

/// Change tracking as the reference describes it: the first read pages and ends with a
/// deltaLink covering what changed while it was paged; following the deltaLink gives the
/// changed rows and a `$deletedEntity` per deleted row, and a new deltaLink; `$filter`,
/// `$orderby` and `$top` are refused with tracking.
#[tokio::test]
async fn dataverse_change_tracking_reports_changes_and_deletions_since_its_token() {
    let (sim, c) = dataverse().await;
    let mut ids = Vec::new();
    for i in 0..25 {
        let row = sim
            .user_create("accounts", json!({"name": format!("t{i}")}))
            .unwrap();
        ids.push(row["accountid"].as_str().unwrap().to_owned());
    }
    let get = |url: String| {
        let c = c.clone();
        async move {
            let r = c
                .get(&url)
                .header("Prefer", "odata.track-changes, odata.maxpagesize=10")
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let applied = r
                .headers()
                .get("preference-applied")
                .map(|v| v.to_str().unwrap().to_owned());
            (status, applied, body(r).await)
        }
    };
    let mut url = format!("{}accounts?$select=accountid", sim.api_url());
    let mut seen = Vec::new();
    let mut pages = 0;
    let mut deleted_while_paging = String::new();
    let delta = loop {
        let (status, applied, v) = get(url.clone()).await;
        assert_eq!(status, 200, "{v}");
        assert!(applied.unwrap().contains("odata.track-changes"));
        for row in v["value"].as_array().unwrap() {
            seen.push(row["accountid"].as_str().unwrap().to_owned());
        }
        pages += 1;
        if pages == 1 {
            // A row deleted while the first read pages is reported by its deltaLink.
            deleted_while_paging = ids.iter().find(|id| !seen.contains(id)).unwrap().clone();
            sim.user_delete("accounts", &deleted_while_paging).unwrap();
        }
        match (
            v["@odata.nextLink"].as_str(),
            v["@odata.deltaLink"].as_str(),
        ) {
            (Some(next), None) => url = next.to_owned(),
            (None, Some(delta)) => break delta.to_owned(),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 24, "the row deleted while paging is not read");
    assert!(delta.contains("$deltatoken="), "{delta}");

    let (gone, changed) = {
        let mut rest = ids.iter().filter(|id| **id != deleted_while_paging);
        (rest.next().unwrap().clone(), rest.next().unwrap().clone())
    };
    sim.user_delete("accounts", &gone).unwrap();
    sim.user_edit("accounts", &changed, json!({"name": "changed"}))
        .unwrap();
    let (status, _, v) = get(delta).await;
    assert_eq!(status, 200, "{v}");
    let value = v["value"].as_array().unwrap();
    let deleted: Vec<&str> = value
        .iter()
        .filter(|e| {
            e["@odata.context"]
                .as_str()
                .is_some_and(|c| c.ends_with("accounts/$deletedEntity"))
        })
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    let mut want = vec![gone.as_str(), deleted_while_paging.as_str()];
    want.sort_unstable();
    let mut got = deleted.clone();
    got.sort_unstable();
    assert_eq!(got, want);
    assert!(
        value
            .iter()
            .all(|e| e["reason"] == "deleted" || e["accountid"] == changed.as_str())
    );
    assert_eq!(value.len(), 3, "two deletions and the changed row: {v}");
    let next = v["@odata.deltaLink"].as_str().unwrap().to_owned();
    let (_, _, v) = get(next).await;
    assert_eq!(v["value"], json!([]), "nothing since");

    for option in ["$filter=name eq 'x'", "$orderby=name", "$top=5"] {
        let (status, _, v) = get(format!(
            "{}accounts?$select=accountid&{option}",
            sim.api_url()
        ))
        .await;
        assert_eq!(status, 400, "{option}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("change tracking"),
            "{v}"
        );
    }
}

#[tokio::test]
async fn dataverse_paging_follows_next_links_without_gaps() {
    let (sim, c) = dataverse().await;
    for i in 0..1234 {
        sim.user_create("accounts", json!({"name": format!("n{i}"), "revenue": i}))
            .unwrap();
    }
    let mut url = format!(
        "{}accounts?$select=name&$filter=revenue ge 100",
        sim.api_url()
    );
    let mut seen = std::collections::HashSet::new();
    let mut pages = 0;
    loop {
        let r = c
            .get(&url)
            .header("Prefer", "odata.maxpagesize=100")
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["preference-applied"], "odata.maxpagesize=100");
        let v = body(r).await;
        for row in v["value"].as_array().unwrap() {
            assert!(
                seen.insert(row["accountid"].as_str().unwrap().to_owned()),
                "duplicate row"
            );
        }
        pages += 1;
        match v["@odata.nextLink"].as_str() {
            Some(next) => {
                assert!(next.contains("$skiptoken=%3Ccookie"));
                url = next.to_owned();
            }
            None => break,
        }
    }
    assert_eq!(seen.len(), 1134);
    assert_eq!(pages, 12);
    let r = c
        .get(format!("{}accounts?$skip=10", sim.api_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn dataverse_batch_changesets_are_atomic() {
    let (sim, c) = dataverse().await;
    let api = sim.api_url();
    let part = |cid: u32, method: &str, url: &str, body: &str| {
        format!(
            "--cs\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: {cid}\r\n\r\n{method} {url} HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{body}\r\n"
        )
    };
    let batch = |parts: String| {
        format!(
            "--batch_x\r\nContent-Type: multipart/mixed; boundary=cs\r\n\r\n{parts}--cs--\r\n--batch_x--\r\n"
        )
    };
    // good change set with a $1 reference
    let ok = batch(format!(
        "{}{}",
        part(
            1,
            "POST",
            &format!("{api}accounts"),
            r#"{"name":"parent","accountnumber":"P"}"#
        ),
        part(2, "PATCH", "$1", r#"{"name":"parent renamed"}"#)
    ));
    let r = c
        .post(format!("{api}$batch"))
        .header("Content-Type", "multipart/mixed; boundary=batch_x")
        .body(ok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert_eq!(text.matches("HTTP/1.1 204").count(), 2, "{text}");
    assert_eq!(sim.rows("accounts")[0]["name"], "parent renamed");
    // second request fails (duplicate key) → first is rolled back
    let bad = batch(format!(
        "{}{}",
        part(
            1,
            "POST",
            "/api/data/v9.2/accounts",
            r#"{"name":"new","accountnumber":"N"}"#
        ),
        part(
            2,
            "POST",
            "accounts",
            r#"{"name":"dup","accountnumber":"P"}"#
        )
    ));
    let r = c
        .post(format!("{api}$batch"))
        .header("Content-Type", "multipart/mixed; boundary=batch_x")
        .body(bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("HTTP/1.1 412"));
    assert_eq!(sim.rows("accounts").len(), 1);
}

#[tokio::test]
async fn dataverse_upsert_multiple_is_all_or_nothing() {
    let (sim, c) = dataverse().await;
    let url = format!(
        "{}accounts/Microsoft.Dynamics.CRM.UpsertMultiple",
        sim.api_url()
    );
    let t = |k: &str| json!({"@odata.type": "Microsoft.Dynamics.CRM.account", "@odata.id": format!("accounts(accountnumber='{k}')"), "name": k});
    let r = c
        .post(&url)
        .json(&json!({"Targets": [t("a"), t("b")]}))
        .send()
        .await
        .unwrap();
    // As Dataverse: 204 No Content, no UpsertMultipleResponse (no ids).
    assert_eq!(r.status(), 204);
    assert!(r.text().await.unwrap().is_empty());
    assert_eq!(sim.rows("accounts").len(), 2);
    let r = c.post(&url).json(&json!({"Targets": [t("c"), {"@odata.type": "Microsoft.Dynamics.CRM.contact", "name": "wrong"}]})).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(sim.rows("accounts").len(), 2);
    let r = c
        .post(format!(
            "{}accounts/Microsoft.Dynamics.CRM.CreateMultiple",
            sim.api_url()
        ))
        .json(&json!({"Targets": [t("d")]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(sim.rows("accounts").len(), 3);
}

#[tokio::test]
async fn dataverse_throttles_with_retry_after_and_injects_faults() {
    let (sim, c) = dataverse().await;
    sim.set_throttle(ThrottleConfig {
        requests_per_window: Some(3),
        window: Duration::from_secs(30),
        max_concurrent: None,
    });
    let url = format!("{}accounts", sim.api_url());
    for _ in 0..3 {
        assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    }
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry));
    let e = body(r).await;
    assert_eq!(e["error"]["code"], "0x80072322");
    assert_eq!(
        e["error"]["message"],
        "Number of requests exceeded the limit of 3 over time window of 30 seconds."
    );
    assert_eq!(sim.stats().throttled, 1);
    sim.set_throttle(ThrottleConfig::default());
    sim.inject_faults([Fault::Status(503), Fault::DropConnection]);
    assert_eq!(c.get(&url).send().await.unwrap().status(), 503);
    assert!(
        c.get(&url).send().await.is_err(),
        "dropped connection must not produce a response"
    );
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    assert_eq!(sim.stats().faults, 2);
}

#[tokio::test]
async fn dataverse_webhook_matches_the_documented_shape() {
    let (sim, c) = dataverse().await;
    sim.set_column_kind("accounts", "statuscode", ColumnKind::OptionSet)
        .unwrap();
    let (url, rec) = receiver(vec![]).await;
    sim.register_webhook(WebhookRegistration {
        url,
        entity_logical_names: vec!["account".into()],
        messages: vec![
            WebhookMessage::Create,
            WebhookMessage::Update,
            WebhookMessage::Delete,
        ],
        auth: WebhookAuth::WebhookKey("k3y".into()),
    });
    let r = c
        .post(format!("{}accounts?tag=dualwrite", sim.api_url()))
        .json(&json!({"name": "A", "statuscode": 1}))
        .send()
        .await
        .unwrap();
    let loc = r.headers()["odata-entityid"].to_str().unwrap().to_owned();
    let id = loc
        .rsplit_once('(')
        .unwrap()
        .1
        .trim_end_matches(')')
        .to_owned();
    sim.user_edit("accounts", &id, json!({"name": "B"}))
        .unwrap();
    sim.user_delete("accounts", &id).unwrap();
    assert!(sim.wait_webhooks_idle(Duration::from_secs(5)).await);
    let calls = rec.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 3);
    let fixture: Value = serde_json::from_str(include_str!(
        "../fixtures/dataverse-webhook-contact-update.json"
    ))
    .unwrap();
    let (uri, headers, create) = &calls[0];
    assert!(uri.ends_with("?code=k3y"));
    assert_eq!(headers["x-ms-dynamics-entity-name"], "account");
    assert_eq!(headers["x-ms-dynamics-request-name"], "Create");
    assert!(headers.contains_key("x-ms-correlation-request-id"));
    assert_eq!(
        create["SharedVariables"][0],
        json!({"key": "tag", "value": "dualwrite"})
    );
    let (_, _, update) = &calls[1];
    for k in fixture.as_object().unwrap().keys() {
        assert!(update.get(k).is_some(), "webhook body lacks {k}");
    }
    for k in fixture["InputParameters"][0]["value"]
        .as_object()
        .unwrap()
        .keys()
    {
        assert!(
            update["InputParameters"][0]["value"].get(k).is_some(),
            "webhook Target lacks {k}"
        );
    }
    assert_eq!(update["MessageName"], "Update");
    assert_eq!(update["Stage"], 40);
    assert_eq!(update["Mode"], 1);
    assert_eq!(update["PrimaryEntityId"], id.as_str());
    assert_ne!(update["OperationId"], create["OperationId"]);
    let attrs = update["InputParameters"][0]["value"]["Attributes"]
        .as_array()
        .unwrap();
    let attr = |k: &str| {
        attrs
            .iter()
            .find(|a| a["key"] == k)
            .map(|a| a["value"].clone())
    };
    assert_eq!(attr("name"), Some(json!("B")));
    assert_eq!(attr("accountid"), Some(json!(id)));
    assert!(
        attr("modifiedon")
            .unwrap()
            .as_str()
            .unwrap()
            .starts_with("/Date(")
    );
    assert_eq!(attr("modifiedby").unwrap()["LogicalName"], "systemuser");
    let post = &update["PostEntityImages"][0]["value"]["Attributes"];
    let status = post
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["key"] == "statuscode")
        .unwrap();
    assert_eq!(status["value"]["Value"], 1);
    assert!(
        status["value"]["__type"]
            .as_str()
            .unwrap()
            .starts_with("OptionSetValue:")
    );
    assert_ne!(
        update["UserId"], create["UserId"],
        "UI edits and API writes act as different users"
    );
    let (_, _, delete) = &calls[2];
    assert_eq!(delete["MessageName"], "Delete");
    assert!(
        delete["InputParameters"][0]["value"]["__type"]
            .as_str()
            .unwrap()
            .starts_with("EntityReference:")
    );
}

#[tokio::test]
async fn dataverse_webhook_retries_once_on_gateway_errors_and_records_failures() {
    let (sim, _) = dataverse().await;
    let (url, rec) = receiver(vec![503, 200, 500]).await;
    sim.register_webhook(WebhookRegistration {
        url,
        entity_logical_names: vec![],
        messages: vec![WebhookMessage::Create],
        auth: WebhookAuth::HttpHeader(vec![("x-key".into(), "v".into())]),
    });
    sim.set_msg_size_exceeded(true);
    sim.user_create("accounts", json!({"name": "one"})).unwrap();
    assert!(sim.wait_webhooks_idle(Duration::from_secs(5)).await);
    sim.user_create("accounts", json!({"name": "two"})).unwrap();
    assert!(sim.wait_webhooks_idle(Duration::from_secs(5)).await);
    let calls = rec.calls.lock().unwrap().clone();
    assert_eq!(
        calls.len(),
        3,
        "503 gets exactly one more attempt, 500 none"
    );
    assert_eq!(calls[0].1["x-key"], "v");
    assert_eq!(calls[0].1["x-ms-dynamics-msg-size-exceeded"], "true");
    assert_eq!(calls[0].2["InputParameters"], json!([]));
    let failed = sim.failed_webhook_deliveries();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].status, Some(500));
    assert_eq!(sim.webhook_deliveries().len(), 2);
}

/// Dataverse leaves null columns out of entity images; a column the request set to null is in
/// the Target, as null.
#[tokio::test]
async fn images_leave_null_columns_out_and_the_target_keeps_a_column_set_to_null() {
    let (sim, _) = dataverse().await;
    let (url, rec) = receiver(vec![]).await;
    sim.register_webhook(WebhookRegistration {
        url,
        entity_logical_names: vec![],
        messages: vec![WebhookMessage::Create, WebhookMessage::Update],
        auth: WebhookAuth::HttpHeader(vec![]),
    });
    let created = sim
        .user_create(
            "accounts",
            json!({"name": "one", "telephone1": "555", "description": null}),
        )
        .unwrap();
    let id = created["accountid"].as_str().unwrap().to_owned();
    sim.user_edit("accounts", &id, json!({"telephone1": null}))
        .unwrap();
    assert!(sim.wait_webhooks_idle(Duration::from_secs(5)).await);
    let calls = rec.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2);
    let keys = |list: &Value| -> Vec<(String, Value)> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|kv| (kv["key"].as_str().unwrap().to_owned(), kv["value"].clone()))
            .collect()
    };
    for (_, _, body) in &calls {
        let image = keys(&body["PostEntityImages"][0]["value"]["Attributes"]);
        assert!(
            image.iter().all(|(_, v)| !v.is_null()),
            "no null in the image: {image:?}"
        );
        assert!(!image.iter().any(|(k, _)| k == "description"));
    }
    let update_target = keys(&calls[1].2["InputParameters"][0]["value"]["Attributes"]);
    assert!(
        update_target.contains(&("telephone1".to_string(), Value::Null)),
        "{update_target:?}"
    );
    let update_image = keys(&calls[1].2["PostEntityImages"][0]["value"]["Attributes"]);
    assert!(!update_image.iter().any(|(k, _)| k == "telephone1"));
}

/// A synchronous step is called inside the change: its refusal fails the change (rolled back,
/// the caller told), its 2xx lets it commit; its body says Mode 0, in transaction, with no
/// system job (empty OperationId). Asynchronous steps are notified only of committed changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_step_vetoes_or_lets_the_change_commit() {
    let (sim, c) = dataverse().await;
    let (sync_url, sync_rec) = receiver(vec![500]).await;
    let (async_url, async_rec) = receiver(vec![]).await;
    sim.register_sync_webhook(WebhookRegistration {
        url: sync_url,
        entity_logical_names: vec!["account".into()],
        messages: vec![WebhookMessage::Create, WebhookMessage::Update],
        auth: WebhookAuth::WebhookKey("k+1".into()),
    });
    sim.register_webhook(WebhookRegistration {
        url: async_url,
        entity_logical_names: vec![],
        messages: vec![WebhookMessage::Create, WebhookMessage::Update],
        auth: WebhookAuth::HttpHeader(vec![]),
    });

    // The step answers 500: the user's create fails and nothing is stored or notified.
    let refused = sim
        .user_create("accounts", json!({"name": "vetoed"}))
        .unwrap_err()
        .to_string();
    assert!(refused.contains("synchronous webhook step"), "{refused}");
    assert!(refused.contains("HTTP 500"), "{refused}");
    assert!(sim.rows("accounts").is_empty(), "rolled back");

    // Through the Web API as well: 400 naming the step, nothing stored.
    sync_rec.statuses.lock().unwrap().push(503);
    let r = c
        .post(format!("{}accounts", sim.api_url()))
        .json(&json!({"name": "vetoed too"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v = body(r).await;
    assert_eq!(v["error"]["code"], "0x80040265", "{v}");
    assert!(sim.rows("accounts").is_empty(), "rolled back");

    // The step answers 200: the change commits, then the asynchronous step hears of it.
    let created = sim
        .user_create("accounts", json!({"name": "accepted"}))
        .unwrap();
    assert_eq!(created["name"], "accepted");
    assert_eq!(sim.rows("accounts").len(), 1);
    assert!(sim.wait_webhooks_idle(Duration::from_secs(5)).await);
    let sync_calls = sync_rec.calls.lock().unwrap().clone();
    assert_eq!(sync_calls.len(), 3, "one call per attempted change");
    let (uri, _, ctx) = &sync_calls[2];
    assert!(uri.contains("code=k%2B1"), "{uri}");
    assert_eq!(ctx["Mode"], 0);
    assert_eq!(ctx["IsInTransaction"], true);
    assert_eq!(ctx["OperationId"], "00000000-0000-0000-0000-000000000000");
    let async_calls = async_rec.calls.lock().unwrap().clone();
    assert_eq!(
        async_calls.len(),
        1,
        "only the committed change is notified"
    );
    assert_eq!(async_calls[0].2["Mode"], 1);
    assert_eq!(sim.failed_webhook_deliveries().len(), 2);
}

/// Only the status code counts: a redirect is a failed delivery, not followed (Dataverse
/// records a failed system job; F&O an error-log entry).
#[tokio::test]
async fn a_webhook_answered_with_a_redirect_is_a_failure_not_followed() {
    let (sim, _) = dataverse().await;
    let followed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = followed.clone();
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(|| async {
                (
                    axum::http::StatusCode::PERMANENT_REDIRECT,
                    [(axum::http::header::LOCATION, "/hook/")],
                )
            }),
        )
        .route(
            "/hook/",
            axum::routing::post(move || {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async { axum::http::StatusCode::OK }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    sim.register_webhook(WebhookRegistration {
        url,
        entity_logical_names: vec![],
        messages: vec![WebhookMessage::Create],
        auth: WebhookAuth::HttpHeader(vec![]),
    });
    sim.user_create("accounts", json!({"name": "one"})).unwrap();
    assert!(sim.wait_webhooks_idle(Duration::from_secs(5)).await);
    let failed = sim.failed_webhook_deliveries();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].status, Some(308));
    assert_eq!(followed.load(std::sync::atomic::Ordering::SeqCst), 0);
}

fn customers() -> FnoEntityDef {
    FnoEntityDef {
        entity_set: "CustomersV3".into(),
        key_fields: vec!["dataAreaId".into(), "CustomerAccount".into()],
        modified_field: Some("ModifiedDateTime".into()),
        datetime_fields: Vec::new(),
        fields: Vec::new(),
        text_fields: Vec::new(),
        physical_name: Some("CustCustomerV3Entity".into()),
        enum_fields: [
            ("Blocked".to_string(), "NoYes".to_string()),
            ("PartyType".to_string(), "DirPartyBaseType".to_string()),
        ]
        .into(),
    }
}

#[tokio::test]
async fn fno_crud_company_scope_and_semantics() {
    let sim = FnoSim::start(FnoConfig {
        entities: vec![customers()],
        ..Default::default()
    })
    .await
    .unwrap();
    let c = reqwest::Client::new();
    let data = sim.data_url();
    let r = c
        .post(format!("{data}CustomersV3"))
        .json(&json!({"CustomerAccount": "US-001", "Name": "A", "Blocked": "No"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let created = body(r).await;
    assert_eq!(created["dataAreaId"], "usmf");
    assert!(created["ModifiedDateTime"].as_str().is_some());
    let r = c
        .post(format!("{data}CustomersV3"))
        .json(&json!({"CustomerAccount": "US-001", "Name": "dup"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    c.post(format!("{data}CustomersV3"))
        .json(&json!({"dataAreaId": "DEMF", "CustomerAccount": "DE-001", "Blocked": "Yes"}))
        .send()
        .await
        .unwrap();
    let v = body(c.get(format!("{data}CustomersV3")).send().await.unwrap()).await;
    assert_eq!(v["value"].as_array().unwrap().len(), 1);
    let v = body(
        c.get(format!("{data}CustomersV3?cross-company=true"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v["value"].as_array().unwrap().len(), 2);
    let f = "cross-company=true&$filter=Blocked eq Microsoft.Dynamics.DataEntities.NoYes'Yes'&$count=true";
    let v = body(
        c.get(format!("{data}CustomersV3?{f}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v["@odata.count"], 1);
    assert_eq!(v["value"][0]["CustomerAccount"], "DE-001");
    // F&O compares an enum field only with a literal of its own type.
    for (filter, types) in [
        (
            "Blocked eq 'Yes'",
            "'Microsoft.Dynamics.DataEntities.NoYes' and 'Edm.String'",
        ),
        (
            "PartyType eq Microsoft.Dynamics.DataEntities.NoYes'Yes'",
            "'Microsoft.Dynamics.DataEntities.DirPartyBaseType' and 'Microsoft.Dynamics.DataEntities.NoYes'",
        ),
    ] {
        let r = c
            .get(format!(
                "{data}CustomersV3?cross-company=true&$filter={filter}"
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{filter}");
        let text = r.text().await.unwrap();
        assert!(text.contains("incompatible types"), "{filter}: {text}");
        assert!(text.contains(types), "{filter}: {text}");
    }
    let typed = "cross-company=true&$filter=PartyType eq \
                 Microsoft.Dynamics.DataEntities.DirPartyBaseType'Organization' or Blocked eq null";
    let r = c
        .get(format!("{data}CustomersV3?{typed}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let key = format!("{data}CustomersV3(dataAreaId='usmf',CustomerAccount='US-001')");
    let got = body(c.get(&key).send().await.unwrap()).await;
    let etag = got["@odata.etag"].as_str().unwrap().to_owned();
    assert_eq!(
        c.patch(&key)
            .header("If-Match", &etag)
            .json(&json!({"Name": "B"}))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(
        c.patch(&key)
            .header("If-Match", &etag)
            .json(&json!({"Name": "C"}))
            .send()
            .await
            .unwrap()
            .status(),
        412
    );
    let missing = format!("{data}CustomersV3(dataAreaId='usmf',CustomerAccount='NOPE')");
    assert_eq!(
        c.patch(&missing)
            .json(&json!({"Name": "x"}))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(c.delete(&key).send().await.unwrap().status(), 204);
    assert_eq!(c.get(&key).send().await.unwrap().status(), 404);
}

#[tokio::test]
async fn fno_server_paging_and_throttling() {
    let sim = FnoSim::start(FnoConfig {
        entities: vec![customers()],
        max_page_size: 250,
        ..Default::default()
    })
    .await
    .unwrap();
    for i in 0..1000 {
        sim.user_create(
            "CustomersV3",
            json!({"CustomerAccount": format!("C{i:04}")}),
        )
        .unwrap();
    }
    let c = reqwest::Client::new();
    let mut url = format!(
        "{}CustomersV3?$select=CustomerAccount&$orderby=CustomerAccount desc",
        sim.data_url()
    );
    let mut seen = Vec::new();
    loop {
        let v = body(c.get(&url).send().await.unwrap()).await;
        seen.extend(
            v["value"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["CustomerAccount"].as_str().unwrap().to_owned()),
        );
        match v["@odata.nextLink"].as_str() {
            Some(n) => url = n.to_owned(),
            None => break,
        }
    }
    assert_eq!(seen.len(), 1000);
    assert_eq!(seen[0], "C0999");
    assert!(seen.windows(2).all(|w| w[0] > w[1]));
    sim.throttle_next(1);
    let r = c
        .get(format!("{}CustomersV3?$top=1", sim.data_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert!(
        body(r).await["error"]["message"]
            .as_str()
            .unwrap()
            .contains("high resource utilization")
    );
}

#[tokio::test]
async fn fno_batch_and_events() {
    let sim = FnoSim::start(FnoConfig {
        entities: vec![customers()],
        event_retry_delay: Duration::from_millis(10),
        ..Default::default()
    })
    .await
    .unwrap();
    let (url, rec) = receiver(vec![500]).await;
    sim.register_events(FnoEventRegistration {
        url: url.clone(),
        entity_sets: vec![],
        messages: vec![FnoMessage::Created, FnoMessage::Updated],
        format: FnoEventFormat::DataEvent,
        headers: vec![],
    });
    sim.register_events(FnoEventRegistration {
        url,
        entity_sets: vec!["CustomersV3".into()],
        messages: vec![FnoMessage::Created],
        format: FnoEventFormat::BusinessEvent {
            business_event_id: "CustomerChanged".into(),
        },
        headers: vec![],
    });
    let c = reqwest::Client::new();
    let part = |cid: u32, body: &str| {
        format!(
            "--cs\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: {cid}\r\n\r\nPOST CustomersV3 HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{body}\r\n"
        )
    };
    let batch = |parts: String| {
        format!(
            "--b\r\nContent-Type: multipart/mixed; boundary=cs\r\n\r\n{parts}--cs--\r\n--b--\r\n"
        )
    };
    let bad = batch(format!(
        "{}{}",
        part(1, r#"{"CustomerAccount":"X1"}"#),
        part(2, r#"{"CustomerAccount":"X1"}"#)
    ));
    let r = c
        .post(format!("{}$batch", sim.data_url()))
        .header("Content-Type", "multipart/mixed; boundary=b")
        .body(bad)
        .send()
        .await
        .unwrap();
    assert!(r.text().await.unwrap().contains("HTTP/1.1 400"));
    assert!(
        sim.rows("CustomersV3").is_empty(),
        "the change set must be rolled back"
    );
    let good = batch(part(1, r#"{"CustomerAccount":"X1","Name":"ok"}"#));
    let r = c
        .post(format!("{}$batch", sim.data_url()))
        .header("Content-Type", "multipart/mixed; boundary=b")
        .body(good)
        .send()
        .await
        .unwrap();
    assert!(r.text().await.unwrap().contains("HTTP/1.1 201"));
    sim.user_edit(
        "CustomersV3",
        "dataAreaId='usmf',CustomerAccount='X1'",
        json!({"Name": "edited"}),
    )
    .unwrap();
    assert!(sim.wait_events_idle(Duration::from_secs(5)).await);
    let calls = rec.calls.lock().unwrap().clone();
    let data_events: Vec<&Value> = calls
        .iter()
        .map(|c| &c.2)
        .filter(|b| b.get("MessageName").is_some())
        .collect();
    let business: Vec<&Value> = calls
        .iter()
        .map(|c| &c.2)
        .filter(|b| b.get("ControlNumber").is_some())
        .collect();
    assert_eq!(business.len(), 1);
    assert_eq!(business[0]["BusinessEventId"], "CustomerChanged");
    assert_eq!(business[0]["BusinessEventLegalEntity"], "USMF");
    let messages: Vec<&str> = data_events
        .iter()
        .map(|b| b["MessageName"].as_str().unwrap())
        .collect();
    assert!(messages.contains(&"OnExternalCreated") && messages.contains(&"OnExternalUpdated"));
    assert!(
        data_events
            .iter()
            .all(|b| b["PrimaryEntityName"] == "mserp_custcustomerv3entity"),
        "the virtual table is named after the entity's physical name"
    );
    assert!(calls.len() >= 4, "a 500 is retried");
    assert!(sim.failed_event_deliveries().is_empty());
    // Date-times travel as WCF dates, as in the vendor's data event (a RemoteExecutionContext),
    // and carry the row's own modification time.
    let row = sim.rows("CustomersV3").pop().unwrap();
    let stored = chrono::DateTime::parse_from_rfc3339(row["ModifiedDateTime"].as_str().unwrap())
        .unwrap()
        .timestamp_millis();
    let updated = data_events
        .iter()
        .rfind(|b| b["MessageName"] == "OnExternalUpdated")
        .unwrap();
    let modified = updated["InputParameters"][0]["value"]["Attributes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["key"] == "mserp_modifieddatetime")
        .map(|a| a["value"].clone());
    assert_eq!(modified, Some(json!(format!("/Date({stored})/"))));
}

#[tokio::test]
async fn each_system_spells_an_empty_text_field_its_own_way() {
    // Dataverse keeps no empty text: "" is saved as null.
    let (dv, c) = dataverse().await;
    let api = dv.api_url();
    let r = c
        .post(format!("{api}accounts"))
        .json(&json!({"name": "Contoso", "accountnumber": "A1", "telephone1": ""}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let loc = r.headers()["odata-entityid"].to_str().unwrap().to_owned();
    let got = body(c.get(&loc).send().await.unwrap()).await;
    assert!(got["telephone1"].is_null(), "{got}");
    let r = c
        .patch(&loc)
        .json(&json!({"name": ""}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let got = body(c.get(&loc).send().await.unwrap()).await;
    assert!(got["name"].is_null(), "{got}");

    // F&O has no null text: a text field is "" when not given or written null; other fields
    // keep their null.
    let mut def = customers();
    def.fields = vec!["Name".into(), "Phone".into(), "CreditLimit".into()];
    def.text_fields = vec!["Name".into(), "Phone".into()];
    let fno = FnoSim::start(FnoConfig {
        entities: vec![def],
        ..Default::default()
    })
    .await
    .unwrap();
    let data = fno.data_url();
    let r = c
        .post(format!("{data}CustomersV3"))
        .json(&json!({"CustomerAccount": "US-001", "Name": "A"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let created = body(r).await;
    assert_eq!(created["Phone"], "");
    assert!(created["CreditLimit"].is_null(), "{created}");
    let key = format!("{data}CustomersV3(dataAreaId='usmf',CustomerAccount='US-001')");
    let r = c
        .patch(&key)
        .json(&json!({"Name": null}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let got = body(c.get(&key).send().await.unwrap()).await;
    assert_eq!(got["Name"], "");
}

/// Regression: the path was percent-decoded before it was split on '/', so a key holding an
/// encoded '/' was refused (400); and UpsertMultiple read `@odata.id` without decoding it, so
/// an encoded key missed its row and created a second one. Both are URLs: split, then decode.
#[tokio::test]
async fn dataverse_keys_are_decoded_after_the_path_is_split_and_in_odata_ids() {
    let (sim, c) = dataverse().await;
    let api = sim.api_url();
    let slash = format!("{api}accounts(accountnumber='A%201%2F2')");
    let r = c
        .patch(&slash)
        .json(&json!({"name": "single"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "{}", r.text().await.unwrap());
    let got = body(c.get(&slash).send().await.unwrap()).await;
    assert_eq!(got["accountnumber"], "A 1/2");
    assert_eq!(got["name"], "single");

    let t = |id: &str, name: &str| json!({"@odata.type": "Microsoft.Dynamics.CRM.account", "@odata.id": id, "name": name});
    let r = c
        .post(format!(
            "{api}accounts/Microsoft.Dynamics.CRM.UpsertMultiple"
        ))
        .json(&json!({"Targets": [
            t("accounts(accountnumber='A%201%2F2')", "bulk"),
            t(&format!("{api}accounts(accountnumber='%C3%9Cml%20%26%20O''Neil')"), "new"),
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let rows = sim.rows("accounts");
    assert_eq!(
        rows.len(),
        2,
        "the encoded @odata.id found the existing row"
    );
    assert!(rows.iter().any(|r| r["accountnumber"] == "Üml & O'Neil"));
    let got = body(c.get(&slash).send().await.unwrap()).await;
    assert_eq!(got["name"], "bulk");

    // An unknown bound action is still a 404 for its segment, the key part of the path intact.
    let r = c
        .post(format!("{api}accounts/Microsoft.Dynamics.CRM.Nope%2FX"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

/// Regression: FnoSim applied its default-company rule to reads only; F&O resolves a key in the
/// default company for PATCH and DELETE as well unless `cross-company=true`.
#[tokio::test]
async fn fno_patch_and_delete_by_key_see_the_default_company_only() {
    let sim = FnoSim::start(FnoConfig {
        entities: vec![customers()],
        ..Default::default()
    })
    .await
    .unwrap();
    sim.user_create(
        "CustomersV3",
        json!({"dataAreaId": "demf", "CustomerAccount": "DE-001"}),
    )
    .unwrap();
    let c = reqwest::Client::new();
    let key = format!(
        "{}CustomersV3(dataAreaId='demf',CustomerAccount='DE-001')",
        sim.data_url()
    );
    let cross = format!("{key}?cross-company=true");
    for url in [&key, &cross] {
        let r = c
            .patch(url)
            .json(&json!({"Name": "x"}))
            .send()
            .await
            .unwrap();
        let expected = if url == &key { 404 } else { 204 };
        assert_eq!(r.status(), expected, "PATCH {url}");
    }
    assert_eq!(c.delete(&key).send().await.unwrap().status(), 404);
    assert_eq!(sim.rows("CustomersV3").len(), 1);
    assert_eq!(c.delete(&cross).send().await.unwrap().status(), 204);
    assert!(sim.rows("CustomersV3").is_empty());
}

/// Key fields declared integer or enum take their typed literal, as F&O's OData requires: a
/// quoted literal or a JSON string for an integer key is a 400, so a client quoting every key
/// value cannot pass silently.
#[tokio::test]
async fn fno_typed_keys_refuse_literals_of_the_wrong_type() {
    let lines = FnoEntityDef {
        entity_set: "Lines".into(),
        key_fields: vec!["dataAreaId".into(), "Order".into(), "LineNumber".into()],
        ..FnoEntityDef::default()
    };
    let flags = FnoEntityDef {
        entity_set: "Flags".into(),
        key_fields: vec!["Code".into(), "Primary".into()],
        ..FnoEntityDef::default()
    };
    let sim = FnoSim::start(FnoConfig {
        entities: vec![lines, flags],
        key_types: vec![
            FnoKeyType {
                entity_set: "Lines".into(),
                field: "LineNumber".into(),
                kind: FnoKeyKind::Integer,
            },
            FnoKeyType {
                entity_set: "Flags".into(),
                field: "Primary".into(),
                kind: FnoKeyKind::Enum {
                    enum_type: "NoYes".into(),
                },
            },
        ],
        ..Default::default()
    })
    .await
    .unwrap();
    let c = reqwest::Client::new();
    let data = sim.data_url();
    let r = c
        .post(format!("{data}Lines"))
        .json(&json!({"Order": "SO-1", "LineNumber": "1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(
        body(r).await["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'LineNumber'")
    );
    let r = c
        .post(format!("{data}Lines"))
        .json(&json!({"Order": "SO-1", "LineNumber": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert!(
        r.headers()["location"]
            .to_str()
            .unwrap()
            .ends_with("Lines(dataAreaId='usmf',Order='SO-1',LineNumber=1)")
    );
    let quoted = format!("{data}Lines(dataAreaId='usmf',Order='SO-1',LineNumber='1')");
    let bare = format!("{data}Lines(dataAreaId='usmf',Order='SO-1',LineNumber=1)");
    assert_eq!(c.get(&quoted).send().await.unwrap().status(), 400);
    assert_eq!(
        c.patch(&quoted)
            .json(&json!({"Qty": 2}))
            .send()
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(c.delete(&quoted).send().await.unwrap().status(), 400);
    assert_eq!(c.get(&bare).send().await.unwrap().status(), 200);
    assert_eq!(
        c.patch(&bare)
            .json(&json!({"Qty": 2}))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );

    let r = c
        .post(format!("{data}Flags"))
        .json(&json!({"Code": "A", "Primary": "Yes"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let literal =
        format!("{data}Flags(Code='A',Primary=Microsoft.Dynamics.DataEntities.NoYes'Yes')");
    assert_eq!(c.get(&literal).send().await.unwrap().status(), 200);
    let plain = format!("{data}Flags(Code='A',Primary='Yes')");
    assert_eq!(c.get(&plain).send().await.unwrap().status(), 400);
    let r = c
        .post(format!("{data}Flags"))
        .json(&json!({"Code": "B", "Primary": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}
