"""Hash routing: a fixed, non-learned map from token ids to experts."""

import keras
import numpy as np
from keras import ops

from keras_moe.layers import _routing_ids
from keras_moe.utils import validation as check
from keras_moe.layers.routers.base import Router, RoutingResult
from keras_moe.ops import selection

# The arithmetic hash works in int32 without overflow: every product below
# stays under 2**31 (65536 * P < 2**31 and 2 * P**2 < 2**31).
_PRIME = 32749  # the largest prime below 2**15
_INT32_MAX = 2147483647


def balanced_hash_table(vocab_size, num_experts, k, seed):
    """A random `(vocab_size, k)` table of `k` distinct experts per id in
    which every expert holds the same number of (id, slot) pairs, within 1.

    The `vocab_size * k` (id, slot) pairs, ids in a seeded random order, are
    dealt to the experts in blocks of `L = lcm(E, k)` pairs; each block
    deals over its own random permutation of the experts, repeated `L / E`
    times. An id's `k` slots are `k` consecutive pairs of one block (`L` is
    a multiple of `k`), so `k` cyclically consecutive entries of one
    permutation: distinct, as `k <= E`. A full block gives every expert
    `L / E` pairs and the last, partial one at most one more to some, so the
    loads differ by at most 1. For `k = 1` this is round-robin over a random
    expert order in each cycle of `E` ids. No loop over ids: a table of
    millions of ids builds in a fraction of a second (issue 32: the
    previous per-id loop took 9 s per million ids on every load).
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(vocab_size)
    block = int(np.lcm(num_experts, k))
    pairs = vocab_size * k
    num_blocks = -(-pairs // block)
    permutations = np.argsort(
        rng.random((num_blocks, num_experts), dtype="float32"), axis=1
    ).astype("int32")
    experts = np.tile(permutations, (1, block // num_experts)).reshape(-1)[:pairs]
    table = np.empty((vocab_size, k), "int32")
    table[order] = experts.reshape(vocab_size, k)
    return table


def remap_hash_table(table, kept, k):
    """A `(V, k)` hash table for the experts `kept` only.

    Each id keeps its kept experts (renumbered: `kept[i]` becomes `i`, in
    the id's order); a slot that pointed to a dropped expert takes the
    least loaded kept expert that the id does not hold yet (loads counted
    over the whole table, ties to the lower index), so the new table stays
    nearly balanced. With `k < table.shape[1]` each id keeps its first `k`
    kept experts.
    """
    table = np.asarray(table)
    count = len(kept)
    size = max(int(table.max(initial=0)), max(kept)) + 1
    lookup = np.full(size, -1, "int64")
    lookup[list(kept)] = np.arange(count)
    mapped = lookup[table]
    out = np.zeros((table.shape[0], k), "int32")
    load = np.bincount(mapped[mapped >= 0], minlength=count).astype("int64")
    for row, experts in enumerate(mapped):
        chosen = [int(e) for e in experts if e >= 0][:k]
        if len(chosen) < k:
            for e in np.argsort(load, kind="stable"):
                if len(chosen) == k:
                    break
                if int(e) not in chosen:
                    chosen.append(int(e))
                    load[e] += 1
        out[row] = chosen
    return out


@keras.saving.register_keras_serializable(package="keras_moe")
class HashRouter(Router):
    """Hash router: each token id goes to a fixed set of `k` experts.

    Hash layers (Roller et al. 2021) replace the learned router by a fixed
    function of the token id, `I(id) = hash(id)`, a set of `k` distinct
    experts. Nothing is learned, nothing needs balancing, and the same id
    always goes to the same experts (in training, inference, after saving):

    `expert_index = I(id)`, `combine_weights = 1/k`,
    `probs[e] = 1/k if e in I(id) else 0`.

    - With `vocab_size`: a random balanced table `(vocab_size, k)` built
      from `seed` (every expert gets the same number of (id, slot) pairs,
      within 1; Roller et al.'s "random hash"), stored as a non-trainable
      weight so that it is saved with the model. Ids outside
      `[0, vocab_size)` are wrapped: `id mod vocab_size`.
    - Without `vocab_size`: an arithmetic hash of any int32 id (multiplicative
      hashing modulo the prime `P = 32749` with seeded constants, then a
      seeded non-linear score per expert); the `k` experts with the highest
      scores are taken, so they are distinct. Loads are balanced on average
      over many ids, not exactly.

    Call it with one integer id per token: `router(tokens,
    routing_inputs=ids)`; `SparseMoE(router=HashRouter(...))` takes
    `routing_inputs=` (one id per token or per example) and passes them on.
    The tokens only give the shape: routing ignores their values.

    Args:
        num_experts: `E`.
        k: experts per token, `1 <= k <= E`.
        vocab_size: number of ids for a balanced table, or `None` for the
            arithmetic hash.
        seed: seed of the table or of the hash constants (a Python int).
        **kwargs: base `Layer` arguments; `dtype` defaults to `"float32"`.

    Call arguments:
        inputs: `(..., d)` tokens.
        routing_inputs: `(...)` integer ids, one per token (int32 range).
        training: unused (routing is the same in training and inference).
        mask: accepted for the router contract; unused (no loss to mask).

    Returns:
        A `RoutingResult` with `expert_index` `(..., k)` int32, `combine_weights`
        `(..., k)` (all `1/k`), `probs` `(..., E)` and `load_balance_loss`
        (always 0).

    Example:

    >>> import keras
    >>> import numpy as np
    >>> router = HashRouter(num_experts=4, k=2, vocab_size=100, seed=0)
    >>> ids = np.array([3, 7, 3], "int32")
    >>> routing = router(np.zeros((3, 8), "float32"), routing_inputs=ids)
    >>> index = keras.ops.convert_to_numpy(routing["expert_index"])
    >>> index.shape, bool((index[0] == index[2]).all())
    ((3, 2), True)

    References:
        Roller, Sukhbaatar, Szlam, Weston. Hash Layers For Large Sparse
        Models (NeurIPS 2021).
    """

    needs_routing_inputs = True
    routing_fields = ("load_balance_loss",)

    def __init__(self, num_experts, k=1, vocab_size=None, seed=0, **kwargs):
        super().__init__(num_experts, k=k, **kwargs)
        self.vocab_size = (
            None
            if vocab_size is None
            else check.positive_int("vocab_size", vocab_size, maximum=check.MAX_VOCAB)
        )
        self.seed = check.non_negative_int("seed", seed, maximum=check.MAX_SEED)
        rng = np.random.default_rng([self.seed, 0x4A5E])
        consts = rng.integers(1, _PRIME, size=6)
        self._hash_consts = [int(c) for c in consts]
        self._expert_offsets = rng.integers(0, _PRIME, size=self.num_experts).astype(
            "int32"
        )

    def build(self, input_shape):
        if self.built:  # e.g. deserialized built, then built again by SparseMoE
            return
        check.token_input_shape(type(self).__name__, input_shape)
        if self.vocab_size is not None:
            table = balanced_hash_table(
                self.vocab_size, self.num_experts, self.k, self.seed
            )
            self.table = self.add_weight(
                name="table",
                shape=(self.vocab_size, self.k),
                initializer=lambda shape, dtype=None: ops.convert_to_tensor(
                    table, dtype="int32"
                ),
                dtype="int32",
                trainable=False,
            )
        else:
            self.table = None

    def _hash(self, ids):
        """`(...)` int32 ids -> `(..., k)` distinct experts."""
        p = _PRIME
        a1, a2, c1, c2, a3, c3 = self._hash_consts
        x = ops.mod(ids, _INT32_MAX)  # >= 0
        lo = ops.mod(x, 65536)
        hi = ops.floor_divide(x, 65536)  # < 2**15
        h = ops.mod(ops.mod(lo * a1, p) + ops.mod(hi * a2, p) + c1, p)
        offsets = ops.convert_to_tensor(self._expert_offsets, dtype="int32")
        u = ops.mod(ops.expand_dims(h, -1) + offsets, p)
        v = ops.mod(u * (u + c2), p)
        w = ops.mod(v * a3 + c3, p)
        score = ops.mod(w * (w + c2), p)
        _, index = selection.top_k(ops.cast(score, "float32"), self.k)
        return index

    def call(self, inputs, routing_inputs=None, training=None, mask=None):
        _routing_ids.require_ids(self, inputs, routing_inputs)
        ids = _routing_ids.as_int32(routing_inputs)
        if self.table is not None:
            ids = ops.mod(ids, self.vocab_size)
            expert_index = ops.take(ops.convert_to_tensor(self.table), ids, axis=0)
        else:
            expert_index = self._hash(ids)
        expert_index = ops.cast(expert_index, "int32")
        fraction = 1.0 / self.k
        combine_weights = fraction * ops.ones_like(
            expert_index, dtype=self.compute_dtype
        )
        probs = fraction * ops.sum(
            ops.one_hot(expert_index, self.num_experts, dtype=self.compute_dtype),
            axis=-2,
        )
        return RoutingResult(
            expert_index=expert_index,
            combine_weights=combine_weights,
            probs=probs,
            load_balance_loss=ops.zeros((), dtype=self.compute_dtype),
        )

    def expert_table(self, ids):
        """The experts of each id, `(..., k)` int32 NumPy (for inspection)."""
        ids = np.asarray(ids)
        dummy = np.zeros(ids.shape + (1,), "float32")
        return ops.convert_to_numpy(self(dummy, routing_inputs=ids)["expert_index"])

    def pruned_config(self, kept):
        """This router's config for the experts `kept` only (a sorted list
        of old indices): `num_experts = len(kept)`, `k = min(k, len(kept))`.

        Only a table router (`vocab_size` given) can be pruned: the
        arithmetic hash spreads ids over all `E` experts by a formula, with
        no table to point elsewhere, so it raises a `ValueError`.
        """
        if self.vocab_size is None:
            raise ValueError(
                f"HashRouter {self.name!r} has no table (vocab_size=None): its "
                "arithmetic hash sends ids to every one of the "
                f"{self.num_experts} experts and cannot be remapped to fewer. "
                "Use a HashRouter with a vocab_size table to prune."
            )
        return super().pruned_config(kept)

    def copy_pruned_weights(self, source, kept):
        """Remaps `source`'s table (see `remap_hash_table`): an id whose
        experts are all kept keeps them (renumbered); a slot of a dropped
        expert goes to the least loaded kept expert."""
        table = ops.convert_to_numpy(source.table)
        self.table.assign(remap_hash_table(table, kept, self.k))

    def get_config(self):
        config = super().get_config()
        config.update(
            vocab_size=self.vocab_size,
            seed=self.seed,
        )
        return config
