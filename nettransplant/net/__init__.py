"""The transplant net: modules by id, adapters as edges, the operations that grow it, and I/O.

* :mod:`~nettransplant.net.graph` — :class:`TransplantNet` (routes, ``apply``,
  ``predict``), :class:`TeacherParts`, :class:`InputSpec`;
* :mod:`~nettransplant.net.operations` — transplant, connect, add a task
  module, fine-tune, rank task modules (each takes the net and returns the grown
  net); :mod:`~nettransplant.net.task_training` trains the task modules;
* :mod:`~nettransplant.net.io` — export / import of nets and single modules,
  teacher checkpoints as :class:`TeacherParts`;
* :mod:`~nettransplant.net.verify` — a net's content hash, field and size checks
  made before anything of it is built;
* :mod:`~nettransplant.net.outputs` — one writer per output (a lock), outputs
  checked before any work;
* :mod:`~nettransplant.net.images` — images and samples read as uint8 RGB, sizes
  checked before decoding.
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
    UnverifiedNetWarning,
    export_module,
    export_net,
    load_net,
    load_teacher,
    net_spec,
)
from nettransplant.net.operations import (
    TransplantSettings,
    add_task,
    build_problem,
    connect,
    fine_tune,
    learn_adapter,
    rank_task_modules,
    transplant,
)
from nettransplant.net.task_training import TaskTrainingSettings
from nettransplant.net.verify import NetVerificationError

__all__ = [
    "CategoryNode", "Edge", "InputSpec", "ModuleRef", "NetSpecError", "NetVerificationError",
    "Route", "TaskNode",
    "TaskTrainingSettings", "TeacherParts", "TransplantNet", "TransplantSettings", "add_task",
    "build_problem", "connect", "export_module", "export_net", "fine_tune", "learn_adapter",
    "load_net", "load_teacher", "net_spec", "rank_task_modules", "transplant",
    "UnverifiedNetWarning",
]
