"""Kosmos-2 generation: the search of unilm_vl/modules/generation.py on a tiny random Kosmos-2 and on hand-made
bigram LMs, the prompt layout of the kosmos2 task (microsoft/unilm kosmos-2/evaluation/caption_obj_few_shot.py), a
fairseq-generate run on a saved tiny checkpoint, and the kosmos2_infer CLI."""

import io
import json
import math
import os
import re
from argparse import Namespace

import pytest
import torch
from fairseq.models import ARCH_CONFIG_REGISTRY
from PIL import Image
from test_train_e2e import run

from unilm_vl.data import build_vocab
from unilm_vl.data.grounding import parse_grounded_text
from unilm_vl.inference.kosmos2 import parse_prompt_line, read_prompt_file
from unilm_vl.models.kosmos2 import Kosmos2Model, Kosmos2ModelConfig
from unilm_vl.modules.generation import SearchConfig, banned_ngram_tokens, generate, left_pad
from unilm_vl.tasks.kosmos2 import Kosmos2Config, Kosmos2Task

from conftest import BIN, REPO, SHARED

CAPTIONS = [
    "a red dog on the grass",
    "two blue cats play with a ball",
    "a man rides a green bike",
    "the sky is blue and the grass is green",
    "a yellow bus waits near the red house",
] * 20
L = 4  # image slots of the tiny model
RELEASED = os.path.join(SHARED, "reference", "kosmos2")


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    out = tmp_path_factory.mktemp("k2vocab")
    build_vocab.train_vocab(CAPTIONS, str(out), vocab_size=80)
    return out


def make_task(vocab, **overrides):
    cfg = dict(
        spm_model=str(vocab / "sentencepiece.bpe.model"),
        dict_path=str(vocab / "dict.txt"),
        location_bin_size=4,
        image_token_length=L,
        seed=1,
    )
    return Kosmos2Task(Kosmos2Config(**{**cfg, **overrides}))


@pytest.fixture(scope="module")
def tiny(vocab):
    """(task, net) with a random kosmos2_tiny model (4 latent queries), eval mode."""
    task = make_task(vocab)
    args = Namespace(latent_query_num=L)
    ARCH_CONFIG_REGISTRY["kosmos2_tiny"](args)
    torch.manual_seed(0)
    model = Kosmos2Model.build_model(Kosmos2ModelConfig(**vars(args)), task).eval()
    assert model.net.cfg.decoder.layers == 2 and model.net.cfg.decoder.embed_dim == 128
    return task, model.net


PROMPTS = ["<grounding>a red", "two", "<grounding><phrase> a man</phrase>"]


def batch(task, prompts, seed=0):
    """Left-padded prompts (task layout) with one random 64 x 64 image each."""
    rows = [task.prompt_tokens(p) for p in prompts]
    masks = [[False, False] + [True] * L + [False] * (len(r) - L - 2) for r in rows]
    tokens, mask = left_pad(rows, task.dictionary.pad(), masks)
    image = torch.randn(len(prompts), 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    return tokens, image, mask


@torch.no_grad()
def naive_greedy(net, tokens, image, mask, steps, pad, eos, min_len):
    """Greedy decoding without any cache: the whole sequence (image included) is recomputed at every step."""
    out, scores = [], []
    for step in range(steps + 1):
        logits = net(tokens, image, mask)["lm_logits"][:, -1].float()  # 1 x V
        lprobs = torch.log_softmax(logits, dim=-1)
        lprobs[:, pad] = -math.inf
        if step < min_len:
            lprobs[:, eos] = -math.inf
        if step == steps:
            keep = lprobs[:, eos].clone()
            lprobs[:] = -math.inf
            lprobs[:, eos] = keep
        token = int(lprobs.argmax())
        out.append(token)
        scores.append(float(lprobs[0, token].detach()))
        if token == eos:
            break
        tokens = torch.cat([tokens, torch.tensor([[token]])], dim=1)
        mask = torch.cat([mask, torch.zeros(1, 1, dtype=torch.bool)], dim=1)
    return out, scores


# ---- the tiny Kosmos-2 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("min_len", [1, 12])
def test_greedy_with_cache_equals_recomputing(tiny, min_len):
    task, net = tiny
    d = task.dictionary
    for k, prompt in enumerate(PROMPTS):
        tokens, image, mask = batch(task, [prompt], seed=k)
        (hyp,) = generate(
            net,
            tokens,
            image,
            mask,
            SearchConfig(beam=1, max_len_b=12, min_len=min_len),
            pad_idx=d.pad(),
            eos_idx=d.eos(),
        )[0]
        ref_tokens, ref_scores = naive_greedy(net, tokens, image, mask, 12, d.pad(), d.eos(), min_len)
        assert hyp.tokens.tolist() == ref_tokens
        assert hyp.tokens[-1] == d.eos() and len(hyp.tokens) == len(hyp.positional_scores)
        torch.testing.assert_close(hyp.positional_scores, torch.tensor(ref_scores), atol=1e-4, rtol=1e-4)
        assert hyp.score == pytest.approx(sum(ref_scores) / len(ref_scores), abs=1e-4)


@pytest.mark.parametrize(
    "cfg",
    [dict(beam=1), dict(beam=3, nbest=3), dict(beam=2, nbest=2, lenpen=0.5), dict(beam=1, no_repeat_ngram_size=2)],
)
def test_batch_of_different_lengths_equals_each_alone(tiny, cfg):
    task, net = tiny
    d = task.dictionary
    search = SearchConfig(max_len_b=10, **cfg)
    tokens, image, mask = batch(task, PROMPTS)
    assert tokens[:, 0].eq(d.pad()).sum() >= 1  # really left-padded
    together = generate(net, tokens, image, mask, search, pad_idx=d.pad(), eos_idx=d.eos())
    for i, prompt in enumerate(PROMPTS):
        t1, _, m1 = batch(task, [prompt])
        alone = generate(net, t1, image[i : i + 1], m1, search, pad_idx=d.pad(), eos_idx=d.eos())[0]
        assert len(alone) == len(together[i]) == search.nbest
        for a, b in zip(alone, together[i]):
            assert a.tokens.tolist() == b.tokens.tolist()
            assert a.score == pytest.approx(b.score, abs=1e-4)


def test_beam_one_and_top1_sampling_equal_greedy(tiny):
    task, net = tiny
    d = task.dictionary
    tokens, image, mask = batch(task, PROMPTS)
    kw = dict(pad_idx=d.pad(), eos_idx=d.eos())
    greedy = [
        naive_greedy(
            net,
            tokens[i : i + 1][:, tokens[i].ne(d.pad())],
            image[i : i + 1],
            mask[i : i + 1][:, tokens[i].ne(d.pad())],
            8,
            d.pad(),
            d.eos(),
            1,
        )[0]
        for i in range(len(PROMPTS))
    ]
    beam1 = generate(net, tokens, image, mask, SearchConfig(beam=1, max_len_b=8), **kw)
    top1 = generate(
        net,
        tokens,
        image,
        mask,
        SearchConfig(sampling=True, sampling_topk=1, max_len_b=8),
        **kw,
        generator=torch.Generator().manual_seed(3),
    )
    assert [h[0].tokens.tolist() for h in beam1] == greedy
    assert [h[0].tokens.tolist() for h in top1] == greedy


def test_beam_search_returns_sorted_distinct_hypotheses(tiny):
    task, net = tiny
    d = task.dictionary
    tokens, image, mask = batch(task, PROMPTS[:1])
    hyps = generate(
        net, tokens, image, mask, SearchConfig(beam=4, nbest=4, max_len_b=6), pad_idx=d.pad(), eos_idx=d.eos()
    )[0]
    assert len(hyps) == 4 and len({tuple(h.tokens.tolist()) for h in hyps}) == 4
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    for h in hyps:
        assert h.score == pytest.approx(float(h.positional_scores.sum()) / len(h.tokens), abs=1e-5)
        assert len(h.tokens) <= 7 and h.tokens[-1] == d.eos()


def test_sampling_is_reproducible_with_a_seed(tiny):
    task, net = tiny
    d = task.dictionary
    tokens, image, mask = batch(task, PROMPTS)
    search = SearchConfig(sampling=True, beam=2, nbest=2, temperature=3.0, sampling_topp=0.95, max_len_b=10)

    def draw(seed):
        hyps = generate(
            net,
            tokens,
            image,
            mask,
            search,
            pad_idx=d.pad(),
            eos_idx=d.eos(),
            generator=torch.Generator().manual_seed(seed),
        )
        return [[h.tokens.tolist() for h in hs] for hs in hyps]

    first = draw(7)
    assert draw(7) == first
    assert draw(8) != first
    assert all(len(hs) == 2 for hs in first)


def test_no_repeat_ngram_holds_on_the_whole_history(tiny):
    task, net = tiny
    d = task.dictionary
    tokens, image, mask = batch(task, PROMPTS)
    search = SearchConfig(beam=2, nbest=2, no_repeat_ngram_size=3, max_len_b=40, min_len=40, temperature=0.3)
    for i, hyps in enumerate(generate(net, tokens, image, mask, search, pad_idx=d.pad(), eos_idx=d.eos())):
        prompt = tokens[i][tokens[i].ne(d.pad())].tolist()
        for h in hyps:
            history = prompt + h.tokens.tolist()[:-1]
            grams = [tuple(history[j : j + 3]) for j in range(len(history) - 2)]
            generated = grams[len(prompt) - 2 :]  # trigrams that end in a generated token
            assert all(grams.count(g) == 1 for g in generated)


# ---- hand-made LMs --------------------------------------------------------------------------------------------


class BigramLM(torch.nn.Module):
    """Follows the model contract; the next-token logits depend on the last token only (``table[token]``)."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, src_tokens, image=None, image_mask=None, incremental_state=None, last_only=False):
        if last_only or (incremental_state is not None and incremental_state.get("started")):
            if incremental_state is not None:
                incremental_state["started"] = True
            return {"lm_logits": self.table[src_tokens[:, -1:]]}
        if incremental_state is not None:
            incremental_state["started"] = True
        return {"lm_logits": self.table[src_tokens]}

    @staticmethod
    def reorder_incremental_state(state, new_order):
        pass


def bigram(vocab_size, transitions, default=-10.0):
    """A table where ``transitions[a] = {b: logit}``; everything else gets ``default``."""
    table = torch.full((vocab_size, vocab_size), default)
    for a, row in transitions.items():
        for b, logit in row.items():
            table[a, b] = logit
    return table


BOS, PAD, EOS = 0, 1, 2


def test_banned_ngram_tokens():
    history = torch.tensor([5, 6, 7, 5, 6])
    assert banned_ngram_tokens(history, 3).tolist() == [7]
    assert banned_ngram_tokens(history, 2).tolist() == [7]  # after 6 came 7
    assert banned_ngram_tokens(torch.tensor([5, 6]), 3).tolist() == []


def test_no_repeat_ngram_breaks_a_cycle():
    a, b, c, x = 4, 5, 6, 7  # the LM loops a -> b -> c -> a ...; x is its second choice everywhere
    lm = BigramLM(bigram(8, {a: {b: 5, x: 1}, b: {c: 5, x: 1}, c: {a: 5, x: 1}, x: {a: 5, b: 4, x: 1}}))
    tokens = torch.tensor([[BOS, a, b, c]])
    kw = dict(pad_idx=PAD, eos_idx=EOS)
    free = generate(lm, tokens, cfg=SearchConfig(max_len_b=6, min_len=6), **kw)[0][0].tokens.tolist()
    assert free == [a, b, c, a, b, c, EOS]
    blocked = generate(lm, tokens, cfg=SearchConfig(max_len_b=6, min_len=6, no_repeat_ngram_size=3), **kw)[0][
        0
    ].tokens.tolist()
    # "a b c" is in the prompt: after "... c a" the LM still wants b (c a b is new), then c would repeat a b c
    assert blocked[:3] == [a, b, x]
    history = [BOS, a, b, c] + blocked[:-1]
    trigrams = [tuple(history[i : i + 3]) for i in range(len(history) - 2)]
    assert len(trigrams) == len(set(trigrams))


def test_check22_same_upper_left_cell_never_follows_phrase_twice(vocab):
    """With no_repeat_ngram_size=3, ``</phrase><object><patch_index_X>`` cannot occur twice with one X."""
    task = make_task(vocab)
    d = task.dictionary
    ph, eph, ob, eob = (d.index(s) for s in ("<phrase>", "</phrase>", "<object>", "</object>"))
    p0, p1, p5, p9 = (d.index(f"<patch_index_{k:04d}>") for k in (0, 1, 5, 9))
    w1, w2, conj = (d.index(piece) for piece in ("\u2581a", "\u2581the", "\u2581is"))
    assert d.unk() not in (w1, w2, conj)
    # the LM loops "is <phrase> a </phrase> <object> <p0> <p5> </object> is ..." (second choices: "the", <p1>,
    # </s>); the prompt already holds "is <phrase> a", so phrase 2 is "the", whose box may not start in <p0> again
    lm = BigramLM(
        bigram(
            len(d),
            {
                conj: {ph: 5, EOS: 4},
                ph: {w1: 5, w2: 3},
                w1: {eph: 5},
                w2: {eph: 5},
                eph: {ob: 5},
                ob: {p0: 5, p1: 3},
                p0: {p5: 5},
                p1: {p9: 5},
                p5: {eob: 5},
                p9: {eob: 5},
                eob: {conj: 5},
            },
        )
    )
    tokens = torch.tensor([[BOS, conj, ph]])
    out = generate(lm, tokens, cfg=SearchConfig(max_len_b=30, no_repeat_ngram_size=3), pad_idx=PAD, eos_idx=EOS)[0][
        0
    ].tokens.tolist()
    assert out == [w1, eph, ob, p0, p5, eob, conj, ph, w2, eph, ob, p1, p9, eob, conj, EOS]
    history = [BOS, conj, ph] + out
    after_phrase = [history[i + 2] for i in range(len(history) - 2) if history[i : i + 2] == [eph, ob]]
    assert after_phrase[:2] == [p0, p1]  # the second phrase may not start its box in the same cell
    assert len(after_phrase) == len(set(after_phrase))
    entities = parse_grounded_text(d.string(torch.tensor(history), "sentencepiece"), 4)[1]
    assert [(e[0], len(e[2])) for e in entities] == [("a", 1), ("the", 1)]


def test_beam_search_beats_greedy_on_a_garden_path():
    a, b, c, dd = 4, 5, 6, 7
    # greedy takes a (p=.55) and then faces a flat distribution; b (p=.45) leads to a sure end
    table = bigram(
        8, {BOS: {a: math.log(0.55), b: math.log(0.45)}, a: {c: 0.0, dd: 0.0, EOS: 0.0, a: 0.0, b: 0.0}, b: {EOS: 10.0}}
    )
    lm = BigramLM(table)
    tokens = torch.tensor([[BOS]])
    greedy = generate(lm, tokens, cfg=SearchConfig(max_len_b=1, lenpen=0), pad_idx=PAD, eos_idx=EOS)[0][0]
    beam = generate(lm, tokens, cfg=SearchConfig(beam=2, max_len_b=1, lenpen=0), pad_idx=PAD, eos_idx=EOS)[0][0]
    assert greedy.tokens.tolist()[0] == a
    assert beam.tokens.tolist() == [b, EOS] and beam.score > greedy.score


def test_right_padding_is_rejected():
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate(BigramLM(bigram(8, {})), torch.tensor([[BOS, 4, PAD]]), pad_idx=PAD, eos_idx=EOS)


# ---- prompt layout and files ----------------------------------------------------------------------------------


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(RELEASED, "dict.txt")),
    reason=f"the released vocabulary (sentencepiece.bpe.model, dict.txt) is not in {RELEASED}",
)
def test_check12_prompt_layout_with_the_released_vocabulary():
    task = Kosmos2Task(
        Kosmos2Config(
            spm_model=os.path.join(RELEASED, "sentencepiece.bpe.model"),
            dict_path=os.path.join(RELEASED, "dict.txt"),
            location_bin_size=32,
            image_token_length=64,
            seed=1,
        )
    )
    ids = task.prompt_tokens("<grounding>An image of")
    # The 64 slots hold the ids 4..67, as the released inference and HF's processor write them
    assert ids == [0, 64003] + list(range(4, 68)) + [64004, 64012, 712, 1648, 9]
    assert len(ids) == 71 and ids[-1] != task.dictionary.eos()


def test_prompt_dataset_collates_left_padded(vocab, tmp_path):
    task = make_task(vocab)
    task.image_size, task.image_mean, task.image_std = 32, (0.5,) * 3, (0.5,) * 3
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    (tmp_path / "p.tsv").write_text("red.png\t<grounding>a red\nred.png\ttwo blue cats play\n")
    ds = task.build_prompt_dataset(read_prompt_file(str(tmp_path / "p.tsv")))
    sample = ds.collater([ds[0], ds[1]])
    src, mask = sample["net_input"]["src_tokens"], sample["net_input"]["image_mask"]
    assert sample["id"].tolist() == [0, 1] and sample["target"] is None
    assert sample["net_input"]["image"].shape == (2, 3, 32, 32)
    for i in range(2):
        row = src[i][src[i].ne(task.dictionary.pad())].tolist()
        assert row == task.prompt_tokens(["<grounding>a red", "two blue cats play"][i])
        assert src[i, -1] != task.dictionary.pad()  # left padding: the last column is real
        assert mask[i].sum() == L and mask[i][src[i].eq(task.dictionary.pad())].sum() == 0


def test_prompt_file_errors_name_the_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "missing.tsv").write_text("ok.png\ta\nnope.png\tb\n")
    with pytest.raises(FileNotFoundError, match=r"missing.tsv:2: image not found: .*nope.png"):
        read_prompt_file(str(tmp_path / "missing.tsv"))
    (tmp_path / "notab.tsv").write_text("ok.png\ta\n\nok.png an image of\n")
    with pytest.raises(ValueError, match=r"notab.tsv:3: expected 'image_path<TAB>prompt'"):
        read_prompt_file(str(tmp_path / "notab.tsv"))
    with pytest.raises(ValueError, match="no image path"):
        parse_prompt_line("\tAn image of", "x:1")
    assert parse_prompt_line("a.png<tab><grounding>An image of", "x:1", "/d").image == "/d/a.png"


# ---- fairseq-generate and the CLI on a saved checkpoint -----------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny kosmos2 checkpoint from a 1-update fairseq-train run on a small synthetic world, and 2 images."""
    from unilm_vl.data.synthetic import generate_world

    root = tmp_path_factory.mktemp("k2gen")
    generate_world(str(root), seed=3, num_train=16, num_val=4, num_test=4, num_videos=0, workers=1)
    build_vocab.main(
        ["--data", "train/grit/part-*.tsv", "--root", str(root), "--out", str(root / "vocab"), "--vocab-size", "200"]
    )
    vocab_args = [
        "--spm-model",
        str(root / "vocab" / "sentencepiece.bpe.model"),
        "--dict-path",
        str(root / "vocab" / "dict.txt"),
        "--location-bin-size",
        "16",
        "--image-token-length",
        "16",
    ]
    run(
        [
            f"{BIN}/fairseq-train",
            "--user-dir",
            f"{REPO}/unilm_vl",
            str(root),
            "--task",
            "kosmos2",
            "--train-data",
            "train/grit/part-*.tsv",
            *vocab_args,
            "--arch",
            "kosmos2_tiny",
            "--criterion",
            "kosmos2_lm",
            "--optimizer",
            "adam",
            "--lr",
            "1e-4",
            "--batch-size",
            "4",
            "--num-workers",
            "0",
            "--cpu",
            "--seed",
            "1",
            "--save-dir",
            str(root / "ckpt"),
            "--max-update",
            "1",
            "--disable-validation",
            "--no-epoch-checkpoints",
            "--log-format",
            "simple",
        ]
    )
    images = root / "prompts"
    images.mkdir()
    Image.new("RGB", (80, 60), (220, 30, 30)).save(images / "red.png")
    Image.new("RGB", (50, 70), (30, 30, 220)).save(images / "blue.jpg")
    (images / "prompts.tsv").write_text("red.png\t<grounding>an image of\nblue.jpg\t<grounding><phrase> a</phrase>\n")
    return Namespace(
        root=root, ckpt=root / "ckpt" / "checkpoint_last.pt", vocab_args=vocab_args, prompts=images / "prompts.tsv"
    )


@pytest.mark.parametrize(
    "flags",
    [
        ["--beam", "2", "--nbest", "2", "--no-repeat-ngram-size", "3", "--num-workers", "0"],
        ["--sampling", "--beam", "1", "--sampling-topp", "0.9", "--temperature", "0.7"],
    ],
)
def test_fairseq_generate_prints_grounded_hypotheses(checkpoint, flags):
    out = run(
        [
            f"{BIN}/fairseq-generate",
            str(checkpoint.root),
            "--user-dir",
            f"{REPO}/unilm_vl",
            "--task",
            "kosmos2",
            "--path",
            str(checkpoint.ckpt),
            *checkpoint.vocab_args,
            "--prompts",
            str(checkpoint.prompts),
            "--gen-subset",
            "test",
            "--batch-size",
            "2",
            "--max-len-b",
            "6",
            "--cpu",
            "--post-process",
            "sentencepiece",
            *flags,
        ]
    )
    hypos = re.findall(r"^H-(\d+)\t(\S+)\t(.*)$", out, flags=re.M)
    nbest = 2 if "--nbest" in flags else 1
    assert sorted(int(i) for i, _, _ in hypos) == sorted([0, 1] * nbest), out[-3000:]
    texts = {int(i): text for i, _, text in hypos}
    assert texts[0].startswith("<grounding> an image of")  # the prompt text, then the continuation
    assert texts[1].startswith("<grounding><phrase> a</phrase>")
    assert all(math.isfinite(float(score)) for _, score, _ in hypos)
    assert len(re.findall(r"^D-\d+\t", out, flags=re.M)) == len(hypos)
    assert "Translated 2 sentences" in out


def test_infer_cli_prints_entities_and_draws(checkpoint, tmp_path):
    from unilm_vl import kosmos2_infer

    stdout = io.StringIO()
    out_jsonl = tmp_path / "out.jsonl"
    kosmos2_infer.main(
        [
            "--checkpoint",
            str(checkpoint.ckpt),
            "--input",
            str(checkpoint.prompts),
            "--cpu",
            "--max-len-b",
            "8",
            "--beam",
            "2",
            "--draw",
            str(tmp_path / "draw"),
            "--output",
            str(out_jsonl),
            "--spm-model",
            checkpoint.vocab_args[1],
            "--dict-path",
            checkpoint.vocab_args[3],
        ],
        stdout=stdout,
    )
    records = [json.loads(line) for line in out_jsonl.read_text().splitlines()]
    assert [r["where"].rsplit(":", 1)[1] for r in records] == ["1", "2"]
    assert records[1]["text"].startswith("<grounding><phrase> a</phrase>")
    assert "clean:" in stdout.getvalue() and "entities:" in stdout.getvalue()
    drawings = sorted(os.listdir(tmp_path / "draw"))
    assert drawings == ["00000_red.png", "00001_blue.png"]
    assert Image.open(tmp_path / "draw" / drawings[0]).size == (400, 300)  # 80 x 60 enlarged x5 to a 256+ side


def test_infer_cli_errors(checkpoint, tmp_path):
    from unilm_vl import kosmos2_infer

    bad = tmp_path / "bad.tsv"
    bad.write_text("An image of without a tab\n")
    with pytest.raises(ValueError, match="bad.tsv:1: expected 'image_path<TAB>prompt'"):
        kosmos2_infer.main(["--checkpoint", str(checkpoint.ckpt), "--input", str(bad), "--cpu"])
    bad.write_text("missing.png\tAn image of\n")
    proc = run_fail(
        [
            f"{BIN}/python",
            "-m",
            "unilm_vl.kosmos2_infer",
            "--checkpoint",
            str(checkpoint.ckpt),
            "--input",
            str(bad),
            "--cpu",
        ]
    )
    assert re.search(r"error: .*bad.tsv:1: image not found: .*missing.png", proc)


def test_inference_engine_decodes_as_the_fairseq_generate_path(checkpoint):
    """Kosmos2Inference (kosmos2_infer and the grounding evaluations) gives the hypotheses of the task's own
    fairseq-generate path (prompt dataset + build_generator) on the same model, prompts and options."""
    from unilm_vl.checkpoint import load_kosmos2_inference
    from unilm_vl.inference.kosmos2 import grounded_string

    engine = load_kosmos2_inference(
        str(checkpoint.ckpt), SearchConfig(beam=2, nbest=2, max_len_b=6, no_repeat_ngram_size=3), cpu=True
    )
    lines = read_prompt_file(str(checkpoint.prompts))
    records = engine.run(lines)
    task = engine.task
    dataset = task.build_prompt_dataset(lines)
    gen_args = Namespace(
        beam=2,
        nbest=2,
        max_len_a=0,
        max_len_b=6,
        min_len=1,
        lenpen=1.0,
        sampling=False,
        sampling_topk=-1,
        sampling_topp=-1.0,
        temperature=1.0,
        no_repeat_ngram_size=3,
    )
    with torch.no_grad():
        hypos = task.build_generator([engine.model], gen_args).generate(
            [engine.model], dataset.collater([dataset[i] for i in range(len(dataset))])
        )
    assert [(r["where"], r["rank"]) for r in records] == [(line.where, k) for line in lines for k in range(2)]
    assert [r["text"] for r in records] == [grounded_string(task.dictionary, h["tokens"]) for hs in hypos for h in hs]
    assert [r["score"] for r in records] == [float(h["score"]) for hs in hypos for h in hs]
    assert engine.num_bins == 16 and records[0]["text"].startswith("<grounding> an image of")


def run_fail(cmd):
    import subprocess

    proc = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode != 0, proc.stdout[-2000:]
    return proc.stdout + proc.stderr


def test_greedy_picks_equal_the_beam_step_at_beam_one():
    """The arg-max fast path keeps what fairseq's beam step keeps at beam 1: the best token of every row, and a
    row whose best token is </s> finishes (the beam step also keeps a continuation, dropped because the input is
    done); scores are the chosen log-probs."""
    from unilm_vl.modules.generation import _beam_picks, _greedy_picks

    torch.manual_seed(0)
    lprobs = torch.log_softmax(torch.randn(5, 11), dim=-1)
    lprobs[2, 2] = 0.0  # row 2: </s> (id 2) is the best token
    greedy = _greedy_picks(lprobs)
    beam = _beam_picks(lprobs, torch.zeros(5), [0, 1, 2, 3, 4], 1, 1, 2)
    finished_or_first = {}
    for row, token, lp in beam:
        finished_or_first.setdefault(row, (row, token, lp))  # the first pick of an input is its best
    assert greedy == [finished_or_first[r] for r in range(5)]
    assert greedy[2][1] == 2 and [t for _, t, _ in greedy] == lprobs.argmax(-1).tolist()


# ---- image slot ids and n-gram bans: the released inference and HF --------------------------------------------


def test_prompt_slots_hold_4_to_L_plus_3_and_training_slots_hold_image(vocab):
    """Generation prompts write 4 .. L+3 into the image slots (the release's inference, HF's processor); training
    batches keep <image> in every slot (the release's training loader)."""
    task = make_task(vocab)
    d = task.dictionary
    ids = task.prompt_tokens("<grounding>a red")
    assert ids[:2] == [d.bos(), d.index("<image>")] and ids[L + 2] == d.index("</image>")
    assert ids[2 : L + 2] == [4, 5, 6, 7]
    train = task.build_collater("train")([{"tokens": [d.index("<grounding>"), d.eos()], "image": torch.zeros(3)}])
    assert train["net_input"]["src_tokens"][0, : L + 3].tolist() == [d.bos()] + [d.index("<image>")] * (L + 1) + [
        d.index("</image>")
    ]
    from unilm_vl.inference.kosmos2 import generation_slot_ids

    with pytest.raises(ValueError, match=r"2000 image slots need the ids 4\.\.2003"):
        generation_slot_ids(d, 2000)


def test_banned_ngrams_equal_hf_on_the_image_slots(vocab):
    """The tokens our blocker bans after a generated "4 5" are HF's NoRepeatNGramLogitsProcessor's on the same
    prompt (both ban 6, which follows 4 5 in the slots); with <image> in every slot (our former prompts) nothing
    would be banned."""
    transformers = pytest.importorskip("transformers", reason="transformers (test-only: HF parity) is not installed")
    task = make_task(vocab)
    d = task.dictionary
    history = task.prompt_tokens("<grounding>a red") + [4, 5]
    hf = transformers.NoRepeatNGramLogitsProcessor(3)(torch.tensor([history]), torch.zeros(1, len(d)))
    hf_banned = torch.isinf(hf[0]).nonzero().flatten().tolist()
    assert hf_banned == [6]
    assert banned_ngram_tokens(torch.tensor(history), 3).tolist() == hf_banned
    former = [t if not 4 <= t < 4 + L or i > L + 2 else d.index("<image>") for i, t in enumerate(history)]
    assert banned_ngram_tokens(torch.tensor(former), 3).tolist() == []


def test_no_repeat_ngram_generation_equals_hf(vocab, tmp_path):
    """Greedy decoding with no_repeat_ngram_size=3 gives HF's tokens on a tiny model converted to HF, on a prompt
    whose text ends in the pieces 4 5. The model prefers the same tokens at every step (final LayerNorm weight 0,
    bias e_0, so the logits are column 0 of the embedding): 6 first, which the slots' trigram 4 5 6 bans at the
    first step. With <image> in the slots our output would start with 6 and differ from HF's."""
    pytest.importorskip("transformers", reason="transformers (test-only: HF parity) is not installed")
    from transformers import Kosmos2ForConditionalGeneration

    from unilm_vl import convert as C
    from unilm_vl.modules.kosmos2 import Kosmos2Module, kosmos2_tiny_config

    task = make_task(vocab)
    d = task.dictionary
    cfg = kosmos2_tiny_config()  # an HF-expressible tower (32 px), decoder heads = connector heads
    cfg.vision.force_quick_gelu = True
    cfg.decoder.vocab_size, cfg.connector.latent_query_num = len(d), L
    torch.manual_seed(0)
    net = Kosmos2Module(cfg).eval()
    preference = {6: 9.0, 9: 8.0, 10: 7.0, 11: 6.0}  # logit of each preferred token; every other token -5
    with torch.no_grad():
        net.decoder.layer_norm.weight.zero_()
        net.decoder.layer_norm.bias.zero_()
        net.decoder.layer_norm.bias[0] = 1.0
        column = torch.full((len(d),), -5.0)
        for token, logit in preference.items():
            column[token] = logit
        net.decoder.embed_tokens.weight[:, 0] = column
    C.save_our_checkpoint(str(tmp_path / "ours.pt"), net.state_dict(), cfg)
    assert C.main(["kosmos2", "--to-hf", "--checkpoint", str(tmp_path / "ours.pt"), "--out", str(tmp_path / "hf")]) == 0
    hf_model = Kosmos2ForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()

    prompt = task.prompt_tokens("<grounding>a red") + [4, 5]
    tokens = torch.tensor([prompt])
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[0, 2 : L + 2] = True
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    steps = 12
    with torch.no_grad():
        theirs = hf_model.generate(
            pixel_values=image,
            input_ids=tokens,
            image_embeds_position_mask=mask.long(),
            attention_mask=torch.ones_like(tokens),
            max_new_tokens=steps,
            do_sample=False,
            num_beams=1,
            no_repeat_ngram_size=3,
            eos_token_id=d.eos(),
            pad_token_id=d.pad(),
        )
    search = SearchConfig(beam=1, max_len_b=steps, min_len=steps, no_repeat_ngram_size=3)
    ours = generate(net, tokens, image, mask, search, pad_idx=d.pad(), eos_idx=d.eos())[0][0].tokens.tolist()
    hf_new = theirs[0, len(prompt) :].tolist()
    assert ours[:steps] == hf_new
    assert hf_new[0] == 9 and 6 in hf_new  # 6 is banned only where its trigram already occurred
    former = tokens.clone()
    former[mask] = d.index("<image>")
    before = generate(net, former, image, mask, search, pad_idx=d.pad(), eos_idx=d.eos())[0][0].tokens.tolist()
    assert before[0] == 6 and before[:steps] != hf_new


# ---- vocabulary checks and safe loading of our own checkpoints ---------------------------------------------------


def _tiny_args():
    args = Namespace(latent_query_num=L)
    ARCH_CONFIG_REGISTRY["kosmos2_tiny"](args)
    return args


def test_model_load_refuses_another_vocabulary_with_both_sizes(tiny, vocab):
    """fairseq's load path (model.load_state_dict) stops with one line naming both sizes and the dict.txt, not
    torch's size-mismatch report."""
    from unilm_vl.models.kosmos2 import VocabularyMismatchError

    task, _ = tiny
    model = Kosmos2Model.build_model(Kosmos2ModelConfig(**vars(_tiny_args())), task)
    state = model.state_dict()
    rows = len(task.dictionary)
    for key in ("net.decoder.embed_tokens.weight", "net.decoder.output_projection.weight"):
        state[key] = torch.zeros(rows + 3, state[key].shape[1])
    with pytest.raises(VocabularyMismatchError) as err:
        model.load_state_dict(state)
    assert str(err.value).startswith(
        f"the checkpoint has {rows + 3} token embeddings but the kosmos2 dictionary "
        f"has {rows} symbols ({vocab / 'dict.txt'}: {rows - 12 - 16},"
    )
    assert "--location-bin-size 4" in str(err.value)


def test_fairseq_train_checkpoint_loads_without_running_code(checkpoint):
    """What fairseq-train saves for our models is all weights-only loadable: no global beyond torch's defaults."""
    from unilm_vl.checkpoint import load_checkpoint_file, load_fairseq_checkpoint

    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(checkpoint.ckpt)) == []
    state = load_checkpoint_file(str(checkpoint.ckpt))
    trusted = torch.load(checkpoint.ckpt, map_location="cpu", weights_only=False)
    assert state["model"].keys() == trusted["model"].keys()
    assert all(torch.equal(state["model"][k], trusted["model"][k]) for k in state["model"])
    prepared = load_fairseq_checkpoint(str(checkpoint.ckpt), {"vision_pretrained": None})
    assert prepared["cfg"].task._name == "kosmos2" and prepared["cfg"].model.vision_pretrained is None


def test_infer_names_the_checkpoint_when_its_vocabulary_is_not_the_dictionary(checkpoint, tmp_path):
    from unilm_vl import kosmos2_infer
    from unilm_vl.models.kosmos2 import VocabularyMismatchError

    dict_path = checkpoint.vocab_args[3]
    lines = open(dict_path).read()
    bigger = tmp_path / "dict.txt"
    bigger.write_text(lines + "extra_a 1\nextra_b 1\n")
    rows = 4 + len(lines.splitlines()) + 12 + 16 * 16  # the training dictionary, --location-bin-size 16
    with pytest.raises(VocabularyMismatchError) as err:
        kosmos2_infer.main(
            [
                "--checkpoint",
                str(checkpoint.ckpt),
                "--input",
                str(checkpoint.prompts),
                "--cpu",
                "--dict-path",
                str(bigger),
            ]
        )
    assert str(err.value).startswith(
        f"{checkpoint.ckpt}: the checkpoint has {rows} token embeddings but the "
        f"kosmos2 dictionary has {rows + 2} symbols ({bigger}: "
    )


# ---- beam rules: fairseq's (default) and HF transformers' -------------------------------------------------------

BEAM_V = 40  # vocabulary of the beam-rule model; the prompt's text ids are drawn from 10 .. 39


def beam_rule_net(eos_bias=0.0):
    """A random Kosmos-2 module of the HF-expressible tiny config (32 px tower, 8 image slots, vocabulary 40) with
    its decoder matrices x4, so the next-token distributions are peaked enough for beams to part. ``eos_bias`` is
    added to the </s> logit through the final LayerNorm's bias (logits = h . E[v], tied): more hypotheses end."""
    from unilm_vl.modules.kosmos2 import Kosmos2Module, kosmos2_tiny_config

    cfg = kosmos2_tiny_config()
    cfg.vision.force_quick_gelu = True  # HF's Kosmos-2 vision activation
    cfg.decoder.vocab_size = BEAM_V
    torch.manual_seed(0)
    net = Kosmos2Module(cfg).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith("decoder.layers.") and p.dim() == 2:
                p.mul_(4.0)
        e = net.decoder.embed_tokens.weight[EOS]
        net.decoder.layer_norm.bias.add_(eos_bias * e / e.dot(e))
    return net, cfg


def beam_rule_prompt(seed, slots):
    """``<s> <image> [slots] </image>`` + 3 random text ids, with a random 32 x 32 image."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(10, BEAM_V, (3,), generator=g).tolist()
    tokens = torch.tensor([[BOS, 5] + list(range(10, 10 + slots)) + [6] + text])
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[0, 2 : 2 + slots] = True
    return tokens, torch.randn(1, 3, 32, 32, generator=g), mask


def test_beam_rules_order_the_same_beams_differently():
    """Three beams that reach the length limit: fairseq's rule forces </s> after max_len = 3 tokens and ranks by
    (sum + log p(</s>)) / 4; HF's rule with max_len = 2 ends the same three beams at their third token and ranks
    by sum / 3. Same beams, another order (for at least one of the prompts tried)."""
    net, cfg = beam_rule_net()
    found = []
    for seed in range(8):
        tokens, image, mask = beam_rule_prompt(seed, cfg.connector.latent_query_num)
        fs = generate(net, tokens, image, mask, SearchConfig(beam=3, nbest=3, max_len_b=3), pad_idx=PAD, eos_idx=EOS)[0]
        hf = generate(
            net,
            tokens,
            image,
            mask,
            SearchConfig(beam=3, nbest=3, max_len_b=2, beam_rule="hf"),
            pad_idx=PAD,
            eos_idx=EOS,
        )[0]
        for h in fs + hf:  # both: sum of the positional scores / their number (lenpen 1)
            assert h.score == pytest.approx(float(h.positional_scores.sum()) / len(h.tokens), abs=1e-5)
        assert [h.score for h in fs] == sorted((h.score for h in fs), reverse=True)
        assert [h.score for h in hf] == sorted((h.score for h in hf), reverse=True)
        assert all(h.tokens[-1] == EOS for h in fs)  # fairseq: </s> at the end of every hypothesis
        cut = [h.tokens.tolist() for h in hf if len(h.tokens) == 3 and h.tokens[-1] != EOS]
        if len(cut) == 3 and sorted(h.tokens.tolist()[:-1] for h in fs) == sorted(cut):
            found.append((seed, [h.tokens.tolist()[:-1] for h in fs], cut))
    assert any(fs_order != hf_order for _, fs_order, hf_order in found), found


def test_beam_rule_rejects_unknown_values():
    with pytest.raises(ValueError, match="beam_rule must be one of"):
        SearchConfig(beam=2, beam_rule="huggingface")


def test_beam_rule_hf_reproduces_hf_generate(tmp_path):
    """beam_rule="hf" gives HF transformers' generate(num_beams=3, num_return_sequences=3) on the same weights:
    the same hypotheses in the same order with the same scores, max_new_tokens = max_len_b + 1. The cases cover
    hypotheses cut at the limit, ended by </s>, both mixed, searches that stop before the limit (HF's
    early-stopping heuristic), and a length penalty; fairseq's rule differs from HF on some of them."""
    pytest.importorskip("transformers", reason="transformers (test-only: HF parity) is not installed")
    from transformers import Kosmos2ForConditionalGeneration

    from unilm_vl import convert as C

    seen = {"cut": 0, "eos": 0, "mixed": 0, "early": 0, "fairseq_differs": 0}
    for eos_bias in (0.0, 2.0, 3.0):
        net, cfg = beam_rule_net(eos_bias)
        out_dir = tmp_path / f"bias{eos_bias}"
        C.save_our_checkpoint(str(out_dir / "ours.pt"), net.state_dict(), cfg)
        assert (
            C.main(["kosmos2", "--to-hf", "--checkpoint", str(out_dir / "ours.pt"), "--out", str(out_dir / "hf")]) == 0
        )
        hf_model = Kosmos2ForConditionalGeneration.from_pretrained(str(out_dir / "hf")).eval()
        for seed, max_new, lenpen in ((0, 4, 1.0), (1, 7, 1.0), (2, 7, 0.6)):
            tokens, image, mask = beam_rule_prompt(seed, cfg.connector.latent_query_num)
            with torch.no_grad():
                theirs = hf_model.generate(
                    pixel_values=image,
                    input_ids=tokens,
                    image_embeds_position_mask=mask.long(),
                    attention_mask=torch.ones_like(tokens),
                    max_new_tokens=max_new,
                    do_sample=False,
                    num_beams=3,
                    num_return_sequences=3,
                    length_penalty=lenpen,
                    early_stopping=False,
                    min_new_tokens=1,
                    eos_token_id=EOS,
                    pad_token_id=PAD,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
            hf_hyps = []
            for row in theirs.sequences[:, tokens.size(1) :].tolist():
                hf_hyps.append(row[: row.index(EOS) + 1] if EOS in row else row)  # drop the padding after </s>
            search = dict(beam=3, nbest=3, max_len_b=max_new - 1, lenpen=lenpen)
            ours = generate(net, tokens, image, mask, SearchConfig(**search, beam_rule="hf"), pad_idx=PAD, eos_idx=EOS)[
                0
            ]
            assert [h.tokens.tolist() for h in ours] == hf_hyps, (eos_bias, seed)
            torch.testing.assert_close(
                torch.tensor([h.score for h in ours]), theirs.sequences_scores, atol=1e-4, rtol=0
            )
            ends = [h[-1] == EOS for h in hf_hyps]
            seen["cut"] += not any(ends)
            seen["eos"] += all(ends)
            seen["mixed"] += any(ends) and not all(ends)
            seen["early"] += theirs.sequences.size(1) - tokens.size(1) < max_new
            fairseq = generate(net, tokens, image, mask, SearchConfig(**search), pad_idx=PAD, eos_idx=EOS)[0]
            seen["fairseq_differs"] += [h.tokens.tolist() for h in fairseq] != hf_hyps
    assert all(seen.values()), seen


def test_beam_rule_reaches_the_generators(vocab):
    """--gen-beam-rule (fairseq-generate, the task's option) and --beam-rule (kosmos2_infer) set the search's rule;
    both default to fairseq's."""
    from unilm_vl.inference.kosmos2 import preset_search_options
    from unilm_vl.kosmos2_infer import build_parser, search_config

    gen_args = Namespace(
        beam=3,
        nbest=1,
        max_len_a=0,
        max_len_b=5,
        min_len=1,
        lenpen=1.0,
        sampling=False,
        sampling_topk=-1,
        sampling_topp=-1.0,
        temperature=1.0,
        no_repeat_ngram_size=0,
    )
    assert make_task(vocab).build_generator([], gen_args).search.beam_rule == "fairseq"
    assert make_task(vocab, gen_beam_rule="hf").build_generator([], gen_args).search.beam_rule == "hf"

    def infer_rule(*argv):
        args = build_parser().parse_args(["--checkpoint", "c.pt", *argv])
        return search_config(args, preset_search_options(args.preset)).beam_rule

    assert infer_rule() == "fairseq" and infer_rule("--beam-rule", "hf") == "hf"
    assert infer_rule("--preset", "hf") == "hf" and infer_rule("--preset", "hf", "--beam-rule", "fairseq") == "fairseq"


def test_bans_work_in_place_and_give_a_stuck_row_its_eos_back():
    """Row 0 has every token banned (unigram ban on a history holding them all; </s> banned by min_len): it may
    still end, with its raw </s> log-prob. Row 1 keeps a token, so its </s> stays banned. The bans are written
    into the search's own buffer."""
    from unilm_vl.modules.generation import _apply_bans

    lprobs = torch.log_softmax(torch.arange(12.0).view(2, 6), dim=-1)
    raw = lprobs.clone()
    history = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 1, 1, 1, 3]])  # row 1 never used 4 and 5
    cfg = SearchConfig(min_len=5, no_repeat_ngram_size=1)
    out = _apply_bans(lprobs, history, [0, 1], 0, [9, 9], cfg, PAD, EOS, None)
    assert out is lprobs
    assert out[0].tolist() == [-math.inf, -math.inf, float(raw[0, EOS]), -math.inf, -math.inf, -math.inf]
    assert out[1].tolist() == [-math.inf] * 4 + raw[1, 4:].tolist()


@pytest.mark.parametrize("step", [0, 3])
def test_batched_beam_step_equals_each_input_alone(step):
    """The one-topk path over all inputs (equal row counts) picks, for each input, exactly what the beam step
    picks for that input alone; so does the per-input path (unequal row counts, the end of a search)."""
    from unilm_vl.modules.generation import _beam_picks

    gen = torch.Generator().manual_seed(step)
    vocab, beam = 9, 2
    lprobs = torch.log_softmax(torch.randn(7, vocab, generator=gen), dim=-1)
    lprobs[2, :] = -math.inf  # a row with nothing allowed but ...
    lprobs[2, EOS] = -0.1  # ... an end that ranks first
    lprobs[5, 3:] = -math.inf
    score = torch.randn(7, generator=gen)

    def alone(rows, last):
        idx = torch.tensor(rows)
        picks = _beam_picks(lprobs[idx], score[idx], [0] * len(rows), step, beam, EOS, {0} if last else set())
        return [(rows[r], t, lp) for r, t, lp in picks]

    for row_input, last in (([0, 0, 1, 1, 2, 2], {1}), ([0, 0, 0, 1, 1, 2, 2], {2})):
        n = len(row_input)
        together = _beam_picks(lprobs[:n], score[:n], row_input, step, beam, EOS, last)
        expected = []
        for b in dict.fromkeys(row_input):
            expected += alone([r for r in range(n) if row_input[r] == b], b in last)
        assert together == expected and len(together) >= beam * len(set(row_input))
