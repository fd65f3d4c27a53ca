"""The detached write path: the relay makes the upstream call itself (through Envoy's egress)
and writes the log; every client, the first one included, is a reader."""
