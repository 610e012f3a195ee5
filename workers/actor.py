"""The worker as a Ray actor: :class:`workers.runner.PackRunner`, one actor per GPU or per CPU slot, reused
across packs (options such as num_gpus and num_cpus are set by the pool)."""

from __future__ import annotations

import ray

from .runner import PackRunner

PackWorker = ray.remote(PackRunner)

__all__ = ["PackRunner", "PackWorker"]
