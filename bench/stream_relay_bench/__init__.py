"""`stream-relay bench`: the relay against plain Envoy, a no-op ext_proc, nginx and pushpin.

Modules, one job each: `loadgen` (the client process), `peers` (start Envoy variants, nginx,
pushpin, the upstream), `scenarios` (what stands in front of the upstream), `runner` (the run),
`procstat` (CPU and RSS from /proc), `stats` (percentiles), `report` (JSON checks, Markdown,
PNG). See bench/README.md and bench/RESULTS.md.
"""
