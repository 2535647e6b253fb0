"""The reference backend against an independent per-sample loop, and its gradients."""
import pytest
import torch

import dsa_ops
from dsa_ops import reference
from tests.attention_cases import FORMS, assert_close_by_dtype, make_case, reference_results


def loop_attention(q, k, v, query_mask, key_mask, scale):
    """Written independently of reference.py: gather each sample's rows, softmax, scatter."""
    out = torch.zeros(*q.shape[:2], v.shape[2], dtype=torch.float64)
    attn = torch.zeros(q.shape[0], q.shape[1], q.shape[1], dtype=torch.float64)
    for b in range(q.shape[0]):
        queries = query_mask[b].nonzero().flatten()
        keys = key_mask[b].nonzero().flatten()
        if len(queries) == 0 or len(keys) == 0:
            continue
        scores = scale * q[b, queries].double() @ k[b, keys].double().T
        probs = torch.softmax(scores, dim=-1)
        out[b, queries] = probs @ v[b, keys].double()
        attn[b, queries[:, None], keys[None, :]] = probs
    return out, attn


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("noncontiguous", [False, True])
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_matches_per_sample_loop(form, noncontiguous, scale):
    case = make_case(batch=6, height=5, width=7, qk_dim=8, v_dim=12, form=form,
                     noncontiguous=noncontiguous, scale=scale, dtype=torch.float64)
    out, attn = dsa_ops.masked_attention(*case.inputs, scale=scale, return_attention=True,
                                         backend="reference")
    expected_out, expected_attn = loop_attention(*case.inputs, scale)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(attn, expected_attn)


def test_attention_rows_sum_to_one_on_queries_with_keys_else_zero():
    case = make_case(batch=8, form="independent", seed=3)
    _, attn = dsa_ops.masked_attention(*case.inputs, return_attention=True, backend="reference")
    has_keys = case.query_mask & case.key_mask.any(dim=1, keepdim=True)
    row_sums = attn.sum(dim=-1)
    torch.testing.assert_close(row_sums[has_keys], torch.ones_like(row_sums[has_keys]))
    assert (row_sums[~has_keys] == 0).all()
    assert (attn[~(case.query_mask[:, :, None] & case.key_mask[:, None, :])] == 0).all()


def test_empty_and_full_holes_give_zeros_not_nan():
    case = make_case(batch=4, form="cross", seed=1)  # sample 2: empty hole, sample 3: full hole
    assert not case.query_mask[2].any() and not case.key_mask[3].any()
    q, k, v = (t.detach().requires_grad_() for t in case.inputs[:3])
    out = dsa_ops.masked_attention(q, k, v, case.query_mask, case.key_mask, backend="reference")
    out.backward(case.grad_out)
    assert (out[2] == 0).all() and (out[3] == 0).all()
    for grad in (q.grad, k.grad, v.grad):
        assert torch.isfinite(grad).all()
        assert (grad[2] == 0).all() and (grad[3] == 0).all()


def test_gradients_vanish_outside_masks():
    case = make_case(batch=4, form="independent", seed=2)
    q, k, v = (t.detach().requires_grad_() for t in case.inputs[:3])
    dsa_ops.masked_attention(q, k, v, case.query_mask, case.key_mask,
                             backend="reference").backward(case.grad_out)
    assert (q.grad[~case.query_mask] == 0).all()
    assert (k.grad[~case.key_mask] == 0).all() and (v.grad[~case.key_mask] == 0).all()


@pytest.mark.parametrize("form", FORMS)
def test_gradcheck_float64(form):
    """Checks the registered backward formula (reference.backward) against finite differences."""
    case = make_case(batch=4, height=3, width=4, qk_dim=3, v_dim=5, form=form,
                     noncontiguous=True, dtype=torch.float64, seed=5)
    q, k, v = (t.detach().requires_grad_() for t in case.inputs[:3])

    def op(q, k, v):
        return dsa_ops.masked_attention(q, k, v, case.query_mask, case.key_mask, scale=0.7,
                                        backend="reference")
    assert torch.autograd.gradcheck(op, (q, k, v))


def test_gradcheck_attention_map_float64():
    """The dense map is differentiated by autograd (the oracle KL loss needs dE/dq, dE/dk)."""
    case = make_case(batch=4, height=3, width=3, qk_dim=3, v_dim=2, form="cross",
                     dtype=torch.float64, seed=6)
    q, k = (t.detach().requires_grad_() for t in case.inputs[:2])
    assert torch.autograd.gradcheck(
        lambda q, k: reference.attention_probs(q, k, case.query_mask, case.key_mask, 0.5), (q, k))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("form", ["cross", "self"])
def test_low_precision_against_float64(dtype, form):
    case = make_case(batch=4, height=6, width=6, qk_dim=16, v_dim=24, form=form, dtype=dtype, seed=7)
    q, k, v = (t.detach().requires_grad_() for t in case.inputs[:3])
    out = dsa_ops.masked_attention(q, k, v, case.query_mask, case.key_mask, scale=case.scale,
                                   backend="reference")
    out.backward(case.grad_out)
    assert out.dtype == dtype and q.grad.dtype == dtype
    exact_out, exact_grads = reference_results(case, exact=True)
    low_out, low_grads = reference_results(case, exact=False)
    assert_close_by_dtype(out, exact_out, low_out, "out")
    for name, grad, exact, low in zip("qkv", (q.grad, k.grad, v.grad), exact_grads, low_grads):
        assert_close_by_dtype(grad, exact, low, f"d{name}")


def test_lse_is_infinite_exactly_where_rows_have_no_keys():
    case = make_case(batch=4, form="cross", seed=8)
    _, lse = reference.forward(*case.inputs, case.scale)
    has_keys = case.query_mask & case.key_mask.any(dim=1, keepdim=True)
    assert lse.dtype == torch.float32
    assert torch.isfinite(lse[has_keys]).all() and (lse[~has_keys] == float("inf")).all()


def test_partition_indices_is_a_stable_partition():
    mask = torch.rand(5, 37, generator=torch.Generator().manual_seed(0)) < 0.3
    mask[1] = False
    mask[2] = True
    index, count = dsa_ops.partition_indices(mask)
    assert index.dtype == torch.int32 and count.dtype == torch.int32
    for b in range(mask.shape[0]):
        trues, falses = mask[b].nonzero().flatten(), (~mask[b]).nonzero().flatten()
        assert count[b] == len(trues)
        assert index[b].tolist() == trues.tolist() + falses.tolist()
