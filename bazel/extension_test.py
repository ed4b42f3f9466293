"""Smoke test of the Bazel build itself: the extension imported is the one Bazel built, and it was
built with or without the CUDA kernels as the BUILD file decided. (The decode itself is tested by
tests/, which the pytest_suite targets run against the same extension.)

Arguments: --expect-cuda or --expect-no-cuda (set by //:extension_test from @jfm_cuda).
"""

import sys
import unittest

sys.dont_write_bytecode = True

from pytest_runner import check_bazel_extension  # noqa: E402  (beside this file)

EXPECT_CUDA = None


class BazelExtensionTest(unittest.TestCase):
    def test_extension_is_the_bazel_output(self):
        path = check_bazel_extension()
        self.assertTrue(path.endswith("/jax_flashmla/_ext.so"), path)

    def test_cuda_kernels_as_configured(self):
        from jax_flashmla import _ext, _ffi

        self.assertEqual(bool(_ext.built_with_cuda()), EXPECT_CUDA)
        self.assertEqual(_ffi.HAS_CUDA_KERNELS, EXPECT_CUDA)
        ops = {_ffi.METADATA_TARGET, _ffi.DECODE_TARGET, _ffi.SPARSE_DECODE_TARGET, _ffi.SPARSE_PREFILL_TARGET}
        self.assertEqual(set(_ext.cpu_targets()), ops)
        # The sparse prefill's backward and the indexer's logits and top-k have a CUDA kernel only
        # (elsewhere they are pure JAX).
        cuda_ops = ops | {_ffi.SPARSE_PREFILL_BWD_TARGET, _ffi.INDEXER_LOGITS_TARGET, _ffi.INDEXER_TOPK_TARGET}
        self.assertEqual(set(_ext.cuda_targets()), cuda_ops if EXPECT_CUDA else set())


if __name__ == "__main__":
    flags = {"--expect-cuda": True, "--expect-no-cuda": False}
    chosen = [a for a in sys.argv[1:] if a in flags]
    if len(chosen) != 1:
        sys.exit("usage: extension_test.py --expect-cuda|--expect-no-cuda")
    EXPECT_CUDA = flags[chosen[0]]
    unittest.main(argv=[sys.argv[0]] + [a for a in sys.argv[1:] if a not in flags])
