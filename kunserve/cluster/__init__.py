"""The control plane above one engine: replicas, dispatching, and (later) drop planning."""
