"""Training speed at production size: the TFRS script a competent user writes vs this project's training code.

One run, one synthetic data set (``--users`` 1M user ids, ``--items`` 200k item ids,
``--rows`` training rows; users drawn uniformly, items from a power law, the item's share of
rows as the logQ sampling probability), one model, one loss, a fixed number of steps:

* **tfrs-adagrad** (the baseline): the script TFRS's documentation teaches: ``tfrs.Model``, two
  ``Sequential`` towers (``StringLookup`` -> ``Embedding(vocab + 1, E)`` -> ``Dense(2E, relu)``
  -> ``Dense(E)`` -> ``UnitNormalization``; the item tower's lookup output, an integer, is also
  the accidental-hit id), ``tfrs.tasks.Retrieval`` (temperature 0.05, logQ correction,
  accidental hits removed), ``tf.keras.optimizers.Adagrad(0.1)`` as the tutorials compile it
  (tf-keras's Adagrad updates only a batch's embedding rows), fed by
  ``from_tensor_slices(...).shuffle(100_000).repeat().batch(B).prefetch(AUTOTUNE)``;
* **tfrs-adam**: the same script with stock Keras Adam (which moves every row of both id
  tables on every step), for those who use it;
* **product**: ``twotower_assets.model.training.train_two_tower`` (``build_model``, the
  product's callbacks, its saved-block input pipeline) with the ``production`` model recipe
  except batch and embedding size, on a feature config of the two id features only
  (``user_id`` and ``item_id``, string, E each): the same towers (concat -> Dense(2E, relu)
  -> Dense(E) -> L2 normalisation), the same loss (its retrieval task is TFRS's with the
  softmax fused, twotower_assets/model/retrieval_task.py) and hyperparameters, LazyAdam.

Each variant runs in its own process (same data files, same conditions); ``--warmup`` steps
are left out, the next ``--steps`` are timed (wall clock between the ends of the first and
the last timed step). The steps all lie in the first epoch (``--rows`` makes an epoch, a fifth
of the rows, as long as warm-up + timed steps); the pause at the epoch's end (callbacks: the
product's EarlyStopping copies every weight there) is printed apart. ``--rounds`` repeats the
variants in turn and keeps each one's best.

The run also prints the step's **floor** on this machine: the step's floating-point work (the
batch x batch logits' three matrix products and the towers' dense layers, forward and
backward) at the machine's measured float32 matrix-product rate, plus the least traffic over
the logits (written once by the forward product, read once by the softmax, read and written
once by its gradient) at the machine's measured memory bandwidth; and each variant's step as
a multiple of it. The last line printed is ``speedup_vs_tfrs: X`` (product examples/s /
tfrs-adagrad examples/s).

``--breakdown`` also times the sub-graphs of one production-size step of the product's
model (id lookups, embedding gathers, towers, logits + loss, gradients, TFRS's task against
the fused one, optimizer apply, the whole step).

``--quality`` instead runs the default synthetic graph of ``bench.pipeline`` (its data
and run config, through ``bench.scale``) once per (seed, optimizer: ``--optimizers``, the
product's ``lazy_adam`` and the baseline's ``adagrad`` by default, both at the recipe's
learning rate) and prints recall@50 per run with mean and spread per optimizer (training
steps only are re-run per seed). The fused task computes TFRS's loss (tested), so the
optimizer is the one difference in what the two variants learn.

    python -m bench.training_speed                       # 1M users, 200k items, batch 4096
    python -m bench.training_speed --breakdown
    python -m bench.training_speed --quality --seeds 1 2 3
    python -m bench.training_speed --quality --run-config configs/run/tiny.yaml   # the smoke run's graph
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import PYTHON, REPO, markdown_table, print_header

BFC = "TF_CPU_ALLOCATOR_USE_BFC"
"""TensorFlow's pooling CPU allocator, which the product switches on (twotower_assets/__init__.py)."""
VARIANTS = {
    # name: (what it is, its environment, the training code it runs)
    "tfrs-adagrad": ("TFRS script as its docs teach: Adagrad(0.1), integer candidate ids", {BFC: "false"}, "tfrs"),
    "tfrs-adam": ("the same TFRS script with stock Keras Adam(0.1)", {BFC: "false"}, "tfrs"),
    "product": ("product training code (train_two_tower, default recipe optimizer)", {}, "product"),
}
EXTRA_VARIANTS = {
    "tfrs-adagrad-bfc": ("the TFRS Adagrad script with the product's allocator setting", {BFC: "true"}, "tfrs"),
    "product-no-bfc": ("product training code, TensorFlow's default CPU allocator", {BFC: "false"}, "product"),
    # Threading on 2 cores: TensorFlow's default runs 2 inter-op and 2 intra-op threads.
    "product-interop1": ("product training code, 1 inter-op thread", {"TF_NUM_INTEROP_THREADS": "1"}, "product"),
    "product-intraop1": ("product training code, 1 intra-op thread", {"TF_NUM_INTRAOP_THREADS": "1"}, "product"),
}
ALL_VARIANTS = {**VARIANTS, **EXTRA_VARIANTS}
BASELINE = "tfrs-adagrad"
PROBABILITY = "item_sampling_probability"


def loads() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


# --------------------------------------------------------------------------------------------
# Data


def make_data(directory: Path, users: int, items: int, rows: int, seed: int = 0) -> None:
    """ids.npz (user and item index per row, sampling probability) and the product's saved blocks."""
    import numpy as np
    import pyarrow as pa

    import twotower_assets  # noqa: F401
    from twotower_assets.model.datasets import save_dataset

    rng = np.random.default_rng(seed)
    user_index = rng.integers(0, users, rows)
    popularity = 1.0 / np.arange(1, items + 1) ** 0.8
    item_index = rng.choice(items, rows, p=popularity / popularity.sum())
    share = np.bincount(item_index, minlength=items)[item_index] / rows
    np.savez(directory / "ids.npz", users=user_index, items=item_index, probability=share.astype(np.float32))
    table = pa.table({
        "user_id": pa.array(np.char.add("u", user_index.astype(str))),
        "item_id": pa.array(np.char.add("i", item_index.astype(str))),
        PROBABILITY: pa.array(share.astype(np.float32)),
    })
    kinds = {"user_id": "string", "item_id": "string", PROBABILITY: "number"}
    save_dataset(table.to_batches(max_chunksize=65_536), kinds, directory / "train")


def vocabularies(users: int, items: int) -> tuple[list[str], list[str]]:
    return [f"u{i}" for i in range(users)], [f"i{i}" for i in range(items)]


# --------------------------------------------------------------------------------------------
# One variant (child process)


def step_timer(warmup: int, steps: int):
    import tensorflow as tf

    class StepTimer(tf.keras.callbacks.Callback):
        """Wall-clock time at the end of every training step, and the loss of each."""

        def __init__(self):
            super().__init__()
            self.ends: list[float] = []
            self.losses: list[float] = []
            self.load_at_start = self.load_at_end = ""
            self.epoch_end_s = float("nan")

        def on_epoch_end(self, epoch, logs=None):
            # Runs after the product's ReduceLROnPlateau and EarlyStopping (train_two_tower puts
            # the caller's callbacks last): the pause between an epoch's last step and the next.
            if epoch == 0:
                self.epoch_end_s = time.perf_counter() - self.ends[-1]

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())
            self.losses.append(float(logs["loss"]))
            if len(self.ends) == warmup:
                self.load_at_start = loads()
            if len(self.ends) == warmup + steps:
                self.load_at_end = loads()

        def result(self, batch_size: int) -> dict:
            window = self.ends[warmup - 1 : warmup + steps]
            durations = [b - a for a, b in zip(window, window[1:])]
            return {
                "examples_per_s": steps * batch_size / (window[-1] - window[0]),
                "step_ms_median": 1000 * statistics.median(durations),
                "step_ms": [round(1000 * d) for d in durations],
                "first_loss": self.losses[0], "last_loss": self.losses[warmup + steps - 1],
                "epoch_end_s": self.epoch_end_s,
                "load_start": self.load_at_start, "load_end": self.load_at_end,
            }

    return StepTimer()


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    import numpy as np

    import twotower_assets  # noqa: F401
    import tensorflow as tf

    from twotower_assets.model.datasets import load_blocks, shuffled_batches
    from twotower_assets.model.training import EPOCH_FRACTION, TrainingParams, train_two_tower

    data = Path(args.data)
    ids = np.load(data / "ids.npz")
    rows = len(ids["users"])
    users, items = vocabularies(args.users, args.items)
    steps_per_epoch = math.ceil(rows / args.batch_size / EPOCH_FRACTION)
    epochs = math.ceil((args.warmup + args.steps) / steps_per_epoch)
    timer = step_timer(args.warmup, args.steps)
    params = TrainingParams(recipe=product_recipe(args, epochs=epochs), seed=args.seed)
    recipe = params.recipe

    if ALL_VARIANTS[variant][2] == "tfrs":
        features = {
            "user_id": np.char.add("u", ids["users"].astype(str)).astype(object),
            "item_id": np.char.add("i", ids["items"].astype(str)).astype(object),
            "probability": ids["probability"],
        }

        def pipeline():
            return (tf.data.Dataset.from_tensor_slices(features).shuffle(100_000, seed=args.seed).repeat()
                    .batch(args.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))

        tf.keras.utils.set_random_seed(args.seed)
        model = tfrs_model(users, items, args.embedding_size, recipe.task.temperature)
        optimizer_class = tf.keras.optimizers.Adam if "adam" in variant else tf.keras.optimizers.Adagrad
        model.compile(optimizer=optimizer_class(learning_rate=recipe.optimizer.learning_rate))
        model.fit(pipeline(), epochs=epochs, steps_per_epoch=steps_per_epoch, callbacks=[timer], verbose=0)
        optimizer = type(model.optimizer).__name__
    else:
        from twotower_assets.model.layers import FeatureStats

        config = id_only_config(args.embedding_size)
        stats = FeatureStats(vocabularies={"user_id": users, "item_id": items})

        def pipeline():
            return shuffled_batches(load_blocks(data / "train"), args.batch_size, min(recipe.schedule.shuffle_buffer, rows),
                                    params.seed).prefetch(tf.data.AUTOTUNE)

        result = train_two_tower(config, stats, load_blocks(data / "train"), rows, None, params, callbacks=[timer])
        optimizer = type(result.model.optimizer).__name__

    # The same input pipeline alone, for as many batches as were timed.
    iterator = iter(pipeline())
    next(iterator)
    started = time.perf_counter()
    for _ in range(args.steps):
        next(iterator)
    input_rate = args.steps * args.batch_size / (time.perf_counter() - started)
    import resource

    return {"variant": variant, "optimizer": optimizer, **timer.result(args.batch_size),
            "allocator": "BFC (pooling)" if os.environ.get(BFC, "").lower() in ("1", "true") else "default",
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "input_only_examples_per_s": input_rate}


def product_recipe(args: argparse.Namespace, epochs: int | None = None):
    """The production recipe with this run's embedding and batch size (and epochs)."""
    from twotower_assets.model.recipes import load_recipe

    overrides: dict = {"towers": {"embedding_size": args.embedding_size}, "schedule": {"batch_size": args.batch_size}}
    if epochs is not None:
        overrides["schedule"]["epochs"] = epochs
    return load_recipe("production", overrides)


def tfrs_model(users: list[str], items: list[str], dim: int, temperature: float):
    """The TFRS model a user writes from TFRS's docs (module docstring)."""
    import tensorflow as tf
    import tensorflow_recommenders as tfrs

    def tower(size):
        return tf.keras.Sequential([
            tf.keras.layers.Embedding(size + 1, dim),
            tf.keras.layers.Dense(2 * dim, activation="relu"),
            tf.keras.layers.Dense(dim),
            tf.keras.layers.UnitNormalization(),
        ])

    class RetrievalModel(tfrs.Model):
        def __init__(self):
            super().__init__()
            self.user_lookup = tf.keras.layers.StringLookup(vocabulary=users)
            self.item_lookup = tf.keras.layers.StringLookup(vocabulary=items)
            self.user_model = tower(len(users))
            self.item_model = tower(len(items))
            self.task = tfrs.tasks.Retrieval(temperature=temperature, remove_accidental_hits=True)

        def compute_loss(self, features, training=False):
            item_index = self.item_lookup(features["item_id"])
            return self.task(
                self.user_model(self.user_lookup(features["user_id"])), self.item_model(item_index),
                candidate_sampling_probability=features["probability"], candidate_ids=item_index,
                compute_metrics=False,
            )

    return RetrievalModel()


def id_only_config(embedding_size: int):
    from twotower_assets.model.features import FeatureConfig

    return FeatureConfig(
        name="ids-only",
        user_embedding_layers={"user_id": {"type": "string", "embedding_size": embedding_size}},
        item_embedding_layers={"item_id": {"type": "string", "embedding_size": embedding_size}},
    )


# --------------------------------------------------------------------------------------------
# Sub-graphs of one step (child process)


def run_breakdown(args: argparse.Namespace) -> dict:
    import numpy as np

    import twotower_assets  # noqa: F401
    import tensorflow as tf

    from twotower_assets.model.datasets import load_blocks, shuffled_batches
    from twotower_assets.model.layers import FeatureStats
    from twotower_assets.model.optimizers import make_optimizer
    from twotower_assets.model.training import TrainingParams, build_model

    data = Path(args.data)
    rows = len(np.load(data / "ids.npz")["users"])
    users, items = vocabularies(args.users, args.items)
    config = id_only_config(args.embedding_size)
    stats = FeatureStats(vocabularies={"user_id": users, "item_id": items})
    params = TrainingParams(recipe=product_recipe(args), seed=args.seed)
    tf.keras.utils.set_random_seed(args.seed)
    model = build_model(config, stats, params)
    batch = next(iter(shuffled_batches(load_blocks(data / "train"), args.batch_size, min(100_000, rows), args.seed)))
    model(batch)
    variables = model.trainable_variables
    user_layer, item_layer = model.user_tower.feature_layers[0], model.item_tower.feature_layers[0]
    user_index, item_index = user_layer.lookup(batch["user_id"]), item_layer.lookup(batch["item_id"])

    def run(fn):
        return tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, fn())

    def timed_all(fns: dict) -> dict[str, float]:
        """Median ms of each, measured round-robin (a load swing on this shared machine then
        hits every sub-graph alike, not the one that happened to run during it)."""
        for fn in fns.values():
            run(fn), run(fn)  # trace, warm
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.breakdown_repeats):
            for name, fn in fns.items():
                started = time.perf_counter()
                run(fn)
                times[name].append(time.perf_counter() - started)
        return {name: 1000 * statistics.median(values) for name, values in times.items()}

    def gradients():
        with tf.GradientTape() as tape:
            loss = model.compute_loss(batch, training=True)
        return loss, tape.gradient(loss, variables)

    @tf.function
    def gradient_outputs():
        loss, grads = gradients()
        return loss, [g.values if isinstance(g, tf.IndexedSlices) else g for g in grads]

    one_step = gradients()[1]
    fixed = [g.values if isinstance(g, tf.IndexedSlices) else g for g in one_step]
    fixed_indices = [g.indices if isinstance(g, tf.IndexedSlices) else None for g in one_step]
    sparse = ", ".join(v.name for v, i in zip(variables, fixed_indices) if i is not None)

    def apply_with(optimizer):
        @tf.function
        def apply():
            grads = [tf.IndexedSlices(g, i, tf.shape(v, out_type=i.dtype)) if i is not None else g
                     for g, i, v in zip(fixed, fixed_indices, variables)]
            optimizer.apply_gradients(zip(grads, variables))
            return optimizer.iterations
        return apply

    def step_with(optimizer):
        @tf.function
        def step():  # what TFRS's train_step does: loss, gradients, apply
            loss, grads = gradients()
            optimizer.apply_gradients(zip(grads, variables))
            return loss
        return step

    # The accidental-hit mask of the Retrieval task: batch x batch equality of the item ids.
    item_ids = batch["item_id"]

    def mask_of(ids):
        return tf.reduce_sum(tf.cast(tf.equal(ids[:, tf.newaxis], ids[tf.newaxis, :]), tf.float32))

    # The step after the string lookups (gathers, MLPs, in-batch softmax loss, gradients) from
    # integer ids (integer item ids stand in for the accidental-hit ids), with and without XLA.
    probability = batch[PROBABILITY]

    def post_lookup():
        with tf.GradientTape() as tape:
            vectors = []
            for tower, layer, index in ((model.user_tower, user_layer, user_index), (model.item_tower, item_layer, item_index)):
                vectors.append(tf.math.l2_normalize(tower.projection(tower.hidden(layer.embedding(index))), axis=1))
            losses = model.task(vectors[0], vectors[1], candidate_sampling_probability=probability,
                                candidate_ids=item_index, compute_metrics=False)
            loss = tf.nn.compute_average_loss(losses)
        grads = tape.gradient(loss, variables)
        return loss, [g.values if isinstance(g, tf.IndexedSlices) else g for g in grads]

    # The in-batch softmax alone, from fixed tower outputs: TFRS's task against the product's.
    import tensorflow_recommenders as tfrs

    user_vectors, item_vectors = (tf.Variable(t) for t in model(batch))
    fingerprints = tf.strings.to_hash_bucket_fast(item_ids, tf.int64.max)
    tfrs_task = tfrs.tasks.Retrieval(
        loss=tf.keras.losses.CategoricalCrossentropy(from_logits=True, reduction=tf.keras.losses.Reduction.NONE),
        temperature=params.recipe.task.temperature, remove_accidental_hits=True)

    def softmax_gradients(task):
        @tf.function
        def run_task():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(task(user_vectors, item_vectors, candidate_sampling_probability=batch[PROBABILITY],
                                           candidate_ids=fingerprints, compute_metrics=False))
            return loss, tape.gradient(loss, [user_vectors, item_vectors])
        return run_task

    # The step's three batch x batch matrix products alone (scores, and the gradients of both
    # towers' vectors), on a fixed (batch x batch) gradient: what the floor's FLOPs cost at the
    # rate these shapes reach, not the square product's.
    score_gradient = tf.random.normal((args.batch_size, args.batch_size))

    @tf.function
    def logits_products():
        return (tf.matmul(user_vectors, item_vectors, transpose_b=True), tf.matmul(score_gradient, item_vectors),
                tf.matmul(score_gradient, user_vectors, transpose_a=True))

    # Learning rate 1e-6: the timed steps barely move the weights.
    lazy, stock = make_optimizer("lazy_adam", 1e-6), make_optimizer("adam", 1e-6)
    fns = {
        "id lookups (StringLookup, both towers)": tf.function(
            lambda: (user_layer.lookup(batch["user_id"]), item_layer.lookup(batch["item_id"]))),
        "embedding gathers (both tables)": tf.function(
            lambda: (user_layer.embedding(user_index), item_layer.embedding(item_index))),
        "towers forward (lookups + gathers + MLP + L2 norm)": tf.function(lambda: model(batch)),
        "forward + logits + loss (compute_loss)": tf.function(lambda: model.compute_loss(batch, training=True)),
        "forward + loss + gradients": gradient_outputs,
        "in-batch softmax + gradients from the tower outputs, tfrs.tasks.Retrieval": softmax_gradients(tfrs_task),
        "the same, the product's fused task": softmax_gradients(model.task),
        "the three batch x batch matrix products alone": logits_products,
        "accidental-hit mask alone, string item ids": tf.function(lambda: mask_of(item_ids)),
        "accidental-hit mask alone, integer item ids": tf.function(lambda: mask_of(item_index)),
        "after lookups, integer ids: gathers + MLP + loss + gradients": tf.function(post_lookup),
        "the same, jit_compile=True": tf.function(post_lookup, jit_compile=True),
        "optimizer apply, lazy_adam": apply_with(lazy),
        "optimizer apply, adam": apply_with(stock),
        "whole step (loss + gradients + apply), lazy_adam": step_with(lazy),
        "whole step (loss + gradients + apply), adam": step_with(stock),
    }
    jit = {}
    try:
        timings = timed_all(fns)
    except Exception as exc:  # noqa: BLE001 - XLA on the post-lookup step may refuse; time the rest
        jit["post-lookup step"] = f"does not compile: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
        fns.pop("the same, jit_compile=True")
        timings = timed_all(fns)

    # XLA on the whole train step (Keras's compile(jit_compile=True)).
    model.compile(optimizer=make_optimizer("lazy_adam", 0.1), jit_compile=True)
    one = tf.data.Dataset.from_tensors(batch).repeat()
    try:
        model.fit(one, epochs=1, steps_per_epoch=2, verbose=0)
        started = time.perf_counter()
        model.fit(one, epochs=1, steps_per_epoch=5, verbose=0)
        jit["train step"] = f"{1000 * (time.perf_counter() - started) / 5:.0f} ms/step"
    except Exception as exc:  # noqa: BLE001 - the bench reports what XLA says
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        telling = [line for line in lines if "unsupported" in line.lower()]
        jit["train step"] = f"does not compile: {type(exc).__name__}: {' / '.join(telling[:2] or lines[-1:])[:400]}"
    return {"timings_ms": timings, "sparse_gradients": sparse, "jit_compile": jit, "load": loads()}


# --------------------------------------------------------------------------------------------
# The step's floor on this machine


def memory_bandwidth(size: int, repeats: int = 5) -> float:
    """GB/s of one streaming pass (read a float32 size x size matrix, write another, both allocated
    once), the best of ``repeats``: the rate a pass over the logits can reach."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    out = np.empty_like(a)
    np.multiply(a, 1.0001, out=out)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        np.multiply(a, 1.0001, out=out)
        times.append(time.perf_counter() - started)
    return 2 * a.nbytes / min(times) / 1e9


def step_floor(args: argparse.Namespace) -> dict:
    """The least time one training step can take here (module docstring): its FLOPs at the
    measured matrix-product rate plus four passes over the logits at the measured bandwidth."""
    from bench._common import float32_matmul_rate

    batch, dim = args.batch_size, args.embedding_size
    logits_flops = 3 * 2 * batch * batch * dim  # scores, and the gradients of both towers' vectors
    # Each tower: Dense(dim -> 2 dim) and Dense(2 dim -> dim); backward is twice the forward.
    tower_flops = 2 * 3 * 2 * batch * (dim * 2 * dim + 2 * dim * dim)
    logits_bytes = 4 * batch * batch * 4
    rate = max(float32_matmul_rate().values())
    bandwidth = memory_bandwidth(batch)
    compute_ms = 1000 * (logits_flops + tower_flops) / (rate * 1e9)
    traffic_ms = 1000 * logits_bytes / (bandwidth * 1e9)
    return {"gflop": (logits_flops + tower_flops) / 1e9, "rate_gflops": rate, "bandwidth_gbs": bandwidth,
            "compute_ms": compute_ms, "traffic_ms": traffic_ms, "floor_ms": compute_ms + traffic_ms, "load": loads()}


# --------------------------------------------------------------------------------------------
# Quality: the default synthetic graph per seed and optimizer


def run_quality(args: argparse.Namespace) -> int:
    import pandas as pd
    import yaml

    from bench.pipeline import PARTITION, SOURCE

    home = Path(args.home) / "quality"
    if args.run_config:
        base = yaml.safe_load(Path(args.run_config).read_text())
        source = f"{args.run_config} as it is"
    else:
        base = yaml.safe_load((REPO / "configs/run/quickstart.yaml").read_text())
        base["ops"]["click_events"] = {"config": SOURCE}
        source = f"bench.pipeline's ({SOURCE}; configs/run/quickstart.yaml)"
    base["ops"].setdefault("two_tower_model", {"config": {}}).setdefault("config", {})
    # The bench reads every run's recall, including a model the gate would stop (the recipe untuned).
    base["ops"]["evaluation_metrics_quality_gate"] = {"config": {"min_lift_over_popularity": -1.0, "max_relative_drop": 1.0}}
    print_header(f"Recall@50 per seed: {' vs '.join(args.optimizers)}", "python -m bench.training_speed " + " ".join(sys.argv[1:]))
    print(f"Data and run config: {source}; the training seed and the optimizer set per run; data prepared "
          f"once, then two_tower_model, match_model, evaluation_metrics re-run per (seed, optimizer); the recipe "
          f"untuned{', with ' + ' '.join(args.recipe_set) if args.recipe_set else ''}"
          f"{'; learning rates ' + ' '.join(args.learning_rate) if args.learning_rate else ''}.\n", flush=True)

    def scale(run_config: dict, only: str, keep: bool, log_name: str) -> None:
        path = home.parent / f"quality-{log_name}.yaml"
        path.write_text(yaml.safe_dump(run_config))
        command = [PYTHON, "-m", "bench.scale", "--run-config", str(path), "--home", str(home), "--only", only]
        with open(home.parent / f"quality-{log_name}.log", "w") as log:
            completed = subprocess.run(command + (["--keep"] if keep else []), cwd=REPO, stdout=log,
                                       stderr=subprocess.STDOUT)
        if completed.returncode != 0:
            raise SystemExit(f"bench.scale failed ({log_name}): see {home.parent / f'quality-{log_name}.log'}")

    home.parent.mkdir(parents=True, exist_ok=True)
    scale(base, "click_events,split_tables,tf_datasets", keep=False, log_name="data")
    results = []
    for seed in args.seeds:
        for optimizer in args.optimizers:
            run_config = json.loads(json.dumps(base))
            model_config = run_config["ops"]["two_tower_model"]["config"]
            model_config["seed"] = seed
            model_config["tuned"] = "none"  # the recipe's own values: the optimizer is the one difference
            model_config.setdefault("optimizer", {})["name"] = optimizer  # the recipe's optimizer section
            learning_rates = dict(x.split("=") for x in args.learning_rate)
            settings = args.recipe_set + ([f"optimizer.learning_rate={learning_rates[optimizer]}"]
                                          if optimizer in learning_rates else [])
            for setting in settings:
                path, raw = setting.split("=")
                section, name = path.split(".")
                model_config.setdefault(section, {})[name] = yaml.safe_load(raw)
            load = loads()
            started = time.perf_counter()
            scale(run_config, "two_tower_model,match_model,evaluation_metrics", keep=True, log_name=f"{optimizer}-{seed}")
            wall = time.perf_counter() - started
            summary = json.loads((home / "artifacts/two_tower_model" / PARTITION / "summary.json").read_text())
            metrics = pd.read_csv(home / "artifacts/evaluation_metrics" / PARTITION / "metrics.csv")
            overall = metrics[metrics["segment"] == "all"].pivot(index="k", columns="model", values="recall")
            row = {"seed": seed, "optimizer": optimizer, "recall@50": float(overall.loc[50, "two_tower"]),
                   "popularity@50": float(overall.loc[50, "popularity"]), "epochs": summary["epochs_run"],
                   "train_s": summary["train_seconds"], "examples_per_s": summary["examples_per_second"],
                   "steps_wall_s": wall, "load": load}
            results.append(row)
            print(f"  seed {seed} {optimizer}: recall@50 {row['recall@50']:.4f} ({row['epochs']} epochs, "
                  f"{row['train_s']:.0f} s training, load {load})", file=sys.stderr, flush=True)
    print(markdown_table(
        ["seed", "optimizer", "recall@50", "popularity recall@50", "epochs", "training s", "examples/s", "load 1/5/15"],
        [[r["seed"], r["optimizer"], f"{r['recall@50']:.4f}", f"{r['popularity@50']:.4f}", r["epochs"],
          f"{r['train_s']:.0f}", f"{r['examples_per_s']:,.0f}", r["load"]] for r in results]))
    summary_rows = []
    for optimizer in args.optimizers:
        values = [r["recall@50"] for r in results if r["optimizer"] == optimizer]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        summary_rows.append([optimizer, len(values), f"{statistics.mean(values):.4f}", f"{spread:.4f}",
                             f"{min(values):.4f}..{max(values):.4f}"])
    print()
    print(markdown_table(["optimizer", "seeds", "mean recall@50", "std", "min..max"], summary_rows))
    return 0


# --------------------------------------------------------------------------------------------


def child(args: argparse.Namespace, kind: str) -> dict:
    """Run one variant (or the breakdown) in a fresh process; its JSON result."""
    command = [PYTHON, "-m", "bench.training_speed", "--child", kind, "--data", args.data]
    for name in ("users", "items", "batch_size", "embedding_size", "warmup", "steps", "seed", "breakdown_repeats"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    log = Path(args.data) / f"{kind}.log"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **ALL_VARIANTS.get(kind, ("", {}, ""))[1]}
    with open(log, "w") as out:
        completed = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=out, text=True, env=env,
                                   timeout=args.child_timeout_s)
    if completed.returncode != 0:
        raise SystemExit(f"{kind} failed (rc {completed.returncode}):\n" + log.read_text()[-3000:])
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--rows", type=int, default=819_200,
                        help="training rows: 200 batches of 4,096, so an epoch (a fifth) is the 40 steps run")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--embedding-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the timing (tracing, caches)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--rounds", type=int, default=1, help="run the variants this many times, keep each one's best")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated: {', '.join(VARIANTS)} (default), or also {', '.join(EXTRA_VARIANTS)}")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--breakdown", action="store_true", help="also time the sub-graphs of one step")
    parser.add_argument("--breakdown-repeats", type=int, default=5)
    parser.add_argument("--quality", action="store_true", help="recall@50 per seed and optimizer instead")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--optimizers", nargs="+", default=["lazy_adam", "adagrad"],
                        help="--quality: the recipe optimizers compared (lazy_adam: the product's; adagrad: TFRS's tutorials')")
    parser.add_argument("--recipe-set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE",
                        help="--quality: recipe values for every run (e.g. task.temperature=0.1 schedule.batch_size=256)")
    parser.add_argument("--learning-rate", nargs="*", default=[], metavar="OPTIMIZER=LR",
                        help="--quality: one optimizer's learning rate (e.g. adagrad=0.1 lazy_adam=0.002)")
    parser.add_argument("--run-config", help="--quality: this run config instead of bench.pipeline's data and config")
    parser.add_argument("--home", default=str(Path(tempfile.gettempdir()) / "twotower-training-speed"))
    parser.add_argument("--child-timeout-s", type=float, default=900)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = run_breakdown(args) if args.child == "breakdown" else run_variant(args.child, args)
        print(json.dumps(result))
        return 0
    if args.quality:
        return run_quality(args)

    print_header("Training speed: bare TFRS script vs the product's training code",
                 "python -m bench.training_speed " + " ".join(sys.argv[1:]))
    args.data = str(Path(args.home) / "data")
    Path(args.data).mkdir(parents=True, exist_ok=True)
    print(f"Data: {args.rows:,} rows, {args.users:,} user ids, {args.items:,} item ids (synthetic); batch "
          f"{args.batch_size}, embedding {args.embedding_size}; features: user_id and item_id only; "
          f"{args.warmup} warm-up steps, {args.steps} timed.\n", flush=True)
    started = time.perf_counter()
    make_data(Path(args.data), args.users, args.items, args.rows, seed=args.seed)
    print(f"(data written in {time.perf_counter() - started:.0f} s, load {loads()})\n", file=sys.stderr, flush=True)

    variants = args.variants.split(",")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for round_ in range(args.rounds):
        for variant in variants:
            started = time.perf_counter()
            result = child(args, variant)
            runs[variant].append(result)
            print(f"  round {round_ + 1} {variant}: {result['examples_per_s']:,.0f} examples/s, "
                  f"{result['step_ms_median']:.0f} ms/step median, steps {result['step_ms']} ms "
                  f"(load {result['load_start']} -> {result['load_end']}; process {time.perf_counter() - started:.0f} s)",
                  file=sys.stderr, flush=True)
    best = {v: max(r, key=lambda x: x["examples_per_s"]) for v, r in runs.items()}
    base = best.get(BASELINE)
    floor = step_floor(args)
    rows = []
    for variant, result in best.items():
        rows.append([
            ALL_VARIANTS[variant][0], result["optimizer"], result["allocator"], f"{result['examples_per_s']:,.0f}",
            f"{result['step_ms_median']:.0f}",
            f"{result['examples_per_s'] / base['examples_per_s']:.2f}" if base else "",
            f"{result['step_ms_median'] / floor['floor_ms']:.1f}",
            f"{result['input_only_examples_per_s']:,.0f}",
            f"{result['first_loss']:.2f} -> {result['last_loss']:.2f}", f"{result['epoch_end_s']:.1f}",
            f"{result['peak_rss_mb']:,.0f}", f"{result['load_start']} -> {result['load_end']}",
        ])
    print(markdown_table(["training", "optimizer class", "CPU allocator", "examples/s", "median ms/step", f"x {BASELINE}", "x floor",
                          "input pipeline alone, examples/s", "loss (step 1 -> last timed)", "epoch-end pause s", "peak RSS MB", "load 1/5/15 (start -> end)"],
                         rows))
    print(f"\nStep floor: {floor['floor_ms']:.0f} ms = {floor['gflop']:.1f} GFLOP at {floor['rate_gflops']:.0f} GFLOP/s "
          f"(best square float32 product now; {floor['compute_ms']:.0f} ms) + 4 passes over the {args.batch_size} x "
          f"{args.batch_size} float32 logits at {floor['bandwidth_gbs']:.1f} GB/s ({floor['traffic_ms']:.0f} ms); "
          f"load {floor['load']}")
    if args.rounds > 1:
        print("\nAll rounds (examples/s): " + "; ".join(
            f"{v}: " + ", ".join(f"{r['examples_per_s']:,.0f}" for r in rs) for v, rs in runs.items()))

    if args.breakdown:
        started = time.perf_counter()
        result = child(args, "breakdown")
        print(f"  breakdown: process {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        print(f"\nOne step's sub-graphs (product model, default optimizer, batch {args.batch_size}; median of "
              f"{args.breakdown_repeats} round-robin runs; load at the end {result['load']}); sparse gradients: "
              f"{result['sparse_gradients']}\n")
        print(markdown_table(["sub-graph", "ms"], [[k, f"{v:.1f}"] for k, v in result["timings_ms"].items()]))
        print("\njit_compile=True: " + "; ".join(f"{k}: {v}" for k, v in result["jit_compile"].items()))

    if base and "product" in best:
        print(f"\nproduct step / floor: {best['product']['step_ms_median'] / floor['floor_ms']:.1f}")
        print(f"\nspeedup_vs_tfrs: {best['product']['examples_per_s'] / base['examples_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
