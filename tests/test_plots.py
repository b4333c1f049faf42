"""The pictures of a run: nothing drawn on top of what they show."""

import numpy as np
import pytest

from mic_jax.evaluation import plots


@pytest.fixture
def drawn(monkeypatch):
  """The figures the plot functions would save, drawn, instead of files."""
  figures = []
  monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
  yield figures
  for fig in figures:
    plots.plt.close(fig)


@pytest.mark.parametrize("num_classes", [2, 8])
def test_per_class_f1_legend_hides_no_bar(drawn, num_classes):
  f1 = np.linspace(0.9, 1.0, num_classes)  # Long bars reach every corner.
  report = {"f1": f1, "support": np.full(num_classes, 10),
            "macro_f1": float(f1.mean())}
  plots.per_class_f1("unused.png", report,
                     [f"class-{i}" for i in range(num_classes)], "test")
  (fig,) = drawn
  fig.canvas.draw()
  (ax,) = fig.axes
  legend = ax.get_legend().get_window_extent()
  bars = [p.get_window_extent() for p in ax.patches]
  assert len(bars) == num_classes
  assert not any(legend.overlaps(bar) for bar in bars)


def test_photo_contribution_legend_hides_no_bar(drawn):
  rows = [{"label": f"class-{i}", "support": 10, "f1_with_photos": 0.95,
           "f1_photos_withheld": 0.5} for i in range(6)]
  plots.photo_contribution("unused.png", {
      "per_class": rows, "split": "test", "macro_f1_with_photos": 0.95,
      "macro_f1_photos_withheld": 0.5})
  (fig,) = drawn
  fig.canvas.draw()
  ax = fig.axes[0]
  legend = ax.get_legend().get_window_extent()
  assert not any(legend.overlaps(p.get_window_extent()) for p in ax.patches)
