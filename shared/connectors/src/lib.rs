//! HTTP connectors: Entra ID tokens, Dataverse Web API, F&O OData.
