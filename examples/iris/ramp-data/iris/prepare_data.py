"""Write data/train.csv and data/test.csv for the iris example event.

Run with the current directory set to this folder (the dispatcher does so when
``data/`` is missing). The data is scikit-learn's bundled copy of iris, so nothing is
downloaded, and the split is stratified with a fixed seed, so every run writes the
same two files.
"""

import os
from pathlib import Path

import pandas as pd
from sklearn.datasets import load_iris
from sklearn.model_selection import train_test_split

# Fixed seed and test fraction: the leaderboard must not move between machines.
RANDOM_STATE = 57
TEST_SIZE = 0.3

COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def main(out_dir: Path = Path("data")) -> None:
    """Split iris into train/test CSV files under ``out_dir``."""
    iris = load_iris()
    df = pd.DataFrame(iris.data, columns=COLUMNS)
    # Species names, not integer codes: problem.py declares them as label names.
    df["species"] = [str(iris.target_names[i]) for i in iris.target]
    train, test = train_test_split(
        df, test_size=TEST_SIZE, stratify=df["species"], random_state=RANDOM_STATE
    )
    # Write into a scratch folder, then rename it to data/ in one step: the dispatcher
    # runs this script only while data/ is missing, so a crash must never leave a
    # half-written data/ behind.
    out_dir = Path(out_dir)
    if out_dir.exists():
        # Same seed, same files: nothing to redo (delete data/ to force a rewrite).
        print(f"{out_dir}/ already exists, left as it is")
        return
    scratch = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    scratch.mkdir(parents=True)
    try:
        train.to_csv(scratch / "train.csv", index=False)
        test.to_csv(scratch / "test.csv", index=False)
        scratch.rename(out_dir)
    except BaseException:
        for f in scratch.glob("*"):
            f.unlink()
        scratch.rmdir()
        raise
    print(f"wrote {len(train)} train and {len(test)} test rows to {out_dir}/")


if __name__ == "__main__":
    main()
