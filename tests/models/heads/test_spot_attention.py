import math

import pytest
import torch

from spotocc.models import SpotCrossAttention


def oracle_spot_attention(module, query, key, query_pos, key_pos, attn_mask=None, query_padding_mask=None):
    """Spec 03 section 1.2 step by step, one (sample, query, head) at a time, with explicit sorting.

    Rows whose mask blocks every key aggregate nothing (zero prototype); padding queries are left out
    of the query-axis norm.
    """
    batch, num_queries, channels = query.shape
    num_keys = key.shape[1]
    heads = module.num_heads
    head_dim = channels // heads
    top_k = min(num_keys, max(module.min_k, min(math.ceil(module.pruning_ratio * num_keys), num_keys)))
    q_in = query + query_pos
    k_in = key + key_pos
    q_proj = module.query_proj(q_in)
    k_proj = module.key_proj(k_in)
    rows = []
    for b in range(batch):
        per_query = []
        for i in range(num_queries):
            per_head = []
            for h in range(heads):
                chunk = slice(h * head_dim, (h + 1) * head_dim)
                q_vec = q_proj[b, i, chunk]
                q_vec = q_vec / q_vec.norm().clamp_min(1e-12)
                sims = {}
                for j in range(num_keys):
                    if attn_mask is not None and bool(attn_mask[b, i, j]):
                        continue
                    k_vec = k_proj[b, j, chunk]
                    sims[j] = torch.dot(q_vec, k_vec / k_vec.norm().clamp_min(1e-12))
                chosen = sorted(sims, key=lambda j: -float(sims[j].detach()))[:top_k]
                if not chosen:
                    per_head.append(torch.zeros(head_dim))
                    continue
                logits = torch.stack([sims[j] for j in chosen]) / math.sqrt(head_dim)
                weights = torch.softmax(logits, dim=0)
                per_head.append(sum(w * k_in[b, j, chunk] for w, j in zip(weights, chosen)))
            per_query.append(torch.cat(per_head))
        rows.append(torch.stack(per_query))
    prototypes = torch.stack(rows)  # [B, Q, C]
    interaction = module.proj(prototypes * q_proj)
    normalized = torch.empty_like(interaction)
    for b in range(batch):
        kept = [i for i in range(num_queries) if query_padding_mask is None or not query_padding_mask[b, i]]
        for c in range(channels):
            norm = torch.sqrt(sum(interaction[b, i, c] ** 2 for i in kept)).clamp_min(1e-12)
            normalized[b, :, c] = interaction[b, :, c] / norm
    return query + module.final(normalized * module.alpha + prototypes)


def make_inputs(batch=2, num_queries=5, num_keys=13, channels=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, num_queries, channels), (batch, num_keys, channels)] * 2
    query, key, query_pos, key_pos = (torch.randn(*s, generator=gen) for s in shapes)
    return query, key, query_pos, key_pos


def make_module(channels=12, heads=3, ratio=0.3, min_k=2, seed=0, **kwargs):
    torch.manual_seed(seed)
    module = SpotCrossAttention(channels, heads, ratio, min_k, **kwargs)
    with torch.no_grad():
        module.alpha.normal_(0.0, 0.5)  # make the interaction branch matter
        for lin in (module.query_proj[1], module.key_proj[1], module.proj, module.final):
            lin.bias.normal_(0.0, 0.1)
    return module


def gradients(out, tensors):
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    return torch.autograd.grad((out * weights).sum(), tensors)


@pytest.mark.parametrize("use_mask", [False, True])
def test_matches_step_by_step_oracle_with_gradients(use_mask):
    module = make_module()
    query, key, query_pos, key_pos = (t.requires_grad_() for t in make_inputs())
    mask = None
    if use_mask:
        mask = torch.rand(2, 5, 13, generator=torch.Generator().manual_seed(1)) < 0.6
        mask[1, 2, :11] = True  # fewer allowed keys (2) than k (4)
    out = module(query, key, query_pos, key_pos, attn_mask=mask)
    expected = oracle_spot_attention(module, query, key, query_pos, key_pos, mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    params = [query, key, query_pos, key_pos, *module.parameters()]
    for got, want in zip(gradients(out, params), gradients(expected, params)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("ratio", "min_k", "num_keys", "expected"),
    [
        (0.08, 10, 512, 41),
        (0.08, 10, 3072, 246),
        (0.08, 10, 20480, 1639),
        (0.1, 32, 512, 52),
        (0.1, 32, 4096, 410),
        (0.1, 32, 32768, 3277),
        (0.08, 10, 50, 10),  # min_k binds: ceil(4.0) = 4 < 10
        (0.08, 10, 6, 6),  # capped at K
        (1.0, 1, 7, 7),
    ],
)
def test_top_k_size_rule(ratio, min_k, num_keys, expected):
    assert SpotCrossAttention(12, 3, ratio, min_k).num_selected(num_keys) == expected


def test_exactly_k_keys_influence_each_query_head():
    # one query, one head: only the k selected keys get any gradient (similarity or value)
    module = make_module(channels=8, heads=1, ratio=0.25, min_k=1)
    query, key, query_pos, key_pos = make_inputs(batch=1, num_queries=1, num_keys=20, channels=8)
    key.requires_grad_()
    out = module(query, key, query_pos, key_pos)
    (grad,) = torch.autograd.grad(out.sum(), key)
    assert int((grad.abs().sum(-1) > 0).sum()) == 5


def test_fully_blocked_row_gives_zero_prototype_and_no_nan():
    module = make_module()
    query, key, query_pos, key_pos = (t.requires_grad_() for t in make_inputs())
    mask = torch.zeros(2, 5, 13, dtype=torch.bool)
    mask[0, 3] = True
    mask[1, :] = True  # a whole sample blocked
    out = module(query, key, query_pos, key_pos, attn_mask=mask)
    assert torch.isfinite(out).all()
    grads = gradients(out, [query, key, *module.parameters()])
    assert all(torch.isfinite(g).all() for g in grads)
    expected = oracle_spot_attention(module, query, key, query_pos, key_pos, mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # blocked row: U = 0, so the output is query + final(alpha * normalized(proj.bias))
    with torch.no_grad():
        interaction = module.proj.bias.expand(2, 5, 12)
        normalized = interaction / interaction.norm(dim=1, keepdim=True)
        blocked = query[1] + module.final(normalized[1] * module.alpha[0])
    torch.testing.assert_close(out[1], blocked, atol=1e-5, rtol=1e-5)


def test_padding_queries_do_not_change_other_queries():
    module = make_module()
    query, key, query_pos, key_pos = make_inputs(batch=1, num_queries=6)
    mask = torch.zeros(1, 6, 13, dtype=torch.bool)
    mask[0, 4] = True  # a padded DN slot: blocked everywhere and flagged as padding
    padding = torch.zeros(1, 6, dtype=torch.bool)
    padding[0, 4] = True
    out = module(query, key, query_pos, key_pos, attn_mask=mask, query_padding_mask=padding)
    keep = [0, 1, 2, 3, 5]
    alone = module(query[:, keep], key, query_pos[:, keep], key_pos)
    torch.testing.assert_close(out[:, keep], alone, atol=1e-6, rtol=1e-6)
    expected = oracle_spot_attention(module, query, key, query_pos, key_pos, mask, padding)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # without the padding mask the padded row does enter the query-axis norm
    coupled = module(query, key, query_pos, key_pos, attn_mask=mask)
    assert not torch.allclose(coupled[:, keep], alone, atol=1e-4)


def test_batch_equals_per_sample():
    module = make_module()
    query, key, query_pos, key_pos = make_inputs(batch=3)
    mask = torch.rand(3, 5, 13, generator=torch.Generator().manual_seed(2)) < 0.5
    batched = module(query, key, query_pos, key_pos, attn_mask=mask)
    for b in range(3):
        single = module(
            query[b : b + 1], key[b : b + 1], query_pos[b : b + 1], key_pos[b : b + 1], mask[b : b + 1]
        )
        torch.testing.assert_close(batched[b : b + 1], single, atol=1e-6, rtol=1e-6)


def test_query_axis_normalisation_couples_queries_unless_fixed():
    query, key, query_pos, key_pos = make_inputs(batch=1, num_queries=6)
    faithful = make_module()
    fixed = make_module(fix_interaction_norm=True)
    fixed.load_state_dict(faithful.state_dict())
    # released: a query's output depends on the other queries
    full = faithful(query, key, query_pos, key_pos)
    part = faithful(query[:, :3], key, query_pos[:, :3], key_pos)
    assert not torch.allclose(full[:, :3], part, atol=1e-4)
    # fix: normalised over channels, so every query is independent
    full = fixed(query, key, query_pos, key_pos)
    part = fixed(query[:, :3], key, query_pos[:, :3], key_pos)
    torch.testing.assert_close(full[:, :3], part, atol=1e-6, rtol=1e-6)


def test_parameter_names_and_shapes_match_release():
    module = SpotCrossAttention(192, 6, 0.08, 10)
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
    assert shapes == {
        "alpha": (1, 1, 192),
        "query_proj.0.weight": (192,),
        "query_proj.0.bias": (192,),
        "query_proj.1.weight": (192, 192),
        "query_proj.1.bias": (192,),
        "key_proj.0.weight": (192,),
        "key_proj.0.bias": (192,),
        "key_proj.1.weight": (192, 192),
        "key_proj.1.bias": (192,),
        "proj.weight": (192, 192),
        "proj.bias": (192,),
        "final.weight": (192, 192),
        "final.bias": (192,),
    }
    assert sum(p.numel() for p in module.parameters()) == 149_184
    assert torch.all(module.alpha == 0.1)


def test_bad_inputs_raise_clear_errors():
    module = make_module()
    query, key, query_pos, key_pos = make_inputs()
    with pytest.raises(ValueError, match="attn_mask"):
        module(query, key, attn_mask=torch.zeros(2, 5, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        module(query, key, attn_mask=torch.zeros(2, 5, 13))
    with pytest.raises(ValueError, match="same B"):
        module(query, key[:1])
    with pytest.raises(ValueError, match="query_padding_mask"):
        module(query, key, query_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        SpotCrossAttention(10, 3)
