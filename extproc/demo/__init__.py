"""The demo: an OpenAI-compatible LLM upstream and the browser page served at /relay/v1/demo/."""
