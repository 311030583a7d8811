"""Benchmarks of twotower_assets: each one answers a question about the product's speed, memory or
quality against a baseline, on this machine, and prints a Markdown table headed by the machine
and its load.

Run them from the repository root with the project's environment (``--help`` lists each one's
options; the defaults are the production sizes, which take minutes to an hour):

* ``python -m bench.pipeline``: the quickstart's synthetic data set through the whole graph:
  wall time and peak RSS per asset, training examples/s, recall against popularity.
* ``python -m bench.scale``: the whole graph at production size (10M events, 1M users, 200k
  items), one process per asset: peak RSS and wall time of each step against the 8 GB target.
* ``python -m bench.split_speed``: the split SQL (training / validation / test) against
  DuckDB's own sort-and-window over the same events.
* ``python -m bench.training_speed``: training examples/s of the product's code against a bare
  TFRS script at 1M users / 200k items (``--breakdown``: one step's sub-graphs; ``--quality``:
  recall@50 per seed, adam vs lazy_adam).
* ``python -m bench.training_overhead``: training through the asset graph against a standalone
  script on the same data, and input pipeline time against compute time.
* ``python -m bench.gpu_check``: training examples/s on the GPU(s), float32 and mixed precision,
  against the CPU, at production size.
* ``python -m bench.warm_start``: warm start against cold start on consecutive weekly dates
  (synthetic or MovieLens): epochs and seconds to the cold best, recall@50, stability.
* ``python -m bench.movielens``: model quality on MovieLens 100K against the TFRS tutorial,
  popularity and EASE.
* ``python -m bench.movielens_tuned``: the product's tuning on MovieLens 100K (leave-last-out,
  or the TFRS tutorial's random split with one vector per user) against EASE, item-kNN and
  popularity; ``--refit`` measures the refit on training + validation rows.
* ``python -m bench.embeddings_export``: tower outputs for 1M users / 200k items and their
  warehouse write (DuckDB, the BigQuery emulator) against a plain numpy + pyarrow write.
* ``python -m bench.topk``: top-k for all users (the recommendations asset) against this
  machine's float32 matmul rate and TFRS BruteForce.
* ``python -m bench.serving``: the ANN item index (LanceDB) against exact blocked brute force:
  recall@100 and queries/s.
* ``python -m bench.serving_load``: the served retrieval model (``mlflow models serve``) under
  concurrent load against exact search and the in-process model.

Shared helpers (machine description, peak memory, tables) are in ``bench._common``; the benches
import the product only as ``twotower_assets``. The soak and chaos harness is a test helper:
``python -m tests.helpers.soak``.
"""
