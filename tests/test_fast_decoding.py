"""The fast incremental path of Kosmos-2 decoding (unilm_vl/modules/kosmos2.py ``decode_step`` with the
preallocated cache of unilm_vl/modules/kv_cache.py, and generate()'s batched n-gram ban and skipped identity
reorders) against the plain path through torchscale's ``Decoder`` with ``torch.cat`` caches: same logits to float
rounding, same tokens for greedy and beam search with n-gram bans."""

import pytest
import torch

from unilm_vl.modules.generation import SearchConfig, banned_ngram_tokens, generate, repeated_ngram_targets
from unilm_vl.modules.kosmos2 import Kosmos2Module, kosmos2_tiny_config
from unilm_vl.modules.kv_cache import KVCache

BOS, PAD, EOS, BOI, EOI = 0, 1, 2, 5, 4


@pytest.fixture(scope="module")
def pair():
    """(fast, plain): one tiny random Kosmos-2 (2 x 64 decoder, vocabulary 100), two views of it."""
    torch.manual_seed(0)
    fast = Kosmos2Module(kosmos2_tiny_config()).eval()
    plain = Kosmos2Module(kosmos2_tiny_config()).eval()
    plain.load_state_dict(fast.state_dict())
    plain.fast_decoding = False
    return fast, plain


def prompts(model, text_lens, seed=0):
    """Left-padded ``<s> <image> [L slots] </image> text`` rows, their image masks and one 32 px image each."""
    g = torch.Generator().manual_seed(seed)
    L = model.num_image_tokens
    rows = [
        torch.cat(
            [
                torch.tensor([BOS, BOI]),
                torch.arange(6, 6 + L),
                torch.tensor([EOI]),
                torch.randint(10, 100, (n,), generator=g),
            ]
        )
        for n in text_lens
    ]
    width = max(r.numel() for r in rows)
    tokens = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, width - r.numel() :] = r
        mask[i, width - r.numel() + 2 : width - r.numel() + 2 + L] = True
    return tokens, mask, torch.randn(len(rows), 3, 32, 32, generator=g)


@torch.no_grad()
def test_decode_step_logits_equal_the_torchscale_path_with_reorders(pair):
    """A left-padded batch: prompt, 3 steps, a reorder that drops and repeats rows, 3 more steps; the fast path's
    logits equal the plain path's at every step and the layer state keeps torchscale's prev_key layout."""
    fast, plain = pair
    tokens, mask, image = prompts(fast, [3, 6, 1])
    g = torch.Generator().manual_seed(5)
    states = {"fast": {"max_new_tokens": 2}, "plain": {}}  # a small hint: the fast cache must grow once
    seq = {"fast": tokens, "plain": tokens}
    for name, model in (("fast", fast), ("plain", plain)):
        model(tokens, image, mask, incremental_state=states[name])
    for step in range(6):
        if step == 3:
            order = torch.tensor([2, 0, 0])
            for name, model in (("fast", fast), ("plain", plain)):
                model.reorder_incremental_state(states[name], order)
                seq[name] = seq[name].index_select(0, order)
        new = torch.randint(10, 100, (3, 1), generator=g)
        out = {}
        for name, model in (("fast", fast), ("plain", plain)):
            seq[name] = torch.cat([seq[name], new], dim=1)
            out[name] = model(seq[name], incremental_state=states[name])["lm_logits"]
        assert out["fast"].shape == (3, 1, 100)
        torch.testing.assert_close(out["fast"], out["plain"], atol=1e-5, rtol=1e-5)
    full = plain(
        seq["plain"],
        image.index_select(0, torch.tensor([2, 0, 0])),
        torch.cat([mask.index_select(0, torch.tensor([2, 0, 0])), torch.zeros(3, 6, dtype=torch.bool)], dim=1),
    )["lm_logits"][:, -1:]
    torch.testing.assert_close(out["fast"], full, atol=1e-5, rtol=1e-5)
    cache = states["fast"][0]["kv_cache"]
    assert isinstance(cache, KVCache) and cache.length == seq["fast"].size(1) and cache.capacity > tokens.size(1) + 2
    assert states["fast"][0]["prev_key"].shape == states["plain"][0]["prev_key"].shape


@pytest.mark.parametrize(
    "search",
    [
        dict(beam=1, no_repeat_ngram_size=3),
        dict(beam=3, nbest=3, no_repeat_ngram_size=3),
        dict(beam=3, nbest=2, no_repeat_ngram_size=2, beam_rule="hf"),
        dict(beam=1, min_len=0),
    ],
)
def test_generate_fast_path_gives_the_plain_path_tokens(pair, search):
    fast, plain = pair
    tokens, mask, image = prompts(fast, [2, 5, 4, 1], seed=3)
    cfg = SearchConfig(max_len_b=12, **search)
    got = {
        name: generate(model, tokens, image, mask, cfg, pad_idx=PAD, eos_idx=EOS)
        for name, model in (("fast", fast), ("plain", plain))
    }
    for a_hyps, b_hyps in zip(got["fast"], got["plain"]):
        assert len(a_hyps) == len(b_hyps) == cfg.nbest
        for a, b in zip(a_hyps, b_hyps):
            assert a.tokens.tolist() == b.tokens.tolist()
            torch.testing.assert_close(a.positional_scores, b.positional_scores, atol=1e-5, rtol=1e-5)


def test_greedy_generation_reorders_the_cache_only_when_rows_finish(pair):
    """Greedy search with </s> banned until the length limit: only the prompt's expansion reorders the cache."""
    fast, _ = pair
    tokens, mask, image = prompts(fast, [2, 3], seed=4)
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, *args, **kwargs):
            return self.net(*args, **kwargs)

        def reorder_incremental_state(self, state, order):
            calls.append(order.tolist())
            self.net.reorder_incremental_state(state, order)

    hyps = generate(Counting(fast), tokens, image, mask, SearchConfig(max_len_b=6, min_len=6), pad_idx=PAD, eos_idx=EOS)
    assert calls == [[0, 1]]
    assert [len(h[0].tokens) for h in hyps] == [7, 7]  # 6 tokens, then the forced </s>


def test_kv_cache_appends_grows_and_reorders_like_concatenation():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(3, 2, 4, 5, generator=g), torch.randn(3, 2, 4, 5, generator=g)
    cache = KVCache(k, v, capacity=6)
    for step in range(5):  # grows past the capacity of 6 on the third append
        nk, nv = (
            torch.randn(3 if step < 2 else 2, 2, 1, 5, generator=g),
            torch.randn(3 if step < 2 else 2, 2, 1, 5, generator=g),
        )
        if step == 2:  # rows 2 and 0 survive
            order = torch.tensor([2, 0])
            cache.reorder(order)
            k, v = k.index_select(0, order), v.index_select(0, order)
        keys, values = cache.append(nk, nv)
        k, v = torch.cat([k, nk], dim=2), torch.cat([v, nv], dim=2)
        assert torch.equal(keys, k) and torch.equal(values, v)
    assert cache.length == 9 and cache.capacity == 12
    cache.reorder(torch.tensor([1, 1, 0]))  # more rows than before: a fresh spare buffer
    assert torch.equal(cache.keys, k[[1, 1, 0]]) and torch.equal(cache.values, v[[1, 1, 0]])


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_batched_ngram_ban_equals_the_per_row_ban(n):
    """Left-padded rows of a small alphabet (many repeats): the banned tokens of each row are those of
    banned_ngram_tokens on its real tokens (the other entries of the batched result are the pad)."""
    g = torch.Generator().manual_seed(n)
    lengths = [12, 7, 2, 1, 9]
    tokens = torch.full((len(lengths), 12), PAD, dtype=torch.long)
    for i, m in enumerate(lengths):
        tokens[i, 12 - m :] = torch.randint(3, 5, (m,), generator=g)
    targets = repeated_ngram_targets(tokens, n, PAD)
    for i, m in enumerate(lengths):
        expected = set(banned_ngram_tokens(tokens[i, 12 - m :], n).tolist())
        assert set(targets[i].tolist()) - {PAD} == expected
    assert any(len(set(targets[i].tolist()) - {PAD}) for i in range(len(lengths)))  # the case is not empty


def test_vocab_logits_without_autograd_equal_the_output_layer(pair):
    """The generator's projection (W h^T)^T equals torchscale's h W^T to float rounding; with autograd on it is
    torchscale's projection itself (bitwise, and differentiable)."""
    fast, _ = pair
    hidden = torch.randn(3, 2, fast.decoder.embed_dim, generator=torch.Generator().manual_seed(3))
    reference = hidden @ fast.decoder.output_projection.weight.t()  # 3 x 2 x V
    with torch.no_grad():
        logits = fast.vocab_logits(hidden)
    assert logits.shape == (3, 2, 100) and logits.is_contiguous()
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    graded = fast.vocab_logits(hidden.requires_grad_())
    assert graded.requires_grad
    assert torch.equal(graded, fast.decoder.output_layer(hidden))


def test_kv_cache_leaves_shared_prompts_in_place_when_reordering_beams(monkeypatch):
    """Two inputs x 3 beams over a 4-position prompt: while the spare buffer's rows hold the right prompts, a
    reorder copies only the generated positions; after rows leave (other prompts in those rows) it copies all.
    Keys and values always equal the concatenate-and-index_select reference."""
    import unilm_vl.modules.kv_cache as kv

    g = torch.Generator().manual_seed(1)
    prompt_k, prompt_v = torch.randn(2, 2, 4, 3, generator=g), torch.randn(2, 2, 4, 3, generator=g)
    expand = torch.tensor([0, 0, 0, 1, 1, 1])
    k, v = prompt_k[expand], prompt_v[expand]
    cache = KVCache(k, v, capacity=7, prefix_rows=expand.tolist())
    copied = []
    real = torch.index_select

    def spy(src, dim, index, *, out):
        copied.append(src.size(2))
        return real(src, dim, index, out=out)

    monkeypatch.setattr(kv.torch, "index_select", spy)
    orders = [[1, 1, 0, 5, 3, 3], [2, 0, 1, 4, 4, 5], [0, 1, 2, 3, 5, 4], [0, 2, 4], [1, 0, 2], [1, 0, 2]]
    for order in orders:
        nk, nv = torch.randn(len(k), 2, 1, 3, generator=g), torch.randn(len(k), 2, 1, 3, generator=g)
        cache.append(nk, nv)
        k, v = torch.cat([k, nk], dim=2), torch.cat([v, nv], dim=2)
        index = torch.tensor(order)
        cache.reorder(index)
        k, v = k[index], v[index]
        assert torch.equal(cache.keys, k) and torch.equal(cache.values, v)
    # lengths 5..10 (the buffers grow from 7 to 14 at the 4th append); per reorder: keys then values
    # 1st: fresh spare, all 5; 2nd, 3rd: prompts in place, 6-4 and 7-4; 4th: after the growth a fresh spare, all 8;
    # 5th: the spare's rows hold prompts 0 0 0, the new rows need 0 0 1: all 9; 6th: 0 0 1 in both, 10-4
    assert copied == [5, 5, 2, 2, 3, 3, 8, 8, 9, 9, 6, 6]
    with pytest.raises(ValueError, match="names 1 rows for a cache of 2"):
        KVCache(prompt_k, prompt_v, 8, prefix_rows=[0])
