"""The run's configuration: one typed object, built once from the composed Hydra config.

The dataclasses are the one source of defaults (conf/*.yaml set only what differs) and check their own
values in ``__post_init__`` (``pipeline.errors.check``); the ones that feed a library function live
beside it (``SourceSpec``, ``TokenizerSpec``, ``NearSpec``), the stage sections are assembled here.
``load`` turns a composed config into a ``RootConfig``, naming the full key of any bad value.
"""
from __future__ import annotations

from dataclasses import dataclass, field, is_dataclass
from enum import Enum, StrEnum
from typing import Any, Dict, List, Optional, Type, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline import PROJECT_ROOT
from pipeline.data.sources import SourceSpec, StageOrPath
from pipeline.dedup.evaluate import EvalSpec
from pipeline.dedup.run import DedupSpec
from pipeline.dpo.spec import LossType
from pipeline.errors import BadInput, ConfigError, PipelineError, check, choice
from pipeline.filter.run import CrawlSource
from pipeline.filter.steps import StepsSpec
from pipeline.evaluate.spec import HeadSpec
from pipeline.model.spec import DecodeSpec, ModelConfig
from pipeline.sft.chat import Template
from pipeline.sft.spec import LoraSpec
from pipeline.tokenizer.build import TokenizerSpec
from pipeline.tokenizer.spec import EncodeSpec
from pipeline.tracking import TrackingSettings
from pipeline.train.spec import TrainerSpec, TrainSpec

CONF_DIR = PROJECT_ROOT / "conf"
T = TypeVar("T")


def entries(values: Dict[str, Any], schema: Type[T], key: str) -> Dict[str, T]:
    """A free-form map's values as ``schema`` dataclasses; a bad entry names its key (``web.path``).

    Such maps are typed ``Dict[str, Any]`` in the schema so that ``+tokenize.sources.NAME.path=...``
    can add an entry on the command line (OmegaConf cannot append to a map of dataclasses).
    """
    out = {}
    for name, value in values.items():
        if isinstance(value, schema):
            out[name] = value
            continue
        try:
            out[name] = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), value))
        except OmegaConfBaseException as e:
            inner = getattr(e, "full_key", None)
            raise ConfigError(f"{key}.{name}{'.' + inner if inner else ''}", f"is invalid: {str(e).splitlines()[0]}") from None
        except ConfigError as e:
            raise ConfigError(f"{key}.{name}{'.' + e.key if e.key else ''}", e.problem) from None
        except BadInput as e:  # a library spec checking itself with BadInput (DecodeSpec)
            raise ConfigError(f"{key}.{name}", f"is invalid: {e}") from None
    return out


@dataclass
class PathsConfig:
    root: str = MISSING  # the project directory (holds conf/ and outputs/)
    data_dir: str = MISSING  # real public data for the demo and tests
    outputs_dir: str = MISSING  # outputs/<experiment>/<stage>/, the MLflow store, caches
    cache_dir: str = MISSING  # datasets' Arrow cache


@dataclass
class FilterConfig(StepsSpec):
    """The filter stage: its sources and pool, plus every step's settings (StepsSpec, conf/filter/<step>.yaml)."""

    sources: Dict[str, Any] = field(default_factory=dict)  # name -> CrawlSource
    num_proc: int = 2  # worker processes; files are grouped into tasks of similar size
    samples_per_rule: int = 20  # rejected documents per rule kept as an MLflow artifact
    reuse_scores: bool = True  # only thresholds changed: judge the stored scores again; false: always read and score

    def __post_init__(self):
        if hasattr(super(), "__post_init__"):
            super().__post_init__()
        self.sources = entries(self.sources, CrawlSource, "sources")
        check(self.num_proc >= 1, "num_proc", self.num_proc, "at least 1")
        check(self.samples_per_rule >= 0, "samples_per_rule", self.samples_per_rule, "at least 0")


@dataclass
class DedupConfig(DedupSpec):
    """The dedup stage: its input and shards, the levels (DedupSpec, conf/dedup/<level>.yaml), the evaluation."""

    input: StageOrPath = field(default_factory=lambda: StageOrPath(stage="filter"))  # path: Parquet/JSONL with 'text'
    rows_per_shard: int = 100000
    eval: EvalSpec = field(default_factory=EvalSpec)

    def __post_init__(self):
        super().__post_init__()
        check(self.rows_per_shard >= 1, "rows_per_shard", self.rows_per_shard, "at least 1")


@dataclass
class TokenizeConfig(EncodeSpec):
    """The tokenize stage: its sources and held-out share, plus how documents become shards (EncodeSpec)."""

    sources: Dict[str, Any] = field(default_factory=dict)  # name -> SourceSpec
    val_fraction: float = 0.01  # share of documents (by hash of their text) held out for validation

    def __post_init__(self):
        super().__post_init__()
        self.sources = entries(self.sources, SourceSpec, "sources")
        check(0 <= self.val_fraction < 1, "val_fraction", self.val_fraction, "in [0, 1)")


@dataclass
class PretrainConfig(TrainSpec):
    export: bool = True  # also write a transformers model directory (hf/)


@dataclass
class CptConfig(PretrainConfig):
    # stage: a training stage whose model to continue; path: a model directory, a .ckpt or a transformers directory
    init: StageOrPath = field(default_factory=lambda: StageOrPath(stage="pretrain"))
    sources: Dict[str, Any] = field(default_factory=dict)  # the domain corpus: name -> SourceSpec
    val_fraction: float = 0.05

    def __post_init__(self):
        super().__post_init__()
        self.sources = entries(self.sources, SourceSpec, "sources")
        for name, source in self.sources.items():
            check(source.stage is None, f"sources.{name}.stage", source.stage,
                  "null: the domain corpus is read from files (path), not from a stage's output")
        check(0 < self.val_fraction < 1, "val_fraction", self.val_fraction, "in (0, 1)")


@dataclass
class SftSource:
    """One instruction dataset of the sft mixture (pipeline/sft/data.py reads it)."""

    format: str = MISSING  # alpaca | prompt_response | conversations | oasst_tree | gsm8k | self_instruct
    path: str = MISSING  # a JSON or JSONL file (optionally .gz), a directory or a glob of them
    weight: float = 1.0  # share of its training part used per pass: 0.5 half, 2 twice, 0 held-out only
    options: Dict[str, Any] = field(default_factory=dict)  # the reader's keyword arguments (field names)
    license: Optional[str] = None  # the dataset's licence, for the model card


@dataclass
class SftLora(LoraSpec):
    """LoraSpec's adapter settings (the defaults are LoraSpec's), plus what the sft stage decides around it."""

    enabled: bool = True  # false: full fine-tuning (every weight trains)
    chat_tokens: bool = True  # the chat template's markers' embedding rows train too (peft trainable tokens)


@dataclass
class SftGenerate:
    per_source: int = 8  # held-out instructions answered by the base and the fine-tuned model
    max_new_tokens: int = 48
    show: int = 20  # examples side by side in generations.md

    def __post_init__(self):
        check(self.per_source >= 0, "per_source", self.per_source, "at least 0")
        check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "at least 1")


@dataclass
class SftConfig(TrainSpec):
    # stage: a training stage whose model to tune; path: a model directory, a .ckpt or a transformers directory
    init: StageOrPath = field(default_factory=lambda: StageOrPath(stage="cpt"))
    template: Template = Template.chatml  # pipeline/sft/chat.py
    sources: Dict[str, Any] = field(default_factory=dict)  # name -> SftSource
    val_fraction: float = 0.05  # per source, by hash of the conversation's text
    val_max_per_source: int = 64  # held-out conversations scored for the held-out loss
    max_tokens: Optional[int] = None  # longer conversations are cut (or dropped); None: the model's context
    drop_truncated: bool = False  # true: drop conversations that do not fit instead of cutting them
    packing: bool = False  # several short conversations per row, without attention between them
    lora: SftLora = field(default_factory=SftLora)
    generate: SftGenerate = field(default_factory=SftGenerate)

    def __post_init__(self):
        super().__post_init__()
        self.template = choice(Template, self.template, "template")
        self.sources = entries(self.sources, SftSource, "sources")
        check(0 < self.val_fraction < 1, "val_fraction", self.val_fraction, "in (0, 1)")
        check(self.val_max_per_source >= 1, "val_max_per_source", self.val_max_per_source, "at least 1")
        check(self.max_tokens is None or self.max_tokens >= 2, "max_tokens", self.max_tokens, "at least 2 or null")


@dataclass
class DpoSource:
    """One preference dataset (pipeline/dpo/pairs.py reads it)."""

    format: str = MISSING  # hh_rlhf | oasst_pairs
    path: str = MISSING  # a JSON or JSONL file (optionally .gz), a directory or a glob of them
    options: Dict[str, Any] = field(default_factory=dict)  # the reader's keyword arguments
    license: Optional[str] = None  # the dataset's licence, for the model card


@dataclass
class DpoGenerate:
    per_source: int = 4  # held-out prompts answered greedily by the SFT and the DPO model
    max_new_tokens: int = 48

    def __post_init__(self):
        check(self.per_source >= 0, "per_source", self.per_source, "at least 0")
        check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "at least 1")


@dataclass
class DpoConfig(TrainSpec):
    # stage: the sft stage (its adapter folded in); path: an instruction-tuned model directory with a chat template
    init: StageOrPath = field(default_factory=lambda: StageOrPath(stage="sft"))
    sources: Dict[str, Any] = field(default_factory=dict)  # name -> DpoSource
    beta: float = 0.1  # pull towards the reference: DPO's beta, IPO's tau
    loss: LossType = LossType.sigmoid  # sigmoid (DPO) | ipo
    label_smoothing: float = 0.0  # conservative DPO: the assumed share of flipped preferences (sigmoid only)
    val_fraction: float = 0.1  # per source, by hash of the prompt
    val_max_per_source: int = 64  # held-out pairs scored before and after
    max_tokens: Optional[int] = None  # longer pairs are left out (counted); None: the model's context
    lora: LoraSpec = field(default_factory=LoraSpec)  # a fresh adapter on the SFT model
    generate: DpoGenerate = field(default_factory=DpoGenerate)

    def __post_init__(self):
        super().__post_init__()
        from pipeline.dpo.spec import DpoLoss

        self.loss = DpoLoss(self.beta, self.loss, self.label_smoothing).loss  # checks all three
        self.sources = entries(self.sources, DpoSource, "sources")
        check(0 < self.val_fraction < 1, "val_fraction", self.val_fraction, "in (0, 1)")
        check(self.val_max_per_source >= 1, "val_max_per_source", self.val_max_per_source, "at least 1")
        check(self.max_tokens is None or self.max_tokens >= 2, "max_tokens", self.max_tokens, "at least 2 or null")


class AdapterStage(StrEnum):
    sft = "sft"
    dpo = "dpo"


@dataclass
class MergeConfig:
    adapter: AdapterStage = AdapterStage.sft  # the stage whose LoRA adapter is folded in: sft, or dpo after it

    def __post_init__(self):
        self.adapter = choice(AdapterStage, self.adapter, "adapter")


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


class Device(StrEnum):
    auto = "auto"  # cuda when there is one
    cpu = "cpu"
    cuda = "cuda"


@dataclass
class HarnessConfig:
    """The agreement check with lm-evaluation-harness (pipeline/evaluate/harness.py): the same prompting tasks
    scored by lm-eval on each model's transformers export and by the project, 0-shot."""

    enabled: bool = False
    tasks: List[str] = field(default_factory=lambda: ["sst2", "piqa"])  # evaluate.tasks entries (sst2/piqa readers)
    crows_pairs: bool = True  # also CrowS-Pairs, scored like the harness's crows_pairs_english (needs evaluate.bias.path)
    limit: Optional[int] = 100  # the first N examples (pairs) of each; None: each task's own limit

    def __post_init__(self):
        check(self.limit is None or self.limit >= 1, "limit", self.limit, "at least 1, or null for each task's own")


@dataclass
class SummarizeConfig:
    """Zero-shot summarization of the Python PEPs by "TL;DR:" (pipeline/evaluate/summarize.py)."""

    enabled: bool = False  # conf/evaluate.yaml turns each of these on with its data's path
    path: Optional[str] = None  # peps.jsonl.gz; required when enabled
    limit: Optional[int] = 40  # PEPs with an Abstract, drawn with `seed`; None: all
    seed: int = 0  # the sample and the random-3 baseline
    max_new_tokens: int = 32  # the summary's token budget
    cpu_threads: Optional[int] = 1  # torch threads while decoding on the CPU; None: torch's setting
    # name -> DecodeSpec (pipeline/model/spec.py) without max_new_tokens (the key above sets it for all)
    decodings: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.decodings = entries(self.decodings, DecodeSpec, "decodings")
        check(not self.enabled or bool(self.path), "path", self.path, "set when enabled (the PEPs' peps.jsonl.gz)")
        check(not self.enabled or bool(self.decodings), "decodings", self.decodings,
              "at least one decoding when enabled, e.g. {greedy: {strategy: greedy}}")
        check(self.cpu_threads is None or self.cpu_threads >= 1, "cpu_threads", self.cpu_threads,
              "at least 1, or null to leave torch's setting")
        check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "at least 1")
        check(self.limit is None or self.limit >= 1, "limit", self.limit, "at least 1, or null for all")


@dataclass
class BiasConfig:
    """The CrowS-Pairs bias probe (pipeline/evaluate/bias.py)."""

    enabled: bool = False
    path: Optional[str] = None  # crows_pairs_anonymized.csv; required when enabled
    limit: Optional[int] = None  # the first N pairs (not stratified by bias type); None: all 1,508

    def __post_init__(self):
        check(not self.enabled or bool(self.path), "path", self.path, "set when enabled (crows_pairs_anonymized.csv)")
        check(self.limit is None or self.limit >= 1, "limit", self.limit, "at least 1, or null for all")


@dataclass
class EvaluateConfig:
    # name -> StageOrPath (a training stage's model, or a transformers directory, a stage directory or a .ckpt)
    models: Dict[str, Any] = field(default_factory=dict)
    # name -> SourceSpec, where `stage` means that stage's held-out documents (tokenize: the pretraining
    # corpus, cpt: the domain corpus)
    sets: Dict[str, Any] = field(default_factory=dict)
    tasks: Dict[str, Any] = field(default_factory=dict)  # name -> PromptTaskConfig (prompting evaluation)
    stride: Optional[int] = None  # tokens between window starts; None: half the model's context
    batch_size: int = 16  # windows per forward pass
    prefix_token: Optional[str] = None  # token before each document; None: tokenizer.special_tokens.eos
    context: Optional[int] = None  # transformers models: window length; None: the model's maximum
    device: Device = Device.auto
    harness: HarnessConfig = field(default_factory=HarnessConfig)
    summarize: SummarizeConfig = field(default_factory=SummarizeConfig)
    bias: BiasConfig = field(default_factory=BiasConfig)
    head: HeadSpec = field(default_factory=HeadSpec)  # frozen model + linear head, and LoRA + head, on SST-2

    def __post_init__(self):
        self.models = entries(self.models, StageOrPath, "models")
        self.sets = entries(self.sets, SourceSpec, "sets")
        self.tasks = entries(self.tasks, PromptTaskConfig, "tasks")
        self.device = choice(Device, self.device, "device")
        check(self.stride is None or self.stride >= 1, "stride", self.stride, "at least 1 or null")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "at least 1")


class Law(StrEnum):
    kaplan = "kaplan"  # L(N), L(D), L(C) power laws
    chinchilla = "chinchilla"  # L(N, D) = E + A/N^alpha + B/D^beta


@dataclass
class ScalingConfig:
    sweep_run_id: Optional[str] = None  # a sweep's MLflow parent run; None: the newest sweep of `stage`
    stage: str = "pretrain"
    csv: Optional[str] = None  # instead of a sweep: a CSV with columns N, D and/or C, loss
    loss_metric: str = "val/loss"
    laws: List[Law] = field(default_factory=lambda: [Law.kaplan, Law.chinchilla])
    bootstrap_reps: int = 200
    confidence: float = 0.95
    budgets: List[float] = field(default_factory=list)  # FLOPs; empty: 10x and 100x the largest run
    huber_delta: float = 1e-3

    def __post_init__(self):
        check(bool(self.laws), "laws", self.laws, "a non-empty list of kaplan, chinchilla")
        self.laws = [choice(Law, law, "laws") for law in self.laws]
        check(self.bootstrap_reps >= 0, "bootstrap_reps", self.bootstrap_reps, "at least 0")
        check(0 < self.confidence < 1, "confidence", self.confidence, "in (0, 1)")
        check(all(b > 0 for b in self.budgets), "budgets", self.budgets, "positive FLOP counts")
        check(self.huber_delta > 0, "huber_delta", self.huber_delta, "positive")


@dataclass
class RootConfig:
    name: str = MISSING  # experiment name: outputs/<name>/, MLflow experiment <name>
    seed: int = 1337
    paths: PathsConfig = field(default_factory=PathsConfig)
    tracking: TrackingSettings = field(default_factory=lambda: TrackingSettings(MISSING, MISSING))
    filter: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    cpt: CptConfig = field(default_factory=CptConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)


def _section_of(node: DictConfig, prefix: str = "") -> str:
    """The key of the innermost dataclass in ``node`` whose construction fails (only called on a failure)."""
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig) and child._metadata.object_type not in (None, dict):
            try:
                OmegaConf.to_object(child)
            except ConfigError:
                return _section_of(child, f"{prefix}{key}.")
    return prefix


def load(cfg: DictConfig) -> RootConfig:
    """The composed config as one typed RootConfig; an unknown key or a bad value raises a PipelineError naming it.

    The merge against the schema is repeated because Hydra's ``+key=value`` opens the struct flag to
    append, which would let a misspelled key in.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RootConfig), OmegaConf.to_container(cfg, resolve=False))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise PipelineError(f"config key '{key}': {str(e).splitlines()[0]}") from None
    except ConfigError as e:
        prefix = _section_of(merged)
        key = f"{prefix}{e.key}" if e.key else prefix.rstrip(".")
        raise PipelineError(f"config key '{key}' {e.problem}") from None


def compose(*overrides: str) -> RootConfig:
    """The real config (conf/, the demo preset unless ``experiment=`` says otherwise) with ``overrides``, typed."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return load(hydra_compose("config", overrides=list(overrides)))


def as_plain(obj: Any) -> Any:
    """A config object as plain dicts, lists and strings (for hashing, params and manifests)."""
    if is_dataclass(obj):
        return {f: as_plain(getattr(obj, f)) for f in obj.__dataclass_fields__}
    if isinstance(obj, dict):
        return {k: as_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_plain(v) for v in obj]
    if isinstance(obj, Enum):
        return obj.value
    return obj


def register() -> None:
    """Make the schema and the ``${root:}`` resolver known to Hydra (idempotent)."""
    ConfigStore.instance().store(name="schema", node=RootConfig)
    if not OmegaConf.has_resolver("root"):
        OmegaConf.register_new_resolver("root", lambda: str(PROJECT_ROOT))


register()
