"""Who may do what: the owner key derived from Envoy's identity, share tokens, and the
per-identity quotas."""
