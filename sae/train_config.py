"""TrainConfig: every setting of a training run, one docstring per field, validated, JSON-serializable."""

from __future__ import annotations

import ast
import inspect
from dataclasses import asdict, dataclass, fields
from typing import Literal, get_args

from .architectures import ARCHITECTURES
from .config import ACTIVATION_NAMES, NORMALIZATIONS, Activation, Normalization

Dtype = Literal["auto", "float32", "bfloat16"]
LrDecay = Literal["none", "linear", "cosine"]
Backend = Literal["auto", "triton", "torch", "reference"]
DTYPES: tuple[str, ...] = get_args(Dtype)
LR_DECAYS: tuple[str, ...] = get_args(LrDecay)
BACKENDS: tuple[str, ...] = get_args(Backend)
# the architectures with a sparsity coefficient for --target_l0 to steer
TARGET_L0_ACTIVATIONS = tuple(name for name, cls in ARCHITECTURES.items() if cls.target_l0_gain is not None)


@dataclass
class TrainConfig:
    """A training run: the store it reads, the SAE it trains, the optimizer, and what it writes."""

    data_dir: str
    """Folder of the activation store (manifest.json + shard_*.safetensors) written by saetron-collect."""
    output_dir: str
    """Where the run writes metrics.jsonl, checkpoints/, sae.safetensors, sae_config.json, saelens/,
    train_config.json. Created if missing; must be writable."""
    num_shards: int | None = None
    """Read only the first N shards of the store; None reads all of them."""
    target_layer: int | None = None
    """Expected hooked layer; checked against the manifest (a mismatch is an error). None: the manifest's."""
    d_model: int | None = None
    """Expected activation width; checked against the manifest (a mismatch is an error). None: the manifest's
    d_model."""
    d_sae: int = 16384
    """Number of latents of the SAE."""
    l1_coeff: float = 5e-3
    """Weight of the L1 penalty sum_i f_i ||W_dec[i]|| (relu; the others report it only). With --target_l0,
    where the coefficient starts."""
    l0_coeff: float = 1e-3
    """Weight of jumprelu's L0 penalty l0_coeff * mean_tokens sum_i H(pre_i - theta_i) (in units of the mse).
    With --target_l0, where the coefficient starts."""
    target_l0: float | None = None
    """relu, jumprelu: steer the sparsity coefficient (l1_coeff, l0_coeff) so that the L0 (active latents per
    token) reaches this value (a controller in log space, sae/sparsity_control.py); jumprelu without --k
    also starts its thresholds at this L0. None: the coefficient stays fixed."""
    aux_k_coeff: float = 1 / 32
    """Weight of the AuxK loss (topk, batchtopk): the dead latents' top d_in/2 pre-activations reconstruct
    the residual, reviving them (sae/architectures/auxk.py). 0 turns it off."""
    jumprelu_bandwidth: float = 0.1
    """jumprelu: the straight-through estimator's kernel width, as a fraction of the thresholds' start."""
    jumprelu_start_batches: int = 50
    """jumprelu: train the first this-many steps as BatchTopK (L0 = k) while the encoder's scale settles; the
    thresholds start at the last one's threshold at L0 = k."""
    jumprelu_ste_to_input: bool = True
    """jumprelu: the straight-through estimator also reaches the pre-activations (Anthropic's variant);
    false: DeepMind's (thresholds only), whose L0 drifts down whatever the penalty in short runs."""
    lr: float = 4e-4
    """Peak Adam learning rate."""
    batch_size: int = 4096
    """Global batch in tokens (all ranks together); must divide by the number of ranks."""
    epochs: int = 1
    """Passes over the chosen shards (each with its own shuffle). --max_steps can stop earlier."""
    normalize_activations: Normalization = "expected_average_only_in"
    """Input normalization of the SAE: `expected_average_only_in` (center by the mean estimated before
    step 0), `layer_norm` (per token), `none`."""
    apply_b_dec_to_input: bool = False
    """Subtract b_dec from the normalized input before the encoder."""
    activation: Activation = "relu"
    """`relu` (sparsity from the L1 penalty), `topk` (k active latents per token at most), `batchtopk` (k per
    token on average over a batch in training, a learned threshold at inference), `jumprelu` (learned
    per-latent thresholds and an L0 penalty)."""
    k: int | None = None
    """topk: active latents per token; batchtopk: the same on average; jumprelu: the L0 its thresholds start
    at (default: --target_l0); must be unset for relu."""
    backend: Backend = "auto"
    """SAE compute backend (see SparseAutoencoder): `auto` picks the fastest one available."""
    dtype: Dtype = "auto"
    """Compute dtype of forward/backward; master weights, Adam state and gradient reductions stay
    float32. `auto`: bfloat16 on CUDA, float32 on CPU."""
    lr_warmup_steps: int = 0
    """Linear learning-rate warm-up from 0 over this many steps."""
    l1_warmup_steps: int = 0
    """Linear warm-up from 0 of the sparsity term in the loss over this many steps (relu's L1, jumprelu's
    L0 penalty)."""
    lr_decay: LrDecay = "none"
    """Learning-rate decay after the warm-up, reaching 0 at the last step: `none`, `linear`, `cosine`."""
    seed: int = 0
    """Seeds the SAE's initialization and the data shuffle; same seed + data = same run on any #ranks."""
    log_every: int = 10
    """Steps between metrics lines (and metrics.jsonl records)."""
    checkpoint_every: int = 0
    """Steps between checkpoints in output_dir/checkpoints/; 0 = only the final one."""
    resume: str | None = None
    """`latest` (the newest complete checkpoint in output_dir/checkpoints) or a checkpoint folder."""
    max_steps: int | None = None
    """Stop after this many steps in total (counting steps before a resume); None = all epochs. It sets
    the run's length: the lr decay and the density window end there."""
    wandb: bool = False
    """Also log the metrics to Weights & Biases (imported only when set)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    dead_window: int = 1_000_000
    """A latent is dead once it has not fired on any rank for this many tokens (AuxK's candidates, the
    logged dead_fraction); also the window over which saelens/sparsity.safetensors measures feature
    density."""
    shuffle_buffer: int = 262_144
    """Rows shuffled together: chunks of consecutive rows from random places in all shards fill a
    buffer of this many rows, which is permuted. Bigger mixes more; costs no memory (rows are read lazily)."""
    stats_tokens: int = 262_144
    """Tokens read before step 0 to estimate the activation mean (identical on every rank)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept; older ones are removed only after a newer one is complete."""
    prefetch: int = 4
    """Batches read ahead by the loader thread."""

    def __post_init__(self) -> None:
        for name in ("d_sae", "batch_size", "epochs", "log_every", "shuffle_buffer", "stats_tokens",
                     "keep_checkpoints", "prefetch", "dead_window"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("lr_warmup_steps", "l1_warmup_steps", "checkpoint_every", "seed"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in ("num_shards", "target_layer", "d_model", "max_steps"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=0 if name == "target_layer" else 1)
        choices = {"normalize_activations": NORMALIZATIONS, "activation": ACTIVATION_NAMES,
                   "backend": BACKENDS, "dtype": DTYPES, "lr_decay": LR_DECAYS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; allowed: {allowed}")
        if not (self.lr > 0):
            raise ValueError(f"lr must be > 0; got {self.lr!r}")
        if self.target_l0 is not None:
            target = self.target_l0
            if isinstance(target, bool) or not isinstance(target, int | float) or not (
                    0 < target <= self.d_sae):
                raise ValueError(f"target_l0 must be a number in (0, d_sae={self.d_sae}]; got {target!r}")
            if self.activation not in TARGET_L0_ACTIVATIONS:
                raise ValueError(f"target_l0 steers a sparsity coefficient, which activation="
                                 f"{self.activation!r} has not; use it with {TARGET_L0_ACTIVATIONS} "
                                 "(topk and batchtopk set their L0 with --k)")
        if not (self.max_grad_norm >= 0):
            raise ValueError(f"max_grad_norm must be >= 0 (0 disables clipping); got {self.max_grad_norm!r}")
        # l1_coeff, l0_coeff, aux_k_coeff, jumprelu_bandwidth and k are checked by SAEConfig, which the
        # trainer builds before reading any data.

    def to_dict(self) -> dict:
        return asdict(self)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")


def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """The docstring under each field of a dataclass (for --help), read from its source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value,
                                                                                          ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def field_names(cls: type = TrainConfig) -> list[str]:
    return [f.name for f in fields(cls)]
