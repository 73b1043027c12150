"""
tinyllm: a complete small language model in one file, read top to bottom.

Text becomes numbers (tokenizers), numbers become predictions (a GPT), predictions become a loss,
the loss teaches the weights (AdamW), and the weights write text (sampling). The built-in corpus
teaches the model to *think step by step*: small word problems answered with written working, like
a pupil's, ending in an `Answer: N` line that evaluation reads.

Three commands to try:
    python tinyllm.py train                      # 9 minutes of training, under 2M parameters; it
                                                 # ends by saying whether the model has learned
    python tinyllm.py generate --prompt "Q: Tom has 12 apples. Tom gives away 5. How many apples does Tom have now?\\nA:"
    python tinyllm.py eval -n 200                # how many held-out problems it gets right
Speed measurements live outside the lesson, in tests/bench.py.

Map of the file:
    1. tokenizers          characters or byte-level BPE, one end-of-example token
    2. the thinking corpus word problems, the written working, the held-out splits
    3. the model           embeddings, rotary positions, causal self-attention, MLP, blocks, the tied head
    4. data                windows of token ids, batches, a loss weight per token
    5. training            AdamW groups, warm-up + cosine schedule, the weights' running average,
                           the probe, the loop
    6. sampling            temperature, top-k, top-p, repetition penalty, the KV cache
    7. evaluation          asking questions, reading `Answer: N`, checking the working
    8. putting it together the chapters joined in one function, learn_to_think
    9. appendix: tools     the story catalogue, checkpoints, big text, resume, fast decoders, log and
                           plot, attention maps, chat, int8, ONNX and Hugging Face export, torchrun
                           (not part of the lesson)
   10. the command line    argparse subcommands that call the chapters above
"""

import argparse
import copy
import json
import math
import os
import random
import re
import shlex
import signal
import sys
import time
import zlib
from dataclasses import dataclass, asdict, fields

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

END = "<|end|>"  # the end-of-example token: training puts it after every example, sampling stops on it


class UserError(Exception):
    """A mistake the user can fix. The CLI prints its message on one line and exits with status 2."""


# -----------------------------------------------------------------------------------------------
# 1. Tokenizers
# A model reads integers, not text. The simplest map is one id per character: tiny vocabulary, long
# sequences. Byte-level BPE (Byte Pair Encoding) starts from the 256 bytes, so no text is ever
# unencodable, and merges frequent pairs into new tokens: bigger vocabulary, shorter sequences.
# We split numbers into single digits before BPE, because a merged "347" token hides the digits
# that column arithmetic needs. On your text merges stay inside a word (the GPT-2 rule); on the
# thinking corpus they may cross spaces, so " + ", " = " and ".\nAnswer: " become one token each and
# a problem takes about 81 tokens instead of 179 characters: a step of training sees the same
# problems for less than half the compute. Both tokenizers have one END token and save themselves
# as JSON.
# -----------------------------------------------------------------------------------------------

class CharTokenizer:
    """One id per character. Id 0 is END; the others are the sorted characters of the training text."""

    kind = "char"

    def __init__(self, chars):
        self.chars = sorted(set(chars))
        self.vocab_size = len(self.chars) + 1
        self.end_id = 0
        # encoding is vectorised: a sorted array of code points, searched with np.searchsorted
        self._codes = np.array([ord(c) for c in self.chars], dtype=np.int64)

    def encode(self, text):
        return self.encode_array(text).tolist()

    def encode_array(self, text):
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64)
        idx = np.searchsorted(self._codes, codes)
        idx = np.minimum(idx, len(self._codes) - 1)
        unknown = self._codes[idx] != codes
        if unknown.any():
            bad = sorted(set(chr(c) for c in codes[unknown]))
            shown = " ".join(repr(c) for c in bad[:10]) + (" ..." if len(bad) > 10 else "")
            raise UserError(f"the text has {len(bad)} character(s) this model's vocabulary never saw: "
                            f"{shown}; remove them, or train with --tokenizer bpe, which can encode any text")
        return idx + 1

    def decode(self, ids):
        return "".join(self.chars[i - 1] if i > 0 else END for i in ids)

    def to_json(self):
        return json.dumps({"kind": "char", "chars": "".join(self.chars)})


BPE_VOCAB_SIZE = 512   # the corpus's: its words, numbers' digits and punctuation need few merges


class BPETokenizer:
    """Byte-level BPE from the `tokenizers` library, with digits always split one per token."""

    kind = "bpe"

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.end_id = tok.token_to_id(END)

    @classmethod
    def train(cls, texts, vocab_size, within_words=True):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        if not 260 <= vocab_size <= 65536:
            raise UserError(f"--vocab-size {vocab_size} is out of range: byte-level BPE needs at least "
                            "260 (256 bytes + END + a few merges) and this tool allows at most 65536")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=within_words)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def encode(self, text):
        return self.tok.encode(text).ids

    def encode_batch(self, texts):
        return [e.ids for e in self.tok.encode_batch(texts)]

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=False)

    def to_json(self):
        return json.dumps({"kind": "bpe", "tokenizer": self.tok.to_str()})


def tokenizer_from_json(text):
    d = json.loads(text) if isinstance(text, str) else None
    if not isinstance(d, dict):
        raise UserError("the checkpoint's tokenizer is not a JSON object")
    if d.get("kind") == "char" and isinstance(d.get("chars"), str) and d["chars"]:
        return CharTokenizer(d["chars"])
    if d.get("kind") == "bpe" and isinstance(d.get("tokenizer"), str):
        from tokenizers import Tokenizer
        tok = BPETokenizer(Tokenizer.from_str(d["tokenizer"]))
        if tok.end_id is None:
            raise UserError(f"the checkpoint's BPE tokenizer has no {END!r} token")
        return tok
    raise UserError(f"the checkpoint's tokenizer is not one this tool writes (kind {d.get('kind')!r})")


def encode_many(tokenizer, texts):
    """Encode a list of strings; BPE uses the library's batch encoder (all cores, in Rust)."""
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer.encode_batch(texts)
    return [tokenizer.encode(t) for t in texts]


# -----------------------------------------------------------------------------------------------
# 2. The thinking corpus
# A model learns what its data shows. Bare answers ("Answer: 632") ask a 2M-parameter model to read
# a story and do column addition in one forward pass; it cannot. Written working breaks each problem
# into steps a small model can take one token at a time: first it reads the story into an equation
# with ? for what is asked, then it works that equation out column by column, then it answers.
#
#   Q: Mia had some shells. She gave away 18 of them. Now she has 25 shells left. How many shells
#      did Mia have at first?
#   A: ? - 18 = 25. ? = 25 + 18. 25 + 18: 5 + 8 = 13, 2 + 1 + 1 = 4, so 25 + 18 = 43.
#   Answer: 43
#
# The stories are the kinds grade-school worksheets hold (their "schemas"): a change (join or
# separate) with the result, the change or the start unknown; a combination (the total or one part
# unknown); a comparison (the difference, or the bigger or smaller amount, unknown); equal groups,
# prices and sharing; and two-step stories made of these. Each is told in many wordings: verbs and
# sentence frames drawn from lists, pronouns for people already named, the question last or folded
# into "If ..., how many ...?", and sometimes a fact the question does not need. The reading is what
# the wording hides: "gave 18 of them away" and "some were given away" lead to different equations,
# and writing the equation first makes a wrong reading a visible, checkable error (evaluation
# scores it), not a wrong number from nowhere.
# The arithmetic is the same written working for every story, a pupil's: columns ones first with
# carries and borrows, products and divisions one group at a time (each function below says how).
# The working never names people or objects, so it does not depend on them.
#
# Held-out splits are decided by rules, not by luck, so a test can prove them disjoint from training:
#   questions  fresh questions, none appearing verbatim in the training text
#   combos     operand pairs (both >= 10) whose crc32 hash puts them in 1 of 10 buckets: no training
#              example of any family ever computes them
#   facts      the multiplication facts in HELD_OUT_FACTS: no training problem multiplies or divides
#              with them, so "a x b" for them never appears in the training text
#   wordings   stories told only with the held-out verbs and sentence frames (see Teller)
#   steps4     chains of four operations; training has one to three (a probe, not a target)
# -----------------------------------------------------------------------------------------------

NAMES = ("Tom Ann Sam Mia Ben Zoe Max Lily Leo Emma Jack Ava Noah Ella Omar Sara Ravi Lucy Ivan Nina "
         "Kai Rosa Finn Maya Hugo Iris Luca Anya Theo Chloe Amir Hana Owen Priya Jonas Mei Diego Fatima "
         "Ali Grace Mateo Yuki Ezra Layla Felix Aisha Oscar Nora").split()
SURNAMES = "Hilt Lee Wong Smith Garcia Brown Khan Kim Jones Silva Novak Okafor Rossi Singh".split()
TITLES = "Mr. Mrs. Ms. Dr. Prof. Coach Aunt Uncle Miss Sgt.".split()
SYLLABLES = "ka lo mi ra ne to su vi da el an or is ul be fo ga hi jo ze".split()
OBJECTS = ("apples pencils marbles stickers books cookies cards shells coins stamps eggs oranges "
           "balloons buttons crayons flowers toys cars beads rocks candies muffins pears plums "
           "lemons ribbons spoons cups boxes bottles leaves acorns nuts seeds bricks blocks "
           "bananas carrots tickets feathers peaches dolls kites socks hats cupcakes peanuts erasers "
           "puzzles songs photos fish birds").split() + [
           "bottle caps", "baseball cards", "pieces of gum", "toy cars", "sea shells", "party hats",
           "dollars", "points", "trees", "students", "pictures", "lives", "cakes"]
PLACES = "box jar basket bag bowl tank shelf drawer crate tray".split()
PLURAL = {"box": "boxes", "shelf": "shelves"}   # the others add an s
COLOURS = "red blue green yellow white black small big".split()
RELATIVES = "brother sister mother father friend aunt uncle teacher cousin neighbour".split()
# Verbs as (present, past). Every list of four or more has its every fourth entry held out: no
# training problem uses it, and the "wordings" split uses only those (see Teller).
GAIN = [("gets", "got"), ("finds", "found"), ("buys", "bought"), ("wins", "won"), ("picks", "picked"),
        ("makes", "made"), ("collects", "collected"), ("catches", "caught"), ("earns", "earned"),
        ("bakes", "baked"), ("receives", "received"), ("gathers", "gathered"), ("plants", "planted"),
        ("grows", "grew"), ("adds", "added"), ("saves", "saved")]
LOSE = [("gives away", "gave away"), ("loses", "lost"), ("eats", "ate"), ("drops", "dropped"),
        ("sells", "sold"), ("uses", "used"), ("breaks", "broke"), ("trades away", "traded away"),
        ("throws away", "threw away"), ("donates", "donated"), ("gives back", "gave back"),
        ("hands out", "handed out"), ("removes", "removed"), ("spends", "spent"), ("takes out", "took out"),
        ("cuts down", "cut down")]
HAVE = [("has", "had"), ("owns", "owned"), ("starts with", "started with"), ("keeps", "kept"), ("holds", "held")]
HELD_OUT_FACTS = {(3, 8), (4, 7), (6, 9), (7, 8)}   # with both orders: 8 x 3, 7 x 4, ... are held out too
FAMILIES = ["add", "take", "compare", "groups", "share", "sum", "multistep"]
# Each family is one operation; its schemas are the kinds of story that lead to it. A story's working
# starts with its reading, an equation with ? for the unknown, so "some got off; 21 were left" and
# "21 - 9" are told apart in writing before any arithmetic.
SCHEMAS = {
    "add": ["join", "separate-start", "combine", "compare-more"],
    "take": ["separate", "join-change", "join-start", "separate-change", "combine-part", "compare-fewer"],
    "compare": ["compare-difference"], "groups": ["groups", "price"], "share": ["share", "bags"],
    "sum": ["sum"], "multistep": ["changes", "combine3", "groups-change"]}
# Training draws the families in these shares: more of the families with the most kinds of story
# (take has six), and of compare and multistep, which take longest to learn (compare decides which
# number is bigger, multistep chains several steps).
TRAINING_MIX = ["add", "add", "take", "take", "take", "compare", "compare", "groups", "share", "sum",
                "multistep", "multistep"]
MAX_PROBLEM_CHARS = 320   # a longer draw is drawn again; with the corpus's BPE that is under 190 tokens


def is_held_out_combo(a, b):
    """1 in 10 unordered pairs of numbers that are both >= 10, chosen by a stable hash."""
    lo, hi = min(a, b), max(a, b)
    return lo >= 10 and zlib.crc32(f"{lo},{hi}".encode()) % 10 == 0


def is_held_out_fact(a, b):
    return (a, b) in HELD_OUT_FACTS or (b, a) in HELD_OUT_FACTS


def read_off(digits, value):
    """Column digits (ones first) read from the left, 0s in front included, then without them:
    ["5", "0"] and 5 give "05 = 5"; ["4", "2"] and 24 give "24"."""
    read = "".join(reversed(digits))
    return f"{read} = {value}" if read != str(value) else str(value)


def column_steps(a, op, b):
    """The columns of a + b or a - b (a >= b for minus), ones first: ["7 + 5 = 12", "4 + 3 + 1 = 8"],
    and a difference's column results, ones first (a sum's last column may be 10 or more)."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry, digits = [], 0, []
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        if op == "+":
            column = x + y + carry
            steps.append(f"{x} + {y}{' + 1' if carry else ''} = {column}")
            carry = column // 10
        else:
            top = x + 10 if x - carry < y else x   # borrow from the next column when we must
            column = top - carry - y
            steps.append(f"{top}{' - 1' if carry else ''} - {y} = {column}")
            digits.append(str(column))
            carry = 1 if top != x else 0
    return steps, digits


def column_working(a, op, b):
    """The written working of a + b or a - b (a >= b for minus): one column at a time, ones first."""
    result = a + b if op == "+" else a - b
    if a < 10 and b < 10:
        return f"{a} {op} {b} = {result}.", result
    steps, digits = column_steps(a, op, b)
    # the answer reads the last column's whole result (it may be 10 or more), then the other columns'
    # ones digits from left to right; a difference first reads every column, 0s in front included
    shown = read_off(digits, result) if op == "-" else str(result)
    return f"{a} {op} {b}: " + ", ".join(steps) + f", so {a} {op} {b} = {shown}.", result


def which_is_more(x, y):
    """Which of x, y is more, read digit by digit from the left until two differ: "54 vs 52: 5 = 5, 4 > 2."."""
    # Every wording comes with either number first, so the sign must be read from the digits: when
    # some wordings always gave the bigger number first, models wrote "54 vs 52: 5 < 5." to fit them.
    width = max(len(str(x)), len(str(y)))   # the shorter number gets 0s in front: "7 vs 13: 0 < 1."
    parts = []
    for dx, dy in zip(str(x).zfill(width), str(y).zfill(width)):
        parts.append(f"{dx} {'<' if dx < dy else '>' if dx > dy else '='} {dy}")
        if dx != dy:
            break
    return f"{x} vs {y}: " + ", ".join(parts) + "."


def times_working(groups, size):
    """groups x size by adding one group at a time; "(2 left)" counts the groups still to add, so the
    model knows when to stop by reading a 0 it just wrote, not by comparing numbers far apart."""
    parts, total = [f"{size} ({groups - 1} left)"], size
    for k in range(2, groups + 1):
        parts.append(f"{total} + {size} = {total + size} ({groups - k} left)")
        total += size
    return f"{groups} x {size}: " + ", ".join(parts) + f", so {groups} x {size} = {total}.", total


def divide_working(total, size):
    """total / size by taking one group away at a time until nothing is left; "(3)" counts groups."""
    parts, left, k = [], total, 0
    while left > 0:
        parts.append(f"{left} - {size} = {left - size} ({k + 1})")
        left, k = left - size, k + 1
    return f"{total} / {size}: " + ", ".join(parts) + f", so {total} / {size} = {k}.", k


def solve(reading):
    """The working after the reading, its answer, and the operations it performed, [(a, op, b), ...]
    (the held-out splits are decided on these). An unknown inside the equation is moved to the left
    first ("18 + ? = 44, so ? = 44 - 18."), then the arithmetic is written as in the functions above."""
    lhs, rhs = reading.split(" = ")
    if rhs != "?":   # "a + ? = c", "? + b = c", "a - ? = c" or "? - b = c"
        x, op, y = lhs.split()
        c = int(rhs)
        if op == "+":
            a, op2, b = c, "-", int(y if x == "?" else x)
        elif x == "?":
            a, op2, b = c, "+", int(y)
        else:
            a, op2, b = int(x), "-", c
        work, ans = column_working(a, op2, b)
        return f"? = {a} {op2} {b}. " + work, ans, [(a, op2, b)]
    t = lhs.split()
    if len(t) == 3:
        a, op, b = int(t[0]), t[1], int(t[2])
        if op == "x":
            work, ans = times_working(a, b)
        elif op == "/":
            work, ans = divide_working(a, b)
        else:
            work, ans = column_working(a, op, b)
        return work, ans, [(a, op, b)]
    # a chain: step k is headed by the chain up to it ("34 + 12 - 22: 46 - 22: ..."), so the next number
    # is a short copy from the header before, not a count along the chain (without the headers some
    # 10-minute runs never learned multi-step problems)
    works, s, head, done = [], int(t[0]), t[0], []
    for op, x in zip(t[1::2], map(int, t[2::2])):
        head_before = head
        head += f" {op} {x}"
        done.append((s, op, x))
        w, s = times_working(s, x) if op == "x" else column_working(s, op, x)
        works.append(f"{head}: {w}" if works or head_before != t[0] else w)
    return " ".join(works), s, done


class Teller:
    """The words of one problem, drawn from rng. Every list of four or more options has every fourth
    option held out: held=False draws only from the others (training and the usual splits), held=True
    only from the held-out ones (the "wordings" split), so its sentences are ones training never saw."""

    def __init__(self, rng, held=False):
        self.rng, self.held = rng, held
        self.obj = rng.choice(OBJECTS)   # what the story counts
        self.tense = rng.randint(0, 1)   # 0 present, 1 past

    def tensed(self, present, past):
        return past if self.tense else present

    # a verb of having, getting or losing, in the story's tense ("has", "found", "gave away")
    def have(self): return self.pick(HAVE)[self.tense]
    def gain(self): return self.pick(GAIN)[self.tense]
    def lose(self): return self.pick(LOSE)[self.tense]
    def lost(self): return self.pick(LOSE)[1]   # always past: "she had some; she lost 18 of them"
    def got(self): return self.pick(GAIN)[1]

    def pick(self, options):
        if len(options) >= 4:
            options = [o for i, o in enumerate(options) if (i % 4 == 3) == self.held]
        return self.rng.choice(options)

    def people(self):
        """Three different people; each has a pronoun, so "she" or "he" can refer back."""
        out = {}
        for key in "nmo":
            while True:
                r = self.rng.random()
                if r < 0.2:   # invented names teach the model that names do not matter
                    name = "".join(self.rng.choice(SYLLABLES) for _ in range(self.rng.randint(2, 4))).capitalize()
                elif r < 0.35:   # titles, some with a full stop that does not end the sentence
                    name = self.rng.choice(TITLES) + " " + self.rng.choice(SURNAMES + NAMES)
                else:
                    name = self.rng.choice(NAMES)
                if name not in [p[0] for p in out.values()]:
                    break
            out[key] = (name,) + self.rng.choice([("she", "her", "her"), ("he", "him", "his")])
        return out

    def in_a_place(self, a, place, changes, questions, before):
        """A change told of a place, not a person ("There are 8 cups in the box. Tom adds 5 ..."), and
        sometimes with the start told after the change ("... There were 8 cups in the box before.")."""
        story = [f"There {self.tensed('are', 'were')} {a} {self.obj} in the {place}.", self.pick(changes)]
        q = self.pick(questions)
        if self.rng.random() < 0.4:
            story = [story[1], f"There were {a} {self.obj} in the {place} " + self.pick(before)]
        return story, q

    def render(self, text, people):
        """[n] is person n as the subject, [n1] as the object, [n2] possessive, [n!] always the name.
        The first mention names them; a later one may be a pronoun if nobody else was named between."""
        said, last, out, pos = set(), None, [], 0
        for mt in re.finditer(r"\[([nmo])([12!]?)\]", text):
            key, case = mt[1], mt[2]
            name, *pro = people[key]
            if key in said and key == last and case != "!" and self.rng.random() < 0.6:
                word = pro[int(case or 0)]
            else:
                word = name + ("'s" if case == "2" else "")
            start = mt.start() == 0 or text[mt.start() - 2:mt.start()] in (". ", "? ")
            out += [text[pos:mt.start()], word[0].upper() + word[1:] if start else word]
            said.add(key); last, pos = key, mt.end()
        return "".join(out) + text[pos:]


def number_pair(rng):
    """Two numbers for one addition or subtraction: mostly up to 99, sometimes up to 999."""
    top = 999 if rng.random() < 0.2 else 99
    a = rng.randint(5, top)
    return a, rng.randint(1, a - 1)


def tell_join(w):
    """Join, the result unknown: "Tom has 8 cards. He gets 5 more. How many now?" 8 + 5 = ?"""
    rng, obj = w.rng, w.obj
    a, b = number_pair(rng)
    b = rng.randint(1, 99) if a > 99 else b
    story = [f"[n] {w.have()} {a} {obj}.",
             w.pick([f"[n] {w.gain()} {b} more.",
                     f"[m] {w.tensed('gives', 'gave')} [n1] {b} more {obj}.",
                     f"Then [n] {w.gain()} {b} more {obj}.",
                     f"[n] {w.gain()} another {b}.",
                     f"{b} more {obj} {w.tensed('are', 'were')} added.",
                     f"[n2] {rng.choice(RELATIVES)} {w.tensed('gives', 'gave')} [n1] {b} more.",
                     f"[n] {w.gain()} {b} more {obj} and [m] {w.gain()} none."])]
    q = w.pick([f"How many {obj} does [n] have now?", f"How many {obj} does [n] have in all?",
                f"How many {obj} does [n] end with?", f"How many {obj} are there now?",
                f"How many {obj} does [n] have altogether?", f"What is the total number of {obj} now?"])
    if rng.random() < 0.3:
        place = rng.choice(PLACES)
        story, q = w.in_a_place(a, place, [
            f"[n] puts {b} more {obj} in the {place}.", f"[n] {w.gain()} {b} more and puts them in.",
            f"[n] adds {b} {obj} to the {place}.", f"{b} more {obj} are put in the {place}."], [
            f"How many {obj} are in the {place} now?", f"How many {obj} are in the {place} in all?",
            f"How many {obj} does the {place} hold now?", f"How many {obj} are there in the {place} now?"],
            ["at first.", "before.", "to begin with.", "already."])
    reading = f"{a} + {b} = ?"
    return story, q, reading


def tell_separate_start(w):
    """Separate, the start unknown: "She had some. She lost 18. 25 are left. How many at first?" ? - 18 = 25"""
    rng, obj = w.rng, w.obj
    a, b = number_pair(rng)
    c = a - b   # had ?, lost b, c left: ? = c + b
    story = [f"[n] had some {obj}.", f"[n] {w.lost()} {b} of them.",
             w.pick([f"Now [n] has {c} {obj} left.", f"{c} {obj} are left.",
                     f"[n] still has {c}.", f"There are {c} {obj} left now."])]
    q = w.pick([f"How many {obj} did [n] have at first?", f"How many {obj} did [n] start with?",
                f"How many {obj} did [n] have before?", f"How many {obj} were there to begin with?"])
    reading = f"? - {b} = {c}"
    return story, q, reading


FOLDS = {"join", "separate", "changes"}   # schemas whose last sentence may become "If ..., how many ...?"


def make_problem(rng, family, steps=None, held=False):
    """One problem: its question, working and answer, the schema of its story, the operand pairs it
    adds or subtracts and the multiplication facts it uses (the held-out splits are decided on these).
    steps asks for a chain of that many gains and losses."""
    w = Teller(rng, held)
    schema = rng.choice(SCHEMAS[family])
    if steps:
        schema = "changes"
    # the story's sentences, its question and its reading; STORIES is the appendix's story catalogue
    story, q, reading = tell_changes(w, steps) if schema == "changes" else STORIES[schema](w)
    if schema in ("groups", "price", "share", "bags") and rng.random() < 0.15:   # no story: "What is 6 x 7?"
        story, q, schema = [], f"What is {reading.split(' = ')[0]}?", "bare"
    if w.obj == "dollars" and rng.random() < 0.5:
        q = q.replace("How many dollars", "How much money")
    if schema in FOLDS and rng.random() < 0.3:   # "If she gives away 5, how many apples does she have left?"
        last = story.pop()
        q = "If " + lower_first(last[:-1]) + ", " + lower_first(q)
    if story and rng.random() < 0.3:   # a fact the question does not need, as real problems have
        other = rng.choice([o for o in OBJECTS if o != w.obj])
        extra = w.pick([f"[n] also has {rng.randint(2, 30)} {other}.",
                        f"[m!] has {rng.randint(2, 30)} {other}.",
                        f"There are {rng.randint(2, 30)} {other} too.",
                        f"[n!] is {rng.randint(6, 12)} years old."])
        story.insert(rng.randint(1, len(story)), extra)
    q = w.render(" ".join(story + [q]), w.people())
    work, ans, done = solve(reading)
    pairs = [(a, b) for a, op, b in done if op in "+-"]
    facts = [(a, b) if op == "x" else (a // b, b) for a, op, b in done if op in "x/"]   # 24 / 6 uses 4 x 6
    if family == "compare":   # which is more, digit by digit, before the reading that depends on it
        x, y = map(int, re.findall(r"\d+", reading))
        work = which_is_more(x, y) + " " + f"{reading}. " + work
    else:
        work = f"{reading}. " + work
    steps = steps or len(done)
    if len(q) + len(work) + len(str(ans)) + 16 > MAX_PROBLEM_CHARS and (family != "multistep" or steps < 4):
        return make_problem(rng, family, steps if family == "multistep" else None, held)   # too long: draw again
    return dict(question=q, working=work, answer=ans, family=family, schema=schema, steps=steps,
                pairs=pairs, facts=facts, held=held)


def lower_first(sentence):
    """"Then she gives away 5" -> "she gives away 5": the sentence goes on after "If "."""
    sentence = sentence.removeprefix("Then ")
    first = sentence.split(" ", 1)[0]
    return sentence[0].lower() + sentence[1:] if first in ("She", "He", "There", "Each", "The", "Now", "How", "What", "Some", "A") else sentence


def ask_prompt(question):
    """How every question is put to the model, in training and after."""
    return f"Q: {question}\nA:"


def problem_text(p, direct=False):
    """The prompt and the completion the model learns: working + answer (or the answer alone)."""
    prompt = ask_prompt(p["question"])
    if direct:
        return prompt, f" Answer: {p['answer']}"
    return prompt, f" {p['working']}\nAnswer: {p['answer']}"


def is_training_allowed(p):
    return (not p["held"] and not any(is_held_out_combo(a, b) for a, b in p["pairs"])
            and not any(is_held_out_fact(a, b) for a, b in p["facts"]))


def in_wordings_split(p):
    """Told with held-out wordings (make_split draws it so), held out by no other rule, and not a bare
    sum or product (those have no wording)."""
    return is_training_allowed(dict(p, held=False)) and p["schema"] != "bare"


SPLITS = {   # split: (its families, the rule a problem must meet to belong to it)
    "questions": (FAMILIES, is_training_allowed),
    "combos": (["add", "take", "compare", "sum"], lambda p: any(is_held_out_combo(*q) for q in p["pairs"])),
    "facts": (["groups", "share"], lambda p: any(is_held_out_fact(*f) for f in p["facts"])),
    "steps4": (["multistep"], lambda p: True),
    "wordings": (["add", "take", "compare", "groups", "share", "multistep"], in_wordings_split),
}


def make_split(split, n, seed):
    """n held-out problems of one split, seeded, the split's families in equal shares."""
    families, belongs = SPLITS[split]
    rng, out = random.Random(f"{split}-{seed}"), []
    while len(out) < n:
        p = make_problem(rng, families[len(out) % len(families)], steps=4 if split == "steps4" else None,
                         held=split == "wordings")
        if belongs(p):
            out.append(dict(p, split=split))
    return out


def make_training_problems(n, seed, exclude_questions):
    """n problems, the families in TRAINING_MIX's shares, none held out by any rule or asked in evaluation."""
    rng = random.Random(f"train-{seed}")
    out = []
    while len(out) < n:
        p = make_problem(rng, TRAINING_MIX[len(out) % len(TRAINING_MIX)])
        if is_training_allowed(p) and p["question"] not in exclude_questions:
            out.append(p)
    return out


EQUATION = re.compile(r"(\d+(?: [-+x/] \d+)+) = (\d+)")
LAST_VALUE = re.compile(r"= (\d+)\.")   # the value a working ends at: "so 47 + 35 = 82.", "so ? = 24."
COMPARISON = re.compile(r"(\d+) vs (\d+): [^.]*\.")   # "54 vs 52: 5 = 5, 4 > 2.", checked by which_is_more
READING = re.compile(r"(?<![\d?])(?<![\d?] )((?:\d+|\?)(?: [-+x/] (?:\d+|\?))+ = (?:\d+|\?))\.")   # "18 + ? = 44.": the story read


def reading_value(text):
    """The value of ? in the first reading of a working ("18 + ? = 44." gives 26), or None."""
    match = next((r for r in READING.finditer(text) if r[1].count("?") == 1), None)
    if match is None:
        return None
    lhs, rhs = match[1].split(" = ")
    t = lhs.split()
    if rhs == "?":   # a chain, read left to right
        return value_of(t) if "?" not in t else None
    if len(t) != 3 or not rhs.isdigit():
        return None
    x, op, y = t
    c, known = int(rhs), int(y if x == "?" else x)   # "known" is the number beside the ?
    if op == "+":
        return c - known
    if op == "-":   # ? - y = c, or x - ? = c
        return c + known if x == "?" else known - c
    if op == "x":
        return c // known if known and c % known == 0 else None
    if x == "?":    # ? / y = c
        return c * known
    return known // c if c and known % c == 0 else None   # x / ? = c


def value_of(tokens):
    """'a op b op c', read left to right (the working only writes such chains); None if / is not exact."""
    value = int(tokens[0])
    for op, num in zip(tokens[1::2], map(int, tokens[2::2])):
        if op == "+": value += num
        elif op == "-": value -= num
        elif op == "x": value *= num
        elif num == 0 or value % num:
            return None
        else: value //= num
    return value


def check_equation(lhs, rhs):
    """Is 'a op b op c' = rhs, read left to right?"""
    return value_of(lhs.split()) == int(rhs)


def validate_corpus(problems, held_out_questions):
    """Refuse a corpus with a template bug: the model would learn it. Cheap, so it runs every time."""
    for p in problems:
        prompt, completion = problem_text(p)
        text = prompt + completion
        if "{" in text or "}" in text or "None" in text:
            raise AssertionError(f"template placeholder leaked into: {text!r}")
        eqs = EQUATION.findall(p["working"])
        if not eqs or not all(check_equation(l, r) for l, r in eqs):
            raise AssertionError(f"false equation in working: {text!r}")
        if reading_value(p["working"]) != p["answer"]:
            raise AssertionError(f"the reading of the story does not give the answer: {text!r}")
        if int(LAST_VALUE.findall(p["working"])[-1]) != p["answer"]:
            raise AssertionError(f"the working does not end at the answer: {text!r}")
        if p["question"] in held_out_questions:
            raise AssertionError(f"a held-out question is in the training data: {p['question']!r}")


CORPUS_SIZE = 100_000   # training problems in a default run


def build_corpus(n_train, seed, direct=False, n_val=500):
    """The training and validation problems, validated, as (prompt, completion) texts."""
    held_out = [p for s in SPLITS for p in make_split(s, 1000, seed=0)]
    held_q = {p["question"] for p in held_out}
    val = make_split("questions", n_val, seed=10_000 + seed)   # validation: unseen by training too
    val_q = {p["question"] for p in val}
    train = make_training_problems(n_train, seed, held_q | val_q)
    validate_corpus(train, held_q | val_q)
    return train, val


# -----------------------------------------------------------------------------------------------
# 3. The model
# A GPT turns a sequence of token ids into, at every position, scores (logits) for the next token.
# Each token gets a learned vector (token embedding); then n_layer blocks each let every position
# look back at earlier ones (attention) and think alone (the MLP), with LayerNorm before each and a
# residual "+" around each. A last LayerNorm, then the output head, which shares its weights with
# the token embedding (weight tying: the same table reads tokens in and writes them out, and saves
# vocab_size x n_embd parameters). Where a token stands is not added to its vector (GPT-2 adds a
# learned one); attention turns each query and key by an angle that grows with the position
# (rotary embeddings, RoPE), so a head can ask for "the token three back" once and have it work at
# every position. A learned vector per position must be learned slot by slot, and with them the
# same model, trained as long, still wrote almost none of its working right when this one wrote
# most of it.
# -----------------------------------------------------------------------------------------------

MAX_PARAMS = 2_000_000   # the product's ceiling: a model of this size trains in minutes on a laptop CPU


@dataclass
class Config:
    vocab_size: int = 100
    block_size: int = 192     # the longest context the model sees
    n_layer: int = 4
    n_head: int = 2
    n_embd: int = 128
    mlp_ratio: int = 4        # the MLP's hidden width, in multiples of n_embd (see MLP)
    dropout: float = 0.0
    bias: bool = True
    fused_attention: bool = False   # F.scaled_dot_product_attention on a CPU too (a GPU always uses it)

    def check(self, max_params=MAX_PARAMS):
        if self.n_embd % self.n_head:
            good = [h for h in range(1, 17) if self.n_embd % h == 0]
            near = min(good, key=lambda h: (abs(h - self.n_head), -h))
            raise UserError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                            f"try --n-head {near}")
        n = sum(param_breakdown(self).values())
        if max_params and n > max_params:
            raise UserError(f"this model has {n:,} parameters, {n - max_params:,} over the ceiling of "
                            f"{max_params:,}: lower --n-embd, --n-layer, --block-size or --vocab-size, "
                            "or raise the ceiling with --max-params")


def param_breakdown(cfg):
    """Where the parameters go, without building the model (so a too-big model fails before any work)."""
    C, V, L, R = cfg.n_embd, cfg.vocab_size, cfg.n_layer, cfg.mlp_ratio
    b = 1 if cfg.bias else 0
    return {
        "token embedding (tied with output head)": V * C,
        "attention (q, k, v, output)": L * (C * 3 * C + 3 * C * b + C * C + C * b),
        "feed-forward (MLP)": L * (2 * C * R * C + R * C * b + C * b),
        "layer norms": L * 2 * (C + C * b) + (C + C * b),
    }


def param_report(cfg):
    parts = param_breakdown(cfg)
    total = sum(parts.values())
    lines = [f"  {k:<42} {v:>10,}  {100 * v / total:5.1f}%" for k, v in parts.items()]
    return "\n".join(lines + [f"  {'total':<42} {total:>10,}"])


class KVCache:
    """One layer's memory while generating (chapter 6): the keys and values of every token seen so
    far, so a new token's attention reads them instead of recomputing them. Two buffers, each
    (B, n_head, block_size, head_size), made on the first call and filled in place; the first n
    positions hold tokens."""

    def __init__(self, block_size):
        self.block_size, self.k, self.v, self.n = block_size, None, None, 0

    def add(self, k, v):
        """Append k, v (B, n_head, T, head_size); returns every key and value so far, (B, n_head, n, head_size)."""
        if self.k is None:
            B, H, _, hs = k.shape
            self.k, self.v = k.new_empty(B, H, self.block_size, hs), v.new_empty(B, H, self.block_size, hs)
        past, self.n = self.n, self.n + k.size(2)
        self.k[:, :, past:self.n], self.v[:, :, past:self.n] = k, v
        return self.k[:, :, :self.n], self.v[:, :, :self.n]


class CausalSelfAttention(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.fused = cfg.n_head, cfg.fused_attention
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)   # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x, mask, rot, cache=None):
        """x (B, T, C) -> (B, T, C). mask (1 or B, 1, T, T_past + T), made by GPT.forward: True where a
        query may look, for the fused kernel; 0 there and -inf elsewhere, to add, for the plain math.
        rot: the (cos, sin) of each position's rotation angles, each (1 or B, 1, T, head_size)."""
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)   # (B, T, C) -> (B, n_head, T, head_size)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        q, k = rotate(q, *rot), rotate(k, *rot)   # where each token is, told by turning q and k
        if cache is not None:   # generation: keys and values of earlier tokens are kept, not recomputed
            k, v = cache.add(k, v)   # (B, n_head, T_past + T, head_size)
        drop = self.dropout if self.training else 0.0
        if self.fused or q.is_cuda:   # a GPU always takes the fused kernel: faster there
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        else:
            # the plain math: how well each query matches each key, scaled so softmax is not too sharp;
            # the mask adds -inf where looking is forbidden (ahead, and at padding), which softmax
            # turns into weights of 0; the output is the weighted sum of the values.
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))   # (B, n_head, T, T_past + T)
            att = att + mask.to(att.dtype)   # an add, not masked_fill: its backward needs no mask
            att = F.dropout(F.softmax(att, dim=-1), drop, self.training)
            y = att @ v                                                  # (B, n_head, T, head_size)
        y = y.transpose(1, 2).contiguous().view(B, T, C)               # heads side by side again
        return F.dropout(self.c_proj(y), self.dropout, self.training)


def rotate(x, cos, sin):
    """Rotary position embedding (RoPE): turn each pair of channels (i, i + head_size/2) of a query or
    key by an angle of position x frequency_i. A query at position m and a key at n then score
    q . k as if both had turned by m - n: attention sees how far back a token is, the same at every
    position, which is what copying a digit from a few tokens back needs."""
    x1, x2 = x.chunk(2, dim=-1)                               # (..., head_size / 2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class MLP(nn.Module):
    """Each position on its own: (B, T, C) -> (B, T, mlp_ratio * C), GELU, -> (B, T, C). GPT-2 widens
    4 times, as the default does."""

    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, mask, rot, cache=None):
        x = x + self.attn(self.ln_1(x), mask, rot, cache)   # communicate: look at earlier positions
        x = x + self.mlp(self.ln_2(x))                 # compute: each position on its own
        return x


class GPT(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight   # weight tying
        self.register_buffer("causal", torch.tril(torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool)),
                             persistent=False)
        # RoPE's angles, made once: position p turns channel pair i by p / 10000^(2i / head_size), fast
        # turns for the first pairs (near tokens), slow ones for the last (far tokens)
        hs = cfg.n_embd // cfg.n_head
        angle = torch.arange(cfg.block_size).float()[:, None] / 10000 ** (torch.arange(0, hs, 2).float() / hs)
        angle = torch.cat([angle, angle], dim=1)                                        # (block_size, head_size)
        self.register_buffer("rope_cos", angle.cos(), persistent=False)
        self.register_buffer("rope_sin", angle.sin(), persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):   # residual projections start small: GPT-2's scaled init
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, weights=None, caches=None, valid=None):
        """idx (B, T) token ids -> logits (B, T, vocab_size), and the mean loss if targets are given
        (weighted by `weights` (B, T), if given: how much each target counts).

        For generation, `caches` holds each layer's KVCache, and `valid` (B, T_total)
        marks the real tokens of left-padded prompts: padding is neither attended to nor counted
        in positions."""
        B, T = idx.shape
        past = caches[0].n if caches else 0
        if valid is None:
            pos = torch.arange(past, past + T, device=idx.device).unsqueeze(0)      # (1, T)
            mask = self.causal[past:past + T, :past + T].unsqueeze(0).unsqueeze(0)  # (1, 1, T, T_total)
        else:
            pos = (valid.long().cumsum(1) - 1).clamp(min=0)[:, past:past + T]      # (B, T)
            # a padding query may see itself (a row with nothing at all to attend to would give NaN)
            own = torch.eye(past + T, dtype=torch.bool, device=idx.device)[past:]          # (T, T_total)
            mask = ((self.causal[past:past + T, :past + T] & valid[:, None, :past + T]) | own).unsqueeze(1)
        if past + T > self.cfg.block_size:
            raise ValueError(f"sequence of {past + T} tokens is longer than block_size {self.cfg.block_size}")
        if not (self.cfg.fused_attention or idx.is_cuda):
            # the plain math adds the mask to the scores: 0 where a query may look, -inf elsewhere,
            # made once here for all layers
            mask = torch.zeros(mask.shape, device=idx.device).masked_fill(~mask, float("-inf"))
        rot = (self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1))   # (1 or B, 1, T, head_size)
        x = self.drop(self.wte(idx))   # (B, T, n_embd); positions enter inside attention, by rotation
        for i, block in enumerate(self.h):
            x = block(x, mask, rot, caches[i] if caches is not None else None)
        logits = self.lm_head(self.ln_f(x))            # (B, T, vocab_size)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), reduction="none")
        if weights is None:
            return logits, loss.mean()
        weights = weights.view(-1).float()
        return logits, (loss * weights).sum() / weights.sum().clamp(min=1.0)


# Try this: train with --n-layer 6 --mlp-ratio 2 (the same parameters) and compare how soon the
# probe passes 95% with the default 4 layers: depth buys rounds of looking back per token, width and
# speed buy the rest (in the same minutes on a CPU, 4 layers of 128 beat 4 of 192: cheaper steps,
# more of them).

# -----------------------------------------------------------------------------------------------
# 4. Data
# Training wants random windows of block_size + 1 token ids: x is the window without its last id,
# y the window shifted by one (the next token at every position). Your text is one long array of
# ids (read and tokenized once, then memory-mapped from disk: read_text_files and cached_ids in the
# appendix). The thinking corpus also keeps a loss weight per token and starts every window at the
# start of a problem, so the model always sees its question. What is scored is the answer (weight 1);
# the question counts half (QUESTION_WEIGHT): predicting a story's words, names and
# numbers as it is read makes the model learn to look back and copy, which reading the story into
# an equation needs, before the answer alone would teach it.
# -----------------------------------------------------------------------------------------------


QUESTION_WEIGHT = 0.5   # the loss weight of a question's tokens in training; the answer's is 1


def corpus_arrays(problems, tokenizer, direct=False, question_weight=0.0):
    """Token ids, loss weights and start offsets of the problems, one after another, END after each."""
    prompts, completions = zip(*(problem_text(p, direct) for p in problems))
    p_ids, c_ids = encode_many(tokenizer, list(prompts)), encode_many(tokenizer, list(completions))
    ids = np.fromiter((t for p, c in zip(p_ids, c_ids) for t in (*p, *c, tokenizer.end_id)), dtype=np.int32)
    lengths = np.array([(len(p), len(c) + 1) for p, c in zip(p_ids, c_ids)]).ravel()   # prompt, answer, ...
    weights = np.array([question_weight, 1], dtype=np.float32)
    weights = np.repeat(np.tile(weights, len(p_ids)), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths.reshape(-1, 2).sum(1))[:-1]])
    return ids, weights, starts


def corpus_splits(train_p, val_p, tokenizer, block_size, direct=False):
    """The built-in corpus as training and validation data: ids, loss weights and problem starts each.
    The validation loss is the answer's alone, so it reads the same whatever the question's weight."""
    ids, weights, starts = corpus_arrays(train_p, tokenizer, direct, QUESTION_WEIGHT)
    v_ids, v_weights, v_starts = corpus_arrays(val_p, tokenizer, direct)
    longest = int(np.diff(np.append(starts, len(ids))).max())   # prompt + completion + END, in tokens
    if longest > block_size + 1:   # its answer would be cut off: the model would never learn to write it
        raise UserError(f"the longest training problem is {longest} tokens: --block-size must be at least "
                        f"{longest - 1} (now {block_size})")
    return {"train": {"ids": ids, "weights": weights, "starts": starts},
            "val": {"ids": v_ids, "weights": v_weights, "starts": v_starts}}


def text_splits(ids, val_fraction, block_size):
    """Your text as training data and, from its last val_fraction, validation data."""
    n_val = int(len(ids) * val_fraction)
    if len(ids) - n_val < block_size + 2 or (n_val and n_val < block_size + 2):
        raise UserError(f"the data has {len(ids):,} tokens: too short for --block-size {block_size} "
                        f"with a {val_fraction:.0%} validation share; give more text or a smaller --block-size")
    splits = {"train": {"ids": ids[:len(ids) - n_val]}}
    if n_val:
        splits["val"] = {"ids": ids[len(ids) - n_val:]}
    return splits


def get_batch(data, batch_size, block_size, gen, device):
    """A batch of (x, y, loss weights): x, y (B, block_size). `data` is dict(ids, weights?, starts?)."""
    ids, starts = data["ids"], data.get("starts")
    if starts is not None:   # start at a problem's beginning, and leave room for a full window
        starts = starts[: np.searchsorted(starts, len(ids) - block_size - 1)]
        ix = starts[torch.randint(len(starts), (batch_size,), generator=gen).numpy()]
    else:
        ix = torch.randint(len(ids) - block_size - 1, (batch_size,), generator=gen).numpy()
    x = torch.from_numpy(np.stack([np.asarray(ids[i:i + block_size], dtype=np.int64) for i in ix]))
    y = torch.from_numpy(np.stack([np.asarray(ids[i + 1:i + 1 + block_size], dtype=np.int64) for i in ix]))
    w = data.get("weights")   # the loss weights of the targets, if the data has them
    w = None if w is None else torch.from_numpy(np.stack([w[i + 1:i + 1 + block_size] for i in ix])).to(device)
    return x.to(device), y.to(device), w


# -----------------------------------------------------------------------------------------------
# 5. Training
# AdamW keeps a running mean and variance of each gradient and steps each weight by their ratio;
# weight decay pulls the matrices towards zero (not biases, norms or embeddings, where it only
# hurts). The learning rate warms up linearly (early gradients are wild) and then follows a cosine
# down to 0, so the last steps settle the weights. Gradients are clipped to norm 1. On CUDA and on
# CPUs with bf16 units, matrix multiplies run in bfloat16 under autocast; the weights and the
# optimizer stay in float32.
# While the learning rate is high, each batch of 8 pushes the weights a little way off in its own
# direction, so they wander around the weights that would serve every batch. Their running average
# (an exponential moving average, EMA, over about the last hundred steps) sits nearer the centre:
# it is what evaluation measures and what a checkpoint holds as the model. While the learning rate
# is still high it writes far more of its working right than the weights themselves do (three seeds,
# 5.2M tokens into a 12M-token schedule: 90-97% of the probe against 71-81%), so what a model has
# learned shows long before its schedule ends, however long the machine's speed made the schedule.
# A checkpoint is one plain dict (tensors, numbers, strings) that loads with weights_only=True:
# nothing in it can run code. save_checkpoint (appendix) writes it so that a crash never leaves
# half of one; pick_dtype (appendix) decides whether bf16 pays on this machine.
# -----------------------------------------------------------------------------------------------


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU: use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for, but MPS is not available here: use --device cpu or auto")
    return name


def autocast(device, dtype):
    if dtype == "bf16":
        return torch.autocast(device_type="cuda" if device == "cuda" else "cpu", dtype=torch.bfloat16)
    return torch.autocast(device_type="cpu", enabled=False)


def lr_at(progress, lr, warmup):
    """Learning rate at a point of training, progress in [0, 1]: linear warm-up, then cosine to 0.
    Ending at 0 rather than lr/10 lets the last steps settle the weights instead of shaking them
    with batches of 8: on one machine, with learned positions, five seeds got 98.7-99.8% of the
    held-out questions, where ending at lr/10 got 96.3-97.9%."""
    if progress < warmup:
        return lr * progress / warmup
    p = min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))
    return lr * 0.5 * (1 + math.cos(math.pi * p))


def make_optimizer(model, lr, weight_decay, device):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("wte")]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n.startswith("wte")]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device == "cuda")


@dataclass
class TrainSettings:
    out: str = os.path.join("checkpoints", "tinyllm.pt")
    batch_size: int = 8
    grad_accum: int = 1
    # 3e-3 rather than 2e-3: at a fixed 4.0M tokens, three seeds each, the probe written exactly had a
    # median of 93.0% against 88.0%, each seed better; 4e-3 and 5e-3 fell back (medians 90.5, 89.5%).
    lr: float = 3e-3
    weight_decay: float = 0.1      # the thinking corpus at 4.0M tokens: 0 and 0.3 did no better (medians 92.0, 90.0%)
    warmup: float = 0.03           # share of the run spent warming up; 0.01 and 0.1 did no better (90.0, 92.0%)
    ema: float = 0.99              # the weights' running average keeps this share of itself each step; 0: none
    max_iters: int = 1_000_000
    max_minutes: float = 9.0
    eval_interval: int = 250
    eval_iters: int = 20
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    stop_after: int = 0            # stop (resumably) after this many steps, as if interrupted


def estimate_loss(model, splits, settings, device, dtype):
    """Mean loss on the same eval_iters batches of each split every time (their own fixed seed)."""
    gen = torch.Generator().manual_seed(settings.seed)
    model.eval()
    out = {}
    with torch.no_grad(), autocast(device, dtype):
        for name, data in splits.items():
            losses = [model(*get_batch(data, settings.batch_size, model.cfg.block_size, gen, device))[1].item()
                      for _ in range(settings.eval_iters)]
            out[name] = sum(losses) / len(losses)
    model.train()
    return out


LEARNED = 0.95   # the probe's share at which a thinking model counts as having learned its working


def train(model, tokenizer, splits, settings, meta, resume_state=None, probe=None):
    """The training loop. `splits` maps "train"/"val" to data dicts; `meta` is saved in checkpoints.
    `probe(model)` (optional) returns (a line to print at each evaluation, an accuracy or None)."""
    from tqdm import tqdm
    device, dtype = meta["device"], meta["dtype"]
    ddp = torch.distributed.is_available() and torch.distributed.is_initialized()   # torchrun (appendix)
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if ddp else (0, 1)
    model.to(device)
    # the weights' running average, evaluated and saved as the model (a resumed model is the average)
    average = copy.deepcopy(model) if settings.ema else model
    optimizer = make_optimizer(model, settings.lr, settings.weight_decay, device)
    gen = torch.Generator().manual_seed(settings.seed + rank)   # batches come from here (each rank its own)
    torch.manual_seed(settings.seed)                            # dropout
    step, elapsed, best_val, learned_at = 0, 0.0, float("inf"), None   # learned_at: tokens when the probe first passed LEARNED
    if resume_state is not None:   # appendix: the counters, the optimizer and the random streams as they were saved
        step, elapsed, best_val, learned_at = restore_training(resume_state, model, optimizer, gen, settings.seed,
                                                               rank, device)
    fwd = torch.nn.parallel.DistributedDataParallel(model) if ddp else model   # torchrun: averages gradients
    fwd = torch.compile(fwd) if settings.compile else fwd
    budget = settings.max_minutes * 60 if settings.max_minutes else float("inf")
    tokens_per_step = settings.batch_size * settings.grad_accum * model.cfg.block_size * world
    history, accuracy, val_loss, at_start = [], None, None, step
    meter = Speedometer(step, elapsed, tokens_per_step)   # appendix: tokens/s for the bar and the log
    with StopOnSignal() as stop, tqdm(total=settings.max_iters if budget == float("inf") else None, initial=step,
                                      unit="step", dynamic_ncols=True, disable=True if rank else None,
                                      file=sys.stderr) as bar:   # StopOnSignal (appendix): Ctrl-C stops cleanly
        start = time.perf_counter() - elapsed
        while True:
            progress = max(step / settings.max_iters, elapsed / budget)
            if settings.stop_after and step >= settings.stop_after:   # as if interrupted
                stop.asked = True
            if ddp:   # every rank follows rank 0's clock and Ctrl-C
                progress, stop.asked = torchrun_follow_rank0(progress, stop.asked, device)
            last = progress >= 1.0 or stop.asked
            if (step % settings.eval_interval == 0 or last) and rank == 0:
                losses = estimate_loss(average, splits, settings, device, dtype)
                val_loss = check_finite("validation loss", losses.get("val", losses["train"]), step, settings.lr)
                history.append(val_loss)
                text, accuracy = probe(average) if probe is not None else (None, None)
                tqdm.write(f"step {step}: train loss {losses['train']:.4f}, val loss {val_loss:.4f} "
                           f"{sparkline(history)}" + (", " + text if text else ""))
                if accuracy is not None and accuracy >= LEARNED and learned_at is None:
                    learned_at = step * tokens_per_step
                append_log(settings.out, {"step": step, "tokens": step * tokens_per_step, "train_loss": losses["train"],
                                          "val_loss": val_loss, "lr": lr_at(progress, settings.lr, settings.warmup),
                                          "elapsed": round(elapsed, 2), "tokens_per_s": meter.since_log(step, elapsed)},
                           accuracy, learned_at)
                if step > 0 or resume_state is not None:   # the weights, the optimizer and the random streams
                    state = training_state(average, tokenizer, optimizer, gen, meta, step=step, elapsed=elapsed,
                                           best_val_loss=min(best_val, val_loss), val_loss=val_loss,
                                           tokens_to_learned=learned_at)
                    if average is not model:   # --resume goes on from the weights themselves
                        state["training_weights"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
                    if val_loss < best_val:
                        best_val = val_loss
                        save_checkpoint(best_path(settings.out), state)
                    save_checkpoint(settings.out, state)
            if last:
                break
            lr, t_step = lr_at(progress, settings.lr, settings.warmup), time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr
            for _ in range(settings.grad_accum):
                x, y, weights = get_batch(splits["train"], settings.batch_size, model.cfg.block_size, gen, device)
                with autocast(device, dtype):
                    _, loss = fwd(x, y, weights)
                (loss / settings.grad_accum).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if average is not model:   # average += (1 - keep) (weights - average); young, it keeps less of itself
                keep = min(settings.ema, (1 + step) / (10 + step))
                with torch.no_grad():
                    for a, w in zip(average.parameters(), model.parameters()):
                        a.lerp_(w, 1 - keep)
            step += 1
            if settings.compile and step == at_start + 1:   # this step compiled the model: not training time, or the
                start += time.perf_counter() - t_step   # time-based warm-up would be over before it began
            elapsed = time.perf_counter() - start
            if step % 10 == 0:   # reading the loss waits for the GPU to finish, so only every tenth step
                lossf = check_finite("loss", loss.item(), step, settings.lr)
                bar.set_postfix(loss=f"{lossf:.3f}", lr=f"{lr:.1e}", tok_s=f"{meter.since_bar(step):,.0f}")
                bar.update(10)
    if ddp:
        torchrun_compare_weights(model)
    model.load_state_dict(average.state_dict())   # the model the caller goes on with is the one saved
    return {"step": step, "elapsed": elapsed, "val_loss": val_loss, "best_val_loss": best_val,
            "interrupted": stop.asked, "tokens": step * tokens_per_step, "probe": accuracy,
            "tokens_to_learned": learned_at}


# Try this: train with --lr 1e-2 and watch the loss: too high a learning rate makes it jump and stall.
# And train with --ema 0: the probe then reads the weights themselves, and climbs only as the
# learning rate decays.

# -----------------------------------------------------------------------------------------------
# 6. Sampling
# The model gives logits for the next token; we turn them into a choice. Temperature divides the
# logits (below 1 sharpens, above 1 flattens; 0 means always take the best: greedy). Top-k keeps the
# k best tokens, top-p the smallest set whose probabilities add up to p. A repetition penalty lowers
# tokens already in the context. The KV cache keeps every layer's keys and values, so each new
# token costs one position's work instead of the whole context's.
# -----------------------------------------------------------------------------------------------

def sample_next(logits, temperature=1.0, top_k=None, top_p=None, context=None, repetition_penalty=1.0,
                gen=None):
    """logits (B, vocab_size) -> next ids (B,)."""
    logits = logits.float()
    if repetition_penalty != 1.0 and context is not None:
        seen = torch.gather(logits, 1, context)
        logits = logits.scatter(1, context, torch.where(seen > 0, seen / repetition_penalty,
                                                        seen * repetition_penalty))
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = next_token_probs(logits, temperature, top_k, top_p)
    if gen is not None:   # a seeded generator (usually a CPU one) draws on its own device, whatever the model's
        return torch.multinomial(probs.to(gen.device), 1, generator=gen).squeeze(1).to(probs.device)
    return torch.multinomial(probs, 1).squeeze(1)


def next_token_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """logits (B, vocab_size) -> the probabilities sampling draws from, (B, vocab_size)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p   # keep tokens until the mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(1, order, sorted_p) / sorted_p.sum(-1, keepdim=True)
    return probs


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, end_id=None, temperature=0.0, top_k=None, top_p=None,
             repetition_penalty=1.0, gen=None, use_cache=True, on_token=None, dtype="fp32", fast=True):
    """Continue each prompt (a list of id lists) by up to max_new_tokens; returns the new ids of each.

    Prompts of different lengths are left-padded and masked, so one batch serves them all. With the
    cache, the prompts run through the model once and then one token per step; without it, the
    whole context runs every step (slow, but it is the definition: tests check they agree). fast: the
    tokens after the prompt go through the decoder fast_decoder chooses (in the appendix), the same
    arithmetic in fewer operations."""
    was_training = model.training
    model.eval()   # no dropout while generating; the caller's mode comes back at the end
    device = next(model.parameters()).device
    B, bs = len(prompts), model.cfg.block_size
    pad = 0 if end_id is None else end_id
    prompts = [p[-bs:] for p in prompts]   # crop long prompts from the left
    T = max(len(p) for p in prompts)
    idx = torch.tensor([[pad] * (T - len(p)) + p for p in prompts], device=device)           # (B, T)
    valid = torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts], device=device)
    padded = any(len(p) < T for p in prompts)   # without padding, the cheaper plain causal mask serves
    out = [[] for _ in range(B)]
    done = [False] * B
    caches, fed = None, 0   # fed: how many columns of idx the cache already holds
    decoder = fast_decoder(model, dtype, B) if fast else None
    for _ in range(max_new_tokens):
        if idx.size(1) > bs:   # the context is full: keep its last 3/4 and rebuild the cache
            keep = max(1, 3 * bs // 4)
            idx, valid, caches, fed = idx[:, -keep:], valid[:, -keep:], None, 0
        with autocast(device.type, dtype):
            if use_cache and caches is not None and decoder:   # the same arithmetic, fewer operations
                logits = decoder(idx[:, -1:], caches, valid if padded else None)
            elif use_cache:
                if caches is None:
                    caches = [KVCache(model.cfg.block_size) for _ in model.h]
                logits, _ = model(idx[:, fed:], caches=caches, valid=valid if padded else None)
                fed = idx.size(1)
            else:
                logits, _ = model(idx, valid=valid if padded else None)
        nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, idx, repetition_penalty, gen)
        for b, tok in enumerate(nxt.tolist()):   # a finished row keeps being computed; its tokens are dropped
            if not done[b]:
                out[b].append(tok)
                stop = on_token is not None and bool(on_token(b, tok, logits[b, -1]))   # True: the caller stops it
                done[b] = stop or tok == end_id
        if all(done):
            break
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        if padded:
            valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
    model.train(was_training)
    return [[t for t in o if t != end_id] if end_id is not None else o for o in out]


# Try this: generate with --temperature 1.5 and then 0.3: high temperature invents, low repeats.

# -----------------------------------------------------------------------------------------------
# 7. Evaluation
# Loss says how surprised the model is; evaluation asks whether it is right. Each question is asked
# as "Q: <question>\nA:", the reply is decoded greedily, and the first "Answer: N" line is compared
# with the truth. We also check the reasoning: are all written equations true, and is the answer the
# last value the working computed? A right answer reached by wrong steps is luck. Trivial baselines
# on the same questions (add all numbers, subtract them, repeat the last one) say what "right" means.
# -----------------------------------------------------------------------------------------------

ANSWER = re.compile(r"Answer:\s*(-?\d+)")
# what word processors and web pages put where a keyboard types ' " - and a space
TYPOGRAPHIC = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u2032": "'", "\u201c": '"',
                             "\u201d": '"', "\u201e": '"', "\u2033": '"', "\u2010": "-", "\u2011": "-",
                             "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2212": "-", "\u00a0": " ",
                             "\u2009": " ", "\u202f": " ", "\u2007": " ", "\u2026": "...", "\u00d7": "x",
                             "\u00f7": "/", "\u200b": None, "\ufeff": None})


def typed(text):
    """A question as a keyboard would type it: curly quotes, dashes, odd spaces made plain ASCII, and
    no space before a full stop, comma or question mark, or inside "Fred 's" (as some worksheets have)."""
    text = re.sub(r" +([.,?!;:]|'s\b)", r"\1", text.translate(TYPOGRAPHIC))
    return re.sub(r"  +", " ", text)


def score_reply(reply, answer):
    """Read one reply: its answer, whether it is right, and whether its working holds up."""
    match = ANSWER.search(reply)
    got = int(match.group(1)) if match else None
    work = reply[:match.start()] if match else reply
    eqs, last = EQUATION.findall(work), LAST_VALUE.findall(work)
    comparisons_ok = all(c.group(0) == which_is_more(int(c[1]), int(c[2])) for c in COMPARISON.finditer(work))
    return {"got": got, "correct": got == answer, "format_ok": match is not None,
            "read_ok": reading_value(work) == answer,
            "equations_ok": bool(eqs) and all(check_equation(l, r) for l, r in eqs) and comparisons_ok,
            "answer_is_last": bool(last) and got is not None and int(last[-1]) == got}


def baselines(question):
    nums = [int(x) for x in re.findall(r"\d+", question)]
    if not nums:
        return {"add all": None, "subtract": None, "last number": None}
    return {"add all": sum(nums), "subtract": nums[0] - sum(nums[1:]), "last number": nums[-1]}


def wilson(k, n, z=1.96):
    """95% confidence interval of a proportion k/n (Wilson's, which behaves near 0% and 100%)."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def ask(model, tokenizer, questions, batch_size=200, temperature=0.0, gen=None, dtype="fp32"):
    """Replies to questions, generated in batches (similar lengths together) with the KV cache. A
    question the tokenizer cannot encode gets the reason instead of a reply, and the others go on."""
    try:
        prompts = encode_many(tokenizer, [ask_prompt(typed(q)) for q in questions])
    except UserError:   # one of them: find which, and keep the rest
        prompts = []
        for q in questions:
            try:
                prompts.append(tokenizer.encode(ask_prompt(typed(q))))
            except UserError as e:
                prompts.append(str(e))
    asked = [i for i, p in enumerate(prompts) if not isinstance(p, str)]   # a str is the reason it was not
    replies = [f"(not asked: {p})" if isinstance(p, str) else None for p in prompts]
    order = sorted(asked, key=lambda i: len(prompts[i]))
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        outs = generate(model, [prompts[j] for j in chunk], min(256, model.cfg.block_size), tokenizer.end_id,
                        temperature=temperature, gen=gen, dtype=dtype)
        for j, o in zip(chunk, outs):
            replies[j] = tokenizer.decode(o)
    return replies


def written_exactly(model, tokenizer, problems, dtype="fp32", batch_size=100, direct=False):
    """The share of problems whose whole working and answer greedy decoding would write token for
    token. Teacher forcing shows the model each problem once; if at every position of the completion
    its most likely next token is the true one, greedy decoding writes exactly that completion (each
    token it writes is the one the next position was shown). One forward pass instead of a few hundred
    sampling steps: 200 problems cost at most 2.7 s on 2 cores (measured on a model of 1.5 times this
    width and 320-token windows), so training can afford it at every evaluation.
    A greedy reply is right at least this often (a different working can still reach the answer).
    direct: the completions are bare answers (a model trained with --corpus-format direct)."""
    device = next(model.parameters()).device
    was_training, right = model.training, 0
    model.eval()
    problems = sorted(problems, key=lambda p: len("".join(problem_text(p, direct))))   # less padding in a batch
    for i in range(0, len(problems), batch_size):
        texts = [problem_text(p, direct) for p in problems[i:i + batch_size]]
        p_ids, c_ids = encode_many(tokenizer, [t[0] for t in texts]), encode_many(tokenizer, [t[1] for t in texts])
        seqs = [(p + c + [tokenizer.end_id])[:model.cfg.block_size + 1] for p, c in zip(p_ids, c_ids)]
        T = max(map(len, seqs)) - 1
        x = torch.tensor([s[:-1] + [0] * (T + 1 - len(s)) for s in seqs], device=device)   # (B, T), padded at the end
        y = torch.tensor([s[1:] + [-1] * (T + 1 - len(s)) for s in seqs], device=device)   # -1: not scored
        for b, p in enumerate(p_ids):
            y[b, :len(p) - 1] = -1   # the question is given, not written
        with torch.no_grad(), autocast(device.type, dtype):
            logits, _ = model(x)
        wrong = (logits.argmax(-1) != y) & (y >= 0)   # (B, T)
        right += int((~wrong.any(1)).sum())
    model.train(was_training)
    return right / max(1, len(problems))


def evaluate(model, tokenizer, problems, votes=1, temperature=0.8, seed=0, dtype="fp32"):
    """Score a list of problems (dicts with question, answer and optional family/steps/split)."""
    questions = [p["question"] for p in problems]
    if votes <= 1:
        replies = ask(model, tokenizer, questions, dtype=dtype)
        scored = [score_reply(r, p["answer"]) for r, p in zip(replies, problems)]
    else:   # self-consistency: sample several chains of working, take the most common answer
        gen = torch.Generator().manual_seed(seed)
        runs = [ask(model, tokenizer, questions, temperature=temperature, gen=gen, dtype=dtype)
                for _ in range(votes)]
        replies, scored = [], []
        for i, p in enumerate(problems):
            cands = [score_reply(run[i], p["answer"]) for run in runs]
            answers = [c["got"] for c in cands if c["got"] is not None]
            top = max(set(answers), key=answers.count) if answers else None
            pick = next((k for k, c in enumerate(cands) if c["got"] == top), 0)
            replies.append(runs[pick][i])
            scored.append(cands[pick])
    for s, r, p in zip(scored, replies, problems):
        s.update(reply=r, question=p["question"], answer=p["answer"], family=p.get("family", "?"),
                 schema=p.get("schema", "?"),
                 steps=p.get("steps", 1), split=p.get("split", "?"))
    return summarize(scored)


def summarize(scored):
    def acc(rows):
        k, n = sum(r["correct"] for r in rows), len(rows)
        lo, hi = wilson(k, n)
        return {"accuracy": k / n if n else 0.0, "n": n, "correct": k, "ci95": [round(lo, 4), round(hi, 4)]}

    def by(key):
        return {str(v): acc([r for r in scored if r[key] == v]) for v in sorted({r[key] for r in scored})}

    n = len(scored)
    base = {name: sum(baselines(r["question"])[name] == r["answer"] for r in scored) / max(1, n)
            for name in ("add all", "subtract", "last number")}
    return {**acc(scored), "format_broken": sum(not r["format_ok"] for r in scored) / max(1, n),
            "reasoning_ok": sum(r["equations_ok"] for r in scored) / max(1, n),
            "answer_is_last_value": sum(r["answer_is_last"] for r in scored) / max(1, n),
            "read_ok": sum(r["read_ok"] for r in scored) / max(1, n),
            "per_family": by("family"), "per_schema": by("schema"), "per_steps": by("steps"),
            "per_split": by("split"),
            "baselines": base, "failures": [{k: r[k] for k in ("question", "reply", "answer")}
                                            for r in scored if not r["correct"]][:5]}


# -----------------------------------------------------------------------------------------------
# 8. Putting it together
# The chapters joined, as the default `python tinyllm.py train` and `eval` join them: problems with
# their working (chapter 2), a tokenizer learned from their text (1), the model (3), the problems
# as windows and loss weights (4), training (5) with a probe that generates (6) and scores (7) at every
# evaluation, then held-out questions it never trained on. cmd_train does the same with every flag,
# with --resume, and with your own text instead of the corpus.
#
#   model, tokenizer, summary = learn_to_think("checkpoints/mine.pt")   # about 10 minutes on a CPU
#   print(summary["accuracy"])
# -----------------------------------------------------------------------------------------------

def make_tokenizer(kind, texts, vocab_size, thinking):
    """A new tokenizer learned from texts (a list of strings): "char" or "bpe"."""
    if kind == "char":
        import string
        extra = string.printable if thinking else ""   # any typed ASCII question can be encoded
        return CharTokenizer(set(extra).union(*map(set, texts)))
    return BPETokenizer.train(texts, vocab_size, within_words=not thinking)


def accuracy_probe(tokenizer, sample, dtype, direct):
    """For train(): at each evaluation, the share of the sample's problems the model writes exactly."""
    def probe(model):
        acc = written_exactly(model, tokenizer, sample, dtype=dtype, direct=direct)
        return f"probe {100 * acc:.1f}% ({len(sample)} validation problems written exactly)", acc
    return probe


def sample_probe(tokenizer, start, dtype):
    """For train() on your text: at each evaluation, 60 sampled tokens after the text's first ids."""
    def probe(model):
        o = generate(model, [start], 60, None, temperature=0.8, top_k=40, gen=torch.Generator().manual_seed(0),
                     dtype=dtype)
        return "sample: " + repr(tokenizer.decode(start + o[0])), None
    return probe


def learn_to_think(out, minutes=TrainSettings.max_minutes, max_iters=TrainSettings.max_iters, seed=TrainSettings.seed,
                   corpus_size=CORPUS_SIZE, n_questions=1000):
    """The whole lesson in one call: build the corpus, learn a tokenizer, train the default model for
    the budget, save it at out (a new file: nothing is overwritten), and score it on held-out
    questions. Returns (model, tokenizer, the summary `eval` prints)."""
    claim_out(out, resume_asked=False, overwrite=False)                           # appendix: a new, writable file
    device = pick_device("auto")
    dtype = pick_dtype("auto", device)                                            # appendix: bf16 where it pays
    train_p, val_p = build_corpus(corpus_size, seed)                              # 2. stories and their working
    texts = ["".join(problem_text(p)) for p in train_p[:20_000]]
    tokenizer = make_tokenizer("bpe", texts, BPE_VOCAB_SIZE, thinking=True)       # 1. text <-> token ids
    torch.manual_seed(seed)                                                       # the initial weights
    model = GPT(Config(vocab_size=tokenizer.vocab_size))                          # 3. 4 layers of 128: 0.86M
    splits = corpus_splits(train_p, val_p, tokenizer, model.cfg.block_size)       # 4. windows and loss weights
    settings = TrainSettings(out=out, max_iters=max_iters, max_minutes=minutes, seed=seed, device=device, dtype=dtype)
    meta = {"data": None, "corpus_format": "working", "corpus_size": corpus_size, "device": device, "dtype": dtype,
            "settings": asdict(settings)}                                         # saved in the checkpoint
    probe = accuracy_probe(tokenizer, val_p[:200], dtype, direct=False)           # 6. and 7. as it learns
    train(model, tokenizer, splits, settings, meta, probe=probe)                  # 5.
    questions = make_split("questions", n_questions, seed=0)                      # never trained on
    return model, tokenizer, evaluate(model, tokenizer, questions, dtype=dtype)   # 7.


# -----------------------------------------------------------------------------------------------
# 9. Appendix: tools beyond the lesson
# Nothing here is needed to understand the model. The story catalogue (the wordings of every schema
# make_problem tells); checkpoints read with every field checked and written atomically, and the
# dtype race; your text read, tokenized once and memory-mapped; care for the user's files (temporary
# files of dead processes cleared, one training per checkpoint, outputs checked before any work);
# resuming a run, stopping it cleanly on Ctrl-C, and divergence (train() calls restore_training,
# StopOnSignal and check_finite); a training log and its plot; a look inside (the probabilities
# behind each token, one layer's attention); a chat loop; a faster one-token step for generate; int8
# inference; export to ONNX and to Hugging Face's GPT-NeoX format; data-parallel training with
# torchrun (cmd_train calls torchrun_start and torchrun_finish, train() the other two). Optional
# packages are imported inside each tool.
# -----------------------------------------------------------------------------------------------

# The story catalogue. make_problem tells each schema with the function STORIES names for it; the
# lesson showed two of them (tell_join, tell_separate_start), and these are the rest, written the
# same way: numbers first, then a sentence for each fact picked from a list of wordings, then the
# question, then the reading. Every list of four or more has its every fourth wording held out.

def tell_combine(w):
    """Combine, the total unknown: "Tom has 8 and Ann has 5. How many in all?" 8 + 5 = ?"""
    rng, obj = w.rng, w.obj
    a, b = number_pair(rng)
    b = rng.randint(1, 99) if a > 99 else b
    c1, c2 = rng.sample(COLOURS, 2)
    story = [w.pick([f"[n] {w.have()} {a} {obj} and [m] {w.have()} {b} {obj}.",
                     f"[n] {w.gain()} {a} {obj}. [m] {w.gain()} {b} {obj}.",
                     f"There are {a} {c1} {obj} and {b} {c2} {obj} in the {rng.choice(PLACES)}.",
                     f"[n] {w.gain()} {a} {obj} and [m] {w.gain()} {b}.",
                     f"A {rng.choice(PLACES)} holds {a} {c1} {obj} and {b} {c2} {obj}."])]
    q = w.pick([f"How many {obj} are there in all?", f"How many {obj} are there altogether?",
                f"How many {obj} in total?", f"How many {obj} are there together?",
                f"What is the total number of {obj}?", f"How many {obj} do they have together?",
                f"How many {obj} do they have in all?", f"How many {obj} did they get in total?"])
    reading = f"{a} + {b} = ?"
    return story, q, reading


def tell_compare_more(w):
    """Compare, the bigger unknown: "Tom has 8. Ann has 5 more than Tom. How many has Ann?" 8 + 5 = ?"""
    rng, obj = w.rng, w.obj
    a, b = number_pair(rng)
    b = rng.randint(1, 99) if a > 99 else b
    story = [f"[n] {w.have()} {a} {obj}.",
             w.pick([f"[m] has {b} more {obj} than [n!].",
                     f"[m] has {b} more than [n!].",
                     f"[m] has {b} {obj} more than [n!] does.",
                     f"[m] {w.have()} {b} more {obj} than [n!] {w.have()}."])]
    q = f"How many {obj} does [m!] have?"
    reading = f"{a} + {b} = ?"
    return story, q, reading


def tell_separate(w):
    """Separate, the result unknown: "Tom has 13. He gives away 5. How many are left?" 13 - 5 = ?"""
    rng, obj = w.rng, w.obj
    a, b = number_pair(rng)
    story = [f"[n] {w.have()} {a} {obj}.",
             w.pick([f"[n] {w.lose()} {b}.", f"[n] {w.lose()} {b} of them.",
                     f"Then [n] {w.lose()} {b} {obj}.",
                     f"[n] {w.tensed('gives', 'gave')} {b} {obj} to [m].",
                     f"[m] {w.tensed('takes', 'took')} {b} of them away.",
                     f"[n] {w.lose()} {b} {obj} at school.", f"[m] bought {b} of [n2] {obj}.",
                     f"[m] took {b} of [n2] {obj}."])]
    q = w.pick([f"How many {obj} does [n] have now?", f"How many {obj} are left?",
                f"How many {obj} does [n] have left?", f"How many {obj} remain?",
                f"How many {obj} does [n] end with?", f"How many {obj} are still there?"])
    if rng.random() < 0.3:
        place = rng.choice(PLACES)
        story, q = w.in_a_place(a, place, [
            f"[n] takes {b} {obj} out of the {place}.", f"[n] removes {b} {obj} from the {place}.",
            f"[n] {w.lost()} {b} of them.", f"{b} {obj} were taken from the {place}."], [
            f"How many {obj} are in the {place} now?", f"How many {obj} are left in the {place}?",
            f"How many {obj} does the {place} hold now?", f"How many {obj} are still in the {place}?"],
            ["at first.", "before.", "to begin with.", "originally."])
    reading = f"{a} - {b} = ?"
    return story, q, reading


def tell_join_change(w):
    """Join, the change unknown: "She had 8. She got some more. Now she has 13. How many did she get?" 8 + ? = 13"""
    rng, obj = w.rng, w.obj
    a, b = number_pair(rng)
    c, a = a, a - b   # had a, got ?, now c: ? = c - a
    story = [f"[n] had {a} {obj}.",
             w.pick([f"[n] got some more.", f"[m] gave [n1] some more.",
                     f"[n] found some more {obj}.",
                     f"[n2] {rng.choice(RELATIVES)} gave [n1] some more."]),
             w.pick([f"Now [n] has {c} {obj}.", f"Now [n] has {c} in all.",
                     f"[n] has {c} {obj} now.", f"Now there are {c} {obj}."])]
    q = w.pick([f"How many {obj} did [n] get?", f"How many more {obj} did [n] get?",
                f"How many {obj} were added?", f"How many {obj} did [n] receive?"])
    if rng.random() < 0.3:   # or the wish: "how many more does she need to have c?"
        story = [f"[n] has {a} {obj}."]
        q = w.pick([f"How many more {obj} does [n] need to have {c}?",
                    f"How many more {obj} does [n] need to get to {c}?",
                    f"How many more {obj} must [n] find to have {c} {obj}?",
                    f"How many more {obj} does [n] have to collect to have {c}?"])
    reading = f"{a} + ? = {c}"
    return story, q, reading


def tell_join_start(w):
    """Join, the start unknown: "He had some. He got 5 more. Now he has 13. How many at first?" ? + 5 = 13"""
    rng, obj = w.rng, w.obj
    a, b = number_pair(rng)
    c = a   # had ?, got b, now c: ? = c - b
    story = [f"[n] had some {obj}.", f"[n] {w.got()} {b} more.",
             w.pick([f"Now [n] has {c} {obj}.", f"Now [n] has {c} in all.",
                     f"[n] has {c} {obj} now.", f"Now there are {c} {obj}."])]
    q = w.pick([f"How many {obj} did [n] have at first?", f"How many {obj} did [n] start with?",
                f"How many {obj} did [n] have before?", f"How many {obj} were there to begin with?"])
    reading = f"? + {b} = {c}"
    return story, q, reading


def tell_separate_change(w):
    """Separate, the change unknown: "She had 13. She sold some. 8 are left. How many are gone?" 13 - ? = 8"""
    rng, obj = w.rng, w.obj
    a, b = number_pair(rng)
    c = a - b   # had a, lost ?, c left: ? = a - c
    story = [f"[n] had {a} {obj}.",
             w.pick([f"[n] gave some to [m].", f"[n] lost some of them.",
                     f"[n] sold some {obj}.", f"Some of them were eaten."]),
             w.pick([f"Now [n] has {c} {obj} left.", f"{c} {obj} are left.",
                     f"[n] has {c} left.", f"Now there are {c} {obj}."])]
    q = w.pick([f"How many {obj} are gone?", f"How many {obj} did [n] lose?",
                f"How many {obj} were taken?", f"How many {obj} did [n] give away?"])
    reading = f"{a} - ? = {c}"
    return story, q, reading


def tell_combine_part(w):
    """Combine, a part unknown: "There are 13 cups. 5 are red. The rest are blue. How many are blue?" 5 + ? = 13"""
    rng, obj = w.rng, w.obj
    a, b = number_pair(rng)
    c, a = a, b   # c in all, a of one kind: ? = c - a
    c1, c2 = rng.sample(COLOURS, 2)
    story = w.pick([[f"[n] and [m] have {c} {obj} in all.", f"[n!] has {a}."],
                    [f"There are {c} {obj}.", f"{a} of them are {c1}.", f"The rest are {c2}."],
                    [f"There are {c} {obj} in the {rng.choice(PLACES)}.", f"{a} are {c1} and the rest are {c2}."],
                    [f"[n] has {c} {obj}.", f"{a} of them are {c1}."]])
    q = (f"How many does [m!] have?" if "in all" in story[0] else
         w.pick([f"How many {obj} are {c2}?", f"How many are {c2}?", f"How many {c2} {obj} are there?",
                 f"How many {obj} are not {c1}?"]))
    reading = f"{a} + ? = {c}"
    return story, q, reading


def tell_compare_fewer(w):
    """Compare, the smaller unknown: "Tom has 13. Ann has 5 fewer than Tom. How many has Ann?" 13 - 5 = ?"""
    rng, obj = w.rng, w.obj
    a, b = number_pair(rng)
    story = [f"[n] {w.have()} {a} {obj}.",
             w.pick([f"[m] has {b} fewer {obj} than [n!].",
                     f"[m] has {b} fewer than [n!].",
                     f"[m] has {b} less than [n!] does.",
                     f"[m] {w.have()} {b} fewer {obj} than [n!] {w.have()}."])]
    q = f"How many {obj} does [m!] have?"
    reading = f"{a} - {b} = ?"
    return story, q, reading


def tell_compare_difference(w):
    """Compare, the difference unknown, either number first: "How many more has Ann?" 13 - 8 = ?"""
    rng, obj = w.rng, w.obj
    a, b = number_pair(rng)
    x, y = (b, a) if rng.random() < 0.5 else (a, b)   # every wording in either order
    big, small = ("n", "m") if x > y else ("m", "n")
    story = [w.pick([f"[n] {w.have()} {x} {obj}. [m] {w.have()} {y} {obj}.",
                     f"[n] {w.have()} {x} {obj} and [m] {w.have()} {y}.",
                     f"[n] read {x} pages. [m] read {y} pages.",
                     f"[n] {w.gain()} {x} {obj}. [m] {w.gain()} {y}."])]
    q = w.pick([f"How many more {obj} does [{big}!] have than [{small}!]?",
                f"How many fewer {obj} does [{small}!] have than [{big}!]?",
                f"How many more does [{big}!] have?", f"What is the difference between them?"])
    if "pages" in story[0]:
        q = f"How many more pages did [{big}!] read?"
    if rng.random() < 0.25:   # a measure, not a count
        verb, unit, more, less = w.pick([("weighs", "pounds", "heavier", "lighter"),
                                         ("is", "inches tall", "taller", "shorter"),
                                         ("runs", "miles", "farther", "less far"),
                                         ("is", "years old", "older", "younger")])
        story = [f"[n] {verb} {x} {unit}. [m] {verb} {y} {unit}."]
        q = rng.choice([f"How much {more} is [{big}!] than [{small}!]?",
                        f"How much {less} is [{small}!] than [{big}!]?"])
        if verb == "runs":
            q = f"How much farther does [{big}!] run than [{small}!]?"
    reading = f"{x} - {y} = ?" if x > y else f"{x} + ? = {y}"
    return story, q, reading


def tell_groups(w, price=False):
    """Equal groups or a price, the product unknown: "4 boxes with 6 in each", "each costs $6; she buys 4": 4 x 6 = ?"""
    rng, obj = w.rng, w.obj
    a, b = rng.randint(2, 9), rng.randint(2, 9)   # a groups of b
    place = rng.choice(PLACES)
    places = PLURAL.get(place, place + "s")
    story = [w.pick([f"[n] {w.have()} {a} {places} with {b} {obj} in each.",
                     f"There are {a} {places}. Each {place} holds {b} {obj}.",
                     f"[n] makes {a} piles of {b} {obj}.",
                     f"Each {place} has {b} {obj}. There are {a} {places}.",
                     f"[n] {w.gain()} {b} {obj} every day for {a} days.",
                     f"Each child has {b} {obj}. There are {a} children."])]
    q = w.pick([f"How many {obj} are there in all?", f"How many {obj} are there altogether?",
                f"How many {obj} in total?", f"How many {obj} is that?"])
    if price:
        item = rng.choice(OBJECTS)
        story = [w.pick([f"Each of the {item} costs ${b}.", f"{item.capitalize()} cost ${b} each.",
                         f"One of the {item} costs {b} dollars.", f"The {item} are ${b} each."]),
                 f"[n] {w.tensed('buys', 'bought')} {a} of them."]
        q = w.pick([f"How much money does [n] spend?", f"How much does [n] pay?",
                    f"How many dollars did [n] spend?", f"How much do {a} {item} cost?"])
    if rng.random() < 0.25:
        story = [w.pick([f"There are {b} {obj} in each {place}.", f"Each {place} has {b} {obj}.",
                         f"One {place} holds {b} {obj}.", f"[n] puts {b} {obj} in every {place}."])]
        q = w.pick([f"How many {obj} are in {a} {places}?", f"How many {obj} are there in {a} {places}?",
                    f"How many {obj} do {a} {places} hold?", f"How many {obj} will {a} {places} have?"])
    if "[n]" not in " ".join(story) and "[n]" in q:
        q = f"How many {obj} are there in all?"
    reading = f"{a} x {b} = ?"
    return story, q, reading


def tell_share(w, bags=False):
    """Sharing (the group's size unknown) or bags (the number of groups unknown): 24 / 6 = ?"""
    rng, obj = w.rng, w.obj
    k, d = rng.randint(2, 9), rng.randint(2, 9)
    t = k * d
    place = rng.choice(PLACES)
    places = PLURAL.get(place, place + "s")
    if not bags:   # t shared among d: each gets ?
        story = [w.pick([f"[n] shares {t} {obj} equally among {d} friends.",
                         f"{t} {obj} are put into {d} equal groups.",
                         f"[n] has {t} {obj} in {d} {places}, the same number in each.",
                         f"[n] splits {t} {obj} evenly between {d} {places}.",
                         f"{t} {obj} are shared by {d} children equally."])]
        q = w.pick([f"How many {obj} does each get?", f"How many {obj} are in each?",
                    f"How many {obj} go in each {place}?", f"How many {obj} is that for each?"])
    else:   # t in bags of d: ? bags
        story = [w.pick([f"[n] packs {t} {obj} into {places} of {d}.",
                         f"There are {t} {obj}. Each {place} holds {d}.",
                         f"[n] puts {d} {obj} in each {place} and has {t} {obj}.",
                         f"{t} {obj} are put in {places}, {d} in each.",
                         f"Each {place} holds {d} {obj}. There are {t} {obj}."])]
        q = w.pick([f"How many {places} does [n] fill?", f"How many {places} are needed?",
                    f"How many {places} are there?", f"How many {places} can be filled?"])
    if "[n]" not in " ".join(story) and "[n]" in q:
        q = f"How many {places} are needed?"
    reading = f"{t} / {d} = ?"
    return story, q, reading


def tell_sum(w):
    """A bare sum of two numbers up to 999, no story."""
    rng = w.rng
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    story, q = [], rng.choice([f"What is {a} + {b}?", f"Add {a} and {b}.", f"What is the sum of {a} and {b}?"])
    reading = f"{a} + {b} = ?"
    return story, q, reading


def tell_changes(w, steps=None):
    """Two or more gains and losses in a row: "She has 12. She gets 5 more, then loses 3." 12 + 5 - 3 = ?"""
    rng, obj = w.rng, w.obj
    steps = steps or rng.randint(2, 3)
    s = rng.randint(5, 60)
    story, chain, joined = [f"[n] {w.have()} {s} {obj}."], str(s), False
    for i in range(steps):
        if s > 8 and (s > 150 or rng.random() < 0.5):
            x = rng.randint(1, min(s - 1, 60))
            said = f"{w.lose()} {x}" + rng.choice(["", " of them", f" {obj}"])
            chain += f" - {x}"; s -= x
        else:
            x = rng.randint(2, 60)
            said = f"{w.gain()} {x} more" + rng.choice(["", f" {obj}"])
            chain += f" + {x}"; s += x
        if i and not joined and rng.random() < 0.4:   # two changes in one sentence
            story[-1] = story[-1][:-1] + rng.choice([" and ", " and then ", " but ", ", then "]) + said + "."
            joined = True
        else:
            then = "Then " if i and rng.random() < 0.5 else ""
            story.append(f"{then}[n] {said}.")
            joined = False
    q = w.pick([f"How many {obj} does [n] have now?", f"How many {obj} does [n] have left?",
                f"How many {obj} does [n] end with?", f"How many {obj} does [n] have in the end?"])
    reading = chain + " = ?"
    return story, q, reading


def tell_combine3(w):
    """Three amounts put together: "Tom has 5, Ann 7 and Sam 2." 5 + 7 + 2 = ?"""
    rng, obj = w.rng, w.obj
    a, b, c = (rng.randint(2, 60) for _ in range(3))
    story = [w.pick([f"[n] {w.gain()} {a} {obj}, [m] {w.gain()} {b} and [o] {w.gain()} {c}.",
                     f"[n] has {a} {obj}. [m] has {b}. [o] has {c}.",
                     f"There are {a} red, {b} blue and {c} green {obj}.",
                     f"[n] {w.gain()} {a} {obj} on Monday, {b} on Tuesday and {c} on Wednesday."])]
    q = w.pick([f"How many {obj} are there in all?", f"How many {obj} altogether?", f"How many {obj} in total?",
                f"What is the total number of {obj}?"])
    reading = f"{a} + {b} + {c} = ?"
    return story, q, reading


def tell_groups_change(w):
    """Equal groups, then a gain or a loss: "4 bags of 6; she eats 3." 4 x 6 - 3 = ?"""
    rng, obj = w.rng, w.obj
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    place = rng.choice(PLACES)
    places = PLURAL.get(place, place + "s")
    story = [f"[n] {w.have()} {a} {places} with {b} {obj} in each."]
    if rng.random() < 0.5:
        c = rng.randint(1, a * b - 1)
        story.append(f"[n] {w.lose()} {c} {obj}.")
        reading = f"{a} x {b} - {c} = ?"
    else:
        c = rng.randint(2, 60)
        story.append(f"[n] {w.gain()} {c} more {obj}.")
        reading = f"{a} x {b} + {c} = ?"
    q = w.pick([f"How many {obj} does [n] have now?", f"How many {obj} are there now?",
                f"How many {obj} does [n] end with?", f"How many {obj} does [n] have in all?"])
    return story, q, reading


STORIES = {   # schema: the function that tells it
    "join": tell_join, "separate-start": tell_separate_start, "combine": tell_combine,
    "compare-more": tell_compare_more, "separate": tell_separate, "join-change": tell_join_change,
    "join-start": tell_join_start, "separate-change": tell_separate_change, "combine-part": tell_combine_part,
    "compare-fewer": tell_compare_fewer, "compare-difference": tell_compare_difference,
    "groups": tell_groups, "price": lambda w: tell_groups(w, price=True),
    "share": tell_share, "bags": lambda w: tell_share(w, bags=True), "sum": tell_sum,
    "changes": tell_changes, "combine3": tell_combine3, "groups-change": tell_groups_change}


CHECKPOINT_LIMITS = {   # field: (type, lowest, highest); far above anything this tool trains
    "vocab_size": (int, 2, 1 << 20), "block_size": (int, 1, 8192), "n_layer": (int, 1, 64),
    "n_head": (int, 1, 64), "n_embd": (int, 1, 4096), "mlp_ratio": (int, 1, 16), "dropout": (float, 0.0, 0.99),
    "bias": (bool, None, None), "fused_attention": (bool, None, None)}
OPTIONAL_FIELDS = {"dropout": 0.0, "mlp_ratio": 4}   # absent from older checkpoints: what they had
MAX_LOAD_PARAMS = 20_000_000   # ten times the product's ceiling: a model of that size is still a small file


def check_checkpoint_file(path):
    """Before torch.load: a checkpoint is a zip (torch.save's format) whose entries are stored, not
    compressed, as torch.save writes them. A compressed entry could unpack to gigabytes from a small
    file; stored ones cannot be bigger than the file, which torch.load then maps rather than reads."""
    import zipfile
    if not os.path.isfile(path):
        raise UserError(f"{path} is not a regular file: point --checkpoint at a checkpoint file")
    try:
        with zipfile.ZipFile(path) as z:
            entries = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise UserError(f"{path} is not a loadable tinyllm checkpoint (not the zip that torch.save writes)")
    if any(e.compress_type != zipfile.ZIP_STORED for e in entries) or \
            sum(e.file_size for e in entries) > os.path.getsize(path):
        raise UserError(f"{path} is not a loadable tinyllm checkpoint (it holds compressed data, which "
                        "torch.save never writes)")


def check_config(raw, path):
    """A Config from a checkpoint's untrusted dict: every field's type and range, then the size."""
    if not isinstance(raw, dict):
        raise UserError(f"{path} has a broken config (not a dictionary of settings)")
    values = {}
    for name, (kind, lo, hi) in CHECKPOINT_LIMITS.items():
        if name not in raw and kind is not bool and name not in OPTIONAL_FIELDS:   # the shape must be given
            raise UserError(f"{path} has a broken config: {name} is missing")
        v = raw.get(name, OPTIONAL_FIELDS.get(name, getattr(Config, name)))
        number = isinstance(v, int if kind is int else (int, float)) and not isinstance(v, bool)
        ok = isinstance(v, bool) if kind is bool else number and lo <= v <= hi   # NaN and inf fail here too
        if not ok:
            want = "true or false" if kind is bool else f"{'a whole number' if kind is int else 'a number'} " \
                                                        f"from {lo} to {hi}"
            raise UserError(f"{path} has a broken config: {name} is {repr(v)[:40]}, it must be {want}")
        values[name] = kind(v)
    cfg = Config(**values)
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"{path} has a broken config: n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
    n = sum(param_breakdown(cfg).values())
    if n > MAX_LOAD_PARAMS:
        raise UserError(f"{path} claims a model of {n:,} parameters; this tool loads at most {MAX_LOAD_PARAMS:,}")
    return cfg


def check_weights(sd, cfg, path):
    """The weights' names, shapes and dtypes against the model the config describes, built on the
    "meta" device: shapes only, no memory, so a lying config costs nothing."""
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: its weights are not a dictionary of tensors")
    with torch.device("meta"):
        want = GPT(cfg).state_dict()
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    wrong = [k for k in want if k in sd and (tuple(sd[k].shape) != tuple(want[k].shape)
                                             or sd[k].dtype != torch.float32)]
    if missing or wrong or extra:
        what = (f"missing {missing[:3]}" if missing else f"wrong shape or dtype for {wrong[:3]}" if wrong
                else f"unexpected {extra[:3]}")
        raise UserError(f"{path}: its weights do not match its config ({what})")


def check_training_fields(ck, path):
    """The fields info and --resume read: a step, losses, the run's settings."""
    step, meta = ck.get("step"), ck.get("meta", {})
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise UserError(f"{path} has a broken training state: step is {repr(step)[:40]}")
    for k in ("best_val_loss", "val_loss", "elapsed"):
        v = ck.get(k, 0.0 if k != "best_val_loss" else None)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))) or \
                v is None and k == "best_val_loss":
            raise UserError(f"{path} has a broken training state: {k} is {repr(v)[:40]}")
    if not isinstance(meta, dict):
        raise UserError(f"{path} has a broken training state: meta is not a dictionary")


def setting_ok(name, v):
    default = getattr(TrainSettings, name)
    if isinstance(default, bool) or isinstance(default, str):
        return type(v) is type(default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return False
    if isinstance(default, int):
        return isinstance(v, int) and v >= (1 if name in ("batch_size", "grad_accum", "eval_interval", "eval_iters",
                                                          "max_iters") else 0)
    return v >= 0 and (name != "lr" or v > 0) and (name != "ema" or v < 1)


def check_resume(ck, path):
    """What --resume needs beyond the model: the run's settings, the optimizer's and the RNG's state."""
    meta, broken = ck.get("meta"), None
    names = {f.name for f in fields(TrainSettings)}
    if not isinstance(meta, dict) or not all(k in meta for k in ("data", "corpus_format", "corpus_size", "settings")):
        broken = "its run settings (meta) are missing"
    elif not (meta["data"] is None or isinstance(meta["data"], list) and all(isinstance(p, str) for p in meta["data"])):
        broken = "its data paths are not a list of paths"
    elif meta["corpus_format"] not in ("working", "direct") or not isinstance(meta["corpus_size"], int):
        broken = "its corpus settings are odd"
    elif not isinstance(meta["settings"], dict) or set(meta["settings"]) - names or \
            not all(setting_ok(k, v) for k, v in meta["settings"].items()):
        broken = "its training settings are odd"
    elif not isinstance(ck.get("optimizer"), dict) or not isinstance(ck.get("rng"), dict) or \
            not all(isinstance(ck["rng"].get(k), torch.Tensor) and ck["rng"][k].dtype == torch.uint8
                    for k in ("batches", "torch")):
        broken = "its optimizer or random-number state is missing or odd"
    if broken:
        raise UserError(f"{path} cannot be resumed: {broken}; start a new run with --overwrite")


# Checkpoints and the dtype. A checkpoint is written to a temporary file, flushed to disk and renamed
# into place, so a crash never leaves half of one; it is read with weights_only=True and every field
# checked (the functions above) before a model is built from it. "auto" dtype races a bf16 and an
# fp32 matmul of the model's size once, because CPUs without bf16 units emulate it slowly.

CHECKPOINT_FORMAT = "tinyllm-checkpoint"


CHECKPOINT_VERSION = 2   # 2: rotary positions (version 1 had a learned table, wpe)


def save_checkpoint(path, state):
    """Write atomically: a temporary file in the same folder, flushed to disk, then renamed into place."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:   # a full disk: torch.save's writer raises RuntimeError
        why = getattr(e, "strerror", None) or str(e).splitlines()[0][:120]
        raise UserError(f"could not write {path}: {why}; any checkpoint that was there is intact")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def training_state(model, tokenizer, optimizer, gen, meta, **counters):
    """Everything a checkpoint holds: the model and its tokenizer, and for --resume the optimizer, the
    random streams and the run's counters (step, elapsed, best_val_loss, val_loss, tokens_to_learned)."""
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "config": asdict(model.cfg), "tokenizer": tokenizer.to_json(),
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(), "meta": meta, **counters,
            "rng": {"batches": gen.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if meta["device"] == "cuda" else None}}


def best_path(path):
    return os.path.splitext(path)[0] + ".best.pt"


def log_path(path):   # one JSON line per evaluation, beside the checkpoint
    return os.path.splitext(path)[0] + ".log.jsonl"


def load_checkpoint(path):
    """Load and check a checkpoint. weights_only=True: a file that tries to run code is refused."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}: train one first with `python tinyllm.py train`, "
                        "or point --checkpoint at one")
    check_checkpoint_file(path)   # before anything is read from it (appendix)
    try:   # mmap: the tensors stay in the file until used, so no claim in it allocates memory
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a loadable tinyllm checkpoint (corrupt, or it holds objects "
                        f"that could run code, which are refused): {first[:200]}")
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a tinyllm checkpoint (it was made by another program)")
    if ck.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path} has checkpoint format version {ck.get('version')}; "
                        f"this tinyllm reads version {CHECKPOINT_VERSION}: train the model again with this version")
    check_training_fields(ck, path)
    return ck


def model_from_checkpoint(ck, path="checkpoint"):
    """Rebuild the tokenizer and the model, refusing any mismatch with a message."""
    cfg = check_config(ck.get("config"), path)   # types and ranges, before anything is built (appendix)
    try:
        tokenizer = tokenizer_from_json(ck["tokenizer"])
    except UserError as e:
        raise UserError(f"{path}: {e}")
    except Exception as e:   # the tokenizers library raises a bare Exception on a broken string
        raise UserError(f"{path} has a broken tokenizer: {str(e)[:200] or type(e).__name__}")
    if tokenizer.vocab_size != cfg.vocab_size:
        raise UserError(f"{path} is inconsistent: its tokenizer has {tokenizer.vocab_size} tokens "
                        f"but its config says vocab_size={cfg.vocab_size}")
    check_weights(ck.get("model"), cfg, path)   # keys, shapes and dtypes, against a model that is not built
    model = GPT(cfg)
    model.load_state_dict(ck["model"])
    return model, tokenizer


def model_from_file(path):
    """The model and tokenizer of the checkpoint at path, checked as load_checkpoint checks it."""
    return model_from_checkpoint(load_checkpoint(path), path)


def pick_dtype(name, device):
    """bf16 autocast where it is supported and faster, else fp32. On CPU, a quick matmul race decides."""
    if name != "auto" or device not in ("cpu", "cuda"):
        return "fp32" if name == "auto" else name
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    speed = {}
    for dt in (torch.float32, torch.bfloat16):
        a, b = torch.randn(1024, 192, dtype=dt), torch.randn(192, 768, dtype=dt)
        a @ b
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        speed[dt] = time.perf_counter() - t
    return "bf16" if speed[torch.bfloat16] < 0.8 * speed[torch.float32] else "fp32"


def append_log(out, row, accuracy=None, learned_at=None):
    """One JSON line per evaluation in the log beside the checkpoint (plot reads it)."""
    more = {} if accuracy is None else {"accuracy": accuracy, "tokens_to_learned": learned_at}
    with open(log_path(out), "a") as f:
        f.write(json.dumps({**row, **more}) + "\n")


def sparkline(values):   # the validation loss so far, in one line of the terminal
    bars = "▁▂▃▄▅▆▇█"
    lo, hi = min(values), max(values)
    return "".join(bars[round((v - lo) / (hi - lo + 1e-12) * (len(bars) - 1))] for v in values)


# Your text, read and tokenized once. A file is read as UTF-8 (a byte-order mark is dropped, "\r\n"
# and "\r" become "\n"), anything that is not a regular text file is refused before it is read, and
# the ids are cached on disk as a flat file of integers named by a hash of the text and the
# tokenizer, memory-mapped, so a big file is neither re-tokenized every run nor held in memory.

def read_text_files(paths):
    """Texts of the given files (folders: their .txt and .md files), normalised. Refuses bad input."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs
                           if f.endswith((".txt", ".md")) and os.path.isfile(os.path.join(r, f)))
            if not found:
                raise UserError(f"folder {path} holds no .txt or .md files")
            files += found
        elif not os.path.exists(path):
            raise UserError(f"data file {path} does not exist: give a UTF-8 text file or a folder of them")
        elif not os.path.isfile(path):   # /dev/zero, a pipe, a socket: it could be read without end
            raise UserError(f"{path} is not a regular file (a device, pipe or socket): give a UTF-8 text "
                            "file or a folder of them")
        else:
            files.append(path)
    texts = []
    for f in files:
        try:
            with open(f, "rb") as fh:
                raw = fh.read()
        except OSError as e:
            raise UserError(f"cannot read {f}: {e.strerror}")
        if b"\0" in raw[:8192]:
            raise UserError(f"{f} looks binary (it has NUL bytes): give a UTF-8 text file")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise UserError(f"{f} is not UTF-8 (bad byte at offset {e.start}): re-save it as UTF-8")
        del raw   # a big file should not be held twice
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if text.strip():
            texts.append(text)
    if not texts:
        raise UserError(f"the data ({', '.join(paths)}) is empty: give a file with some text in it")
    return texts


def cached_ids(texts, tokenizer, cache_dir):
    """Token ids of the texts joined by END, cached on disk by a hash of the text and the tokenizer."""
    step = 1 << 22   # 4M characters at a time keeps memory flat
    h = zlib.crc32(tokenizer.to_json().encode())
    for t in texts:
        for i in range(0, len(t), step):
            h = zlib.crc32(t[i:i + step].encode(), h)
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    path = os.path.join(cache_dir, f"ids-{h:08x}-{sum(map(len, texts))}.{np.dtype(dtype).name}.bin")
    clear_stale_temporaries(cache_dir)
    if not os.path.exists(path):
        make_folder(cache_dir, "--cache-dir")
        tmp, char = path + f".tmp{os.getpid()}", isinstance(tokenizer, CharTokenizer)
        try:
            with open(tmp, "wb") as f:   # raw ids, chunk by chunk: never a full-size array in memory
                for text in texts:
                    for i in range(0, len(text), step):
                        chunk = text[i:i + step]
                        ids = tokenizer.encode_array(chunk) if char else tokenizer.encode(chunk)
                        f.write(np.asarray(ids, dtype=dtype).tobytes())
                    f.write(np.array([tokenizer.end_id], dtype=dtype).tobytes())
            os.replace(tmp, path)
        finally:   # Ctrl-C, SIGTERM or an error while encoding: no half-written file stays behind
            if os.path.exists(tmp):
                os.remove(tmp)
    return np.memmap(path, dtype=dtype, mode="r")


def pid_alive(pid):
    try:
        os.kill(pid, 0)   # signal 0: no signal, only the check that the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True       # it exists, owned by someone else
    return True


def clear_stale_temporaries(folder):
    """Remove what dead processes left in a folder: "NAME.tmpPID" (a save or an encoding cut off by
    kill -9 or a power cut) and ".write-testPID". A live process's temporary files are kept."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        # only names this file makes: ".NAME.tmpPID" (save_checkpoint), "ids-HASH-N.TYPE.bin.tmpPID"
        # (cached_ids), ".write-testPID" (claim_out)
        match = re.fullmatch(r"(?:\..+\.tmp|ids-[0-9a-f]{8}-\d+\.\w+\.bin\.tmp|\.write-test)(\d+)", name)
        if match and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
            try:
                os.remove(os.path.join(folder, name))
                print(f"removed {os.path.join(folder, name)}, left by a process that no longer runs",
                      file=sys.stderr)
            except OSError:
                pass


# Resuming and stopping cleanly. A resumed run puts back the optimizer's moments and the random
# streams, so it draws the batches and dropout masks the uninterrupted run would have drawn. A signal
# (Ctrl-C, a shutdown, a closed terminal, `timeout`, a job scheduler) only asks the loop to stop: it
# finishes the step, evaluates, and writes its checkpoint, so nothing is lost half-written. A loss
# that turns inf or nan stops the run before it overwrites the last good checkpoint.

def check_finite(what, value, step, lr):
    """Returns value if it is finite; an inf or nan means the run diverged: stop, saying what to try."""
    if not math.isfinite(value):
        raise UserError(f"the {what} is {value} at step {step}: training diverged; "
                        f"try a lower --lr (now {lr}); the last checkpoint is intact")
    return value


class Speedometer:
    """Training tokens per second on the wall clock: since the last evaluation (for the log) and since
    the bar's last update, ten steps ago (for the progress bar)."""

    def __init__(self, step, elapsed, tokens_per_step):
        self.tokens_per_step, self.at_log, self.at_bar = tokens_per_step, (step, elapsed), (step, time.perf_counter())

    def since_log(self, step, elapsed):
        (s, e), self.at_log = self.at_log, (step, elapsed)
        return round((step - s) * self.tokens_per_step / max(elapsed - e, 1e-9))

    def since_bar(self, step):
        (s, t), self.at_bar = self.at_bar, (step, time.perf_counter())
        return (step - s) * self.tokens_per_step / max(self.at_bar[1] - t, 1e-9)


def restore_training(resume_state, model, optimizer, gen, seed, rank, device):
    """Load a checkpoint's training weights (its "model" is their average; a checkpoint without them
    goes on from the average), optimizer and random state; returns (step, elapsed, best_val, learned_at)."""
    step = resume_state["step"]
    if "training_weights" in resume_state:
        check_weights(resume_state["training_weights"], model.cfg, "the checkpoint's training weights")
        model.load_state_dict(resume_state["training_weights"])
    try:
        optimizer.load_state_dict(resume_state["optimizer"])
        gen.set_state(resume_state["rng"]["batches"]) if rank == 0 else gen.manual_seed(seed + rank + step)
        torch.set_rng_state(resume_state["rng"]["torch"])
    except (ValueError, RuntimeError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"the checkpoint cannot be resumed: its optimizer or random state does not fit "
                        f"this model ({str(e)[:120]}); start a new run with --overwrite")
    if device == "cuda" and resume_state["rng"].get("cuda") is not None:   # dropout on a GPU draws from here
        torch.cuda.set_rng_state(resume_state["rng"]["cuda"])
    return (step, resume_state.get("elapsed", 0.0), resume_state.get("best_val_loss", float("inf")),
            resume_state.get("tokens_to_learned"))


class StopOnSignal:
    """with StopOnSignal() as stop: the first signal sets stop.asked; a second Ctrl-C leaves at once
    (the last complete checkpoint is untouched). The old handlers come back on the way out."""
    names = ("SIGINT", "SIGTERM", "SIGHUP")

    def __enter__(self):
        self.asked = False
        caught = [getattr(signal, n) for n in self.names if hasattr(signal, n)]
        self.old = {sig: signal.signal(sig, self.on_signal) for sig in caught}
        return self

    def on_signal(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


def claim_out(out, resume_asked, overwrite):
    """Check --out before any work and hold it: the checkpoint to resume (or None). Nothing that is
    not a regular file is replaced, a checkpoint only with --overwrite, and an unwritable folder is
    found now, not after an hour of training."""
    resume = None
    if os.path.lexists(out) and not os.path.isfile(out):   # a folder, a device node, a broken link
        raise UserError(f"--out {out} exists and is not a regular file: it is never replaced; "
                        "choose another --out")
    if os.path.exists(out):
        if resume_asked:
            resume = load_checkpoint(out)
            check_resume(resume, out)
        elif not overwrite:
            raise UserError(f"{out} already holds a checkpoint: add --resume to continue it, "
                            "--overwrite to replace it, or choose another --out")
    elif resume_asked:
        raise UserError(f"--resume: there is no checkpoint at {out} to resume")
    folder = os.path.dirname(os.path.abspath(out))
    try:   # find out now, not after an hour of training, that the checkpoint cannot be written
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f".write-test{os.getpid()}"), "wb") as f:
            f.write(b"x")
        os.remove(f.name)
    except OSError as e:
        raise UserError(f"cannot write checkpoints to {folder}: {e.strerror}; choose another --out")
    if not (torch.distributed.is_initialized() and torch.distributed.get_rank() > 0):
        lock_out(out)   # rank 0 alone writes
        clear_stale_temporaries(folder)
    return resume


def lock_out(path):
    """One training at a time per checkpoint: a lock file beside it holds the training's pid. The lock
    of a process that died without removing it is taken over (and said so); it goes when we exit."""
    lock = path + ".lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(lock) as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and pid_alive(pid):
                raise UserError(f"another training (pid {pid}) is writing {path}: wait for it to finish, "
                                f"or choose another --out")
            print(f"taking over {lock}: the training that made it (pid {pid}) no longer runs", file=sys.stderr)
            try:
                os.remove(lock)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        import atexit
        atexit.register(lambda: os.path.exists(lock) and os.remove(lock))
        return
    raise UserError(f"could not take the lock {lock}: another training may be starting; try again")


def make_folder(folder, flag):
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make the folder {folder} for {flag}: {e.strerror}")


IMAGE_TYPES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def image_out(path):
    """A picture's --out: no extension means .png (said in "wrote ..."); another kind is refused."""
    ext = os.path.splitext(path)[1].lower()
    if not ext:
        return path + ".png"
    if ext not in IMAGE_TYPES:
        raise UserError(f"--out {path}: a picture is written as {', '.join(IMAGE_TYPES)}; choose one of them")
    return path


def free_out(path, overwrite, folder_output=False):
    """Refuse, before any work, an --out that would be lost or that cannot be written: an existing
    file without --overwrite, anything that is not a regular file (or, for a folder output, a folder),
    a folder that does not exist."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"the folder {parent} does not exist: create it, or choose another --out")
    if os.path.lexists(path):
        if folder_output and not os.path.isdir(path):
            raise UserError(f"--out {path} exists and is not a folder (this export writes a folder): "
                            "choose another --out")
        if not folder_output and not os.path.isfile(path):
            raise UserError(f"--out {path} exists and is not a regular file: it is never replaced; "
                            "choose another --out")
        if not overwrite:
            raise UserError(f"{path} already exists: add --overwrite to replace it, or choose another --out")
    return path


def need(module, package):
    """Import an optional package, or say how to install it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"this needs the optional package {package}: pip install {package}")


def read_log(path):
    """The rows of a training log; a checkpoint's path reads the log beside it."""
    path = log_path(path) if path.endswith(".pt") else path
    if path.endswith(".best.log.jsonl") and not os.path.exists(path):   # the run's log, beside its best
        path = path.replace(".best.log.jsonl", ".log.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"no training log at {path}: give a checkpoint trained by this version, or its .log.jsonl")
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (ValueError, RecursionError):   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path} is not a tinyllm training log (not UTF-8 JSON Lines)")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not rows or not all(isinstance(r, dict) and all(number(r.get(k)) for k in ("tokens", "val_loss", "train_loss"))
                           and ("accuracy" not in r or number(r["accuracy"])) for r in rows):
        raise UserError(f"{path} holds no training log rows (each needs tokens, train_loss and val_loss)")
    return path, rows


def plot_logs(paths, out):
    """Train and validation loss against tokens seen, several runs on one chart; accuracy beside it."""
    need("matplotlib", "matplotlib").use("Agg")   # draw to a file, no window needed
    import matplotlib.pyplot as plt
    runs = [read_log(p) for p in paths]
    with_acc = any("accuracy" in r for _, rows in runs for r in rows)
    fig, axes = plt.subplots(1, 2 if with_acc else 1, figsize=(12 if with_acc else 7, 4.5), squeeze=False)
    for path, rows in runs:
        name = os.path.basename(path).replace(".log.jsonl", "")
        x = [r["tokens"] for r in rows]
        line, = axes[0][0].plot(x, [r["val_loss"] for r in rows], label=f"{name} val")
        axes[0][0].plot(x, [r["train_loss"] for r in rows], "--", color=line.get_color(), label=f"{name} train")
        if with_acc:
            acc = [(r["tokens"], 100 * r["accuracy"]) for r in rows if "accuracy" in r]
            axes[0][1].plot(*zip(*acc) if acc else ([], []), marker=".", color=line.get_color(), label=name)
    axes[0][0].set(xlabel="tokens seen", ylabel="loss", yscale="log", title="loss")
    if with_acc:
        axes[0][1].set(xlabel="tokens seen", ylabel="held-out accuracy (%)", ylim=(0, 100), title="accuracy")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def attention_maps(model, ids, layer):
    """One layer's attention weights over ids, recomputed from that layer's input: (n_head, T, T)."""
    seen = {}
    attn = model.h[layer].attn
    hook = attn.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    with torch.no_grad():
        model(torch.tensor([ids]))
        hook.remove()
        T, C = len(ids), model.cfg.n_embd
        q, k, _ = attn.c_attn(seen["x"][0]).split(C, dim=1)                    # (T, C) each
        q = q.view(T, attn.n_head, -1).transpose(0, 1)                          # (n_head, T, head_size)
        k = k.view(T, attn.n_head, -1).transpose(0, 1)
        q, k = (rotate(t, model.rope_cos[:T], model.rope_sin[:T]) for t in (q, k))   # as the model does
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // attn.n_head)           # (n_head, T, T)
        return F.softmax(att.masked_fill(~model.causal[:T, :T], float("-inf")), dim=-1)


def plot_attention(att, labels, layer, out):
    need("matplotlib", "matplotlib").use("Agg")
    import matplotlib.pyplot as plt
    n = att.shape[0]
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 5.4), squeeze=False)
    labels = [{"\n": "⏎", " ": "␣"}.get(t, t) for t in labels]
    for h, ax in enumerate(axes[0]):
        ax.imshow(att[h].numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"layer {layer}, head {h}")
        ax.set_xticks(range(len(labels)), labels, fontsize=6, rotation=90)
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
        ax.set(xlabel="looks at (key)", ylabel="position (query)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def quantize_int8(model):
    """Dynamic int8 for CPU: linear weights stored as int8, activations quantized on the fly."""
    import warnings
    with warnings.catch_warnings():   # torch.ao.quantization says it is deprecated; 2.13 still has it
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model.float(), {nn.Linear}, dtype=torch.qint8)


def export_onnx(model, out):
    """token ids (batch, seq) -> logits (batch, seq, vocab_size), both axes dynamic."""
    need("onnx", "onnx")
    need("onnxscript", "onnxscript")
    idx = torch.randint(0, model.cfg.vocab_size, (2, 16))
    dim = {0: "batch", 1: "seq"}
    model.eval()
    torch.onnx.export(model, (idx,), out, input_names=["idx"], output_names=["logits"],
                      dynamic_axes={"idx": dim, "logits": dim}, dynamo=True, external_data=False, verbose=False)
    print(f"wrote {out} (input idx: int64 ids, shape (batch, seq <= {model.cfg.block_size}); output logits)")


def export_hf(model, tokenizer, out):
    """A folder that transformers loads as GPT-NeoX, the architecture of its own with rotary positions,
    LayerNorm and GELU. Ours is its sequential form (use_parallel_residual=False); only the layout of
    q, k, v differs: GPT-NeoX keeps each head's q, k and v side by side, we keep all the q first."""
    tf = need("transformers", "transformers")
    need("safetensors", "safetensors")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, Regex
    cfg = model.cfg
    conf = tf.GPTNeoXConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
                            num_attention_heads=cfg.n_head, intermediate_size=cfg.mlp_ratio * cfg.n_embd,
                            hidden_act="gelu", max_position_embeddings=cfg.block_size, layer_norm_eps=1e-5,
                            use_parallel_residual=False,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
                            attention_bias=True, tie_word_embeddings=True,
                            bos_token_id=tokenizer.end_id, eos_token_id=tokenizer.end_id)
    hf = tf.GPTNeoXForCausalLM(conf)
    names = {"wte": "gpt_neox.embed_in", "ln_f": "gpt_neox.final_layer_norm", "ln_1": "input_layernorm",
             "ln_2": "post_attention_layernorm", "attn.c_attn": "attention.query_key_value",
             "attn.c_proj": "attention.dense", "mlp.c_fc": "mlp.dense_h_to_4h", "mlp.c_proj": "mlp.dense_4h_to_h"}
    want, sd, hs = hf.state_dict(), {}, cfg.n_embd // cfg.n_head
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        parts = k.split(".")
        if parts[0] == "h":   # h.3.attn.c_attn.weight -> gpt_neox.layers.3.attention.query_key_value.weight
            key = f"gpt_neox.layers.{parts[1]}.{names['.'.join(parts[2:-1])]}.{parts[-1]}"
        else:
            key = f"{names[parts[0]]}.{parts[-1]}"
        if "query_key_value" in key:   # (q | k | v, ...) -> (head 0's q, k, v | head 1's ... , ...)
            v = v.view(3, cfg.n_head, hs, *v.shape[1:]).transpose(0, 1).reshape(v.shape)
        sd[key] = v
    head = "embed_out.weight" if "embed_out.weight" in want else "lm_head.weight"   # its name differs by version
    sd[head] = sd["gpt_neox.embed_in.weight"]   # tied, as ours
    for k, v in want.items():   # a model without biases (Config.bias) gets zeros
        if k not in sd and k.endswith(".bias"):
            sd[k] = torch.zeros_like(v)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    hf.save_pretrained(out)
    if isinstance(tokenizer, BPETokenizer):
        tok = tokenizer.tok
    else:   # one token per character: every character is its own word of a word-level vocabulary
        tok = Tokenizer(models.WordLevel({END: 0, **{c: i + 1 for i, c in enumerate(tokenizer.chars)}}, unk_token=END))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
    tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=END, bos_token=END,
                               clean_up_tokenization_spaces=False).save_pretrained(out)
    print(f"wrote {out}: config.json, model.safetensors, tokenizer.json")


# torchrun (started in cmd_train): one process per device, each on its own batches;
# DistributedDataParallel (in train) averages the gradients, so the copies stay identical.

def torchrun_start(device):
    """When torchrun started this process (one per rank): join the group; rank 0 alone speaks."""
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    if cuda and int(os.environ["LOCAL_RANK"]) >= torch.cuda.device_count():
        raise UserError(f"torchrun started {os.environ['LOCAL_WORLD_SIZE']} processes on this machine, but it has "
                        f"{torch.cuda.device_count()} GPU(s): use --nproc_per_node={torch.cuda.device_count()}, "
                        "or add --device cpu")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if torch.distributed.get_rank() > 0:
        sys.stdout = open(os.devnull, "w")   # rank 0 alone speaks, evaluates and saves


def torchrun_follow_rank0(progress, stop, device):
    """Rank 0's progress and Ctrl-C, sent to every rank, so that all of them stop at the same step."""
    flags = torch.tensor([progress, float(stop)], dtype=torch.float64, device=device)
    torch.distributed.broadcast(flags, 0)
    return flags[0].item(), bool(flags[1].item())


def torchrun_finish():
    """After training: wait for every rank, close the process group; returns this process's rank."""
    rank = torch.distributed.get_rank()
    torch.distributed.barrier()   # nobody closes its connections while another rank still reads from them
    torch.distributed.destroy_process_group()
    return rank


def torchrun_compare_weights(model):
    """Prove the ranks ended with the same weights: print the largest difference from rank 0."""
    w = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    ref = w.clone()
    torch.distributed.broadcast(ref, 0)
    diff = (w - ref).abs().max()
    torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
    print(f"{torch.distributed.get_world_size()} ranks, largest weight difference from rank 0: {diff.item():g}")


# Generating faster. At batch 1 a token's arithmetic (about 2 x 0.86M multiply-adds) takes
# microseconds; its time goes to the framework: a few microseconds for each of the ~200 small
# operations and module calls GPT.forward makes per token (views, masks, casts, q and k rotated
# apart). FastDecoder does the same arithmetic for one new token per row with about a third of them:
# the weights gathered once and used by plain functions on (B, C) rows; the rotation folded into the
# q, k, v matmul (its second half, -x2 and x1, is a fixed shuffle and sign of q's and k's rows, so the
# matmul can write rotated copies as well: q rotated is then q * cos + q_shuffled * sin); the cache
# written by index; the fused attention kernel (one call instead of four); and no mask at all when no
# row is padded (the newest query may look at every filled position). For one row in fp32 on a CPU,
# NumpyDecoder does the same again in NumPy, whose small operations cost a fraction of PyTorch's;
# fast_decoder chooses between them and keeps the one it made until a weight changes.

class FastDecoder:

    @staticmethod
    def serves(model):
        """Plain linear layers only: an int8 model's layers keep their weights packed."""
        return all(type(m) is nn.Linear for b in model.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj))

    def __init__(self, model):
        self.model, cfg = model, model.cfg
        self.C, self.n_head = C, nh = cfg.n_embd, cfg.n_head
        hs = C // nh

        def shuffled(t):   # the rows of q and k (then their biases) as rotate's second half: (-x2, x1) per head
            t = t[:2 * C].view(2 * nh, 2, hs // 2, *t.shape[1:])
            return torch.cat((-t[:, 1:], t[:, :1]), dim=1).reshape(2 * C, *t.shape[3:])
        self.layers = []
        for b in model.h:
            w, bias = b.attn.c_attn.weight, b.attn.c_attn.bias   # rows: q, k, v
            self.layers.append((b.ln_1.weight, b.ln_1.bias, torch.cat((w, shuffled(w))),
                                None if bias is None else torch.cat((bias, shuffled(bias))),
                                b.attn.c_proj.weight, b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias,
                                b.mlp.c_fc.weight, b.mlp.c_fc.bias, b.mlp.c_proj.weight, b.mlp.c_proj.bias))

    def __call__(self, idx, caches, valid=None):
        """What model(idx, caches=caches, valid=valid) gives as logits, for one new token per row:
        idx (B, 1) -> logits (B, 1, vocab_size). caches come filled by GPT.forward (the prompt's pass)."""
        model, C, nh = self.model, self.C, self.n_head
        B, hs, n = idx.size(0), C // nh, caches[0].n   # n: positions filled; the new token writes slot n
        if n + 1 > model.cfg.block_size:
            raise ValueError(f"sequence of {n + 1} tokens is longer than block_size {model.cfg.block_size}")
        if valid is None:
            cos, sin, mask = model.rope_cos[n], model.rope_sin[n], None                            # (head_size,)
        else:   # left-padded rows: a row's position counts its real tokens; padding is never looked at
            pos = valid[:, :n].sum(1)                                                         # (B,)
            cos, sin = model.rope_cos[pos].view(B, 1, 1, hs), model.rope_sin[pos].view(B, 1, 1, hs)
            mask = valid[:, None, None, :n + 1]                                               # (B, 1, 1, n + 1)
        # oneDNN (mkldnn) serves CPU fp32 GELU too, at about 8 us for one 512-wide row where PyTorch's
        # own kernel takes under 2; for bf16 it is the fast matmul, so it stays on under autocast
        fp32_on_cpu = model.wte.weight.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
        with torch.backends.mkldnn.flags(enabled=not fp32_on_cpu, deterministic=None, allow_tf32=None, fp32_precision=None):
            return self.layers_and_head(idx, caches, n, cos, sin, mask)

    def layers_and_head(self, idx, caches, n, cos, sin, mask):
        model, C, nh = self.model, self.C, self.n_head
        B, hs = idx.size(0), C // nh
        x = F.embedding(idx.view(B), model.wte.weight)                                            # (B, C)
        for (ln1_w, ln1_b, attn_w, attn_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, out_w, out_b), cache \
                in zip(self.layers, caches):
            qkv = F.linear(F.layer_norm(x, (C,), ln1_w, ln1_b), attn_w, attn_b).view(B, 5, nh, hs)
            qk = qkv[:, :2] * cos.to(qkv.dtype) + qkv[:, 3:] * sin.to(qkv.dtype)   # rotated q, k: (B, 2, nh, hs)
            cache.k[:, :, n], cache.v[:, :, n] = qk[:, 1], qkv[:, 2]
            y = F.scaled_dot_product_attention(qk[:, 0, :, None], cache.k[:, :, :n + 1],
                                               cache.v[:, :, :n + 1], attn_mask=mask)    # (B, n_head, 1, hs)
            x = x + F.linear(y.reshape(B, C), proj_w, proj_b)   # one query: heads already side by side
            x = x + F.linear(F.gelu(F.linear(F.layer_norm(x, (C,), ln2_w, ln2_b), fc_w, fc_b)), out_w, out_b)
        for cache in caches:
            cache.n = n + 1
        return F.linear(F.layer_norm(x, (C,), model.ln_f.weight, model.ln_f.bias), model.wte.weight)[:, None]   # (B, 1, V)


class NumpyDecoder(FastDecoder):
    """FastDecoder's arithmetic in NumPy, for one row in fp32 on a CPU. A NumPy operation on a small
    array takes a third to a half of the time of PyTorch's, and at batch 1 each layer is some sixty
    small operations. The weights are
    transposed once into (in, out) arrays; the caches stay PyTorch's, read and written in place
    through NumPy views of the same memory. GELU's erf alone is PyTorch's (NumPy has none)."""

    def __init__(self, model):
        super().__init__(model)
        hs = self.C // self.n_head
        arr = lambda t: None if t is None else t.detach().numpy()
        mat = lambda w: np.ascontiguousarray(w.detach().numpy().T)   # (out, in) -> (in, out)
        scale = np.ones(5 * self.C, np.float32)
        scale[:self.C] = scale[3 * self.C:4 * self.C] = hs ** -0.5   # q and its shuffle: attention's 1/sqrt(hs), once
        self.layers = [(arr(l1w), arr(l1b), mat(aw) * scale, None if ab is None else arr(ab) * scale, mat(pw), arr(pb),
                        arr(l2w), arr(l2b), mat(fw), arr(fb), mat(ow), arr(ob))
                       for l1w, l1b, aw, ab, pw, pb, l2w, l2b, fw, fb, ow, ob in self.layers]
        self.wte, self.head = arr(model.wte.weight), mat(model.wte.weight)
        self.ln_f = arr(model.ln_f.weight), arr(model.ln_f.bias)
        self.cos, self.sin = arr(model.rope_cos), arr(model.rope_sin)

    @staticmethod
    def layer_norm(x, w, b):   # (B, C); sums, not means: NumPy's mean costs several times a sum
        x = x - x.sum(-1, keepdims=True) * (1 / x.shape[-1])
        x = x / np.sqrt((x * x).sum(-1, keepdims=True) * (1 / x.shape[-1]) + 1e-5)
        return x * w if b is None else x * w + b

    @staticmethod
    def linear(x, w, b):
        y = x @ w
        if b is not None:
            y += b
        return y

    def __call__(self, idx, caches, valid=None):
        C, nh = self.C, self.n_head
        B, hs, n = idx.size(0), C // nh, caches[0].n
        if n + 1 > self.model.cfg.block_size:
            raise ValueError(f"sequence of {n + 1} tokens is longer than block_size {self.model.cfg.block_size}")
        if valid is None:
            cos, sin, mask = self.cos[n], self.sin[n], None                                     # (head_size,)
        else:
            pos = valid[:, :n].sum(1).numpy()                                                 # (B,)
            cos, sin = self.cos[pos].reshape(B, 1, 1, hs), self.sin[pos].reshape(B, 1, 1, hs)
            mask = np.where(valid[:, :n + 1].numpy(), 0.0, -np.inf).astype(np.float32)[:, None, None]  # (B, 1, 1, n + 1)
        x = self.wte[idx.view(B).numpy()]                                                     # (B, C)
        for (ln1_w, ln1_b, attn_w, attn_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, out_w, out_b), cache \
                in zip(self.layers, caches):
            k, v = cache.k.numpy()[:, :, :n + 1], cache.v.numpy()[:, :, :n + 1]              # (B, n_head, n + 1, hs) views
            qkv = self.linear(self.layer_norm(x, ln1_w, ln1_b), attn_w, attn_b).reshape(B, 5, nh, hs)
            qk = qkv[:, :2] * cos
            qk += qkv[:, 3:] * sin                                                            # rotated q, k: (B, 2, nh, hs)
            k[:, :, n], v[:, :, n] = qk[:, 1], qkv[:, 2]
            att = qk[:, 0, :, None] @ k.swapaxes(-1, -2)                                      # (B, nh, 1, n + 1)
            if mask is not None:
                att += mask
            att = np.exp(att - att.max(-1, keepdims=True))
            y = (att @ v) / att.sum(-1, keepdims=True)                                        # (B, nh, 1, hs)
            x = x + self.linear(y.reshape(B, C), proj_w, proj_b)
            h = self.linear(self.layer_norm(x, ln2_w, ln2_b), fc_w, fc_b)                     # (B, 4C)
            g = torch.erf(torch.from_numpy(h * 0.5 ** 0.5)).numpy()   # GELU: x/2 (1 + erf(x / sqrt 2))
            g += 1
            g *= h
            g *= 0.5
            x += self.linear(g, out_w, out_b)
        for cache in caches:
            cache.n = n + 1
        return torch.from_numpy(self.layer_norm(x, *self.ln_f) @ self.head)[:, None]         # (B, 1, V)


def fast_decoder(model, dtype, batch):
    """The decoder for the tokens after the prompt, or None (GPT.forward with the cache serves):
    NumPy's for one row in fp32 on a CPU, FastDecoder otherwise (a batch is arithmetic more than
    operations, and NumPy's stacked small matmuls are then many times slower than PyTorch's).
    Gathering the weights costs about a millisecond, which short replies would pay again and again,
    so a decoder is kept on the model and made anew only when a weight has changed (PyTorch counts
    every in-place change in a tensor's _version)."""
    if not FastDecoder.serves(model):
        return None
    w = model.wte.weight
    kind = NumpyDecoder if (w.device.type, w.dtype, dtype, batch) == ("cpu", torch.float32, "fp32", 1) else FastDecoder
    weights = tuple((p.data_ptr(), p._version) for p in model.parameters())
    kept = model.__dict__.setdefault("_decoders", {})
    if kind not in kept or kept[kind][0] != weights:
        kept[kind] = weights, kind(model)
    return kept[kind][1]


def streamer(tokenizer, stop=None):
    """An on_token callback that prints text as it comes. Only the tokens not yet printed are decoded
    (a character that BPE spreads over several tokens waits for its last one), so a token costs the
    same at the 20,000th as at the 100th. .finish() prints what is left, even a cut-off character."""
    pending, tail, done = [], [""], [False]   # tail: the last len(stop) characters printed

    def show(text):
        if stop:
            seen = tail[0] + text
            if stop in seen:   # print up to the end of the stop string, then no more
                text, done[0] = text[:seen.index(stop) + len(stop) - len(tail[0])], True
            tail[0] = (tail[0] + text)[-len(stop):]
        print(text, end="", flush=True)

    def on_token(b, tok, logits):
        if tok == tokenizer.end_id or done[0]:
            return True
        pending.append(tok)
        text = tokenizer.decode(pending)
        if not text.endswith("\ufffd"):
            pending.clear()
            show(text)
        return done[0]

    def finish():
        if pending and not done[0]:
            show(tokenizer.decode(pending))
        pending.clear()
    on_token.finish = finish
    return on_token


def chat(model, tokenizer, temperature, top_k, max_new_tokens, dtype):
    """Questions from the terminal (or a pipe), answers streamed as they are written."""
    interactive = sys.stdin.isatty()
    knobs = {"temp": temperature, "topk": top_k or 0}
    if interactive:
        print("Ask a word problem. /temp 0.8 and /topk 40 set sampling (/temp 0 is greedy); /quit or Ctrl-D leaves.")
    while True:
        try:
            line = input("you> " if interactive else "").strip()
        except EOFError:
            break
        name, _, value = line[1:].partition(" ")
        if line in ("/quit", "/exit"):
            break
        elif line.startswith("/") and name == "temp" and re.fullmatch(r"\d{1,3}(\.\d{0,6})?", value) and \
                (float(value) == 0 or 0.01 <= float(value) <= 100):
            knobs[name] = float(value)
            print(f"{name} = {knobs[name]}")
        elif line.startswith("/") and name == "topk" and re.fullmatch(r"\d{1,7}", value):
            knobs[name] = int(value)
            print(f"{name} = {knobs[name]}")
        elif line.startswith("/"):
            print("commands: /temp T (0 is greedy, or 0.01 to 100), /topk K (0: off), /quit")
        if line.startswith("/") or not line:
            continue
        try:
            ids = tokenizer.encode(ask_prompt(typed(line)))
        except UserError as e:
            print(f"error: {e}")
            continue
        print("A:", end="", flush=True)
        stream = streamer(tokenizer)
        generate(model, [ids], max_new_tokens, tokenizer.end_id, knobs["temp"], knobs["topk"] or None,
                 on_token=stream, dtype=dtype)
        stream.finish()
        print()


# -----------------------------------------------------------------------------------------------
# 10. The command line
# Each subcommand parses its flags, checks them, and calls the plain functions above.
# -----------------------------------------------------------------------------------------------

DEFAULT_CKPT = TrainSettings.out


def bounded(kind, name, lo=None, hi=None, lo_open=False):
    """An argparse type that refuses NaN, inf and out-of-range numbers with a readable message."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a {'whole ' if kind is int else ''}number, got {text!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number, got {text!r}")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise argparse.ArgumentTypeError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {text}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"{name} must be <= {hi}, got {text}")
        return v
    return parse


def temperature_flag(name):
    """0 (greedy) or from 0.01 to 100: dividing logits by less overflows them."""
    parse_range = bounded(float, name, 0, 100)

    def parse(text):
        v = parse_range(text)
        if 0 < v < 0.01:
            raise argparse.ArgumentTypeError(f"{name} must be 0 (greedy) or at least 0.01, got {text}")
        return v
    return parse


SEED = bounded(int, "--seed", 0, 2 ** 63 - 1)


# What train uses where a flag is not given. The built-in corpus and your text each get their own
# shape, context, batch and learning rate, chosen by runs on each. On the corpus a model 128 wide
# (2 heads of 64) takes steps 1.7 times as fast as one 192 wide, and in one 9-minute fp32 run each
# it wrote 99.5% of the validation problems exactly where 4 x 192 wrote 52%: the corpus needs steps
# more than width. Depth learns it in fewer tokens but not in fewer minutes: 6 layers with an MLP 2
# times as wide (the same parameters) passed 95% of the probe within 4M tokens in three seeds of
# three, 4 x 128 in one, but on 2 cores a step of it takes 1.2 times as long, and its 9-minute runs
# ended no better (two of seven under 80% on held-out facts). Prose needs width: 192 (3 layers, 1.35M;
# fit_to_text says why 3), and batch 16 rather than 32 (twice the optimizer steps in the same
# minutes) reached a lower validation loss.
TRAIN_DEFAULTS = {
    "corpus": {"tokenizer": "bpe", "n_layer": Config.n_layer, "n_embd": Config.n_embd,   # the lesson's own
               "n_head": Config.n_head, "mlp_ratio": Config.mlp_ratio, "block_size": Config.block_size,
               "batch_size": TrainSettings.batch_size, "lr": TrainSettings.lr},
    "text": {"tokenizer": "char", "n_layer": 3, "n_embd": 192, "n_head": 3, "mlp_ratio": 4, "block_size": 128,
             "batch_size": 16, "lr": 3e-3},
}
TEXT_TOKENS_PER_MINUTE = 900_000   # 4 x 192 on a 2-core CPU (15,261 tokens/s at bf16 437 GFLOP/s): the passes
# of a budget are counted at this rate, as fit_to_text's bands were set; 3 x 192 reads about 1.3 times as many
FITTED = ("dropout", "weight_decay", "n_layer", "n_embd", "n_head")   # what fit_to_text may choose


def fit_to_text(n_tokens, minutes, max_iters, batch_size, block_size):
    """The shape and regularisation for a text of n_tokens training tokens, from how many times the
    budget will read it (its passes), and the reason in words. A text read three times is still being
    learned at the end. One read ten times starts to be memorised near the end (1 MB: the validation
    loss stopped falling after about 8 passes while the training loss fell on): a stronger pull of
    the weights toward 0 (weight decay 1.0 instead of 0.1, free of cost) ended 0.016-0.023 lower in
    three seeds, where dropout (units left out at random, so no one path can store the text) cost 30%
    of the steps and ended 0.05 higher. Three layers instead of four take about 1.3 times the steps in
    the same minutes, and on a text read up to 20 times the steps are worth more than the depth (1 MB:
    lower in three seeds of three at a 10-minute run's steps, 0.005 lower in the median of three
    10-minute runs; the whole of War and Peace, 3 passes: 0.003 lower in the median of three). A text
    read 30 times or more (330 KB in 10 minutes) was memorised even by 3 x 192 with weight decay 1.0:
    after a few passes its validation loss turns and climbs. A narrower model with dropout has less
    room to store it. How soon a text is memorised depends on its size as well as its passes:
    1 MB read 24 times was not, and there 3 x 192 ended 0.08 lower than the dropout model."""
    seen = max_iters * batch_size * block_size
    if minutes:
        seen = min(seen, minutes * TEXT_TOKENS_PER_MINUTE)
    passes = seen / max(1, n_tokens)
    if passes < 5:
        chosen = {"dropout": 0.0, "weight_decay": 0.1, "n_layer": 3, "n_embd": 192, "n_head": 3}
        why = "it is still being learned at the end: no dropout, and 3 layers for more steps"
    elif passes < 20:
        chosen = {"dropout": 0.0, "weight_decay": 1.0, "n_layer": 3, "n_embd": 192, "n_head": 3}
        why = "it starts to be memorised near the end: weight decay 1.0, and 3 layers for more steps"
    else:
        chosen = {"dropout": 0.2, "weight_decay": 0.1, "n_layer": 4, "n_embd": 128, "n_head": 2}
        why = "it would be memorised: dropout 0.2 and a narrower model (4 x 128)"
    return chosen, f"{n_tokens:,} training tokens, about {passes:.1f} passes in this budget; {why}"


def say_if_learned(r, n_probe, settings, out):
    """The end of a run on the corpus: the probe, when it passed LEARNED, and under 90% the plain words
    that the model has not learned yet with the exact command that continues the same run."""
    at = r["tokens_to_learned"]
    print(f"probe: {100 * r['probe']:.1f}% of {n_probe} validation problems written exactly; " +
          (f"it first reached {LEARNED:.0%} after {at / 1e6:.2f}M training tokens" if at is not None
           else f"it has not reached {LEARNED:.0%}"))
    if r["probe"] < 0.9:   # a budget ended before the model learned: say so, and how to go on
        more = f"--max-iters {2 * r['step']}" if r["step"] >= settings.max_iters else ""
        if settings.max_minutes:
            more += f" --max-minutes {math.ceil(r['elapsed'] / 60) + 10}"
        print(f"NOT LEARNED YET: the model writes only {100 * r['probe']:.0f}% of its working right (a "
              f"model that has learned writes over {LEARNED:.0%}), so it gets {'most' if r['probe'] < 0.5 else 'many'} "
              f"questions wrong. "
              f"This machine gave it {r['tokens'] / 1e6:.1f}M training tokens; keep training with:\n"
              f"  python tinyllm.py train --out {shlex.quote(out)} --resume {more.strip()}")


def settle_train_flags(args):
    """The flags train runs with, in a new namespace: each one given, else its default for the corpus
    or for your text. Returns it and the names given of those fit_to_text may choose for your text."""
    given = {k for k in FITTED if getattr(args, k) is not None}
    if given & {"n_embd", "n_head"}:   # a shape is one choice: a width you give keeps the heads you give
        given |= {"n_embd", "n_head"}
    defaults = TRAIN_DEFAULTS["text" if args.data else "corpus"]
    f = argparse.Namespace(**{**vars(args), **{k: v for k, v in defaults.items() if getattr(args, k) is None}})
    if f.batch_size * f.block_size > 1 << 20:   # activations of a step grow with it: refuse before any work
        raise UserError(f"--batch-size {f.batch_size} x --block-size {f.block_size} is "
                        f"{f.batch_size * f.block_size:,} tokens a step; at most {1 << 20:,}")
    return f, given


def new_model(f, texts, thinking, given):
    """A new tokenizer and model for train; on your text, the shape and regularisation fit_to_text
    chooses for its size (unless given). Returns (model, tokenizer, your text's ids or None, weight decay)."""
    tokenizer = make_tokenizer(f.tokenizer, texts, f.vocab_size, thinking)
    ids, shape = None, {k: getattr(f, k) for k in FITTED}
    if not thinking:   # your text: shape and regularisation by how often the budget will read it
        ids = cached_ids(texts, tokenizer, f.cache_dir)
        chosen, why = fit_to_text(int(len(ids) * (1 - f.val_fraction)), f.max_minutes, f.max_iters,
                                  f.batch_size * f.grad_accum, f.block_size)
        fitted = {k: v for k, v in chosen.items() if k not in given}
        shape.update(fitted)
        if fitted:
            print(f"chosen for your text: {why} ({', '.join(f'{k} {v:g}' for k, v in fitted.items())}; "
                  "give --dropout, --weight-decay, --n-layer, --n-embd or --n-head to choose yourself)")
    cfg = Config(vocab_size=tokenizer.vocab_size, block_size=f.block_size, n_layer=shape["n_layer"],
                 n_head=shape["n_head"], n_embd=shape["n_embd"], mlp_ratio=f.mlp_ratio,
                 dropout=shape["dropout"] or 0.0, fused_attention=f.fused_attention)
    cfg.check(f.max_params)
    weight_decay = TrainSettings.weight_decay if shape["weight_decay"] is None else shape["weight_decay"]
    return GPT(cfg), tokenizer, ids, weight_decay


def train_settings(f, device, dtype, weight_decay, resume):
    """TrainSettings from the flags; a resumed run keeps its own, but for the budgets and the device."""
    settings = TrainSettings(out=f.out, batch_size=f.batch_size, grad_accum=f.grad_accum, lr=f.lr,
                             weight_decay=weight_decay, warmup=f.warmup, ema=f.ema, max_iters=f.max_iters,
                             max_minutes=f.max_minutes, eval_interval=f.eval_interval, seed=f.seed,
                             device=device, dtype=dtype, compile=f.compile, stop_after=f.stop_after)
    if resume is None:
        return settings
    keep = ("out", "max_iters", "max_minutes", "eval_interval", "device", "dtype", "compile", "stop_after")
    return TrainSettings(**{**resume["meta"]["settings"], **{k: getattr(settings, k) for k in keep}})


def report_training(r, settings, n_probe):
    """The last lines of train: what was done, how to resume an interrupted run, and (corpus) the probe."""
    print(f"done: {r['step']} steps in {r['elapsed'] / 60:.1f} min, {r['tokens'] / max(r['elapsed'], 1e-9):,.0f} "
          f"tokens/s, val loss {r['val_loss']:.4f}; saved {settings.out}")
    if r["interrupted"]:
        print(f"interrupted: resume with `python tinyllm.py train --out {settings.out} --resume`")
        return 130
    if n_probe and r["probe"] is not None:
        say_if_learned(r, n_probe, settings, settings.out)
    return 0


def cmd_train(args):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:   # torchrun started one process per rank
        torchrun_start(args.device)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    resume = claim_out(args.out, args.resume, args.overwrite)
    torch.manual_seed(args.seed)
    f, given = settle_train_flags(args)
    if resume is not None:   # the run's own data, corpus and seed; its model and settings come with it
        model, tokenizer = model_from_checkpoint(resume, args.out)
        meta = resume["meta"]
        f.data, f.corpus_format, f.corpus_size = meta["data"], meta["corpus_format"], meta["corpus_size"]
        f.seed = meta["settings"]["seed"]
    thinking, direct = not f.data, f.corpus_format == "direct"
    if thinking:
        train_p, val_p = build_corpus(f.corpus_size, seed=f.seed, direct=direct)
        texts = ["".join(problem_text(p, direct)) for p in train_p[:20000]]
    else:
        texts = read_text_files(f.data)
    weight_decay, ids = None, None   # a resumed run keeps its own weight decay, with its other settings
    if resume is None:
        model, tokenizer, ids, weight_decay = new_model(f, texts, thinking, given)
        meta = {"data": f.data, "corpus_format": f.corpus_format, "corpus_size": f.corpus_size}
    cfg = model.cfg
    print(f"model: {cfg.n_layer} layers, {cfg.n_head} heads, width {cfg.n_embd} (MLP {cfg.mlp_ratio}x), "
          f"block {cfg.block_size}, {tokenizer.kind} tokenizer with {tokenizer.vocab_size} tokens\n{param_report(cfg)}")
    if thinking:   # the probe: 200 validation problems, never in the training set; 1-3 s of every evaluation
        splits = corpus_splits(train_p, val_p, tokenizer, cfg.block_size, direct)
        probe, n_probe = accuracy_probe(tokenizer, val_p[:200], dtype, direct), len(val_p[:200])
    else:
        ids = cached_ids(texts, tokenizer, f.cache_dir) if ids is None else ids
        del texts   # from here on the memory-mapped ids are all we need
        splits = text_splits(ids, f.val_fraction, cfg.block_size)
        probe, n_probe = sample_probe(tokenizer, ids[:8].tolist(), dtype), 0
    settings = train_settings(f, device, dtype, weight_decay, resume)
    meta.update(device=device, dtype=dtype, settings=asdict(settings))
    if resume is None and os.path.exists(log_path(f.out)) and not (torch.distributed.is_initialized()
                                                               and torch.distributed.get_rank()):
        os.remove(log_path(f.out))   # a new run starts a new log
    print(f"training on {device} ({dtype}), {len(splits['train']['ids']):,} training tokens, "
          f"batch {settings.batch_size} x {cfg.block_size}, lr {settings.lr:g}, budget {settings.max_iters:,} steps or "
          f"{settings.max_minutes:g} minutes" + (f", resuming at step {resume['step']}" if resume else ""))
    r = train(model, tokenizer, splits, settings, meta, resume_state=resume, probe=probe)
    if torch.distributed.is_initialized() and torchrun_finish() > 0:   # rank 0 reports below, the others are done
        return 0
    return report_training(r, settings, n_probe)


def load_model(args):
    """The model of --checkpoint on --device, int8 with --quantize int8 (generate, eval, chat)."""
    model, tokenizer = model_from_file(args.checkpoint)
    device = pick_device(args.device)
    if args.quantize == "int8":
        if device != "cpu":
            raise UserError("--quantize int8 runs on the CPU: add --device cpu")
        model = quantize_int8(model)
    return model.to(device), tokenizer


def cmd_generate(args):
    model, tokenizer = load_model(args)
    prompt = args.prompt.replace("\\n", "\n")
    if not prompt.strip():
        raise UserError("the prompt is empty: give some text with --prompt")
    try:
        ids = tokenizer.encode(prompt)
    except UserError:   # curly quotes or dashes the vocabulary lacks: try them as a keyboard types them
        prompt = typed(prompt)
        ids = tokenizer.encode(prompt)
    if len(ids) >= model.cfg.block_size:
        print(f"(the prompt has {len(ids)} tokens, more than the model's context of {model.cfg.block_size}: "
              "only its end is used)", file=sys.stderr)
    gen = torch.Generator().manual_seed(args.seed)

    def show_probs(b, tok, logits):   # the five likeliest tokens, as sampling saw them, and the pick
        probs, ids5 = next_token_probs(logits[None], args.temperature or 1.0, args.top_k, args.top_p)[0].topk(5)
        print(f"{tokenizer.decode([tok])!r:>10} <- " + "  ".join(
            f"{tokenizer.decode([i])!r} {p:.2f}" for p, i in zip(probs.tolist(), ids5.tolist())))
        return tok == tokenizer.end_id
    for n in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {n + 1}")
        print(prompt, end="\n" if args.show_probs else "", flush=True)
        stream = streamer(tokenizer, args.stop)
        out = generate(model, [ids], args.max_new_tokens, tokenizer.end_id, args.temperature, args.top_k, args.top_p,
                       args.repetition_penalty, gen, on_token=show_probs if args.show_probs else stream)
        stream.finish()
        print("\n" + prompt + tokenizer.decode(out[0]) if args.show_probs else "")
    return 0


def read_questions(path):
    """A JSON Lines file of {"question": "...", "answer": 7, "family": "..."(optional)}."""
    if not os.path.exists(path):
        raise UserError(f"questions file {path} does not exist")
    if not os.path.isfile(path):
        raise UserError(f"questions file {path} is not a regular file: give a .jsonl file")
    problems, n = [], 0
    try:
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path} line {n}: not valid JSON ({e.msg})")
                except (ValueError, RecursionError):   # a number of over 4,300 digits; nesting too deep
                    raise UserError(f"{path} line {n}: not a question this tool can read (a huge number "
                                    "or deep nesting)")
                if not isinstance(d, dict) or not isinstance(d.get("question"), str) or not d["question"].strip():
                    raise UserError(f'{path} line {n}: needs a "question" string')
                if not isinstance(d.get("answer"), int) or isinstance(d.get("answer"), bool) or \
                        abs(d["answer"]) >= 10 ** 18:
                    raise UserError(f'{path} line {n}: needs an integer "answer" (under 10^18)')
                q = typed(d["question"])   # ’ “ ” – as a keyboard types them
                if len(q) > 2000 or re.search(r"\d{19}", q):
                    raise UserError(f"{path} line {n}: the question is over 2,000 characters or holds a number "
                                    "of over 18 digits")
                problems.append({"question": q, "answer": d["answer"],
                                 "family": str(d.get("family", "custom"))[:40], "split": "custom"})
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 (near line {n + 1}): re-save it as UTF-8")
    if not problems:
        raise UserError(f"{path} holds no questions")
    return problems


def format_summary(summary):
    def row(name, acc):
        return f"  {name:<12} {100 * acc['accuracy']:6.1f}%  ({acc['correct']}/{acc['n']}, 95% CI " \
               f"{100 * acc['ci95'][0]:.1f}-{100 * acc['ci95'][1]:.1f}%)"
    lines = [row("overall", summary)]
    for title, key in (("per family", "per_family"), ("per schema", "per_schema"), ("per number of steps", "per_steps"),
                       ("per split", "per_split")):
        if len(summary[key]) > 1 or key == "per_split":
            lines.append(title + ":")
            lines += [row(k, v) for k, v in summary[key].items()]
    lines.append(f"reading: the equation set up first gives the true answer in {100 * summary['read_ok']:.1f}% of replies")
    lines.append(f"reasoning: every equation true in {100 * summary['reasoning_ok']:.1f}% of replies; answer equals "
                 f"the last computed value in {100 * summary['answer_is_last_value']:.1f}%; no 'Answer:' line in "
                 f"{100 * summary['format_broken']:.1f}%")
    lines.append("trivial baselines on the same questions: " +
                 ", ".join(f"{k} {100 * v:.1f}%" for k, v in summary["baselines"].items()))
    for f in summary["failures"][:3]:
        lines.append(f"failure: Q: {f['question']}\n  reply: {f['reply'].strip()}\n  true answer: {f['answer']}")
    return "\n".join(lines)


def cmd_eval(args):
    if args.questions:
        problems = read_questions(args.questions)
    else:
        problems = [p for sp in (SPLITS if args.split == "all" else [args.split]) for p in make_split(sp, args.n, seed=0)]
    model, tokenizer = load_model(args)
    t = time.perf_counter()
    summary = evaluate(model, tokenizer, problems, votes=args.votes, temperature=args.temperature, seed=args.seed)
    summary["seconds"] = round(time.perf_counter() - t, 1)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{len(problems)} questions in {summary['seconds']} s" + (f", majority of {args.votes} votes" if args.votes > 1 else ", greedy"))
        print(format_summary(summary))
    return 0


def cmd_chat(args):
    model, tokenizer = load_model(args)
    chat(model, tokenizer, args.temperature, args.top_k, args.max_new_tokens or model.cfg.block_size, "fp32")
    return 0


def cmd_plot(args):
    plot_logs(args.logs, free_out(image_out(args.out), args.overwrite))
    return 0


def cmd_attention(args):
    args.out = free_out(image_out(args.out), args.overwrite)
    model, tokenizer = model_from_file(args.checkpoint)
    ids = tokenizer.encode(args.prompt.replace("\\n", "\n"))[-model.cfg.block_size:]
    layer = model.cfg.n_layer - 1 if args.layer is None else args.layer
    if not (ids and 0 <= layer < model.cfg.n_layer):
        raise UserError(f"give a non-empty --prompt and a --layer from 0 to {model.cfg.n_layer - 1}")
    model.eval()
    plot_attention(attention_maps(model, ids, layer), [tokenizer.decode([i]) for i in ids], layer, args.out)
    return 0


def cmd_export(args):
    free_out(args.out, args.overwrite, folder_output=args.format == "hf")
    model, tokenizer = model_from_file(args.checkpoint)
    export_onnx(model, args.out) if args.format == "onnx" else export_hf(model, tokenizer, args.out)
    return 0


def cmd_info(args):
    ck = load_checkpoint(args.checkpoint)
    model, tokenizer = model_from_checkpoint(ck, args.checkpoint)
    cfg = model.cfg
    print(f"checkpoint {args.checkpoint} (format version {ck['version']})")
    print("config: " + ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    print(param_report(cfg))
    print(f"tokenizer: {tokenizer.kind}, {tokenizer.vocab_size} tokens")
    meta = ck.get("meta", {})
    print(f"trained on: {', '.join(meta['data']) if meta.get('data') else 'the built-in thinking corpus'}"
          f" ({meta.get('device', '?')}, {meta.get('dtype', '?')})")
    print(f"training state: step {ck['step']}, {ck.get('elapsed', 0) / 60:.1f} min, "
          f"val loss {ck.get('val_loss', float('nan')):.4f}, best val loss {ck['best_val_loss']:.4f}")
    return 0


def train_flags(t):
    """The flags of train: the model's shape, the budget, your data or the corpus, and the run's file."""
    t.add_argument("--data", nargs="+", help="your own UTF-8 text files or folders (default: the built-in corpus)")
    t.add_argument("--tokenizer", choices=["char", "bpe"], help="characters, or byte-level BPE "
                   "(default: bpe on the built-in corpus, char on --data)")
    t.add_argument("--vocab-size", type=bounded(int, "--vocab-size", 1, 65536), default=BPE_VOCAB_SIZE,
                   help="BPE vocabulary size")
    t.add_argument("--n-layer", type=bounded(int, "--n-layer", 1, 64), help="depth of the model "
                   "(default: 4; on --data, chosen from the text's size and the budget)")
    t.add_argument("--n-head", type=bounded(int, "--n-head", 1, 64), help="default: 2 on the built-in corpus, 3 on --data")
    t.add_argument("--n-embd", type=bounded(int, "--n-embd", 1, 4096), help="width of the model "
                   "(default: 128 on the built-in corpus, 192 on --data)")
    t.add_argument("--mlp-ratio", type=bounded(int, "--mlp-ratio", 1, 16),
                   help="the MLP's hidden width in multiples of --n-embd (default: 4)")
    t.add_argument("--block-size", type=bounded(int, "--block-size", 2, 8192), help="context length in tokens "
                   "(default: 192 on the built-in corpus, 128 on --data)")
    t.add_argument("--dropout", type=bounded(float, "--dropout", 0, 0.99),
                   help="default: 0 on the built-in corpus; on --data, chosen from the text's size and the budget")
    t.add_argument("--weight-decay", type=bounded(float, "--weight-decay", 0, 10),
                   help="AdamW's weight decay (default: 0.1; on --data, chosen with the dropout)")
    t.add_argument("--fused-attention", action="store_true",
                   help="use F.scaled_dot_product_attention on a CPU too (a GPU always does)")
    t.add_argument("--max-params", type=bounded(int, "--max-params", 0, MAX_LOAD_PARAMS), default=MAX_PARAMS,
                   help="the parameter ceiling (0: none)")
    t.add_argument("--batch-size", type=bounded(int, "--batch-size", 1, 4096), help="default: 8 on the built-in "
                   "corpus, 16 on --data (both chosen by 10-minute runs)")
    t.add_argument("--grad-accum", type=bounded(int, "--grad-accum", 1, 1024), default=1, help="batches per optimizer step")
    t.add_argument("--lr", type=bounded(float, "--lr", 0, 1, lo_open=True),
                   help="peak learning rate (default: 3e-3)")
    t.add_argument("--warmup", type=bounded(float, "--warmup", 0, 0.5), default=TrainSettings.warmup,
                   help="share of the run spent warming up")
    t.add_argument("--ema", type=bounded(float, "--ema", 0, 0.9999), default=TrainSettings.ema,
                   help="the weights' running average, evaluated and saved, keeps this share of itself a "
                        "step (default: 0.99, about the last 100 steps; 0: the weights themselves)")
    t.add_argument("--max-iters", type=bounded(int, "--max-iters", 1, 10 ** 9), default=TrainSettings.max_iters,
                   help="stop after this many steps")
    t.add_argument("--max-minutes", type=bounded(float, "--max-minutes", 0), default=TrainSettings.max_minutes,
                   help="stop after this many minutes of training, 0 for no limit (the learning-rate "
                        "schedule follows whichever budget, steps or minutes, ends first)")
    t.add_argument("--stop-after", type=bounded(int, "--stop-after", 0, 10 ** 9), default=0,
                   help="stop after this many steps and save a resumable checkpoint, as Ctrl-C does")
    t.add_argument("--eval-interval", type=bounded(int, "--eval-interval", 1, 10 ** 9), default=TrainSettings.eval_interval)
    t.add_argument("--val-fraction", type=bounded(float, "--val-fraction", 0, 0.5), default=0.1,
                   help="share of your text kept for validation (its end)")
    t.add_argument("--cache-dir", default=os.path.join("data", "cache"), help="where token ids of --data are cached")
    t.add_argument("--corpus-format", default="working", choices=["working", "direct"],
                   help="built-in corpus: with written working, or bare answers (the control)")
    t.add_argument("--corpus-size", type=bounded(int, "--corpus-size", 100, 10_000_000), default=CORPUS_SIZE,
                   help="built-in corpus: number of training problems")
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    t.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 on CUDA and on CPUs where it is faster, else fp32")
    t.add_argument("--compile", action="store_true", help="torch.compile the model (compiling, in the "
                   "first step, is not counted in --max-minutes)")
    t.add_argument("--seed", type=SEED, default=TrainSettings.seed)
    t.add_argument("--out", default=TrainSettings.out, help="checkpoint path (the best one is saved beside it as .best.pt)")
    t.add_argument("--resume", action="store_true", help="continue the checkpoint at --out")
    t.add_argument("--overwrite", action="store_true", help="replace the checkpoint at --out")


def generate_flags(g):
    """The flags of generate: the prompt and how to sample."""
    g.add_argument("--prompt", required=True, help='text to continue; "\\n" means a new line')
    g.add_argument("--max-new-tokens", type=bounded(int, "--max-new-tokens", 0, 100_000), default=200)
    g.add_argument("--temperature", type=temperature_flag("--temperature"), default=0.0, help="0 means greedy")
    g.add_argument("--top-k", type=bounded(int, "--top-k", 1), default=None)
    g.add_argument("--top-p", type=bounded(float, "--top-p", 0, 1, lo_open=True), default=None)
    g.add_argument("--repetition-penalty", type=bounded(float, "--repetition-penalty", 0.01, 100), default=1.0)
    g.add_argument("--stop", default=None, help="stop at this string (the end-of-example token always stops)")
    g.add_argument("--num-samples", type=bounded(int, "--num-samples", 1, 1000), default=1)
    g.add_argument("--seed", type=SEED, default=1337)
    g.add_argument("--show-probs", action="store_true", help="print the five likeliest candidates for each token")


def eval_flags(e):
    """The flags of eval: which questions, and greedy or a vote of samples."""
    e.add_argument("-n", type=bounded(int, "-n", 1, 100_000), default=1000, help="questions per split")
    e.add_argument("--split", default="questions", choices=[*SPLITS, "all"])
    e.add_argument("--questions", help='a JSON Lines file: {"question": "...", "answer": 7} per line')
    e.add_argument("--votes", type=bounded(int, "--votes", 1, 100), default=1, help="majority of K sampled replies")
    e.add_argument("--temperature", type=bounded(float, "--temperature", 0.01, 100), default=0.8,
                   help="sampling temperature for --votes")
    e.add_argument("--seed", type=SEED, default=0)
    e.add_argument("--json", action="store_true", help="print the summary as one JSON object")

def build_parser():
    p = argparse.ArgumentParser(prog="tinyllm.py", description="A tiny language model that thinks step by step, in one file.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    t = sub.add_parser("train", help="train a model (default: on the built-in thinking corpus)", formatter_class=fmt)
    train_flags(t)

    g = sub.add_parser("generate", help="continue a prompt with a trained model", formatter_class=fmt)
    e = sub.add_parser("eval", help="score a model on held-out word problems", formatter_class=fmt)
    c = sub.add_parser("chat", help="ask questions from the terminal (or a pipe)", formatter_class=fmt)
    i = sub.add_parser("info", help="describe a checkpoint", formatter_class=fmt)
    pl = sub.add_parser("plot", help="draw training logs: loss (and accuracy) against tokens seen", formatter_class=fmt)
    at = sub.add_parser("attention", help="draw one layer's attention over a prompt", formatter_class=fmt)
    x = sub.add_parser("export", help="write the model as ONNX or as a Hugging Face GPT-NeoX folder", formatter_class=fmt)
    for q in (g, e, c, i, at, x):
        q.add_argument("--checkpoint", default=DEFAULT_CKPT)
    for q in (g, e, c):
        q.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"])
        q.add_argument("--quantize", default="none", choices=["none", "int8"], help="int8: dynamic int8 linear layers (CPU)")
    for q in (pl, at, x):
        q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    generate_flags(g)
    eval_flags(e)
    c.add_argument("--temperature", type=temperature_flag("--temperature"), default=0.0, help="0 means greedy")
    c.add_argument("--top-k", type=bounded(int, "--top-k", 1), default=None)
    c.add_argument("--max-new-tokens", type=bounded(int, "--max-new-tokens", 0, 100_000), default=0, help="0: the context length")
    pl.add_argument("logs", nargs="+", help="checkpoints (their .log.jsonl is read) or logs")
    pl.add_argument("--out", default="loss.png")
    at.add_argument("--prompt", required=True)
    at.add_argument("--layer", type=int, default=None, help="0 is the first (default: the last)")
    at.add_argument("--out", default="attention.png")
    x.add_argument("--format", required=True, choices=["onnx", "hf"])
    x.add_argument("--out", required=True, help="a .onnx file, or a folder for hf")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    commands = {"train": cmd_train, "generate": cmd_generate, "eval": cmd_eval, "info": cmd_info, "chat": cmd_chat,
                "plot": cmd_plot, "attention": cmd_attention, "export": cmd_export}
    try:
        return commands[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # Ctrl-C in chat or generate, or a second one in training
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:   # `generate ... | head -3`: the reader has gone, so stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
