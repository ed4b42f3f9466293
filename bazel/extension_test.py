"""Smoke test of the Bazel build: the extension Bazel built is the one imported, it was built with
or without the CUDA kernels as the BUILD file decided, and its CPU handlers decode correctly.

Arguments: --expect-cuda or --expect-no-cuda (set by //:extension_test from @jfm_cuda).
"""

import os
import sys
import unittest

sys.dont_write_bytecode = True

EXPECT_CUDA = None


class BazelExtensionTest(unittest.TestCase):
    def test_extension_is_the_bazel_output(self):
        from jax_flashmla import _ext

        path = os.path.realpath(_ext.__file__)
        self.assertIn(f"{os.sep}bazel-out{os.sep}", path)
        self.assertTrue(path.endswith(os.path.join("jax_flashmla", "_ext.so")), path)

    def test_cuda_kernels_as_configured(self):
        from jax_flashmla import _ext, _extension

        self.assertEqual(bool(_ext.built_with_cuda()), EXPECT_CUDA)
        self.assertEqual(_extension.HAS_CUDA_KERNELS, EXPECT_CUDA)
        self.assertEqual(set(_ext.cpu_targets()), {"jax_flashmla_metadata", "jax_flashmla_decode"})

    def test_host_scheduler(self):
        import numpy as np
        from jax_flashmla import _ext

        seqlens = np.array([1, 64, 300, 1000], dtype=np.int32)
        tile_md, num_splits = _ext.schedule_tiles(seqlens, 8)
        self.assertEqual(tile_md.shape, (8, 8))
        self.assertEqual(num_splits.shape, (5,))
        self.assertEqual(num_splits[0], 0)
        self.assertTrue(np.all(np.diff(num_splits) >= 1))

    def test_cpu_decode_matches_reference(self):
        import jax
        import jax.numpy as jnp
        import numpy as np
        import jax_flashmla as jfm

        batch, s_q, h_q, h_kv, pages = 3, 2, 16, 1, 4
        seqlens = jnp.array([5, 130, 256], dtype=jnp.int32)
        keys = jax.random.split(jax.random.PRNGKey(0), 2)
        q = jax.random.normal(keys[0], (batch, s_q, h_q, jfm.HEAD_DIM), jnp.float32).astype(jnp.bfloat16)
        k_cache = jax.random.normal(keys[1], (batch * pages, jfm.PAGE_SIZE, h_kv, jfm.HEAD_DIM),
                                    jnp.float32).astype(jnp.bfloat16)
        block_table = jnp.arange(batch * pages, dtype=jnp.int32).reshape(batch, pages)[:, ::-1]

        tile_md, num_splits = jfm.get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv)
        decode = jax.jit(jfm.flash_mla_with_kvcache, static_argnames=("head_dim_v", "causal"))
        out, lse = decode(q, k_cache, block_table, seqlens, jfm.HEAD_DIM_V, tile_md, num_splits, causal=True)
        ref_out, ref_lse = jfm.mla_decode_reference(q, k_cache, block_table, seqlens, jfm.HEAD_DIM_V, causal=True)

        self.assertEqual(jfm.kernel_path("cpu"), jfm.kernel_path())
        self.assertEqual(out.shape, (batch, s_q, h_q, jfm.HEAD_DIM_V))
        self.assertEqual(lse.shape, (batch, h_q, s_q))
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32), atol=2e-2, rtol=2e-2)
        np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=1e-3, rtol=1e-4)


if __name__ == "__main__":
    flags = {"--expect-cuda": True, "--expect-no-cuda": False}
    chosen = [a for a in sys.argv[1:] if a in flags]
    if len(chosen) != 1:
        sys.exit("usage: extension_test.py --expect-cuda|--expect-no-cuda")
    EXPECT_CUDA = flags[chosen[0]]
    unittest.main(argv=[sys.argv[0]] + [a for a in sys.argv[1:] if a not in flags])
