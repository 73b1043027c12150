"""Tests of tinyllm: small configs, real assertions. Run with `python -m pytest -q tests`."""

import collections
import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import tinyllm as T  # noqa: E402

TEXT = "Hello, world!\nThe quick brown fox jumps over the lazy dog.\r\nÄpfel kosten 3 €. 🍎\r" * 3


def tiny_model(vocab_size=40, block_size=32, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = T.Config(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=16, **kw)
    return T.GPT(cfg).eval()


def checkpoint_state(model, tok, **extra):
    """The plain dict that training saves, for a model made in a test."""
    return {"format": T.CHECKPOINT_FORMAT, "version": T.CHECKPOINT_VERSION, "config": T.asdict(model.cfg),
            "tokenizer": tok.to_json(), "model": model.state_dict(), "step": 0, "best_val_loss": 1.0, **extra}


def run_cli(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tinyllm.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


# 1. tokenizers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [TEXT, "", "a", "\r\n\r", "\ufeffBOM first", "日本語のテキスト", "x\ty\0z"])
def test_char_roundtrip(text):
    tok = T.CharTokenizer(set(TEXT) | set(text))
    assert tok.decode(tok.encode(text)) == text


def test_char_unknown_characters_are_named():
    tok = T.CharTokenizer("abc ")
    with pytest.raises(T.UserError, match=r"never saw: 'x' 'z'"):
        tok.encode("abc xz")


def test_bpe_roundtrip_digits_and_end_token():
    tok = T.BPETokenizer.train([TEXT, "What is 347 + 285?"] * 20, vocab_size=300)
    for text in [TEXT, "never seen: Ωμέγα 😀 \x00 \r\n", "12345"]:
        assert tok.decode(tok.encode(text)) == text
    digits = tok.encode("347")
    assert [tok.decode([i]) for i in digits] == ["3", "4", "7"]   # one token per digit
    assert tok.decode([tok.end_id]) == T.END
    again = T.tokenizer_from_json(tok.to_json())
    assert again.encode(TEXT) == tok.encode(TEXT)


def test_bpe_across_words_makes_the_working_short_and_keeps_digits():
    # the thinking corpus's tokenizer: merges may cross spaces, so " + " and " = " are one token each
    train, _ = T.build_corpus(2000, seed=0, n_val=10)
    texts = ["".join(T.problem_text(p)) for p in train]
    tok = T.BPETokenizer.train(texts, vocab_size=400, within_words=False)
    work = " 47 + 35: 7 + 5 = 12, 4 + 3 + 1 = 8, so 47 + 35 = 82.\nAnswer: 82"
    pieces = [tok.decode([i]) for i in tok.encode(work)]
    assert " + " in pieces and " = " in pieces and all(p.strip(" .,:\n").isdigit() or not any(c.isdigit() for c in p)
                                                      for p in pieces)
    assert [p for p in pieces if any(c.isdigit() for c in p)][:4] == ["4", "7", "3", "5"]   # one digit per token
    assert tok.decode(tok.encode(work)) == work
    words = T.BPETokenizer.train(texts, vocab_size=400)   # the GPT-2 rule (used on --data): never across a space
    assert sum(len(tok.encode(t)) for t in texts) < 0.8 * sum(len(words.encode(t)) for t in texts) < 0.75 * sum(map(len, texts))
    again = T.tokenizer_from_json(tok.to_json())
    assert again.encode(work) == tok.encode(work)


def test_tokenizer_json_roundtrip_char():
    tok = T.CharTokenizer(set(TEXT))
    again = T.tokenizer_from_json(tok.to_json())
    assert again.encode(TEXT) == tok.encode(TEXT) and again.vocab_size == tok.vocab_size


def test_read_text_files_normalises(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes("\ufeffline one\r\nline two\rline three\n".encode("utf-8"))
    assert T.read_text_files([str(p)]) == ["line one\nline two\nline three\n"]


# 2. the thinking corpus ------------------------------------------------------------------------

def test_column_working_is_right_for_many_numbers():
    for a in range(0, 1000, 7):
        for b in range(0, 1000, 13):
            work, r = T.column_working(a, "+", b)
            assert r == a + b and work.endswith(f"= {a + b}.")
            assert all(T.check_equation(l, rr) for l, rr in T.EQUATION.findall(work))
            if a >= b:
                work, r = T.column_working(a, "-", b)
                assert r == a - b
                assert all(T.check_equation(l, rr) for l, rr in T.EQUATION.findall(work))


def test_a_difference_reads_its_columns_before_dropping_the_0s_in_front():
    assert T.column_working(16, "-", 11)[0] == "16 - 11: 6 - 1 = 5, 1 - 1 = 0, so 16 - 11 = 05 = 5."
    assert T.column_working(300, "-", 298)[0].endswith("so 300 - 298 = 002 = 2.")
    assert T.column_working(47, "-", 12)[0].endswith("so 47 - 12 = 35.")      # no 0 in front: as before
    assert T.column_working(16, "+", 11)[0].endswith("so 16 + 11 = 27.")
    for a in range(10, 1000, 3):
        for b in range(0, a + 1, 7):
            work = T.column_working(a, "-", b)[0]
            columns = [int(s) for _, s in T.EQUATION.findall(work)[:-1]]   # ones first
            read = "".join(str(c % 10) for c in reversed(columns))
            assert work.endswith(f"= {read} = {a - b}." if read != str(a - b) else f"= {a - b}.")


def test_compare_says_which_is_more_then_subtracts_in_the_question_order():
    assert T.which_is_more(54, 52) == "54 vs 52: 5 = 5, 4 > 2."
    assert T.which_is_more(7, 13) == "7 vs 13: 0 < 1."        # the shorter number gets a 0 in front
    for x in range(0, 120):
        for y in range(0, 120):
            signs = re.findall(r"(\d) ([<>=]) (\d)", T.which_is_more(x, y))
            assert all(s == "=" for _, s, _ in signs[:-1])          # it stops at the first digits that differ
            last = signs[-1][1]
            assert last == ("<" if x < y else ">" if x > y else "=")
    # an unknown inside the reading is moved to the left, then computed in the bigger number's order
    assert T.solve("29 + ? = 33") == ("? = 33 - 29. 33 - 29: 13 - 9 = 4, 3 - 1 - 2 = 0, so 33 - 29 = 04 = 4.", 4,
                                      [(33, "-", 29)])   # the operation the working performs, for the splits
    assert T.solve("4 x 6 - 3 = ?")[1:] == (21, [(4, "x", 6), (24, "-", 3)])
    assert T.solve("? - 5 = 21")[1] == 26 and T.solve("40 - ? = 13")[0].startswith("? = 40 - 13. ")
    assert T.solve("? + 8 = 30")[0].startswith("? = 30 - 8. ")
    assert T.read_off(["4", "0"], 4) == "04 = 4" and T.read_off(["4", "2"], 24) == "24"
    rng, orders = random.Random(5), {}
    for _ in range(300):
        p = T.make_problem(rng, "compare")
        first, second = [int(x) for x in re.findall(r"\d+", p["question"])][:2]
        reading = f"{first} + ? = {second}. ? = {second} - {first}." if first < second else f"{first} - {second} = ?."
        assert p["working"].startswith(T.which_is_more(first, second) + " " + reading)
        assert p["answer"] == abs(first - second)
        wording = next((w for w in ("fewer", "pages did", "more") if w in p["question"]), None)
        orders.setdefault(wording, set()).add(first < second)
    orders.pop(None)   # measures: "How much heavier is ..."
    assert orders == {w: {True, False} for w in ("fewer", "pages did", "more")}   # the wording never tells


def test_products_count_down_to_zero_and_stop():
    work, r = T.times_working(4, 7)
    assert r == 28 and work == ("4 x 7: 7 (3 left), 7 + 7 = 14 (2 left), 14 + 7 = 21 (1 left), "
                                "21 + 7 = 28 (0 left), so 4 x 7 = 28.")
    for groups in range(2, 10):
        for size in range(2, 10):
            work, r = T.times_working(groups, size)
            counts = [int(c) for c in re.findall(r"\((\d+) left\)", work)]
            assert r == groups * size and counts == list(range(groups - 1, -1, -1))
            assert work.endswith(f"(0 left), so {groups} x {size} = {r}.")


def test_multistep_steps_are_headed_by_the_chain_so_far():
    rng = random.Random(3)
    for _ in range(300):
        p = T.make_problem(rng, "multistep", steps=rng.randint(2, 4))
        reading, work = p["working"].split(". ", 1)        # "34 + 12 - 22 = ?", then the steps
        parts = reading.removesuffix(" = ?").split(" ")     # ["34", "+", "12", "-", "22"]
        assert len(parts) == 2 * p["steps"] + 1
        value = int(parts[0])
        for k in range(1, p["steps"] + 1):
            op, x = parts[2 * k - 1], int(parts[2 * k])
            step = f"{value} {op} {x}"
            if k > 1:   # step k repeats the chain up to it, then names the step it takes
                step = " ".join(parts[:2 * k + 1]) + ": " + step
            assert work.startswith(step), (k, work)
            value = value + x if op == "+" else value - x if op == "-" else value * x
            work = work[work.index(f"= {value}.") + len(f"= {value}."):].lstrip()
        assert work == "" and value == p["answer"]


def test_every_story_is_read_first_and_every_schema_is_drawn():
    rng, seen = random.Random(11), collections.defaultdict(set)
    expect = {   # the form of each schema's reading: a, b, c are numbers; ? is the unknown
        "join": "a + b = ?", "separate-start": "? - a = b", "combine": "a + b = ?", "compare-more": "a + b = ?",
        "separate": "a - b = ?", "join-change": "a + ? = b", "join-start": "? + a = b",
        "separate-change": "a - ? = b", "combine-part": "a + ? = b", "compare-fewer": "a - b = ?",
        "groups": "a x b = ?", "price": "a x b = ?", "share": "a / b = ?", "bags": "a / b = ?", "sum": "a + b = ?",
        "combine3": "a + b + c = ?", "bare": None, "compare-difference": None, "changes": None, "groups-change": None}
    for family in T.FAMILIES:
        for _ in range(400):
            p = T.make_problem(rng, family)
            assert p["schema"] in T.SCHEMAS[family] + ["bare"]
            assert T.reading_value(p["working"]) == p["answer"]       # the reading alone gives the answer
            reading = T.READING.search(p["working"])[1]
            assert p["working"].startswith(reading + ". ") or family == "compare"
            shape = re.sub(r"\d+", "#", reading)
            seen[p["schema"]].add(shape)
            if expect[p["schema"]]:
                assert shape == re.sub(r"[abc]", "#", expect[p["schema"]]), (p["schema"], reading)
            nums = [int(x) for x in re.findall(r"\d+", reading)]
            in_question = [int(x) for x in re.findall(r"\d+", p["question"])]
            assert all(x in in_question for x in nums)               # every number it reads is in the story
    assert set(seen) == set(expect)
    assert seen["compare-difference"] == {"# - # = ?", "# + ? = #"}
    assert seen["groups-change"] == {"# x # + # = ?", "# x # - # = ?"}
    text = " ".join(T.make_problem(rng, "take")["question"] for _ in range(300))
    assert re.search(r"\b(She|He|she|he|her|him|his)\b", text) and re.search(r"\bIf \w", text + " ".join(
        T.make_problem(rng, "multistep")["question"] for _ in range(100)))


def shape_trigrams(q):
    """Word triples of a question with numbers, names and nouns made placeholders."""
    nouns = {w for o in T.OBJECTS + T.COLOURS + T.PLACES + T.RELATIVES + list(T.PLURAL.values()) for w in o.split()}
    out = []
    for w in re.findall(r"[A-Za-z']+|\d+|[.,?$]", q):
        out.append("#" if w.isdigit() else "O" if w.lower().rstrip("s") in nouns or w.lower() in nouns else
                   "X" if w[0].isupper() and w not in ("She", "He", "There", "Then", "Each", "How", "What", "Now",
                                                       "If", "The", "Some", "A") else w.lower())
    return {tuple(out[i:i + 3]) for i in range(len(out) - 2)}


def test_held_out_wordings_never_appear_in_training():
    train, _ = T.build_corpus(3000, seed=0, n_val=10)
    held = T.make_split("wordings", 300, seed=0)
    text = " ".join(p["question"] for p in train)
    for verbs in (T.GAIN, T.LOSE, T.HAVE):
        for present, past in verbs[3::4]:   # every fourth verb is held out
            assert not re.search(rf"\b({present}|{past})\b", text), present
    assert all(not p["held"] for p in train) and all(p["held"] for p in held)
    seen = set().union(*map(shape_trigrams, (p["question"] for p in train)))
    new = [shape_trigrams(p["question"]) - seen for p in held]
    assert all(new), [p["question"] for p, n in zip(held, new) if not n][:3]   # each says something new
    assert {p["family"] for p in held} == set(T.SPLITS["wordings"][0])
    assert not {p["question"] for p in held} & {p["question"] for p in train}


def test_corpus_is_valid_seeded_and_held_out():
    train, val = T.build_corpus(3000, seed=1)
    again, _ = T.build_corpus(3000, seed=1)
    assert [p["question"] for p in train] == [p["question"] for p in again]   # reproducible
    T.validate_corpus(train, set())                                            # every equation true
    text = "\n".join("".join(T.problem_text(p)) for p in train)
    counts = collections.Counter(p["family"] for p in train)                    # the mix's shares
    assert counts == {f: 3000 * T.TRAINING_MIX.count(f) // len(T.TRAINING_MIX) for f in T.FAMILIES}
    assert re.search(r"(Mr|Mrs|Ms|Dr|Prof|Sgt)\. [A-Z]", text)                   # titles with a full stop
    held = {s: T.make_split(s, 300, seed=0) for s in T.SPLITS}
    train_q = {p["question"] for p in train}
    for split, problems in held.items():
        assert not train_q & {p["question"] for p in problems}, split
    assert not train_q & {p["question"] for p in val}
    # unseen combinations: no training equation ever computes a held-out pair
    for lhs, _ in T.EQUATION.findall(text):
        nums = [int(x) for x in lhs.split()[::2]]
        assert not (len(nums) == 2 and T.is_held_out_combo(*nums)), lhs
    # held-out facts: never multiplied or divided in training, and "a x b" never written
    for a, b in T.HELD_OUT_FACTS:
        assert f"{a} x {b}" not in text and f"{b} x {a}" not in text
        assert f"{a * b} / {a}" not in text and f"{a * b} / {b}" not in text
    assert all(any(T.is_held_out_combo(*pr) for pr in p["pairs"]) for p in held["combos"])
    assert all(any(T.is_held_out_fact(*f) for f in p["facts"]) for p in held["facts"])
    assert all(p["steps"] == 4 for p in held["steps4"])
    assert max(p["steps"] for p in train) == 3


def test_validate_corpus_catches_a_template_bug():
    bad = dict(T.make_problem(__import__("random").Random(0), "add"))
    bad["working"] = bad["working"].replace("=", "= 1", 1)
    with pytest.raises(AssertionError):
        T.validate_corpus([bad], set())
    leak = dict(bad, working="2 + 2 = 4.", answer=4, question="{name} has 2 apples.")
    with pytest.raises(AssertionError, match="placeholder"):
        T.validate_corpus([leak], set())


# 3. the model ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fused", [False, True])
def test_causal_mask(fused):
    model = tiny_model(fused_attention=fused)
    x = torch.randint(40, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(40, (2, 8))
    a, _ = model(x)
    b, _ = model(y)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_fused_and_explicit_attention_agree():
    a, b = tiny_model(fused_attention=False), tiny_model(fused_attention=True)
    b.load_state_dict(a.state_dict())
    x = torch.randint(40, (3, 25))
    assert torch.allclose(a(x)[0], b(x)[0], atol=1e-5)


def test_param_breakdown_matches_the_model():
    for cfg in [T.Config(), T.Config(vocab_size=512, n_layer=3, n_embd=96, n_head=3, block_size=64)]:
        assert sum(T.param_breakdown(cfg).values()) == sum(p.numel() for p in T.GPT(cfg).parameters())


def test_parameter_ceiling_refuses():
    with pytest.raises(T.UserError, match=r"over the ceiling of 2,000,000"):
        T.Config(n_embd=256, n_layer=8, n_head=4).check()
    T.Config(n_embd=256, n_layer=8, n_head=4).check(max_params=10_000_000)   # the explicit flag raises it
    with pytest.raises(T.UserError, match="not divisible by n_head=3: try --n-head 4"):
        T.Config(n_embd=160, n_head=3).check()


def test_default_configs_fit_the_ceiling():
    T.Config(vocab_size=101).check()
    T.Config(vocab_size=512).check()


# 4/5. data and training ------------------------------------------------------------------------

def test_loss_falls_when_overfitting(tmp_path):
    tok = T.CharTokenizer(set(TEXT))
    ids = T.cached_ids([TEXT * 5], tok, str(tmp_path))
    model = tiny_model(vocab_size=tok.vocab_size)
    model.train()
    opt = T.make_optimizer(model, 3e-3, 0.0, "cpu")
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        x, y, _ = T.get_batch({"ids": ids}, 8, 32, gen, "cpu")
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10


def test_rotary_scores_depend_only_on_distance():
    model = tiny_model(block_size=32)
    cos, sin = model.rope_cos, model.rope_sin
    q, k = torch.randn(8), torch.randn(8)   # one head of size 8 (n_embd 16, 2 heads)

    def score(m, n):   # q at position m looking at k at position n
        return (T.rotate(q, cos[m], sin[m]) @ T.rotate(k, cos[n], sin[n])).item()
    assert score(5, 2) == pytest.approx(score(25, 22), abs=1e-5)   # three back, wherever it is
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)     # but distance matters
    assert torch.allclose(T.rotate(q, cos[0], sin[0]), q)          # position 0 is not turned
    assert "wpe.weight" not in model.state_dict()                  # no table of positions to learn


def test_written_exactly_is_what_greedy_decoding_writes():
    tok = T.CharTokenizer("".join(chr(i) for i in range(32, 127)) + "\n")
    problems = sorted(T.build_corpus(60, seed=0)[0], key=lambda p: len("".join(T.problem_text(p))))[:2]
    torch.manual_seed(0)
    model = T.GPT(T.Config(vocab_size=tok.vocab_size, block_size=320, n_layer=2, n_head=2, n_embd=64))
    assert T.written_exactly(model, tok, problems) == 0.0   # untrained
    rows = [tok.encode("".join(T.problem_text(p))) + [tok.end_id] for p in problems]
    n = max(map(len, rows))
    batch = torch.tensor([r + [0] * (n - len(r)) for r in rows])
    keep = torch.tensor([[1] * (len(r) - 1) + [0] * (n - len(r)) for r in rows])   # no loss on the padding
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)   # 1e-2 stalled at a loss of 0.4 on these two
    for step in range(400):   # learn the two problems by heart
        _, loss = model(batch[:, :-1], batch[:, 1:].contiguous(), keep)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 20 == 19 and T.written_exactly(model, tok, problems) == 1.0:
            break
    assert T.written_exactly(model, tok, problems) == 1.0
    replies = T.ask(model, tok, [p["question"] for p in problems])
    assert replies == [T.problem_text(p)[1] for p in problems]   # greedy writes exactly the completions
    wrong = [dict(p, answer=p["answer"] + 1) for p in problems]   # one token off at the very end
    assert T.written_exactly(model, tok, wrong) == 0.0 and T.written_exactly(model, tok, problems[:1] + wrong[1:]) == 0.5


def test_cached_ids_are_reused_and_memory_mapped(tmp_path):
    tok = T.CharTokenizer(set(TEXT))
    a = T.cached_ids([TEXT], tok, str(tmp_path))
    b = T.cached_ids([TEXT], tok, str(tmp_path))
    assert isinstance(b, __import__("numpy").memmap) and list(a) == list(b)
    assert tok.decode([int(i) for i in a]) == TEXT + T.END
    assert len(os.listdir(tmp_path)) == 1


def test_loss_weights_score_the_answer_and_weigh_the_question_less():
    tok = T.CharTokenizer("".join(chr(i) for i in range(32, 127)) + "\n")
    problems = T.build_corpus(50, seed=0)[0][:3]
    ids, weights, starts = T.corpus_arrays(problems, tok)
    p, c = T.problem_text(problems[0])
    assert weights[:len(p)].sum() == 0 and (weights[len(p):len(p) + len(c) + 1] == 1).all()
    assert tok.decode(ids[starts[1]:starts[1] + 3].tolist()) == "Q: "
    splits = T.corpus_splits(problems, problems, tok, block_size=400)
    train_w, val_w = splits["train"]["weights"], splits["val"]["weights"]
    assert 0 < T.QUESTION_WEIGHT < 1
    assert (train_w[:len(p)] == T.QUESTION_WEIGHT).all() and (train_w[len(p):len(p) + len(c) + 1] == 1).all()
    assert (val_w == weights).all()   # the validation loss is the answer's alone
    # the loss is the weighted mean: weight 0 drops a target, equal weights give the plain mean
    model = tiny_model(vocab_size=tok.vocab_size, block_size=64)
    x = torch.from_numpy(ids[:40].astype("int64"))[None]
    y = torch.from_numpy(ids[1:41].astype("int64"))[None]
    w = torch.zeros(1, 40)
    w[0, 5] = 1.0
    per_token = torch.nn.functional.cross_entropy(model(x)[0][0], y[0], reduction="none")
    assert torch.allclose(model(x, y, w)[1], per_token[5])
    assert torch.allclose(model(x, y, torch.full((1, 40), 0.5))[1], per_token.mean())


def test_lr_schedule():
    assert T.lr_at(0.0, 1.0, 0.1) == 0.0
    assert T.lr_at(0.1, 1.0, 0.1) == pytest.approx(1.0)
    assert T.lr_at(0.55, 1.0, 0.1) == pytest.approx(0.5)   # half-way down the cosine
    assert T.lr_at(1.0, 1.0, 0.1) == pytest.approx(0.0)    # it ends at 0, not at a floor
    assert T.lr_at(0.5, 1.0, 0.1) < T.lr_at(0.3, 1.0, 0.1)


def test_the_saved_model_is_the_running_average_of_the_training_weights(tmp_path):
    tok = T.CharTokenizer(set(TEXT))
    ids = T.cached_ids([TEXT * 5], tok, str(tmp_path))

    def run(steps, ema):   # a fresh run of 3 steps stopped after `steps`; the checkpoint it saves
        out = str(tmp_path / f"m{steps}-{ema}.pt")
        s = T.TrainSettings(out=out, batch_size=4, max_iters=3, max_minutes=0, eval_interval=100, eval_iters=1,
                            device="cpu", dtype="fp32", ema=ema, stop_after=steps)
        T.train(tiny_model(vocab_size=tok.vocab_size), tok, {"train": {"ids": ids}}, s, {"device": "cpu", "dtype": "fp32"})
        return torch.load(out, weights_only=True)

    plain = [run(k, 0.0) for k in range(1, 4)]   # the weights after steps 1, 2, 3, without an average
    assert "training_weights" not in plain[0]
    ck = run(3, 0.5)
    for name, w in ck["training_weights"].items():   # averaging does not change the training itself
        assert torch.equal(w, plain[2]["model"][name]), name
    start = tiny_model(vocab_size=tok.vocab_size).state_dict()
    for name in start:   # average = keep * average + (1 - keep) * weights, keep = min(0.5, (1 + t) / (10 + t))
        want = start[name]
        for t, p in enumerate(plain):
            keep = min(0.5, (1 + t) / (10 + t))
            want = keep * want + (1 - keep) * p["model"][name]
        assert torch.allclose(ck["model"][name], want, atol=1e-6), name
    assert not torch.equal(ck["model"]["h.0.mlp.c_fc.weight"], ck["training_weights"]["h.0.mlp.c_fc.weight"])
    model = tiny_model(vocab_size=tok.vocab_size)   # --resume checks the training weights as it checks the model
    opt, gen = T.make_optimizer(model, 1e-3, 0.0, "cpu"), torch.Generator()
    with pytest.raises(T.UserError, match="training weights: its weights do not match its config"):
        T.restore_training(dict(ck, training_weights={"wte.weight": torch.zeros(3, 3)}), model, opt, gen, 0, 0, "cpu")
    T.restore_training(ck, model, opt, gen, 0, 0, "cpu")
    assert torch.equal(model.wte.weight, ck["training_weights"]["wte.weight"])


def test_save_load_gives_identical_logits(tmp_path):
    tok = T.CharTokenizer(set(TEXT))
    model = tiny_model(vocab_size=tok.vocab_size)
    path = str(tmp_path / "m.pt")
    T.save_checkpoint(path, checkpoint_state(model, tok))
    again, tok2 = T.model_from_checkpoint(T.load_checkpoint(path), path)
    x = torch.tensor([tok.encode(TEXT[:30])])
    assert torch.equal(model(x)[0], again.eval()(x)[0])
    assert [f for f in os.listdir(tmp_path)] == ["m.pt"]   # no temporary file left behind


# 6. sampling -----------------------------------------------------------------------------------

def test_kv_cache_matches_full_recomputation():
    model = tiny_model(block_size=24)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    with_cache = T.generate(model, prompts, 40, temperature=0.0, use_cache=True)
    without = T.generate(model, prompts, 40, temperature=0.0, use_cache=False)
    assert with_cache == without   # 40 new tokens overflow block 24: the cropping path is covered too
    # within the context, left padding in a batch changes nothing
    batch = T.generate(model, prompts, 15, temperature=0.0)
    assert batch == [T.generate(model, [p], 15, temperature=0.0)[0] for p in prompts]


@pytest.mark.parametrize("decoder, bias", [("FastDecoder", True), ("NumpyDecoder", True), ("NumpyDecoder", False)])
def test_fast_decoding_step_is_the_models_own_arithmetic(decoder, bias):
    model = tiny_model(block_size=24, bias=bias)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    assert T.generate(model, prompts, 40, fast=True) == T.generate(model, prompts, 40, fast=False)   # a batch
    assert all(T.generate(model, [p], 40) == T.generate(model, [p], 40, fast=False) for p in prompts)   # one row
    for rows, padded in ((prompts[1:2], False), (prompts, True)):   # one row alone, and left-padded rows
        n = max(map(len, rows))
        idx = torch.tensor([[0] * (n - len(p)) + p for p in rows])
        valid = torch.tensor([[False] * (n - len(p)) + [True] * len(p) for p in rows])
        plain, fast = ([T.KVCache(24) for _ in model.h] for _ in range(2))
        nxt = torch.full((len(rows), 1), 11)
        valid = torch.cat([valid, torch.ones(len(rows), 1, dtype=torch.bool)], 1)
        with torch.no_grad():
            for caches in (plain, fast):
                model(idx, caches=caches, valid=valid[:, :n] if padded else None)
            want = model(nxt, caches=plain, valid=valid if padded else None)[0]
            got = getattr(T, decoder)(model)(nxt, fast, valid if padded else None)
        assert got.shape == want.shape == (len(rows), 1, model.cfg.vocab_size)
        assert torch.allclose(got, want, atol=1e-5)
        assert [c.n for c in fast] == [c.n for c in plain] == [n + 1] * model.cfg.n_layer
        assert all(torch.allclose(f.k[:, :, :n + 1], p.k[:, :, :n + 1], atol=1e-6) for f, p in zip(fast, plain))


def test_the_decoder_is_kept_until_a_weight_changes():
    model = tiny_model()
    first = T.fast_decoder(model, "fp32", 1)
    assert type(first) is T.NumpyDecoder and T.fast_decoder(model, "fp32", 1) is first
    assert type(T.fast_decoder(model, "bf16", 1)) is T.FastDecoder   # autocast: PyTorch's kernels
    assert type(T.fast_decoder(model, "fp32", 8)) is T.FastDecoder   # a batch: PyTorch's matmuls
    for change in (lambda: model.h[0].mlp.c_fc.weight.mul_(3.0),   # in place, as an optimizer step
                   lambda: model.load_state_dict(tiny_model(seed=1).state_dict())):
        with torch.no_grad():
            change()
        now = T.fast_decoder(model, "fp32", 1)
        assert now is not first and T.fast_decoder(model, "fp32", 1) is now
        assert np.array_equal(now.layers[0][8], model.h[0].mlp.c_fc.weight.detach().numpy().T)
        assert T.generate(model, [[1, 2, 3]], 10) == T.generate(model, [[1, 2, 3]], 10, fast=False)
        first = now


def test_same_seed_same_samples_and_greedy_is_argmax():
    model = tiny_model()
    s1 = T.generate(model, [[1, 2]], 20, temperature=1.0, gen=torch.Generator().manual_seed(5))
    s2 = T.generate(model, [[1, 2]], 20, temperature=1.0, gen=torch.Generator().manual_seed(5))
    assert s1 == s2
    ctx, greedy = [1, 2], []
    for _ in range(10):
        nxt = model(torch.tensor([ctx]))[0][0, -1].argmax().item()
        greedy.append(nxt)
        ctx.append(nxt)
    assert T.generate(model, [[1, 2]], 10, temperature=0.0)[0] == greedy


def test_top_k_and_top_p_stay_in_the_best():
    logits = torch.randn(4, 50)
    best3 = torch.topk(logits, 3).indices
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        nxt = T.sample_next(logits, temperature=2.0, top_k=3, gen=gen)
        assert all(n in b for n, b in zip(nxt.tolist(), best3.tolist()))
    peaked = torch.full((1, 10), -10.0)
    peaked[0, 7] = 10.0
    assert all(T.sample_next(peaked, 1.0, top_p=0.5, gen=gen).item() == 7 for _ in range(50))


def test_generate_keeps_the_training_mode():
    model = tiny_model().train()
    T.generate(model, [[1, 2]], 3)
    assert model.training


def test_streaming_prints_every_token_once_and_the_end_even_cut_off(capsys):
    tok = T.BPETokenizer.train([TEXT] * 20, vocab_size=300)
    text = "Äpfel kosten 3 €. 🍎 and more text " * 3
    ids = tok.encode(text)
    on_token = T.streamer(tok)
    assert not any(on_token(0, i, None) for i in ids)
    on_token.finish()
    assert capsys.readouterr().out == text
    assert len(tok.encode("😀")) >= 2                  # never seen whole in training: several byte tokens
    cut = tok.encode("😀")[:-1]                         # the reply ends half-way through the character
    on_token = T.streamer(tok)
    for i in tok.encode("ok ") + cut:
        on_token(0, i, None)
    assert capsys.readouterr().out == "ok "      # the cut-off character waits ...
    on_token.finish()
    assert capsys.readouterr().out.startswith("\ufffd")   # ... and is printed at the end
    on_token = T.streamer(tok, stop="kosten")
    stopped = [on_token(0, i, None) for i in ids]
    assert capsys.readouterr().out == "Äpfel kosten" and stopped[-1] and any(stopped)


def test_end_token_stops_generation():
    model = tiny_model()
    first = T.generate(model, [[1, 2]], 1, temperature=0.0)[0][0]
    assert T.generate(model, [[1, 2]], 10, end_id=first, temperature=0.0) == [[]]


# 7. evaluation ---------------------------------------------------------------------------------

def test_score_reply_on_hand_written_replies():
    right = " 12 - 5: 12 - 5 = 7, 1 - 0 = 1... so 12 - 5 = 7.\nAnswer: 7"
    s = T.score_reply(right, 7)
    assert s["correct"] and s["format_ok"] and s["answer_is_last"]
    wrong = T.score_reply(" 4 + 3 = 8.\nAnswer: 8", 7)
    assert not wrong["correct"] and not wrong["equations_ok"] and wrong["answer_is_last"]
    lucky = T.score_reply(" 4 + 3 = 8, so 4 + 3 = 7.\nAnswer: 7", 7)
    assert lucky["correct"] and not lucky["equations_ok"]
    missing = T.score_reply(" 4 + 3 = 7.", 7)
    assert not missing["correct"] and not missing["format_ok"]
    assert T.score_reply(" 2 x 3: 3 (1), 3 + 3 = 6 (2), so 2 x 3 = 6.\nAnswer: 6", 6)["equations_ok"]
    assert not T.check_equation("7 / 2", "3")
    counted = " 35 vs 98: 3 < 9. 35 + ? = 98. ? = 98 - 35. 98 - 35: 8 - 5 = 3, 9 - 3 = 6, so 98 - 35 = 63.\nAnswer: 63"
    assert T.score_reply(counted, 63) == dict(got=63, correct=True, format_ok=True, read_ok=True,
                                              equations_ok=True, answer_is_last=True)
    # the reading: the equation set up first, solved exactly, against the true answer
    misread = T.score_reply(" 12 + 5 = ?. 12 + 5: 2 + 5 = 7, 1 + 0 = 1, so 12 + 5 = 17.\nAnswer: 17", 7)
    assert not misread["read_ok"] and misread["equations_ok"] and not misread["correct"]
    slip = T.score_reply(" 5 + ? = 12. ? = 12 - 5. 12 - 5 = 8.\nAnswer: 8", 7)
    assert slip["read_ok"] and not slip["equations_ok"]           # read right, computed wrong
    assert T.reading_value("? - 18 = 25. ? = 25 + 18.") == 43 and T.reading_value("6 x ? = 42.") == 7
    assert T.reading_value("3 x 4 + 5 = ?.") == 17 and T.reading_value("no reading here") is None
    assert T.reading_value("3? + 4 = 7.") is None and not T.score_reply(" 3? + 4 = 7.\nAnswer: 3", 3)["read_ok"]
    # whatever a half-trained model writes, reading it never raises: one odd reply must not stop an eval
    rng = random.Random(0)
    pieces = list("0123456789?") * 3 + [" ", " + ", " - ", " x ", " / ", " = ", ". ", ": ", " vs ", " < ", "\nAnswer: "]
    for _ in range(5000):
        T.score_reply("".join(rng.choice(pieces) for _ in range(rng.randint(1, 40))), 7)
    false_sign = T.score_reply(" 49 vs 48: 4 < 4. 48 + ? = 49: 8 + 1 = 9, 4 + 0 = 4, so ? = 1.\nAnswer: 1", 1)
    assert false_sign["correct"] and not false_sign["equations_ok"]   # a false comparison is a false step


def test_questions_are_typed_plainly_and_one_that_cannot_be_encoded_is_a_failure():
    assert T.typed("Ann\u2019s 3 pens \u2013 \u201cnew\u201d . Fred 's ?") == 'Ann\'s 3 pens - "new". Fred\'s?'
    tok = T.CharTokenizer(__import__("string").printable)
    model = T.GPT(T.Config(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=1, n_embd=8))
    qs = [{"question": "Ann\u2019s 2 + 2?", "answer": 4}, {"question": "Zo\u00eb has 3.", "answer": 3},
          {"question": "What is 1 + 1?", "answer": 2}]
    replies = T.ask(model, tok, [q["question"] for q in qs])
    assert replies[1].startswith("(not asked: ") and "'\u00eb'" in replies[1]   # the reason, named
    assert not replies[0].startswith("(not asked") and not replies[2].startswith("(not asked")
    s = T.evaluate(model, tok, qs)
    assert s["n"] == 3 and any(f["reply"].startswith("(not asked") for f in s["failures"])


def test_wilson_interval():
    lo, hi = T.wilson(95, 100)
    assert 0.88 < lo < 0.9 and 0.97 < hi < 0.99
    assert T.wilson(0, 10)[0] == 0.0


def test_read_questions_and_its_errors(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text('{"question": "What is 2 + 2?", "answer": 4}\n\n{"question": "x", "answer": 1, "family": "f"}\n')
    qs = T.read_questions(str(p))
    assert [q["answer"] for q in qs] == [4, 1] and qs[1]["family"] == "f"
    for body, msg in [('{"question": "a", "answer": 1}\nnot json\n', "line 2: not valid JSON"),
                      ('{"answer": 1}\n', 'line 1: needs a "question"'),
                      ('{"question": "a", "answer": "7"}\n', 'line 1: needs an integer "answer"')]:
        p.write_text(body)
        with pytest.raises(T.UserError, match=msg):
            T.read_questions(str(p))


# 8. putting it together -------------------------------------------------------------------------

def test_the_joining_chapter_trains_saves_and_scores_on_held_out_questions(tmp_path, monkeypatch):
    # the dtype race can choose differently from one call to the next on a busy machine: both runs get fp32
    monkeypatch.setattr(T, "pick_dtype", lambda name, device: "fp32")
    out = str(tmp_path / "lesson.pt")
    model, tokenizer, summary = T.learn_to_think(out, minutes=0, max_iters=30, corpus_size=300, n_questions=14)
    assert summary["n"] == 14 and set(summary["per_split"]) == {"questions"}   # held-out questions, all scored
    assert set(summary["per_family"]) == set(T.FAMILIES)
    rows = [json.loads(line) for line in open(T.log_path(out))]
    assert [r["step"] for r in rows] == [0, 30] and rows[1]["val_loss"] < rows[0]["val_loss"] - 1   # it learned
    again, _ = T.model_from_file(out)   # the checkpoint is the model it returned, and the CLI reads it
    x = torch.tensor([tokenizer.encode(T.ask_prompt("What is 2 + 3?"))])
    assert torch.allclose(model.cpu().eval()(x)[0], again.eval()(x)[0])
    assert T.main(["info", "--checkpoint", out]) == 0
    cli = str(tmp_path / "cli.pt")   # the chapter is the default train run: the same weights, bit for bit
    assert T.main(["train", "--max-minutes", "0", "--max-iters", "30", "--corpus-size", "300", "--out", cli]) == 0
    trained, _ = T.model_from_file(cli)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), trained.state_dict().values()))
    with pytest.raises(T.UserError, match="already holds a checkpoint"):   # never overwritten
        T.learn_to_think(out, max_iters=1, corpus_size=300)


# 10. the command line, end to end ----------------------------------------------------------------

def test_cli_train_generate_info_on_user_text(tmp_path):
    data = tmp_path / "input.txt"
    data.write_bytes(("\ufeff" + "The cat sat on the mat.\r\nThe dog sat on the log.\r" * 80).encode())
    ck = str(tmp_path / "ck" / "m.pt")
    r = run_cli("train", "--data", str(data), "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
                "--block-size", "32", "--batch-size", "8", "--max-iters", "30", "--eval-interval", "15",
                "--out", ck, "--dtype", "fp32", "--cache-dir", str(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr
    assert "step 30" in r.stdout and "total" in r.stdout and os.path.exists(ck)
    assert "batch 8 x 32, lr 0.003," in r.stdout   # the learning rate chosen for text
    # 30 steps of 8 x 32 tokens read this 3,200-token text about twice: no dropout, and it says so; the shape
    # was given, so only the dropout and weight decay are chosen
    assert ("chosen for your text: 3,456 training tokens, about 2.2 passes in this budget; it is still being "
            "learned at the end: no dropout, and 3 layers for more steps (dropout 0, weight_decay 0.1;") in r.stdout
    assert os.path.exists(T.best_path(ck))
    g = run_cli("generate", "--checkpoint", ck, "--prompt", "The cat", "--max-new-tokens", "20",
                "--temperature", "0.8", "--top-k", "5", "--seed", "1")
    assert g.returncode == 0 and g.stdout.startswith("The cat") and len(g.stdout) > len("The cat") + 5
    g2 = run_cli("generate", "--checkpoint", ck, "--prompt", "The cat", "--max-new-tokens", "20",
                 "--temperature", "0.8", "--top-k", "5", "--seed", "1")
    assert g.stdout == g2.stdout   # same seed, same sample
    i = run_cli("info", "--checkpoint", ck)
    assert i.returncode == 0 and "step 30" in i.stdout and "char, " in i.stdout
    again = run_cli("train", "--data", str(data), "--out", ck)
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr
    res = run_cli("train", "--out", ck, "--resume", "--max-iters", "40", "--eval-interval", "10",
                  "--cache-dir", str(tmp_path / "cache"))
    assert res.returncode == 0, res.stderr
    assert "step 40" in res.stdout and "step 10:" not in res.stdout


def test_shape_and_regularisation_follow_how_often_the_budget_reads_the_text(tmp_path):
    sizes = (10_000_000, 1_000_000, 500_000, 300_000, 100_000)   # read 0.9, 9, 18, 30 and 90 times in 10 minutes
    ten_minutes = [T.fit_to_text(n, 10, 1_000_000, 16, 128) for n in sizes]
    assert [c["dropout"] for c, _ in ten_minutes] == [0.0, 0.0, 0.0, 0.2, 0.2]   # a text read 20+ times is memorised
    assert [c["n_embd"] for c, _ in ten_minutes] == [192, 192, 192, 128, 128]
    assert [c["n_layer"] for c, _ in ten_minutes] == [3, 3, 3, 4, 4]   # shallower, for more steps, but 4 x 128
    assert [c["weight_decay"] for c, _ in ten_minutes] == [0.1, 1.0, 1.0, 0.1, 0.1]   # read 5-20 times: decay holds it back
    assert "weight decay 1.0" in ten_minutes[1][1]
    assert "about 0.9 passes" in ten_minutes[0][1] and "about 90.0 passes" in ten_minutes[4][1]
    # a step budget smaller than the minutes' reads only its own steps' tokens
    assert "about 1.0 passes" in T.fit_to_text(20 * 16 * 128, 10, 20, 16, 128)[1]
    data = tmp_path / "t.txt"
    data.write_text("The cat sat on the mat. " * 200)   # 4,320 training tokens
    common = ["train", "--data", str(data), "--block-size", "16", "--batch-size", "4",
              "--eval-interval", "2", "--dtype", "fp32", "--cache-dir", str(tmp_path / "cache"),
              "--max-iters", "1500", "--stop-after", "1"]   # 1,500 steps would read it 22 times
    chosen = run_cli(*common, "--out", str(tmp_path / "a.pt"))
    assert chosen.returncode == 130 and "about 22.2 passes" in chosen.stdout and "dropout 0.2, " in chosen.stdout
    cfg = T.load_checkpoint(str(tmp_path / "a.pt"))["config"]
    assert (cfg["dropout"], cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["mlp_ratio"]) == (0.2, 4, 128, 2, 4)
    given = run_cli(*common, "--dropout", "0.05", "--n-layer", "1", "--n-embd", "48",
                    "--out", str(tmp_path / "b.pt"))
    assert given.returncode == 130 and "chosen for your text" in given.stdout   # the weight decay still is
    cfg = T.load_checkpoint(str(tmp_path / "b.pt"))["config"]
    assert (cfg["dropout"], cfg["n_layer"], cfg["n_embd"], cfg["n_head"]) == (0.05, 1, 48, 3)   # width keeps heads
    mid = run_cli(*common[:-4], "--max-iters", "700", "--stop-after", "1", "--out", str(tmp_path / "c.pt"))
    assert mid.returncode == 130 and "about 10.4 passes" in mid.stdout and "n_layer 3, " in mid.stdout
    ck = T.load_checkpoint(str(tmp_path / "c.pt"))
    assert (ck["config"]["n_layer"], ck["config"]["n_embd"], ck["meta"]["settings"]["weight_decay"]) == (3, 192, 1.0)


def test_cli_thinking_corpus_train_and_eval(tmp_path):
    ck = str(tmp_path / "m.pt")
    r = run_cli("train", "--corpus-size", "500", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
                "--batch-size", "4", "--max-iters", "4", "--eval-interval", "2", "--out", ck)
    assert r.returncode == 0, r.stderr
    assert "probe 0.0% (200 validation problems written exactly)" in r.stdout
    assert "batch 4 x 192, lr 0.003," in r.stdout and "bpe tokenizer" in r.stdout   # the built-in corpus's own defaults
    assert "(MLP 4x)" in r.stdout and T.load_checkpoint(ck)["config"]["mlp_ratio"] == 4
    # four steps teach nothing: the run says so, and the command it gives continues the same run
    assert "NOT LEARNED YET" in r.stdout and "it has not reached 95%" in r.stdout
    again = r.stdout.strip().splitlines()[-1].split()
    assert again[:2] == ["python", "tinyllm.py"] and "--resume" in again and "--max-iters" in again
    r2 = run_cli(*again[2:], "--eval-interval", "2")
    assert r2.returncode == 0, r2.stderr
    assert "resuming at step 4" in r2.stdout and "done: 8 steps" in r2.stdout
    e = run_cli("eval", "--checkpoint", ck, "-n", "7", "--json")
    s = json.loads(e.stdout)
    assert e.returncode == 0 and s["n"] == 7 and 0 <= s["accuracy"] <= 1 and "per_family" in s
    q = tmp_path / "q.jsonl"
    q.write_text('{"question": "What is 2 + 2?", "answer": 4}\n')
    e = run_cli("eval", "--checkpoint", ck, "--questions", str(q))
    assert e.returncode == 0 and "1 questions" in e.stdout


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "missing.txt"], "does not exist"),
    (["train", "--data", "empty.txt"], "is empty"),
    (["train", "--data", "blank.txt"], "is empty"),
    (["train", "--data", "latin1.txt"], "is not UTF-8"),
    (["train", "--data", "binary.bin"], "looks binary"),
    (["train", "--data", "short.txt"], "too short for --block-size"),
    (["train", "--data", "short.txt", "--tokenizer", "bpe", "--vocab-size", "100"], "--vocab-size 100 is out of range"),
    (["train", "--tokenizer", "wordpiece"], "invalid choice"),
    (["train", "--corpus-size", "300", "--block-size", "16"], "--block-size must be at least"),
    (["train", "--n-embd", "100", "--n-head", "3"], "not divisible by n_head=3"),
    (["train", "--n-embd", "512", "--n-head", "4"], "over the ceiling"),
    (["train", "--lr", "nan"], "--lr must be a finite number"),
    (["train", "--lr", "-1"], "--lr must be > 0"),
    (["train", "--max-minutes", "inf"], "finite"),
    (["generate", "--prompt", "hi", "--checkpoint", "nothing.pt"], "no checkpoint at nothing.pt"),
    (["generate", "--prompt", "hi", "--checkpoint", "notackpt.pt"], "not a loadable tinyllm checkpoint"),
    (["generate", "--prompt", "hi", "--checkpoint", "other.pt"], "made by another program"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "--temperature must be >= 0"),
    (["generate", "--prompt", "hi", "--top-k", "0"], "--top-k must be >= 1"),
    (["generate", "--prompt", "hi", "--top-p", "1.5"], "--top-p must be <= 1"),
    (["eval", "--questions", "nothing.jsonl"], "does not exist"),
    (["eval", "--questions", "latin1.txt"], "is not UTF-8"),
    (["eval", "--questions", "."], "is not a regular file"),
    (["eval", "--questions", "huge_answer.jsonl"], "line 1: not a question this tool can read"),
    (["eval", "--questions", "big_answer.jsonl"], 'needs an integer "answer" (under 10^18)'),
    (["eval", "--questions", "big_number.jsonl"], "holds a number of over 18 digits"),
    (["eval", "--questions", "deep.jsonl"], "line 1: not a question this tool can read"),
    (["generate", "--prompt", "hi", "--temperature", "1e-300"], "--temperature must be 0 (greedy) or at least 0.01"),
    (["generate", "--prompt", "hi", "--repetition-penalty", "1e-300"], "--repetition-penalty must be >= 0.01"),
    (["generate", "--prompt", "hi", "--seed", str(10 ** 23)], "--seed must be <="),
    (["train", "--seed", "-1"], "--seed must be >= 0"),
    (["train", "--block-size", "100000"], "--block-size must be <= 8192"),
    (["train", "--batch-size", str(10 ** 9)], "--batch-size must be <= 4096"),
    (["train", "--batch-size", "4096", "--block-size", "8192"], "tokens a step; at most 1,048,576"),
    (["train", "--n-layer", "100000"], "--n-layer must be <= 64"),
    (["train", "--data", "/dev/zero"], "is not a regular file"),
    (["train", "--cache-dir", "short.txt/cache", "--data", "short.txt", "--block-size", "4"], "cannot make the folder"),
])
def test_bad_input_gets_a_clear_message(tmp_path, args, message):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_bytes(b"\xef\xbb\xbf  \r\n\t\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1") * 50)
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "short.txt").write_text("just a few words")
    (tmp_path / "notackpt.pt").write_bytes(b"garbage" * 100)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    (tmp_path / "huge_answer.jsonl").write_text('{"question": "q", "answer": ' + "9" * 5000 + "}\n")
    (tmp_path / "big_answer.jsonl").write_text('{"question": "q", "answer": ' + "9" * 30 + "}\n")
    (tmp_path / "big_number.jsonl").write_text(json.dumps({"question": "What is " + "9" * 5000 + " + 1?", "answer": 1}))
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    r = run_cli(*args, "--out" if args[0] == "train" else "--device", str(tmp_path / "o.pt") if args[0] == "train" else "cpu",
                cwd=tmp_path, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert message in r.stderr.strip().splitlines()[-1]   # one line says it (argparse prints usage above)


def test_empty_prompt_and_unknown_characters(tmp_path):
    tok = T.CharTokenizer(set("abc \n"))
    model = tiny_model(vocab_size=tok.vocab_size)
    path = str(tmp_path / "m.pt")
    T.save_checkpoint(path, checkpoint_state(model, tok))
    r = run_cli("generate", "--checkpoint", path, "--prompt", "  ")
    assert r.returncode == 2 and "prompt is empty" in r.stderr
    r = run_cli("generate", "--checkpoint", path, "--prompt", "abc xyz")
    assert r.returncode == 2 and "never saw: 'x' 'y' 'z'" in r.stderr
    r = run_cli("generate", "--checkpoint", path, "--prompt", "abc" * 20, "--max-new-tokens", "5")
    assert r.returncode == 0 and "only its end is used" in r.stderr
    r = run_cli("generate", "--checkpoint", path, "--prompt", "abc", "--max-new-tokens", "0")
    assert r.returncode == 0 and r.stdout == "abc\n"


# reliability: resume, interruption, refusal of unsafe files -----------------------------------

def small_train_args(data, out, *extra):
    return ["train", "--data", str(data), "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
            "--block-size", "32", "--batch-size", "4", "--eval-interval", "5", "--max-minutes", "0",
            "--dtype", "fp32", "--dropout", "0.1", "--out", str(out), "--cache-dir", str(out) + ".cache", *extra]


def test_resume_is_bit_identical(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("the rain in spain stays mainly in the plain. " * 40)
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    # on a CPU (the claim; GPU kernels may sum in a different order from run to run)
    assert run_cli(*small_train_args(data, one, "--max-iters", "20", "--device", "cpu")).returncode == 0
    r = run_cli(*small_train_args(data, two, "--max-iters", "20", "--stop-after", "10", "--device", "cpu"))
    assert r.returncode == 130 and "--resume" in r.stdout
    assert torch.load(two, weights_only=True)["step"] == 10
    r = run_cli("train", "--out", str(two), "--resume", "--max-iters", "20", "--max-minutes", "0", "--dtype", "fp32",
                "--cache-dir", str(two) + ".cache", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    assert a["step"] == b["step"] == 20
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_compile_time_is_not_counted_in_the_budget(tmp_path, monkeypatch):
    # compiling makes the first step slow; if that counted, a short budget (and the time-based warm-up)
    # would be over after one step. A stand-in for torch.compile whose first call takes 4 seconds
    # makes this independent of how fast (or how cached) the real compiler is.
    import time

    def slow_first_call(model):
        calls = []

        def fwd(*args):
            if not calls:
                time.sleep(4)
            calls.append(1)
            return model(*args)
        return fwd
    monkeypatch.setattr(torch, "compile", slow_first_call)
    tok = T.CharTokenizer(set(TEXT))
    ids = T.cached_ids([TEXT * 5], tok, str(tmp_path))
    s = T.TrainSettings(out=str(tmp_path / "m.pt"), batch_size=4, max_minutes=0.05, eval_interval=100000,
                        eval_iters=1, device="cpu", dtype="fp32", compile=True)   # a cheap step-0 evaluation
    r = T.train(tiny_model(vocab_size=tok.vocab_size), tok, {"train": {"ids": ids}}, s,
                {"device": "cpu", "dtype": "fp32"})
    assert r["step"] >= 3 and r["elapsed"] < 4   # counted, the 4 s first step alone would end the 3 s budget


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_ctrl_c_saves_a_resumable_checkpoint(tmp_path, sig):
    # Ctrl-C, and a shutdown, `timeout`, a closed terminal or a job scheduler (SIGTERM, SIGHUP)
    import signal
    import time
    data = tmp_path / "d.txt"
    data.write_text("the rain in spain stays mainly in the plain. " * 40)
    out = tmp_path / "m.pt"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "tinyllm.py"),
                          *small_train_args(data, out, "--max-iters", "1000000")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not out.exists() and time.time() < deadline:   # wait until training has really begun
        time.sleep(0.2)
    p.send_signal(getattr(signal, sig))
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr
    assert "--resume" in stdout and "Traceback" not in stderr
    ck = T.load_checkpoint(str(out))
    assert ck["step"] > 0
    T.model_from_checkpoint(ck)
    assert not os.path.exists(str(out) + ".lock")   # the lock went with the training
    assert [f for f in os.listdir(tmp_path) if ".tmp" in f] == []


def test_a_reader_that_leaves_and_odd_chat_commands(tmp_path):
    tok = T.CharTokenizer("abc \n")
    path = str(tmp_path / "m.pt")
    T.save_checkpoint(path, checkpoint_state(tiny_model(vocab_size=tok.vocab_size), tok))
    cmd = f"{sys.executable} {os.path.join(ROOT, 'tinyllm.py')} generate --checkpoint {path} --prompt ab " \
          "--temperature 1 --max-new-tokens 5000 | head -c 3"
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)   # `| head`
    assert r.stdout == "ab" + r.stdout[2:] and len(r.stdout) == 3 and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tinyllm.py"), "chat", "--checkpoint", path],
                       input="/topk 1" + "0" * 400 + "\n/temp 0.000000000001\n/temp 1e-300\nab\n",
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.count("commands: /temp T") == 3   # each refused with the help line, then the question


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_one_training_per_out_and_what_dead_runs_left_is_cleared(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("the rain in spain stays mainly in the plain. " * 40)
    out = tmp_path / "m.pt"
    (tmp_path / "m.pt.lock").write_text(str(os.getpid()))   # a live training holds it
    r = run_cli(*small_train_args(data, out, "--max-iters", "5"))
    assert r.returncode == 2 and f"another training (pid {os.getpid()}) is writing" in r.stderr
    assert not out.exists()
    pid = dead_pid()
    (tmp_path / "m.pt.lock").write_text(str(pid))             # a training that died (kill -9)
    cache = tmp_path / "m.pt.cache"
    cache.mkdir()
    left = [tmp_path / f".m.pt.tmp{pid}", tmp_path / f".write-test{pid}", cache / f"ids-0000abcd-1.uint16.bin.tmp{pid}"]
    for f in left:
        f.write_bytes(b"x" * 100)
    live = tmp_path / f".other.pt.tmp{os.getpid()}"           # a live process's save in progress
    live.write_bytes(b"x")
    mine = tmp_path / f"notes.tmp{pid}"                       # a user's file: not a name tinyllm makes
    mine.write_bytes(b"x")
    r = run_cli(*small_train_args(data, out, "--max-iters", "5"))
    assert r.returncode == 0, r.stderr
    assert f"(pid {pid}) no longer runs" in r.stderr
    assert not any(f.exists() for f in left) and live.exists() and mine.exists()
    assert not (tmp_path / "m.pt.lock").exists() and out.exists()


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "/dev/zero"], "is not a regular file"),
    (["train", "--out", "afolder"], "exists and is not a regular file"),
    (["train", "--out", "afolder", "--overwrite"], "exists and is not a regular file"),
    (["plot", "run.log.jsonl", "--out", "report"], "report.png already exists"),
    (["plot", "run.log.jsonl", "--out", "x.xyz"], "a picture is written as"),
    (["plot", "run.log.jsonl", "--out", "missing/x.png"], "does not exist"),
    (["plot", "run.log.jsonl", "--out", "pic.png", "--overwrite"], "is not a regular file"),
    (["attention", "--prompt", "ab", "--checkpoint", "m.pt", "--out", "report"], "report.png already exists"),
    (["export", "--format", "hf", "--checkpoint", "m.pt", "--out", "report.png", "--overwrite"], "is not a folder"),
    (["export", "--format", "onnx", "--checkpoint", "m.pt", "--out", "afolder", "--overwrite"],
     "is not a regular file"),
    (["export", "--format", "onnx", "--checkpoint", "m.pt", "--out", "missing/m.onnx"], "does not exist"),
    (["plot", "afolder"], "no training log at afolder"),
    (["plot", "latin1.log.jsonl"], "not UTF-8 JSON Lines"),
    (["plot", "noloss.log.jsonl"], "each needs tokens, train_loss and val_loss"),
])
def test_outputs_are_checked_before_any_work(tmp_path, args, message):
    # nothing is written to a path other than the one named, a non-regular file is never replaced,
    # and "wrote" means written
    (tmp_path / "afolder").mkdir()
    (tmp_path / "pic.png").mkdir()
    (tmp_path / "report.png").write_bytes(b"the user's picture")
    (tmp_path / "run.log.jsonl").write_text(json.dumps({"step": 0, "tokens": 0, "train_loss": 1.0, "val_loss": 1.0}) + "\n")
    (tmp_path / "latin1.log.jsonl").write_bytes('{"step": 0, "note": "caf\xe9"}\n'.encode("latin-1"))
    (tmp_path / "noloss.log.jsonl").write_text(json.dumps({"step": 0, "tokens": 0, "val_loss": 1.0}) + "\n")
    tok = T.CharTokenizer("abc")
    T.save_checkpoint(str(tmp_path / "m.pt"), checkpoint_state(tiny_model(vocab_size=tok.vocab_size), tok))
    r = run_cli(*args, cwd=tmp_path, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and message in r.stderr.strip().splitlines()[-1]
    assert (tmp_path / "report.png").read_bytes() == b"the user's picture"
    assert os.listdir(tmp_path / "afolder") == [] and os.listdir(tmp_path / "pic.png") == []
    assert not (tmp_path / "afolder.png").exists()


def test_untrusted_checkpoint_cannot_run_code(tmp_path):
    import pickle
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": T.CHECKPOINT_FORMAT, "payload": Evil()}, f)
    with pytest.raises(T.UserError, match="not a loadable tinyllm checkpoint"):
        T.load_checkpoint(str(path))
    assert not marker.exists()


def hostile(change):
    """A valid tiny checkpoint's state with one change made to it (a function of the state)."""
    tok = T.CharTokenizer("abc")
    state = checkpoint_state(tiny_model(vocab_size=tok.vocab_size), tok, meta={"data": None})
    change(state)
    return state


HOSTILE = [   # (what the file holds, what the tool must say): one line to add the next one
    (lambda s: s["config"].update(block_size=50_000), "block_size is 50000, it must be a whole number from 1 to 8192"),
    (lambda s: s["config"].update(block_size=10 ** 5), "block_size is 100000"),
    (lambda s: s["config"].update(n_layer=100_000), "n_layer is 100000"),
    (lambda s: s["config"].update(n_embd=10 ** 6), "n_embd is 1000000"),
    (lambda s: s["config"].update(n_embd="16"), "n_embd is '16', it must be a whole number"),
    (lambda s: s["config"].update(n_embd=16.5), "n_embd is 16.5"),
    (lambda s: s["config"].update(n_head=0), "n_head is 0"),
    (lambda s: s["config"].update(mlp_ratio=0), "mlp_ratio is 0, it must be a whole number from 1 to 16"),
    (lambda s: s["config"].update(n_head=3), "n_embd=16 is not divisible by n_head=3"),
    (lambda s: s["config"].update(dropout=5.0), "dropout is 5.0"),
    (lambda s: s["config"].update(bias="yes"), "bias is 'yes', it must be true or false"),
    (lambda s: s["config"].pop("n_layer"), "n_layer is missing"),
    (lambda s: s["config"].update(n_layer=64, n_embd=4096, n_head=64), "claims a model of"),
    (lambda s: s.update(config=[1, 2]), "broken config (not a dictionary"),
    (lambda s: s.update(tokenizer="[1, 2]"), "tokenizer is not a JSON object"),
    (lambda s: s.update(tokenizer=7), "tokenizer is not a JSON object"),
    (lambda s: s.update(tokenizer="not json"), "broken tokenizer"),
    (lambda s: s.update(tokenizer=json.dumps({"kind": "bpe", "tokenizer": "not json"})), "broken tokenizer"),
    (lambda s: s.update(tokenizer=json.dumps({"kind": "char", "chars": ""})), "not one this tool writes"),
    (lambda s: s["model"].update({"wte.weight": "strings"}), "not a dictionary of tensors"),
    (lambda s: s["model"].update({"extra": torch.zeros(3)}), "unexpected ['extra']"),
    (lambda s: s["model"].update({"wte.weight": s["model"]["wte.weight"].half()}), "wrong shape or dtype"),
    (lambda s: s["model"].update({"wte.weight": torch.zeros(5, 5)}), "wrong shape or dtype for ['wte.weight'"),
    (lambda s: s["model"].pop("ln_f.weight"), "missing ['ln_f.weight']"),
    (lambda s: s.update(meta=None), "meta is not a dictionary"),
    (lambda s: s.pop("step"), "step is None"),
    (lambda s: s.update(step=-5), "step is -5"),
    (lambda s: s.update(best_val_loss="low"), "best_val_loss is 'low'"),
]


@pytest.mark.parametrize("change, message", HOSTILE)
def test_hostile_checkpoints_are_refused_before_anything_is_built(tmp_path, change, message, capsys):
    path = tmp_path / "h.pt"
    torch.save(hostile(change), path)
    assert T.main(["info", "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_checkpoints_from_before_mlp_ratio_load_with_gpt2s_4(tmp_path):
    # older checkpoints have no mlp_ratio in their config: every one of them widened its MLP 4 times
    tok = T.CharTokenizer("abc")
    for ratio, loads in [(4, True), (2, False)]:
        model = tiny_model(vocab_size=tok.vocab_size, mlp_ratio=ratio)
        state = checkpoint_state(model, tok, meta={"data": None})
        del state["config"]["mlp_ratio"]
        path = tmp_path / f"old{ratio}.pt"
        torch.save(state, path)
        if loads:
            old, _ = T.model_from_file(str(path))
            x = torch.randint(tok.vocab_size, (2, 9))
            assert old.cfg.mlp_ratio == 4 and torch.equal(old(x)[0], model(x)[0])
        else:   # a config without the field whose weights are 2 times wide: refused, not misread
            with pytest.raises(T.UserError, match="do not match its config"):
                T.model_from_file(str(path))


def test_refusing_every_hostile_checkpoint_takes_little_memory(tmp_path):
    # one process refuses them all; its peak memory bounds each refusal's
    paths = []
    for i, (change, _) in enumerate(HOSTILE):
        paths.append(str(tmp_path / f"h{i}.pt"))
        torch.save(hostile(change), paths[-1])
    code = (PEAK_MB_CODE + "import sys; sys.path.insert(0, sys.argv[1]); import tinyllm as T\n"
            "codes = [T.main(['info', '--checkpoint', p]) for p in sys.argv[2:]]\n"
            "print(set(codes), PEAK_MB())")
    r = subprocess.run([sys.executable, "-c", code, ROOT, *paths], capture_output=True, text=True, timeout=300)
    codes, peak_mb = r.stdout.strip().rsplit(" ", 1)
    assert codes == "{2}" and "Traceback" not in r.stderr, r.stderr
    assert int(peak_mb) < 400   # importing torch alone is about 225 MB


# a process's peak memory in MB: VmHWM starts afresh at exec (getrusage's maxrss would count the
# memory of the pytest process the child was forked from)
PEAK_MB_CODE = ("def PEAK_MB():\n"
                "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) // 1024\n")


def run_measured(*args):
    """run_cli, and the child's peak memory (its own getrusage, printed at exit) in MB."""
    code = (PEAK_MB_CODE + "import runpy, sys; sys.argv = sys.argv[1:]\n"
            "try: runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "finally: print('PEAK', PEAK_MB(), file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "tinyllm.py"), *args],
                       capture_output=True, text=True, timeout=120)
    peak = re.findall(r"PEAK (\d+)", r.stderr)
    r.peak_mb = int(peak[-1]) if peak else float("inf")
    r.stderr = re.sub(r"PEAK \d+\n?", "", r.stderr)
    return r


def test_a_compressed_checkpoint_cannot_unpack_to_gigabytes(tmp_path):
    # 100 MB of zeros hidden in a file of about 100 KB: torch.save never compresses, so this is refused
    import zipfile
    plain, packed = tmp_path / "plain.pt", tmp_path / "packed.pt"
    torch.save(hostile(lambda s: s["model"].update({"bomb": torch.zeros(25_000_000)})), plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            dst.writestr(item.filename, src.read(item.filename))
    assert os.path.getsize(packed) < 2_000_000
    r = run_measured("info", "--checkpoint", str(packed))
    assert r.returncode == 2 and "holds compressed data" in r.stderr and r.peak_mb < 400, (r.stderr, r.peak_mb)
    r = run_measured("info", "--checkpoint", str(plain))   # stored: mapped, not read; refused by its keys
    assert r.returncode == 2 and "unexpected ['bomb']" in r.stderr and r.peak_mb < 400, (r.stderr, r.peak_mb)


def test_a_broken_training_state_cannot_be_resumed(tmp_path):
    tok = T.CharTokenizer("abc")
    model = tiny_model(vocab_size=tok.vocab_size)
    for change, message in [({"meta": {"data": None}}, "its run settings (meta) are missing"),
                            ({"meta": {"data": 5, "corpus_format": "working", "corpus_size": 10, "settings": {}}},
                             "data paths are not a list"),
                            ({"meta": {"data": None, "corpus_format": "working", "corpus_size": 10,
                                       "settings": {"batch_size": -3}}}, "training settings are odd"),
                            ({"meta": {"data": None, "corpus_format": "working", "corpus_size": 10, "settings": {}},
                              "optimizer": None}, "optimizer or random-number state")]:
        path = tmp_path / "r.pt"
        T.save_checkpoint(str(path), checkpoint_state(model, tok, **change))
        r = run_cli("train", "--out", str(path), "--resume", "--max-minutes", "0", "--max-iters", "2")
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_checkpoint_that_disagrees_with_its_config_is_refused(tmp_path):
    tok = T.CharTokenizer("abc")
    model = tiny_model(vocab_size=tok.vocab_size)
    good = checkpoint_state(model, tok)
    wrong_vocab = dict(good, config=dict(good["config"], vocab_size=99))
    with pytest.raises(T.UserError, match="tokenizer has 4 tokens but its config says vocab_size=99"):
        T.model_from_checkpoint(wrong_vocab)
    missing = dict(good, model={k: v for k, v in good["model"].items() if "ln_f" not in k})
    with pytest.raises(T.UserError, match="missing"):
        T.model_from_checkpoint(missing)
    wider = dict(good, config=dict(good["config"], n_embd=32))
    with pytest.raises(T.UserError, match="wrong shape"):
        T.model_from_checkpoint(wider)


# property-based: arbitrary Unicode --------------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

_BPE = None


def bpe():
    global _BPE
    if _BPE is None:
        _BPE = T.BPETokenizer.train([TEXT, "What is 347 + 285?"] * 10, vocab_size=300)
    return _BPE


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_roundtrip_any_unicode(text):
    tok = T.CharTokenizer(set(text) | {"a"})
    assert tok.decode(tok.encode(text)) == text
    assert bpe().decode(bpe().encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1))
def test_prompt_handling_never_crashes(text):
    tok = T.CharTokenizer("abcdefghijklmnopqrstuvwxyz \n")
    model = tiny_model(vocab_size=tok.vocab_size, block_size=16)
    try:
        ids = tok.encode(text)
    except T.UserError as e:   # unknown characters are reported by name
        unknown = sorted(set(text) - set(tok.chars))
        assert repr(unknown[0]) in str(e)
        return
    if ids:
        out = T.generate(model, [ids], 5, end_id=tok.end_id, temperature=0.0)
        assert len(out[0]) <= 5


def test_a_failing_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    tok = T.CharTokenizer("abc")
    model = tiny_model(vocab_size=tok.vocab_size)
    state = checkpoint_state(model, tok, step=1)
    path = str(tmp_path / "m.pt")
    T.save_checkpoint(path, state)

    def broken_save(obj, f):   # write half a file, then fail like a full disk would
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(T.torch, "save", broken_save)
    with pytest.raises(T.UserError, match="could not write .*No space left on device; any checkpoint"):
        T.save_checkpoint(path, dict(state, step=2))
    monkeypatch.undo()
    assert T.load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["m.pt"]


def test_nan_loss_stops_with_the_step_and_advice(tmp_path):
    tok = T.CharTokenizer(set(TEXT))
    model = tiny_model(vocab_size=tok.vocab_size)
    with torch.no_grad():
        model.wte.weight[3, 0] = float("nan")
    ids = T.cached_ids([TEXT * 3], tok, str(tmp_path))
    s = T.TrainSettings(out=str(tmp_path / "m.pt"), batch_size=2, max_iters=5, max_minutes=0, eval_interval=2,
                        eval_iters=1, dtype="fp32")
    with pytest.raises(T.UserError, match=r"at step 0: training diverged; try a lower --lr"):
        T.train(model, tok, {"train": {"ids": ids}}, s, {"device": "cpu", "dtype": "fp32"})
    assert not os.path.exists(s.out)


def test_unwritable_output_folder_is_refused_before_training(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = run_cli("train", "--out", str(tmp_path / "afile" / "m.pt"), "--max-iters", "1")
    assert r.returncode == 2 and "cannot write checkpoints" in r.stderr and "step 0" not in r.stdout


def test_huge_single_line_and_mixed_line_endings(tmp_path):
    p = tmp_path / "big.txt"
    p.write_bytes(("word " * 1_000_000).encode() + b"a\r\nb\rc\nd")
    (text,) = T.read_text_files([str(p)])
    assert text.endswith("a\nb\nc\nd") and len(text) == 5_000_007
    tok = T.CharTokenizer(set(text))
    ids = T.cached_ids([text], tok, str(tmp_path / "cache"))
    assert len(ids) == len(text) + 1 and tok.decode(ids[-8:].tolist()) == "a\nb\nc\nd" + T.END


# the appendix: log and plot, a look inside, chat, int8, export, torchrun ----------------------------

@pytest.fixture(scope="module")
def thinking_ckpt(tmp_path_factory):
    """A very small model trained for a few steps on the built-in corpus, with its training log."""
    path = str(tmp_path_factory.mktemp("thinking") / "m.pt")
    r = run_cli("train", "--corpus-size", "300", "--n-layer", "2", "--n-embd", "32", "--n-head", "2",
                "--batch-size", "4", "--max-iters", "6", "--eval-interval", "3", "--dtype", "fp32", "--out", path)
    assert r.returncode == 0, r.stderr
    return path


def test_tokens_to_learned_is_the_first_pass_and_is_kept(tmp_path):
    tok = T.CharTokenizer(set(TEXT))
    ids = torch.tensor(tok.encode(TEXT * 20)).numpy()
    model = tiny_model(vocab_size=tok.vocab_size, block_size=16)
    shares = iter([0.2, 0.96, 0.5, 0.97])   # passes at the second evaluation, dips, passes again
    s = T.TrainSettings(out=str(tmp_path / "m.pt"), batch_size=2, max_iters=6, max_minutes=0, eval_interval=2,
                        eval_iters=1, device="cpu", dtype="fp32")
    meta = {"data": "x", "device": "cpu", "dtype": "fp32"}
    r = T.train(model, tok, {"train": {"ids": ids}}, s, meta, probe=lambda m: ("", next(shares)))
    rows = [json.loads(line) for line in open(T.log_path(s.out))]
    assert [row["tokens_to_learned"] for row in rows] == [None, 64, 64, 64]   # 2 steps of 2 x 16 tokens
    assert r["tokens_to_learned"] == 64 and r["probe"] == 0.97
    assert T.load_checkpoint(s.out)["tokens_to_learned"] == 64   # a resumed run keeps it


def test_training_log_rows_and_plot(thinking_ckpt, tmp_path):
    _, rows = T.read_log(thinking_ckpt)
    assert [r["step"] for r in rows] == [0, 3, 6]
    assert rows[-1]["tokens"] == 6 * 4 * 192 and rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert all({"train_loss", "lr", "tokens_per_s", "elapsed", "accuracy", "tokens_to_learned"} <= set(r) for r in rows)
    pytest.importorskip("matplotlib")
    out = tmp_path / "loss.png"
    r = run_cli("plot", thinking_ckpt, T.log_path(thinking_ckpt), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    again = run_cli("plot", thinking_ckpt, "--out", str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_optional_package_missing_gets_the_pip_line(monkeypatch):
    import builtins
    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("matplotlib") else real(name, *a, **k))
    import importlib
    monkeypatch.setattr(importlib, "import_module", lambda name: builtins.__import__(name))
    with pytest.raises(T.UserError, match="pip install matplotlib"):
        T.plot_logs(["x.log.jsonl"], "x.png")


def test_show_probs_lists_what_sampling_saw(thinking_ckpt):
    r = run_cli("generate", "--checkpoint", thinking_ckpt, "--prompt", "Q: What is 2 + 3?\\nA:",
                "--max-new-tokens", "5", "--show-probs")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if " <- " in line]
    assert len(rows) == 5
    for line in rows:   # greedy: the token taken is the first, likeliest candidate
        picked, cands = line.split(" <- ")
        probs = [float(c.rsplit(" ", 1)[1]) for c in cands.split("  ")]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
        assert cands.startswith(picked.strip())


def test_attention_maps_are_the_models_own(tmp_path):
    model = tiny_model(vocab_size=20, block_size=16)
    ids = [1, 5, 7, 2, 9, 3]
    att = T.attention_maps(model, ids, layer=1)
    assert att.shape == (2, 6, 6)
    assert torch.allclose(att.sum(-1), torch.ones(2, 6)) and torch.all(att.triu(1) == 0)
    got = {}   # rebuild the layer's output from these weights and compare with the model's forward
    blk = model.h[1].attn
    blk.register_forward_hook(lambda m, args, out: got.update(x=args[0], y=out))
    model(torch.tensor([ids]))
    v = blk.c_attn(got["x"][0]).split(16, dim=1)[2].view(6, 2, 8).transpose(0, 1)
    y = (att @ v).transpose(0, 1).reshape(6, 16)
    assert torch.allclose(blk.c_proj(y), got["y"][0], atol=1e-5)


def test_attention_picture(thinking_ckpt, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "attn.png"
    r = run_cli("attention", "--checkpoint", thinking_ckpt, "--prompt", "Q: What is 12 + 7?\\nA:", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"
    r = run_cli("attention", "--checkpoint", thinking_ckpt, "--prompt", "Q", "--layer", "9", "--out", str(tmp_path / "b.png"))
    assert r.returncode == 2 and "--layer from 0 to 1" in r.stderr


@pytest.mark.parametrize("kind", ["bpe", "char"])   # the built-in corpus's tokenizer, and characters
def test_chat_reads_a_pipe(kind, thinking_ckpt, tmp_path):
    path = thinking_ckpt
    if kind == "char":   # a character vocabulary without "é": that question is refused and chat goes on
        tok = T.CharTokenizer(set("Q: What is 2 + 3?\nA: Hi 0123456789"))
        path = str(tmp_path / "char.pt")
        T.save_checkpoint(path, checkpoint_state(tiny_model(vocab_size=tok.vocab_size, block_size=64), tok))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tinyllm.py"), "chat", "--checkpoint", path,
                        "--max-new-tokens", "10"], input="What is 2 + 3?\n/temp 0.5\n/temp x\n/temp 0\nWhat is é?\nHi\n/quit\nnever asked\n",
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # every question answered (byte-level BPE encodes "é"; characters refuse it); the line after /quit never read
    assert r.stdout.count("A:") == (3 if kind == "bpe" else 2) and "never asked" not in r.stdout
    assert "temp = 0.5" in r.stdout and "temp = 0.0" in r.stdout and "commands:" in r.stdout
    assert ("never saw: 'é'" in r.stdout) == (kind == "char")


def test_int8_is_smaller_and_close(thinking_ckpt):
    import io
    model, tok = T.model_from_checkpoint(T.load_checkpoint(thinking_ckpt))
    model.eval()
    q = T.quantize_int8(model)
    size = lambda m: len((lambda b: (torch.save(m.state_dict(), b), b.getvalue())[1])(io.BytesIO()))
    linears = [m for m in q.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(linears) == 2 * 4 + 1 and all(m.weight().dtype == torch.qint8 for m in linears)
    assert size(q.h) < 0.4 * size(model.h)   # the blocks' linear layers: int8 weights (embeddings stay float)
    ids = torch.tensor([tok.encode("Q: What is 12 + 7?\nA:")])
    a, b = model(ids)[0], q(ids)[0]
    assert (a - b).abs().max() < 0.1 * a.abs().max()
    r = run_cli("generate", "--checkpoint", thinking_ckpt, "--prompt", "Q: What is 1 + 1?\\nA:",
                "--max-new-tokens", "8", "--quantize", "int8")
    assert r.returncode == 0 and r.stdout.startswith("Q: What is 1 + 1?"), r.stderr


def test_export_onnx_matches_pytorch(thinking_ckpt, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "m.onnx"
    r = run_cli("export", "--checkpoint", thinking_ckpt, "--format", "onnx", "--out", str(out))
    assert r.returncode == 0, r.stderr
    model, _ = T.model_from_checkpoint(T.load_checkpoint(thinking_ckpt))
    model.eval()
    sess = ort.InferenceSession(str(out))
    for shape in [(1, 5), (3, 40)]:   # batch and sequence are dynamic
        ids = torch.randint(0, model.cfg.vocab_size, shape)
        got = sess.run(["logits"], {"idx": ids.numpy()})[0]
        assert abs(got - model(ids)[0].detach().numpy()).max() <= 1e-4


@pytest.mark.parametrize("kind", ["char", "bpe", "bpe across words"])   # the last: the built-in corpus's
def test_export_hf_loads_in_transformers(kind, tmp_path):
    tf = pytest.importorskip("transformers")
    texts = ["Q: What is 12 + 7?\nA: 12 + 7 = 19.\nAnswer: 19 " * 3, "hello world\n" * 5]
    tok = (T.CharTokenizer(set("".join(texts))) if kind == "char" else
           T.BPETokenizer.train(texts, 300, within_words=kind == "bpe"))
    model = tiny_model(vocab_size=tok.vocab_size, block_size=64, seed=3, mlp_ratio=4 if kind == "char" else 2)
    ck = tmp_path / "m.pt"
    T.save_checkpoint(str(ck), checkpoint_state(model, tok))
    out = tmp_path / "hf"
    r = run_cli("export", "--checkpoint", str(ck), "--format", "hf", "--out", str(out))
    assert r.returncode == 0, r.stderr
    hf = tf.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    hf_tok = tf.AutoTokenizer.from_pretrained(str(out))
    text = "Q: What is 12 + 7?\nA:"
    ids = tok.encode(text)
    assert hf_tok(text)["input_ids"] == ids and hf_tok.decode(ids) == text
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (hf(x).logits - model(x)[0]).abs().max() <= 1e-4
        want = T.generate(model, [ids], 12, tok.end_id)[0]   # greedy, both stopping at the end token
        got = hf.generate(x, max_new_tokens=12, do_sample=False, pad_token_id=tok.end_id)[0, len(ids):].tolist()
    assert got[:len(want)] == want and (len(want) == 12 or got[len(want)] == tok.end_id)


def test_torchrun_two_ranks_stay_identical(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("the rain in spain stays mainly in the plain. " * 200)
    out = tmp_path / "m.pt"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "tinyllm.py"), *small_train_args(data, out, "--max-iters", "30"),
                        "--dropout", "0", "--eval-interval", "10", "--device", "cpu"],   # gloo, even beside a GPU
                       capture_output=True, text=True, timeout=300,   # a rank that aborts prints its Python stack
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"})
    assert r.returncode == 0, r.stderr[-8000:]
    assert "2 ranks, largest weight difference from rank 0: 0\n" in r.stdout
    assert r.stdout.count("step 30:") == 1   # rank 0 alone reports
    _, rows = T.read_log(str(out))
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] and rows[-1]["tokens"] == 2 * 30 * 4 * 32
    one = tmp_path / "one.pt"   # one process sees only rank 0's batches: other weights, so the ranks did differ
    assert run_cli(*small_train_args(data, one, "--max-iters", "30"), "--dropout", "0").returncode == 0
    a, b = torch.load(out, weights_only=True)["model"], torch.load(one, weights_only=True)["model"]
    assert not torch.equal(a["wte.weight"], b["wte.weight"])
