"""worker/llamacpp_seqs.py: llama.cpp sequences decoded together through the low-level bindings,
on a GGUF of the tiny model (train/fuse_gguf.py's export of models/tiny-mistral). Batched greedy
decoding gives what llama-cpp-python's one-sequence Llama gives; a copied prefix is not
recomputed and gives the same logits; a dropped sequence's slot serves a new one."""

import numpy as np
import pytest

from core import llamacpp, prompt

if not llamacpp.installed():
    pytest.skip(llamacpp.INSTALL_HINT, allow_module_level=True)

QUESTIONS = (
    "Em que ano foi fundado o Sporting Clube Farense?",
    "Qual é o estádio do Farense?",
    "Quem é o treinador?",
    "Onde fica Faro?",
)
MAX_TOKENS = 16
# the same model in another batch shape (another matmul path, F16 KV cache): logits may move by
# float rounding; stated bound 0.5% of the largest |logit|
REL_TOL = 0.005


@pytest.fixture(scope="module")
def prompts(tiny_gguf):
    _, tokenizer = tiny_gguf
    return [
        prompt.encode_prompt(tokenizer, [{"role": "user", "content": q}], "És o assistente.")
        for q in QUESTIONS
    ]


@pytest.fixture(scope="module")
def reference(tiny_gguf, prompts):
    """Each prompt's greedy continuation and its last-position logits, one at a time (Llama)."""
    path, tokenizer = tiny_gguf
    model = llamacpp.load(path, n_ctx=512, threads=2)
    return [
        (
            llamacpp.greedy(model, ids, MAX_TOKENS, {tokenizer.eos_token_id})[0],
            llamacpp.logits(model, ids)[-1],
        )
        for ids in prompts
    ]


@pytest.fixture
def seqs(tiny_gguf):
    from worker.llamacpp_seqs import Sequences

    s = Sequences(tiny_gguf[0], n_ctx=1024, slots=4, threads=2, n_batch=64)
    yield s
    s.close()


def close(a, b):
    return np.abs(a - b).max() <= REL_TOL * np.abs(b).max()


def greedy_together(seqs, prompts, eos, seq_ids=None):
    """Prefill every prompt in one batch, then one decode step per token for all live sequences."""
    from worker.llamacpp_seqs import Work

    seq_ids = seq_ids or list(range(len(prompts)))
    logits = seqs.decode([Work(s, p, 0) for s, p in zip(seq_ids, prompts)])
    first = dict(logits)
    out, pos, live = {s: [] for s in seq_ids}, {s: len(p) for s, p in zip(seq_ids, prompts)}, set(seq_ids)
    while live:
        step = []
        for s in sorted(live):
            token = int(logits[s].argmax())
            out[s].append(token)
            if token == eos or len(out[s]) == MAX_TOKENS:
                live.discard(s)
            else:
                step.append(Work(s, [token], pos[s]))
                pos[s] += 1
        logits = seqs.decode(step) if step else {}
    return [out[s] for s in seq_ids], [first[s] for s in seq_ids], pos


def test_four_sequences_decoded_together_equal_each_decoded_alone(seqs, prompts, reference, tiny_gguf):
    """One batch for the four prompts (longer than n_batch together: split into several
    llama_decode calls), then one llama_decode per step for every live sequence."""
    eos = tiny_gguf[1].eos_token_id
    assert sum(map(len, prompts)) > seqs.n_batch
    tokens, first, pos = greedy_together(seqs, prompts, eos)
    for i, (want_tokens, want_logits) in enumerate(reference):
        assert tokens[i] == want_tokens, i
        assert close(first[i], want_logits), (i, np.abs(first[i] - want_logits).max())
        assert seqs.length(i) == pos[i]


def test_a_copied_prefix_is_shared_not_recomputed_and_gives_the_same_logits(seqs, prompts, reference):
    """Sequence 0 holds prompt 0; sequence 1 gets its first k positions by llama_memory_seq_cp and
    decodes only the rest: the same last logits as the full prompt decoded alone."""
    from worker.llamacpp_seqs import Work

    ids = prompts[0]
    seqs.decode([Work(0, ids, 0)])
    k = len(ids) - 3
    seqs.copy_prefix(0, 1, k)
    assert seqs.length(1) == k
    logits = seqs.decode([Work(1, ids[k:], k)])[1]
    assert close(logits, reference[0][1])
    assert int(logits.argmax()) == reference[0][0][0]


def test_a_dropped_sequence_frees_its_slot_for_a_new_prompt(seqs, prompts, reference, tiny_gguf):
    """Cancel: sequence 2 is dropped halfway through its answer; the slot then serves another
    prompt from position 0 and gives that prompt's own answer."""
    from worker.llamacpp_seqs import Work

    eos = tiny_gguf[1].eos_token_id
    seqs.decode([Work(2, prompts[2], 0)])
    seqs.decode([Work(2, reference[2][0][:3], len(prompts[2]))])
    assert seqs.drop(2) and seqs.length(2) == 0
    tokens, _, _ = greedy_together(seqs, [prompts[3]], eos, seq_ids=[2])
    assert tokens[0] == reference[3][0]


def test_a_batch_past_the_context_fails_with_decode_error(tiny_gguf):
    """A prompt longer than the context is llama.cpp's failure, raised as DecodeError (the engine
    fits prompts to the context first; this is what it guards against)."""
    from worker.llamacpp_seqs import DecodeError, Sequences, Work

    s = Sequences(tiny_gguf[0], n_ctx=256, slots=1, threads=2, n_batch=64)
    try:
        with pytest.raises(DecodeError, match="llama_decode returned"):
            s.decode([Work(0, [5] * 300, 0)])
    finally:
        s.close()
