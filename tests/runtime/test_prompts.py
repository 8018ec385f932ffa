"""Prompt reading without torch: AUTOMATIC1111's emphasis grammar and arithmetic, 75-token chunks, reassembly.

The parser's expectations are that tool's documented behaviour: the examples in ``parse_prompt_attention``'s
docstring (modules/prompt_parser.py) and the wiki's "Attention/emphasis", "BREAK" and "Infinite prompt length".
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from sdrt.errors import StageError, UserError
from sdrt.runtime.prompts import PromptReader, PromptTokens, parse_prompt_attention
from sdrt.runtime.tokenizer import CLIPTokenizer


@pytest.mark.parametrize("text, expected", [
    # parse_prompt_attention's docstring
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55), (", sun, ", 1.1),
      ("sky", 1.4641), (".", 1.1)]),
    # the wiki's attention/emphasis section
    ("a (word)", [("a ", 1.0), ("word", 1.1)]),
    ("a ((word))", [("a ", 1.0), ("word", 1.21)]),
    ("a (((word)))", [("a ", 1.0), ("word", 1.331)]),
    ("a [word]", [("a ", 1.0), ("word", 1 / 1.1)]),
    ("a [[word]]", [("a ", 1.0), ("word", 1 / 1.21)]),
    ("a (word:1.5)", [("a ", 1.0), ("word", 1.5)]),
    ("a (word:0.25)", [("a ", 1.0), ("word", 0.25)]),
    (r"a \(word\)", [("a (word)", 1.0)]),
    (r"anime_\(character\)", [("anime_(character)", 1.0)]),
    ("[word:1.5]", [("word:1.5", 1 / 1.1)]),         # a weight only works with ()
    ("(word: 1.5 )", [("word", 1.5)]),               # spaces around the number are allowed
    ("((a:2) b)", [("a", 2.2), (" b", 1.1)]),        # nesting multiplies
    (r"a \\ b", [("a \\ b", 1.0)]),                  # \\ is a literal backslash
    ("a: b", [("a: b", 1.0)]),                       # a lone colon is text
    ("", [("", 1.0)]),
    # BREAK (upper case, a word of its own) ends the chunk
    ("a BREAK b", [("a", 1.0), (None, 1.0), ("b", 1.0)]),
    ("aBREAK b, a break b", [("aBREAK b, a break b", 1.0)]),
])
def test_parser_pins_the_documented_grammar(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_parser_arithmetic_is_the_tools_own_order():
    # the docstring's figures to the last bit: weights multiply in place, innermost bracket first
    got = dict((t, w) for t, w in parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") if t)
    assert got["house"] == 1.5730000000000004 and got["sky"] == 1.4641000000000006


def test_break_inside_brackets_still_breaks():
    assert parse_prompt_attention("(a BREAK b)") == [("a", 1.1), (None, 1.0), ("b", 1.1)]


def test_a_weight_that_is_not_a_number_is_one_line():
    with pytest.raises(UserError, match=r"prompt weight '1\.2\.3' in ':1\.2\.3\)' is not a number"):
        parse_prompt_attention("(red:1.2.3)")


@pytest.fixture(scope="module")
def readers(engine_dirs):
    out = {}
    for kind, engine in engine_dirs.items():
        import json

        m = json.loads((engine / "sdrt.json").read_text())["model"]
        tok = CLIPTokenizer.from_dir(engine / "tokenizer", m["text_max_length"], m["pad_token_id"])
        out[kind] = PromptReader(tok)
    return out


def _words(n: int) -> str:
    """A prompt of exactly n CLIP tokens (each of these words is one token)."""
    words = ["red", "blue", "green", "circle", "square", "photo", "small", "large"]
    return " ".join(words[i % len(words)] for i in range(n))


@pytest.mark.parametrize("kind", ["sd1-tiny", "sd2-tiny"])
def test_up_to_75_tokens_the_ids_are_diffusers_own(readers, kind):
    reader = readers[kind]
    for prompt in ["a red circle", "", _words(reader.chunk_length), "  Mixed CASE,\tand punctuation!!  "]:
        tokens = reader.prepare([prompt])
        assert tokens.chunks == 1
        np.testing.assert_array_equal(tokens.ids, reader.tokenizer.encode([prompt]))
        assert (tokens.weights == 1).all()


def test_chunks_are_75_tokens_each_with_their_own_bos_and_eos(readers):
    reader = readers["sd1-tiny"]
    tok = reader.tokenizer
    size = reader.chunk_length
    assert size == tok.max_length - 2
    prompt = _words(size + 1)  # one token too many for one chunk
    tokens = reader.prepare([prompt])
    assert tokens.chunks == 2 and tokens.ids.shape == (2, tok.max_length)
    flat = tok.pieces([prompt])[0]
    np.testing.assert_array_equal(tokens.ids[0], [tok.bos_token_id] + flat[:size] + [tok.eos_token_id])
    assert list(tokens.ids[1, :3]) == [tok.bos_token_id, flat[size], tok.eos_token_id]
    assert (tokens.ids[1, 3:] == tok.pad_token_id).all()
    # a prompt's chunks carry on where the last one stopped: nothing dropped, nothing repeated
    body = [t for row in tokens.ids for t in row[1:] if t not in (tok.bos_token_id, tok.eos_token_id)]
    assert body == flat


def test_prompt_and_negative_are_padded_to_the_same_chunks(readers):
    reader = readers["sd2-tiny"]  # pads with "!", not eos: empty chunks are [bos, eos, pad...]
    tok = reader.tokenizer
    tokens = reader.prepare([_words(3 * reader.chunk_length - 5), "blurry"])
    assert tokens.chunks == 3 and tokens.n_prompts == 2
    empty = tok.encode([""])[0]
    np.testing.assert_array_equal(tokens.ids[4], empty)
    np.testing.assert_array_equal(tokens.ids[5], empty)
    np.testing.assert_array_equal(tokens.ids[3], tok.encode(["blurry"])[0])
    assert list(tokens.first_chunks) == [0, 3]


def test_break_starts_a_new_chunk(readers):
    reader = readers["sd1-tiny"]
    tok = reader.tokenizer
    tokens = reader.prepare(["red circle BREAK blue square"])
    assert tokens.chunks == 2
    np.testing.assert_array_equal(tokens.ids[0], tok.encode(["red circle"])[0])
    np.testing.assert_array_equal(tokens.ids[1], tok.encode(["blue square"])[0])
    assert reader.prepare(["red circle BREAK"]).chunks == 1
    assert reader.prepare(["red BREAK BREAK blue"]).chunks == 3  # an empty chunk between


def test_a_full_chunk_wraps_at_a_recent_comma(readers):
    reader = readers["sd1-tiny"]
    size = reader.chunk_length
    head = _words(size - 5)
    # the comma is token size-5; when the chunk fills, the 4 words after it move on with the rest
    chunks = reader.chunks(f"{head}, {_words(10)}")
    assert [len(ids) for ids, _ in chunks] == [size - 4, 10]
    assert chunks[0][0][-1] == reader.comma_id
    # the comma 30 tokens back (more than 20): no wrap
    chunks = reader.chunks(f"{_words(size - 30)}, {_words(40)}")
    assert [len(ids) for ids, _ in chunks] == [size, 11]
    unwrapped = PromptReader(reader.tokenizer, word_wrap=0).chunks(f"{head}, {_words(10)}")
    assert [len(ids) for ids, _ in unwrapped] == [size, 6]


def test_weights_follow_their_tokens(readers):
    reader = readers["sd1-tiny"]
    tokens = reader.prepare(["a (red:1.5) circle on a [blue] square"])
    plain = reader.prepare(["a red circle on a blue square"])
    np.testing.assert_array_equal(tokens.ids, plain.ids)  # the syntax is gone, the words stay
    red, blue = reader.tokenizer.token_id("red</w>"), reader.tokenizer.token_id("blue</w>")
    w = dict(zip(tokens.ids[0].tolist(), tokens.weights[0].tolist()))
    assert w[red] == pytest.approx(1.5) and w[blue] == pytest.approx(1 / 1.1)
    assert (tokens.weights[0][~np.isin(tokens.ids[0], [red, blue])] == 1).all()
    # (word:1.0) is word; literal reading keeps the brackets as tokens
    np.testing.assert_array_equal(reader.prepare(["a (red:1.0) circle"]).ids, reader.prepare(["a red circle"]).ids)
    assert (reader.prepare(["a (red:1.0) circle"]).weights == 1).all()
    literal = reader.prepare(["a (red) circle"], weighting=False)
    np.testing.assert_array_equal(literal.ids, reader.tokenizer.encode(["a (red) circle"]))


def test_truncate_is_diffusers_cut(readers, caplog):
    reader = readers["sd1-tiny"]
    prompt = f"{_words(60)}, {_words(40)}"  # a comma near the end of the first chunk: truncation does not wrap
    with caplog.at_level(logging.WARNING):
        tokens = reader.prepare([prompt], truncate=True, weighting=False)
    np.testing.assert_array_equal(tokens.ids, reader.tokenizer.encode([prompt]))
    assert "truncated" in caplog.text and "77 tokens" in caplog.text


def test_more_chunks_than_the_engine_takes_is_one_line_naming_the_limit(readers):
    reader = readers["sd1-tiny"]
    prompt = _words(2 * reader.chunk_length + 1)
    with pytest.raises(UserError) as e:
        reader.prepare(["short", prompt], max_chunks=2, limit="its tensorrt profiles")
    msg = str(e.value)
    assert "\n" not in msg and "151 tokens in 3 chunks of 75" in msg and "at most 2 chunks (150 tokens" in msg
    assert "--truncate" in msg
    assert reader.prepare([prompt], max_chunks=2, truncate=True).chunks == 1


def test_assembly_weights_tokens_and_restores_each_chunks_mean():
    rng = np.random.default_rng(0)
    length, hidden = 6, 4
    ids = np.zeros((4, length), np.int64)
    weights = np.ones((4, length), np.float32)
    weights[1, 2] = 1.5   # prompt 0, chunk 1
    weights[2, 1:3] = 0.5  # prompt 1, chunk 0
    tokens = PromptTokens(ids, weights, chunks=2)
    h = rng.standard_normal((4, length, hidden)).astype(np.float32) + 0.3
    out = tokens.assemble(h)
    assert out.shape == (2, 2 * length, hidden)
    rows = out.reshape(4, length, hidden)
    np.testing.assert_array_equal(rows[[0, 3]], h[[0, 3]])  # unweighted chunks untouched, bit for bit
    for r in (1, 2):
        assert rows[r].mean() == pytest.approx(h[r].mean(), rel=1e-5)
        scale = h[r].mean() / (h[r] * weights[r, :, None]).mean()
        np.testing.assert_allclose(rows[r], h[r] * weights[r, :, None] * scale, rtol=1e-5)
    # a chunk whose weighted mean is 0 cannot have its mean restored: an error, not inf
    zero = np.zeros((1, length, hidden), np.float32)
    zero[0, 0], zero[0, 1] = -2, 1
    doubled = np.ones((1, length), np.float32)
    doubled[0, 1] = 2
    with pytest.raises(StageError, match="mean came out 0"):
        PromptTokens(ids[:1], doubled, 1).assemble(zero)
