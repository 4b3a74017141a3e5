"""The transplant net: modules by id, adapters as edges, the operations that grow it, and I/O.

* :mod:`~nettransplant.net.graph` — :class:`TransplantNet` (routes, ``apply``,
  ``predict``), :class:`TeacherParts`, :class:`InputSpec`;
* :mod:`~nettransplant.net.operations` — transplant, connect, add a task
  module, fine-tune, rank task modules (each returns the grown net);
* :mod:`~nettransplant.net.io` — export / import of nets and single modules,
  teacher checkpoints as :class:`TeacherParts`.
"""

from nettransplant.net.graph import (
    CategoryNode,
    Edge,
    InputSpec,
    ModuleRef,
    Route,
    TaskNode,
    TeacherParts,
    TransplantNet,
)
from nettransplant.net.io import (
    NetSpecError,
    export_module,
    export_net,
    load_net,
    load_teacher,
    net_spec,
)
from nettransplant.net.operations import (
    TaskTrainingSettings,
    TransplantSettings,
    add_task,
    build_problem,
    connect,
    fine_tune,
    learn_adapter,
    rank_task_modules,
    transplant,
)

__all__ = [
    "CategoryNode", "Edge", "InputSpec", "ModuleRef", "NetSpecError", "Route", "TaskNode",
    "TaskTrainingSettings", "TeacherParts", "TransplantNet", "TransplantSettings", "add_task",
    "build_problem", "connect", "export_module", "export_net", "fine_tune", "learn_adapter",
    "load_net", "load_teacher", "net_spec", "rank_task_modules", "transplant",
]
