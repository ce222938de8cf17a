//! Webhook receivers: Dataverse webhooks, F&O data and business events into change events.
