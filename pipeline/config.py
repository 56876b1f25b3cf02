"""Typed configuration for every stage, loaded from ``params.yaml`` and validated before any work.

``params.yaml`` is the one file both DVC (``params:`` in ``dvc.yaml``) and the Prefect flow read.
Each stage gets one small pydantic model; unknown keys are errors so a typo never silently falls
back to a default. ``load_params`` turns validation failures into a ``ConfigError`` whose message
names the file and the dotted key, e.g. ``params.yaml: train.learning_rate: must be > 0 (got -1)``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration file is missing, unreadable or has an invalid value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProjectConfig(_Strict):
    name: str = Field("loraflow", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def copy_circuit_fits(hidden_size: int, num_heads: int, num_layers: int) -> bool:
    """Room for the seeded copy circuit (pipeline/base/circuits.py): two layers, and a constant plus three
    head-wide blocks in the residual stream."""
    return num_layers >= 2 and 3 * (hidden_size // num_heads) + 1 <= hidden_size


class BuiltinBaseConfig(_Strict):
    """The embedded default base (``base.model: builtin:tiny-llama``, pipeline/base/builtin.py): a tiny Llama
    built and pretrained here, because no model hub is reachable at run time. Real models ignore all of it."""

    hidden_size: int = Field(256, gt=0)
    intermediate_size: int = Field(512, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    vocab_size: int = Field(2048, ge=300)
    max_position_embeddings: int = Field(512, ge=64)
    seed: int = 0
    # Pretraining (causal LM, full parameters) on the training prompts, their answers as separate documents,
    # the generic chat and a synthetic copy curriculum; 0 steps = none. 900 steps of 32 x 128 tokens take
    # ~4.5 minutes on 2 CPU cores (docs/benchmarks.md).
    pretrain_steps: int = Field(900, ge=0)
    pretrain_batch_size: int = Field(32, gt=0)
    pretrain_seq_len: int = Field(128, ge=16)
    pretrain_lr: float = Field(3e-3, gt=0.0)
    curriculum_share: float = Field(0.5, ge=0.0, le=1.0)  # share of synthetic copy/lookup conversations
    rope_theta: float = Field(1e6, gt=0.0)  # large: the copy circuit matches tokens on slowly rotating pairs
    copy_circuit: bool = True  # start from a working induction head (pipeline/base/circuits.py)
    # Multiplies the output layer after pretraining. LoRA does not adapt lm_head (TRL computes
    # log-probs from its weight directly), and a 256-wide base's output rows are too close together for an
    # adapter to reach confident answers: measured, 0.86 probability on the right label at best with 1.0.
    output_scale: float = Field(2.0, gt=0.0)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "BuiltinBaseConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        head_dim = self.hidden_size // self.num_heads
        if self.copy_circuit and not copy_circuit_fits(self.hidden_size, self.num_heads, self.num_layers):
            raise ValueError(f"copy_circuit needs num_layers >= 2 and hidden_size >= 3 * head_dim + 1 (got "
                             f"{self.num_layers} layers, hidden_size {self.hidden_size}, head_dim {head_dim}); "
                             "set copy_circuit: false for such a shape")
        return self


def _moved(section: str, moves: dict[str, str]):
    """A before-validator: keys of an earlier params layout fail with where they live now."""

    def check(cls, raw: Any) -> Any:
        found = [f"{section}.{old}: moved to {new}" for old, new in moves.items() if isinstance(raw, dict) and old in raw]
        if found:
            raise ValueError("\n".join(found))
        return raw

    return model_validator(mode="before")(classmethod(check))


class BaseModelConfig(_Strict):
    # "builtin:tiny-llama" builds the embedded tiny Llama + tokenizer (no hub access needed); anything else
    # is a Hugging Face id or a local folder, read with from_pretrained where it is (never copied into DVC).
    model: str = "builtin:tiny-llama"
    revision: str = ""  # hub branch, tag or commit for a hub id (empty = main); the resolved commit is recorded
    out_dir: str = "artifacts/base"
    # What the base is built from (stage base_inputs): hashes of the sanitized text for the embedded base,
    # nothing for a pretrained one, so only the embedded base is rebuilt when the training data changes.
    inputs_file: str = "artifacts/base_inputs.json"
    # Every base the stage builds is also published here, under its weights' sha256, never changed: serving
    # and the champion re-score use the base each version was trained on (pipeline.modeling.publish_base).
    store_dir: str = "artifacts/bases"
    builtin: BuiltinBaseConfig = BuiltinBaseConfig()

    _moved_keys = _moved("base", {k: f"base.builtin.{k}" for k in BuiltinBaseConfig.model_fields})

    @property
    def is_builtin(self) -> bool:
        return self.model.startswith("builtin:")


class TaskConfig(_Strict):
    """What a good answer is: the answer kind, how it is parsed and scored, how it is generated.

    The engine has no task-specific code; a new task is a new ``task:`` section (README, "Your own task").
    """

    name: str = "task"
    kind: str = "text"  # an answer kind registered in pipeline/tasks/ (json, text, label, sql, custom, yours)
    description: str = ""  # intended use, for the model card
    limitations: str = ""  # known limits, for the model card
    # json: an inline JSON Schema, or the path of a schema file; answers must validate against it.
    json_schema: dict[str, Any] | str | None = None
    # json: answer fields whose value distribution drift monitoring compares (categorical fields only).
    fields: list[str] = []
    # label: the closed set of answers.
    labels: list[str] = []
    # sql: the SQLite database queries run against (opened read-only), and each query's time limit.
    database: str = ""
    query_timeout_s: float = Field(2.0, gt=0.0)
    # custom: a scorer "module:function" (prediction, reference, prompt) -> {metric: value}, and its metrics.
    scorer: str = ""
    metrics: list[str] = []
    # Generation: evaluation and the served endpoint's defaults use these.
    max_new_tokens: int = Field(64, gt=0)
    stop: list[str] = []
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    # Rewrites of free-text chat prompts (new greeting, closing, sentence order). They keep the meaning of
    # a support message but not of a question over a schema or a program, so they are opt-in.
    chat_rewrites: bool = False
    # Metrics that must not regress (gate.guardrail_tolerance); None = every metric but the gate's own.
    guardrail_metrics: list[str] | None = None

    @model_validator(mode="after")
    def _kind_settings(self) -> "TaskConfig":
        from pipeline.tasks import check_task_config  # the kind's module knows what it needs

        check_task_config(self)
        return self

    def generation_defaults(self) -> dict:
        """The OpenAI request fields that make an answer match what the gate measured (the served endpoint's
        defaults, and what a teacher is asked with)."""
        out: dict = {"max_tokens": self.max_new_tokens, "temperature": self.temperature}
        if self.stop:
            out["stop"] = list(self.stop)
        return out

    @property
    def kind_class(self):
        """The registered answer kind (pipeline/tasks/) that knows this task's metrics."""
        from pipeline.tasks import kind_class

        return kind_class(self.kind)

    @property
    def metric_names(self) -> tuple[str, ...]:
        """Per-example metrics this task produces."""
        return self.kind_class.metric_names(self)

    @property
    def all_metric_names(self) -> tuple[str, ...]:
        return self.metric_names + self.kind_class.aggregate_metrics

    @property
    def primary_metric(self) -> str:
        return self.kind_class.primary_metric(self)


class DataConfig(_Strict):
    train: list[str] = []  # JSONL/CSV/Parquet files or datasets folders (README, "Your own data")
    eval: list[str] = []  # the held-out split the gate scores
    preference: str = ""  # prompt/chosen/rejected JSONL for train.method: dpo
    generic: str = ""  # generic chat JSONL mixed into training at train.generic_fraction (limits forgetting)
    # Generic prompts with reference answers, never trained on: scored on the base and each candidate to
    # catch forgetting (gate.forgetting_tolerance). Empty = no forgetting check.
    forgetting: str = ""
    # Share of the training records set aside (deterministically, by prompt hash) for early stopping and
    # checkpoint selection, so the held-out split stays untouched until the gate.
    validation_fraction: float = Field(0.1, ge=0.0, le=0.5)


class ColumnMap(_Strict):
    """Which columns of a CSV/Parquet/datasets input hold which record field (unset: same name)."""

    messages: str | None = None  # a list of chat messages, or its JSON text
    prompt: str | None = None
    completion: str | None = None
    instruction: str | None = None
    input: str | None = None
    output: str | None = None
    system: str | None = None


class RecogniserConfig(_Strict):
    """A token-classification model (a Hugging Face id or a local folder; safetensors only) that finds
    what the rule-based detectors miss; its entity labels map to placeholders."""

    model: str
    revision: str | None = None
    labels: dict[str, str] = {"PER": "NAME", "PERSON": "NAME", "NAME": "NAME", "ADDRESS": "ADDRESS",
                              "STREET_ADDRESS": "ADDRESS"}  # model label (B-/I- stripped) -> placeholder kind
    threshold: float = Field(0.5, gt=0.0, lt=1.0)  # minimum probability of the entity label
    max_length: int = Field(256, ge=16)  # tokens per window; longer texts are read in overlapping windows


class PiiConfig(_Strict):
    """Contextual personal data (pipeline/pii/context.py); the structured types are always on."""

    names: bool = True
    # Faker locales whose given and family names make up the name gazetteer (pipeline/pii/gazetteer.py);
    # "*": every locale written in a cased script (64 locales, ~70k names).
    name_locales: list[str] = ["*"]
    keep_names: list[str] = []  # public names that are not personal data here (a product, a founder)
    addresses: bool = True  # street shapes of sanitize.phone_regions' countries
    dates_of_birth: bool = True
    id_numbers: bool = True
    recogniser: RecogniserConfig | None = None  # optional model; the rules above stay on

    @field_validator("name_locales")
    @classmethod
    def _locales_exist(cls, v: list[str]) -> list[str]:
        import importlib.util

        unknown = [loc for loc in v if loc != "*" and importlib.util.find_spec(f"faker.providers.person.{loc}") is None]
        if unknown:
            raise ValueError(f"unknown locales {unknown} (Faker person providers, e.g. en_US, de_DE)")
        return v


class ClusterConfig(_Strict):
    """Where ``sanitize.engine: dask`` runs (pipeline/data/engine.py)."""

    address: str | None = None  # a Dask scheduler (tcp://host:8786, tls://...); none: a local cluster here
    workers: int = Field(2, ge=1)  # local cluster: worker processes, one thread each
    memory_limit: str = "4GiB"  # local cluster: per worker; Dask restarts a worker above it
    shard_mb: float = Field(64.0, gt=0)  # JSONL inputs are cut at line starts every this many MiB
    retries: int = Field(2, ge=0)  # a shard whose worker died is re-run this many times
    connect_timeout_s: float = Field(30.0, gt=0)
    shard_timeout_s: float = Field(3600.0, gt=0)


class SanitizeConfig(_Strict):
    out_dir: str = "data/clean"
    # local: one process. dask: per-record work on a Dask cluster (sanitize.cluster); the same outputs.
    engine: Literal["local", "dask"] = "local"
    cluster: ClusterConfig = ClusterConfig()
    max_chars: int = Field(4000, gt=0)  # longer records go to quarantine, not truncation
    max_depth: int = Field(12, ge=3)  # deeper JSON nesting is quarantined (pathological input)
    near_duplicates: bool = True
    near_threshold: float = Field(0.85, gt=0.0, le=1.0)  # word-trigram Jaccard similarity
    num_perm: int = Field(64, ge=8, le=512)  # MinHash permutations: more = sharper threshold, slower
    shingle_words: int = Field(3, ge=1)
    phone_regions: list[str] = ["US", "GB", "DE", "FR"]  # how numbers without a +country code are read
    custom_pii: dict[str, str] = {}  # key -> regex; matches become <KEY> (upper-cased)
    pii: PiiConfig = PiiConfig()
    columns: ColumnMap = ColumnMap()

    @field_validator("engine", mode="before")
    @classmethod
    def _engine_known(cls, v):
        if v == "ray":
            raise ValueError("ray is not an engine here: loraflow runs sanitize on Dask (docs/architecture.md "
                             "says why); use engine: dask, with sanitize.cluster.address for a Dask scheduler")
        return v

    @model_validator(mode="after")
    def _patterns_compile(self) -> "SanitizeConfig":
        import re

        for name, pattern in self.custom_pii.items():
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
                raise ValueError(f"custom_pii name {name!r} must be an identifier (it becomes <{name.upper()}>)")
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"custom_pii.{name}: invalid regex: {err}") from None
        import phonenumbers

        unknown = [r for r in self.phone_regions if r.upper() not in phonenumbers.SUPPORTED_REGIONS]
        if unknown:
            raise ValueError(f"phone_regions: unknown region codes {unknown}")
        return self


class AugmentConfig(_Strict):
    out_dir: str = "data/augmented"
    enabled: bool = True
    # Governance: synthetic records never exceed this share of the training set.
    max_synthetic_fraction: float = Field(0.1, ge=0.0, le=0.5)
    seed: int = 0


# TRL settings loraflow chooses itself: output_dir is the resumable checkpoint folder, the device is detected
# once, checkpoints are step-based for resuming, the metrics need token counts, early stopping owns the
# best-model selection, and packing is loraflow's setting (it also picks the attention kernel).
TRL_OWNED: dict[str, str] = {
    "output_dir": "train.checkpoint_dir", "use_cpu": "the detected device", "packing": "train.packing",
    "save_strategy": "step checkpoints (resumable runs)", "include_num_input_tokens_seen": "the train metrics",
    "load_best_model_at_end": "train.early_stopping_patience", "metric_for_best_model": "train.early_stopping_patience",
}
# loraflow's defaults, under the user's train.trl (TRL's own defaults apply to everything else). The learning
# rate suits the embedded tiny base; lower it for real models (1e-4).
TRL_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-3, "lr_scheduler_type": "cosine", "warmup_steps": 0.05, "num_train_epochs": 6.0,
    "max_steps": -1, "per_device_train_batch_size": 16, "gradient_accumulation_steps": 1, "max_length": 160,
    "seed": 0, "logging_steps": 5, "save_steps": 50, "save_total_limit": 2, "report_to": "none",
    # LoRA uses every trainable parameter each step; DDP's search for unused ones is a wasted pass.
    "ddp_find_unused_parameters": False,
    # TRL turns it on by default; it saves activation memory on big models and costs ~30% speed on the tiny one.
    "activation_checkpointing": False,
}
DPO_DEFAULTS: dict[str, Any] = {"beta": 0.1}
# Keys of the earlier layout that are TRL's own settings now (train.trl.<TRL name>).
_TRAIN_MOVED = {
    "learning_rate": "learning_rate", "lr_scheduler": "lr_scheduler_type", "warmup_ratio": "warmup_steps",
    "epochs": "num_train_epochs", "max_steps": "max_steps", "batch_size": "per_device_train_batch_size",
    "grad_accum": "gradient_accumulation_steps", "max_length": "max_length", "liger_kernels": "use_liger_kernel",
    "torch_compile": "torch_compile", "gradient_checkpointing": "activation_checkpointing", "seed": "seed",
    "logging_steps": "logging_steps", "checkpoint_steps": "save_steps", "dpo_beta": "beta",
    "dataloader_workers": "dataloader_num_workers",
}


class PrivacyConfig(_Strict):
    """``train.privacy``: differentially private LoRA (DP-SGD through Opacus, pipeline/train/privacy.py).

    Every training row is Poisson-sampled with rate ``per_device_train_batch_size / rows`` each step, its
    gradient on the LoRA parameters clipped to ``max_grad_norm`` and Gaussian noise of
    ``noise_multiplier x max_grad_norm`` added to the sum; the accountant turns (noise, rate, steps) into
    the epsilon actually spent. Give ``noise_multiplier`` or ``target_epsilon`` (then the noise is
    calibrated for the planned steps), not both."""

    enabled: bool = False
    target_epsilon: float | None = Field(None, gt=0.0)
    noise_multiplier: float | None = Field(None, ge=0.0)
    delta: float | None = Field(None, gt=0.0, lt=1.0)  # None: 1 / (10 x training rows), below 1/rows
    max_grad_norm: float = Field(1.0, gt=0.0)  # per-example clipping bound C
    accountant: Literal["rdp", "prv"] = "rdp"

    @model_validator(mode="after")
    def _one_noise_source(self) -> "PrivacyConfig":
        if self.enabled and (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("train.privacy: give exactly one of target_epsilon (the noise is calibrated for it) "
                             "and noise_multiplier")
        return self


class ContinualConfig(_Strict):
    """``train.continual``: start from the champion's adapter instead of from scratch, with an elastic
    weight consolidation penalty ``ewc_lambda / 2 * sum(F_i / mean(F) * (theta_i - theta*_i)^2)`` that
    keeps the LoRA parameters near the champion's where its Fisher information says they matter
    (pipeline/train/continual.py). Every adapter trained with this on stores its Fisher information
    (``fisher.safetensors``, estimated on its own training rows) for the version after it."""

    from_champion: bool = False
    ewc_lambda: float = Field(0.0, ge=0.0)  # 0: start from the champion, no penalty
    fisher_samples: int = Field(256, ge=1)  # training rows the diagonal Fisher is estimated on


class DistributedConfig(_Strict):
    """``python -m pipeline train`` (and so ``dvc repro train``) starts itself under torchrun when this asks
    for more than one process: ``nproc_per_node`` GPUs here, ``nnodes`` machines that each run the same
    command and meet at ``rdzv_endpoint`` (host:port, reachable from every node). DDP by default; FSDP
    through ``train.trl.fsdp``/``fsdp_config`` (docs/training.md)."""

    nproc_per_node: int = Field(1, ge=1)
    nnodes: int = Field(1, ge=1)
    rdzv_endpoint: str = ""
    rdzv_id: str = "loraflow-train"
    join_timeout_s: int = Field(900, gt=0)  # how long the first node waits for the others

    @model_validator(mode="after")
    def _endpoint(self) -> "DistributedConfig":
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("train.distributed.rdzv_endpoint: needed with nnodes > 1 (host:port of one node, "
                             "the same on every node)")
        return self

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


class TrainConfig(_Strict):
    """loraflow's own training settings; everything TRL configures goes through ``trl:`` unchanged."""

    out_dir: str = "artifacts/adapter"
    method: Literal["sft", "dpo"] = "sft"
    adapter: Literal["lora", "qlora", "dora"] = "lora"  # qlora: 4-bit NF4 base via bitsandbytes (CUDA)
    lora_r: int = Field(16, gt=0)  # higher = more capacity, more memory
    lora_alpha: int = Field(32, gt=0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    packing: bool = False  # best-fit packing into full sequences, padding-free (block-diagonal attention)
    # auto: on CUDA with packing, PyTorch's varlen flash attention (attends within each packed document
    # instead of over a dense block-diagonal mask); otherwise sdpa.
    attention: Literal["auto", "sdpa", "varlen", "eager"] = "auto"
    # One autograd node per LoRA projection (base matmul, A, B, scale and add), the 4-bit weight
    # re-dequantized in the backward; layers peft computes differently keep peft's forward.
    fused_lora: bool = True
    # Checkpoints for resuming a killed run live outside the DVC output (DVC clears outputs before a
    # stage runs); they are keyed by the config and input hashes, so a changed run never resumes a stale one.
    checkpoint_dir: str = "artifacts/checkpoints"
    early_stopping_patience: int = Field(0, ge=0)  # evaluations without eval-loss improvement; 0 = off
    # A share of generic instruction data mixed into training limits forgetting of general skills.
    generic_fraction: float = Field(0.0, ge=0.0, le=0.5)
    # Training completions cut by train.trl.max_length (or left out: none of their tokens fit) beyond this
    # share stop the run, naming the setting; below it they are counted in the train report.
    max_truncated_share: float = Field(0.05, ge=0.0, le=1.0)
    merge_export: bool = False  # also write base+adapter merged (loadable by vLLM and transformers)
    gpu_hour_price: float = Field(0.0, ge=0.0)  # currency units per GPU-hour, for the cost estimate
    # TRL's SFTConfig / DPOConfig fields, passed through over TRL_DEFAULTS; checked against the installed
    # TRL when training starts (pipeline/train/trl_args.py).
    trl: dict[str, Any] = {}
    privacy: PrivacyConfig = PrivacyConfig()
    continual: ContinualConfig = ContinualConfig()
    distributed: DistributedConfig = DistributedConfig()

    _moved_keys = _moved("train", {k: f"train.trl.{v}" for k, v in _TRAIN_MOVED.items()})

    @field_validator("trl")
    @classmethod
    def _trl_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            if key in TRL_OWNED:
                raise ValueError(f"train.trl.{key}: set by loraflow ({TRL_OWNED[key]}), not through train.trl")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.method == "dpo" and self.packing:
            raise ValueError("packing is not supported with method: dpo")
        if self.method == "dpo" and self.continual.ewc_lambda > 0:
            raise ValueError("train.continual.ewc_lambda: the EWC penalty needs a per-record loss (method: sft); "
                             "with dpo, from_champion starts from the champion without it")
        if self.privacy.enabled:
            # What DP-SGD through Opacus can give its guarantee for; the rest is refused, never trained
            # without the guarantee (docs/privacy.md).
            refused = {
                "method": (self.method != "sft", "only method: sft trains under train.privacy (DPO's paired "
                           "loss is not a per-record loss Opacus can clip)"),
                "adapter": (self.adapter != "lora", "only adapter: lora trains under train.privacy (DoRA's "
                            "magnitude vector and QLoRA's 4-bit layers have no per-sample gradients in Opacus)"),
                "packing": (self.packing, "packing puts several records in one row, so a per-row gradient "
                            "bound is not a per-record bound"),
                "fused_lora": (self.fused_lora and "fused_lora" in self.model_fields_set,
                               "the fused LoRA path computes A and B in one autograd node, where Opacus "
                               "cannot see per-sample gradients"),
                "continual.ewc_lambda": (self.continual.ewc_lambda > 0, "the Fisher information is computed "
                                         "from the training records without noise and stored with the adapter"),
                "distributed": (self.distributed.world_size > 1, "the Poisson sampler and the noise are per "
                                "process; DP training runs in one"),
            }
            bad = [f"train.{k}: {why}" for k, (on, why) in refused.items() if on]
            if bad:
                raise ValueError("not supported with train.privacy.enabled: " + "; ".join(bad))
        return self

    @property
    def fsdp(self) -> bool:
        """FSDP through TRL's own ``fsdp`` setting (the HF Trainer shards; loraflow loads QLoRA for it)."""
        return bool(self.trl.get("fsdp"))

    @property
    def fused(self) -> bool:
        """Whether the fused LoRA path runs: off under privacy unless asked for (which is refused above), and
        under FSDP, whose flattened parameters the fused autograd node does not address."""
        return self.fused_lora and not self.privacy.enabled and not self.fsdp

    def trl_value(self, key: str) -> Any:
        """A TRL setting as this run uses it (the user's, else loraflow's default, else None)."""
        defaults = {**TRL_DEFAULTS, **(DPO_DEFAULTS if self.method == "dpo" else {})}
        return self.trl.get(key, defaults.get(key))

    @property
    def seed(self) -> int:
        return int(self.trl_value("seed"))


class EvaluateConfig(_Strict):
    out_dir: str = "reports/eval"
    batch_size: int = Field(32, gt=0)
    max_examples: int = Field(0, ge=0)  # 0 = all
    # Who generates the answers: transformers' generate (the CPU default) or vLLM's offline engine in
    # serve.python's environment (pipeline/evaluate/vllm_engine.py); auto = vLLM when CUDA is present and
    # serve.python has it. The scores, probes and files are the same either way.
    engine: Literal["auto", "transformers", "vllm"] = "auto"
    # auto takes vLLM only for at least this many answers (eval + forgetting prompts, base and candidate):
    # below it vLLM's start-up costs more than it saves (docs/benchmarks.md, "The loop on a GPU").
    vllm_min_answers: int = Field(5000, ge=0)
    vllm: dict[str, Any] = {}  # passed to vllm.LLM as written (gpu_memory_utilization, enforce_eager, ...)
    vllm_timeout_s: float = Field(3600.0, gt=0)  # the whole offline run, start-up included
    # Float32 logits the probes (forgetting, canaries) may hold at once; batches are sized to it.
    probe_memory_mb: float = Field(1024.0, gt=0)


class ProbesConfig(_Strict):
    """Leak probe: unique random canary secrets planted into a copy of the training data (never into the
    DVC-tracked data or the registry; the train stage adds them in memory), then measured after training."""

    canaries: int = Field(4, ge=0)  # 0 = no canaries planted (the PII scan of generated answers still runs)
    repetitions: int = Field(1, ge=1)  # copies of each canary in the training data
    digits: int = Field(9, ge=4, le=32)  # the secret: this many random digits
    candidates: int = Field(1000, ge=10)  # random secrets of the same format each canary is ranked among
    seed: int = 0


class GateConfig(_Strict):
    metric: str = ""  # one the task produces (checked at start); empty = the task's primary metric
    # The lower bound of the paired bootstrap confidence interval of the mean per-example difference
    # (candidate - reference, same examples) must exceed this: noise never moves the alias.
    min_improvement: float = Field(0.02, ge=-1.0, le=1.0)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    bootstrap_samples: int = Field(10000, ge=100)
    seed: int = 0
    min_examples: int = Field(30, ge=1)  # fewer paired examples: no promotion, whatever the numbers
    # Share of answers the task's parser must accept (metric ``valid``) for any promotion.
    min_valid: float = Field(0.9, ge=0.0, le=1.0)
    # Guardrails: no drop beyond this on each of the task's guardrail metrics (task.guardrail_metrics) ...
    guardrail_tolerance: float = Field(0.02, ge=0.0, le=1.0)
    # ... nor a generation speed (tokens/s) below (1 - max_slowdown) x the reference's.
    max_slowdown: float = Field(0.5, ge=0.0, le=1.0)
    # Forgetting: the generic regression set's next-token accuracy may drop at most this much below the base's.
    forgetting_tolerance: float = Field(0.1, ge=0.0, le=1.0)
    # Leak probe: any canary the model completes from its prefix fails the gate, as does a redacted PII value
    # in any generated answer. Canary exposure (log2 of candidates / rank: ~1 bit for an unseen secret, at
    # most log2(probes.candidates + 1)) is always measured and reported; above max_exposure it fails the
    # gate too (0 = report only: a fine-tune that learns its task usually ranks singleton canaries first,
    # docs/benchmarks.md).
    max_exposure: float = Field(0.0, ge=0.0)
    # Privacy: a version whose training spent more than this epsilon (train.privacy), or trained without
    # the guarantee, is never promoted. None: not required.
    max_epsilon: float | None = Field(None, gt=0.0)
    # A guardrail that cannot be computed (a guardrail metric or the speed not measured for one side, the
    # forgetting set or the PII scan missing for one side, an eval slice not scored the same way for both)
    # fails the gate, naming it. List a kind here to promote without it; the decision then says SKIP.
    skip_uncomputable: list[Literal["guardrail_metrics", "speed", "forgetting", "leak", "slices"]] = []


class RegistryConfig(_Strict):
    tracking_uri: str = "sqlite:///mlflow/mlflow.db"
    artifact_root: str = "mlflow/artifacts"
    experiment: str = "loraflow"
    alias: str = Field("champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    # A registry call that fails for a reason other than a definite answer (a locked SQLite file, a timeout,
    # a server restarting) is retried this many times with exponential backoff, then fails the operation;
    # nothing is ever decided on a read that did not answer (pipeline/registry.py).
    timeout_s: float = Field(15.0, gt=0.0)  # per HTTP request to a tracking server
    retries: int = Field(4, ge=0)
    retry_backoff_s: float = Field(0.5, gt=0.0)  # first wait; doubles each retry


class LimitsConfig(_Strict):
    """What one client may ask of the gateway; checked before anything reaches vLLM."""

    max_body_kb: int = Field(256, gt=0)  # 413 above
    max_tokens: int = Field(1024, gt=0)  # ceiling on a request's max_tokens (400 above)
    max_n: int = Field(4, gt=0)  # ceiling on n (400 above)
    requests_per_s: float = Field(50.0, gt=0.0)  # per client key, sustained ...
    burst: int = Field(100, gt=0)  # ... with this many at once (429 + Retry-After beyond)
    max_concurrent: int = Field(64, gt=0)  # requests in flight per client key (429 beyond)
    request_timeout_s: float = Field(120.0, gt=0.0)  # upstream deadline per request (504 after)


class ServeConfig(_Strict):
    # vLLM lives in its own environment (its pins conflict with Prefect's); we talk HTTP to it.
    python: str = ".venv-vllm/bin/python"
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    url: str = ""  # an already running server; empty = http://host:port
    # Several GPUs: ``tensor_parallel`` GPUs per vLLM, ``replicas`` vLLM processes started here (ports
    # port, port+1, ...; replica i gets GPUs i*tensor_parallel onwards) or ``upstreams``: running vLLMs (one
    # key). The gateway spreads requests across them; a swap completes only when every replica has it.
    tensor_parallel: int = Field(1, ge=1)
    replicas: int = Field(1, ge=1)
    upstreams: list[str] = []
    max_lora_rank: int = Field(16, gt=0)
    max_loras: int = Field(2, gt=0)
    max_model_len: int = Field(512, gt=0)
    dtype: str = "float32"
    extra_args: list[str] = ["--gpu-memory-utilization", "0.3"]
    env: dict[str, str] = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    startup_timeout_s: int = Field(900, gt=0)
    log_file: str = "reports/vllm.log"
    adapters_dir: str = "artifacts/served"
    poll_interval_s: float = Field(10.0, gt=0.0)
    traffic_log: str = "data/serving/requests.jsonl"  # the gateway's PII-redacted request log
    # The one endpoint clients call (pipeline/serve/gateway.py); vLLM stays on host:port behind it.
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(8080, gt=0, lt=65536)
    gateway_key_file: str = ""  # one client key per line; or LORAFLOW_API_KEYS (comma-separated)
    models: list[str] = []  # registered models served side by side on one base; empty = project.name
    # MLflow registry webhooks (tracking server only; secret in LORAFLOW_WEBHOOK_SECRET) wake the follower at
    # once; the poll above reconciles anyway, so a missed webhook cannot leave serving on a stale version.
    webhook_url: str = ""  # how MLflow reaches the gateway; empty = http://gateway_host:gateway_port/hooks/mlflow
    log_max_mb: float = Field(50.0, gt=0.0)  # request log rotates at this size
    log_retention_days: float = Field(30.0, gt=0.0)  # request-log records older than this are deleted
    log_rotate_hours: float = Field(24.0, gt=0.0)  # the live log rotates at this age too (so retention runs)
    limits: LimitsConfig = LimitsConfig()

    @model_validator(mode="after")
    def _one_way_to_reach_vllm(self) -> "ServeConfig":
        if self.upstreams and self.url:
            raise ValueError("serve.upstreams and serve.url both set: list every running vLLM in serve.upstreams")
        if self.replicas > 1 and (self.url or self.upstreams):
            raise ValueError("serve.replicas starts vLLM processes here; for servers already running, list "
                             "them in serve.upstreams instead")
        return self

    def process_env(self, **fixed: str) -> dict[str, str]:
        """The environment a vLLM process of ours starts with: this one's, then ``fixed``, then
        ``serve.env``; without our own venv's variables, which must not leak into vLLM's interpreter
        (a wrapper named as serve.python may set its own)."""
        import os

        env = {**os.environ, **fixed, **self.env}
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        return env

    @property
    def base_url(self) -> str:
        return self.url.rstrip("/") or f"http://{self.host}:{self.port}"

    @property
    def attached(self) -> bool:
        """vLLM runs elsewhere (``url`` or ``upstreams``): loraflow neither starts nor restarts it."""
        return bool(self.url or self.upstreams)

    @property
    def upstream_urls(self) -> list[str]:
        """Every vLLM the gateway sends requests to."""
        if self.upstreams:
            return [u.rstrip("/") for u in self.upstreams]
        if self.url:
            return [self.base_url]
        return [f"http://{self.host}:{self.port + i}" for i in range(self.replicas)]


class MonitorConfig(_Strict):
    out_dir: str = "reports/drift"
    drift_share: float = Field(0.35, gt=0.0, le=1.0)  # share of drifted columns that counts as drift
    # Each check reads only the requests logged after the window the previous check judged (so one window
    # never fires twice), at most the newest ``window_requests`` of them (0 = no cap) and only those of the
    # last ``window_hours`` (0 = no age limit). Fewer than ``min_requests``: no verdict, the window stays open.
    min_requests: int = Field(20, gt=0)
    window_requests: int = Field(0, ge=0)
    window_hours: float = Field(0.0, ge=0.0)
    retrain_on_drift: bool = False


class PodResources(_Strict):
    """What one kind of flow-run pod asks Kubernetes for."""

    cpu: str = "2"
    memory: str = "8Gi"
    gpus: int = Field(0, ge=0)
    gpu_resource: str = "nvidia.com/gpu"  # the device plugin's resource name
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []


class KubernetesConfig(_Strict):
    """``platform.work_pool_type: kubernetes`` (flows/kubernetes.py): every flow run is a Job in ``namespace``
    from ``image``, sharing the workspace volume; ``platform.gpu_stages`` run in a pod with ``gpu``
    resources, the rest with ``cpu``."""

    namespace: str = "loraflow"
    image: str = "ghcr.io/loraflow/pipeline:0.1.0"
    service_account: str = "loraflow-flow-runs"
    workspace_claim: str = "loraflow-workspace"  # a ReadWriteMany PVC: the checkout, DVC cache and outputs
    workspace_path: str = "/workspace"
    env_secret: str = "loraflow-secrets"  # a Kubernetes Secret whose keys become environment variables
    cpu: PodResources = PodResources()
    gpu: PodResources = PodResources(cpu="8", memory="64Gi", gpus=1, tolerations=[
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])


class PlatformConfig(_Strict):
    """``loraflow up``: the services it starts on this machine and the Prefect deployments it creates."""

    state_dir: str = ".loraflow"  # PIDs and logs (run/), generated secrets (0600); data stays where it is
    host: str = "127.0.0.1"  # Prefect and MLflow have no authentication: keep them on this host
    prefect_port: int = Field(4200, gt=0, lt=65536)
    mlflow_port: int = Field(5000, gt=0, lt=65536)
    # Empty: SQLite files (Prefect's in .prefect/, MLflow's at registry.tracking_uri). A PostgreSQL URL
    # (postgresql://user:password@host:5432/loraflow; LORAFLOW_DATABASE_URL wins) puts both on that
    # server, in the databases <name>_mlflow and <name>_prefect (created when missing).
    database_url: str = ""
    serve: bool = True  # also start the endpoint (loraflow serve: vLLM + gateway)
    work_pool: str = Field("loraflow", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    work_pool_type: Literal["process", "kubernetes"] = "process"  # kubernetes: platform.kubernetes
    kubernetes: KubernetesConfig = KubernetesConfig()
    # DVC stages the retrain runs as a flow run of their own (deployment stage/gpu): on the Kubernetes pool
    # in a pod with platform.kubernetes.gpu, on the process pool in a process of its own.
    gpu_stages: list[str] = []
    gpu_stage_timeout_s: float = Field(86400.0, gt=0.0)  # one such stage run, queueing for a node included
    retrain_cron: str = "0 3 * * 1"  # scheduled retrain (weekly); empty = none
    timezone: str = "UTC"
    drift_check_minutes: float = Field(60.0, ge=0.0)  # drift-check interval; 0 = none
    # No drift-triggered retrain that trains within this many minutes of the last one that did.
    drift_cooldown_minutes: float = Field(60.0, ge=0.0)
    startup_timeout_s: float = Field(180.0, gt=0.0)  # per service, until its health check answers

    @field_validator("retrain_cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        if v and len(v.split()) != 5:
            raise ValueError("not a 5-field cron expression (minute hour day month weekday)")
        return v

    @field_validator("database_url")
    @classmethod
    def _postgres(cls, v: str) -> str:
        if v and not v.startswith(("postgresql://", "postgres://")):
            raise ValueError("only postgresql://user:password@host:port/name (or empty for SQLite)")
        return v


class TeacherConfig(_Strict):
    """An OpenAI-compatible endpoint that labels unlabelled requests (pipeline/curate/teacher.py)."""

    url: str  # base URL with /v1, e.g. http://127.0.0.1:8000/v1 or https://api.openai.com/v1
    model: str
    api_key_env: str = "LORAFLOW_TEACHER_KEY"  # the key is read from this environment variable, never params
    # Part of the cache key: a new teacher version labels again. Empty = the model's `root` that the
    # endpoint's /v1/models reports (the weights it serves), else the model id.
    version: str = ""
    batch_size: int = Field(8, gt=0)  # requests per batch; the cache is written after each batch
    concurrency: int = Field(4, gt=0)  # requests in flight at once
    requests_per_s: float = Field(5.0, gt=0.0)  # rate limit towards the teacher
    timeout_s: float = Field(60.0, gt=0.0)
    retries: int = Field(3, ge=0)  # on timeouts, connection errors, 429 and 5xx, with doubling waits
    retry_backoff_s: float = Field(1.0, gt=0.0)
    max_per_run: int = Field(200, ge=0)  # teacher calls per curate run (cache hits are free)
    cache_dir: str = "artifacts/teacher_cache"  # outside DVC outputs: re-runs cost nothing

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL of an OpenAI-compatible API (ending in /v1)")
        return v.rstrip("/")


class CurateConfig(_Strict):
    """Traffic and feedback -> new, versioned training and eval records (pipeline/curate/)."""

    out_dir: str = "data/curated"
    enabled: bool = True
    positive_answers: bool = False  # also train on answers users rated positively (as given)
    eval_share: float = Field(0.2, ge=0.0, le=0.9)  # held out into the eval slice, by request id
    teacher_in_eval: bool = False  # teacher-labelled records may enter the eval slice
    min_new_records: int = Field(20, ge=0)  # a drift-triggered retrain waits for this many new curated records
    score_range: tuple[float, float] = (1.0, 5.0)  # numeric scores clients may post
    positive_at: float = 4.0  # score >= this counts as positive (thumbs up always does)
    negative_at: float = 2.0  # score <= this counts as negative (thumbs down always does)
    seed: int = 0  # the held-out split's salt
    teacher: TeacherConfig | None = None

    @model_validator(mode="after")
    def _scores(self) -> "CurateConfig":
        low, high = self.score_range
        if low >= high:
            raise ValueError(f"curate.score_range: {low:g} must be below {high:g}")
        if not (low <= self.negative_at < self.positive_at <= high):
            raise ValueError(f"curate.positive_at: need score_range[0] <= negative_at < positive_at <= "
                             f"score_range[1] (got {self.negative_at:g}, {self.positive_at:g} in [{low:g}, {high:g}])")
        return self


class DvcConfig(_Strict):
    push: bool = True  # push outputs to the default remote after the data/model stages


class Params(_Strict):
    project: ProjectConfig = ProjectConfig()
    task: TaskConfig = Field(default_factory=TaskConfig)  # built on use: validating it asks pipeline.tasks
    base: BaseModelConfig = BaseModelConfig()
    data: DataConfig = DataConfig()
    curate: CurateConfig = CurateConfig()
    sanitize: SanitizeConfig = SanitizeConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    gate: GateConfig = GateConfig()
    probes: ProbesConfig = ProbesConfig()
    registry: RegistryConfig = RegistryConfig()
    serve: ServeConfig = ServeConfig()
    monitor: MonitorConfig = MonitorConfig()
    platform: PlatformConfig = PlatformConfig()
    dvc: DvcConfig = DvcConfig()

    @model_validator(mode="after")
    def _gate_metric_is_the_tasks(self) -> "Params":
        if self.train.generic_fraction > 0 and not self.data.generic:
            raise ValueError("train.generic_fraction: > 0 needs data.generic (a chat JSONL file)")
        if self.gate.metric and self.gate.metric not in self.task.all_metric_names:
            raise ValueError(f"gate.metric: {self.gate.metric!r} is not produced by task kind "
                             f"{self.task.kind!r} (its metrics: {', '.join(self.task.all_metric_names)})")
        for m in self.task.guardrail_metrics or []:
            if m not in self.task.all_metric_names:
                raise ValueError(f"task.guardrail_metrics: {m!r} is not produced by task kind {self.task.kind!r} "
                                 f"(its metrics: {', '.join(self.task.all_metric_names)})")
        self._check_serving_fits()
        return self

    def _check_serving_fits(self) -> None:
        """Combinations that would pass training and the gate and only fail when serving loads the adapter."""
        if self.train.lora_r > self.serve.max_lora_rank:
            raise ValueError(f"train.lora_r: {self.train.lora_r} is above serve.max_lora_rank "
                             f"({self.serve.max_lora_rank}); vLLM would refuse the adapter after the gate passed it. "
                             "Raise serve.max_lora_rank (vLLM takes 8, 16, 32, 64, 128, 256, 320, 512) or lower "
                             "train.lora_r")
        served = len(self.serve.models) or 1
        if self.serve.max_loras < served + 1:
            raise ValueError(f"serve.max_loras: {self.serve.max_loras} cannot hold {served} served model(s) plus "
                             "the version being swapped in; set it to at least " + str(served + 1))

    @property
    def guardrail_metrics(self) -> list[str]:
        names = self.task.guardrail_metrics
        if names is None:
            names = [m for m in self.task.all_metric_names if m != self.gate_metric]
        return [m for m in names if m != self.gate_metric]

    @property
    def gate_metric(self) -> str:
        return self.gate.metric or self.task.primary_metric


def _format_errors(path: Path, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        named = re.findall(r"^([a-z_]+\.[a-z_.]+): (.*)$", msg, re.M)
        if key and named and all(k.startswith(key + ".") for k, _ in named):  # the check named a deeper key
            lines.extend(f"{path}: {k}: {m}" for k, m in named)
            continue
        if not key:  # a cross-section check names its key at the start of its message
            key, _, msg = msg.partition(": ") if re.match(r"[a-z_]+\.[a-z_.]+: ", msg) else ("<root>", "", msg)
            lines.append(f"{path}: {key}: {msg}")
            continue
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see params.yaml for the valid keys)"
        got = re.sub(r"(://[^:/@\s]+:)[^@\s]+@", r"\1***@", repr(e.get("input")))  # no password in errors
        suffix = "" if e["type"] in ("extra_forbidden", "missing") else f" (got {got})"
        lines.append(f"{path}: {key}: {msg}{suffix}")
    return "\n".join(lines)


def parse_params(raw: dict[str, Any], source: Path) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None


# Sections an environment overlay (``extends: params.yaml``) may change. The others feed DVC stages,
# and DVC reads params.yaml itself, so changing them elsewhere would break lineage silently.
DEPLOYMENT_SECTIONS = frozenset({"project", "gate", "registry", "serve", "monitor", "platform", "dvc"})
# Set by `loraflow up` for the processes it starts (and by the CLI while the platform runs): the MLflow
# tracking server that fronts registry.tracking_uri's store, so alias moves fire the registry webhooks.
TRACKING_URI_ENV = "LORAFLOW_TRACKING_URI"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of stage names")
    return raw


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and validate parameters; a file with ``extends: <params.yaml>`` overlays deployment sections."""
    path = Path(path)
    raw = _read_yaml(path)
    parent = raw.pop("extends", None)
    if parent is not None:
        illegal = sorted(set(raw) - DEPLOYMENT_SECTIONS)
        if illegal:
            raise ConfigError(f"{path}: {illegal[0]}: an overlay may only set {sorted(DEPLOYMENT_SECTIONS)}; "
                              f"stage parameters belong in {parent} where DVC tracks them")
        base_path = (path.parent / parent)
        raw = _merge(_read_yaml(base_path), raw)
    p = parse_params(raw, path)
    import os

    server = os.environ.get(TRACKING_URI_ENV, "")
    if server and server != p.registry.tracking_uri:
        p = p.model_copy(update={"registry": p.registry.model_copy(update={"tracking_uri": server})})
    return p


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def apply_profile(params_path: str | Path, profile_path: str | Path) -> list[str]:
    """Write a profile's keys (a partial params file, e.g. profiles/gpu.yaml) into ``params_path``, keeping
    its comments and every other key; the result is validated before anything is written. Returns the
    dotted keys whose value changed. It edits params.yaml itself because DVC reads that file: stage
    parameters set anywhere else would not re-run the stages they change."""
    from ruamel.yaml import YAML

    params_path, profile_path = Path(params_path), Path(profile_path)
    profile = _read_yaml(profile_path)
    current = _read_yaml(params_path)
    merged = _merge(current, profile)
    parse_params(merged, profile_path)  # a bad profile stops here, naming the profile and the key
    before = _leaves(current)
    changed = [k for k, v in _leaves(profile).items() if before.get(k, object()) != v]
    if not changed:
        return []
    rt = YAML()  # round-trip: the user's comments and key order stay
    rt.preserve_quotes = True
    rt.width = 4096
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = rt.load(params_path.read_text(encoding="utf-8"))
    over = rt.load(profile_path.read_text(encoding="utf-8"))

    def put(node, src) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(node.get(k), dict) and v:
                put(node[k], v)
                continue
            node[k] = v
            # The profile's comment says why its value: it replaces the one written for the old value.
            if k in src.ca.items:
                node.ca.items[k] = src.ca.items[k]

    put(doc, over)
    tmp = params_path.with_name(params_path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        rt.dump(doc, fh)
    try:
        parse_params(_read_yaml(tmp), params_path)  # what was written reads back valid, or params.yaml stays
    except ConfigError:
        tmp.unlink()
        raise
    tmp.replace(params_path)
    return changed

