"""Parity test of peftfw's tokenizer against the Python `tokenizers` library.

Run:  python tokenizer_oracle.py WORKDIR [--tool PATH_TO_tokenize_tool]

The `tokenizers` library (Hugging Face's Rust implementation, which
transformers uses) is the oracle. This script trains a small byte-level BPE
the way Granite 4.0's tokenizer is built (cl100k split pattern, ByteLevel
without regex, special tokens <|end_of_text|>, <|start_of_role|>,
<|end_of_role|>), derives variants of it that exercise the other supported
parts of tokenizer.json, and for each writes

    WORKDIR/<variant>/tokenizer.json
    WORKDIR/<variant>/cases.json      the library's ids and decoded texts

`tokenize_tool WORKDIR/<variant>/tokenizer.json WORKDIR/<variant>/cases.json`
then checks peftfw against them. With --tool the script runs that for every
variant, runs `tokenize_tool --byte`, and checks that files the library
rejects make the tool fail with exit code 2 and a message naming the file.
It ends with "tokenizer oracle: N passed, M failed" (one count per variant
and error file) and exits non-zero if anything failed.

Nothing is downloaded: the training corpus is built in.
"""

import argparse
import copy
import functools
import json
import os
import random
import subprocess
import sys

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers import trainers

CL100K_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = ["<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's a classic pangram; we've all seen it.",
    "I'm sure they're right, but you'll see: he'd say THEY'RE wrong and She'S fine.",
    "Fine-tuning hybrid Mamba/Transformer models needs careful attention to state-space layers.",
    "def train(model, data):\n    for step, batch in enumerate(data):\n"
    "        loss = model(batch)\n"
    "        loss.backward()\n    return 42\n",
    '{"instruction": "Summarise the policy", "input": "", "output": "The policy requires..."}',
    "Numbers: 1, 12, 123, 1234, 12345, 3.14159, 2,718,281, 1e-9, 0x1F, 2025-11-04 10:30:00.",
    "Le café est très bon à Paris; naïve façade, résumé, garçon, où, élève, Noël.",
    "Die Straße ist schön. Größe, Übung, Äpfel, ÖL — Fußgängerübergänge sind überall.",
    "El niño comió jamón y pidió más piñatas. ¿Dónde está la estación? ¡Qué bien!",
    "Русский текст для обучения токенизатора. Привет, мир! Съешь же ещё этих мягких булок.",
    "Ελληνικά κείμενα: Καλημέρα κόσμε, η γλώσσα είναι όμορφη.",
    "中文测试文本：我们正在训练一个分词器。今天天气很好，我们去公园散步吧。",
    "日本語のテキストです。東京は大きな都市で、桜がとても綺麗です。カタカナも使います。",
    "한국어 텍스트입니다. 안녕하세요, 세계! 오늘은 날씨가 좋습니다.",
    "العربية لغة جميلة. مرحبا بالعالم! ٠١٢٣٤٥٦٧٨٩",
    "עברית היא שפה עתיקה. שלום עולם!",
    "हिन्दी भाषा में पाठ। नमस्ते दुनिया! १२३४",
    "ภาษาไทยเป็นภาษาที่สวยงาม สวัสดีชาวโลก",
    "Tiếng Việt có nhiều dấu: người, được, những, không, đường.",
    "Emoji: 😀 😂 👍🏽 ❤️ 🎉 👨‍👩‍👧‍👦 🏳️‍🌈 🇺🇸 🇯🇵 ✨ 🚀",
    "Whitespace   runs\t\ttabs\n\nnewlines\r\nCRLF lines\r\n   indented\n\t\tcode",
    "<|start_of_role|>system<|end_of_role|>"
    "You are a compliance analysis assistant.<|end_of_text|>\n"
    "<|start_of_role|>user<|end_of_role|>Is this allowed?<|end_of_text|>\n"
    "<|start_of_role|>assistant<|end_of_role|>Yes, under section 4.2.<|end_of_text|>\n",
    "URLs like https://example.com/path?q=1&r=two#frag and emails a.b@c.org appear too.",
    "Punctuation!!! Questions??? Ellipses... Dashes — and – hyphens - «quotes» “curly” ‘single’.",
    "Math: x² + y² = z², ∑ᵢ aᵢ ≤ ∞, √2 ≈ 1.414, π ≈ 3.14159, ½ ¾ ⅓, Ⅻ.",
]

# Test strings: the corpus lines plus targeted edge cases.
CASES = [
    ("empty", ""),
    ("space", " "),
    ("ascii", "Hello, world!"),
    ("contractions", "I'm sure it's THEY'RE we've You'LL he'd She'S 'S 'sx o'clock DON'T"),
    ("contraction-long-s", "it'ſ and it'S and it'\u212a"),
    ("digits", "1 12 123 1234 12345 123456 1234567890123 3.14159 1,000,000"),
    ("other-digits", "٣٤٥ १२३ ²³ Ⅻ ½ 0x1F"),
    ("double-space", "a  b"),
    ("triple-space", "a   b"),
    ("leading-space", "   leading"),
    ("trailing-space", "trailing   "),
    ("tabs", "\t\ttabs\tand spaces  \t"),
    ("newlines", "line1\nline2\n"),
    ("crlf", "line1\r\nline2\r\n"),
    ("blank-lines", "\n\n\n"),
    ("spaces-newlines", "  \n  \n a \n b"),
    ("cr-alone", "a\rb\r\r c"),
    ("nbsp", "\u00a0nbsp\u00a0\u00a0x"),
    ("ideographic-space", "ideographic\u3000space"),
    ("line-separator", "a\u2028b\u2029c\u0085d"),
    ("mongolian-vowel-separator", "x\u180ey \u180e z"),
    ("zero-width", "\u200bzero\u200cwidth\u200djoin"),
    ("controls", "\x00\x01\x1f\x7f\x1c\x1d"),
    ("class-members", "a²b½cⅫdⒶe\u0301f\u093fg‿h٣i_jKkߺl\u200dm\u200cn"
                      "\u00a0o\x85p\u180eq\x1cr9sFtg"),
    ("accents", "Café naïve façade résumé Ünïcödé Straße"),
    ("combining", "e\u0301 a\u0308 n\u0303o"),
    ("greek", "Ελληνικά κείμενα"),
    ("cyrillic", "Русский текст"),
    ("hebrew", "עברית"),
    ("arabic", "العربية"),
    ("devanagari", "हिन्दी"),
    ("cjk", "中文测试文本"),
    ("japanese", "日本語のテキスト"),
    ("korean", "한국어 텍스트"),
    ("thai", "ภาษาไทย"),
    ("vietnamese", "Tiếng Việt"),
    ("emoji", "😀"),
    ("emoji-skin-tone", "👍🏽"),
    ("emoji-zwj-family", "👨‍👩‍👧‍👦"),
    ("emoji-zwj-flag", "🏳️‍🌈"),
    ("emoji-flags", "🇺🇸🇯🇵"),
    ("emoji-variation", "❤️ ✨"),
    ("punctuation-runs", "!!!???... —–- <<>> ::: ;;"),
    ("code", "```python\nprint('hi')\n```\ndef f(x):\n    return x**2\n"),
    ("json", '{"key": [1, 2, 3], "nested": {"a": null}}'),
    ("url", "http://example.com/path?q=1&r=2"),
    ("granite-chat",
     "<|start_of_role|>system<|end_of_role|>You are helpful.<|end_of_text|>\n"
     "<|start_of_role|>user<|end_of_role|>Hi!<|end_of_text|>\n"
     "<|start_of_role|>assistant<|end_of_role|>"),
    ("special-mid-word", "a<|end_of_text|>b"),
    ("special-twice", "<|end_of_text|><|end_of_text|>"),
    ("special-spaced", " <|end_of_text|> x <|end_of_role|>\n"),
    ("special-truncated", "<|end_of_text"),
    ("special-extra", "<|end_of_text|>>"),
    ("special-broken", "< |end_of_text|>"),
    ("special-uppercase", "<|END_OF_TEXT|>"),
    ("added-mid-word", "x<think>y</think>z"),
    ("added-normalized", "json_schema myjson_schemax"),
    ("added-mask", "x <mask> y a  <mask>  b <mask><mask>\t<mask>\u3000z"),
    ("added-single-word", "ab cab abc ab, (ab) ab_ ab\u0301 éab ab1 <sw>x <sw> x<sw> <sw>"),
    ("added-strip", "rs   x  rs\nrs y   ls x ls  ls rs"),
    ("added-overlap", "<|end_of_text|> <|end <|endless end"),
    ("long-word", "a" * 300),
    ("long-number", "9" * 100),
    ("long-space", " " * 200 + "x"),
    ("long-mixed", " ".join(CORPUS)),
]

ADDED_NON_SPECIAL = [
    AddedToken("<think>", special=False, normalized=False),
    AddedToken("</think>", special=False, normalized=False),
    AddedToken("json_schema", special=False),  # normalized=True, the default
]


UNICODE14_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "unicode14_assigned.txt")


@functools.lru_cache(maxsize=None)
def unicode14_assigned():
    """Code points assigned in Unicode 14.0 (PCRE2 10.42's tables), read from a committed list
    so the sweep does not depend on this Python's unicodedata version."""
    out = set()
    with open(UNICODE14_FILE, encoding="ascii") as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                a, b = line.split("..")
                out.update(range(int(a, 16), int(b, 16) + 1))
    return frozenset(out)


@functools.lru_cache(maxsize=None)
def unicode_sweep():
    """Every code point assigned in Unicode 14, in blocks of 256, between a letter, a digit,
    a space and a full stop, so that its regex classes decide the pre-tokens.

    Later additions are left out: the library's Oniguruma tables are newer (Unicode 16) than
    PCRE2 10.42's (Unicode 14), so scripts added since then (Kawi, CJK extension H, ...) are
    letters to one and unassigned to the other.
    """
    assigned = unicode14_assigned()
    out = []
    for block in range(0, 0x110000, 256):
        chars = [chr(c) for c in range(block, block + 256) if c in assigned]
        if chars:
            text = "".join("a" + ch + "1" + ch + " " + ch + "." for ch in chars)
            out.append((f"unicode-block-{block:06X}", text))
    return tuple(out)


def random_strings(count, seed):
    """Random mixes of letters, digits, whitespace, emoji and specials."""
    rng = random.Random(seed)
    pool = (
        list("abcxyzABCXYZ'\"-_.,;:!?()[]{}<>|/\\@#$%^&*+=~`")
        + list("0123456789٣४²Ⅻ½Ⓐ‿ߺ\u093f")
        + [" ", "  ", "\t", "\n", "\r\n", "\r", "\u00a0", "\u3000", "\u2028", "\u180e", "\u200d"]
        + list("éüßñçøåæœ中文日本語한국어ไทยעבעر")
        + ["😀", "👍🏽", "👨‍👩‍👧", "🏳️‍🌈", "\u0301", "\ufe0f"]
        + ["'s", "'T", "'re", "'VE", "'m", "'Ll", "'d"]
        + ["the", " the", "The", "tokenizer", " compliance", "123456", "Hello", " world"]
        + ["<mask>", "ab", "<sw>", "rs", "ls", "<|end"]
        + SPECIALS + ["<think>", "json_schema", "<|", "|>"]
    )
    out = []
    for i in range(count):
        n = rng.randint(1, 30)
        out.append((f"random-{i}", "".join(rng.choice(pool) for _ in range(n))))
    return out


def train_base():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CL100K_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.add_tokens(ADDED_NON_SPECIAL)
    return tok


def to_legacy_merges(data):
    """The older merges format: "a b" strings instead of ["a", "b"] pairs."""
    data = copy.deepcopy(data)
    merges = data["model"]["merges"]
    if merges and isinstance(merges[0], list):
        for a, b in merges:
            assert " " not in a and " " not in b, "byte-level tokens never hold a space"
        data["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    return data


def variants(base):
    """(name, tokenizer.json dict, tokenizer_config.json dict or None)."""
    data = json.loads(base.to_str())
    assert isinstance(data["model"]["merges"][0], list), "expected the pair merges format"
    out = []

    config = {"eos_token": "<|end_of_text|>", "pad_token": {"content": "<|end_of_text|>"},
              "bos_token": None}
    out.append(("cl100k", data, config))
    out.append(("cl100k_unicode_sweep", data, None))
    out.append(("cl100k_legacy_merges", to_legacy_merges(data), None))

    # Whole words in the vocabulary that the merges would not build: with
    # ignore_merges a pre-token equal to one of them is taken whole. (The
    # non-special added tokens go, so that the new ids follow the vocabulary.)
    v = copy.deepcopy(data)
    v["model"]["ignore_merges"] = True
    v["added_tokens"] = [t for t in v["added_tokens"] if t["special"]]
    next_id = max(v["model"]["vocab"].values()) + 1
    for word in ["Ġtokenizer", "Ġcompliance", "Hello", "Ġworld", "123", "ĠĠ", "ĊĊ", "ĠçĶ"]:
        if word not in v["model"]["vocab"]:
            v["model"]["vocab"][word] = next_id
            next_id += 1
    out.append(("ignore_merges", v, None))

    # GPT-2 style: ByteLevel with its own regex, plus a template that wraps a
    # single sequence in special tokens.
    eot = data_id(data, "<|end_of_text|>")
    sor = data_id(data, "<|start_of_role|>")
    v = copy.deepcopy(data)
    v["pre_tokenizer"] = state(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    v["post_processor"] = state(processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single="<|start_of_role|> $A <|end_of_text|>",
            special_tokens=[("<|start_of_role|>", sor), ("<|end_of_text|>", eot)]),
    ]))
    out.append(("gpt2_bytelevel_template", v, None))

    v = copy.deepcopy(data)
    v["pre_tokenizer"] = state(pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True))
    out.append(("bytelevel_prefix_space", v, None))

    # Every Split behavior, invert, a String pattern and Digits before ByteLevel.
    v = copy.deepcopy(data)
    v["pre_tokenizer"] = state(pre_tokenizers.Sequence([
        pre_tokenizers.Split(" ", behavior="merged_with_next"),
        pre_tokenizers.Split(Regex(r"[,.;:]"), behavior="merged_with_previous"),
        pre_tokenizers.Split(Regex(r"\n+"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"\p{L}+"), behavior="contiguous", invert=True),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Split(Regex(r"\w{4}"), behavior="isolated"),
        pre_tokenizers.Split(Regex(r"\s"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]))
    out.append(("split_behaviors", v, None))

    v = copy.deepcopy(data)
    v["pre_tokenizer"] = state(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+"), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=False),
        pre_tokenizers.Split(Regex(r"x*"), behavior="isolated"),
        pre_tokenizers.Split(Regex(r"(?<=a)|b?"), behavior="merged_with_next"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]))
    out.append(("digits_empty_matches", v, None))

    # The regex classes whose meaning peftfw rewrites for PCRE2: removing what
    # a class matches shows exactly which characters it holds.
    for name, steps in [
        ("regex_classes_outside", [
            pre_tokenizers.Split(Regex(r"\s"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"\w"), behavior="removed"),
        ]),
        ("regex_classes_inside", [
            pre_tokenizers.Split(Regex(r"\h+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"[\s\w]"), behavior="merged_with_previous"),
        ]),
        ("regex_classes_posix", [
            pre_tokenizers.Split(Regex(r"[[:alpha:]]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"[[:digit:][:space:]]"), behavior="isolated"),
            pre_tokenizers.Split(Regex(r"[[:word:]]"), behavior="removed"),
        ]),
    ]:
        v = copy.deepcopy(data)
        v["pre_tokenizer"] = state(pre_tokenizers.Sequence(
            steps + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
        out.append((name, v, None))

    # Added tokens with lstrip / rstrip / single_word, special and not.
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, rstrip=True, normalized=False)])
    tok.add_tokens([
        AddedToken("ab", single_word=True),
        AddedToken("<sw>", single_word=True, normalized=False),
        AddedToken("rs", rstrip=True),
        AddedToken("ls", lstrip=True, normalized=False),
        AddedToken("<|end", normalized=False),  # overlaps a special token
        AddedToken("end", normalized=True),
    ])
    out.append(("added_token_flags", json.loads(tok.to_str()), None))

    # Merges that no trainer would choose: random pairs of existing tokens, so
    # that long chains and competing merges of all ranks meet in one word.
    out.append(("random_merges", random_merges(data, 6000, seed=7), None))

    # No pre-tokenizer or decoder: raw characters meet the vocabulary, so
    # unk_token (fused), byte_fallback and the space-joining decode show up.
    v = copy.deepcopy(data)
    v["pre_tokenizer"] = None
    v["decoder"] = None
    v["added_tokens"] = [t for t in v["added_tokens"] if t["special"]]
    next_id = max(v["model"]["vocab"].values()) + 1
    for b in (0x20, 0x0A, 0xC3, 0xA9):
        v["model"]["vocab"][f"<0x{b:02X}>"] = next_id
        next_id += 1
    v["model"]["unk_token"] = "<|end_of_role|>"
    v["model"]["fuse_unk"] = True
    v["model"]["byte_fallback"] = True
    out.append(("unk_byte_fallback", v, None))
    return out


def random_merges(data, vocab_size, seed):
    """`data` with a vocabulary grown from the byte alphabet by random merges:
    mostly pairs that occur in the corpus' pre-tokens, some of arbitrary
    tokens (kept under 24 characters)."""
    rng = random.Random(seed)
    tok = Tokenizer.from_str(json.dumps(data))
    words = [w for line in CORPUS for w, _ in tok.pre_tokenizer.pre_tokenize_str(line)]
    words = [w for w in words if len(w) >= 2]
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokens = list(vocab)
    merges = []
    while len(vocab) < vocab_size:
        if rng.random() < 0.8:
            word = rng.choice(words)
            start = rng.randrange(len(word) - 1)
            end = rng.randrange(start + 2, len(word) + 1)
            cut = rng.randrange(start + 1, end)
            a, b = word[start:cut], word[cut:end]
        else:
            a, b = rng.choice(tokens), rng.choice(tokens)
        if a not in vocab or b not in vocab or a + b in vocab or len(a + b) > 24:
            continue
        vocab[a + b] = len(vocab)
        tokens.append(a + b)
        merges.append([a, b])
    out = copy.deepcopy(data)
    out["model"]["vocab"] = vocab
    out["model"]["merges"] = merges
    # Special tokens follow the new vocabulary; the other added tokens go.
    out["added_tokens"] = [t for t in out["added_tokens"] if t["special"]]
    for k, token in enumerate(out["added_tokens"]):
        token["id"] = len(vocab) + k
    return out


def state(component):
    """A tokenizers component as its tokenizer.json object."""
    return json.loads(component.__getstate__())


def data_id(data, content):
    for t in data["added_tokens"]:
        if t["content"] == content:
            return t["id"]
    return data["model"]["vocab"][content]


def library_cases(tok, strings, seed, has_post_processor):
    cases = []
    for allow_special in (True, False):
        # Without allow_special only the texts that hold a special token.
        chosen = [(name, text) for name, text in strings
                  if allow_special or any(s in text for s in SPECIALS + ["<mask>"])]
        texts = [text for _, text in chosen]
        # encode_special_tokens = True is the library's "specials are text".
        tok.encode_special_tokens = not allow_special
        plain = tok.encode_batch(texts, add_special_tokens=False)
        # Templates only come from a post-processor (halves the run time).
        templated = (tok.encode_batch(texts, add_special_tokens=True) if has_post_processor
                     else plain)
        tok.encode_special_tokens = False
        for (name, text), encoding, with_template in zip(chosen, plain, templated):
            ids = encoding.ids
            case = {
                "name": name,
                "text": text,
                "allow_special": allow_special,
                "ids": ids,
                "decoded": tok.decode(ids, skip_special_tokens=False),
                "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
            }
            if with_template.ids != ids:
                case["ids_with_template"] = with_template.ids
            cases.append(case)

    vocab = tok.get_vocab(with_added_tokens=True)
    max_id = max(vocab.values())
    decode_cases = []
    # Every token alone (byte pieces of characters decode to U+FFFD) ...
    for token_id in range(max_id + 1):
        if tok.id_to_token(token_id) is None:
            continue
        decode_cases.append({
            "name": f"token-{token_id}",
            "ids": [token_id],
            "decoded": tok.decode([token_id], skip_special_tokens=False),
            "decoded_skip_special": tok.decode([token_id], skip_special_tokens=True),
        })
    # ... and random sequences, which cut characters at random places.
    rng = random.Random(seed)
    valid = [i for i in range(max_id + 1) if tok.id_to_token(i) is not None]
    for k in range(300):
        ids = [rng.choice(valid) for _ in range(rng.randint(1, 8))]
        decode_cases.append({
            "name": f"random-decode-{k}",
            "ids": ids,
            "decoded": tok.decode(ids, skip_special_tokens=False),
            "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
        })

    token_ids = {t: vocab[t] for t in SPECIALS if t in vocab}
    for t in rng.sample(sorted(vocab), 50):
        token_ids[t] = tok.token_to_id(t)
    return cases, decode_cases, token_ids, max_id + 1


def write_variant(workdir, name, data, config, strings):
    directory = os.path.join(workdir, name)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    # json.dumps, unlike json.dump, runs the C encoder.
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, ensure_ascii=False))
    config_path = os.path.join(directory, "tokenizer_config.json")
    if config is not None:
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=1)
    elif os.path.exists(config_path):
        os.remove(config_path)
    # The library reads back the very file peftfw will read.
    tok = Tokenizer.from_file(path)
    cases, decode_cases, token_ids, vocab_size = library_cases(
        tok, strings, seed=len(name), has_post_processor=data.get("post_processor") is not None)
    out = {
        "tokenizer": path,
        "library": "tokenizers",
        "cases": cases,
        "decode_cases": decode_cases,
        "token_ids": token_ids,
        "vocab_size": vocab_size,
    }
    if config is not None:
        vocab = tok.get_vocab(with_added_tokens=True)

        def config_id(key):
            value = config.get(key)
            if isinstance(value, dict):
                value = value["content"]
            return None if value is None else vocab[value]

        out["bos_id"] = config_id("bos_token")
        out["eos_id"] = config_id("eos_token")
        out["pad_id"] = config_id("pad_token")
    with open(os.path.join(directory, "cases.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(out, ensure_ascii=True))
    return path, os.path.join(directory, "cases.json"), len(cases) + len(decode_cases)


def broken_files(workdir, base_data):
    """Files the library itself refuses to load: (name, dict, expected fragment)."""
    out = []
    v = to_legacy_merges(base_data)
    v["model"]["merges"][3] = "a b c"
    out.append(("merge_with_three_parts", v, "model.merges[3]"))
    v = copy.deepcopy(base_data)
    v["model"]["merges"][5] = ["zzz_not_in_vocab", "a"]
    out.append(("merge_token_missing", v, "model.merges[5]"))
    v = copy.deepcopy(base_data)
    v["model"]["merges"][7] = ["a", "b", "c"]
    out.append(("merge_triple", v, "model.merges[7]"))
    v = copy.deepcopy(base_data)
    v["version"] = "2.0"
    out.append(("unknown_version", v, "version"))
    written = []
    for name, data, fragment in out:
        text = json.dumps(data)
        try:
            Tokenizer.from_str(text)
            raise SystemExit(f"the library accepted the broken file {name}; the test is wrong")
        except Exception:  # noqa: BLE001 - any refusal will do
            pass
        path = os.path.join(workdir, "broken", name + ".json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        written.append((name, path, fragment))
    return written


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir")
    parser.add_argument("--tool", help="tokenize_tool to run on every variant")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)

    base = train_base()
    strings = CASES + [(f"corpus-{i}", line) for i, line in enumerate(CORPUS)]
    strings += random_strings(300, seed=1234)

    written = []
    for name, data, config in variants(base):
        # The classes peftfw rewrites for PCRE2 are checked on every code point.
        if name == "cl100k_unicode_sweep":
            variant_strings = unicode_sweep()
        elif name.startswith("regex_classes"):
            variant_strings = strings + list(unicode_sweep())
        else:
            variant_strings = strings
        tokenizer_path, cases_path, n = write_variant(args.workdir, name, data, config,
                                                      variant_strings)
        print(f"{name}: {n} cases -> {cases_path}")
        written.append((name, tokenizer_path, cases_path))
    broken = broken_files(args.workdir, json.loads(base.to_str()))

    if not args.tool:
        return 0

    passed = failed = 0
    byte = subprocess.run([args.tool, "--byte"], capture_output=True, text=True)
    print(byte.stdout.strip().splitlines()[-1] if byte.stdout.strip() else byte.stderr)
    if byte.returncode == 0:
        passed += 1
    else:
        failed += 1
        print(f"FAIL byte tokenizer self-checks (exit {byte.returncode}):\n"
              f"{byte.stdout}{byte.stderr}")
    for name, tokenizer_path, cases_path in written:
        run = subprocess.run([args.tool, tokenizer_path, cases_path],
                             capture_output=True, text=True)
        last = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr.strip()
        print(f"{name}: {last}")
        if run.returncode == 0:
            passed += 1
        else:
            failed += 1
            print(run.stdout[-6000:] + run.stderr[-2000:])
    for name, path, fragment in broken:
        run = subprocess.run([args.tool, path, path], capture_output=True, text=True)
        ok = run.returncode == 2 and path in run.stderr and fragment in run.stderr
        print(f"broken/{name}: exit {run.returncode}: {run.stderr.strip()}")
        if ok:
            passed += 1
        else:
            failed += 1
            print(f"FAIL broken/{name}: expected exit code 2 and a message naming "
                  f"{path} and {fragment}")
    print(f"tokenizer oracle: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
