"""What defines a run: :class:`TrainConfig`, its validation, and the errors training raises."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .data import DATASET_NAMES, NORMALIZATIONS
from .data.folder import is_folder
from .models import ACTIVATIONS, MODELS, RECOMMENDED, is_zoo, model_defaults
from .rules import RULES, ConversionError, Option

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("none", "cosine", "step")
AMP = ("none", "bf16")
#: TrainConfig fields that say where and how fast a run computes, not what (or when it gives up):
#: a resumed run may change them (and ``epochs``, to extend it); any other change is refused.
MACHINE_FIELDS = ("out", "device", "data_dir", "download", "eval_batch_size", "compile", "cuda_graph", "max_loss",
                  "log")
LOGS = ("none", "tensorboard")
#: Options removed since runs recorded them, with the value every recorded run had (EKDAA's
#: error_map_from "output" kept only z: no advantage left once the exact form kept what backprop keeps).
REMOVED_FIELDS = {"error_map_from": "pre-activation"}


class TrainError(Exception):
    """A bad configuration or a broken file: one line saying what and how to fix it."""


class Diverged(TrainError):
    """NaN/inf loss or parameters, or a loss past ``max_loss``; the last good checkpoint is kept."""


class Stopped(KeyboardInterrupt):
    """A stop signal (Ctrl-C's SIGINT, SIGTERM, SIGUSR1) ended training at a step boundary, after the
    checkpoint was written; ``signum`` says which (exit status 128 + signum)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def setting(default: Any, help: str, group: str, *, choices: Callable[[], Any] | tuple | None = None,
            above: float | None = None, at_least: float | None = None, cli: bool = True) -> Any:
    """A TrainConfig field, declared as a rule's option is (an :class:`~ekdaa.rules.Option`, named by
    its field), with its ``ekdaa train`` flag group (``cli=False``: no flag)."""
    option = Option("", default() if callable(default) else default, help, choices, above, at_least)
    factory = dict(default_factory=default) if callable(default) else dict(default=default)
    return field(**factory, metadata=dict(option=option, group=group, cli=cli))


def rule_option(name: str) -> Any:
    """A TrainConfig field for the option ``name`` of the registered rules (declared in their ``OPTIONS``):
    left unset (None), it takes the model's recommendation or the option's default."""
    declared = [(rule, o) for rule, cls in RULES.items() for o in cls.OPTIONS if o.name == name and o.train]
    if not declared:
        raise TypeError(f"TrainConfig.{name}: no registered rule has an option {name!r}: remove the field")
    option, rules = declared[0][1], tuple(rule for rule, _ in declared)
    for rule, other in declared:
        if other.default != option.default:
            raise TypeError(f"rules {rules[0]} and {rule} declare option {name} with different defaults")
    return field(default=None, metadata=dict(option=option, rules=rules, cli=True,
                                             group=f"{' / '.join(rules)} options (other rules take none of them)"))


WHAT, OPTIMISATION, DATA, MACHINE = "what to train", "optimisation", "data", "machine and output"


@dataclass
class TrainConfig:
    """Everything that defines a run (the defaults train the digits quickstart): general fields, and
    the options of every registered rule, declared in its ``OPTIONS`` (a rule's own options only apply
    when it is the run's rule; left unset, they take the model's recommendation or the rule's default),
    e.g. ``TrainConfig(rule="ekdaa", beta=0.5)``."""

    dataset: str = setting("digits", "dataset: a registered one, or folder:PATH (one sub-folder of images per "
                           "class, or PATH/train/ and PATH/test/)", WHAT, choices=lambda: DATASET_NAMES)
    model: str = setting("paper-cnn", "network: a registered one, or torchvision:NAME / timm:NAME (where that "
                         "package is installed)", WHAT, choices=lambda: MODELS)
    rule: str = setting("ekdaa", "learning rule", WHAT, choices=lambda: RULES)
    activation: str | None = setting(None, "activation (unset: the model's own; tanh for the paper's CNNs and the "
                                     "ResNets)", WHAT, choices=lambda: ACTIVATIONS)
    bias: bool | None = setting(None, "biases in every layer (unset: the model's own; none for the paper's CNNs "
                                "and the ResNets)", WHAT)
    epochs: int = setting(10, "epochs", OPTIMISATION, at_least=1)
    batch_size: int = setting(50, "batch size", OPTIMISATION, at_least=1)
    # Adam lr 1e-3 won the validation sweep (ekdaa/suites/sweep-cpu.toml)
    optimizer: str = setting("adam", "optimizer", OPTIMISATION, choices=OPTIMIZERS)
    lr: float = setting(0.001, "learning rate", OPTIMISATION, above=0)
    momentum: float = setting(0.9, "SGD momentum", OPTIMISATION, at_least=0)
    weight_decay: float = setting(0.0, "weight decay, also on learned feedback", OPTIMISATION, at_least=0)
    max_loss: float = setting(0.0, "stop as diverged (exit 2, last good checkpoint kept) once the epoch's mean "
                              "training loss passes this; 0: 100 x chance's, 100 ln(classes)", OPTIMISATION,
                              at_least=0)
    lr_schedule: str = setting("none", "per-epoch schedule: cosine to 0, or x0.1 every epochs/3", OPTIMISATION,
                               choices=SCHEDULES)
    data_dir: str | None = setting(None, "folder with one sub-folder per dataset (fashion-mnist/, cifar-10/, "
                                   "svhn/); none: $EKDAA_DATA or the user cache, downloading what is missing", DATA)
    download: bool = setting(True, "download missing files", DATA)
    val_split: int = setting(0, "hold out this many training images for validation, fixed by seed", DATA,
                             at_least=0)
    image_size: int = setting(0, "folder datasets: resize every image to N x N (0: as they are, one size)", DATA,
                              at_least=0)
    train_subset: int = setting(0, "train on the first N training images only (0: all)", DATA, at_least=0)
    normalization: str = setting("half", "half: x/255-0.5; standard: per-channel mean/std", DATA,
                                 choices=NORMALIZATIONS)
    augment: bool = setting(False, "random crop (pad 4), plus horizontal flip for cifar10", DATA)
    seed: int = setting(0, "seed of weights, feedback, split and order", MACHINE)
    device: str = setting("auto", "auto, cpu, cuda or cuda:N", MACHINE)
    amp: str = setting("none", "bf16 autocast for the forward pass", MACHINE, choices=AMP)
    channels_last: bool = setting(False, "channels_last memory format", MACHINE)
    compile: bool = setting(False, "torch.compile the model for training steps (needs a C++ compiler on CPU); "
                            "evaluation stays eager", MACHINE)
    cuda_graph: bool = setting(False, "CUDA only: replay each full training batch's whole step (forward, loss, "
                               "backward, optimizer) from one CUDA graph; a partial batch runs eagerly", MACHINE)
    eval_batch_size: int = setting(1000, "batch size for evaluation", MACHINE, at_least=1)
    track_alignment: bool = setting(False, "log per-layer angles (feedback vs W, update vs backprop) and Sign "
                                    "layers' flips to metrics.jsonl each epoch", MACHINE)
    out: str | None = setting(None, "run directory for config, metrics, summary and checkpoint", MACHINE)
    log: str = setting("none", "tensorboard: also per-step loss and learning rate, per-epoch metrics and alignment "
                       "angles as TensorBoard files in OUT/tensorboard (pip install 'ekdaa[tensorboard]')", MACHINE,
                       choices=LOGS)
    extra: dict[str, Any] = setting(dict, "free-form notes kept with the run", MACHINE, cli=False)
    # the rules' options (each declared once, in its rules' OPTIONS; a rule with a new option adds its line here)
    norm_backward: str | None = rule_option("norm_backward")
    feedback_init: str | None = rule_option("feedback_init")
    beta: float | None = rule_option("beta")
    gamma: float | None = rule_option("gamma")
    error_kernel_init: str | None = rule_option("error_kernel_init")
    pool_routing: str | None = rule_option("pool_routing")
    error_norm: str | None = rule_option("error_norm")
    target_function: str | None = rule_option("target_function")
    tau: float | None = rule_option("tau")
    error_map: str | None = rule_option("error_map")

    def __post_init__(self) -> None:
        """A rule option left unset (None) takes the model's recommendation (``RECOMMENDED``) where
        the run's rule has that option, else the option's default. The value is fixed here: a
        ``dataclasses.replace`` or a saved ``config.json`` carries it as set."""
        for name, value in model_defaults(self.model).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        recommended = self._recommended()
        own = {o.name for o in RULES[self.rule].OPTIONS} if self.rule in RULES else set()
        for f in dataclasses.fields(self):
            if "rules" in f.metadata and getattr(self, f.name) is None:
                pick = recommended.get(f.name) if f.name in own else None
                setattr(self, f.name, f.metadata["option"].default if pick is None else pick)

    def _recommended(self) -> dict[str, Any]:
        """The rule options this run's model recommends, as their options' types."""
        options = {f.name: f.metadata["option"].default for f in dataclasses.fields(self) if "rules" in f.metadata}
        recommended = RECOMMENDED.get(self.model, {})
        unknown = sorted(set(recommended) - set(options))
        if unknown:
            raise TrainError(f"model {self.model!r} recommends {unknown}, which no registered rule has as an "
                             f"option: fix its @register_model (options: {', '.join(sorted(options))})")
        return {k: float(v) if type(options[k]) is float else v for k, v in recommended.items()}

    def dataset_options(self) -> dict[str, Any]:
        """What ``load_dataset`` takes besides the name: a folder dataset's ``image_size``."""
        return dict(image_size=self.image_size) if is_folder(self.dataset) else {}

    def rule_options(self) -> dict[str, Any]:
        """The options of this run's rule, as ``ekdaa.convert`` takes them."""
        return {o.name: getattr(self, o.name) for o in RULES[self.rule].OPTIONS if o.train}

    def validate(self) -> None:
        """Every field's allowed values, and the rule's options (another rule's, changed: refused)."""
        recommended = self._recommended()
        for f in dataclasses.fields(self):
            value, option, rules = getattr(self, f.name), f.metadata["option"], f.metadata.get("rules")
            if (f.name == "model" and is_zoo(value)) or (value is None and f.name in ("activation", "bias")):
                continue  # a zoo's model (found when built), or the model's own activations and biases
            if not rules and option.refusal(value, f.name):
                raise TrainError(option.refusal(value, f.name))
            # another rule's option may hold its default or the model's choice (unused), nothing else
            if rules and self.rule not in rules and value not in (option.default, recommended.get(f.name)):
                raise TrainError(f"{f.name} is an option of rule {', '.join(rules)}, not of {self.rule!r}: "
                                 "drop it or choose that rule")
        if self.log != "none" and not self.out:
            raise TrainError(f"--log {self.log} writes into the run directory: give --out DIR")
        if is_zoo(self.model) and (self.activation is not None or self.bias is not None):
            raise TrainError(f"model {self.model} keeps its own activations and biases: drop --activation and --bias")
        if self.image_size and not is_folder(self.dataset):
            raise TrainError(f"image_size is for folder:PATH datasets; {self.dataset} has its own size: drop it")
        try:
            RULES[self.rule](**self.rule_options())
        except ConversionError as err:
            raise TrainError(str(err)) from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainConfig":
        """The config a run directory's ``config.json`` (or that file itself) holds."""
        path = Path(path)
        path = path / "config.json" if path.is_dir() else path
        try:
            values = json.loads(path.read_text())["config"]
        except FileNotFoundError:
            raise TrainError(f"{path} does not exist: pass a run directory written by ekdaa train --out") from None
        except (ValueError, KeyError, TypeError) as err:
            raise TrainError(f"{path} is not a run's config.json (no 'config' object): {err}") from None
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """A config from plain values (a TOML file, JSON), each checked against its field's type."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = dict(values)
        for key, default in REMOVED_FIELDS.items():  # a run's config written before they went
            if key in values and values[key] == default:
                del values[key]
            elif key in values:
                raise TrainError(f"config key {key} = {values[key]!r}: that option was removed (only {default!r}, "
                                 "its default, remains): this run cannot be repeated with this version")
        unknown = sorted(set(values) - names)
        if unknown:
            raise TrainError(f"unknown config keys {unknown}: valid keys are {', '.join(sorted(names))}")
        defaults = cls()
        for key, value in values.items():
            default = getattr(defaults, key)
            want = (str, type(None)) if default is None else (int, float) if type(default) is float else type(default)
            if key in ("activation", "bias"):  # None: the model's own
                want = (want, type(None))
            if not isinstance(value, want) or (isinstance(value, bool) and type(default) is not bool):
                raise TrainError(f"config key {key} = {value!r} should be of type {type(default).__name__}"
                                 f"{' or null' if default is None else ''}, like its default {default!r}")
        # a float field given as an int (tau = 2) is that float: one value, one run identity
        return cls(**{k: float(v) if type(getattr(defaults, k)) is float else v for k, v in values.items()})


def _check_rule_options() -> None:
    """Every registered rule's option that ``ekdaa train`` offers has its TrainConfig field."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    missing = sorted({o.name for rule in RULES.values() for o in rule.OPTIONS if o.train} - fields)
    if missing:
        raise TypeError(f"TrainConfig has no field for the rules' options {missing}: add `NAME: TYPE | None = "
                        "rule_option(\"NAME\")` for each to ekdaa/config.py")


_check_rule_options()


def names_from(text: str, valid: Sequence[str], what: str, name_of: Callable[[str], str] = str) -> list[str]:
    """A comma-separated list of names for a command-line option (argparse's ``type``): each known
    (``name_of(item)`` among ``valid``), or one line naming the unknown ones and the valid."""
    import argparse
    names = [name.strip() for name in text.split(",") if name.strip()]
    bad = [name for name in names if name_of(name) not in valid]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown {what}(s) {', '.join(bad) or repr(text)}: choose from "
                                         f"{', '.join(valid)}")
    return names


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise TrainError(f"invalid device {name!r}: use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("device 'cuda' requested but no CUDA GPU is available: use --device cpu or auto")
    return device


def resumed_config(saved: TrainConfig, asked: TrainConfig) -> TrainConfig:
    """The run's own config, with the machine fields and ``epochs`` of ``asked``; any other
    difference is refused, naming the option."""
    changed = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in (*MACHINE_FIELDS, "epochs")
               and getattr(asked, f.name) != getattr(saved, f.name)]
    if changed:
        what = ", ".join(f"--{n.replace('_', '-')} {getattr(asked, n)!r} (the run's: {getattr(saved, n)!r})"
                         for n in changed)
        raise TrainError(f"--resume continues a run with its own config, but {what} would change it: "
                         "drop the option, or start a new run with another --out")
    if asked.epochs < saved.epochs:
        raise TrainError(f"--resume with --epochs {asked.epochs} would shorten the run's {saved.epochs} epochs: "
                         "--epochs may only extend it")
    if asked.epochs != saved.epochs and saved.lr_schedule != "none":
        raise TrainError(f"--resume with --epochs {asked.epochs} would change the run's "
                         f"{saved.lr_schedule} schedule over {saved.epochs} epochs: keep --epochs "
                         f"{saved.epochs} or start a new run")
    return dataclasses.replace(saved, epochs=asked.epochs, **{n: getattr(asked, n) for n in MACHINE_FIELDS})
