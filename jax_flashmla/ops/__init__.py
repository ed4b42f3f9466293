"""The library's ops, one module each, every rule of an op side by side: its primitives' abstract
evaluation, lowering per platform, batching, differentiation and partitioning.

- metadata: the split plan of the tile scheduler (get_mla_metadata).
- decode: the dense MLA decode (flash_mla_with_kvcache) and its custom VJP.
- decode_bwd: the decode's memory-bounded pure-JAX backward, as a partitioned op.
- sparse_decode: the sparse MLA decode over an FP8 token pool (flash_mla_with_kvcache with indices).
- sparse_prefill: the sparse MLA prefill over a bf16 kv (flash_mla_sparse_fwd).
- sparse_prefill_bwd: the sparse prefill's memory-bounded pure-JAX backward (dq, dkv, d_sink).
- indexer_logits: the lightning indexer's decode logits (DeepGEMM's fp8_paged_mqa_logits), fused on
  SM90; the indexer's pure-JAX operations are in jax_flashmla.indexer.
- indexer_topk: the decode logits' top-k, with an opt-in SM90 kernel.

They share the contract (_contract), the extension (_ffi), the per-platform choice (_platform) and
the partitioning pieces (_partition). The public functions are in jax_flashmla.api.
"""
