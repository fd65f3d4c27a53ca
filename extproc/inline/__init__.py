"""The inline write path: Envoy proxies the upstream response and hands its body to the
processor over ext_proc, which tags and logs each event in flight."""
