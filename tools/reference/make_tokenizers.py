#!/usr/bin/env python3
"""Build the tokenizer fixtures for fluxfit's tests, and their golden token ids.

Writes (paths relative to the repository root):
  tests/fixtures/tiny-diffusers/tokenizer/{vocab.json, merges.txt, tokenizer_config.json,
      special_tokens_map.json}                 real CLIP BPE (openai/clip-vit-large-patch14 layout)
  tests/fixtures/tiny-diffusers/tokenizer_2/{spiece.model, tokenizer.json, tokenizer_config.json,
      special_tokens_map.json}                 tiny T5-style sentencepiece unigram model
  crates/fluxfit/assets/bpe_simple_vocab_16e6.txt.gz   (copied from open-clip-torch, MIT)
  crates/fluxfit/assets/t5_tiny_tokenizer.json         (copy of tokenizer_2/tokenizer.json)
  tests/fixtures/golden/tokenizers.json                golden ids

Run with tools/reference/.venv/bin/python tools/reference/make_tokenizers.py (from anywhere).
Deterministic: running it twice gives byte-identical files.
"""

import gzip
import io
import json
import os
import shutil
import sys

import open_clip
import sentencepiece as spm
import transformers
from open_clip.tokenizer import SimpleTokenizer, bytes_to_unicode
from transformers import CLIPTokenizer, T5TokenizerFast

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIX = os.path.join(ROOT, "tests", "fixtures")
CLIP_DIR = os.path.join(FIX, "tiny-diffusers", "tokenizer")
T5_DIR = os.path.join(FIX, "tiny-diffusers", "tokenizer_2")
GOLDEN_DIR = os.path.join(FIX, "golden")
ASSETS = os.path.join(ROOT, "crates", "fluxfit", "assets")

BPE_GZ = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")

T5_SPM_VOCAB = 500  # sentencepiece pieces (incl. <pad>, </s>, <unk>); +100 <extra_id_N> on top
T5_EXTRA_IDS = 100


def write_json(path, obj, indent=2):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")


# --------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------

def build_clip():
    os.makedirs(CLIP_DIR, exist_ok=True)
    lines = gzip.open(BPE_GZ).read().decode("utf-8").split("\n")
    # Same slice as CLIP's own SimpleTokenizer: line 0 is the "#version" header, then the
    # first 49152-256-2 merges are used.
    merges = lines[1 : 49152 - 256 - 2 + 1]
    assert len(merges) == 48894, len(merges)
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    enc = {tok: i for i, tok in enumerate(vocab)}
    assert len(enc) == 49408, "duplicate vocab entries"
    assert enc["<|startoftext|>"] == 49406 and enc["<|endoftext|>"] == 49407

    write_json(os.path.join(CLIP_DIR, "vocab.json"), enc, indent=None)
    with open(os.path.join(CLIP_DIR, "merges.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n")
        for m in merges:
            f.write(m + "\n")

    def special(content):
        return {"content": content, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": True, "__type": "AddedToken"}

    # Mirrors the openai/clip-vit-large-patch14 (and FLUX.1-dev/tokenizer) files.
    write_json(os.path.join(CLIP_DIR, "tokenizer_config.json"), {
        "add_prefix_space": False,
        "bos_token": special("<|startoftext|>"),
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": special("<|endoftext|>"),
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": special("<|endoftext|>"),
    })
    strip = lambda d: {k: v for k, v in d.items() if k != "__type"}  # noqa: E731
    write_json(os.path.join(CLIP_DIR, "special_tokens_map.json"), {
        "bos_token": strip(special("<|startoftext|>")),
        "eos_token": strip(special("<|endoftext|>")),
        "pad_token": "<|endoftext|>",
        "unk_token": strip(special("<|endoftext|>")),
    })

    os.makedirs(ASSETS, exist_ok=True)
    shutil.copyfile(BPE_GZ, os.path.join(ASSETS, "bpe_simple_vocab_16e6.txt.gz"))


# --------------------------------------------------------------------------------------
# T5 (tiny sentencepiece unigram)
# --------------------------------------------------------------------------------------

def t5_corpus():
    """A few hundred varied English sentences about images and scenes (deterministic)."""
    subjects = [
        "a tiny red fox", "an old lighthouse", "a golden retriever", "a small wooden cabin",
        "a futuristic city", "a bowl of ripe fruit", "a snowy mountain", "a vintage car",
        "a black cat", "a white paper cup", "a robot made out of gold", "a field of sunflowers",
        "a busy street market", "a quiet library", "a sailing boat", "a majestic eagle",
        "a cup of coffee", "a glowing jellyfish", "an ancient castle", "a bicycle",
        "a portrait of a woman", "a young boy", "an astronaut", "a dragon", "a forest path",
        "a neon sign", "a waterfall", "a desert oasis", "a steam train", "a hummingbird",
    ]
    places = [
        "in the snow", "on a beach at sunset", "under a starry sky", "in a misty forest",
        "next to a river", "on a rainy street", "in a sunlit kitchen", "on top of a hill",
        "inside a cozy room", "in the middle of the ocean", "near a frozen lake",
        "in a crowded train station", "at the edge of a cliff", "in a green meadow",
        "on the moon", "behind a glass window",
    ]
    styles = [
        "digital art", "oil painting", "watercolor", "photograph", "pencil sketch",
        "cinematic lighting", "high detail", "soft focus", "wide angle", "macro shot",
        "studio lighting", "35mm film", "8k resolution", "concept art", "minimalist",
    ]
    adjectives = [
        "bright", "dark", "colorful", "peaceful", "dramatic", "beautiful", "strange",
        "warm", "cold", "vivid", "calm", "mysterious", "cheerful", "gloomy",
    ]
    extra = [
        "The quick brown fox jumps over the lazy dog.",
        "A photo of a cat sitting on a chair.",
        "Don't forget that it's raining, and we're going outside anyway.",
        "They'll paint the house blue; I'm sure you've seen it.",
        "She'd rather take a picture of the sky than of the city.",
        "Black Forest Labs made the FLUX image model.",
        "Replace the logo with the text 'Black Forest Labs'.",
        "There are 3 apples, 12 oranges and 100 grapes on the table.",
        "The image is 1024 pixels wide and 768 pixels high.",
        "Hello, world! How are you today?",
        "Light, shadow, color and texture make a picture interesting.",
        "The camera captures the scene at dawn, when the light is soft.",
        "Two dogs play with a ball in the garden while children watch.",
        "A woman reads a book by the window; the sun is setting.",
        "Close-up of a flower with drops of water on its petals.",
        "An aerial view of a city at night, with lights and traffic.",
        "A painting in the style of Van Gogh, with swirling stars.",
        "Text that reads \"FLUX\" written in the sand.",
        "Generate an image of a house, a tree and a car.",
        "Café, naïve, résumé and crème brûlée are French words.",
    ]
    nouns = (
        "apple orange banana lemon cherry grape melon peach pear plum tomato carrot potato onion "
        "bread cheese butter honey sugar salt pepper soup salad pizza pasta cake cookie candle lamp "
        "table chair sofa bed desk shelf mirror clock window door roof wall floor stairs garden fence "
        "bridge tower church temple palace village harbor island valley canyon volcano glacier "
        "river stream pond ocean wave cloud storm thunder lightning rainbow sunrise sunset moon star "
        "planet galaxy comet rocket satellite spaceship airplane helicopter balloon kite umbrella "
        "hat scarf jacket dress shirt shoes boots gloves glasses necklace ring crown sword shield "
        "horse tiger lion zebra giraffe elephant monkey panda rabbit squirrel owl parrot penguin "
        "dolphin whale shark turtle frog snake butterfly spider bee ant deer wolf bear mouse duck "
        "guitar piano violin drum trumpet camera phone computer keyboard screen book letter map "
        "painting statue fountain garden flower rose tulip lily daisy orchid cactus tree leaf branch "
        "mushroom stone rock sand dust smoke fire ice snowflake crystal diamond pearl gold silver"
    ).split()
    verbs = (
        "walking running jumping flying swimming sleeping dancing singing reading writing painting "
        "cooking eating drinking laughing crying watching climbing falling floating glowing shining "
        "burning melting growing hiding waiting sitting standing looking smiling dreaming"
    ).split()
    colors = "red blue green yellow purple pink brown gray silver golden violet turquoise crimson".split()
    materials = "wooden metal glass paper plastic marble velvet woolen leather ceramic rusty shiny".split()
    out = []
    for k, n in enumerate(nouns):
        c = colors[k % len(colors)]
        m = materials[(k * 5) % len(materials)]
        v = verbs[(k * 7) % len(verbs)]
        n2 = nouns[(k * 11 + 3) % len(nouns)]
        out.append(f"a {c} {m} {n} {v} near the {n2}")
        out.append(f"The {n}s were {v} beside {colors[(k * 3) % len(colors)]} {n2}s.")
    i = 0
    for s in subjects:
        for j in range(4):
            p = places[(i * 7 + j * 3) % len(places)]
            st = styles[(i * 5 + j) % len(styles)]
            a = adjectives[(i * 3 + j * 5) % len(adjectives)]
            form = (i + j) % 4
            if form == 0:
                out.append(f"{s} {p}, {st}")
            elif form == 1:
                out.append(f"A {a} picture of {s} {p}.")
            elif form == 2:
                out.append(f"{s.capitalize()} {p}, {a} and {st}, trending on artstation")
            else:
                out.append(f"In this {st}, {s} stands {p} while the light is {a}.")
            i += 1
    out.extend(extra)
    # a few numeric / mixed lines so digits and punctuation get pieces
    for k in range(40):
        out.append(f"Frame {k} of {k * 7 + 3}: seed {k * 1234 % 9973}, steps {k % 50 + 1}, guidance {k % 10}.{k % 7}")
    return out


def build_t5():
    os.makedirs(T5_DIR, exist_ok=True)
    corpus = t5_corpus()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        model_type="unigram",
        vocab_size=T5_SPM_VOCAB,
        pad_id=0, pad_piece="<pad>",
        eos_id=1, eos_piece="</s>",
        unk_id=2, unk_piece="<unk>",
        bos_id=-1,
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc",
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        hard_vocab_limit=True,
        byte_fallback=False,
        minloglevel=2,
    )
    spm_path = os.path.join(T5_DIR, "spiece.model")
    with open(spm_path, "wb") as f:
        f.write(model.getvalue())

    sp = spm.SentencePieceProcessor(model_file=spm_path)
    assert sp.get_piece_size() == T5_SPM_VOCAB
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)

    # Convert the sentencepiece model with transformers (slow -> fast conversion), as the
    # real T5 tokenizer.json files were made.
    tmp = os.path.join(T5_DIR, "_convert")
    os.makedirs(tmp, exist_ok=True)
    shutil.copyfile(spm_path, os.path.join(tmp, "spiece.model"))
    tok = T5TokenizerFast.from_pretrained(tmp, extra_ids=T5_EXTRA_IDS, model_max_length=512, legacy=True)
    shutil.rmtree(tmp)
    assert len(tok) == T5_SPM_VOCAB + T5_EXTRA_IDS, len(tok)
    tok.save_pretrained(T5_DIR)
    # save_pretrained may copy the sentencepiece file next to the json (it is ours already).
    for name in os.listdir(T5_DIR):
        if name not in ("spiece.model", "tokenizer.json", "tokenizer_config.json",
                        "special_tokens_map.json"):
            os.remove(os.path.join(T5_DIR, name))

    # Canonical, real-repo-like tokenizer_config / special_tokens_map (T5 v1.1 layout).
    extra = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    tj = json.load(open(os.path.join(T5_DIR, "tokenizer.json"), encoding="utf-8"))
    added = {t["content"]: t for t in tj["added_tokens"]}
    decoder = {}
    for content in ["<pad>", "</s>", "<unk>"] + extra:
        t = added[content]
        decoder[str(t["id"])] = {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
    write_json(os.path.join(T5_DIR, "tokenizer_config.json"), {
        "add_prefix_space": None,
        "added_tokens_decoder": dict(sorted(decoder.items(), key=lambda kv: int(kv[0]))),
        "additional_special_tokens": extra,
        "clean_up_tokenization_spaces": True,
        "eos_token": "</s>",
        "extra_ids": T5_EXTRA_IDS,
        "legacy": True,
        "model_max_length": 512,
        "pad_token": "<pad>",
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>",
    })
    write_json(os.path.join(T5_DIR, "special_tokens_map.json"), {
        "additional_special_tokens": extra,
        "eos_token": {"content": "</s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
        "pad_token": {"content": "<pad>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
        "unk_token": {"content": "<unk>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
    })
    # Re-serialise tokenizer.json deterministically (pretty, stable key order as written).
    write_json(os.path.join(T5_DIR, "tokenizer.json"), tj)
    shutil.copyfile(os.path.join(T5_DIR, "tokenizer.json"), os.path.join(ASSETS, "t5_tiny_tokenizer.json"))


# --------------------------------------------------------------------------------------
# Goldens
# --------------------------------------------------------------------------------------

LONG_PROMPT = (
    "A breathtaking, highly detailed panoramic photograph of an ancient castle standing on top of "
    "a snowy mountain at sunset, with a frozen lake below, a misty forest of tall pine trees, a tiny "
    "red fox walking through the snow, golden light on the clouds, a sailing boat far away on the "
    "ocean, a busy street market in the village, children playing with a ball, a black cat on a "
    "wooden fence, colorful lanterns, soft focus background, cinematic lighting, 35mm film, 8k "
    "resolution, trending on artstation, concept art by many artists, warm and peaceful mood."
)

TEXTS = [
    "a tiny red fox in the snow",
    "a photo of a cat",
    "A Tiny RED Fox in the SNOW",
    "Hello, world! How are you? (fine) -- really; yes: [ok] {x} #1 @home & 50% off...",
    "3 cats and 42 dogs, 1024x768 pixels, pi is 3.14159",
    "   lots   of\t\twhitespace \n here   ",
    "café naïve résumé crème brûlée",
    "a dog 🐶 and a cat 🐱 ✨",
    "東京の夜景 and 北京",
    "",
    LONG_PROMPT,
    "don't stop, it's fine, we're here, they'll go, I'm ok, you've seen it, she'd say DON'T",
    "Replace the logo with the text 'Black Forest Labs'",
    "a robot made out of gold",
]


def check_clip_vs_open_clip(clip_tok):
    oc = SimpleTokenizer()
    for text in TEXTS:
        ours = clip_tok(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
        ref = oc([text], context_length=77)[0].tolist()
        n = len([i for i in ref if i != 0])
        ours_unpadded = ours[: n]
        if ours_unpadded != ref[:n] or (n < 77 and ours[n] != 49407):
            # open_clip cleans text with ftfy + html.unescape; transformers' fast CLIP tokenizer
            # normalises with NFC + whitespace collapsing + lowercasing. They can differ on rare
            # unicode; report it instead of failing.
            print(f"  NOTE: CLIP ids differ from open_clip for {text!r}:\n    hf={ours_unpadded}\n    oc={ref[:n]}")
            if all(ord(c) < 128 for c in text):
                raise SystemExit("CLIP tokenizer mismatch on ASCII text")
    print("  CLIP: transformers CLIPTokenizer agrees with open_clip SimpleTokenizer")


def check_t5_vs_sentencepiece(t5_tok):
    sp = spm.SentencePieceProcessor(model_file=os.path.join(T5_DIR, "spiece.model"))
    for text in TEXTS:
        ours = t5_tok(text)["input_ids"]
        ref = sp.encode(text) + [1]
        if ours != ref:
            print(f"  NOTE: T5 fast ids differ from sentencepiece for {text!r}:\n    fast={ours}\n    spm ={ref}")
    print("  T5: compared fast tokenizer with sentencepiece")


def build_goldens():
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    clip_tok = CLIPTokenizer.from_pretrained(CLIP_DIR)
    t5_tok = T5TokenizerFast.from_pretrained(T5_DIR)
    assert clip_tok.bos_token_id == 49406 and clip_tok.eos_token_id == 49407
    assert clip_tok.pad_token_id == 49407 and clip_tok.model_max_length == 77
    assert t5_tok.pad_token_id == 0 and t5_tok.eos_token_id == 1 and t5_tok.unk_token_id == 2
    check_clip_vs_open_clip(clip_tok)
    check_t5_vs_sentencepiece(t5_tok)

    cases = []
    for text in TEXTS:
        cases.append({
            "text": text,
            "clip_ids": clip_tok(text, padding="max_length", max_length=77, truncation=True)["input_ids"],
            "t5_ids_16": t5_tok(text, padding="max_length", max_length=16, truncation=True)["input_ids"],
            "t5_ids_64": t5_tok(text, padding="max_length", max_length=64, truncation=True)["input_ids"],
        })
    long_case = cases[TEXTS.index(LONG_PROMPT)]
    assert len(clip_tok(LONG_PROMPT)["input_ids"]) > 77
    assert len(t5_tok(LONG_PROMPT)["input_ids"]) > 64
    assert long_case["clip_ids"][-1] == 49407 and long_case["t5_ids_64"][-1] == 1
    write_json(os.path.join(GOLDEN_DIR, "tokenizers.json"), cases, indent=1)


def main():
    print(f"transformers {transformers.__version__}, sentencepiece {spm.__version__}, open_clip {open_clip.__version__}")
    build_clip()
    print("wrote", CLIP_DIR)
    build_t5()
    print("wrote", T5_DIR)
    build_goldens()
    print("wrote", os.path.join(GOLDEN_DIR, "tokenizers.json"))


if __name__ == "__main__":
    sys.exit(main())
