"""Typed configuration: a dataclass schema assembled from plugins, YAML files, ``key=value``
overrides and validation.

A run is described by one :class:`Config`. It is built from the defaults, then an optional YAML
file, then ``--set key=value`` overrides, in that order. Every key is checked: an unknown key
fails naming the closest valid keys, a wrong type or value fails naming the key and what it
accepts, and a key that does not apply to the chosen method (``carp.*`` while training DINO,
``gmm.*`` with learned prototypes) is rejected whenever a file or an override sets it, even to its
default value, instead of being silently ignored.

The schema has core sections (``data``, ``views``, ``model``, ``optim``, ``train``, ``eval``,
``diagnostics``), the ``method`` section and one section per method setting group. This module
names no method: each method class registered in :data:`nocollapse.utils.registry.METHODS`
contributes its settings through the protocol below, and the schema is assembled from the
registry whenever it changes.

* ``settings() -> dict[str, type]``: section name -> dataclass. The section ``"method"`` is
  merged into ``method.*`` (next to ``method.name``); any other name is a section of its own
  (``dino.*``). Several methods may share a dataclass (DINO and CARP share ``gmm``).
* ``inactive_settings(cfg) -> dict[str, str]``: keys or section prefixes of the method's own
  settings that do not apply under ``cfg``, each with the condition under which they would
  (``{"gmm": "method.prototypes is 'decoupled'"}``).
* a settings dataclass may define ``validate(self, cfg)`` for checks that involve other keys;
  it raises :class:`ConfigError`.

Datasets declare the ``data.*`` keys they read (``reads_keys``); a key that the chosen dataset
ignores is reported with a warning (``data.root`` with the built-in digits).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .utils.registry import BACKBONES, DATASETS, METHODS, Registry

log = logging.getLogger("nocollapse")


class ConfigError(ValueError):
    """A configuration that cannot be used, with a message that says how to fix it."""


def choice(default: Any, choices: Iterable[Any] | Registry, help: str = "") -> Any:
    """A field that accepts one of ``choices`` (a fixed list, or a registry's names)."""
    options = choices if isinstance(choices, Registry) else tuple(choices)
    return field(default=default, metadata={"choices": options, "help": help})


def setting(default: Any, help: str = "", minimum: float | None = None, maximum: float | None = None) -> Any:
    """A field with a help string and an optional range (lists and dicts are copied per instance)."""
    meta: dict[str, Any] = {"help": help}
    if minimum is not None:
        meta["min"] = minimum
    if maximum is not None:
        meta["max"] = maximum
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def _choices(f: dataclasses.Field) -> tuple[Any, ...] | None:
    options = f.metadata.get("choices")
    if options is None:
        return None
    return options.names() if isinstance(options, Registry) else options


@dataclass
class DataConfig:
    dataset: str = choice("digits", DATASETS, "dataset name (a registered dataset)")
    root: Optional[str] = setting(
        None, "dataset directory; for imagefolder the folder holding train/ and test/ "
        "(default: $NOCOLLAPSE_DATA or ./data)")
    download: bool = setting(False, "let torchvision download a missing dataset")
    image_size: Optional[int] = setting(
        None, "resize images to this size when decoding (default: the dataset's native size; an image "
        "folder of mixed sizes takes its most common size)", 4)
    in_memory: str = choice(
        "auto", ("auto", "true", "false"),
        "decode every image once into memory (auto: when the decoded split fits in 4 GiB)")
    decode_cache: str = setting(
        "auto", "where an image folder decoded into memory is kept between runs, one file per split "
        "keyed by the files' paths, labels, sizes and modification times, so the next run reads it "
        "instead of decoding again: auto ($NOCOLLAPSE_CACHE/decoded, else ~/.cache/nocollapse/decoded), "
        "off, or a directory")
    imbalance_ratio: float = setting(
        1.0, "long-tail subsampling of the training split: n_max / n_min with an exponential "
        "per-class profile (CIFAR-LT convention); 1 keeps the balanced split", 1.0)
    long_tail_seed: int = setting(0, "seed of the long-tail subsampling")
    label_fraction: float = setting(
        1.0, "fraction of the training labels a label-using method sees (semi-supervised), drawn per "
        "class; every other sample is labelled -1. Evaluation always uses all labels", 0.0, 1.0)
    labels_per_class: Optional[int] = setting(
        None, "instead of label_fraction: how many labelled training images per class", 0)
    label_seed: int = setting(0, "seed of the labelled subset (independent of train.seed)")
    num_workers: int = setting(0, "DataLoader worker processes", 0)
    bad_images: str = choice("skip", ("skip", "fail"),
                              "a corrupt or unreadable image is skipped with a counted warning, or fails the run")
    digits_test_fraction: float = setting(0.25, "test fraction of the stratified digits split", 0.05, 0.95)


@dataclass
class ViewsConfig:
    global_size: Optional[int] = setting(None, "side of the two global crops (default: the image size)", 4)
    global_scale: list = setting([0.2, 1.0], "RandomResizedCrop area range of the global crops")
    local_crops: int = setting(0, "number of small local crops (0: the two-view pipeline; DINO multi-crop: >0)", 0)
    local_size: Optional[int] = setting(None, "side of the local crops (default: about 0.45 x global size)", 4)
    local_scale: list = setting([0.05, 0.2], "RandomResizedCrop area range of the local crops")
    hflip: float = setting(0.5, "horizontal flip probability", 0.0, 1.0)
    color_jitter: float = setting(0.8, "probability of colour jitter", 0.0, 1.0)
    brightness: float = setting(0.4, "colour jitter strength: brightness", 0.0)
    contrast: float = setting(0.4, "colour jitter strength: contrast", 0.0)
    saturation: float = setting(0.2, "colour jitter strength: saturation", 0.0)
    hue: float = setting(0.1, "colour jitter strength: hue", 0.0, 0.5)
    grayscale: float = setting(0.2, "probability of grayscale conversion", 0.0, 1.0)
    blur: list = setting([0.0, 0.0], "Gaussian blur probability of global view 1 and 2 (ImageNet recipe: [1.0, 0.1])")
    local_blur: float = setting(0.0, "Gaussian blur probability of the local crops", 0.0, 1.0)
    solarize: list = setting([0.0, 0.2], "solarisation probability of global view 1 and 2 (asymmetric recipe)")
    backend: str = choice(
        "auto", ("auto", "batched", "per_sample"),
        "batched: augment whole batches on the device (kornia); per_sample: torchvision transforms "
        "in DataLoader workers; auto: batched when the images are in memory")


@dataclass
class ModelConfig:
    backbone: str = choice("resnet18", BACKBONES, "backbone network (a registered backbone)")
    width_multiplier: float = setting(1.0, "ResNet channel multiplier (0.25 gives 16 base channels)", 0.01)
    stem: str = choice("auto", ("auto", "cifar", "imagenet"),
                        "ResNet stem: cifar (3x3 conv, no max-pool), imagenet (7x7 + max-pool), "
                        "auto (cifar below 96 px)")
    patch_size: int = setting(4, "ViT patch size", 1)
    sync_batchnorm: bool = setting(False, "convert BatchNorm to SyncBatchNorm in distributed runs")
    channels_last: bool = setting(True, "channels-last memory format for convolutional backbones (usually faster convolutions; not applied to a ResNet whose narrowest stage has fewer than 8 channels)")


@dataclass
class OptimConfig:
    name: str = choice("adamw", ("adamw", "adam", "sgd", "lars"),
                       "optimiser: AdamW (decoupled weight decay), Adam (L2 penalty added to the gradient), "
                       "SGD or LARS")
    lr: float = setting(5e-4, "learning rate at batch 256 (scaled linearly with the global batch)", 0.0)
    scale_lr: bool = setting(True, "scale lr by global_batch / 256")
    min_lr: float = setting(1e-6, "final learning rate of the cosine schedule", 0.0)
    warmup_epochs: float = setting(1.0, "linear learning-rate warm-up", 0.0)
    warmup_start_lr: float = setting(0.0, "learning rate at the start of the warm-up (not scaled with the batch)", 0.0)
    weight_decay: float = setting(0.04, "weight decay at the start", 0.0)
    weight_decay_end: float = setting(0.4, "weight decay at the end (cosine)", 0.0)
    decay_norms_and_biases: bool = setting(
        False, "apply weight decay to biases and normalisation parameters too (by default they are exempt)")
    momentum: float = setting(0.9, "SGD / LARS momentum", 0.0, 1.0)
    betas: list = setting([0.9, 0.999], "Adam / AdamW betas")
    lars_eta: float = setting(0.02, "LARS trust coefficient", 0.0)
    lars_clip_lr: bool = setting(
        False, "LARS layer learning rate min(trust ratio, lr) (apex LARC's clip mode, as solo-learn's CIFAR "
        "recipes) instead of lr x trust ratio")
    clip_grad: float = setting(3.0, "clip the global gradient norm (0 disables)", 0.0)


@dataclass
class TrainConfig:
    epochs: int = setting(100, "training epochs", 1)
    batch_size: int = setting(256, "batch size per process", 2)
    seed: int = setting(0, "random seed")
    device: str = choice("auto", ("auto", "cpu", "cuda"), "auto: CUDA when available")
    precision: str = choice("auto", ("auto", "fp32", "bf16", "fp16"),
                             "autocast precision (auto: bf16 on CUDA, fp32 on CPU)")
    threads: int = setting(0, "CPU threads for torch (0: torch's default)", 0)
    deterministic: bool = setting(False, "use deterministic algorithms (slower; for exact resume checks)")
    checkpoint_every: int = setting(10, "write an epoch checkpoint every N epochs (0: only last)", 0)
    checkpoint_every_steps: int = setting(0, "also refresh last.pt every N steps (0: only at epoch ends)", 0)
    keep: int = setting(3, "how many epoch checkpoints to keep (0: all)", 0)
    log_every: int = setting(10, "log metrics every N steps", 1)
    stop_at_step: int = setting(0, "interrupt the run after this global step, as a preemption would (0: off)", 0)
    nonfinite: str = choice("stop", ("stop", "skip"),
                             "on a NaN/Inf loss: stop (keeping the last good checkpoint) or skip the step")
    progress: bool = setting(True, "show a progress bar")


@dataclass
class EvalConfig:
    knn_k: int = setting(20, "neighbours of the weighted k-NN", 1)
    knn_temperature: float = setting(0.07, "temperature of the weighted k-NN", 1e-6)
    knn_every: int = setting(0, "k-NN on the test split every N epochs during training (0: only at the end)", 0)
    knn_init: bool = setting(True, "measure k-NN of the randomly initialised backbone before training")
    batch_size: int = setting(512, "batch size of feature extraction", 1)
    max_train_samples: int = setting(0, "subsample the k-NN memory bank (0: all training images)", 0)
    save_features: bool = setting(
        True, "keep the final k-NN's train and test features in RUN_DIR/features, keyed by checkpoints/last.pt, "
        "so that nocollapse eval reads them instead of encoding both splits again (not written when "
        "max_train_samples subsamples the memory bank)")
    linear_lrs: list = setting([1e-3, 1e-2], "learning rates of the linear-probe sweep (Adam)")
    linear_weight_decays: list = setting([0.0, 1e-4, 1e-3], "L2 penalties of the linear-probe sweep")
    linear_epochs: int = setting(20, "linear-probe epochs (at least 1000 steps)", 1)
    many_threshold: int = setting(100, "long-tail groups: head classes have more training images than this", 0)
    few_threshold: int = setting(20, "long-tail groups: tail classes have fewer training images than this", 0)


@dataclass
class DiagnosticsConfig:
    enabled: bool = setting(True, "collapse metrics during training (cheap ones every log step, geometry every epoch)")
    alarms: bool = setting(True, "raise collapse alarms (each once, with a likely cause and remedy)")
    warnings: bool = setting(True, "also report wasted capacity as warnings (unused_prototypes, prototype_collapse); "
                             "false silences them and keeps the collapse alarms")
    alarm_warmup_epochs: float = setting(1.0, "no alarm before this many epochs", 0.0)
    alarm_patience: int = setting(3, "consecutive log steps a failure must persist before its alarm fires", 1)
    prototype_collapse_eps: str = choice("0.1", ("0.025", "0.1", "0.25", "0.5"),
                                          "epsilon at which the prototype_collapse alarm counts unique prototypes")
    prototype_collapse_threshold: float = setting(
        0.5, "prototype_collapse fires when fewer than this fraction of prototypes are unique", 0.0, 1.0)
    queue_size: int = setting(4096, "recent training features kept for the per-epoch effective rank", 16)
    held_out_images: int = setting(256, "training images (a fixed seeded draw, un-augmented) encoded in eval mode "
                                   "at every log step for the representation and dimensional alarms: batch norm in "
                                   "training mode can spread a collapsed batch again; 0 turns it off", 0)
    online_probe: bool = setting(False, "an online k-NN and linear probe on the detached backbone features, fed "
                                 "every step with the training labels (all of them: an evaluation, never seen "
                                 "by the method); reports online_knn_top1 / online_linear_top1")
    online_probe_bank: int = setting(4096, "labelled feature rows in the online k-NN bank", 1)
    plots: bool = setting(True, "write PNG plots to RUN_DIR/plots at the end of training")


CORE_SECTIONS: dict[str, type] = {
    "data": DataConfig, "views": ViewsConfig, "model": ModelConfig, "optim": OptimConfig,
    "train": TrainConfig, "eval": EvalConfig, "diagnostics": DiagnosticsConfig,
}


# --------------------------------------------------------------------------------------------
# The schema, assembled from the method registry
# --------------------------------------------------------------------------------------------

class Config:
    """A run's configuration: ``cfg.data``, ``cfg.method``, ``cfg.dino``, ...

    ``Config()`` builds the defaults of the current schema; every instance is a dataclass of the
    schema assembled by :func:`config_schema` (so ``dataclasses.asdict`` works on it)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is Config:
            return config_schema()(*args, **kwargs)
        return super().__new__(cls)


@dataclass
class _Schema:
    cls: type                               # the assembled Config dataclass
    owners: dict[str, tuple[str, ...]]      # section or method key -> methods that declare it
    generation: int


_SCHEMA: _Schema | None = None


def _copy_field(f: dataclasses.Field) -> dataclasses.Field:
    if f.default_factory is not dataclasses.MISSING:
        return field(default_factory=f.default_factory, metadata=f.metadata)
    return field(default=f.default, metadata=f.metadata)


def _method_settings() -> list[tuple[str, dict[str, type]]]:
    out = []
    for name, method_cls in METHODS.items():
        settings = method_cls.settings() if hasattr(method_cls, "settings") else {}
        for section, schema in settings.items():
            if not dataclasses.is_dataclass(schema):
                raise TypeError(f"method {name!r}: settings section {section!r} must be a dataclass, "
                                f"got {schema!r}")
            if section in CORE_SECTIONS:
                raise TypeError(f"method {name!r}: section {section!r} is a core section; choose another name")
        out.append((name, dict(settings)))
    return out


def config_schema() -> type:
    """The ``Config`` dataclass of the registered methods (rebuilt when the registry changes)."""
    global _SCHEMA
    METHODS.names()  # loads entry-point plugins first: they bump the generation
    generation = METHODS.generation
    if _SCHEMA is not None and _SCHEMA.generation == generation:
        return _SCHEMA.cls
    method_fields: dict[str, tuple[dataclasses.Field, Any, type]] = {}
    sections: dict[str, type] = {}
    owners: dict[str, list[str]] = {}
    for name, settings in _method_settings():
        for section, schema in settings.items():
            if section == "method":
                hints = typing.get_type_hints(schema)
                for f in dataclasses.fields(schema):
                    if f.name == "name":
                        raise TypeError(f"method {name!r}: method.name is reserved")
                    seen = method_fields.get(f.name)
                    if seen is not None and seen[2] is not schema:
                        raise TypeError(f"method.{f.name} is declared by two settings classes "
                                        f"({seen[2].__qualname__} and {schema.__qualname__})")
                    method_fields[f.name] = (f, hints[f.name], schema)
                    owners.setdefault(f"method.{f.name}", []).append(name)
            else:
                if section in sections and sections[section] is not schema:
                    raise TypeError(f"section {section!r} is declared by two settings classes "
                                    f"({sections[section].__qualname__} and {schema.__qualname__})")
                sections[section] = schema
                owners.setdefault(section, []).append(name)
    default_method = METHODS.default()
    method_cls = dataclasses.make_dataclass(
        "MethodConfig",
        [("name", str, choice(default_method, METHODS, "self-supervised method (a registered method)"))]
        + [(n, t, _copy_field(f)) for n, (f, t, _) in method_fields.items()])
    ordered = list(CORE_SECTIONS.items())
    fields = [(n, t, field(default_factory=t)) for n, t in ordered[:3]]
    fields.append(("method", method_cls, field(default_factory=method_cls)))
    fields += [(n, t, field(default_factory=t)) for n, t in sections.items()]
    fields += [(n, t, field(default_factory=t)) for n, t in ordered[3:]]
    cls = dataclasses.make_dataclass("Config", fields, bases=(Config,))
    cls.__module__ = __name__
    _SCHEMA = _Schema(cls, {k: tuple(v) for k, v in owners.items()}, generation)
    return cls


def _schema() -> _Schema:
    config_schema()
    assert _SCHEMA is not None
    return _SCHEMA


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
    options = _choices(f)
    if options is not None:
        return "one of " + ", ".join(repr(c) for c in options)
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

    Returns the validated config and the keys that the file or the overrides set (to any value,
    the default included; used to reject keys that do not apply to the chosen method). ``base``
    is a trusted, complete config (a run directory's ``config.yaml``) and is not counted as
    explicit."""
    base_flat: dict[str, Any] = _flatten(base) if base else {}
    file_flat: dict[str, Any] = _flatten(load_yaml(file)) if file is not None else {}
    override_flat = parse_overrides(overrides)
    user = {**file_flat, **override_flat}
    cfg = _merged_config({**base_flat, **user})
    explicit = set(user)
    validate(cfg, explicit=explicit - _switched_off_by_overrides(cfg, base_flat, file_flat, override_flat))
    return cfg, explicit


def _merged_config(flat: dict[str, Any]) -> Config:
    """The schema's defaults with the flat ``key: value`` settings merged in (not validated)."""
    flat = dict(flat)
    _check_known(flat)
    for key, value in flat.items():
        info = _field_info(key)
        # YAML reads `true` as a boolean; tri-state switches (auto | true | false) take strings.
        if isinstance(value, bool) and info and "true" in (_choices(info[0]) or ()):
            flat[key] = str(value).lower()
    schema = OmegaConf.structured(config_schema())
    try:
        merged = OmegaConf.merge(schema, OmegaConf.create(_nest(flat)))
    except ConfigKeyError as exc:  # pragma: no cover - _check_known catches these first
        raise ConfigError(str(exc).splitlines()[0]) from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        value = flat.get(key, "?")
        allowed = describe_key(key)
        raise ConfigError(f"{key}: {value!r} is not valid; expected {allowed or 'another type'}") from None
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def _switched_off_by_overrides(cfg: Config, base_flat: dict[str, Any], file_flat: dict[str, Any],
                               override_flat: dict[str, Any]) -> set[str]:
    """The file's keys that apply to the file's own config but not once the overrides are merged.

    ``--set swav.queue_length=0`` on a recipe that sets ``swav.queue_start_epochs`` makes that key
    moot; it is the user's override, not a mistake in the file, so it is not rejected (a key the
    file sets that does not apply to the file itself still is)."""
    file_keys = set(file_flat) - set(override_flat)
    if not file_keys or not override_flat:
        return set()
    off_now = {k for keys in _inapplicable(cfg, file_keys).values() for k in keys}
    if not off_now:
        return set()
    try:
        file_only = _merged_config({**base_flat, **file_flat})
        off_in_file = {k for keys in _inapplicable(file_only, file_keys).values() for k in keys}
    except ConfigError:
        return set()      # the file alone does not make a config: every key it sets is checked
    return off_now - off_in_file


def validate(cfg: Config, explicit: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """Check choices, ranges and cross-field constraints; raise :class:`ConfigError`."""
    for key in all_keys():
        info = _field_info(key)
        assert info is not None
        f = info[0]
        value = get(cfg, key)
        options = _choices(f)
        if options is not None and value not in options:
            registry = f.metadata["choices"]
            if isinstance(registry, Registry):
                raise ConfigError(f"{key}: {registry.unknown_message(value)}")
            raise ConfigError(f"{key}: {value!r} is not allowed; expected {describe_key(key)}")
        if any(isinstance(v, float) and not math.isfinite(v)
               for v in (value if isinstance(value, (list, tuple)) else [value])):
            # NaN passes every range check (all its comparisons are false) and inf trains nothing
            what = "holds a number that is not finite" if isinstance(value, (list, tuple)) else "is not a finite number"
            raise ConfigError(f"{key}: {value!r} {what}; expected {describe_key(key)}")
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
    _check_applicable(cfg, explicit)
    _check_dataset(cfg, explicit)
    _check_labels(cfg, explicit)
    _run_settings_validators(cfg)


def _method_class(cfg: Config) -> Any:
    try:
        return METHODS.get(cfg.method.name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _inactive(cfg: Config) -> dict[str, str]:
    method_cls = _method_class(cfg)
    return dict(method_cls.inactive_settings(cfg)) if hasattr(method_cls, "inactive_settings") else {}


def _run_settings_validators(cfg: Config) -> None:
    """Call ``validate(cfg)`` of every settings class of the chosen method whose section applies.

    The hook is looked up on the declared class, not on the section's value: the ``method``
    section is a dataclass assembled from several classes and carries none of their methods."""
    inactive = _inactive(cfg)
    for section, schema in _method_class(cfg).settings().items():
        check = getattr(schema, "validate", None)
        if section not in inactive and callable(check):
            check(get(cfg, section), cfg)


def _owner_text(owners: tuple[str, ...]) -> str:
    if len(owners) == 1:
        return f"method.name is {owners[0]!r}"
    return "method.name is one of " + ", ".join(repr(o) for o in owners)


def _inapplicable(cfg: Config, keys: Iterable[str]) -> dict[str, list[str]]:
    """The keys among ``keys`` that do not apply to ``cfg``, grouped by the condition they need."""
    owners = _schema().owners
    name = cfg.method.name
    inactive = _inactive(cfg)
    problems: dict[str, list[str]] = {}
    for key in sorted(keys):
        for scope, who in owners.items():
            if key == scope or key.startswith(scope + "."):
                if name not in who:
                    problems.setdefault(_owner_text(who), []).append(key)
                break
        else:
            continue
        for scope, condition in inactive.items():
            if key == scope or key.startswith(scope + "."):
                problems.setdefault(condition, []).append(key)
    return problems


def _check_applicable(cfg: Config, explicit: Iterable[str]) -> None:
    """Reject every explicitly set key that does not apply to the chosen method."""
    problems = _inapplicable(cfg, explicit)
    for condition, keys in problems.items():
        raise ConfigError(f"{', '.join(keys)} only apply when {condition}; this run has "
                          f"method.name={cfg.method.name!r}" + _context(cfg, condition))


def _context(cfg: Config, condition: str) -> str:
    """The current value of every key a condition names (``method.prototypes='learned'``)."""
    parts = []
    for word in condition.replace(",", " ").split():
        if "." in word and word != "method.name":
            try:
                parts.append(f"{word}={get(cfg, word)!r}")
            except AttributeError:
                pass
    return "".join(", " + p for p in parts)


LABEL_KEYS = ("data.label_fraction", "data.labels_per_class", "data.label_seed")


def _check_labels(cfg: Config, explicit: Iterable[str]) -> None:
    """Label-subset keys apply only to a method that uses labels, and one way of sizing it."""
    keys = [k for k in sorted(explicit) if k in LABEL_KEYS]
    if keys and not getattr(_method_class(cfg), "uses_labels", False):
        raise ConfigError(f"{', '.join(keys)} only apply to a method that uses labels (such as supcon or "
                          f"clop); method.name={cfg.method.name!r} trains without labels")
    if cfg.data.labels_per_class is not None and cfg.data.label_fraction < 1.0:
        raise ConfigError("set data.label_fraction or data.labels_per_class, not both")


def _check_dataset(cfg: Config, explicit: Iterable[str]) -> None:
    """The dataset's own requirements, and a warning for each ``data.*`` key it does not read."""
    try:
        spec = DATASETS.get(cfg.data.dataset)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    problem = spec.check(cfg.data) if hasattr(spec, "check") else None
    if problem:
        raise ConfigError(problem)
    reads = getattr(spec, "reads_keys", None)
    if reads is None:
        return
    for key in sorted(explicit):
        if key.startswith("data.") and key.split(".", 1)[1] not in reads and key != "data.dataset":
            log.warning("%s is set but dataset %r does not read it; it has no effect", key, cfg.data.dataset)


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
    "CORE_SECTIONS", "Config", "ConfigError", "DataConfig", "DiagnosticsConfig", "EvalConfig",
    "ModelConfig", "OptimConfig", "TrainConfig", "ViewsConfig",
    "all_keys", "build_config", "choice", "config_from_dict", "config_schema", "describe_key", "get",
    "load_yaml", "parse_overrides", "reference_table", "setting", "suggest_keys", "to_dict", "to_yaml",
]
