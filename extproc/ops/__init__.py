"""Operating the relay: the `stream-relay` command, the stack supervisor, `status`, and the
Envoy configuration it renders."""
