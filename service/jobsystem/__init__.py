"""The job system: what the API and the GPU worker share, without FastAPI and without torch.

Redis keys (``keys``), job records (``store``), RQ's queues (``queue``, ``fair_queue``), the
moves that change both at once (``lifecycle``), the admission of a submission (``admission``),
the services every process holds (``services``) and the housekeeping any process may run
(``reaper``, ``sweeper``). The HTTP layer (``service.app``, ``service.deps``, ``service.routes``)
and the worker (``worker``) sit on top of it; nothing here imports either.
"""
