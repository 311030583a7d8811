"""MovieLens 100K, leave-last-out: the tuned two-tower model against EASE, item-kNN and popularity.

``bench.movielens_tuned --split last`` (its docstring has the protocol); kept as the name the
leave-last-out results were published under.

    .venv/bin/python -m bench.leave_last_out --data data/ml-100k            # 3 seeds
    .venv/bin/python -m bench.leave_last_out --data data/ml-100k --seeds 42 --trials 10 --minutes 15 --refit
"""

import sys

from bench.movielens_tuned import main

if __name__ == "__main__":
    sys.exit(main(default_split="last"))
