"""The network and its pieces: ops, layer stacks, modules, the adapter, tasks, metrics.

* :mod:`~nettransplant.core.ops` — every op's forward, explicit real VJP and pseudo VJP;
* :mod:`~nettransplant.core.layers` — sequential stacks: forward, surrogate, backward chain;
* :mod:`~nettransplant.core.modules` — category module, classification and FCN-8s task
  modules, the teacher;
* :mod:`~nettransplant.core.fcn8s` — FCN-8s's wiring: forward and backward chain;
* :mod:`~nettransplant.core.adapter` — reorder, re-scale, n × [conv + ReLU];
* :mod:`~nettransplant.core.tasks` — the task-module interface (loss, predict, metric);
* :mod:`~nettransplant.core.evaluation` — test error and pixel accuracy.
"""
