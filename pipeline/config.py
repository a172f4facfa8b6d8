"""Structured-config schema of conf/: misspelled or mistyped keys fail when the config is composed.

The dataclasses that feed a library function live beside it (``SourceSpec``, ``TokenizerSpec``);
this module assembles them into the root schema and registers it with Hydra's ConfigStore.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Type, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from pipeline import PROJECT_ROOT
from pipeline.data.sources import SourceSpec
from pipeline.dedup.evaluate import EvalSpec
from pipeline.dedup.minhash import INDEX_BACKENDS, VERIFY
from pipeline.dedup.run import KEEP_POLICIES, URL_POLICIES, DedupSpec
from pipeline.dedup.text import SHINGLE_KINDS
from pipeline.filter.extract import ENGINES
from pipeline.filter.run import CrawlSource
from pipeline.filter.steps import StepsSpec
from pipeline.model.gpt import BLOCKS, ModelConfig
from pipeline.sft.chat import TEMPLATES
from pipeline.sft.lora import BIASES
from pipeline.tokenizer.build import TokenizerSpec
from pipeline.train.module import SCHEDULES
from pipeline.train.run import TrainerSpec, TrainSpec


@dataclass
class PathsConfig:
    root: str = MISSING  # the project directory (holds conf/ and outputs/)
    data_dir: str = MISSING  # real public data for the demo and tests
    outputs_dir: str = MISSING  # outputs/<experiment>/<stage>/, the MLflow store, caches
    cache_dir: str = MISSING  # datasets' Arrow cache


@dataclass
class TrackingConfig:
    uri: str = MISSING  # MLflow tracking URI; MLFLOW_TRACKING_URI overrides the default
    artifact_location: Optional[str] = None  # for experiments this pipeline creates; None: server's default
    experiment: str = MISSING  # MLflow experiment name


@dataclass
class FilterConfig(StepsSpec):
    """The filter stage: its sources and pool, plus every step's settings (StepsSpec, conf/filter/<step>.yaml)."""

    # name -> CrawlSource, typed as Any for the same reason as tokenize.sources; validate() checks them.
    sources: Dict[str, Any] = field(default_factory=dict)
    num_proc: int = 2  # worker processes; files are grouped into tasks of similar size
    samples_per_rule: int = 20  # rejected documents per rule kept as an MLflow artifact


@dataclass
class DedupInput:
    stage: Optional[str] = "filter"  # an upstream stage whose kept/*.parquet to read ...
    path: Optional[str] = None  # ... or Parquet/JSONL files with a 'text' column


@dataclass
class DedupConfig(DedupSpec):
    """The dedup stage: its input and shards, the levels (DedupSpec, conf/dedup/<level>.yaml), the evaluation."""

    input: DedupInput = field(default_factory=DedupInput)
    rows_per_shard: int = 100000
    eval: EvalSpec = field(default_factory=EvalSpec)


@dataclass
class TokenizeConfig:
    # name -> SourceSpec. Typed as Any so `+tokenize.sources.NAME={path: ...}` works on the command line
    # (OmegaConf cannot append to a Dict of dataclasses); validate() checks each entry against SourceSpec.
    sources: Dict[str, Any] = field(default_factory=dict)
    val_fraction: float = 0.01  # share of documents (by hash of their text) held out for validation
    num_proc: int = 2  # processes for encoding
    batch_size: int = 5000  # documents per encode batch
    max_shard_tokens: int = 2**27  # a new shard file starts past this many tokens


@dataclass
class PretrainConfig(TrainSpec):
    export: bool = True  # also write a transformers model directory (hf/)


@dataclass
class CptInit:
    stage: Optional[str] = "pretrain"  # a training stage whose model.pt to continue ...
    path: Optional[str] = None  # ... or a transformers causal-LM directory


@dataclass
class CptConfig(PretrainConfig):
    init: CptInit = field(default_factory=CptInit)
    sources: Dict[str, Any] = field(default_factory=dict)  # the domain corpus, as tokenize.sources
    val_fraction: float = 0.05


@dataclass
class SftSource:
    """One instruction dataset of the sft mixture (pipeline/sft/data.py reads it)."""

    format: str = MISSING  # alpaca | prompt_response | conversations | oasst_tree | gsm8k | self_instruct
    path: str = MISSING  # a JSON or JSONL file (optionally .gz), a directory or a glob of them
    weight: float = 1.0  # share of its training part used per pass: 0.5 half, 2 twice, 0 held-out only
    options: Dict[str, Any] = field(default_factory=dict)  # the reader's keyword arguments (field names)


@dataclass
class SftLora:
    enabled: bool = True  # false: full fine-tuning (every weight trains)
    rank: int = 8
    alpha: float = 16
    dropout: float = 0.0  # > 0 also keeps a dropped copy of each adapted layer's input for backward
    targets: List[str] = field(default_factory=lambda: ["attn.qkv", "attn.proj"])  # add mlp.up, mlp.down for the MLP
    bias: str = "none"  # none | all | lora_only
    chat_tokens: bool = True  # the chat template's markers' embedding rows train too (peft trainable tokens)


@dataclass
class SftGenerate:
    per_source: int = 8  # held-out instructions answered by the base and the fine-tuned model
    max_new_tokens: int = 48
    show: int = 20  # examples side by side in generations.md


@dataclass
class SftConfig(TrainSpec):
    init: CptInit = field(default_factory=lambda: CptInit(stage="cpt"))  # stage, or path: a model directory,
    # a Lightning .ckpt or a transformers causal-LM directory
    template: str = "chatml"  # chatml | llama2 (pipeline/sft/chat.py)
    sources: Dict[str, Any] = field(default_factory=dict)  # name -> SftSource; typed as Any like tokenize.sources
    val_fraction: float = 0.05  # per source, by hash of the conversation's text
    val_max_per_source: int = 64  # held-out conversations scored for the held-out loss
    max_tokens: Optional[int] = None  # longer conversations are cut (or dropped); None: the model's context
    drop_truncated: bool = False  # true: drop conversations that do not fit instead of cutting them
    packing: bool = False  # several short conversations per row, without attention between them
    lora: SftLora = field(default_factory=SftLora)
    generate: SftGenerate = field(default_factory=SftGenerate)


@dataclass
class EvalModel:
    stage: Optional[str] = None  # a training stage whose model.pt to evaluate ...
    path: Optional[str] = None  # ... or a transformers directory, a stage directory or a checkpoint (.ckpt)


@dataclass
class PromptTaskConfig:
    """One prompting task of the evaluate stage (pipeline/evaluate/prompting.py)."""

    reader: str = MISSING  # sst2 | piqa
    path: str = MISSING  # the examples scored
    labels_path: Optional[str] = None  # piqa: the labels file aligned with path
    train_path: Optional[str] = None  # demonstrations for k-shot; None: other examples of path
    template: str = MISSING  # the prompt, with the reader's fields as slots ({sentence}, {goal})
    labels: List[str] = MISSING  # label names, index = label id
    answers: Optional[Dict[str, int]] = None  # answer text -> label; None: each example's choices (piqa)
    answer_template: str = " {answer}"
    shots: List[int] = field(default_factory=lambda: [0])  # one evaluation per number of demonstrations
    separator: str = "\n\n"
    length_normalize: bool = False
    limit: Optional[int] = None  # the first N examples


@dataclass
class EvaluateConfig:
    # name -> EvalModel, and name -> SourceSpec where `stage` means that stage's held-out documents
    # (tokenize: the pretraining corpus, cpt: the domain corpus). Typed as Any like tokenize.sources.
    models: Dict[str, Any] = field(default_factory=dict)
    sets: Dict[str, Any] = field(default_factory=dict)
    tasks: Dict[str, Any] = field(default_factory=dict)  # name -> PromptTaskConfig (prompting evaluation)
    stride: Optional[int] = None  # tokens between window starts; None: half the model's context
    batch_size: int = 16  # windows per forward pass
    prefix_token: Optional[str] = None  # token before each document; None: tokenizer.special_tokens.eos
    context: Optional[int] = None  # transformers models: window length; None: the model's maximum
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class ScalingConfig:
    sweep_run_id: Optional[str] = None  # a sweep's MLflow parent run; None: the newest sweep of `stage`
    stage: str = "pretrain"
    csv: Optional[str] = None  # instead of a sweep: a CSV with columns N, D and/or C, loss
    loss_metric: str = "val/loss"
    laws: List[str] = field(default_factory=lambda: ["kaplan", "chinchilla"])
    bootstrap_reps: int = 200
    confidence: float = 0.95
    budgets: List[float] = field(default_factory=list)  # FLOPs; empty: 10x and 100x the largest run
    huber_delta: float = 1e-3


@dataclass
class RootConfig:
    name: str = MISSING  # experiment name: outputs/<name>/, MLflow experiment <name>
    seed: int = 1337
    paths: PathsConfig = field(default_factory=PathsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    cpt: CptConfig = field(default_factory=CptConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)


T = TypeVar("T")


def typed(node: Any, schema: Type[T], key: str) -> T:
    """A config node as a ``schema`` dataclass; a bad key or value names ``key``."""
    from omegaconf.errors import OmegaConfBaseException

    from pipeline.errors import PipelineError

    try:
        values = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except OmegaConfBaseException as e:
        inner = getattr(e, "full_key", None)
        raise PipelineError(f"config key '{key}{'.' + inner if inner else ''}': {str(e).splitlines()[0]}") from None


def validate(cfg) -> None:
    """Check a composed config against the schema again.

    Hydra's ``+key=value`` opens the struct flag to append, which would let a misspelled key in.
    """
    from omegaconf.errors import OmegaConfBaseException

    from pipeline.errors import PipelineError

    try:
        OmegaConf.merge(OmegaConf.structured(RootConfig), OmegaConf.to_container(cfg, resolve=False))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise PipelineError(f"config key '{key}': {str(e).splitlines()[0]}") from None
    free_form = {"tokenize.sources": SourceSpec, "filter.sources": CrawlSource, "cpt.sources": SourceSpec,
                 "sft.sources": SftSource,
                 "evaluate.models": EvalModel, "evaluate.sets": SourceSpec, "evaluate.tasks": PromptTaskConfig}
    for key, schema in free_form.items():  # maps typed as Any (see TokenizeConfig.sources): check each entry
        for name, node in OmegaConf.select(cfg, key).items():
            typed(node, schema, f"{key}.{name}")
    m = cfg.model
    checks = [("model.block", m.block in BLOCKS, f"one of {', '.join(BLOCKS)}"),
              ("model.n_layer", m.n_layer >= 1, "at least 1"),
              ("model.n_head", m.n_head >= 1 and m.d_model % m.n_head == 0, "at least 1 and divide model.d_model"),
              ("model.context", m.context >= 2, "at least 2"),
              ("model.dropout", 0 <= m.dropout < 1, "in [0, 1)"),
              ("cpt.val_fraction", 0 < cfg.cpt.val_fraction < 1, "in (0, 1)"),
              ("sft.val_fraction", 0 < cfg.sft.val_fraction < 1, "in (0, 1)"),
              ("sft.val_max_per_source", cfg.sft.val_max_per_source >= 1, "at least 1"),
              ("sft.max_tokens", cfg.sft.max_tokens is None or cfg.sft.max_tokens >= 2, "at least 2 or null"),
              ("sft.template", cfg.sft.template in TEMPLATES, f"one of {', '.join(TEMPLATES)}"),
              ("sft.lora.bias", cfg.sft.lora.bias in BIASES, f"one of {', '.join(BIASES)}"),
              ("sft.lora.rank", cfg.sft.lora.rank >= 1, "at least 1"),
              ("sft.lora.dropout", 0 <= cfg.sft.lora.dropout < 1, "in [0, 1)"),
              ("sft.generate.per_source", cfg.sft.generate.per_source >= 0, "at least 0"),
              ("sft.generate.max_new_tokens", cfg.sft.generate.max_new_tokens >= 1, "at least 1"),
              ("evaluate.stride", cfg.evaluate.stride is None or cfg.evaluate.stride >= 1, "at least 1 or null"),
              ("evaluate.batch_size", cfg.evaluate.batch_size >= 1, "at least 1"),
              ("scaling.laws", bool(cfg.scaling.laws) and set(cfg.scaling.laws) <= {"kaplan", "chinchilla"},
               "a non-empty list of kaplan, chinchilla"),
              ("scaling.bootstrap_reps", cfg.scaling.bootstrap_reps >= 0, "at least 0"),
              ("scaling.confidence", 0 < cfg.scaling.confidence < 1, "in (0, 1)"),
              ("scaling.budgets", all(b > 0 for b in cfg.scaling.budgets), "positive FLOP counts"),
              ("scaling.huber_delta", cfg.scaling.huber_delta > 0, "positive")]
    for stage in ("pretrain", "cpt", "sft"):
        t = cfg[stage]
        checks += [(f"{stage}.max_steps", t.max_steps >= 1, "at least 1"),
                   (f"{stage}.micro_batch_size", t.micro_batch_size >= 1, "at least 1"),
                   (f"{stage}.grad_accum", t.grad_accum >= 1, "at least 1"),
                   (f"{stage}.grad_clip", t.grad_clip >= 0, "at least 0 (0: off)"),
                   (f"{stage}.eval_every_steps", t.eval_every_steps >= 1, "at least 1"),
                   (f"{stage}.eval_windows", t.eval_windows >= 1, "at least 1"),
                   (f"{stage}.ckpt_every_steps", t.ckpt_every_steps >= 0, "at least 0 (0: only at the end)"),
                   (f"{stage}.optim.lr", t.optim.lr > 0, "positive"),
                   (f"{stage}.optim.warmup_steps", t.optim.warmup_steps >= 0, "at least 0"),
                   (f"{stage}.optim.min_lr_ratio", 0 <= t.optim.min_lr_ratio <= 1, "in [0, 1]"),
                   (f"{stage}.optim.schedule", t.optim.schedule in SCHEDULES, f"one of {', '.join(SCHEDULES)}")]
    for key, ok, expected in checks:
        if not ok:
            raise PipelineError(f"config key '{key}' is {OmegaConf.select(cfg, key)}; it must be {expected}")
    checks = [("tokenize.val_fraction", 0 <= cfg.tokenize.val_fraction < 1, "in [0, 1)"),
              ("tokenize.num_proc", cfg.tokenize.num_proc >= 1, "at least 1"),
              ("tokenize.batch_size", cfg.tokenize.batch_size >= 1, "at least 1"),
              ("tokenize.max_shard_tokens", cfg.tokenize.max_shard_tokens >= 1, "at least 1"),
              ("tokenizer.vocab_size", cfg.tokenizer.vocab_size >= 1, "at least 1"),
              ("filter.num_proc", cfg.filter.num_proc >= 1, "at least 1"),
              ("filter.samples_per_rule", cfg.filter.samples_per_rule >= 0, "at least 0"),
              ("filter.langid.min_score", 0 <= cfg.filter.langid.min_score <= 1, "in [0, 1]"),
              ("filter.extract.engine", cfg.filter.extract.engine in ENGINES, f"one of {', '.join(ENGINES)}"),
              ("dedup.keep", cfg.dedup.keep in KEEP_POLICIES, f"one of {', '.join(KEEP_POLICIES)}"),
              ("dedup.url.keep", cfg.dedup.url.keep in URL_POLICIES, f"one of {', '.join(URL_POLICIES)}"),
              ("dedup.near.threshold", 0 < cfg.dedup.near.threshold <= 1, "in (0, 1]"),
              ("dedup.near.num_perm", cfg.dedup.near.num_perm >= 2, "at least 2"),
              ("dedup.near.num_proc", cfg.dedup.near.num_proc >= 1, "at least 1"),
              ("dedup.near.shingles.n", cfg.dedup.near.shingles.n >= 1, "at least 1"),
              ("dedup.near.shingles.kind", cfg.dedup.near.shingles.kind in SHINGLE_KINDS,
               f"one of {', '.join(SHINGLE_KINDS)}"),
              ("dedup.near.verify", cfg.dedup.near.verify in VERIFY, f"one of {', '.join(VERIFY)}"),
              ("dedup.near.index.backend", cfg.dedup.near.index.backend in INDEX_BACKENDS,
               f"one of {', '.join(INDEX_BACKENDS)}"),
              ("dedup.near.index.workers", cfg.dedup.near.index.workers >= 1, "at least 1"),
              ("dedup.lines.min_documents", cfg.dedup.lines.min_documents >= 2, "at least 2"),
              ("dedup.rows_per_shard", cfg.dedup.rows_per_shard >= 1, "at least 1"),
              ("dedup.eval.max_docs", cfg.dedup.eval.max_docs >= 2, "at least 2")]
    for key, ok, expected in checks:
        if not ok:
            raise PipelineError(f"config key '{key}' is {OmegaConf.select(cfg, key)}; it must be {expected}")


def register() -> None:
    """Make the schema and the ``${root:}`` resolver known to Hydra (idempotent)."""
    ConfigStore.instance().store(name="schema", node=RootConfig)
    if not OmegaConf.has_resolver("root"):
        OmegaConf.register_new_resolver("root", lambda: str(PROJECT_ROOT))


register()
