"""What Envoy Gateway, Istio and a hand-written front proxy would run, built from deploy/ and
`stream-relay envoy-config --snippet`, and a harness that runs it with a real relay node and
the demo upstream (tests/test_mesh.py)."""
