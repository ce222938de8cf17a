//! RemoteExecutionContext bodies written straight to bytes: the JSON that Dataverse webhooks
//! and F&O data events carry (wire-formats §1 and §3), without a `serde_json::Value` tree.
//!
//! Every object's keys are written in byte order, the order in which `serde_json` serialises a
//! `Value` object, so a body reads exactly as it did when the simulators built it with `json!`
//! (the unit tests of `dataverse.rs` and `fno.rs` pin that against the former builders).

use std::io::Write;

use crate::json::{raw, string};

/// The namespace of the `__type` hints of the Dataverse contracts.
pub(crate) const CONTRACTS: &str = "http://schemas.microsoft.com/xrm/2011/Contracts";

/// Writes one part of a context (a list or an object) into the body being built.
pub(crate) type WritePart<'a> = &'a dyn Fn(&mut Vec<u8>);

/// One RemoteExecutionContext, with its fields borrowed from the change it reports.
pub(crate) struct RemoteContext<'a> {
    /// `CorrelationId`.
    pub correlation_id: &'a str,
    /// `InitiatingUserId` and `UserId`.
    pub user_id: &'a str,
    /// `MessageName` (Create, OnExternalUpdated, ...).
    pub message_name: &'a str,
    /// `OperationCreatedOn`, a WCF date.
    pub operation_created_on: &'a str,
    /// `OperationId`.
    pub operation_id: &'a str,
    /// `OrganizationName`.
    pub organization_name: &'a str,
    /// `PrimaryEntityId`.
    pub primary_entity_id: &'a str,
    /// `PrimaryEntityName`.
    pub primary_entity_name: &'a str,
    /// `Stage` (40 = PostOperation, 30 in a ParentContext).
    pub stage: u32,
    /// Writes the `InputParameters` list.
    pub input_parameters: WritePart<'a>,
    /// Writes the `PostEntityImages` list.
    pub post_entity_images: WritePart<'a>,
    /// Writes the `PreEntityImages` list.
    pub pre_entity_images: WritePart<'a>,
    /// Writes the `SharedVariables` list.
    pub shared_variables: WritePart<'a>,
    /// `ParentContext`; `null` when `None`.
    pub parent: Option<&'a RemoteContext<'a>>,
    /// A synchronous step (`Mode` 0, inside the transaction) instead of an asynchronous one.
    pub synchronous: bool,
}

impl RemoteContext<'_> {
    /// Appends the context as a JSON object.
    pub fn write(&self, out: &mut Vec<u8>) {
        raw(
            out,
            r#"{"BusinessUnitId":"e2b9dd85-e89e-e711-8122-000d3aa2331c","CorrelationId":"#,
        );
        string(out, self.correlation_id);
        raw(out, r#","Depth":1,"InitiatingUserId":"#);
        string(out, self.user_id);
        raw(out, r#","InputParameters":"#);
        (self.input_parameters)(out);
        raw(
            out,
            if self.synchronous {
                r#","IsExecutingOffline":false,"IsInTransaction":true,"IsOfflinePlayback":false,"IsolationMode":1,"MessageName":"#
            } else {
                r#","IsExecutingOffline":false,"IsInTransaction":false,"IsOfflinePlayback":false,"IsolationMode":1,"MessageName":"#
            },
        );
        string(out, self.message_name);
        raw(
            out,
            if self.synchronous {
                r#","Mode":0,"OperationCreatedOn":"#
            } else {
                r#","Mode":1,"OperationCreatedOn":"#
            },
        );
        string(out, self.operation_created_on);
        raw(out, r#","OperationId":"#);
        string(out, self.operation_id);
        raw(
            out,
            r#","OrganizationId":"4ef5b371-e89e-e711-8122-000d3aa2331c","OrganizationName":"#,
        );
        string(out, self.organization_name);
        raw(
            out,
            r#","OutputParameters":[],"OwningExtension":{"Id":"75417616-4ea2-e711-8122-000d3aa2331c","KeyAttributes":[],"LogicalName":"sdkmessageprocessingstep","Name":null,"RowVersion":null},"ParentContext":"#,
        );
        match self.parent {
            Some(p) => p.write(out),
            None => raw(out, "null"),
        }
        raw(out, r#","PostEntityImages":"#);
        (self.post_entity_images)(out);
        raw(out, r#","PreEntityImages":"#);
        (self.pre_entity_images)(out);
        raw(out, r#","PrimaryEntityId":"#);
        string(out, self.primary_entity_id);
        raw(out, r#","PrimaryEntityName":"#);
        string(out, self.primary_entity_name);
        raw(
            out,
            r#","RequestId":null,"SecondaryEntityName":"none","SharedVariables":"#,
        );
        (self.shared_variables)(out);
        raw(out, r#","Stage":"#);
        let _ = write!(out, "{}", self.stage);
        raw(out, r#","UserId":"#);
        string(out, self.user_id);
        out.push(b'}');
    }
}

/// Appends an `Entity` object: `attributes` writes the items of its `Attributes` list (each a
/// key-value pair, comma-separated); `logical_json` is the logical name as a JSON string.
pub(crate) fn entity(
    out: &mut Vec<u8>,
    id: &str,
    logical_json: &str,
    attributes: impl FnOnce(&mut Vec<u8>),
) {
    raw(out, r#"{"Attributes":["#);
    attributes(out);
    raw(out, r#"],"EntityState":null,"FormattedValues":[],"Id":"#);
    string(out, id);
    raw(out, r#","KeyAttributes":[],"LogicalName":"#);
    raw(out, logical_json);
    raw(
        out,
        r#","RelatedEntities":[],"RowVersion":null,"__type":"Entity:http://schemas.microsoft.com/xrm/2011/Contracts"}"#,
    );
}

/// Appends an `EntityReference` object; `logical_json` is the logical name as a JSON string.
pub(crate) fn entity_reference(out: &mut Vec<u8>, logical_json: &str, id: &str) {
    raw(out, r#"{"Id":"#);
    string(out, id);
    raw(out, r#","KeyAttributes":[],"LogicalName":"#);
    raw(out, logical_json);
    raw(
        out,
        r#","Name":null,"RowVersion":null,"__type":"EntityReference:http://schemas.microsoft.com/xrm/2011/Contracts"}"#,
    );
}

/// Appends `[{"key":<key>,"value":<value>}]`, a list of one key-value pair whose value
/// `value` writes.
pub(crate) fn one_pair(out: &mut Vec<u8>, key: &str, value: impl FnOnce(&mut Vec<u8>)) {
    raw(out, "[");
    pair(out, key, value);
    raw(out, "]");
}

/// Writes one `{"key": key, "value": …}` entry of a list (no brackets).
pub(crate) fn pair(out: &mut Vec<u8>, key: &str, value: impl FnOnce(&mut Vec<u8>)) {
    raw(out, r#"{"key":"#);
    string(out, key);
    raw(out, r#","value":"#);
    value(out);
    raw(out, "}");
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::json::json_string;

    #[test]
    fn references_and_entities_read_as_their_json_trees() {
        let mut out = Vec::new();
        entity_reference(&mut out, &json_string("systemuser"), "u-1");
        let tree = json!({"__type": format!("EntityReference:{CONTRACTS}"), "Id": "u-1", "KeyAttributes": [], "LogicalName": "systemuser", "Name": null, "RowVersion": null});
        assert_eq!(out, serde_json::to_vec(&tree).unwrap());

        let mut out = Vec::new();
        entity(&mut out, "id-1", &json_string("contact"), |o| {
            raw(o, r#"{"key":"a","value":1}"#);
        });
        let tree = json!({"__type": format!("Entity:{CONTRACTS}"), "Attributes": [{"key": "a", "value": 1}], "EntityState": null, "FormattedValues": [],
               "Id": "id-1", "KeyAttributes": [], "LogicalName": "contact", "RelatedEntities": [], "RowVersion": null});
        assert_eq!(out, serde_json::to_vec(&tree).unwrap());
        let parsed: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed, tree);
    }
}
