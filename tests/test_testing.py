"""jax_flashmla.testing, the problem generator of the tests and the benchmark: the hard cases it
promises are really in the problems it makes."""

import numpy as np
import pytest

import jax_flashmla as jfm
from jax_flashmla import testing


def test_varlen_lengths_follow_normal_s_k_and_respect_the_minimum():
    lengths = testing.varlen_lengths(np.random.default_rng(0), 4096, 1000, min_len=2)
    assert lengths.dtype == np.int32 and lengths.min() >= 2
    assert abs(lengths.mean() - 1000) < 40 and (lengths == 2).any()  # the clipped tail of Normal(1000, 500)


def test_problem_shuffles_pages_and_poisons_every_slot_no_request_reads():
    rng = np.random.default_rng(1)
    lengths = [0, 1, 130, 64]
    p = testing.make_problem(rng, batch=4, seqlen_q=2, num_heads_q=4, num_heads_k=2, lengths=lengths,
                             spare_pages=3, max_blocks=4)
    assert p.q.shape == (4, 2, 4, jfm.HEAD_DIM) and p.k_cache.shape[1:] == (jfm.PAGE_SIZE, 2, jfm.HEAD_DIM)
    k = np.asarray(p.k_cache, np.float32)
    assert p.k_cache.shape[0] == 1 + 3 + 1 + 3  # the pages in use and the spare ones
    read = np.zeros(k.shape[:2], bool)
    for i, n in enumerate(lengths):
        for j in range(-(-n // jfm.PAGE_SIZE)):
            read[p.block_table[i, j], : min(jfm.PAGE_SIZE, n - j * jfm.PAGE_SIZE)] = True
        assert (p.block_table[i, -(-n // jfm.PAGE_SIZE):] == -1).all()  # padding
    assert np.isfinite(k[read]).all() and np.isnan(k[~read]).all()
    assert (~read).any(axis=1).sum() >= 3 + 2  # whole unused pages and the tails past 1 and 130


def test_shards_take_pages_from_their_own_slice_and_garbage_pads():
    p = testing.make_problem(np.random.default_rng(2), batch=4, seqlen_q=1, num_heads_q=2, num_heads_k=1,
                             lengths=[100, 0, 64, 129], shards=2, num_blocks=12, max_blocks=3, pad=testing.GARBAGE)
    pages = [2, 0, 1, 3]
    for i, n in enumerate(pages):
        lo = (i // 2) * 6
        assert ((p.block_table[i, :n] >= lo) & (p.block_table[i, :n] < lo + 6)).all()
    garbage = np.concatenate([p.block_table[i, n:] for i, n in enumerate(pages)])
    assert ((garbage < 0) | (garbage >= 12)).mean() > 0.9  # almost all point outside the pool


def test_without_poison_every_column_holds_a_page_of_finite_values():
    p = testing.make_problem(np.random.default_rng(3), batch=2, seqlen_q=1, num_heads_q=2, num_heads_k=1,
                             lengths=[10, 64], poison=False, pages=3, max_blocks=3)
    assert sorted(p.block_table.ravel()) == list(range(6))
    assert np.isfinite(np.asarray(p.k_cache, np.float32)).all()


def test_a_pool_too_small_is_refused():
    with pytest.raises(AssertionError, match="too small"):
        testing.page_layout(np.random.default_rng(0), [200, 200], num_blocks=4)


def test_device_cache_poisons_on_the_device():
    import jax
    import jax.numpy as jnp
    layout = testing.page_layout(np.random.default_rng(4), [70, 5], pad=0, spare_pages=1)
    cache = np.asarray(testing.device_cache(jax.random.PRNGKey(0), layout.num_blocks, 1, jnp.bfloat16,
                                            layout.slot_valid), np.float32)
    assert np.isfinite(cache[layout.slot_valid]).all() and np.isnan(cache[~layout.slot_valid]).all()
