"""The demo's domain-transfer experiment: a trained retrieval captioner on a second domain,
with its own datastore and with the second domain's (docs/retrieval.md#domain-transfer)."""
