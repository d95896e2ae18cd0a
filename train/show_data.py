"""Print training examples as the model sees them: the check to run before a long training.

    python -m train.show_data [--config train/config.yaml] [--model M] [--data DIR] [-n 3]
    make show-data MODEL=models/tiny-mistral N=5

Each example is encoded exactly as training encodes it (core/prompt.py through
train/batches.py, with the config's system prompt, train_on and max_seq_length) and printed
token for token in two parts: the prompt, which is masked (no loss; it is what the worker sends),
and the trained part (the answer and its end-of-turn token). Control tokens are marked apart
from text, so "[INST]" typed in the data (plain text) cannot be mistaken for the template's
[INST]. On a terminal the parts are coloured; otherwise they are labelled and control tokens
are shown as ‹[INST]›. The anchor is axolotl's `preprocess --debug`.
"""

import argparse
import sys

from core import paths
from core.config import ConfigError, load_config
from core.prompt import PromptError, encode_examples
from train.dist import Dist
from train.exits import Stop
from train.inputs import read_data

COLOURS = {"masked": "\033[2m", "trained": "\033[32m", "control": "\033[35;1m", "reset": "\033[0m"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.show_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(paths.CONFIG))
    p.add_argument("--model", help="base model (default: the config's)")
    p.add_argument("--data", help="folder with train.jsonl (default: the config's)")
    p.add_argument("--split", default="train", choices=["train", "valid"])
    p.add_argument("-n", type=int, default=3, help="examples to print (default 3)")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    return p.parse_args(argv)


def decode_run(tokenizer, ids, anchor):
    """Text tokens as they read after a control token: decoded behind one (`anchor`), so a
    decoder that strips the leading space of a whole text keeps this run's."""
    head = tokenizer.decode([anchor])
    return tokenizer.decode([anchor] + ids)[len(head) :]


def pieces(tokenizer, ids, specials):
    """[(text, is_control)]: runs of text tokens decoded together, control tokens apart."""
    anchor = min(specials)
    out, run = [], []
    for i in ids + [None]:
        if i is None or i in specials:
            if run:
                out.append((decode_run(tokenizer, run, anchor), False))
                run = []
            if i is not None:
                out.append((tokenizer.convert_ids_to_tokens(i), True))
        else:
            run.append(i)
    return out


def show(tokenizer, ids, part, specials, colour):
    text = ""
    for piece, control in pieces(tokenizer, ids, specials):
        if colour:
            text += f"{COLOURS['control']}{piece}{COLOURS['reset']}{COLOURS[part]}" if control else piece
        else:
            text += f"\u2039{piece}\u203a" if control else piece
    if colour:
        return f"{COLOURS[part]}{text}{COLOURS['reset']}"
    return f"{part.upper():>8} | " + text.replace("\n", "\n         | ")


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, {"model": args.model, "data": args.data})
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        train_split, valid_split, system_prompt = read_data(cfg, Dist().log)  # as training reads it
    except Stop as e:
        print(e, file=sys.stderr)
        return 1
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(cfg["model"])
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    split = train_split if args.split == "train" else valid_split
    return report(tokenizer, split, system_prompt, cfg, args.n, colour)


def report(tokenizer, split, system_prompt, cfg, n, colour):
    specials = set(tokenizer.all_special_ids)
    totals = {"examples": 0, "tokens": 0, "trained": 0, "over": 0}
    for i, messages in enumerate(split.conversations):
        try:
            examples = encode_examples(tokenizer, messages, system_prompt, cfg["train_on"])
        except PromptError as e:
            print(f"error: {split.where(i)}: {e}", file=sys.stderr)
            return 1
        for ids, prompt_len in examples:
            totals["examples"] += 1
            totals["tokens"] += len(ids)
            totals["trained"] += len(ids) - prompt_len
            totals["over"] += len(ids) > cfg["max_seq_length"]
            if totals["examples"] <= n:
                noised = " (a noised copy)" if i >= len(split.conversations) - split.noised else ""
                print(
                    f"--- {split.where(i)}{noised}: {len(ids)} tokens = {prompt_len} prompt (masked) + "
                    f"{len(ids) - prompt_len} trained"
                )
                print(show(tokenizer, ids[:prompt_len], "masked", specials, colour))
                print(show(tokenizer, ids[prompt_len:], "trained", specials, colour))
    print(
        f"=== {split.path}: {totals['examples']} examples (train_on: {cfg['train_on']}), "
        f"{totals['tokens']} tokens, {totals['trained']} trained; "
        f"{totals['over']} longer than max_seq_length {cfg['max_seq_length']} (would be cut)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
