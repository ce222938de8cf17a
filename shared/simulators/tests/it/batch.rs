//! `$batch` of independent parts, as the connectors' `call_many` sends it: top-level GETs and
//! one changeset per write, `Prefer: odata.continue-on-error`, per-part statuses, headers and
//! bodies, and service protection counting a `$batch` as one request.

use dualwrite_simulators::{DataverseConfig, DataverseSim, FnoConfig, FnoSim, ThrottleConfig};
use serde_json::json;

use super::{accounts, currencies, customers};

/// A part on its own (a read).
fn alone(method: &str, url: &str) -> String {
    format!(
        "--b\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n{method} {url} HTTP/1.1\r\n\r\n\r\n"
    )
}

/// A write in a changeset of its own.
fn changeset(n: u32, method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> String {
    let headers: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    format!(
        "--b\r\nContent-Type: multipart/mixed; boundary=cs{n}\r\n\r\n\
--cs{n}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: {n}\r\n\r\n\
{method} {url} HTTP/1.1\r\nContent-Type: application/json\r\n{headers}\r\n{body}\r\n--cs{n}--\r\n"
    )
}

/// The inner statuses of a multipart answer, in order.
fn statuses(text: &str) -> Vec<u16> {
    text.split("HTTP/1.1 ")
        .skip(1)
        .filter_map(|s| s.get(..3)?.parse().ok())
        .collect()
}

async fn send(url: &str, body: String, continue_on_error: bool) -> (u16, String) {
    let mut request = reqwest::Client::new()
        .post(url)
        .header("Content-Type", "multipart/mixed; boundary=b");
    if continue_on_error {
        request = request.header("Prefer", "odata.continue-on-error");
    }
    let r = request.body(body).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn fno_answers_every_independent_part_and_counts_the_batch_once() {
    let sim = FnoSim::start(FnoConfig {
        entities: vec![customers()],
        ..Default::default()
    })
    .await
    .unwrap();
    sim.user_create("CustomersV3", json!({"CustomerAccount": "X1"}))
        .unwrap();
    let data = sim.data_url();
    let at =
        |account: &str| format!("{data}CustomersV3(dataAreaId='usmf',CustomerAccount='{account}')");
    let parts = |new: &str| {
        [
            alone("GET", &format!("{}?cross-company=true", at("X1"))),
            alone("GET", &format!("{}?cross-company=true", at("X404"))),
            changeset(
                1,
                "POST",
                &format!("{data}CustomersV3"),
                &[],
                r#"{"CustomerAccount":"X1"}"#,
            ),
            changeset(
                2,
                "POST",
                &format!("{data}CustomersV3"),
                &[("Prefer", "return=representation")],
                &format!(r#"{{"CustomerAccount":"{new}"}}"#),
            ),
            changeset(
                3,
                "PATCH",
                &at("X1"),
                &[("If-Match", "W/\"0\"")],
                r#"{"Name":"stale"}"#,
            ),
            changeset(
                4,
                "PATCH",
                &at("X1"),
                &[("If-Match", "*")],
                r#"{"Name":"ok"}"#,
            ),
        ]
        .concat()
            + "--b--\r\n"
    };
    let before = sim.stats().requests;
    let (status, text) = send(&format!("{data}$batch"), parts("X2"), true).await;
    assert_eq!(sim.stats().requests - before, 1, "a $batch is one request");
    assert_eq!(status, 200);
    assert_eq!(statuses(&text), [200, 404, 400, 201, 412, 204], "{text}");
    assert!(text.contains("The record already exists"));
    assert!(
        text.contains("\"CustomerAccount\":\"X2\""),
        "201 carries the record"
    );
    assert_eq!(
        text.matches("etag: W/").count(),
        2,
        "the read and the create: {text}"
    );
    assert!(text.contains("Content-ID: 2\r\n"));
    assert_eq!(sim.rows("CustomersV3").len(), 2);

    // Without continue-on-error the batch stops at the first failing part (the 404 read).
    let (status, text) = send(&format!("{data}$batch"), parts("X3"), false).await;
    assert_eq!(status, 200);
    assert_eq!(statuses(&text), [200, 404]);
    assert_eq!(
        sim.rows("CustomersV3").len(),
        2,
        "nothing after the stop ran"
    );

    // Service protection counts the $batch, not its parts (FO service-protection-api-limits.md:
    // a batch "will avoid the number of requests limit").
    sim.set_throttle(ThrottleConfig {
        requests_per_window: Some(1),
        ..ThrottleConfig::default()
    });
    let (status, _) = send(&format!("{data}$batch"), parts("X4"), true).await;
    assert_eq!(status, 200, "six parts pass a limit of one request");
    let (status, text) = send(&format!("{data}$batch"), parts("X5"), true).await;
    assert_eq!(status, 429, "{text}");
}

#[tokio::test]
async fn dataverse_continues_after_a_failing_changeset_when_asked_to() {
    let sim = DataverseSim::start(DataverseConfig {
        tables: vec![accounts(), currencies()],
        ..Default::default()
    })
    .await
    .unwrap();
    let api = sim.api_url();
    sim.user_create("accounts", json!({"accountnumber": "A1", "name": "one"}))
        .unwrap();
    let body = [
        changeset(
            1,
            "PATCH",
            &format!("{api}accounts(accountnumber='A1')"),
            &[("If-None-Match", "*")],
            r#"{"name":"dup"}"#,
        ),
        changeset(
            2,
            "PATCH",
            &format!("{api}accounts(accountnumber='A2')"),
            &[],
            r#"{"name":"two"}"#,
        ),
        alone("GET", &format!("{api}accounts(accountnumber='A1')")),
    ]
    .concat()
        + "--b--\r\n";
    let (status, text) = send(&format!("{api}$batch"), body.clone(), true).await;
    assert_eq!(status, 200);
    assert_eq!(statuses(&text), [412, 204, 200], "{text}");
    assert!(
        text.contains("0x80040237"),
        "the error body of the failed part"
    );
    assert!(
        text.contains("odata-entityid: "),
        "the upsert names the row it wrote"
    );
    assert!(
        text.contains("\"name\":\"one\""),
        "the read sees A1 unchanged"
    );
    assert_eq!(sim.rows("accounts").len(), 2);

    // Without it: 400 and the failing part only (PA execute-batch-operations-using-web-api.md).
    let (status, text) = send(&format!("{api}$batch"), body, false).await;
    assert_eq!(status, 400);
    assert_eq!(statuses(&text), [412]);
}
