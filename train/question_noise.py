"""More questions per answer without writing any: noised copies of the training questions.

A small model fine-tuned on a club's questions learns every answer, then maps a question worded
another way to the wrong one (docs/RECIPES.md, "What limits it"). Several questions per answer
is what helps (Bhushan et al., NAACL 2025 Findings); this makes more of them the way EDA does
(Wei & Zou, EMNLP 2019, "Easy Data Augmentation"), less its synonym step, which would need a
thesaurus of the data's language that knows word senses: the Portuguese thesaurus found on PyPI
(data-augmentation-gaspln 0.2.3's, Brazilian, GPL-3) offers "olfato" for Faro, verb forms for
"cores" and "comparsa" for sócio, so it would teach wrong questions.

Config `question_noise: N` (0 = off) adds N variants of each training conversation, its last
question changed and its answer not. Each variant gets one word-level change - random deletion
(each word dropped with probability P_DELETE, at least two kept) or random swap (one pair of
words per ten, at least one) - and, half of the time, one written-form change: lower case,
accents dropped, or the final punctuation dropped: the way fans type. (A deletion may drop no
word and a swap may swap two equal ones: such a variant differs in its written form only.)
Seeded by the run's seed, the conversation and the variant: the same data and seed give the same
variants on any machine.

Config `question_noise_follow_ups: P` asks a share P of the variants as a follow-up: after
another exchange of the data (its last question and answer, one whose answer differs), so that
the model learns to answer the last question of a conversation, not the one before it, as a
fan's second question in a chat needs. The variant's own question and answer are the same as
without; only the turns before it differ. With `train_on: last` (the default) only the last
answer is trained; with all_assistant the earlier one is too, a right answer of the data.

A variant that repeats a question already there, or is a near copy of an evaluation question
(train/eval_sets.py, the rule `make data` applies to the user's own data), is not added. The
validation split is never noised."""

import random

from train.facts import strip_accents  # the one accent rule, the one eval matches by

P_DELETE = 0.15
MIN_WORDS = 3  # shorter questions have no word to spare


def delete_words(words, rng):
    kept = [w for w in words if rng.random() >= P_DELETE]
    return kept if len(kept) >= 2 else words[:2]


def swap_words(words, rng):
    words = list(words)
    for _ in range(max(1, len(words) // 10)):
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    return words


def drop_end_punctuation(text):
    return text.rstrip().rstrip("?!.").rstrip()


WORD_CHANGES = (delete_words, swap_words)
FORM_CHANGES = (str.lower, strip_accents, drop_end_punctuation)


def noisy(question, rng):
    """A noised copy of question, or None when it is too short to noise."""
    words = question.split()
    if len(words) < MIN_WORDS:
        return None
    text = " ".join(rng.choice(WORD_CHANGES)(words, rng))
    return rng.choice(FORM_CHANGES)(text) if rng.random() < 0.5 else text


def earlier_exchange(exchanges, own, rng):
    """One of exchanges (a question and its answer), drawn uniformly among those not at the
    positions `own` (ascending: the exchanges with the variant's own answer), or [] if none."""
    if len(own) >= len(exchanges):
        return []
    at = rng.randrange(len(exchanges) - len(own))  # the at-th exchange that is not one of own
    for position in own:
        at += position <= at
    return exchanges[at]


def variants(conversations, count, seed, near_copy=lambda text: None, follow_ups=0.0):
    """[(index of the conversation, its noised copy)], count per conversation at most, in order;
    a share follow_ups of them after another exchange of the data (earlier_exchange).
    near_copy(text) is truthy for a question that must stay out of training (an evaluation
    question's near copy: eval_sets.Guard.near_copy)."""
    seen = {m["content"] for c in conversations for m in c if m["role"] == "user"}
    exchanges = [c[-2:] for c in conversations if len(c) >= 2 and c[-2]["role"] == "user"]
    with_answer = {}  # an answer -> the positions in exchanges of those that give it
    for position, (_, reply) in enumerate(exchanges):
        with_answer.setdefault(reply["content"], []).append(position)
    out = []
    for index, messages in enumerate(conversations):
        *head, user, answer = messages
        if user["role"] != "user":
            continue
        for k in range(count):
            text = noisy(user["content"], random.Random(f"{seed}:{index}:{k}"))
            if text is None or text in seen or near_copy(text):
                continue
            seen.add(text)
            rng = random.Random(f"{seed}:{index}:{k}:earlier")
            own = with_answer.get(answer["content"], [])
            before = earlier_exchange(exchanges, own, rng) if rng.random() < follow_ups else []
            out.append((index, [*head, *before, {**user, "content": text}, answer]))
    return out
