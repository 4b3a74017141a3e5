"""Transplanting: the wiring f → h → g_S, its objectives, and fitting the adapter.

* :mod:`~nettransplant.transplant.wiring` — :class:`Transplant` (g_T beside it), channel
  checks, frozen/trainable parameters;
* :mod:`~nettransplant.transplant.objectives` — G_y' draws, the chain cache, α β λ, the
  four objectives;
* :mod:`~nettransplant.transplant.step` — the jitted adapter train step and its loop;
* :mod:`~nettransplant.transplant.closed_form` — the closed-form adapter;
* :mod:`~nettransplant.transplant.problem` — one transplant problem: draws, scalars, fit,
  evaluate;
* :mod:`~nettransplant.transplant.runs` — several runs of a problem trained together;
* :mod:`~nettransplant.transplant.protocol` — the training rule (restarts, budgets).
"""
