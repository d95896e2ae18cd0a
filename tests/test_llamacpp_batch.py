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


def step(batch, tokens, finish):
    """One next(): its tokens and finish reasons recorded per uid, ended sequences removed (kept
    as cache entries, as the engine does)."""
    for r in batch.next():
        tokens.setdefault(r.uid, []).append(r.token)
        if r.finish_reason:
            finish[r.uid] = r.finish_reason
            batch.remove([r.uid], keep=True)


def run(batch, until=None):
    """next() until every live sequence ended (or `until` steps); tokens and finish per uid."""
    tokens, finish, steps = {}, {}, 0
    while batch.live and (until is None or steps < until):
        step(batch, tokens, finish)
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
    assert batch.stats() == {
        "hits": 0,
        "misses": 1,
        "entries": 1,
        "tokens": len(prompts[0]) + N - 1,
        "preempted": 0,
    }
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


def long_prompts(tokenizer, lengths):
    """Prompts of about the given token lengths (a question repeated)."""
    out = []
    for q, n in zip(QUESTIONS, lengths):
        text = q
        while (
            len(
                ids := prompt.encode_prompt(
                    tokenizer, [{"role": "user", "content": text}], "És o assistente."
                )
            )
            < n
        ):
            text += " " + q
        out.append(ids)
    return out


def run_in_small_cache(tiny_gguf, prompts, n_tokens, insert_at, n_ctx=256):
    """Each prompt inserted at its step (0: at once) into a batch of two in a KV cache of n_ctx
    cells; (tokens per prompt, finish per prompt, the batch's stats, each prompt alone)."""
    from worker.llamacpp_batch import LlamaCppBatch

    path, _ = tiny_gguf
    model = llamacpp.load(path, n_ctx=512, threads=2)
    alone = [llamacpp.greedy(model, ids, n)[0] for ids, n in zip(prompts, n_tokens)]
    b = LlamaCppBatch(path, n_ctx=n_ctx, max_batch=2, stop_ids=(), threads=2, cache_slots=1, prefill_step=64)
    tokens, finish, uids, steps = {}, {}, [], 0
    try:
        assert b.seqs.n_ctx < sum(len(ids) + n for ids, n in zip(prompts, n_tokens))
        while len(uids) < len(prompts) or b.live:
            while len(uids) < len(prompts) and insert_at[len(uids)] <= steps:
                uids.append(b.insert(prompts[len(uids)], n_tokens[len(uids)]))
            step(b, tokens, finish)
            steps += 1
            assert steps < 2000, "the batch does not advance"
        stats = b.stats()
    finally:
        b.close()
    return [tokens[u] for u in uids], [finish[u] for u in uids], stats, alone


def test_a_newcomer_that_does_not_fit_the_kv_cache_waits_for_room(tiny_gguf):
    """Two prompts of ~150 tokens in a KV cache of 256 cells: the second one's prompt waits while
    the first generates (no error, as the 16-user bench met before), then runs in the cells the
    first one frees; each answer is the one it gets alone."""
    prompts = long_prompts(tiny_gguf[1], (150, 150))
    assert all(140 < len(ids) < 240 for ids in prompts), [len(ids) for ids in prompts]
    tokens, finish, _, alone = run_in_small_cache(tiny_gguf, prompts, (N, N), (0, 0))
    assert tokens == alone
    assert finish == ["length", "length"]


def test_a_partly_read_prompt_gives_its_cells_back_to_a_generating_sequence(tiny_gguf):
    """The 16-user bench's failure (`llama_decode returned 1`): a newcomer read part of its long
    prompt into the cells a generating sequence then needs. It gives them back and reads its
    prompt again once the first sequence ends; each answer is the one it gets alone."""
    prompts = long_prompts(tiny_gguf[1], (60, 220))
    tokens, finish, stats, alone = run_in_small_cache(tiny_gguf, prompts, (150, 20), (0, 3))
    assert stats["preempted"] >= 1  # the scenario happened
    assert tokens == alone
    assert finish == ["length", "length"]


def test_two_generating_sequences_that_outgrow_the_kv_cache_take_turns(tiny_gguf):
    """Two answers whose prompts fit together but whose lengths do not: the younger sequence is
    preempted (its cells freed), the older finishes, and the younger reads its prompt and the
    tokens it had generated again and goes on: no error, each answer the one it gets alone."""
    prompts = long_prompts(tiny_gguf[1], (70, 70))
    tokens, finish, stats, alone = run_in_small_cache(tiny_gguf, prompts, (120, 120), (0, 0))
    assert stats["preempted"] >= 1
    assert tokens == alone
    assert finish == ["length", "length"]


def test_a_sequence_longer_than_the_kv_cache_is_an_error(tiny_gguf):
    """Alone and still no room: nothing is left to give up, and llama_decode's failure is raised."""
    from worker.llamacpp_seqs import DecodeError

    prompts = long_prompts(tiny_gguf[1], (70,))
    with pytest.raises(DecodeError):
        run_in_small_cache(tiny_gguf, prompts, (300,), (0,))
