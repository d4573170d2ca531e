"""Tensor and pipeline parallelism: one process per rank, torch.distributed between them.

``parallel`` says which part of the model each rank holds (pure arithmetic), ``state``
finds the rendezvous and builds the process groups, ``communicator`` holds the
collectives, ``layers`` what a sharded model does at each meeting point, and ``worker``
the :class:`~kvrun.distributed.worker.Worker` an executor runs in each process.
"""
