"""Experiments on the synthetic data: the embedded demo, synthetic evaluation and the ablation.

They sit above everything else (they train, load and ask models), so that :mod:`sr3d_plugin.synthetic`
stays data only: scenes, rendering, the ScanNet-style layout and question generation.

* :mod:`~sr3d_plugin.experiments.demo` — ``sr3d demo``: the bundled tiny model on a fresh scene
  (its picture: :mod:`~sr3d_plugin.experiments.demo_figure`).
* :mod:`~sr3d_plugin.experiments.evaluate` — answer and score synthetic questions.
* :mod:`~sr3d_plugin.experiments.ablation` — ``sr3d ablation``: PE × single-view pre-training.
"""
