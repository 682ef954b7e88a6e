"""Typed configuration: dataclass schema, YAML files, ``key=value`` overrides and validation.

A run is described by one :class:`Config`. It is built from the built-in defaults, then an
optional YAML file, then ``--set key=value`` overrides, in that order. Every key is checked:
an unknown key fails naming the closest valid keys, a wrong type or value fails naming the key
and what it accepts, and a setting that only applies to another method (``carp.*`` while
training DINO, ``gmm.*`` with learned prototypes) is rejected instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration that cannot be used, with a message that says how to fix it."""


def _choice(default: Any, choices: Iterable[Any], help: str = "") -> Any:
    return field(default=default, metadata={"choices": tuple(choices), "help": help})


def _opt(default: Any, help: str = "", minimum: float | None = None, maximum: float | None = None) -> Any:
    meta: dict[str, Any] = {"help": help}
    if minimum is not None:
        meta["min"] = minimum
    if maximum is not None:
        meta["max"] = maximum
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


DATASETS = ("digits", "cifar10", "cifar100", "stl10", "svhn", "imagefolder")
BACKBONES = ("resnet18", "resnet34", "resnet50", "vit_tiny", "vit_small")
METHODS = ("dino", "carp")


@dataclass
class DataConfig:
    dataset: str = _choice("digits", DATASETS, "dataset name from the registry")
    root: Optional[str] = _opt(
        None, "dataset directory; for imagefolder the folder holding train/ and test/ "
        "(default: $NOCOLLAPSE_DATA or ./data)")
    download: bool = _opt(False, "let torchvision download a missing dataset")
    image_size: Optional[int] = _opt(
        None, "resize images to this size when decoding (default: the dataset's native size)", 4)
    in_memory: str = _choice(
        "auto", ("auto", "true", "false"),
        "decode every image once into memory (auto: when the decoded split fits in 4 GiB)")
    imbalance_ratio: float = _opt(
        1.0, "long-tail subsampling of the training split: n_max / n_min with an exponential "
        "per-class profile (CIFAR-LT convention); 1 keeps the balanced split", 1.0)
    long_tail_seed: int = _opt(0, "seed of the long-tail subsampling")
    num_workers: int = _opt(0, "DataLoader worker processes", 0)
    bad_images: str = _choice("skip", ("skip", "fail"),
                              "a corrupt or unreadable image is skipped with a counted warning, or fails the run")
    digits_test_fraction: float = _opt(0.25, "test fraction of the stratified digits split", 0.05, 0.95)


@dataclass
class ViewsConfig:
    global_size: Optional[int] = _opt(None, "side of the two global crops (default: the image size)", 4)
    global_scale: list = _opt([0.2, 1.0], "RandomResizedCrop area range of the global crops")
    local_crops: int = _opt(0, "number of small local crops (0: the two-view pipeline; DINO multi-crop: >0)", 0)
    local_size: Optional[int] = _opt(None, "side of the local crops (default: about 0.45 x global size)", 4)
    local_scale: list = _opt([0.05, 0.2], "RandomResizedCrop area range of the local crops")
    hflip: float = _opt(0.5, "horizontal flip probability", 0.0, 1.0)
    color_jitter: float = _opt(0.8, "probability of colour jitter", 0.0, 1.0)
    brightness: float = _opt(0.4, "colour jitter strength: brightness", 0.0)
    contrast: float = _opt(0.4, "colour jitter strength: contrast", 0.0)
    saturation: float = _opt(0.2, "colour jitter strength: saturation", 0.0)
    hue: float = _opt(0.1, "colour jitter strength: hue", 0.0, 0.5)
    grayscale: float = _opt(0.2, "probability of grayscale conversion", 0.0, 1.0)
    blur: list = _opt([0.0, 0.0], "Gaussian blur probability of global view 1 and 2 (ImageNet recipe: [1.0, 0.1])")
    local_blur: float = _opt(0.0, "Gaussian blur probability of the local crops", 0.0, 1.0)
    solarize: list = _opt([0.0, 0.2], "solarisation probability of global view 1 and 2 (asymmetric recipe)")
    backend: str = _choice(
        "auto", ("auto", "batched", "per_sample"),
        "batched: augment whole batches on the device (kornia); per_sample: torchvision transforms "
        "in DataLoader workers; auto: batched when the images are in memory")


@dataclass
class ModelConfig:
    backbone: str = _choice("resnet18", BACKBONES)
    width_multiplier: float = _opt(1.0, "ResNet channel multiplier (0.25 gives 16 base channels)", 0.01)
    stem: str = _choice("auto", ("auto", "cifar", "imagenet"),
                        "ResNet stem: cifar (3x3 conv, no max-pool), imagenet (7x7 + max-pool), "
                        "auto (cifar below 96 px)")
    patch_size: int = _opt(4, "ViT patch size", 1)
    sync_batchnorm: bool = _opt(False, "convert BatchNorm to SyncBatchNorm in distributed runs")
    channels_last: bool = _opt(True, "channels-last memory format for convolutional backbones (faster on CPU and GPU)")


@dataclass
class HeadConfig:
    hidden_dim: int = _opt(2048, "hidden width of the projection MLP", 1)
    bottleneck_dim: int = _opt(256, "dimension of the bottleneck the prototypes live in", 1)
    layers: int = _opt(3, "number of linear layers of the projection MLP", 1)
    batchnorm: bool = _opt(False, "BatchNorm in the projection MLP")
    norm_last_layer: bool = _opt(True, "fix the norm of learned prototypes to 1 (weight-norm g frozen)")


@dataclass
class MethodConfig:
    name: str = _choice("dino", METHODS, "self-supervised method")
    prototypes: str = _choice(
        "learned", ("learned", "decoupled"),
        "learned: prototypes are a trainable last layer; decoupled: an online-EM Gaussian mixture")
    num_prototypes: int = _opt(4096, "K, the number of prototypes", 2)
    head: HeadConfig = field(default_factory=HeadConfig)
    teacher_momentum: float = _opt(0.996, "EMA momentum of the teacher at the start (cosine to 1)", 0.0, 1.0)
    teacher_momentum_end: float = _opt(1.0, "EMA momentum of the teacher at the end", 0.0, 1.0)
    freeze_last_layer_epochs: float = _opt(1.0, "epochs during which learned prototypes get no update", 0.0)
    koleo_weight: float = _opt(0.0, "weight of the KoLeo regulariser on learned prototypes (DINO + KP)", 0.0)


@dataclass
class DinoConfig:
    student_temp: float = _opt(0.1, "student softmax temperature", 1e-4)
    teacher_temp: float = _opt(0.04, "teacher temperature after warm-up", 1e-4)
    warmup_teacher_temp: float = _opt(0.04, "teacher temperature at the start", 1e-4)
    warmup_teacher_temp_epochs: float = _opt(0.0, "linear teacher-temperature warm-up length", 0.0)
    center_momentum: float = _opt(0.9, "momentum of the teacher centre", 0.0, 1.0)
    teacher_norm: str = _choice(
        "centering", ("centering", "sinkhorn", "none"),
        "teacher normalisation: EMA centering (DINO), Sinkhorn-Knopp equipartition over the batch "
        "(SwAV / DINOv2), or none (the paper's setting for decoupled prototypes; it collapsed to one-hot "
        "assignments in our runs)")
    sinkhorn_iterations: int = _opt(3, "Sinkhorn-Knopp iterations (teacher_norm=sinkhorn)", 1)


@dataclass
class CarpConfig:
    block_size: int = _opt(128, "N_B, prototypes per random partition block", 2)
    consistency_weight: float = _opt(1.0, "weight of the consistency term", 0.0)
    entropy_weight: float = _opt(1.0, "weight of the KL(block marginal || uniform) term", 0.0)


@dataclass
class GmmConfig:
    covariance: str = _choice("diagonal", ("diagonal", "isotropic"), "component covariance")
    eta: float = _opt(0.01, "forgetting factor of the running sufficient statistics", 0.0, 1.0)
    forgetting: str = _choice("per_component", ("per_component", "global"),
                              "per_component: a component forgets in proportion to the responsibility it gets")
    beta0: float = _opt(0.25, "initial inverse temperature of the annealed E-step", 1e-6, 1.0)
    anneal_epochs: float = _opt(2.0, "epochs over which beta rises from beta0 to 1", 0.0)
    var_floor: float = _opt(1e-4, "variance floor of the M-step", 1e-12)
    init: str = _choice("data", ("random", "data"),
                        "random unit vectors, or seeded from the first teacher embeddings")
    reseed_dead: bool = _opt(False, "re-seed dead components onto current embeddings (k-means++ on the batch)")
    dead_threshold: float = _opt(0.01, "a component is dead when its recent usage (EMA, rate eta, of the "
                                 "responsibility it receives) falls below this fraction of a uniform share", 0.0)
    chunk_size: int = _opt(4096, "components per chunk in the E-step (bounds memory)", 1)
    targets: str = _choice("similarity", ("similarity", "posterior"),
                           "teacher targets: softmax of similarities to the means, or mixture responsibilities")


@dataclass
class OptimConfig:
    name: str = _choice("adamw", ("adamw", "sgd", "lars"))
    lr: float = _opt(5e-4, "learning rate at batch 256 (scaled linearly with the global batch)", 0.0)
    scale_lr: bool = _opt(True, "scale lr by global_batch / 256")
    min_lr: float = _opt(1e-6, "final learning rate of the cosine schedule", 0.0)
    warmup_epochs: float = _opt(1.0, "linear learning-rate warm-up", 0.0)
    weight_decay: float = _opt(0.04, "weight decay at the start", 0.0)
    weight_decay_end: float = _opt(0.4, "weight decay at the end (cosine)", 0.0)
    momentum: float = _opt(0.9, "SGD / LARS momentum", 0.0, 1.0)
    betas: list = _opt([0.9, 0.999], "AdamW betas")
    lars_eta: float = _opt(0.02, "LARS trust coefficient", 0.0)
    clip_grad: float = _opt(3.0, "clip the global gradient norm (0 disables)", 0.0)


@dataclass
class TrainConfig:
    epochs: int = _opt(100, "training epochs", 1)
    batch_size: int = _opt(256, "batch size per process", 2)
    seed: int = _opt(0, "random seed")
    device: str = _choice("auto", ("auto", "cpu", "cuda"), "auto: CUDA when available")
    precision: str = _choice("auto", ("auto", "fp32", "bf16", "fp16"),
                             "autocast precision (auto: bf16 on CUDA, fp32 on CPU)")
    threads: int = _opt(0, "CPU threads for torch (0: torch's default)", 0)
    deterministic: bool = _opt(False, "use deterministic algorithms (slower; for exact resume checks)")
    checkpoint_every: int = _opt(10, "write an epoch checkpoint every N epochs (0: only last)", 0)
    checkpoint_every_steps: int = _opt(0, "also refresh last.pt every N steps (0: only at epoch ends)", 0)
    keep: int = _opt(3, "how many epoch checkpoints to keep (0: all)", 0)
    log_every: int = _opt(10, "log metrics every N steps", 1)
    stop_at_step: int = _opt(0, "interrupt the run after this global step, as a preemption would (0: off)", 0)
    nonfinite: str = _choice("stop", ("stop", "skip"),
                             "on a NaN/Inf loss: stop (keeping the last good checkpoint) or skip the step")
    progress: bool = _opt(True, "show a progress bar")


@dataclass
class EvalConfig:
    knn_k: int = _opt(20, "neighbours of the weighted k-NN", 1)
    knn_temperature: float = _opt(0.07, "temperature of the weighted k-NN", 1e-6)
    knn_every: int = _opt(0, "k-NN on the test split every N epochs during training (0: only at the end)", 0)
    knn_init: bool = _opt(True, "measure k-NN of the randomly initialised backbone before training")
    batch_size: int = _opt(512, "batch size of feature extraction", 1)
    max_train_samples: int = _opt(0, "subsample the k-NN memory bank (0: all training images)", 0)
    linear_lrs: list = _opt([1e-3, 1e-2], "learning rates of the linear-probe sweep (Adam)")
    linear_weight_decays: list = _opt([0.0, 1e-4, 1e-3], "L2 penalties of the linear-probe sweep")
    linear_epochs: int = _opt(20, "linear-probe epochs (at least 1000 steps)", 1)
    many_threshold: int = _opt(100, "long-tail groups: head classes have more training images than this", 0)
    few_threshold: int = _opt(20, "long-tail groups: tail classes have fewer training images than this", 0)


@dataclass
class DiagnosticsConfig:
    enabled: bool = _opt(True, "collapse metrics during training (cheap ones every log step, geometry every epoch)")
    alarms: bool = _opt(True, "raise collapse alarms (each once, with a likely cause and remedy)")
    alarm_warmup_epochs: float = _opt(1.0, "no alarm before this many epochs", 0.0)
    alarm_patience: int = _opt(5, "consecutive log steps a failure must persist before its alarm fires", 1)
    prototype_collapse_eps: str = _choice("0.1", ("0.025", "0.1", "0.25", "0.5"),
                                          "epsilon at which the prototype_collapse alarm counts unique prototypes")
    prototype_collapse_threshold: float = _opt(
        0.5, "prototype_collapse fires when fewer than this fraction of prototypes are unique", 0.0, 1.0)
    queue_size: int = _opt(4096, "recent training features kept for the per-epoch effective rank", 16)
    plots: bool = _opt(True, "write PNG plots to RUN_DIR/plots at the end of training")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    carp: CarpConfig = field(default_factory=CarpConfig)
    gmm: GmmConfig = field(default_factory=GmmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)


# Sections that only apply under a condition on the rest of the config.
_CONDITIONAL_SECTIONS = {
    "dino": (lambda c: c.method.name == "dino", "method.name is 'dino'"),
    "carp": (lambda c: c.method.name == "carp", "method.name is 'carp'"),
    "gmm": (lambda c: c.method.prototypes == "decoupled", "method.prototypes is 'decoupled'"),
}


# --------------------------------------------------------------------------------------------
# Key listing and suggestions
# --------------------------------------------------------------------------------------------

def all_keys(obj: Any = None, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema, e.g. ``optim.lr``."""
    obj = Config() if obj is None else obj
    keys: list[str] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys.extend(all_keys(value, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _field_info(dotted: str) -> tuple[dataclasses.Field, Any, Any] | None:
    """(field, default value, annotated type) of a dotted key, or None if it does not exist."""
    obj: Any = Config()
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if part not in fields:
            return None
        value = getattr(obj, part)
        if i == len(parts) - 1:
            return fields[part], value, typing.get_type_hints(type(obj))[part]
        if not dataclasses.is_dataclass(value):
            return None
        obj = value
    return None


def suggest_keys(key: str, n: int = 3) -> list[str]:
    """The valid keys closest to a misspelt one (by full path and by leaf name)."""
    keys = all_keys()
    close = difflib.get_close_matches(key, keys, n=n, cutoff=0.5)
    leaf = key.rsplit(".", 1)[-1]
    leaves = {k.rsplit(".", 1)[-1]: k for k in keys}
    for match in difflib.get_close_matches(leaf, list(leaves), n=n, cutoff=0.6):
        if leaves[match] not in close:
            close.append(leaves[match])
    return close[:n]


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}


def describe_key(key: str) -> str:
    """What a key accepts, e.g. ``one of 'adamw', 'sgd'`` or ``an integer >= 1``."""
    info = _field_info(key)
    if info is None:
        return ""
    f, _, annotation = info
    if "choices" in f.metadata:
        return "one of " + ", ".join(repr(c) for c in f.metadata["choices"])
    args = typing.get_args(annotation)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), annotation) if args else annotation
    base = typing.get_origin(base) or base
    text = _KINDS.get(base, "a value")
    if "min" in f.metadata:
        text += f" >= {f.metadata['min']}"
    if "max" in f.metadata:
        text += f" <= {f.metadata['max']}"
    return text + (" or null" if optional else "")


def format_value(value: Any) -> str:
    """A default as it is written in YAML (``null``, ``false``, ``[0.2, 1.0]``)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                out.update(_flatten(v, key + "."))
            else:
                out[key] = v
    return out


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings; values are read as YAML (``0.1``, ``true``, ``[0.2, 1.0]``)."""
    parsed: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"cannot parse the value of {key}: {raw!r} ({exc})") from None
        parsed[key] = value
    return parsed


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {'.'.join(parts[:-1])} is not a section")
        node[parts[-1]] = value
    return nested


def _check_known(flat: dict[str, Any]) -> None:
    valid = set(all_keys())
    sections = {k.rsplit(".", 1)[0] for k in valid}
    for key in flat:
        if key in valid:
            continue
        if key in sections:
            raise ConfigError(f"{key} is a section; set its keys, e.g. {key}.<name>=value")
        hint = suggest_keys(key)
        msg = f"unknown config key '{key}'"
        if hint:
            msg += "; did you mean " + " or ".join(f"'{h}'" for h in hint) + "?"
        raise ConfigError(msg)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def build_config(file: str | Path | None = None, overrides: Iterable[str] = (),
                 base: dict[str, Any] | None = None) -> tuple[Config, set[str]]:
    """Defaults <- ``base`` <- YAML ``file`` <- ``overrides``.

    Returns the validated config and the keys that the file or the overrides set to a
    non-default value (used to reject options of an inactive method). ``base`` is a trusted,
    complete config (a run directory's ``config.yaml``) and is not counted as explicit."""
    user: dict[str, Any] = {}
    if file is not None:
        user.update(_flatten(load_yaml(file)))
    user.update(parse_overrides(overrides))
    flat: dict[str, Any] = _flatten(base) if base else {}
    flat.update(user)
    _check_known(flat)
    for key, value in flat.items():
        info = _field_info(key)
        # YAML reads `true` as a boolean; tri-state switches (auto | true | false) take strings.
        if isinstance(value, bool) and info and "true" in info[0].metadata.get("choices", ()):
            flat[key] = str(value).lower()
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.create(_nest(flat)))
    except ConfigKeyError as exc:  # pragma: no cover - _check_known catches these first
        raise ConfigError(str(exc).splitlines()[0]) from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        value = flat.get(key, "?")
        allowed = describe_key(key)
        raise ConfigError(f"{key}: {value!r} is not valid; expected {allowed or 'another type'}") from None
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    defaults = Config()
    explicit = {k for k in user if get(cfg, k) != get(defaults, k)}
    validate(cfg, explicit=explicit)
    return cfg, explicit


def validate(cfg: Config, explicit: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """Check choices, ranges and cross-field constraints; raise :class:`ConfigError`."""
    for key in all_keys():
        info = _field_info(key)
        assert info is not None
        f = info[0]
        value = get(cfg, key)
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ConfigError(f"{key}: {value!r} is not allowed; expected {describe_key(key)}")
        if value is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            if "min" in f.metadata and value < f.metadata["min"]:
                raise ConfigError(f"{key}: {value!r} is too small; expected {describe_key(key)}")
            if "max" in f.metadata and value > f.metadata["max"]:
                raise ConfigError(f"{key}: {value!r} is too large; expected {describe_key(key)}")
    for key in ("views.global_scale", "views.local_scale"):
        lo_hi = get(cfg, key)
        if (len(lo_hi) != 2 or not all(isinstance(v, (int, float)) for v in lo_hi)
                or not 0 < lo_hi[0] <= lo_hi[1] <= 1):
            raise ConfigError(f"{key}: {lo_hi!r} must be [low, high] with 0 < low <= high <= 1")
    for key in ("views.blur", "views.solarize"):
        probs = get(cfg, key)
        if len(probs) != 2 or not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in probs):
            raise ConfigError(f"{key}: {probs!r} must be two probabilities, one per global view")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: {cfg.optim.betas!r} must be two numbers in [0, 1)")
    for section, (active, condition) in _CONDITIONAL_SECTIONS.items():
        if not active(cfg):
            used = sorted(k for k in explicit if k.startswith(section + "."))
            if used:
                raise ConfigError(
                    f"{', '.join(used)} only apply when {condition}; this run has "
                    f"method.name={cfg.method.name!r}, method.prototypes={cfg.method.prototypes!r}")
    if cfg.method.prototypes == "decoupled" and cfg.method.koleo_weight > 0:
        raise ConfigError("method.koleo_weight regularises learned prototypes; it has no effect with "
                          "method.prototypes=decoupled (set it to 0)")
    if cfg.method.prototypes == "decoupled" and "method.freeze_last_layer_epochs" in explicit \
            and cfg.method.freeze_last_layer_epochs > 0:
        raise ConfigError("method.freeze_last_layer_epochs applies to learned prototypes only")
    if cfg.method.name == "carp" and cfg.method.num_prototypes % cfg.carp.block_size != 0:
        raise ConfigError(
            f"carp.block_size ({cfg.carp.block_size}) must divide method.num_prototypes "
            f"({cfg.method.num_prototypes})")
    if cfg.method.teacher_momentum_end < cfg.method.teacher_momentum:
        raise ConfigError("method.teacher_momentum_end must be >= method.teacher_momentum")
    if cfg.data.dataset == "imagefolder" and not cfg.data.root:
        raise ConfigError("data.dataset=imagefolder needs data.root: a folder with train/ and test/ "
                          "class sub-folders (e.g. --set data.root=../shared/datasets/cifar10)")


def get(cfg: Any, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def reference_table() -> str:
    """A Markdown table of every key, its default and what it accepts (for the README)."""
    rows = ["| key | default | accepts | meaning |", "|---|---|---|---|"]
    for key in all_keys():
        info = _field_info(key)
        assert info is not None
        f, default, _ = info
        rows.append(f"| `{key}` | `{format_value(default)}` | {describe_key(key)} | {f.metadata.get('help', '')} |")
    return "\n".join(rows)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config written by :func:`to_yaml` (e.g. a run directory's config.yaml)."""
    cfg, _ = build_config(base=data)
    return cfg


__all__ = [
    "Config", "ConfigError", "DataConfig", "ViewsConfig", "ModelConfig", "HeadConfig", "MethodConfig",
    "DinoConfig", "CarpConfig", "GmmConfig", "OptimConfig", "TrainConfig", "EvalConfig",
    "DiagnosticsConfig",
    "build_config", "config_from_dict", "parse_overrides", "suggest_keys", "to_dict", "to_yaml",
    "reference_table", "all_keys", "get", "DictConfig",
]
