"""The prefix cache on its own: the one reuse rule, sessions, and the LRU bounds (no model)."""

from dataclasses import dataclass

from mlx_mistral.serve import PrefixCache, Request

EOS = 2


@dataclass(eq=False)
class FakeCache:
    """All the prefix cache reads of a RollingKVCache: its size (and its identity)."""

    nbytes: int = 100


def retokenize(text: str) -> list[int]:
    """A client's tokenizer that splits the model's answer differently (the echo)."""
    return [int(t) + 1000 for t in text.split()]


def finished(prefixes: PrefixCache, prompt: list[int], answer: list[int], session=None, echo=retokenize,
             marks=None) -> FakeCache:
    """Hold the cache of a request that answered `answer` (ending with EOS) to `prompt`."""
    request = Request(prompt, echo=echo, session=session)
    cache = FakeCache()
    text = " ".join(str(t) for t in answer if t != EOS)
    prefixes.hold(request, cache, prompt + answer, text, marks or [(0, 0)], EOS)
    return cache


def test_nothing_idle_means_the_whole_prompt():
    prefixes = PrefixCache()
    assert prefixes.plan(Request([1, 5, 6])) == ([1, 5, 6], None, 0, [(0, 0)])
    assert not prefixes.evict()


def test_next_turn_continues_the_cache_with_the_models_own_tokens():
    prefixes = PrefixCache()
    cache = finished(prefixes, [1, 5, 6], [7, 8, EOS])
    held = prefixes.get(id(cache))
    assert held.fed == [1, 5, 6, 7, 8] and held.actual == [1, 5, 6, 7, 8, EOS]
    # the client sends the answer back re-tokenized (1007 1008), then its next turn (9, 10)
    template = [1, 5, 6, 1007, 1008, EOS]
    assert held.template == template and held.marks == [(0, 0), (6, 6)]
    ids, key, n, marks = prefixes.plan(Request(template + [9, 10]))
    assert ids == [1, 5, 6, 7, 8, EOS, 9, 10]  # the model sees what it generated
    assert (key, n, marks) == (id(cache), 5, [(0, 0), (6, 6)])
    ids, taken, n, _ = prefixes.take(Request(template + [9, 10]))
    assert taken is cache and n == 5 and len(prefixes) == 0


def test_an_edited_turn_is_prefilled_whole():
    prefixes = PrefixCache()
    finished(prefixes, [1, 5, 6], [7, 8, EOS])
    edited = [1, 5, 4, 1007, 1008, EOS, 9]
    assert prefixes.plan(Request(edited)) == (edited, None, 0, [(0, 0)])
    assert len(prefixes) == 1  # plan changes nothing


def test_without_echo_only_the_exact_tokens_continue():
    prefixes = PrefixCache()
    cache = finished(prefixes, [1, 5, 6], [7, 8, EOS], echo=None)
    assert prefixes.get(id(cache)).marks == [(0, 0)]
    assert prefixes.plan(Request([1, 5, 6, 7, 8, EOS, 9]))[1:3] == (id(cache), 5)
    assert prefixes.plan(Request([1, 5, 6, 1007, 1008, EOS, 9]))[1] is None


def test_reuse_false_prefills_the_whole_prompt():
    prefixes = PrefixCache()
    finished(prefixes, [1, 5, 6], [7, 8, EOS], echo=None)
    request = Request([1, 5, 6, 7, 8, EOS, 9], reuse=False)
    assert prefixes.plan(request) == (request.tokens, None, 0, [(0, 0)])


def test_a_session_looks_at_its_own_cache_only_and_drops_it_when_taken():
    prefixes = PrefixCache()
    other = finished(prefixes, [1, 5, 6], [7, 8, EOS], echo=None)
    finished(prefixes, [1, 3], [4, EOS], echo=None, session="tab")
    assert prefixes.keys() == [id(other), "tab"]
    # another session cannot continue the cache of id(other)
    assert prefixes.plan(Request([1, 5, 6, 7, 8, EOS, 9], session="tab2"))[1] is None
    # the tab's regenerated turn: not a continuation, and its old cache goes all the same
    ids, cache, n, _ = prefixes.take(Request([1, 3, 9], session="tab"))
    assert (ids, cache, n) == ([1, 3, 9], None, 0) and prefixes.keys() == [id(other)]


def test_a_session_keeps_one_cache_the_last():
    prefixes = PrefixCache()
    finished(prefixes, [1, 3], [4, EOS], session="tab")
    last = finished(prefixes, [1, 3, 1004, EOS, 5], [6, EOS], session="tab", marks=[(0, 0), (4, 4)])
    assert prefixes.keys() == ["tab"] and prefixes.get("tab").cache is last
    assert prefixes.get("tab").marks == [(0, 0), (4, 4), (7, 7)]


def test_least_recently_used_go_first_by_count():
    prefixes = PrefixCache(max_idle=2)
    caches = [finished(prefixes, [1, i], [7, EOS]) for i in range(3)]
    assert prefixes.keys() == [id(caches[1]), id(caches[2])]
    assert prefixes.evict() and prefixes.keys() == [id(caches[2])]


def test_least_recently_used_go_first_by_bytes():
    prefixes = PrefixCache(max_idle=10, max_idle_bytes=250)  # room for two 100-byte caches
    caches = [finished(prefixes, [1, i], [7, EOS]) for i in range(4)]
    assert prefixes.keys() == [id(caches[2]), id(caches[3])] and prefixes.nbytes == 200
    prefixes.forget(id(caches[2]))
    assert prefixes.keys() == [id(caches[3])]
    prefixes.clear()
    assert len(prefixes) == 0
