"""The claims of deploy/README.md's SECURITY section that code (not configuration) must keep true."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.config import ConfigError, load
from workers.engine import Pack


class _Payload:
    """Pickles to a call of Path.touch: what a tampered checkpoint would smuggle into a worker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path(str(self.marker)).touch, ())  # type: ignore[return-value]


def test_a_tampered_checkpoint_cannot_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ck = tmp_path / "p0000.pt"
    torch.save({"format": 1, "meta": "{}", "evil": _Payload(marker)}, ck)
    with pytest.raises(Exception, match=r"(?i)weights_only|unsupported|global"):
        Pack.load(ck)
    assert not marker.exists()  # torch.load(weights_only=True) refused the pickled callable


@pytest.mark.parametrize("name", ["x; rm -rf /", "a'b", "a b", "$(id)", "../etc"])
def test_names_that_become_paths_experiments_and_studies_are_plain(name: str) -> None:
    with pytest.raises(ConfigError, match="name"):
        load(None, [f"name={name}"])
