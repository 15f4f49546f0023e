"""Load-generating benchmark client for an OpenAI-compatible server: workloads, streaming requests, reports."""
