"""Write one of scikit-learn's bundled datasets to a file a dataset task reads (.csv, .parquet or .npz).

    python examples/export_sklearn.py wine runs/data/wine.csv

Tables get the feature names as columns and the target as column ``target``; .npz files get arrays x, y.
Only the datasets that ship inside scikit-learn (no download): iris, wine, breast_cancer, diabetes, digits.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

BUNDLED = ("iris", "wine", "breast_cancer", "diabetes", "digits")


def export(name: str, out: Path) -> Path:
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, f"load_{name}")()
    x, y = np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        np.savez(out, x=x, y=y)
        return out
    import pandas as pd

    names = [str(n) for n in getattr(bunch, "feature_names", [f"f{i}" for i in range(x.shape[1])])]
    frame = pd.DataFrame(x, columns=names)
    frame["target"] = y
    if out.suffix == ".csv":
        frame.to_csv(out, index=False)
    elif out.suffix in (".parquet", ".pq"):
        frame.to_parquet(out)
    else:
        raise SystemExit(f"unknown output format {out.suffix}; use .csv, .parquet or .npz")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=BUNDLED)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    print(export(args.name, args.out))


if __name__ == "__main__":
    main()
