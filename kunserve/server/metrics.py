"""Prometheus metrics under vLLM's names, so dashboards built for vLLM work unchanged;
what only kunserve has is prefixed `kunserve:`. Updated from the engine thread after each
step (prometheus_client is thread-safe)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kunserve.cluster import status
from kunserve.cluster.coordinator import Coordinator
from kunserve.cluster.runner import Transition
from kunserve.engine.stats import StepStats

# Bucket upper bounds, in seconds (latencies) or tokens (lengths).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                         2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                           60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TRANSITION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class ServerMetrics:
    """The metric families; `for_engine(i)` gives replica i's series (label `engine`, as vLLM)."""

    def __init__(self, model_name: str, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.model_name = model_name
        labels = ["model_name", "engine"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=registry)

        self.num_requests_running = Gauge("vllm:num_requests_running", "Requests in model execution batches.",
                                          labels, registry=registry)
        self.num_requests_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be processed.", labels,
                                          registry=registry)
        self.kv_cache_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.", labels,
                                    registry=registry)
        self.num_preemptions = Counter("vllm:num_preemptions", "Cumulative number of preemptions.", labels,
                                       registry=registry)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", labels, registry=registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generation tokens processed.", labels,
                                         registry=registry)
        self.time_to_first_token = histogram(
            "vllm:time_to_first_token_seconds", "Time to first token, from arrival.", TTFT_BUCKETS
        )
        # vLLM keeps the older name beside the newer one for the same observations.
        self.time_per_output_token = histogram(
            "vllm:time_per_output_token_seconds", "Time between consecutive tokens.", TOKEN_LATENCY_BUCKETS
        )
        self.inter_token_latency = histogram(
            "vllm:inter_token_latency_seconds", "Time between consecutive tokens.", TOKEN_LATENCY_BUCKETS
        )
        self.request_time_per_output_token = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Per request: (e2e - ttft) / (output tokens - 1).",
            TOKEN_LATENCY_BUCKETS,
        )
        self.e2e_request_latency = histogram(
            "vllm:e2e_request_latency_seconds", "End-to-end request latency.", REQUEST_LATENCY_BUCKETS
        )
        self.request_queue_time = histogram(
            "vllm:request_queue_time_seconds", "Time from arrival to first scheduling.", REQUEST_LATENCY_BUCKETS
        )
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Prompt tokens per finished request.", TOKEN_COUNT_BUCKETS
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Generated tokens per finished request.", TOKEN_COUNT_BUCKETS
        )
        self.request_success = Counter(
            "vllm:request_success", "Finished requests, by finish reason.", [*labels, "finished_reason"],
            registry=registry,
        )
        self.kv_cache_blocks = Gauge(
            "kunserve:kv_cache_blocks", "Blocks in the KV pool; it grows when parameters are released.", labels,
            registry=registry,
        )
        self.engine_steps = Counter("kunserve:engine_steps", "Engine steps run.", labels, registry=registry)
        self.pipeline_bubble = Gauge(
            "kunserve:pipeline_bubble_fraction", "Idle stage time / total in the last bubble window of a pipeline.",
            labels, registry=registry,
        )
        self.pipeline_busy = Counter("kunserve:pipeline_busy_seconds", "Stage time spent computing, all stages.",
                                     labels, registry=registry)
        self.pipeline_stage = Counter(
            "kunserve:pipeline_stage_seconds", "Stage time available (stages x time with steps in flight).", labels,
            registry=registry,
        )
        self.requests_rejected_queue_full = Counter(
            "kunserve:requests_rejected_queue_full", "Requests refused with 503 because the waiting queue was full.",
            ["model_name"], registry=registry,
        ).labels(model_name)
        self.replicas_alive = Gauge("kunserve:replicas_alive",
                                    "Replicas serving (a failed worker takes one down until it restarts).",
                                    ["model_name"], registry=registry).labels(model_name)
        self.replica_restarts = Counter("kunserve:replica_restarts", "Replicas restarted on new workers after a fault.",
                                        ["model_name"], registry=registry).labels(model_name)

        self.drops = Counter("kunserve:drops", "Drops: replicas fused into a pipeline group.", ["model_name"],
                             registry=registry).labels(model_name)
        self.restores = Counter("kunserve:restores", "Restores: groups split back into replicas.", ["model_name"],
                                registry=registry).labels(model_name)
        self.drop_duration = Histogram("kunserve:drop_duration_seconds", "Drop decision to blocks usable.",
                                       ["model_name"], buckets=TRANSITION_BUCKETS, registry=registry).labels(model_name)
        self.kv_exchange_duration = Histogram(
            "kunserve:kv_exchange_duration_seconds", "KV moved between devices in a drop or restore.", ["model_name"],
            buckets=TRANSITION_BUCKETS, registry=registry,
        ).labels(model_name)
        self.restore_duration = Histogram("kunserve:restore_duration_seconds", "Restore until replicas run again.",
                                          ["model_name"], buckets=TRANSITION_BUCKETS, registry=registry
                                          ).labels(model_name)
        self.migrations = Counter("kunserve:migrations", "Running requests migrated to another replica.",
                                  ["model_name"], registry=registry).labels(model_name)
        self.migration_pause = Histogram(
            "kunserve:migration_pause_seconds", "How long a migrated request stalled (the last copy stage).",
            ["model_name"], buckets=TRANSITION_BUCKETS, registry=registry,
        ).labels(model_name)
        self.group_mode = Gauge("kunserve:group_mode", "0: a replica; 1: a stage of a pipeline group.", labels,
                                registry=registry)
        self.layers_held = Gauge("kunserve:layers_held", "Decoder layers whose weights the replica's device holds.",
                                 labels, registry=registry)

    def watch_cluster(self, coordinator: Coordinator) -> None:
        """Gauges read from the coordinator at scrape time; transitions counted as they happen."""
        runner = coordinator.runner
        for index in range(len(coordinator.cluster.engines)):
            labels = (self.model_name, str(index))
            self.group_mode.labels(*labels).set_function(lambda i=index: status.mode_of(runner, i) == status.PIPELINE_MODE)
            self.layers_held.labels(*labels).set_function(lambda i=index: status.layers_held(runner, i))
        runner.on_transition = self.record_transition

    def record_transition(self, transition: Transition) -> None:
        if transition.kind == "migrate":
            self.migrations.inc()
            self.migration_pause.observe(transition.pause_s)
            return
        if transition.kind == "restart":
            self.replica_restarts.inc(len(transition.members))
            return
        if transition.kind == "drop":
            self.drops.inc()
            self.drop_duration.observe(transition.duration_s)
        else:
            self.restores.inc()
            self.restore_duration.observe(transition.duration_s)
        self.kv_exchange_duration.observe(transition.exchange_s)

    def for_engine(self, index: int) -> EngineMetrics:
        return EngineMetrics(self, str(index))


class EngineMetrics:
    """One replica's series; `record_step` is its engine's stats listener (engine thread)."""

    def __init__(self, families: ServerMetrics, engine: str) -> None:
        self._families = families
        self._labels = (families.model_name, engine)
        f, labels = families, self._labels
        self.num_requests_running = f.num_requests_running.labels(*labels)
        self.num_requests_waiting = f.num_requests_waiting.labels(*labels)
        self.kv_cache_usage = f.kv_cache_usage.labels(*labels)
        self.kv_cache_blocks = f.kv_cache_blocks.labels(*labels)
        self.num_preemptions = f.num_preemptions.labels(*labels)
        self.prompt_tokens = f.prompt_tokens.labels(*labels)
        self.generation_tokens = f.generation_tokens.labels(*labels)
        self.engine_steps = f.engine_steps.labels(*labels)
        self.pipeline_bubble = f.pipeline_bubble.labels(*labels)
        self.pipeline_busy = f.pipeline_busy.labels(*labels)
        self.pipeline_stage = f.pipeline_stage.labels(*labels)
        self.time_to_first_token = f.time_to_first_token.labels(*labels)
        self.time_per_output_token = f.time_per_output_token.labels(*labels)
        self.inter_token_latency = f.inter_token_latency.labels(*labels)
        self.request_time_per_output_token = f.request_time_per_output_token.labels(*labels)
        self.e2e_request_latency = f.e2e_request_latency.labels(*labels)
        self.request_queue_time = f.request_queue_time.labels(*labels)
        self.request_prompt_tokens = f.request_prompt_tokens.labels(*labels)
        self.request_generation_tokens = f.request_generation_tokens.labels(*labels)

    def record_step(self, stats: StepStats) -> None:
        self.engine_steps.inc()
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        self.kv_cache_blocks.set(stats.num_kv_blocks)
        self.num_preemptions.inc(stats.num_preemptions)
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        self.generation_tokens.inc(stats.num_generation_tokens)
        if stats.pipeline is not None:
            self.pipeline_busy.inc(stats.pipeline.busy_s)
            self.pipeline_stage.inc(stats.pipeline.stage_s)
            if stats.pipeline.bubble_fraction is not None:
                self.pipeline_bubble.set(stats.pipeline.bubble_fraction)
        for ttft in stats.time_to_first_token_s:
            self.time_to_first_token.observe(ttft)
        for itl in stats.inter_token_latency_s:
            self.time_per_output_token.observe(itl)
            self.inter_token_latency.observe(itl)
        for done in stats.finished:
            self._families.request_success.labels(*self._labels, done.finish_reason).inc()
            if done.finish_reason == "abort":
                continue  # a client that left: its latencies describe nothing served
            self.e2e_request_latency.observe(done.e2e_latency_s)
            if done.queue_time_s is not None:
                self.request_queue_time.observe(done.queue_time_s)
            if done.time_per_output_token_s is not None:
                self.request_time_per_output_token.observe(done.time_per_output_token_s)
            self.request_prompt_tokens.observe(done.num_prompt_tokens)
            self.request_generation_tokens.observe(done.num_generation_tokens)
