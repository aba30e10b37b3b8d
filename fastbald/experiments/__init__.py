"""The paper's experiments, reproduced with fastbald (Gal, Islam & Ghahramani 2017).

* :mod:`fastbald.experiments.mnist`: the MNIST active-learning experiment (Table 1, Figure 1).
* :mod:`fastbald.experiments.report`: the table of images needed to reach 10% / 5% test error
  next to the paper's, and the test-error plot.
"""

from .mnist import PAPER_PROTOCOL, PRESETS, csv_path, run_mnist, state_dir
from .report import PAPER_TABLE1, load_runs, plot_runs, report

__all__ = [
    "PAPER_PROTOCOL",
    "PAPER_TABLE1",
    "PRESETS",
    "csv_path",
    "load_runs",
    "plot_runs",
    "report",
    "run_mnist",
    "state_dir",
]
