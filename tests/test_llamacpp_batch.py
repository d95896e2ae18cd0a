"""worker/llamacpp_batch.py: the llama.cpp side of the generation loop in BatchGenerator's shape
(insert, next, remove), on a GGUF of the tiny model: requests joining a running batch decode as
each would alone, stop tokens and max_tokens end them, a finished sequence's prefix serves the
next prompt from the KV cache, seeded sampling repeats, a removed sequence frees its slot."""

import pytest

from core import llamacpp, prompt

if not llamacpp.installed():
    pytest.skip(llamacpp.INSTALL_HINT, allow_module_level=True)

QUESTIONS = (
    "Em que ano foi fundado o Farense?",
    "Qual é o estádio?",
    "Quem é o treinador?",
    "Onde fica Faro?",
)
N = 12


@pytest.fixture(scope="module")
def prompts(tiny_gguf):
    _, tokenizer = tiny_gguf
    return [
        prompt.encode_prompt(tokenizer, [{"role": "user", "content": q}], "És o assistente.")
        for q in QUESTIONS
    ]


@pytest.fixture(scope="module")
def alone(tiny_gguf, prompts):
    """Each prompt's first N greedy tokens, one at a time in llama-cpp-python's Llama."""
    model = llamacpp.load(tiny_gguf[0], n_ctx=512, threads=2)
    return [llamacpp.greedy(model, ids, N)[0] for ids in prompts]


@pytest.fixture
def batch(tiny_gguf):
    from worker.llamacpp_batch import LlamaCppBatch

    b = LlamaCppBatch(
        tiny_gguf[0], n_ctx=2048, max_batch=3, stop_ids=(), threads=2, cache_slots=2, prefill_step=8
    )
    yield b
    b.close()


def run(batch, until=None):
    """next() until every live sequence ended (or `until` steps); tokens and finish per uid."""
    tokens, finish, steps = {}, {}, 0
    while batch.live and (until is None or steps < until):
        for r in batch.next():
            tokens.setdefault(r.uid, []).append(r.token)
            if r.finish_reason:
                finish[r.uid] = r.finish_reason
                batch.remove([r.uid], keep=True)
        steps += 1
    return tokens, finish


def test_requests_joining_a_running_batch_decode_as_each_alone(batch, prompts, alone):
    """Two requests start; after three steps a third joins (prompts longer than a prefill step of
    8 tokens: read in chunks while the others decode); when one ends the fourth takes its slot."""
    assert min(map(len, prompts)) > 8
    a, b = batch.insert(prompts[0], N), batch.insert(prompts[1], N)
    tokens, _ = run(batch, until=3)
    c = batch.insert(prompts[2], N)
    more, finish = run(batch)
    for uid, got in more.items():
        tokens.setdefault(uid, []).extend(got)
    d = batch.insert(prompts[3], N)
    last, finish_d = run(batch)
    tokens[d] = last[d]
    assert [tokens[u] for u in (a, b, c, d)] == alone
    assert {**finish, **finish_d} == {a: "length", b: "length", c: "length", d: "length"}


def test_a_stop_token_ends_a_sequence_with_finish_stop(batch, prompts, alone):
    stop = alone[0][4]
    uid = batch.insert(prompts[0], N, stop_ids=[stop])
    tokens, finish = run(batch)
    assert tokens[uid] == alone[0][: alone[0].index(stop) + 1] and finish[uid] == "stop"


def test_a_finished_prefix_serves_the_next_prompt_from_the_kv_cache(batch, prompts, alone, tiny_gguf):
    """The second turn of a conversation extends the first turn's prompt and answer: it starts
    from the cached sequence (all but its last token reused) and decodes as it would from scratch."""
    first = batch.insert(prompts[0], N)
    tokens, _ = run(batch)
    assert batch.stats() == {"hits": 0, "misses": 1, "entries": 1, "tokens": len(prompts[0]) + N - 1}
    follow = prompts[0] + tokens[first] + prompts[1][1:]
    uid = batch.insert(follow, N)
    assert batch.cached_tokens(uid) == len(prompts[0]) + N - 1
    got, _ = run(batch)
    model = llamacpp.load(tiny_gguf[0], n_ctx=512, threads=2)
    assert got[uid] == llamacpp.greedy(model, follow, N)[0]
    assert batch.stats()["hits"] == 1


def test_seeded_sampling_repeats_and_seeds_differ(batch, prompts):
    from worker.llamacpp_batch import Sampling

    def sample(seed):
        uid = batch.insert(prompts[1], N, Sampling(temperature=1.0, top_p=0.95, top_k=50, seed=seed))
        return run(batch)[0][uid]

    one, again, other = sample(1), sample(1), sample(2)
    assert one == again and one != other


def test_a_removed_sequence_frees_its_slot(batch, prompts, alone):
    uids = [batch.insert(p, N) for p in prompts[:3]]
    run(batch, until=2)
    batch.remove([uids[1]])
    uid = batch.insert(prompts[3], N)
    tokens, finish = run(batch)
    assert tokens[uid] == alone[3] and finish[uid] == "length"
    with pytest.raises(RuntimeError, match="batch is full"):
        for p in prompts:
            batch.insert(p, N)


def test_a_newcomer_that_does_not_fit_the_kv_cache_waits_for_room(tiny_gguf):
    """Two prompts of ~150 tokens in a KV cache of 256 cells: the second one's prompt waits while
    the first generates (no error, as the 16-user bench met before), then runs in the cells the
    first one frees; each answer is the one it gets alone."""
    from worker.llamacpp_batch import LlamaCppBatch

    path, tokenizer = tiny_gguf

    def encode(text):
        return prompt.encode_prompt(tokenizer, [{"role": "user", "content": text}], "És o assistente.")

    long = []
    for q in QUESTIONS[:2]:
        text = q
        while len(encode(text)) < 150:
            text += " " + q
        long.append(encode(text))
    assert all(140 < len(ids) < 240 for ids in long), [len(ids) for ids in long]
    model = llamacpp.load(path, n_ctx=512, threads=2)
    alone = [llamacpp.greedy(model, ids, N)[0] for ids in long]
    b = LlamaCppBatch(path, n_ctx=256, max_batch=2, stop_ids=(), threads=2, cache_slots=1, prefill_step=64)
    try:
        assert b.seqs.n_ctx < sum(len(ids) + N for ids in long)
        first, second = b.insert(long[0], N), b.insert(long[1], N)
        tokens, finish = run(b)
    finally:
        b.close()
    assert [tokens[first], tokens[second]] == alone
    assert finish == {first: "length", second: "length"}
