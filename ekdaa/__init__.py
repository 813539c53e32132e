"""ekdaa: backpropagation-free training of convolutional networks.

A learning rule is a choice of backward pass::

    model = ekdaa.convert(model, rule="ekdaa", beta=0.9, gamma=1.0)
    opt = torch.optim.SGD(ekdaa.param_groups(model, lr=0.01), lr=0.01, momentum=0.9)
    F.cross_entropy(model(x), y).backward(); opt.step()
    plain = ekdaa.unconvert(model)  # plain PyTorch again: trained W and b, no feedback
"""
from .layers import Sign
from .rules import RULES, ConversionError, backprop, compile, convert, param_groups, unconvert

__version__ = "0.1.0"
__all__ = ["RULES", "ConversionError", "Sign", "backprop", "compile", "convert", "param_groups", "unconvert",
           "__version__"]


def __getattr__(name: str):
    """``ekdaa.train``, ``ekdaa.analysis``, ... after ``import ekdaa`` alone (imported when first used)."""
    import importlib
    if name in ("train", "analysis", "data", "models", "reproduce", "bench", "config", "checkpoint", "evaluation"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ekdaa' has no attribute {name!r}")
