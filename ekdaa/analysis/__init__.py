"""Looking inside trained runs, for any rule.

* :func:`alignment`: per weight layer, the angle between the feedback tensor and W and
  between the rule's update and backprop's gradient (``TrainConfig(track_alignment=True)``
  logs it every epoch, with the fraction of sign flips of Sign layers: :class:`Tracker`);
* :func:`visualize`: filters, error kernels, t-SNE, learning and alignment curves (PNG);
* :func:`robustness`: FGSM/PGD accuracy against epsilon, white-box or transferred from a
  substitute run.
"""
from .alignment import Tracker, alignment, angle, feedback_tensor, weight_layers
from .attacks import (ATTACKS, SCORE_ATTACKS, PixelModel, check_settings, craft, differences, fgsm, markdown,
                      merge_summaries, pgd, read_summary, robustness, robustness_summary, square, summary_markdown,
                      write_result, write_summary)
from .pictures import PICTURES, visualize
from .runs import RunDir, copy_weights

__all__ = ["ATTACKS", "PICTURES", "PixelModel", "RunDir", "SCORE_ATTACKS", "Tracker", "alignment", "angle",
           "check_settings", "copy_weights", "craft", "differences", "feedback_tensor", "fgsm", "markdown",
           "merge_summaries", "pgd", "read_summary", "robustness", "robustness_summary", "square",
           "summary_markdown", "visualize", "weight_layers", "write_result", "write_summary"]
