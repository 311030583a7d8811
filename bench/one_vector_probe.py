"""A plain-TensorFlow probe of one-vector-per-user model shapes on MovieLens 100K (issue 16).

Not the product's towers: a fast (20-70 s a run) search of the design space before porting a
shape to ``twotower_assets.model``. The same tutorial split and the product's evaluation
(per test user, full catalogue, training movies removed) as bench/movielens.py, whose helpers
it imports; EASE there scores recall@100 0.6995, NDCG@10 0.4459.

Models (user-level training, Adam; early stopping on the validation slice, every --every epochs,
by recall@100 + NDCG@10, then a refit on all training ratings for that many epochs):

* ``AutoencoderShape`` (default): Mult-DAE (Liang et al. 2018): the user's training movies as an
  L2-normalised multi-hot vector -> Dense(--hidden, --act) [-> Dense(--emb)] = the user vector;
  the item vectors are an embedding table; score = dot (or cosine / --temp with --norm) + a
  learned item bias (--bias).
* ``ProductShape`` (--product): the product's layout: one id embedding (--idemb) shared by the
  history pooling (sum / sqrt(n)) and the item tower, Dense(2E) -> Dense(E) heads on both towers
  (``--userhead one``: one Dense(E) on the user side; ``--itemhead 0``: none on the item side, the
  product's ``dense_tanh`` / ``none`` heads), unit vectors, cosine / --temp + item bias
  (``--bias_in_temp``: (cosine + bias) / --temp, what the product's vectors score).

--target: ``all`` (Mult-DAE: dropout on the input, loss on every training movie), ``held``
(a random half of the movies is the input, the loss is on the other half), ``held_masked``
(and the input movies are left out of the softmax), ``held_allmasked`` (every training movie but
the target is left out: what the product's exact softmax with a history does).

Stop 26's levers (``--product``): ``--userres`` adds the pooled history to the user head's output
(an identity shortcut; ``--resproj``: through a Dense(E) that starts as the identity), ``--ema M``
evaluates and keeps a moving average of the weights (momentum M per step, starting after the
first step), ``--vae BETA`` makes the user vector Mult-VAE's Gaussian sample with a KL term.

--rows ratings: steps of --batch (user, movie) pairs instead of users, the input the user's other
movies with --dropout and all of them out of the softmax: the product's rating-level rows.

    .venv/bin/python bench/one_vector_probe.py --emb 0 --target held_masked --norm --temp 0.2
"""
import sys, time, argparse
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent)); sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np
import twotower_assets  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import movielens as ml
import tensorflow as tf
from twotower_assets.model import metrics, topk

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k")
p.add_argument("--hidden", type=int, default=600)
p.add_argument("--emb", type=int, default=200)
p.add_argument("--dropout", type=float, default=0.5)
p.add_argument("--l2", type=float, default=0.0, help="L2 penalty on the weights (--product: the id table and the user head's first layer)")
p.add_argument("--epochs", type=int, default=200)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--batch", type=int, default=64)
p.add_argument("--norm", action="store_true", help="cosine / temperature")
p.add_argument("--temp", type=float, default=0.1)
p.add_argument("--bias", type=int, default=1)
p.add_argument("--act", default="tanh")
p.add_argument("--pool", default="sum_l2", help="input normalisation: sum_l2 (Mult-DAE) or mean")
p.add_argument("--seed", type=int, default=42)
p.add_argument("--every", type=int, default=2)
p.add_argument("--target", default="all", help="all (Mult-DAE) | held | held_masked | held_allmasked")
p.add_argument("--product", action="store_true", help="product shape: shared id emb, MLP heads on both towers")
p.add_argument("--idemb", type=int, default=64)
p.add_argument("--untied", action="store_true")
p.add_argument("--itemhead", type=int, default=1, help="product shape: 1 = the item tower has the user tower's head, 0 = none")
p.add_argument("--userhead", default="mlp", help="product shape: mlp (Dense(2E, act) -> Dense(E)) or one (Dense(E, act))")
p.add_argument("--kept_weight", type=float, default=0.0)
p.add_argument("--bias_in_temp", action="store_true", help="product shape: (cosine + bias) / temp, as the product's vectors give")
p.add_argument("--rows", default="users", help="users: a step is --batch users (loss by --target); ratings: --batch "
               "(user, movie) pairs, the input the user's other movies with --dropout, every one of them out of the "
               "softmax (the product's rating-level rows with training history 'others')")
p.add_argument("--userres", action="store_true", help="product shape: the user vector adds the pooled history to the head's output (a linear path)")
p.add_argument("--resproj", action="store_true", help="with --userres: the linear path is a Dense(E) (identity at start), not the identity")
p.add_argument("--vae", type=float, default=0.0, help="product shape: Mult-VAE's stochastic user vector, KL weight beta")
p.add_argument("--ema", type=float, default=0.0, help="evaluate with an exponential moving average of the weights (decay)")
a = p.parse_args()
L2 = tf.keras.regularizers.l2(a.l2) if a.l2 else None  # --l2, shared by both shapes
tf.random.set_seed(a.seed); np.random.seed(a.seed)
split = ml.tutorial_split(a.data, 0.1)
index = ml.Index(split)
n_items = len(index.item_ids)

def evaluate(user_vecs, item_vecs, bias, train_m, test_frame):
    test_users = index.users(test_frame)
    eval_users = np.unique(test_users)
    relevant = index.matrix(test_frame)[eval_users]
    exclude = train_m[eval_users]
    q = np.hstack([user_vecs[eval_users], np.ones((len(eval_users), 1), np.float32)])
    it = np.hstack([item_vecs, bias[:, None]])
    rec = topk.top_k_items(q, it, 100, exclude=exclude)
    pop = np.asarray((train_m > 0).sum(axis=0)).ravel() / train_m.shape[0]
    f = metrics.evaluate_recommenders({"m": rec}, relevant, pop, (10, 100))
    f = f[f.segment == "all"].set_index("k")
    return f.loc[100, "recall"], f.loc[10, "ndcg"]

class ProductShape(tf.keras.Model):
    def __init__(s):
        super().__init__()
        E = a.emb
        s.ids = tf.keras.layers.Embedding(n_items, a.idemb, embeddings_regularizer=L2)
        s.ids.build((None,))
        s.hist = tf.keras.layers.Embedding(n_items, a.idemb, embeddings_regularizer=L2) if a.untied else s.ids
        s.hist.build((None,))
        if a.userhead == "one":
            s.uh = tf.keras.layers.Dense(E, activation=a.act, kernel_regularizer=L2); s.up = tf.identity
        else:
            s.uh = tf.keras.layers.Dense(2 * E, activation=a.act, kernel_regularizer=L2); s.up = tf.keras.layers.Dense(E)
        s.ih = tf.keras.layers.Dense(2 * E, activation=a.act); s.ip = tf.keras.layers.Dense(E)
        s.logvar = tf.keras.layers.Dense(E) if a.vae else None
        s.skip = (tf.keras.layers.Dense(E, use_bias=False, kernel_initializer="identity", kernel_regularizer=L2)
                  if a.resproj else tf.identity)
        s.b = tf.Variable(tf.zeros([n_items]))
        s.drop = tf.keras.layers.Dropout(a.dropout)
    def user(s, x, training=False, sample=False):
        x = s.drop(x, training=training)
        n = tf.reduce_sum(x, 1, keepdims=True)
        pooled = tf.matmul(x, s.hist.embeddings) / tf.sqrt(tf.maximum(n, 1.0))
        u = s.up(s.uh(pooled))
        if a.userres:
            u = u + s.skip(pooled)
        if s.logvar is not None:
            lv = s.logvar(pooled)
            s.kl = a.vae * tf.reduce_mean(tf.reduce_sum(-0.5 * (1 + lv - tf.square(u) - tf.exp(lv)), 1))
            if training or sample:
                u = u + tf.random.normal(tf.shape(u)) * tf.exp(0.5 * lv)
        return tf.math.l2_normalize(u, 1)
    def item_vecs(s):
        e = s.ids(tf.range(n_items))
        v = s.ip(s.ih(e)) if a.itemhead else e
        return tf.math.l2_normalize(v, 1)
    def logits(s, x, training=False, sample=False):
        l = tf.matmul(s.user(x, training, sample), s.item_vecs(), transpose_b=True)
        if a.bias and a.bias_in_temp:
            return (l + s.b) / a.temp
        return l / a.temp + s.b if a.bias else l / a.temp

class AutoencoderShape(tf.keras.Model):
    def __init__(s):
        super().__init__()
        s.inp = tf.keras.layers.Dense(a.hidden, activation=a.act, kernel_regularizer=L2)
        s.out = tf.keras.layers.Dense(a.emb, kernel_regularizer=L2) if a.emb else None
        s.items = tf.keras.layers.Embedding(n_items, a.emb or a.hidden, embeddings_regularizer=L2)
        s.b = tf.Variable(tf.zeros([n_items]))
        s.drop = tf.keras.layers.Dropout(a.dropout)
    def user(s, x, training=False):
        x = s.drop(x, training=training)
        if a.pool == "sum_l2":
            x = tf.math.l2_normalize(x, axis=1)
        else:
            x = x / tf.maximum(tf.reduce_sum(x, 1, keepdims=True), 1.0)
        h = s.inp(x)
        u = s.out(h) if s.out is not None else h
        return tf.math.l2_normalize(u, 1) if a.norm else u
    def item_vecs(s):
        v = s.items(tf.range(n_items))
        return tf.math.l2_normalize(v, 1) if a.norm else v
    def logits(s, x, training=False):
        u = s.user(x, training); v = s.item_vecs()
        l = tf.matmul(u, v, transpose_b=True)
        if a.norm: l = l / a.temp
        if a.bias: l = l + s.b
        return l

def training_loss(m, x):
    """The mean over users of --target's negative log-likelihood (see the module docstring)."""
    if a.target == "all":
        return -tf.reduce_mean(tf.reduce_sum(tf.nn.log_softmax(m.logits(x, True)) * x, 1))
    keep = tf.cast(tf.random.uniform(tf.shape(x)) >= a.dropout, tf.float32)
    x_in = x * keep
    held_out = x * (1 - keep)
    l = m.logits(x_in, False, sample=True) if a.product else m.logits(x_in, False)
    if a.target == "held_allmasked":
        # Per held-out movie: its softmax over itself and the movies the user does not have.
        e = tf.exp(l - tf.reduce_max(l, 1, keepdims=True))
        unseen = tf.reduce_sum(e * (1 - x), 1, keepdims=True)
        logp = tf.math.log(e + 1e-30) - tf.math.log(e + unseen)
        return -tf.reduce_mean(tf.reduce_sum(logp * held_out, 1))
    if a.target == "held_masked":
        l = tf.where(x_in > 0, -1e9 * tf.ones_like(l), l)
    weights = held_out + a.kept_weight * x_in
    return -tf.reduce_mean(tf.reduce_sum(tf.nn.log_softmax(l) * weights, 1))


def rating_loss(m, x, positives):
    """The product's rating-level loss: the user's other movies (dropout) in, all of them out of the softmax."""
    positive = tf.one_hot(positives, n_items)
    others = x * (1 - positive)
    keep = tf.cast(tf.random.uniform(tf.shape(x)) >= a.dropout, tf.float32)
    l = m.logits(others * keep, False)
    l = tf.where(others > 0, -1e9 * tf.ones_like(l), l)
    return -tf.reduce_mean(tf.reduce_sum(tf.nn.log_softmax(l) * positive, 1))


def vectors(m, X, shadow):
    """User vectors, item vectors and item biases; with --ema, from the weights' moving average."""
    saved = [v.numpy() for v in m.trainable_variables]
    if shadow:
        for v, avg in zip(m.trainable_variables, shadow):
            v.assign(avg)
    u = m.user(tf.constant(X)).numpy(); v = m.item_vecs().numpy()
    b = m.b.numpy() if a.bias else np.zeros(n_items, np.float32)
    for v_, old in zip(m.trainable_variables, saved):
        v_.assign(old)
    return u, v, b


def run(train_frame, epochs, val_frame=None):
    X = index.matrix(train_frame).toarray().astype(np.float32)
    m = ProductShape() if a.product else AutoencoderShape(); opt = tf.keras.optimizers.Adam(a.lr)
    @tf.function
    def step(x, positives=None):
        """One Adam step: user rows (--target's loss), or rating rows when ``positives`` is given."""
        with tf.GradientTape() as t:
            loss = (training_loss(m, x) if positives is None else rating_loss(m, x, positives)) + sum(m.losses)
            if a.vae:
                loss += m.kl
        g = t.gradient(loss, m.trainable_variables); opt.apply_gradients(zip(g, m.trainable_variables))
        return loss
    shadow = []
    @tf.function
    def average():
        for avg, v in zip(shadow, m.trainable_variables):
            avg.assign(a.ema * avg + (1 - a.ema) * v)
    pair_users, pair_items = index.users(train_frame), index.items(train_frame)
    best = (-1, 0)
    for e in range(epochs):
        if a.rows == "ratings":
            perm = np.random.permutation(len(pair_users))
            for i in range(0, len(perm), a.batch):
                rows = perm[i:i + a.batch]
                step(tf.constant(X[pair_users[rows]]), tf.constant(pair_items[rows]))
        else:
            perm = np.random.permutation(len(X))
            for i in range(0, len(X), a.batch):
                step(tf.constant(X[perm[i:i+a.batch]]))
                if a.ema:
                    if not shadow:
                        shadow.extend(tf.Variable(v) for v in m.trainable_variables)
                    average()
        if val_frame is not None and (e + 1) % a.every == 0:
            r, n = evaluate(*vectors(m, X, shadow), index.matrix(train_frame), val_frame)
            print(f"  epoch {e+1}: val recall@100 {r:.4f} ndcg@10 {n:.4f}", flush=True)
            if r + n > best[0]: best = (r + n, e + 1)
    return m, X, best[1], shadow

t0 = time.time()
_, _, best_e, _ = run(split.fit, a.epochs, split.validation)
m, X, _, shadow = run(split.train, best_e)
train_m = index.matrix(split.train)
r, n = evaluate(*vectors(m, X, shadow), train_m, split.test)
seconds = time.time() - t0
# The baseline, in the same run: EASE with its regulariser tuned as bench/movielens.py does.
ease_lambda, _ = ml.tune_ease(split, index)
ease_r, ease_n = evaluate(train_m.toarray(), ml.ease_weights(train_m, ease_lambda).T, np.zeros(n_items, np.float32),
                          train_m, split.test)
print(f"RESULT {vars(a)} best_epoch {best_e} test recall@100 {r:.4f} ndcg@10 {n:.4f} ({seconds:.0f}s)")
print("| model | recall@100 | NDCG@10 | recall@100 / EASE | NDCG@10 / EASE |\n|---|---:|---:|---:|---:|")
print(f"| probe | {r:.4f} | {n:.4f} | {r / ease_r:.3f} | {n / ease_n:.3f} |")
print(f"| EASE (lambda {ease_lambda:g}) | {ease_r:.4f} | {ease_n:.4f} | 1.000 | 1.000 |")
