"""mfsweep orchestrator: config, planning, worker pools, Optuna search, MLflow tracking, analysis, CLI.

Submodules are imported lazily by the CLI so that ``mfsweep --help`` stays fast; import them directly:
``from orchestrator.config import load``.
"""

from __future__ import annotations

__all__ = ["analysis", "cli", "config", "plan", "pool", "scaling", "search", "search_config", "tracking"]
