//! Regression tests for echo suppression by hash: the webhook or data event of each of
//! dualwrite's own writes must come back with the hash the engine stored for it, so it is
//! skipped as an echo (or duplicate), never compared with the other side and filed `in_sync`.

use dualwrite_engine::StatsSnapshot;

use crate::harness::{Stack, StackOptions, wait_until};

/// Asserts that between `before` and `after` exactly one write happened and its echo was
/// suppressed by hash: one echo, nothing merely skipped.
fn one_write_and_its_echo(step: &str, before: &StatsSnapshot, after: &StatsSnapshot) {
    assert_eq!(
        after.writes - before.writes,
        1,
        "{step}: one write: {after:?}"
    );
    assert_eq!(
        after.echoes_suppressed - before.echoes_suppressed,
        1,
        "{step}: the echo of the write is recognised by hash: {after:?}"
    );
    assert_eq!(
        after.skipped, before.skipped,
        "{step}: no event is filed in_sync (hash mismatch on an echo): {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_echo_of_each_write_is_recognised_by_hash_in_both_directions() {
    let s = Stack::start(StackOptions::default()).await;

    let before = s.stats().await.engine;
    let id = s.create_account("ECHO-0001", "Echo Seattle", 1500);
    wait_until("customer ECHO-0001 in F&O", || s.customer("ECHO-0001")).await;
    s.wait_idle().await;
    one_write_and_its_echo("Dataverse create", &before, &s.stats().await.engine);

    let before = s.stats().await.engine;
    s.dv.user_edit(
        "accounts",
        &id,
        serde_json::json!({"name": "Echo Tacoma", "creditlimit": 2500}),
    )
    .unwrap();
    wait_until("the name change in F&O", || {
        s.customer("ECHO-0001")
            .filter(|c| c["OrganizationName"] == "Echo Tacoma")
    })
    .await;
    s.wait_idle().await;
    one_write_and_its_echo("Dataverse edit", &before, &s.stats().await.engine);

    let before = s.stats().await.engine;
    s.fno
        .user_edit(
            "CustomersV3",
            &Stack::customer_key("ECHO-0001"),
            serde_json::json!({"CreditLimit": 4321.5, "DeliveryAddressCity": "Redmond"}),
        )
        .unwrap();
    wait_until("the F&O edit in Dataverse", || {
        s.account("ECHO-0001")
            .filter(|a| a["address1_city"] == "Redmond")
    })
    .await;
    s.wait_idle().await;
    one_write_and_its_echo("F&O edit", &before, &s.stats().await.engine);
}

/// Dataverse keeps no empty text ("" is saved as null) and F&O no null text (an empty field is
/// ""), so clearing a field on one side comes back from the other in the other spelling. Each
/// clearing is one write whose echo is recognised; without "" ≡ null in the hash the two
/// spellings would bounce between the systems for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleared_text_field_is_one_write_each_way_although_the_systems_spell_empty_apart() {
    let s = Stack::start(StackOptions::default()).await;
    let id = s.synced_account("EMPTY-0001", "Empty Seattle", 1500).await;
    assert_eq!(
        s.customer("EMPTY-0001").unwrap()["PrimaryContactPhone"],
        "+1 206 555 0100"
    );

    // Dataverse: the phone cleared (null) → F&O holds "" and its data event says "".
    let before = s.stats().await.engine;
    s.dv.user_edit("accounts", &id, serde_json::json!({"telephone1": null}))
        .unwrap();
    wait_until("the phone cleared in F&O", || {
        s.customer("EMPTY-0001")
            .filter(|c| c["PrimaryContactPhone"] == "")
    })
    .await;
    s.wait_idle().await;
    one_write_and_its_echo("Dataverse clears", &before, &s.stats().await.engine);

    // F&O: the city cleared ("") → written to Dataverse, which holds null and says null.
    let before = s.stats().await.engine;
    s.fno
        .user_edit(
            "CustomersV3",
            &Stack::customer_key("EMPTY-0001"),
            serde_json::json!({"DeliveryAddressCity": ""}),
        )
        .unwrap();
    wait_until("the city cleared in Dataverse", || {
        s.account("EMPTY-0001")
            .filter(|a| a["address1_city"].is_null())
    })
    .await;
    s.wait_idle().await;
    one_write_and_its_echo("F&O clears", &before, &s.stats().await.engine);
    assert_eq!(
        s.customer("EMPTY-0001").unwrap()["DeliveryAddressCity"],
        "",
        "F&O keeps its own spelling of empty"
    );
}
