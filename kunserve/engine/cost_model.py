"""Predicted step and transfer times: what the drop planner and the lookahead batch
formulation plan with.

A step of a stage holding `layers` decoder layers costs

    step_s + layers · (layer_s + layer_token_s · max(0, tokens − knee_tokens)
                       + max(layer_context_s · decode context,
                             layer_longest_s · longest decode context / decode splits)
                       + layer_attention_s · prefill pairs
                       + layer_prefill_s · [the step has a prefill chunk])
           + sample_s · samples        (on the stage holding the LM head)

Below `knee_tokens` a layer's GEMMs are bound by reading its weights, so its time hardly
depends on the batch; above, every token adds its FLOPs. Decodes read their KV (one term
per context token) at the device's memory rate, but a layer's decode attention also lasts at
least as long as its longest program: the kernel (kunserve/kernels/triton_attention.py) splits
every sequence's keys into the same number of slices, chosen from the batch size alone
(`StepCoefficients.decode_splits`), so in a batch of uneven contexts the longest sequence's
slices run on after the others are done (a straggler: measured on long generations,
benchmarks/fit_decode_straggler.py; batches of equal contexts, as profile_steps.py measures,
never show it). Prefill chunks attend causally (one term per query-key pair). A step
with a prefill chunk runs eagerly (decode-only steps replay CUDA graphs), paying kernel
launches per layer: measured at ~0.2 ms per Llama-3-8B layer on an H200. The
coefficients are fitted to step times measured on the device (benchmarks/profile_steps.py) and
saved as a small JSON file per (model, device); `default` estimates them from the model's
sizes and nominal H100-class rates when no profile exists.

A transfer of n bytes over a link costs latency_s + n / bandwidth.

A stage split over t tensor-parallel ranks (`for_tensor_parallel`) runs 1/t of each layer's
weight reads, FLOPs and KV reads on each rank at once, while the fixed costs (the step's and
a prefill's launches) stay; each layer adds two all-reduces of the step's activations (after
o and after down), ring all-reduces over the "all_reduce" link: latency_s + 2(t-1)/t · bytes /
bandwidth. Until benchmarks/tp_speed.py measures that link, its figures are nominal NVLink.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from collections.abc import Sequence as SequenceOf
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kunserve.arch.schema import matrix_params
from kunserve.arch.spec import ModelSpec

if TYPE_CHECKING:
    from kunserve.engine.sequence import Sequence

logger = logging.getLogger(__name__)

PROFILES_DIR = Path(__file__).with_name("profiles")
KNEE_CANDIDATES = (0, 16, 32, 64, 96, 128, 192, 256, 384, 512)
# Nominal rates of the default model (an H100-class GPU), used only when no profile exists.
NOMINAL_MEMORY_BYTES_S = 3.0e12
NOMINAL_FLOPS = 6.0e14
NOMINAL_STEP_S = 1.0e-3
NOMINAL_SAMPLE_S = 2.0e-6
ALL_REDUCE_LINK = "all_reduce"
NOMINAL_LINKS = {
    "device": (370e9, 20e-6),  # GPU to GPU on one host (NVLink)
    "host": (55e9, 10e-6),  # pinned host memory <-> GPU
    "network": (12.5e9, 50e-6),  # across hosts (100 Gb/s)
    # A tensor-parallel stage's all-reduce among its GPUs: nominal, the NVLink figure above,
    # until measured (benchmarks/tp_speed.py); a profile without it gets this one.
    ALL_REDUCE_LINK: (370e9, 20e-6),
}
ALL_REDUCES_PER_LAYER = 2  # after attention's o projection and after the MLP's down projection
# Predicted seconds of a lookahead shape from its counts: num_tokens, decode_context,
# prefill_pairs, num_samples (its longest decode is never known).
CountPredictor = Callable[[float, float, float, float], float]


@dataclass(frozen=True)
class StepShape:
    """What a step computes, as the cost model sees it: counts, fractional in a share of a
    step (`scaled`)."""

    num_tokens: float = 0  # tokens computed: prefill chunks + one per decode
    decode_context: float = 0  # KV tokens the decodes attend to, summed
    prefill_pairs: float = 0  # causal query-key pairs of the prefill chunks, summed
    num_samples: float = 0  # sequences that sample a token
    # The longest decode's context (0: not known, as in a lone chunk's or the lookahead's shapes):
    # the decode attention kernel's straggler (StepCoefficients.layer_longest_s).
    longest_decode_context: float = 0

    def __add__(self, other: StepShape) -> StepShape:
        return StepShape(self.num_tokens + other.num_tokens, self.decode_context + other.decode_context,
                         self.prefill_pairs + other.prefill_pairs, self.num_samples + other.num_samples,
                         max(self.longest_decode_context, other.longest_decode_context))

    def scaled(self, factor: float) -> StepShape:
        """A `factor` share of the step; the longest decode stays whole (one share holds it)."""
        return StepShape(self.num_tokens * factor, self.decode_context * factor, self.prefill_pairs * factor,
                         self.num_samples * factor, self.longest_decode_context)

    @staticmethod
    def of_chunk(computed: int, num_tokens: int, samples: bool) -> StepShape:
        """A sequence with `computed` tokens of KV computing `num_tokens` more."""
        if num_tokens == 1:
            return StepShape(1, computed, 0, 1)
        pairs = num_tokens * computed + num_tokens * (num_tokens + 1) // 2
        return StepShape(num_tokens, 0, pairs, int(samples))

    @staticmethod
    def of_batch(query_lens: np.ndarray, context_lens: np.ndarray, num_samples: int) -> StepShape:
        """A step's shape from its batch arrays (kunserve/step.py): rows of one token decode,
        the others are prefill chunks; as `of_chunk` summed over the rows."""
        computed = context_lens - query_lens
        decode = query_lens == 1
        chunk, before = query_lens[~decode], computed[~decode]
        pairs = int((chunk * before + chunk * (chunk + 1) // 2).sum())
        longest = int(computed[decode].max()) if decode.any() else 0
        return StepShape(int(query_lens.sum()), int(computed[decode].sum()), pairs, num_samples, longest)

    @staticmethod
    def of_step(scheduled: Iterable[tuple[Sequence, int]]) -> StepShape:
        shape = StepShape()
        longest = 0
        for seq, n in scheduled:
            start = seq.num_scheduled_tokens  # the step's input is built before it is marked in flight
            shape += StepShape.of_chunk(start, n, start + n == len(seq))
            longest = max(longest, start if n == 1 else 0)
        return replace(shape, longest_decode_context=longest)


@dataclass(frozen=True)
class StepCoefficients:
    step_s: float
    layer_s: float
    knee_tokens: int
    layer_token_s: float
    layer_context_s: float
    layer_attention_s: float
    sample_s: float
    layer_prefill_s: float = 0.0
    # The decode attention kernel's straggler (the module's docstring): per key of the longest
    # decode's slice, per layer; 0 (profiles before it) leaves the summed-KV term alone.
    layer_longest_s: float = 0.0
    # How the kernel splits keys: programs per KV head it aims for (SMs x programs per SM / KV
    # heads), over the batch's decodes rounded up to a power of two, at most max_decode_splits.
    decode_split_width: int = 0
    max_decode_splits: int = 1

    def decode_splits(self, num_decodes: float) -> int:
        """The key slices of every decode sequence in a batch of `num_decodes` decodes."""
        if self.decode_split_width <= 0:
            return 1
        bucket = 1 << max(0, math.ceil(math.log2(max(num_decodes, 1))))
        return max(1, min(self.decode_split_width // bucket, self.max_decode_splits))

    def longest_slice(self, longest_decode_context: float, num_samples: float) -> float:
        """A layer's decode attention's longest key slice (its straggler)."""
        # The decodes sample: num_samples counts them (and a finishing prefill chunk or two).
        return self.layer_longest_s * longest_decode_context / self.decode_splits(num_samples)

    def predict(self, shape: StepShape, layers: int, samples: bool = True, shards: int = 1) -> float:
        """The step's time on a stage of `layers` layers; with `shards` tensor-parallel ranks,
        each rank's share of every layer's weights, FLOPs and KV (its collectives aside; a
        rank's fewer KV heads split each sequence's keys into as many more slices)."""
        return self.predict_counts(shape.num_tokens, shape.decode_context, shape.prefill_pairs, shape.num_samples,
                                   shape.longest_decode_context, layers, samples, shards)

    def predict_counts(self, num_tokens: float, decode_context: float, prefill_pairs: float, num_samples: float,
                       longest_decode_context: float, layers: int, samples: bool = True, shards: int = 1) -> float:
        """`predict` of the shape with these fields, without building it (the lookahead's
        per-candidate sums: kunserve/engine/lookahead.py)."""
        # A layer's decode attention: its KV read at the memory rate, or its longest key slice.
        attention = self.layer_context_s * decode_context
        if self.layer_longest_s and longest_decode_context:
            attention = max(attention, self.longest_slice(longest_decode_context, num_samples))
        sharded = (self.layer_s + self.layer_token_s * max(0, num_tokens - self.knee_tokens) + attention
                   + self.layer_attention_s * prefill_pairs)
        per_layer = sharded / shards + (self.layer_prefill_s if prefill_pairs else 0.0)
        return self.step_s + layers * per_layer + (self.sample_s * num_samples if samples else 0.0)

    def grows_with_counts(self) -> bool:
        """Whether `predict_counts` never falls as a count grows: every rate finite and not
        negative (each operation then rounds monotonically, so this holds of the floats too)."""
        rates = (self.step_s, self.layer_s, self.layer_token_s, self.layer_context_s, self.layer_attention_s,
                 self.sample_s, self.layer_prefill_s)
        return all(math.isfinite(rate) and rate >= 0 for rate in rates)

    def lookahead_predictor(self, layers: int, shards: int) -> CountPredictor:
        """`predict_counts` of a sampling shape whose longest decode is not known, as a function
        of its counts with the coefficients read once: the lookahead predicts once per candidate
        sequence, where the calls and attribute reads cost more than the arithmetic. The same
        operations in the same order (tests/engine/test_lookahead_sums.py: to the bit)."""
        step_s, layer_s, knee_tokens, layer_token_s = self.step_s, self.layer_s, self.knee_tokens, self.layer_token_s
        layer_context_s, layer_attention_s = self.layer_context_s, self.layer_attention_s
        layer_prefill_s, sample_s = self.layer_prefill_s, self.sample_s

        def predict(num_tokens: float, decode_context: float, prefill_pairs: float, num_samples: float) -> float:
            sharded = (layer_s + layer_token_s * max(0, num_tokens - knee_tokens) + layer_context_s * decode_context
                       + layer_attention_s * prefill_pairs)
            per_layer = sharded / shards + (layer_prefill_s if prefill_pairs else 0.0)
            return step_s + layers * per_layer + sample_s * num_samples

        return predict


@dataclass(frozen=True)
class Link:
    bandwidth_bytes_s: float
    latency_s: float

    def transfer_time(self, num_bytes: float) -> float:
        return self.latency_s + num_bytes / self.bandwidth_bytes_s


@dataclass(frozen=True)
class ProfilePoint:
    """One measured step: its shape, the layers the stage held, whether it sampled."""

    shape: StepShape
    layers: int
    samples: bool
    seconds: float


@dataclass(frozen=True)
class HostTime:
    """What a live step takes beyond `StepCoefficients.predict` under load: the driver's host
    work, and what isolated profile steps miss of mixed steps (benchmarks/host_overhead.py)."""

    step_s: float
    seq_s: float  # per sequence in the step
    token_s: float  # per token computed

    def of(self, num_seqs: int, num_tokens: int) -> float:
        return self.step_s + self.seq_s * num_seqs + self.token_s * num_tokens


@dataclass(frozen=True)
class CostModel:
    model: str
    device: str
    step: StepCoefficients
    links: dict[str, Link]
    holdout_error: float | None = None  # mean relative error on profile points left out of the fit
    layer_bytes: int = 0  # a decoder layer's weights
    kv_bytes_per_token_layer: int = 0
    activation_bytes_per_token: int = 0  # hidden state sent between pipeline stages
    notes: dict[str, str] = field(default_factory=dict)
    host: HostTime | None = None  # measured on the same model and device, where it was
    tensor_parallel_size: int = 1  # the ranks a stage's layers are split over (for_tensor_parallel)

    def for_tensor_parallel(self, tp_size: int) -> CostModel:
        """This model's steps on stages of `tp_size` tensor-parallel ranks."""
        if tp_size < 1:
            raise ValueError(f"tensor_parallel_size: must be >= 1, got {tp_size}")
        return replace(self, tensor_parallel_size=tp_size)

    def step_time(self, shape: StepShape, layers: int, samples: bool = True) -> float:
        return self.step_time_of_counts(shape.num_tokens, shape.decode_context, shape.prefill_pairs,
                                        shape.num_samples, shape.longest_decode_context, layers, samples)

    def step_time_of_counts(self, num_tokens: float, decode_context: float, prefill_pairs: float,
                            num_samples: float, longest_decode_context: float, layers: int,
                            samples: bool = True) -> float:
        """`step_time` of the shape with these fields, without building it."""
        t = self.tensor_parallel_size
        predicted = self.step.predict_counts(num_tokens, decode_context, prefill_pairs, num_samples,
                                             longest_decode_context, layers, samples, t)
        if t == 1:
            return predicted
        all_reduce = self.all_reduce_time(num_tokens * self.activation_bytes_per_token)
        return predicted + layers * ALL_REDUCES_PER_LAYER * all_reduce

    def grows_with_counts(self) -> bool:
        """Whether a step's predicted time never falls as one of its counts grows (its
        coefficients', and with tensor parallelism its all-reduce link's, say so)."""
        if self.tensor_parallel_size == 1:
            return self.step.grows_with_counts()
        link = self.links.get(ALL_REDUCE_LINK) or Link(*NOMINAL_LINKS[ALL_REDUCE_LINK])
        return (self.step.grows_with_counts() and self.activation_bytes_per_token >= 0 and math.isfinite(link.latency_s)
                and math.isfinite(link.bandwidth_bytes_s) and link.bandwidth_bytes_s > 0)

    def lookahead_predictor(self, layers: int) -> CountPredictor:
        """`step_time_of_counts` of a lookahead shape (no longest decode known, sampling) on
        `layers` layers, from its counts (StepCoefficients.lookahead_predictor)."""
        t = self.tensor_parallel_size
        predict = self.step.lookahead_predictor(layers, t)
        if t == 1:
            return predict
        per_token_bytes = self.activation_bytes_per_token

        def with_all_reduces(num_tokens: float, decode_context: float, prefill_pairs: float,
                             num_samples: float) -> float:
            predicted = predict(num_tokens, decode_context, prefill_pairs, num_samples)
            return predicted + layers * ALL_REDUCES_PER_LAYER * self.all_reduce_time(num_tokens * per_token_bytes)

        return with_all_reduces

    def all_reduce_time(self, num_bytes: float) -> float:
        """A ring all-reduce of `num_bytes` on each of the stage's t ranks: each sends (and
        receives) 2(t-1)/t of them, over the "all_reduce" link (nominal where not measured)."""
        t = self.tensor_parallel_size
        link = self.links.get(ALL_REDUCE_LINK) or Link(*NOMINAL_LINKS[ALL_REDUCE_LINK])
        return link.transfer_time(2 * (t - 1) / t * num_bytes)

    def stage_time(self, shape: StepShape, num_layers: int, num_stages: int, stage: int, link: str = "device",
                   compute_factor: float = 1.0) -> float:
        """A micro-batch's time on stage `stage` of a `num_stages` pipeline: its layers (the
        last stage samples; their time times `compute_factor`) and, after the first,
        receiving the activations over `link`."""
        compute = compute_factor * self.step_time(shape, num_layers // num_stages, samples=stage == num_stages - 1)
        if stage == 0:
            return compute
        return compute + self.transfer_time(shape.num_tokens * self.activation_bytes_per_token, link)

    def pipeline_cycle_time(self, shape: StepShape, num_layers: int, num_stages: int, link: str = "device") -> float:
        """The time for a batch of `shape` to advance one step in a g-stage group, split into
        g equal micro-batches: the slowest stage, once per micro-batch."""
        if num_stages == 1:
            return self.step_time(shape, num_layers)
        micro = shape.scaled(1 / num_stages)
        slowest = max(self.stage_time(micro, num_layers, num_stages, s, link) for s in range(num_stages))
        return num_stages * slowest

    def transfer_time(self, num_bytes: float, link: str = "device") -> float:
        if link not in self.links:
            raise ValueError(f"link: expected one of {sorted(self.links)}, got {link!r}")
        return self.links[link].transfer_time(num_bytes)

    # ---- files ----------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> CostModel:
        try:
            raw = json.loads(Path(path).read_text())
            return cls(
                raw["model"], raw["device"], StepCoefficients(**raw["step"]),
                {name: Link(**link) for name, link in raw["links"].items()}, raw.get("holdout_error"),
                raw.get("layer_bytes", 0), raw.get("kv_bytes_per_token_layer", 0),
                raw.get("activation_bytes_per_token", 0), raw.get("notes", {}),
                HostTime(**raw["host"]) if raw.get("host") else None,
            )
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as error:
            raise ValueError(f"cost_profile: cannot read a cost model from {path}: {error}") from error

    @classmethod
    def default(cls, spec: ModelSpec, model_name: str, elem_bytes: int = 2) -> CostModel:
        """Estimated from the model's sizes and nominal rates (see NOMINAL_*): a step reads a
        layer's GEMM weights (its family's schema, kunserve/arch/) once, and each weight costs
        two FLOPs per token."""
        layer_params = matrix_params(spec.layer_tensors())
        layer_bytes = layer_params * elem_bytes
        kv_bytes = 2 * spec.kv_size * elem_bytes
        step = StepCoefficients(
            step_s=NOMINAL_STEP_S,
            layer_s=layer_bytes / NOMINAL_MEMORY_BYTES_S,
            knee_tokens=round(NOMINAL_FLOPS / NOMINAL_MEMORY_BYTES_S * elem_bytes / 2),
            layer_token_s=2 * layer_params / NOMINAL_FLOPS,
            layer_context_s=kv_bytes / NOMINAL_MEMORY_BYTES_S,
            layer_attention_s=4 * spec.q_size / NOMINAL_FLOPS,
            sample_s=NOMINAL_SAMPLE_S + 2 * spec.hidden_size * spec.vocab_size / NOMINAL_FLOPS,
        )
        links = {name: Link(bw, lat) for name, (bw, lat) in NOMINAL_LINKS.items()}
        return cls(model_name, "nominal", step, links, None, layer_bytes, kv_bytes,
                   spec.hidden_size * elem_bytes, {"source": "estimated from the model's sizes; no profile"})


class StagePredictor:
    """A micro-batch's predicted seconds on one stage of `layers` of `cost_model`'s layers: the
    lookahead's predictor (kunserve/engine/lookahead.py), which also predicts from a shape's
    counts without building it (`of_counts(num_tokens, decode_context, prefill_pairs,
    num_samples)`: as called on their shape with no longest decode known; its sums per
    candidate sequence). `grows_with_counts`: no count's growth makes it predict less."""

    __slots__ = ("cost_model", "grows_with_counts", "layers", "of_counts")

    def __init__(self, cost_model: CostModel, layers: int) -> None:
        self.cost_model = cost_model
        self.layers = layers
        self.of_counts: CountPredictor = cost_model.lookahead_predictor(layers)
        self.grows_with_counts = cost_model.grows_with_counts()

    def __call__(self, shape: StepShape) -> float:
        return self.cost_model.step_time(shape, self.layers)


def profile_path(model_name: str) -> Path:
    """Where the packaged profile of a model (measured by benchmarks/profile_steps.py) lives: by
    preset name, or by a model directory's name."""
    return PROFILES_DIR / f"{Path(model_name).name}.json"


def resolve_cost_model(profile: str | None, spec: ModelSpec, model_name: str, elem_bytes: int,
                       tp_size: int = 1) -> CostModel:
    """`profile`: a cost-model file; None = the packaged profile of the model, else the default;
    for stages of `tp_size` tensor-parallel ranks."""
    if profile is not None:
        cost = CostModel.load(Path(profile))
    elif (packaged := profile_path(model_name)).exists():
        cost = CostModel.load(packaged)
    else:
        cost = CostModel.default(spec, model_name, elem_bytes)
    return cost.for_tensor_parallel(tp_size)


# ---- fitting ----------------------------------------------------------------------------------

def _features(points: SequenceOf[ProfilePoint], knee: int) -> np.ndarray:
    """Columns: step_s, layer_s, layer_token_s, layer_context_s, layer_attention_s, sample_s,
    layer_prefill_s."""
    rows = [
        (1.0, p.layers, p.layers * max(0, p.shape.num_tokens - knee), p.layers * p.shape.decode_context,
         p.layers * p.shape.prefill_pairs, p.shape.num_samples if p.samples else 0.0,
         p.layers * (p.shape.prefill_pairs > 0))
        for p in points
    ]
    return np.asarray(rows, dtype=np.float64)


def nonnegative_least_squares(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0 (times cannot be negative): refit without
    the most negative coefficient until none is; columns that carry nothing stay 0."""
    active = [j for j in range(a.shape[1]) if np.any(a[:, j])]
    while True:
        solution = np.zeros(a.shape[1])
        if active:
            solution[active] = np.linalg.lstsq(a[:, active], b, rcond=None)[0]
        if solution.min() >= 0:
            return solution
        active.remove(int(np.argmin(solution)))


def relative_errors(coefficients: StepCoefficients, points: SequenceOf[ProfilePoint]) -> np.ndarray:
    predicted = np.asarray([coefficients.predict(p.shape, p.layers, p.samples) for p in points])
    measured = np.asarray([p.seconds for p in points])
    return np.abs(predicted - measured) / measured


def fit_step_coefficients(points: SequenceOf[ProfilePoint]) -> StepCoefficients:
    """Fit to measured steps, minimizing relative error (each row weighted by 1/time), with
    the knee chosen from KNEE_CANDIDATES."""
    if len(points) < 6:
        raise ValueError(f"points: need at least 6 profile points to fit, got {len(points)}")
    measured = np.asarray([p.seconds for p in points])
    best: tuple[float, StepCoefficients] | None = None
    for knee in KNEE_CANDIDATES:
        a = _features(points, knee) / measured[:, None]
        c = nonnegative_least_squares(a, np.ones(len(points)))
        c = [float(x) for x in c]
        coefficients = StepCoefficients(c[0], c[1], knee, c[2], c[3], c[4], c[5], c[6])
        error = float(relative_errors(coefficients, points).mean())
        if best is None or error < best[0]:
            best = (error, coefficients)
    assert best is not None
    return best[1]
