"""The sparse prefill (flash_mla_sparse_fwd) under jit with named shardings: partitioned, not gathered.

Forward: head-parallel (q and attn_sink split on h_q), token-parallel (q, indices and topk_length split
on s_q), both on a 2-D mesh, optional operands absent, the batched form and vmap; every result equals
the unsharded call's element for element (each device runs the same CPU handler on its own tokens and
heads) and the compiled module holds no collective, one custom call over the local shapes. Other
shardings (kv split, channels or topk split, sizes the mesh does not divide) give the same result.
Gradient: dq split like q, and the only collectives are the float32 all-reduces of dkv and d_sink;
NaN in unread kv rows stays out of it; a second derivative goes through the backward's JVP.

tests/conftest.py gives the CPU 8 host devices; with fewer devices a test is skipped."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_flashmla as fm
from jax_flashmla import _ffi
from mla_cases import gspmd_partitioner, mesh_of, place
from sparse_cases import assert_close
from prefill_cases import SCALE, make_case

NAMES = ("q", "kv", "indices", "topk_length", "attn_sink")


def sparse(call):
    return fm.flash_mla_sparse_fwd(call["q"], call["kv"], call["indices"], SCALE, attn_sink=call.get("attn_sink"),
                                   topk_length=call.get("topk_length"))


SPARSE = jax.jit(sparse)


def assert_same(got, want):
    for name, g, w in zip(("out", "max_logits", "lse"), got, want):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32), err_msg=name)


def collectives(hlo):
    return re.findall(r"\b(?:all-gather|all-to-all|all-reduce|collective-permute|reduce-scatter)(?:-start)?\([^\n]*",
                      hlo)


def local_operand_shapes(hlo):
    """The operand shapes of the (single) sparse prefill custom call in a compiled module: what one
    device holds."""
    calls = [line for line in hlo.splitlines() if f'custom_call_target="{_ffi.SPARSE_PREFILL_TARGET}"' in line]
    assert len(calls) == 1, calls
    constraints = re.search(r"operand_layout_constraints=\{(.*?)\}, api_version", calls[0]).group(1)
    return [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\w+\[([\d,]*)\]\{", constraints)]


def check_partitioned(mesh, call, specs, *, local, fn=SPARSE):
    """The call placed by `specs` gives the unsharded result bit for bit, its compiled module has no
    collective and one custom call whose operands have the shapes in `local` (name -> local shape; the
    others whole, absent ones empty)."""
    want = fn(call)
    args = place(mesh, call, specs)
    hlo = fn.lower(args).compile().as_text()
    got = fn(args)
    assert_same(got, want)
    assert not collectives(hlo), collectives(hlo)[:3]
    shapes = local_operand_shapes(hlo)
    assert len(shapes) == len(NAMES)
    for name, shape in zip(NAMES, shapes):  # an absent operand is an empty one
        want_shape = (0,) if call.get(name) is None else local.get(name, tuple(call[name].shape))
        assert shape == want_shape, (name, shape)
    # Not a vacuous match: tokens with entries have output.
    assert np.abs(np.asarray(got[0], np.float32)).max() > 0
    return got


def case(rng, *, s_q=8, h_q=8, d_qk=576, sink=True, lengths=True, s_kv=60, topk=64):
    return make_case(rng, s_q=s_q, s_kv=s_kv, topk=topk, h_q=h_q, d_qk=d_qk, sink=sink, lengths=lengths,
                     empty_rows=1)


# ---- forward ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d_qk", [576, 512])
def test_head_parallel(rng, d_qk):
    call = case(rng, d_qk=d_qk)
    out, max_logits, lse = check_partitioned(mesh_of((4,), ("h",)), call, {"q": P(None, "h"), "attn_sink": P("h")},
                                             local={"q": (8, 2, d_qk), "attn_sink": (2,)})
    assert out.sharding.spec[1] == "h" and lse.sharding.spec[1] == "h" and max_logits.sharding.spec[1] == "h"


@pytest.mark.parametrize("n", [2, 4])
def test_token_parallel(rng, n):
    call = case(rng, s_q=12)
    specs = {"q": P("x"), "indices": P("x"), "topk_length": P("x")}
    out, _, lse = check_partitioned(mesh_of((n,), ("x",)), call, specs,
                                    local={"q": (12 // n, 8, 576), "indices": (12 // n, 1, 64),
                                           "topk_length": (12 // n,)})
    assert out.sharding.spec[0] == "x" and lse.sharding.spec[0] == "x"


def test_tokens_and_heads_on_a_2d_mesh(rng):
    call = case(rng, d_qk=512)
    specs = {"q": P("x", "h"), "indices": P("x"), "topk_length": P("x"), "attn_sink": P("h")}
    out, _, lse = check_partitioned(mesh_of((2, 4), ("x", "h")), call, specs, local={
        "q": (4, 2, 512), "indices": (4, 1, 64), "topk_length": (4,), "attn_sink": (2,)})
    assert tuple(out.sharding.spec)[:2] == ("x", "h") and tuple(lse.sharding.spec) == ("x", "h")


def test_tokens_over_two_mesh_axes_and_optional_operands_absent(rng):
    call = case(rng, sink=False, lengths=False)
    check_partitioned(mesh_of((2, 2), ("a", "b")), call, {"q": P(("a", "b")), "indices": P(("a", "b"))},
                      local={"q": (2, 8, 576), "indices": (2, 1, 64)})


def test_only_q_split_partitions_the_rest_alike(rng):
    # indices and topk_length arrive whole: each device takes its slice of them, no collective.
    call = case(rng)
    check_partitioned(mesh_of((2,), ("x",)), call, {"q": P("x")},
                      local={"q": (4, 8, 576), "indices": (4, 1, 64), "topk_length": (4,)})


def _batched(rng, b=4):
    cases = [case(rng, h_q=4) for _ in range(b)]
    return {k: jnp.stack([c[k] for c in cases]) for k in ("q", "kv", "indices", "topk_length")} | {
        "attn_sink": cases[0]["attn_sink"]}


def test_batched_form_split_on_batch(rng):
    # The fold happens before the partitioned op: b * s_q tokens split, kv (concatenated) whole.
    call = _batched(rng)
    mesh = mesh_of((2,), ("x",))
    specs = {"q": P("x"), "indices": P("x"), "topk_length": P("x")}
    got = check_partitioned(mesh, call, specs, local={
        "q": (16, 4, 576), "kv": (4 * 60, 1, 576), "indices": (16, 1, 64), "topk_length": (16,)})
    assert got[0].sharding.spec[0] == "x" and got[2].sharding.spec[0] == "x"
    for m in range(4):  # and each member is its own unbatched call
        assert_same([r[m] for r in got], SPARSE({k: v if k == "attn_sink" else v[m] for k, v in call.items()}))


def test_vmap_under_named_shardings(rng):
    call = case(rng)
    qs = jnp.stack([call["q"], -call["q"], 0.5 * call["q"]])
    fn = jax.jit(jax.vmap(lambda q, call: sparse(dict(call, q=q)), in_axes=(0, None)))
    mesh = mesh_of((2,), ("x",))
    # Each member's tokens split: the folded tokens are not split evenly, so XLA regroups them; right.
    got = fn(jax.device_put(qs, NamedSharding(mesh, P(None, "x"))), place(mesh, call, {"indices": P("x")}))
    for m in range(3):
        assert_same([r[m] for r in got], SPARSE(dict(call, q=qs[m])))
    # The mapped axis split: the folded tokens are, with no collective.
    args = (jax.device_put(qs[:2], NamedSharding(mesh, P("x"))), place(mesh, call, {}))
    got = fn(*args)
    for m in range(2):
        assert_same([r[m] for r in got], SPARSE(dict(call, q=qs[m])))
    hlo = fn.lower(*args).compile().as_text()
    assert not collectives(hlo) and local_operand_shapes(hlo)[0] == (8, 8, 576)


FALLBACKS = {
    # name: (mesh shape, axis names, case kwargs, specs)
    "kv_on_rows": ((2,), ("x",), {}, {"kv": P("x"), "q": P("x"), "indices": P("x")}),
    "kv_on_channels": ((2,), ("x",), {}, {"kv": P(None, None, "x")}),
    "q_on_channels": ((2,), ("x",), {}, {"q": P(None, None, "x")}),
    "indices_on_topk": ((2,), ("x",), {}, {"indices": P(None, None, "x")}),
    "sink_split_heads_whole": ((2,), ("h",), {}, {"attn_sink": P("h")}),
}


@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_other_shardings_give_the_unsharded_result(rng, name):
    shape, names, kwargs, specs = FALLBACKS[name]
    call = case(rng, **kwargs)
    assert_same(SPARSE(place(mesh_of(shape, names), call, specs)), SPARSE(call))


def test_batched_form_with_kv_split_on_batch_gathers_it(rng):
    call = _batched(rng)
    mesh = mesh_of((2,), ("x",))
    args = place(mesh, call, {"q": P("x"), "kv": P("x"), "indices": P("x"), "topk_length": P("x")})
    assert_same(SPARSE(args), SPARSE(call))


# ---- gradients -------------------------------------------------------------------------------------------

def _loss(q, kv, sink, call, d_out):
    out, _, lse = sparse(dict(call, q=q, kv=kv, attn_sink=sink))
    return jnp.sum(out.astype(jnp.float32) * d_out) + 0.3 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))


GRAD = jax.jit(jax.grad(_loss, argnums=(0, 1, 2)))


def _grad_case(rng, **kwargs):
    call = case(rng, **kwargs)
    call["attn_sink"] = jnp.asarray(rng.standard_normal(call["q"].shape[1]), jnp.float32)  # finite: finite d_sink
    s_q, h_q = call["q"].shape[:2]
    return call, jnp.asarray(rng.standard_normal((s_q, h_q, 512)), jnp.float32)


def _assert_grads_close(got, want):
    # Each shard sums its own chunks (sized from its local shapes) and dkv / d_sink across shards: the
    # same float32 sums in another order, each result rounded once.
    for name, g, w in zip(("dq", "dkv", "d_sink"), got, want):
        assert np.abs(np.asarray(w, np.float32)).max() > 0, name
        assert_close(name, np.asarray(g, np.float32), np.asarray(w, np.float32), atol=1e-3, rtol=2.01 / 128,
                     cos_tol=5e-6)


def _reductions(hlo):
    """The shapes each collective of a compiled module reduces; fails on any collective but all-reduce."""
    found = collectives(hlo)
    others = [c for c in found if not c.startswith("all-reduce")]
    assert not others, others[:3]
    shapes = []
    for line in hlo.splitlines():
        m = re.search(r"= (\(?[^=]*?\)?) all-reduce(?:-start)?\(", line)
        if m:
            shapes += re.findall(r"(\w+\[[\d,]*\])", m.group(1))
    return shapes


@pytest.mark.parametrize("split", ["tokens", "heads", "both"])
def test_grad_is_partitioned_like_the_forward(rng, split):
    call, d_out = _grad_case(rng, s_q=8, h_q=8)
    mesh = mesh_of((2, 4), ("x", "h")) if split == "both" else mesh_of((4,), ("x" if split == "tokens" else "h",))
    t = "x" if split != "heads" else None
    h = "h" if split != "tokens" else None
    specs = {"q": P(t, h), "indices": P(t), "topk_length": P(t), "attn_sink": P(h)}
    args = place(mesh, call, specs)
    d_out_sharded = jax.device_put(d_out, NamedSharding(mesh, P(t, h)))
    got = GRAD(args["q"], args["kv"], args["attn_sink"], args, d_out_sharded)
    _assert_grads_close(got, GRAD(call["q"], call["kv"], call["attn_sink"], call, d_out))
    assert (tuple(got[0].sharding.spec) + (None, None))[:2] == (t, h)
    hlo = GRAD.lower(args["q"], args["kv"], args["attn_sink"], args, d_out_sharded).compile().as_text()
    shapes = _reductions(hlo)
    # dkv, whole and in float32, summed over every split axis; d_sink (this shard's heads) over the tokens.
    assert "f32[60,1,576]" in shapes, shapes
    h_local = 8 if split == "tokens" else 2
    allowed = {"f32[60,1,576]"} | ({f"f32[{h_local}]"} if t else set())
    assert set(shapes) <= allowed, shapes
    assert len(shapes) <= 2, shapes


def test_grad_of_the_batched_form_split_on_batch(rng):
    call = _batched(rng, b=2)
    call["attn_sink"] = jnp.asarray(rng.standard_normal(4), jnp.float32)
    d_out = jnp.asarray(rng.standard_normal((2, 8, 4, 512)), jnp.float32)
    mesh = mesh_of((2,), ("x",))
    args = place(mesh, call, {"q": P("x"), "indices": P("x"), "topk_length": P("x")})
    got = GRAD(args["q"], args["kv"], args["attn_sink"], args, jax.device_put(d_out, NamedSharding(mesh, P("x"))))
    _assert_grads_close(got, GRAD(call["q"], call["kv"], call["attn_sink"], call, d_out))
    hlo = GRAD.lower(args["q"], args["kv"], args["attn_sink"], args, d_out).compile().as_text()
    assert set(_reductions(hlo)) <= {"f32[120,1,576]", "f32[2,4]", "f32[4]"}, _reductions(hlo)


def test_gspmd_callbacks(rng):
    call, d_out = _grad_case(rng, d_qk=512)
    with gspmd_partitioner():
        mesh = mesh_of((2, 2), ("x", "h"))
        specs = {"q": P("x", "h"), "indices": P("x"), "topk_length": P("x"), "attn_sink": P("h")}
        fwd, grad = jax.jit(sparse), jax.jit(jax.grad(_loss, argnums=(0, 1, 2)))  # fresh caches: GSPMD compiles
        args = place(mesh, call, specs)
        hlo = fwd.lower(args).compile().as_text()
        assert_same(fwd(args), SPARSE(call))
        assert not collectives(hlo), collectives(hlo)[:3]
        assert local_operand_shapes(hlo)[0] == (4, 4, 512)
        got = grad(args["q"], args["kv"], args["attn_sink"], args, d_out)
        _assert_grads_close(got, GRAD(call["q"], call["kv"], call["attn_sink"], call, d_out))
        assert set(_reductions(grad.lower(args["q"], args["kv"], args["attn_sink"], args, d_out).compile().as_text())
                   ) <= {"f32[60,1,512]", "f32[4]"}


def test_nan_in_unread_kv_rows_stays_out_of_sharded_gradients(rng):
    # make_case fills every kv row no valid entry reads with NaN.
    call, d_out = _grad_case(rng, s_kv=200)
    unread = np.isnan(np.asarray(call["kv"], np.float32)).any(-1)[:, 0]
    assert unread.any()
    mesh = mesh_of((2, 2), ("x", "h"))
    args = place(mesh, call, {"q": P("x", "h"), "indices": P("x"), "topk_length": P("x"), "attn_sink": P("h")})
    dq, dkv, d_sink = GRAD(args["q"], args["kv"], args["attn_sink"], args, d_out)
    dkv = np.asarray(dkv, np.float32)
    assert np.isfinite(np.asarray(dq, np.float32)).all() and np.isfinite(np.asarray(d_sink)).all()
    assert (dkv[unread] == 0).all() and np.isfinite(dkv).all()



def test_second_derivative_through_the_backward(rng):
    # The backward is a primitive; its JVP rule (the tangents of its pure-JAX program) serves grad of grad.
    call, _ = _grad_case(rng, s_q=4, h_q=2, d_qk=512, s_kv=40, topk=16)

    def outer(fn, sink):
        def loss(q, sink):
            out, _, lse = fn(q, call["kv"], call["indices"], SCALE, attn_sink=sink, topk_length=call["topk_length"])
            return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

        return jnp.sum(jax.grad(loss, argnums=1)(call["q"], sink) ** 2)

    got = jax.grad(lambda s: outer(fm.flash_mla_sparse_fwd, s))(call["attn_sink"])
    want = jax.grad(lambda s: outer(fm.sparse_prefill_reference, s))(call["attn_sink"])
    assert np.abs(np.asarray(want)).max() > 0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-3, atol=1e-5)
